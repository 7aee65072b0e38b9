"""Variation: random trees and the four mutation operators (subtree, node, insert, shrink).

They follow DEAP's ``genHalfAndHalf``/``mutUniform``/``mutNodeReplacement``/``mutInsert``/
``mutShrink`` as plain functions but draw from an explicit ``random.Random`` (never the global
RNG), so a seed reproduces a run exactly. Fed by ``psets.py``; used by the search (``search/``)
and the API (``gp_loss.random_tree``, ``gp_loss.mutate``).
"""
from __future__ import annotations

import random

from deap import gp

from .psets import PSet, load_pset


def _generate(pset: PSet, rng: random.Random, min_h: int, max_h: int, type_, full: bool):
    """DEAP's ``generate`` with an explicit RNG (iterative; heights are small anyway)."""
    dp = pset.deap
    height = rng.randint(min_h, max_h)
    expr, stack = [], [(0, type_)]
    while stack:
        depth, t = stack.pop()
        prims = dp.primitives[t]
        stop = depth == height or (not full and depth >= min_h and
                                   rng.random() < dp.terms_count / dp.prims_count)
        if stop or not prims:
            expr.append(rng.choice(dp.terminals[t]))
        else:
            prim = rng.choice(prims)
            expr.append(prim)
            for arg in reversed(prim.args):
                stack.append((depth + 1, arg))
    return expr


def random_tree(pset="paper", rng: random.Random | None = None, min_height=None, max_height=None,
                type_name=None) -> gp.PrimitiveTree:
    """A random tree, half 'full' and half 'grow' (DEAP's half-and-half), within the limits."""
    pset = load_pset(pset)
    rng = rng or random.Random(0)
    lo = pset.gen_min_height if min_height is None else min_height
    hi = pset.gen_max_height if max_height is None else max_height
    t = pset.types[type_name or pset.root]
    for _ in range(100):
        tree = gp.PrimitiveTree(_generate(pset, rng, lo, hi, t, full=rng.random() < 0.5))
        if len(tree) <= pset.max_size and tree.height <= pset.max_height:
            return tree
    return tree  # pragma: no cover - only for sets whose generation limits exceed their limits


# ----------------------------------------------------------------------------- mutations

def mut_subtree(tree, pset, rng):
    """Replace a random subtree by a new random one of the same type (DEAP ``mutUniform``)."""
    i = rng.randrange(len(tree))
    sl = tree.searchSubtree(i)
    new = _generate(pset, rng, 0, 2, tree[i].ret, full=False)
    return gp.PrimitiveTree(tree[:sl.start] + new + tree[sl.stop:])


def mut_node(tree, pset, rng):
    """Replace one node by another of the same signature (DEAP ``mutNodeReplacement``)."""
    i = rng.randrange(len(tree))
    node = tree[i]
    out = list(tree)
    if node.arity == 0:
        choices = [t for t in pset.deap.terminals[node.ret] if t is not node]
        if not choices:
            return None
        out[i] = rng.choice(choices)
    else:
        choices = [p for p in pset.deap.primitives[node.ret] if p.args == node.args and p is not node]
        if not choices:
            return None
        out[i] = rng.choice(choices)
    return gp.PrimitiveTree(out)


def mut_insert(tree, pset, rng):
    """Insert a new node above a random subtree, which becomes one of its arguments (DEAP ``mutInsert``)."""
    i = rng.randrange(len(tree))
    node = tree[i]
    sl = tree.searchSubtree(i)
    choices = [p for p in pset.deap.primitives[node.ret] if node.ret in p.args]
    if not choices:
        return None
    prim = rng.choice(choices)
    slot = rng.choice([k for k, a in enumerate(prim.args) if a == node.ret])
    new = [prim]
    for k, arg in enumerate(prim.args):
        if k == slot:
            new.extend(tree[sl])
        else:
            new.append(rng.choice(pset.deap.terminals[arg]))
    return gp.PrimitiveTree(tree[:sl.start] + new + tree[sl.stop:])


def mut_shrink(tree, pset, rng):
    """Replace a random primitive by one of its same-typed arguments (DEAP ``mutShrink``)."""
    if len(tree) < 3 or tree.height <= 1:
        return None
    idx = [i for i, n in enumerate(tree) if i > 0 and isinstance(n, gp.Primitive)]
    idx.append(0)
    rng.shuffle(idx)
    for i in idx:
        node = tree[i]
        if not isinstance(node, gp.Primitive):
            continue
        options, j = [], i + 1
        for arg in node.args:
            sl = tree.searchSubtree(j)
            if arg == node.ret:
                options.append(sl)
            j = sl.stop
        if options:
            sl = rng.choice(options)
            outer = tree.searchSubtree(i)
            return gp.PrimitiveTree(tree[:outer.start] + tree[sl] + tree[outer.stop:])
    return None


MUTATIONS = {"subtree": mut_subtree, "node": mut_node, "insert": mut_insert, "shrink": mut_shrink}


def mutate(tree, pset, rng: random.Random, weights: dict | None = None, tries: int = 20):
    """One mutated copy within the set's limits, and the kind used: ``(tree, kind)``.

    ``weights`` maps mutation kinds to probabilities (default: equal). Returns ``(None, kind)``
    if no valid mutant was found in ``tries`` attempts (e.g. shrinking a single terminal).
    """
    pset = load_pset(pset)
    weights = weights or {k: 1.0 for k in MUTATIONS}
    kinds = [k for k, w in weights.items() if w > 0]
    probs = [weights[k] for k in kinds]
    kind = None
    for _ in range(tries):
        kind = rng.choices(kinds, probs)[0]
        child = MUTATIONS[kind](tree, pset, rng)
        if child is not None and len(child) <= pset.max_size and child.height <= pset.max_height:
            return child, kind
    return None, kind
