"""Options and helpers the command groups share (``run`` and ``protocol``): --set, --device,
--seeds/--first-seed, --config, --data-root/--download, device resolution, number format."""
from __future__ import annotations

import json
import math

import click

from .app import UserError


def set_option():
    return click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                        help="Override a config key (repeatable; the last one wins), "
                             "e.g. --set search.children=50 --set executor.workers=1.")


def device_option():
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                        help="Where to train (default: the config's surrogate.device, auto).")


def seed_options(default: int):
    """--seeds N (seeds 0..N-1) and --first-seed S, shared by train and compare."""
    def wrap(fn):
        fn = click.option("--first-seed", type=click.IntRange(min=0), default=0,
                          show_default=True, help="Shift the seeds to S..S+N-1.")(fn)
        return click.option("--seeds", type=click.IntRange(min=1), default=default,
                            show_default=True,
                            help="Number of seeds: 0..N-1 (shifted by --first-seed).")(fn)
    return wrap


def config_option():
    return click.option("--config", "config", default=None, metavar="CONFIG.toml",
                        help="Take the surrogate settings from this config (default: quick).")


def data_options(fn):
    """--data-root / --download, shared by the commands that train."""
    fn = click.option("--download", is_flag=True, default=False,
                      help="Let torchvision download a missing dataset (needs internet).")(fn)
    return click.option("--data-root", "data_root", default=None, metavar="DIR",
                        help="Folder holding torchvision datasets (cifar10, cifar100, mnist, "
                             "fashionmnist); default: the config's surrogate.data_root.")(fn)


def data_overrides(data_root, download) -> list:
    out = [f"surrogate.data_root={json.dumps(str(data_root))}"] if data_root else []
    return out + (["surrogate.download=true"] if download else [])


def resolve_device(name: str) -> str:
    from ..surrogate.data import resolve_device as resolve

    try:
        return str(resolve(name))
    except ValueError as exc:
        raise UserError(str(exc)) from None


def fmt(v):
    """A metric with 4 decimals, or n/a."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
