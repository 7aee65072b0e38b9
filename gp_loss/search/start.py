"""The search's start and its noise-aware re-evaluations: the parts of the loop outside the
steady state, as a mixin of ``evolution.Evolution`` (which holds the state they use).

* ``reference``: the losses of ``search.reference`` (cross-entropy) trained once, for the table.
* ``seeding`` -> ``initial``: with ``search.initial_fitness = "cheap"`` (the paper's seeding),
  random screened candidates are scored by the cheaper initial surrogate, then the best
  ``search.rescore`` are re-scored by the surrogate; otherwise the random candidates are scored
  by the surrogate directly. The population is the best ``search.population`` of the phase
  ``initial`` rows that trained, all equally old (``initial_population``, which ``plot`` uses).
* ``reeval``: with ``search.reeval_seeds > 1``, a member that survived ``reeval_after`` births
  is trained with more seeds and its fitness becomes the mean (a failed seed counts 0).
* ``_load``: the driver's state rebuilt from the store (phase and counters, members, what is
  pending, what was evaluated earlier), at the start, on resume and after each start phase.

Every proposal is stored (``pending``) in one transaction before it is submitted, so the
loop's resume re-submits exactly what was in flight.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

from ..lang import symbolic
from ..lang.trees import parse, to_text
from ..lang.variation import random_tree
from ..runs.ranking import row_rank_key, tie_value
from ..screen import integrity, novelty
from . import tasks
from .proposals import Attempts, forced

log = logging.getLogger("gp_loss.search")

MAX_ROUNDS = 50  # parents drawn for one child before the search declares the space exhausted


@dataclass
class Cand:
    """What the driver keeps in memory about a candidate that trained (or is training)."""

    id: int
    tree: object
    key: str
    fingerprint: object
    phenotype: object
    sign: int
    fitness: float | None = None
    val_nll: float | None = None  # the tie-break between equal fitnesses (runs.ranking.rank_key)
    age: int = 0
    birth: int = 0
    phase: str = "child"
    parent: int = 0  # a re-evaluation's member


class SearchStopped(Exception):
    pass


def initial_population(rows, population: int) -> list[dict]:
    """The initial population among stored rows: the best ``population`` phase-``initial``
    rows that trained (``ranking.row_rank_key``: fitness descending, then the lower validation
    NLL, then the lowest id), fewer when fewer trained (the rest failed, e.g. the
    pre-screen). The one rule for the search, its log line and ``plot``."""
    ok = [r for r in rows if r["phase"] == "initial" and r["status"] in ("evaluated", "reused")]
    ok.sort(key=row_rank_key)
    return ok[:population]


class StartPhases:
    """Mixin of ``Evolution``: loading state from the store, reference, seeding/initial
    proposals and selection, and re-evaluation with more seeds."""

    # ------------------------------------------------------------------ state from the store
    def _load(self):
        st = self.store.state()
        # A finished run resumed with a larger `children` simply carries on evolving.
        phase = st.get("phase", self.first_phase)
        self.phase = {"done": "evolve"}.get(phase, phase)
        self.next_init = st.get("next_init", 0)
        self.next_birth = st.get("next_birth", 1)
        self.children_done = st.get("children_done", 0)
        self.refs_done = st.get("refs_done", False)
        member_ids = {r["id"]: r["age_order"] for r in self.store.population()}
        self.queue, self.base_queue, self.partial = [], [], {}
        for row in self.store.candidates():
            if row["status"] == "pending" and tasks.done_entries(row["result"]):
                self.partial[row["id"]] = tasks.done_entries(row["result"])  # tasks done so far
            if row["phase"] in tasks.BASELINE_PHASES:
                self._load_baseline(row)
                continue
            if row["phase"] == "reeval":
                self.promoted.add(row["parent_id"])
                if row["status"] == "pending":
                    cand = Cand(row["id"], None, row["key"], None, None, row["sign"] or 1,
                                birth=row["birth"], phase="reeval", parent=row["parent_id"])
                    self.queue.append((row["id"], row["expr"], row["sign"] or 1, cand))
                continue
            if row["phase"] not in ("seeding", "initial", "child", "reference"):
                continue  # e.g. elimination re-runs: not part of the search's state
            if row["phase"] == "seeding" and self.phase != "seeding":
                continue  # a cheap fitness: never reused for, or ranked with, the surrogate's
            if row["phase"] == "reference" or row["status"] not in ("evaluated", "reused",
                                                                       "failed", "pending"):
                if row["phase"] == "reference" and row["status"] == "pending":
                    self.queue.append((row["id"], row["expr"], row["sign"] or 1, None))
                continue
            cand = self._cand_from_row(row)
            if row["phase"] != "seeding":  # over the whole run, not only members
                self._note_best(cand.fitness, row["expr"])
            if row["status"] == "pending":  # resume: re-submitted first, in id order
                self.queue.append((row["id"], row["expr"], row["sign"] or 1, cand))
                self.pool.add(cand.id, cand.key, cand.fingerprint)
            elif row["id"] in member_ids:
                cand.age = member_ids[row["id"]]
                self._add_member(cand)
            elif self.phase in ("seeding", "initial") and row["phase"] == self.phase:
                self.pool.add(cand.id, cand.key, cand.fingerprint)  # dedup within the pool
            else:
                self._add_past(cand, row)

    def _load_baseline(self, row):
        """A baseline row (tasks.py): its accuracies per task once trained, else queued."""
        kind = tasks.BASELINE_PHASES[row["phase"]]
        if row["status"] == "pending":
            cand = Cand(row["id"], None, row["key"], None, None, 1, birth=row["birth"],
                        phase=row["phase"])
            self.base_queue.append((row["id"], row["expr"], 1, cand))
        elif row["status"] in ("evaluated", "reused"):
            self.base[(kind, row["birth"])] = [e["val_acc"] for e in row["result"]["tasks"]]
        else:
            self._baseline_done(Cand(row["id"], None, row["key"], None, None, 1,
                                     birth=row["birth"], phase=row["phase"]), row["result"] or {})

    def _cand_from_row(self, row) -> Cand:
        tree = parse(row["expr"], self.pset)
        scr = integrity.screen(tree, self.pset)
        sign = row["sign"] if row["sign"] is not None else scr.sign
        birth = row["birth"] or 0
        # A child's age is its birth number (as in _commit_child): a child still in flight
        # when the run stopped must not come back as old as the initial members.
        ok = row["status"] in ("evaluated", "reused")
        return Cand(row["id"], tree, row["key"], scr.fingerprint,
                    novelty.phenotype(scr.curve, sign) if scr.curve is not None else None,
                    sign, row["fitness"] if ok else None, tie_value(row) if ok else None,
                    age=birth if row["phase"] == "child" else 0, birth=birth, phase=row["phase"])

    # ------------------------------------------------------------------ the start
    def _propose_reference(self):
        s, todo = self.cfg.search, []
        with self.store.transaction():
            for i, expr in enumerate(s.reference):
                tree = parse(expr, self.pset)
                integ = integrity.integrity(tree, self.pset)
                sign = integ.sign if integ.accepted else 1
                key = symbolic.canonical_key(tree, self.pset, sign)
                cid = self.store.add_candidate(to_text(tree, self.pset), "pending",
                                               phase="reference", birth=i, sign=sign, key=key,
                                               reason=f"reference {expr}")
                todo.append((cid, to_text(tree, self.pset), sign, None))
            self.refs_done = True
            self._state()
        for job in todo:
            self._submit(*job)

    def _propose_initial(self):
        """Propose initial candidate number next_init (seeds first, then random trees)."""
        s, i, phase = self.cfg.search, self.next_init, self.first_phase
        tried = Attempts(self.pset, phase, i)
        seeds = list(s.seed_with)
        rng = self._rng("initial", i)
        for attempt in itertools.count():
            if attempt >= MAX_ROUNDS * s.max_retries or self._out_of_time():
                self._give_up(tried, f"no new acceptable initial candidate after {attempt} "
                                     "random trees: the primitive set looks too small for "
                                     "search.initial")
            t1 = time.perf_counter()
            seed = i < len(seeds)
            tree = parse(seeds[i], self.pset) if seed else random_tree(self.pset, rng)
            verdict = self._vet(tree)
            if seed:
                verdict = forced(tree, self.pset, verdict)
            if verdict.accepted:
                break
            tried.reject(tree, verdict.status, verdict.reason, seconds=time.perf_counter() - t1)
            if seed:  # a seed that duplicates an earlier one: skip it
                tree = None
                break
        with self.store.transaction():
            for r in tried.rows:
                self.store.add_candidate(**r)
            if tree is not None:
                scr, key = verdict.screened, verdict.key
                cid = self.store.add_candidate(to_text(tree, self.pset), "pending",
                                               phase=phase, birth=i, key=key, sign=scr.sign,
                                               engine_seconds=tried.own_seconds())
                cand = Cand(cid, tree, key, scr.fingerprint, verdict.phenotype, scr.sign,
                            birth=i, phase=phase)
                self.pool.add(cid, key, scr.fingerprint)
            self.next_init = i + 1
            self._state()
        if tree is not None:
            self._submit(cid, to_text(tree, self.pset), scr.sign, cand)

    def _start_rescore(self):
        """End of the seeding phase: the best `rescore` cheaply scored candidates become
        pending initial rows (one transaction), re-scored by the surrogate."""
        rows = [r for r in self.store.candidates(phase="seeding")
                if r["status"] in ("evaluated", "reused")]
        if not rows:
            raise SearchStopped("no initial candidate trained successfully; see `gp-loss show`")
        rows.sort(key=row_rank_key)
        with self.store.transaction():
            for rank, r in enumerate(rows[:self.cfg.rescore_count()]):
                self.store.add_candidate(r["expr"], "pending", phase="initial", birth=rank,
                                         key=r["key"], sign=r["sign"], parent_id=r["id"],
                                         reason=f"re-score of #{r['id']}")
            self.phase = "initial"
            self._state()
        self.pool = novelty.NoveltyIndex()
        self._load()
        log.info("seeding done: the best %d of %d re-scored by the surrogate", len(self.queue),
                 len(rows))

    def _select_initial(self):
        """End of the initial phase: the best `population` successes, all equally old."""
        keep = initial_population(self.store.candidates(phase="initial"),
                                  self.cfg.search.population)
        if not keep:
            raise SearchStopped("no initial candidate trained successfully; see `gp-loss show`")
        with self.store.transaction():
            self.store.replace_population([(r["id"], 0) for r in keep])
            self.phase = "evolve"
            self._state()
        self.pool, self.past = novelty.NoveltyIndex(), novelty.NoveltyIndex()
        self.past_rows = {}
        self.population.clear()
        self._load()
        log.info("initial population: %d members, best fitness %.4f", len(keep),
                 keep[0]["fitness"])

    def _promote(self, n: int):
        """Members that survived long enough get `reeval_seeds - 1` more seeds (pending rows,
        in the caller's transaction; submitted before the next child)."""
        s = self.cfg.search
        if s.reeval_seeds <= 1:
            return
        after = s.reeval_after or max(1, s.population // 2)
        for m in sorted(self.members.values(), key=lambda c: c.id):
            if m.id in self.promoted or n - m.age < after:
                continue
            self.promoted.add(m.id)
            text = to_text(m.tree, self.pset)
            for k in range(1, s.reeval_seeds):
                rid = self.store.add_candidate(text, "pending", phase="reeval", birth=k,
                                               key=m.key, sign=m.sign, parent_id=m.id)
                self.queue.append((rid, text, m.sign, Cand(rid, None, m.key, None, None, m.sign,
                                                           birth=k, phase="reeval",
                                                           parent=m.id)))

    def _failed_seed(self, offset: int) -> float:
        """What a failed seed counts: accuracy 0 -- with tasks, a gain of 0 minus ce_torch's
        accuracy on every task at that seed (a gain of 0 would reward the failure)."""
        if not self.multi:
            return 0.0
        return -sum(self.base[("main", offset)]) / len(self.base[("main", offset)])

    def _reeval_done(self, parent: int):
        """All seeds of a member are back: its fitness becomes their mean (a failed seed
        counts accuracy 0: ``_failed_seed``), the single-seed result stays in the row's result; its tie-break
        (val_nll) becomes the mean of the seeds' too, None unless every seed has one."""
        rows = self.store.candidates(phase="reeval")
        mine = [r for r in rows if r["parent_id"] == parent]
        if any(r["status"] == "pending" for r in mine):
            return
        row = self.store.candidate(parent)
        first = row["result"] or {}
        seeds = [float(first.get("fitness", row["fitness"]) or 0.0)] + [
            r["fitness"] if r["status"] in ("evaluated", "reused") and r["fitness"] is not None
            else self._failed_seed(r["birth"])
            for r in sorted(mine, key=lambda r: r["birth"])]
        mean = sum(seeds) / len(seeds)
        nlls = [tie_value({"result": first})] + [
            tie_value(r) if r["status"] in ("evaluated", "reused") else None
            for r in sorted(mine, key=lambda r: r["birth"])]
        nll = None if None in nlls else sum(nlls) / len(nlls)
        result = {**first, "seed_fitness": seeds, "seed_val_nll": nlls, "val_nll": nll}
        self.store.update_candidate(parent, fitness=mean, result=result)
        if parent in self.members:
            self.members[parent].fitness = mean
            self.members[parent].val_nll = nll
        if parent in self.past_rows:
            self.past_rows[parent] = {**self.past_rows[parent], "fitness": mean,
                                      "result": result}
        if self.best is not None and self.best[1] == row["expr"] and mean < self.best[0]:
            top = self.store.top(1)  # the single-seed best fell to its mean: find the new one
            self.best = None
            if top:
                self._note_best(top[0]["fitness"], top[0]["expr"])
        else:
            self._note_best(mean, row["expr"])
