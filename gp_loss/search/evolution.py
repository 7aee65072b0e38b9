"""Regularized (aging) evolution, asynchronous steady state, resumable from the run store.

The loop (DESIGN §6), written for clarity because training dominates the cost:

    initial: evaluate `initial` random screened candidates (+ `seed_with`); keep the best
             `population` of them, all equally old. With search.initial_fitness = "cheap"
             (the paper's seeding) they are first scored by the cheaper initial surrogate
             (phase "seeding"), and the best `rescore` of them are re-scored by the surrogate
             (phase "initial", parent = the seeding row) before the population is chosen;
             a cheap fitness is never ranked against, or reused for, a surrogate fitness.
    repeat until `children` children were evaluated or reused:
        parent  = best of `tournament` members drawn with replacement (equal fitness: the
                  lower validation NLL wins, then the lower id; ``ranking.rank_key``)
        child   = mutate(parent) until it passes screening and is not the same as a member
                  (after `max_retries` rejections in a row: record it, draw a new parent)
        if the child is the same as a candidate evaluated earlier: reuse its stored result
        else: evaluate it (up to `executor.workers` evaluations in flight)
        success -> insert it and remove the oldest member (ties: the worst by the same
        ranking); failure ->
        recorded, not inserted
        (search.reeval_seeds > 1) a member that survived `reeval_after` births is trained with
        more seeds (phase "reeval", parent = the member); its fitness becomes the mean

Every random choice comes from ``random.Random`` seeded by (search.seed, phase, birth number,
round), never from global state, so a run is reproducible and a resumed serial run proposes
exactly what the uninterrupted run would have. Each step is one store transaction: a proposal
(with the rejected attempts before it) is committed as ``pending`` before it is submitted, and
its result, the population change and the counters are committed together. After a kill,
``resume`` re-submits the pending evaluations and carries on, losing and repeating nothing.

Fed by ``config`` (what to do), ``lang.variation`` (mutations), ``proposals`` (screening,
duplicates, novelty: one ``Verdict`` per tree), ``cache`` (results across runs), ``execution`` +
``surrogate.fitness`` (evaluations) and ``runs.store`` (the only place state lives between
steps). The start (reference, seeding, initial selection) and the re-evaluations with more
seeds are in ``start.py``; the aging-evolution core in ``population.py``.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import random
import time
from dataclasses import asdict

from ..config import Config, ConfigError, config_to_dict
from ..execution import make_executor, wait_first
from ..execution.packing import Packer, pack_timeout
from ..lang import symbolic
from ..lang.psets import REFERENCE_SET, load_pset
from ..lang.trees import parse, to_text
from ..lang.variation import mutate
from ..runs.ranking import tie_value
from ..screen import novelty
from ..surrogate.fitness import evaluate, evaluate_pack
from ..surrogate.packtrain import effective_width
from .cache import FitnessCache, default_path, settings_digest
from .population import Population
from . import tasks
from .proposals import Attempts, Verdict, vet
from .start import MAX_ROUNDS, Cand, SearchStopped, StartPhases

log = logging.getLogger("gp_loss.search")
# Evaluations outside the progress bar's count: re-evaluations and the tasks' baselines.
EXTRA_PHASES = ("reeval", *tasks.BASELINE_PHASES)


class Evolution(StartPhases):
    def __init__(self, store, cfg: Config, progress=None):
        self.store, self.cfg, self.progress = store, cfg, progress
        s = cfg.search
        self.pset = load_pset(s.pset)
        if not self.pset.searchable:
            raise ConfigError(f"search.pset = {s.pset!r}: the {self.pset.name!r} set holds "
                              f"reference losses for train/compare/export, not a search space")
        if s.max_depth or s.max_size:  # a run may tighten or loosen the set's size limits
            self.pset = dataclasses.replace(self.pset, max_height=s.max_depth or self.pset.max_height,
                                            max_size=s.max_size or self.pset.max_size)
        self.cheap = s.initial_fitness == "cheap"
        # (name, surrogate dict) per task, in training order (tasks.py); without
        # [[search.tasks]] the one entry is the run's surrogate, as it always was.
        self.task_confs = {"main": [(n, asdict(c)) for n, c in cfg.task_surrogates()],
                           "seeding": [(n, asdict(c)) for n, c in
                                       cfg.task_surrogates(cheap=self.cheap)]}
        self.multi = tasks.multi(self.task_confs["main"])
        self.ref_pset = load_pset(REFERENCE_SET) if self.multi else None
        self.partial: dict = {}              # candidate id -> the task results it has so far
        self.base: dict = {}                 # (kind, seed offset) -> ce_torch's val_acc per task
        self.base_queue: list = []           # baseline evaluations to submit (before the rest)
        self.first_phase = "seeding" if self.cheap else "initial"  # where random trees go
        self.weights = asdict(s.mutation)
        self.population = Population(cfg.search.population)   # the aging-evolution core
        self.queue: list = []                # stored pending evaluations not yet submitted
        self.promoted: set = set()           # members already given more seeds
        self.inflight: dict = {}             # future -> (candidate id, Cand or None)
        self.cache_keys: dict = {}           # future -> (key, sign, settings) for the cache
        self.pool = novelty.NoveltyIndex()    # population + in flight: duplicates get re-mutated
        self.past = novelty.NoveltyIndex()    # evaluated earlier, no longer members: reuse
        self.past_rows: dict[int, dict] = {}
        self.stop_reason = None
        self.best = None                     # (fitness, expression text), best so far
        # Candidates per pack (surrogate/packtrain.py); 1 for a model the pack cannot serve
        # (effective_width says so once).
        self.width = max(effective_width(c["model"], cfg.executor.candidates_per_worker)
                         for confs in self.task_confs.values() for _, c in confs)
        self.packer = None

    # ------------------------------------------------------------------ bookkeeping helpers
    def _rng(self, *parts) -> random.Random:
        # str seeds are hashed with SHA-512 by random.seed: stable across processes/PYTHONHASHSEED
        return random.Random("/".join(str(p) for p in (self.cfg.search.seed,) + parts))

    @property
    def members(self) -> dict:
        """The population's members by id (read-only view for the start phases)."""
        return self.population.members

    def _add_member(self, cand: Cand):
        self.population.add(cand)
        self.pool.add(cand.id, cand.key, cand.fingerprint)

    def _add_past(self, cand: Cand, row: dict):
        self.past.add(cand.id, cand.key, cand.fingerprint)
        self.past_rows[cand.id] = row

    def _note_best(self, fitness, expr):
        """Track the best so far; ``expr`` is text or a tree (printed only when it wins)."""
        if fitness is not None and (self.best is None or fitness > self.best[0]):
            self.best = (fitness, expr if isinstance(expr, str) else to_text(expr, self.pset))
            if self.progress is not None:
                self.progress.best(*self.best)

    def _wall(self) -> float:
        return self.wall_base + time.monotonic() - self.t_start

    def _state(self, **extra):
        self.store.set_state(phase=self.phase, next_init=self.next_init,
                             next_birth=self.next_birth, children_done=self.children_done,
                             refs_done=self.refs_done, wall_seconds=self._wall(), **extra)

    # ------------------------------------------------------------------ screening + novelty
    def _vet(self, tree) -> Verdict:
        return vet(tree, self.pset, pool=self.pool, past=self.past,
                   phenotypes=[c.phenotype for c in self.population],
                   tolerance=self.cfg.search.phenotype_tolerance)

    # ------------------------------------------------------------------ proposals
    def _propose_child(self):
        s, n = self.cfg.search, self.next_birth
        tried = Attempts(self.pset, "child", n)
        for rnd in range(MAX_ROUNDS):
            rng = self._rng("child", n, rnd)
            parent = self.population.tournament(rng, s.tournament)
            for _ in range(s.max_retries):
                t1 = time.perf_counter()
                child, kind = mutate(parent.tree, self.pset, rng, self.weights)
                if child is None:
                    tried.reject(parent.tree, "rejected", "no_valid_mutation", parent=parent.id,
                                 mutation=kind)
                    continue
                verdict = self._vet(child)
                if verdict.accepted:
                    return self._commit_child(tried, child, kind, parent, verdict)
                tried.reject(child, verdict.status, verdict.reason, parent=parent.id,
                             mutation=kind, seconds=time.perf_counter() - t1)
            tried.reject(parent.tree, "rejected", "max_retries", parent=parent.id)
            if self._out_of_time():
                self._give_up(tried, "max_minutes reached while looking for an acceptable child")
        self._give_up(tried, f"no acceptable child after {MAX_ROUNDS} parents x "
                             f"{s.max_retries} retries: the search space looks exhausted")

    def _out_of_time(self) -> bool:
        m = self.cfg.search.max_minutes
        return bool(m) and time.monotonic() - self.t_start > 60 * m

    def _give_up(self, tried: Attempts, why):
        """Keep the rejected attempts (they are part of the run's record), then stop."""
        with self.store.transaction():
            for r in tried.rows:
                self.store.add_candidate(**r)
            self._state()
        raise SearchStopped(why)

    def _commit_child(self, tried: Attempts, child, mutation, parent: Cand, verdict: Verdict):
        """Store the attempts and the accepted child (a reused result, or pending and then
        submitted) in one transaction."""
        n, scr, key = tried.birth, verdict.screened, verdict.key
        text = to_text(child, self.pset)
        cand = Cand(0, child, key, scr.fingerprint, verdict.phenotype, scr.sign, birth=n, age=n)
        with self.store.transaction():
            for r in tried.rows:
                self.store.add_candidate(**r)
            common = dict(phase="child", birth=n, key=key, sign=scr.sign, parent_id=parent.id,
                          mutation=mutation, engine_seconds=tried.own_seconds())
            if verdict.status == "reuse":
                past_id = verdict.past_id
                old = self.past_rows[past_id]
                ok = old["status"] in ("evaluated", "reused") and old["fitness"] is not None
                cand.id = self.store.add_candidate(
                    text, "reused", reason=f"same as #{past_id}",
                    fitness=old["fitness"] if ok else None, result=old.get("result"), **common)
                cand.fitness = old["fitness"] if ok else None
                cand.val_nll = tie_value(old) if ok else None
                self.children_done += 1
                if ok:
                    self._insert(cand)
                else:
                    self._add_past(cand, {**old, "id": cand.id})
            else:
                cand.id = self.store.add_candidate(text, "pending", **common)
                self.pool.add(cand.id, key, scr.fingerprint)
            self.next_birth = n + 1
            self._state()
        if verdict.status == "reuse":
            if self.progress is not None:
                self.progress.advance()
        else:
            self._submit(cand.id, text, scr.sign, cand)

    def _insert(self, cand: Cand):
        """Add a successful child to the population and age out the oldest (in a transaction)."""
        self.store.add_member(cand.id, cand.age)
        self.pool.add(cand.id, cand.key, cand.fingerprint)
        oldest = self.population.insert(cand)
        self._note_best(cand.fitness, cand.tree)
        if oldest is not None:
            self.store.remove_member(oldest.id)
            self.pool.remove(oldest.id)
            self._add_past(oldest, self.store.candidate(oldest.id))
        self._promote(cand.age)

    # ------------------------------------------------------------------ evaluations
    @staticmethod
    def _kind(cand) -> str:
        """Which task settings an evaluation uses: "seeding" (the cheap initial fitness) or
        "main"."""
        phase = cand.phase if cand is not None else "reference"
        return "seeding" if phase == "seeding" or tasks.BASELINE_PHASES.get(phase) == "seeding" \
            else "main"

    def _submit(self, cid, text, sign, cand):
        """Submit the evaluation's next task (the first, or the one after those in
        ``self.partial``): from the fitness cache, in a pack, or alone."""
        kind = self._kind(cand)
        task = len(self.partial.get(cid, ()))
        _, conf = self.task_confs[kind][task]
        key = cand.key if cand is not None else self.store.candidate(cid)["key"]
        seed = self.cfg.surrogate.seed + (cand.birth if cand is not None
                                          and cand.phase in ("reeval", "baseline") else 0)
        pset = self.ref_pset if cand is not None and cand.phase in tasks.BASELINE_PHASES \
            else self.pset
        settings = self._settings(kind, task, conf, seed, pset)
        width = self._width(conf)
        hit = self.cache.get(key, sign, settings) if settings else None
        if hit is not None:  # trained before under the same settings: no training now
            fut = concurrent.futures.Future()
            fut.set_result(hit)
        elif self.packer is not None and width > 1:  # in a pack of K with others of its config
            fut = self.packer.submit((pset.source, conf), (text, seed, sign))
        else:
            fut = self.inner.submit(evaluate, text, pset.source, conf, seed, sign)
        self.inflight[fut] = (cid, cand)
        self.cache_keys[fut] = (key, sign, settings, width, text, task)

    def _settings(self, kind: str, task: int, conf: dict, seed: int, pset) -> str | None:
        """The cache digest of one task's evaluation config and seed (None when the cache is
        off): a task's results are shared with any run that trains under its settings."""
        if not self.cache.enabled:
            return None
        name = (kind, task, seed, pset.name)
        if name not in self.digests:
            self.digests[name] = settings_digest(conf, seed, self.cfg.executor.threads,
                                                 pset.source, pack=self._width(conf))
        return self.digests[name]

    def _width(self, conf: dict) -> int:
        """The pack width the candidates of ``conf`` train at (1: alone)."""
        return effective_width(conf["model"], self.width)

    def _complete(self, fut):
        cid, cand = self.inflight.pop(fut)
        key, sign, settings, width, text, task = self.cache_keys.pop(fut)
        t0 = time.perf_counter()
        try:
            res = fut.result()
        except Exception as exc:  # the worker died or raised outside evaluate()
            res = {"status": "failed", "reason": f"worker: {type(exc).__name__}: {exc}"[:300],
                   "fitness": 0.0, "seconds": 0.0}
        put = None
        if settings and not res.get("cached") and res.get("pack_k", 1) == width:  # after the
            # commit (the caller's): a kill never makes a resumed run find its own pending
            # result in the cache; a pack retried alone (pack_k 1) did not run under the
            # key's settings
            put = (key, sign, settings, res, f"{self.store.run_dir}#{cid}")
        if self.multi:
            res = self._task_done(cid, cand, text, sign, task, res)
            if res is None:  # more tasks to train: the row stays pending
                return put
        ok = res.get("status") == "ok"
        fitness = float(res["fitness"]) if ok else None
        cached = bool(res.get("cached"))
        with self.store.transaction():
            row = self.store.candidate(cid)
            row.update(status=("reused" if cached else "evaluated") if ok else "failed",
                       reason=("cache" if cached else None) if ok else res.get("reason"),
                       fitness=fitness,
                       seconds=res.get("seconds"), result=res)
            if cand is not None and cand.phase != "reeval":
                cand.fitness = fitness
                cand.val_nll = tie_value(row) if ok else None
                if cand.phase == "child":
                    self.pool.remove(cid)
                    self.children_done += 1
                    if ok:
                        self._insert(cand)
                    else:
                        self._add_past(cand, row)
                elif cand.phase == "initial":  # stays in the pool until the phase ends
                    self._note_best(fitness, cand.tree)
            self._state()
            engine = (row["engine_seconds"] or 0.0) + time.perf_counter() - t0
            self.store.update_candidate(cid, status=row["status"], reason=row["reason"],
                                        fitness=fitness, seconds=row["seconds"], result=res,
                                        engine_seconds=engine)
            if cand is not None and cand.phase == "reeval":
                self._reeval_done(cand.parent)
            if cand is not None and cand.phase in tasks.BASELINE_PHASES:
                self._baseline_done(cand, res)
        if self.progress is not None and (cand is None or cand.phase not in EXTRA_PHASES):
            self.progress.advance()  # re-evaluations are extra: not in the bar's total
        log.debug("#%d %s %s", cid, res.get("status"), fitness)
        return put

    # ------------------------------------------------------------------ tasks (tasks.py)
    def _task_done(self, cid, cand, text, sign, task, res):
        """One task of a multi-task evaluation is back. More to train: keep what is done in
        the pending row (a kill resumes at the next task), queue the next, return None.
        Otherwise the tasks' combined result (``tasks.combine``)."""
        kind = self._kind(cand)
        names = [n for n, _ in self.task_confs[kind]]
        done = self.partial.setdefault(cid, [])
        done.append(tasks.entry(names[task], res))
        baseline = cand is not None and cand.phase in tasks.BASELINE_PHASES
        if res.get("status") == "ok" and len(done) < len(names):
            self.store.update_candidate(cid, result=tasks.partial(done))
            (self.base_queue if baseline else self.queue).insert(0, (cid, text, sign, cand))
            return None
        del self.partial[cid]
        offset = cand.birth if cand is not None and cand.phase in ("reeval", "baseline") else 0
        return tasks.combine(done, None if baseline else self.base[(kind, offset)])

    def _baseline_done(self, cand, res):
        kind = tasks.BASELINE_PHASES[cand.phase]
        if res.get("status") == "ok":
            self.base[(kind, cand.birth)] = [e["val_acc"] for e in res["tasks"]]
        else:  # the reference itself fails a task: no gain can be measured on it
            self.stop_reason = (f"{tasks.BASELINE} (the reference of search.tasks) failed on "
                                f"task {res.get('failed_task')!r}: {res.get('reason')}; "
                                f"fix that task's settings")

    def _baselines_ready(self) -> bool:
        return all(k in self.base for k in self._baseline_keys())

    def _baseline_keys(self) -> list[tuple[str, int]]:
        """(kind, seed offset) of every baseline the run's fitnesses are measured against."""
        keys = [("main", k) for k in range(self.cfg.search.reeval_seeds)]
        return keys + ([("seeding", 0)] if self.cheap else [])

    def _ensure_baselines(self):
        """Store the missing baseline rows (pending: one per kind and seed offset; a new run
        or a run whose search.reeval_seeds grew) and queue them."""
        if not self.multi:
            return
        have = {(tasks.BASELINE_PHASES[r["phase"]], r["birth"])
                for ph in tasks.BASELINE_PHASES for r in self.store.candidates(phase=ph)}
        tree = parse(tasks.BASELINE, self.ref_pset)
        text = to_text(tree, self.ref_pset)
        key = symbolic.canonical_key(tree, self.ref_pset, 1)
        phase_of = {v: k for k, v in tasks.BASELINE_PHASES.items()}
        with self.store.transaction():
            for kind, k in self._baseline_keys():
                if (kind, k) in have:
                    continue
                cid = self.store.add_candidate(text, "pending", phase=phase_of[kind], birth=k,
                                               sign=1, key=key,
                                               reason=f"{tasks.BASELINE} on every task")
                self.base_queue.append((cid, text, 1, Cand(cid, None, key, None, None, 1,
                                                           birth=k, phase=phase_of[kind])))

    # ------------------------------------------------------------------ the loop
    def _fill(self):
        """Propose and submit until the executor's capacity is in flight (``workers``, or
        ``workers`` x 2K with packs: ``Packer.capacity``), then
        send the packs collected (a part-filled one too: the loop is about to wait)."""
        try:
            self._propose()
        finally:
            if self.packer is not None:
                self.packer.flush()

    def _propose(self):
        s, ex = self.cfg.search, self.cfg.executor
        workers = 1 if ex.kind == "serial" else max(1, ex.workers)
        capacity = workers if self.packer is None else self.packer.capacity
        while len(self.inflight) < capacity and self.stop_reason is None:
            if self._out_of_time():
                self.stop_reason = "max_minutes"
            elif self.base_queue:  # the references every gain is measured against come first
                self._submit(*self.base_queue.pop(0))
            elif self.multi and not self._baselines_ready():
                return  # nothing can be scored before they are back
            elif self.queue:
                self._submit(*self.queue.pop(0))
            elif not self.refs_done and s.reference:
                self._propose_reference()
            elif self.phase == self.first_phase and self.next_init < len(s.seed_with) + s.initial:
                self._propose_initial()
            elif self.phase == "evolve" and self.children_done + len(self.inflight) < s.children:
                self._propose_child()
            else:
                return

    def run(self) -> dict:
        """Run (or resume) until done, the time limit, or Ctrl-C; returns a short summary."""
        self.t_start = time.monotonic()
        self.wall_base = self.store.get_state("wall_seconds", 0.0)
        self._load()
        self._ensure_baselines()
        ex_cfg = self.cfg.executor
        blas = None
        if ex_cfg.kind != "serial":
            import torch
            from threadpoolctl import threadpool_limits

            # The driver only screens tiny float64 batches: one thread, leave the cores to
            # the workers (two contending threads make screening several times slower).
            # numpy's BLAS too: the novelty index's projections ran 200x slower on two
            # threads fighting the workers for the cores (0.45 s of a quick cut's 0.8 s).
            torch.set_num_threads(1)
            blas = threadpool_limits(limits=1, user_api="blas")
        timeout = max(c["timeout_s"] for confs in self.task_confs.values() for _, c in confs)
        self.executor = make_executor(ex_cfg.kind, ex_cfg.workers, ex_cfg.threads,
                                      retries=ex_cfg.retries, address=ex_cfg.address,
                                      gpus_per_eval=ex_cfg.gpus_per_eval,
                                      timeout_s=pack_timeout(timeout, self.width))
        self.inner = self.executor  # what runs a single evaluation (a pack's too)
        if self.width > 1:
            self.executor = Packer(self.executor, self.width, evaluate_pack)
            self.packer = self.executor
        path = self.cfg.search.fitness_cache or default_path()
        self.cache, self.digests = FitnessCache(path), {}
        try:
            while True:
                self._fill()
                if self.inflight:
                    done, _ = wait_first(list(self.inflight))
                    # One transaction for what arrived together (in a serial run: a whole
                    # pack), so a kill never leaves part of a pack applied: a resumed run
                    # then applies all of it before it proposes again, as this one does.
                    with self.store.transaction():
                        puts = [self._complete(fut)
                                for fut in sorted(done, key=lambda f: self.inflight[f][0])]
                    for put in puts:
                        if put is not None:
                            self.cache.put(*put)
                    continue
                if self.stop_reason:
                    break
                if self.phase == "seeding":
                    self._start_rescore()
                    continue
                if self.phase == "initial":
                    self._select_initial()
                    continue
                self.phase = "done"
                self._state()
                self.stop_reason = "finished"
                break
        except KeyboardInterrupt:
            self.stop_reason = "interrupted"
        except SearchStopped as exc:
            self.stop_reason = str(exc)
        finally:
            self.executor.shutdown(wait=False, cancel=True)
            self.cache.close()
            if blas is not None:
                blas.restore_original_limits()
        return {"stop_reason": self.stop_reason, "children": self.children_done,
                "best_fitness": self.best[0] if self.best else None,
                "best_expr": self.best[1] if self.best else None}


def start_run(run_dir, cfg: Config, meta: dict | None = None):
    """Create the store for a new run (refuses a directory that already holds one)."""
    from ..runs.store import RunStore

    return RunStore.create(run_dir, config_to_dict(cfg), meta or {})
