"""Datasets from files (torchvision layouts, imagefolder, npz) and the augmentation module.

Every torchvision dataset is exercised with a tiny fake root the test writes in torchvision's
own layout (a few images), so nothing is downloaded; CIFAR's md5 check is bypassed because fake
batches cannot match the real checksums. No GPU, no timing assertions.
"""
from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gp_loss.surrogate import augment

from gp_loss.surrogate import data
from gp_loss.config import ConfigError
from gp_loss.surrogate.train import train_candidate


@pytest.fixture(autouse=True)
def _fresh_caches(monkeypatch):
    data._raw.cache_clear()
    data._cpu_splits.cache_clear()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    data._raw.cache_clear()
    data._cpu_splits.cache_clear()


def _images(rng, n, shape):
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _write_cifar(root, name, n_per_batch=20, classes=10):
    rng = np.random.default_rng(0)
    key = "labels" if name == "cifar10" else "fine_labels"
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    files = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10"
             else ["train", "test"])
    for f in files:
        n = n_per_batch if name == "cifar10" or f == "test" else 5 * n_per_batch
        labels = [int(v) for v in np.arange(n) % classes]
        with open(folder / f, "wb") as fh:
            pickle.dump({"data": _images(rng, n, (3072,)), key: labels}, fh)
    meta = ("batches.meta", "label_names") if name == "cifar10" else ("meta", "fine_label_names")
    with open(folder / meta[0], "wb") as fh:
        pickle.dump({meta[1]: [f"c{i}" for i in range(classes)]}, fh)


def _write_mnist(root, cls_name, n_train=40, n_test=10):
    rng = np.random.default_rng(1)
    raw = root / cls_name / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + _images(rng, n, (28, 28)).tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + (np.arange(n) % 10).astype(np.uint8).tobytes())


