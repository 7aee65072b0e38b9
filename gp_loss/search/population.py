"""The aging-evolution core as a pure class: members, the tournament and the age-out rule.

No store, no screening, no I/O: the driver (``evolution.py``) keeps the run store and the
novelty index in step with what ``insert`` returns. In the spirit of the ~40-line reference
loop of regularized evolution::

    parent = population.tournament(rng, k)      # best of k members drawn with replacement
    ...                                         # mutate, screen, train the child
    removed = population.insert(child)          # the child joins; the oldest leaves

A member is anything with ``id``, ``age``, ``fitness`` and ``val_nll`` (``start.Cand``).
"""
from __future__ import annotations

import random
from typing import Iterator

from ..runs.ranking import rank_key


def _oldest_key(c):
    # The oldest; among equally old ones the worst: lowest fitness, then the higher (or
    # missing) validation NLL, then the lowest id.
    return (c.age, c.fitness, c.val_nll is not None, -(c.val_nll or 0.0), c.id)


class Population:
    """At most ``capacity`` members by id (``insert`` ages out beyond it)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"population capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.members: dict = {}

    def __len__(self) -> int:
        return len(self.members)

    def __contains__(self, cid) -> bool:
        return cid in self.members

    def __iter__(self) -> Iterator:
        return iter(self.members.values())

    def __getitem__(self, cid):
        return self.members[cid]

    def add(self, member) -> None:
        """Join without ageing anyone out (the initial population, a resumed run)."""
        self.members[member.id] = member

    def clear(self) -> None:
        self.members.clear()

    def tournament(self, rng: random.Random, k: int):
        """The best of ``k`` members drawn with replacement (DESIGN §6): highest fitness, then
        the lower validation NLL, then the lower id (``ranking.rank_key``)."""
        ids = sorted(self.members)
        picks = [self.members[rng.choice(ids)] for _ in range(k)]
        return min(picks, key=lambda c: rank_key(c.fitness, c.val_nll, c.id))

    def insert(self, member):
        """Add ``member``; if that exceeds the capacity, remove and return the oldest member
        (ties: the worst), else None."""
        self.members[member.id] = member
        if len(self.members) <= self.capacity:
            return None
        oldest = min(self.members.values(), key=_oldest_key)
        del self.members[oldest.id]
        return oldest
