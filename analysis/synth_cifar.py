"""A synthetic CIFAR-10 in torchvision's layout, for timing the paper surrogate without the data.

``write(root, n_train, n_test)`` writes ``root/cifar-10-batches-py/{data_batch_1..5,
test_batch, batches.meta}``: 32x32x3 uint8 images, random noise plus a per-class pattern (half
and half), so the set can be learnt and a timing of it is meaningful. ``trust_files()`` makes
torchvision's reader accept them (they cannot match its MD5 sums; everything else is its own
reader). Used by ``gpu_check.sh`` and ``bench_pack_gpu.py``.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def write(root: Path, n_train: int, n_test: int) -> None:
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    templates = rng.integers(0, 256, (10, 3072), dtype=np.uint8)

    def batch(n: int) -> dict:
        labels = rng.integers(0, 10, n)
        noise = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data = (templates[labels].astype(np.uint16) + noise) // 2  # learnable: half pattern
        return {"data": data.astype(np.uint8), "labels": labels.tolist()}

    per = n_train // 5
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(per), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


def trust_files() -> None:
    import torchvision.datasets.cifar as tv_cifar

    tv_cifar.CIFAR10._check_integrity = lambda self: True
    tv_cifar.check_integrity = lambda *args, **kwargs: True  # used for batches.meta
