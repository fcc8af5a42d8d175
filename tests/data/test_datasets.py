"""load_dataset on every format, written for real in tmp_path by the fixtures."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from cafe_ray.config import DataConfig
from cafe_ray.data import ArrayDataset, DatasetNotFoundError, datasets, load_dataset
from cafe_ray.data.readers import CorruptDatasetError, read_idx
from cafe_ray.data.text import PAD_ID, UNK_ID, tokenize

from .conftest import (
    make_agnews,
    make_cifar10,
    make_cifar100,
    make_mnist_like,
    make_tinyimagenet,
    write_idx,
)


def _check_contract(ds: ArrayDataset) -> None:
    for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
        assert a.flags["C_CONTIGUOUS"]
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert len(ds.x_train) == len(ds.y_train) and len(ds.x_test) == len(ds.y_test)
    assert ds.x_train.shape[1:] == ds.x_test.shape[1:]
    assert ds.y_train.max() < ds.num_classes and ds.y_train.min() >= 0
    if ds.is_text:
        assert ds.x_train.ndim == 2
    else:
        assert ds.x_train.dtype == np.float32 and ds.x_train.ndim == 4


def _no_debian(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")


# ---------------------------------------------------------------- embedded
def test_digits_split_and_scale() -> None:
    ds = load_dataset(DataConfig(name="digits"), seed=0)
    _check_contract(ds)
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert len(ds.y_test) == round(0.2 * 1797)
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() <= 1.0
    # stratified: every class in the test split with about 20% of its samples
    assert np.all(np.bincount(ds.y_test, minlength=10) >= 30)
    again = load_dataset(DataConfig(name="digits"), seed=0)
    other = load_dataset(DataConfig(name="digits"), seed=1)
    assert np.array_equal(ds.y_test, again.y_test)
    assert not np.array_equal(ds.x_test, other.x_test)


def test_max_train_samples_stratified() -> None:
    ds = load_dataset(DataConfig(name="digits", max_train_samples=200), seed=3)
    assert len(ds.y_train) == 200 and len(ds.y_test) == 359
    counts = np.bincount(ds.y_train, minlength=10)
    assert counts.min() >= 18 and counts.max() <= 22


def test_synthetic_shape_and_separable() -> None:
    cfg = DataConfig(name="synthetic", synthetic_samples=300, synthetic_classes=3,
                     synthetic_shape=(2, 4, 4))
    ds = load_dataset(cfg, seed=5)
    _check_contract(ds)
    assert ds.x_train.shape == (300, 2, 4, 4) and len(ds.y_test) == 60 and ds.num_classes == 3
    # nearest class mean (estimated on train) classifies the test split well: learnable
    flat = ds.x_train.reshape(300, -1)
    means = np.stack([flat[ds.y_train == c].mean(0) for c in range(3)])
    d = ((ds.x_test.reshape(60, 1, -1) - means[None]) ** 2).sum(-1)
    assert (d.argmin(1) == ds.y_test).mean() > 0.9
    assert np.array_equal(ds.x_train, load_dataset(cfg, seed=5).x_train)


def test_synthetic_draws_float32_the_same_for_any_chunk() -> None:
    from cafe_ray.data.datasets import gaussian_clusters

    means = np.arange(3 * 4, dtype=np.float32).reshape(3, 1, 2, 2)
    whole = gaussian_clusters(np.random.default_rng(7), means, 1000, chunk=1000)
    parts = gaussian_clusters(np.random.default_rng(7), means, 1000, chunk=37)
    assert whole[0].dtype == np.float32 and whole[0].shape == (1000, 1, 2, 2)
    assert np.array_equal(whole[0], parts[0]) and np.array_equal(whole[1], parts[1])
    assert np.bincount(whole[1]).tolist() == [334, 333, 333]
    noise = whole[0] - means[whole[1]]
    assert abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1.0) < 0.1


# ------------------------------------------------------------ fashion mnist
@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx_under_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      compress: bool) -> None:
    _no_debian(monkeypatch, tmp_path)
    make_mnist_like(tmp_path / "FashionMNIST" / "raw", compress=compress)
    ds = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    _check_contract(ds)
    assert ds.x_train.shape == (30, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    assert ds.classes[0] == "T-shirt/top"
    # mean/std standardised: pixel 0 maps to -mean/std
    assert ds.x_train.min() == pytest.approx(-0.2860 / 0.3530, rel=1e-5)


def test_fashion_mnist_files_directly_in_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_debian(monkeypatch, tmp_path)
    make_mnist_like(tmp_path, n_train=20, n_test=5)
    ds = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), max_train_samples=10))
    assert len(ds.y_train) == 10 and len(ds.y_test) == 5


def test_fashion_mnist_missing_names_every_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_debian(monkeypatch, tmp_path)
    root = tmp_path / "empty"
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(DataConfig(name="fashion_mnist", root=str(root)))
    msg = str(err.value)
    for p in (root / "FashionMNIST" / "raw", root, tmp_path / "no-debian"):
        assert str(p) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "impossible offline" in msg


def test_fashion_mnist_missing_uses_default_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_debian(monkeypatch, tmp_path)
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(tmp_path / "default-root"))):
        load_dataset(DataConfig(name="fashion_mnist"))


def test_fashion_mnist_debian_package() -> None:
    """The real 70k set from `apt-get install dataset-fashion-mnist` (installed in CI)."""
    if not datasets.DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip(f"{datasets.DEBIAN_FASHION_MNIST} absent: apt-get install dataset-fashion-mnist")
    ds = load_dataset(DataConfig(name="fashion_mnist", root="/nonexistent-cafe-root"))
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert np.array_equal(np.bincount(ds.y_train), np.full(10, 6000))
    assert abs(float(ds.x_train[:5000].mean())) < 0.1  # standardised with the published stats


def test_idx_corrupt_files_are_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x12\x34\x56\x78" + b"\0" * 20)
    with pytest.raises(CorruptDatasetError, match="magic"):
        read_idx(bad)
    short = tmp_path / "short-idx"
    write_idx(short, np.zeros((4, 28, 28), np.uint8), compress=False)
    short.write_bytes(short.read_bytes()[:-10])
    with pytest.raises(CorruptDatasetError, match="payload"):
        read_idx(short)
    notgz = tmp_path / "x.gz"
    notgz.write_bytes(b"not gzip at all")
    with pytest.raises(CorruptDatasetError, match=re.escape(str(notgz))):
        read_idx(notgz)


# -------------------------------------------------------------------- CIFAR
def test_cifar10_pickles(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    _check_contract(ds)
    assert ds.x_train.shape == (50, 3, 32, 32) and ds.x_test.shape == (10, 3, 32, 32)
    assert ds.num_classes == 10 and ds.classes[-1] == "truck"
    assert np.array_equal(ds.y_test, np.arange(10))


def test_cifar100_pickles(tmp_path: Path) -> None:
    make_cifar100(tmp_path)
    ds = load_dataset(DataConfig(name="cifar100", root=str(tmp_path)))
    _check_contract(ds)
    assert ds.x_train.shape == (40, 3, 32, 32) and ds.num_classes == 100
    assert ds.classes[7] == "fine7"


def test_cifar_corrupt_pickle(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(CorruptDatasetError, match="data_batch_3"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))


@pytest.mark.parametrize("name,sub", [("cifar10", "cifar-10-batches-py"),
                                      ("cifar100", "cifar-100-python"),
                                      ("tinyimagenet", "tiny-imagenet-200"),
                                      ("agnews", "ag_news_csv")])
def test_missing_dataset_lists_paths(tmp_path: Path, name: str, sub: str) -> None:
    root = tmp_path / "nothing"
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(root / sub))) as err:
        load_dataset(DataConfig(name=name, root=str(root)))
    assert f"  - {root} (does not exist)" in str(err.value)
    assert "impossible on offline machines" in str(err.value)


def test_cifar10_incomplete_names_missing_files(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    (folder / "data_batch_5").unlink()
    with pytest.raises(DatasetNotFoundError, match="missing data_batch_5"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))


# ------------------------------------------------------------- TinyImageNet
def test_tinyimagenet_folder(tmp_path: Path) -> None:
    make_tinyimagenet(tmp_path)
    ds = load_dataset(DataConfig(name="tinyimagenet", root=str(tmp_path)))
    _check_contract(ds)
    assert ds.x_train.shape == (9, 3, 64, 64) and ds.x_test.shape == (6, 3, 64, 64)
    assert ds.num_classes == 3 and ds.classes == ("name0", "name1", "name2")
    assert np.array_equal(ds.y_train, np.repeat(np.arange(3), 3))
    assert np.array_equal(ds.y_test, np.arange(6) % 3)
    sub = load_dataset(DataConfig(name="tinyimagenet", root=str(tmp_path), max_train_samples=3))
    assert np.array_equal(np.sort(sub.y_train), [0, 1, 2])


# ------------------------------------------------------------------ AG News
@pytest.mark.parametrize("header", [False, True])
def test_agnews_csv(tmp_path: Path, header: bool) -> None:
    make_agnews(tmp_path, header=header)
    ds = load_dataset(DataConfig(name="agnews", root=str(tmp_path), seq_len=8, vocab_size=30))
    _check_contract(ds)
    assert ds.is_text and ds.x_train.shape == (18, 8) and ds.x_test.shape == (4, 8)
    assert ds.classes == ("World", "Sports", "Business", "Sci/Tech")
    assert list(ds.y_test) == [2, 0, 1, 3]
    assert ds.x_train.max() < 30 and ds.x_train.min() >= 0
    assert (ds.x_train != PAD_ID).all()  # every row has >= 8 tokens: truncated, no padding
    assert (ds.x_test == UNK_ID).any()  # 28 vocabulary tokens cannot cover everything
    long = load_dataset(DataConfig(name="agnews", root=str(tmp_path), seq_len=64))
    assert long.x_train.shape == (18, 64) and (long.x_train[:, -1] == PAD_ID).all()
    assert (long.x_train[:, 0] > UNK_ID).all()  # first words are frequent train tokens


def test_agnews_tokenizer_and_bad_label(tmp_path: Path) -> None:
    assert tokenize("Wall St.\\band #39;s &lt;b&gt;Bears") == ["wall", "st", "band's", "b", "bears"]
    folder = make_agnews(tmp_path)
    (folder / "train.csv").write_text('"7","title","desc"\n')
    with pytest.raises(CorruptDatasetError, match=r"train.csv:1"):
        load_dataset(DataConfig(name="agnews", root=str(tmp_path)))


def test_digits_read_from_the_bundled_csv_equal_load_digits_without_importing_sklearn() -> None:
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from cafe_ray.data.datasets import read_digits

    images, target = read_digits()
    ref = load_digits()
    assert images.dtype == ref.images.dtype and np.array_equal(images, ref.images)
    assert np.array_equal(target, ref.target)
    code = ("import sys\nfrom cafe_ray.data.datasets import read_digits\nread_digits()\n"
            "print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
