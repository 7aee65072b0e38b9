"""Fitness: the one function workers run.

``evaluate(expr, pset_name, eval_config, seed, sign)`` receives plain data only -- the
expression text, the primitive-set name, the surrogate config as a dict and a seed -- parses the
text with our parser, compiles the loss from the printer's source (the same text ``export``
writes) and trains the surrogate (``train.py``). It returns a small plain dict; it never touches
the run store (only the driver writes it). Any exception becomes a ``failed`` result with its
reason, so one bad candidate never stops a search.
"""
from __future__ import annotations

import time

from ..errors import first_line


def evaluate(expr: str, pset_name: str, eval_config: dict, seed: int = 0, sign: int = 1,
             with_test: bool = False) -> dict:
    """Train the surrogate with the loss ``expr`` (oriented by ``sign``); a plain result dict.

    Keys: status ('ok'|'failed'), reason, fitness (best validation accuracy), val_acc,
    test_acc (only ``with_test``), train_acc, steps, seconds, device, expr.
    """
    t0 = time.perf_counter()
    try:
        from ..lang.codegen import compile_loss
        from .train import train_candidate
        from ..lang.trees import parse

        # The text comes from our own driver/store; the safe parser still checks it, with
        # limits loose enough for runs configured above the set's defaults.
        tree = parse(expr, pset_name, max_height=1000, max_size=10_000)
        loss_fn, _ = compile_loss(tree, pset_name, sign)
        device = eval_config.get("device", "auto")
        result = train_candidate(loss_fn, eval_config, seed=seed, device=device,
                                 with_test=with_test)
    except Exception as exc:  # a broken candidate is a result, not a crash of the search
        from .train import error_reason

        result = {"status": "failed", "reason": error_reason(exc),
                  "fitness": 0.0, "val_acc": None, "test_acc": None, "train_acc": None,
                  "steps": 0, "seconds": time.perf_counter() - t0, "device": None}
    result["expr"] = expr
    return result


def evaluate_pack(items: list, pset_name: str, eval_config: dict, with_test: bool = False, *,
                  width: int = 1) -> list[dict]:
    """Train the candidates ``items`` (``(expr, seed, sign)`` each) ``width`` at a time in one
    pack (``packtrain.train_pack``); one result per item, in order, as ``evaluate`` returns it
    plus ``pack_k`` (the width it ran at). An expression that does not parse or compile fails
    alone; an error of the pack as a whole fails every candidate still in it."""
    t0 = time.perf_counter()
    results: list = [None] * len(items)
    fns, seeds, where = [], [], []
    from .train import error_reason

    for n, (expr, seed, sign) in enumerate(items):
        try:
            from ..lang.codegen import compile_loss
            from ..lang.trees import parse

            tree = parse(expr, pset_name, max_height=1000, max_size=10_000)
            fns.append(compile_loss(tree, pset_name, sign)[0])
            seeds.append(seed)
            where.append(n)
        except Exception as exc:
            results[n] = _failed(error_reason(exc), t0)
    if fns:
        try:
            from .packtrain import train_pack

            device = eval_config.get("device", "auto")
            trained = train_pack(fns, eval_config, seeds, width=width, device=device,
                                 with_test=with_test)
        except Exception as exc:  # the pack failed as a whole: each of its candidates fails
            trained = [_failed(error_reason(exc), t0)] * len(fns)
        for n, res in zip(where, trained):
            results[n] = dict(res)
    for n, (expr, _, _) in enumerate(items):
        results[n].setdefault("pack_k", width)
        results[n]["expr"] = expr
    return results


def _failed(reason: str, t0: float) -> dict:
    return {"status": "failed", "reason": reason, "fitness": 0.0, "val_acc": None,
            "test_acc": None, "train_acc": None, "steps": 0,
            "seconds": time.perf_counter() - t0, "device": None}


def preflight(surrogate: dict) -> None:
    """Load the data and build the model once in the driver, before any training.

    ``surrogate`` is a full surrogate dict (``asdict(SurrogateConfig)``), as workers get it.

    An unknown dataset or model, or a missing data root, is then bad input (``ConfigError``,
    exit 2 on the CLI) instead of a column of failed evaluations.
    """
    from ..config import ConfigError
    from .data import load_splits
    from .models import build_model

    try:
        s = load_splits(surrogate["dataset"], data_root=surrogate["data_root"],
                        split_seed=surrogate["split_seed"], val_fraction=surrogate["val_fraction"],
                        test_fraction=surrogate["test_fraction"],
                        train_fraction=surrogate["train_fraction"],
                        download=bool(surrogate["download"]))
        build_model(surrogate["model"], s.in_channels, s.num_classes,
                    surrogate["image_size"] or s.image_size)
    except ConfigError:
        raise
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError(first_line(exc)) from None