@pytest.fixture
def no_md5(monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    # fake batches cannot match the real md5 sums (data and meta files are both checked)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)


def test_cifar10_fake_root_gives_the_paper_split(tmp_path, no_md5):
    _write_cifar(tmp_path, "cifar10")
    s = data.load_splits("cifar10", data_root=str(tmp_path))
    assert s.x_train.shape == (90, 3, 32, 32) and s.x_val.shape[0] == 10
    assert s.x_test.shape[0] == 20 and (s.num_classes, s.in_channels, s.image_size) == (10, 3, 32)
    # train[:90] / val[90:] of the official training set, in file order
    assert s.y_val.tolist() == [v % 10 for v in range(90, 100)]
    assert len(s.mean) == 3 and all(0 < m < 1 for m in s.mean)
    other = data.load_splits("cifar10", data_root=str(tmp_path), val_fraction=0.2)
    assert other.x_val.shape[0] == 20 and other.x_test.shape[0] == 20  # test_fraction ignored


def test_cifar100_has_100_classes_and_trains(tmp_path, no_md5):
    _write_cifar(tmp_path, "cifar100", n_per_batch=100, classes=100)
    s = data.load_splits("cifar100", data_root=str(tmp_path))
    assert s.num_classes == 100 and s.x_train.shape[1:] == (3, 32, 32)
    r = train_candidate(F.cross_entropy, {"dataset": "cifar100", "data_root": str(tmp_path),
                                          "steps": 3, "batch_size": 16, "prescreen_steps": 0})
    assert r["status"] == "ok"


@pytest.mark.parametrize("name, cls_name", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_mnist_style_fake_roots(tmp_path, name, cls_name):
    _write_mnist(tmp_path, cls_name)
    s = data.load_splits(name, data_root=str(tmp_path), val_fraction=0.25)
    assert s.x_train.shape[1:] == (1, 28, 28) and s.in_channels == 1
    assert s.x_train.shape[0] == 30 and s.x_val.shape[0] == 10 and s.x_test.shape[0] == 10


@pytest.mark.parametrize("name, fragment", [
    ("cifar10", "ROOT/cifar-10-batches-py/{data_batch_1"),
    ("cifar100", "ROOT/cifar-100-python/{train,test,meta}"),
    ("mnist", "ROOT/MNIST/raw/{train-images-idx3-ubyte"),
    ("fashionmnist", "ROOT/FashionMNIST/raw/{train-images-idx3-ubyte"),
])
def test_missing_root_names_the_layout(tmp_path, name, fragment):
    with pytest.raises(data.DataError) as info:
        data.load_splits(name, data_root=str(tmp_path / "nowhere"))
    msg = str(info.value)
    assert fragment in msg and "\n" not in msg and "--download" in msg
    assert isinstance(info.value, ConfigError)  # the CLI maps it to exit 2


def test_incomplete_root_names_the_missing_file(tmp_path, no_md5):
    _write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(data.DataError, match="missing data_batch_3"):
        data.load_splits("cifar10", data_root=str(tmp_path))


def test_npz_layouts_and_optional_test_split(tmp_path):
    rng = np.random.default_rng(2)
    y = np.arange(60) % 3 + 5  # labels need not start at 0
    nhwc = _images(rng, 60, (12, 12, 3))
    np.savez(tmp_path / "a.npz", x=nhwc, y=y)
    np.savez(tmp_path / "b.npz", x=nhwc.transpose(0, 3, 1, 2).astype(np.float32) / 255, y=y)
    np.savez(tmp_path / "c.npz", x=nhwc[..., 0], y=y, x_test=nhwc[:9, ..., 0], y_test=y[:9])
    a = data.load_splits(f"npz:{tmp_path / 'a.npz'}")
    b = data.load_splits(f"npz:{tmp_path / 'b.npz'}")
    assert a.x_train.shape[1:] == (3, 12, 12) and a.num_classes == 3
    assert torch.allclose(a.x_train, b.x_train, atol=1e-4)
    c = data.load_splits(f"npz:{tmp_path / 'c.npz'}")
    assert c.in_channels == 1 and c.x_test.shape[0] == 9
    with pytest.raises(data.DataError, match="not found"):
        data.load_splits(f"npz:{tmp_path / 'none.npz'}")


def test_imagefolder_grey_and_colour(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    for mode, shape in (("L", (10, 10)), ("RGB", (10, 10, 3))):
        root = tmp_path / mode
        for c in ("cat", "dog"):
            (root / c).mkdir(parents=True)
            for i in range(10):
                Image.fromarray(_images(rng, 1, shape)[0], mode).save(root / c / f"{i}.png")
        s = data.load_splits(f"imagefolder:{root}", val_fraction=0.2, test_fraction=0.2)
        assert s.in_channels == (1 if mode == "L" else 3) and s.num_classes == 2
        assert s.x_train.shape[0] + s.x_val.shape[0] + s.x_test.shape[0] == 20
    with pytest.raises(data.DataError):
        data.load_splits(f"imagefolder:{tmp_path / 'nothing'}")


def test_imagefolder_reads_more_images_than_the_open_file_limit(tmp_path):
    # The loader opened every image before converting any: a folder larger than the open-file
    # limit failed ("Too many open files"). It streams now: one file open at a time.
    import os
    import resource

    from PIL import Image
    rng = np.random.default_rng(4)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(150):
            Image.fromarray(_images(rng, 1, (6, 6))[0], "L").save(tmp_path / c / f"{i}.png")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 64
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 100, hard))   # < 300 images
    try:
        s = data.load_splits(f"imagefolder:{tmp_path}", val_fraction=0.2, test_fraction=0.2)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert s.x_train.shape[0] + s.x_val.shape[0] + s.x_test.shape[0] == 300


def test_unknown_dataset_is_a_data_error():
    with pytest.raises(data.DataError, match="imagefolder:PATH"):
        data.load_splits("cifar-1000")


# --- augmentation -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["flipcrop", "randaugment"])
@pytest.mark.parametrize("channels", [1, 3])
def test_augmentation_in_range_deterministic_and_per_image(kind, channels):
    x = torch.rand(1, channels, 16, 16).expand(32, -1, -1, -1).contiguous()  # one image 32x
    a = augment.augment_batch(x, kind, torch.Generator().manual_seed(0))
    b = augment.augment_batch(x, kind, torch.Generator().manual_seed(0))
    c = augment.augment_batch(x, kind, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.device == x.device and a.dtype == x.dtype
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, c)
    distinct = {tuple(img.flatten().tolist()) for img in a}
    assert len(distinct) > 8  # drawn per image, not once per batch


def test_every_randaugment_op_stays_in_range_and_identity_is_exact():
    x = torch.rand(4, 3, 16, 16)
    for k in range(len(augment.RA_OPS)):
        out = augment._round(x, torch.full((4,), k), torch.full((4,), 0.2 if k != 10 else 6.0))
        assert out.shape == x.shape and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert torch.equal(augment._round(x, torch.zeros(4, dtype=torch.long), torch.zeros(4)), x)
    assert augment.magnitude_bin(5.0) == 15 and augment.magnitude_bin(10) == 30


def test_flipcrop_only_flips_and_shifts():
    x = torch.rand(64, 1, 8, 8)
    out = augment.flipcrop(x, torch.Generator().manual_seed(0), pad=0)
    for img, src in zip(out, x):
        assert torch.equal(img, src) or torch.equal(img, src.flip(-1))


def test_resize():
    x = torch.rand(2, 3, 32, 32)
    assert augment.resize(x, 80).shape == (2, 3, 80, 80)
    assert augment.resize(x, 16).shape == (2, 3, 16, 16)
    assert augment.resize(x, 32) is x and augment.resize(x, 0) is x


def test_training_with_resize_augmentation_and_separate_prescreen():
    base = {"steps": 20, "prescreen_steps": 0, "eval_every": 10}
    for extra in ({"augment": "randaugment", "image_size": 12}, {"augment": "flipcrop"},
                  {"image_size": 6}):
        r1 = train_candidate(F.cross_entropy, {**base, **extra}, seed=1, with_test=True)
        r2 = train_candidate(F.cross_entropy, {**base, **extra}, seed=1, with_test=True)
        assert r1["status"] == "ok" and r1["weights_hash"] == r2["weights_hash"]
        assert r1["test_acc"] is not None
    sep = {**base, "prescreen_separate": True, "prescreen_steps": 10, "augment": "flipcrop",
           "image_size": 12, "prescreen_image_size": 8}
    r = train_candidate(F.cross_entropy, {**sep, "prescreen_min_acc": 1.0})
    assert (r["status"], r["reason"], r["steps"]) == ("failed", "prescreen", 10)
    ok = train_candidate(F.cross_entropy, {**sep, "prescreen_min_acc": 0.0})
    assert ok["status"] == "ok" and ok["steps"] == 20
