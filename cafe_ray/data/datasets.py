"""Load a dataset named in :class:`~cafe_ray.config.DataConfig` into an :class:`ArrayDataset`.

Data root
    ``cfg.root`` when set, else the environment variable ``CAFE_RAY_DATA``, else
    ``~/.cache/cafe-ray/data``. Fashion-MNIST is additionally looked for in the
    Debian package ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist).

Downloads
    Only Fashion-MNIST is ever downloaded (by torchvision, into
    ``<root>/FashionMNIST/raw``) and only when a network is reachable and
    ``CAFE_RAY_OFFLINE`` is unset. Everything else must be placed by hand; a
    missing dataset raises :class:`DatasetNotFoundError` naming every path tried.

Normalisation (images are float32 (N, C, H, W); text is int64 token ids (N, L))
    * digits: pixel / 16, i.e. scaled to [0, 1] (tiny 8x8 data; kept interpretable).
    * fashion_mnist, cifar10, cifar100, tinyimagenet: pixel / 255, then per-channel
      standardisation with the usual published train-set mean/std (constants, so
      the result does not depend on which files or subsample are present).
    * synthetic: Gaussian class clusters, already roughly zero-mean / unit-scale.

Splits and seeds
    digits has no official test split: a seeded stratified 80/20 split is made.
    ``cfg.max_train_samples`` takes a seeded stratified subsample of the train set.
    All randomness uses ``numpy.random.default_rng([seed, purpose])``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cafe_ray.config import DataConfig
from cafe_ray.data import readers, text
from cafe_ray.data.base import ArrayDataset, DatasetNotFoundError
from cafe_ray.data.sampling import stratified_subsample

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
OFFLINE_ENV = "CAFE_RAY_OFFLINE"
ROOT_ENV = "CAFE_RAY_DATA"

# (mean, std) per channel of the train split, on pixel/255.
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
_SUBSAMPLE, _SPLIT, _SYNTH = 1, 2, 3  # rng purposes


def default_root() -> Path:
    """``$CAFE_RAY_DATA`` or ``~/.cache/cafe-ray/data``."""
    env = os.environ.get(ROOT_ENV)
    return Path(env).expanduser() if env else Path("~/.cache/cafe-ray/data").expanduser()


def data_root(cfg: DataConfig) -> Path:
    return Path(cfg.root).expanduser() if cfg.root else default_root()


def _rng(seed: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**64, purpose])


def load_dataset(cfg: DataConfig, seed: int = 0) -> ArrayDataset:
    """Load ``cfg.name`` as contiguous arrays (see the module docstring for roots and scaling)."""
    if cfg.name in _LOADERS:
        return _LOADERS[cfg.name](cfg, seed)
    return _plugin_dataset(cfg, seed)


def _plugin_dataset(cfg: DataConfig, seed: int) -> ArrayDataset:
    """Your own loader: ``data.name`` is ``package.module:function`` or an entry point
    (``cafe_ray.datasets``), called as ``function(cfg, seed)``; it returns an ArrayDataset
    (its own settings in ``data.options``)."""
    from cafe_ray.config import load_plugin

    ds = load_plugin("data", cfg.name)(cfg, seed)
    if not isinstance(ds, ArrayDataset):
        raise ValueError(f"data.name={cfg.name}: the loader returned {type(ds).__name__}, not a "
                         "cafe_ray.data.ArrayDataset")
    return ds


# --------------------------------------------------------------------- helpers
def _subsample_idx(cfg: DataConfig, labels: np.ndarray, seed: int) -> np.ndarray | None:
    if cfg.max_train_samples is None or cfg.max_train_samples >= len(labels):
        return None
    return stratified_subsample(labels, cfg.max_train_samples, _rng(seed, _SUBSAMPLE))


def _normalise(x: np.ndarray, name: str) -> np.ndarray:
    mean, std = (np.asarray(v, dtype=np.float32)[:, None, None] for v in _STATS[name])
    out = x.astype(np.float32)
    out *= np.float32(1 / 255)
    out -= mean
    out /= std
    return np.ascontiguousarray(out)


def _build(name: str, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray,
           num_classes: int, classes: tuple[str, ...]) -> ArrayDataset:
    return ArrayDataset(
        name=name,
        x_train=np.ascontiguousarray(xtr), y_train=np.ascontiguousarray(ytr, dtype=np.int64),
        x_test=np.ascontiguousarray(xte), y_test=np.ascontiguousarray(yte, dtype=np.int64),
        num_classes=num_classes, classes=classes,
    )


def _finish_images(cfg: DataConfig, seed: int, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray,
                   yte: np.ndarray, num_classes: int, classes: tuple[str, ...]) -> ArrayDataset:
    idx = _subsample_idx(cfg, ytr, seed)
    if idx is not None:
        xtr, ytr = xtr[idx], ytr[idx]
    _check_labels(cfg.name, ytr, yte, num_classes)
    return _build(cfg.name, _normalise(xtr, cfg.name), ytr, _normalise(xte, cfg.name), yte,
                  num_classes, classes)


def _check_labels(name: str, ytr: np.ndarray, yte: np.ndarray, num_classes: int) -> None:
    for y in (ytr, yte):
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise readers.CorruptDatasetError(
                f"{name}: labels must lie in 0..{num_classes - 1}, found {y.min()}..{y.max()}")


def _find(candidates: list[Path], required: list[str]) -> tuple[Path | None, list[str]]:
    """First candidate folder holding every required entry, plus a line per folder tried."""
    tried: list[str] = []
    for folder in candidates:
        missing = [r for r in required if not (folder / r).exists()]
        if not missing:
            return folder, tried
        what = "does not exist" if not folder.is_dir() else "missing " + ", ".join(missing)
        tried.append(f"{folder} ({what})")
    return None, tried


def _not_found(title: str, tried: list[str], how: str, download: str) -> DatasetNotFoundError:
    lines = [f"{title} not found. Paths tried:"] + [f"  - {t}" for t in tried]
    lines += [f"How to get it: {how}",
              f"Download: {download}",
              f"Set data.root (or ${ROOT_ENV}) to point at another folder."]
    return DatasetNotFoundError("\n".join(lines))


_NO_DOWNLOAD = ("cafe-ray does not download this dataset, and downloads are impossible on "
                "offline machines; fetch it on a networked machine and copy it over.")


# --------------------------------------------------------------------- digits
def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float64, labels) of scikit-learn's bundled digits, as ``load_digits``.

    Read straight from the CSV that scikit-learn ships, found without importing
    scikit-learn: the import costs 0.7-1.5 s, a third of a run's set-up on the
    embedded default. Falls back to ``load_digits`` if the file is not where it
    has always been.
    """
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as f:
                data = np.loadtxt(f, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def _digits(cfg: DataConfig, seed: int) -> ArrayDataset:
    images, target = read_digits()
    x = (images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    y = target.astype(np.int64)
    test = stratified_subsample(y, round(0.2 * len(y)), _rng(seed, _SPLIT))
    train = np.setdiff1d(np.arange(len(y)), test)
    xtr, ytr = x[train], y[train]
    idx = _subsample_idx(cfg, ytr, seed)
    if idx is not None:
        xtr, ytr = xtr[idx], ytr[idx]
    return _build("digits", xtr, ytr, x[test], y[test], 10, tuple(str(i) for i in range(10)))


# -------------------------------------------------------------- fashion mnist
def _offline_reason() -> str | None:
    """Why a download cannot happen, or None when a network looks reachable."""
    if os.environ.get(OFFLINE_ENV):
        return f"skipped because ${OFFLINE_ENV} is set"
    try:
        socket.create_connection(("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80),
                                 timeout=3).close()
    except OSError as err:
        return f"no network ({err.__class__.__name__}: {err})"
    return None


def _download_fashion(root: Path) -> tuple[Path | None, str]:
    reason = _offline_reason()
    if reason is not None:
        return None, f"not attempted: {reason}; downloads are impossible offline."
    try:
        import torchvision

        torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
    except Exception as err:  # noqa: BLE001 - any failure means "not found", reported below
        return None, f"torchvision download into {root} failed ({err}); downloads are impossible offline."
    raw = root / "FashionMNIST" / "raw"
    if readers.find_idx_files(raw) is None:
        return None, f"torchvision download finished but {raw} lacks the IDX files."
    return raw, ""


def _fashion_mnist(cfg: DataConfig, seed: int) -> ArrayDataset:
    root = data_root(cfg)
    candidates = [root / "FashionMNIST" / "raw", root, DEBIAN_FASHION_MNIST]
    tried = []
    files = None
    for folder in candidates:
        files = readers.find_idx_files(folder)
        if files is not None:
            break
        if not folder.is_dir():
            tried.append(f"{folder} (does not exist)")
        else:
            missing = [b + "[.gz]" for b in readers.IDX_FILES.values()
                       if not (folder / b).is_file() and not (folder / (b + ".gz")).is_file()]
            tried.append(f"{folder} (missing {', '.join(missing)})")
    if files is None:
        raw, note = _download_fashion(root)
        files = readers.find_idx_files(raw) if raw is not None else None
        if files is None:
            names = ", ".join(b + ".gz" for b in readers.IDX_FILES.values())
            raise _not_found(
                "Fashion-MNIST", tried,
                f"`apt-get install dataset-fashion-mnist` (installs {DEBIAN_FASHION_MNIST}), or put "
                f"the torchvision-format files ({names}; .gz or uncompressed) under "
                f"{root / 'FashionMNIST' / 'raw'} or {root}.",
                note,
            )
    xtr, ytr, xte, yte = readers.read_mnist_like(files)
    return _finish_images(cfg, seed, xtr, ytr, xte, yte, 10, FASHION_CLASSES)


# ---------------------------------------------------------------------- CIFAR
def _cifar10(cfg: DataConfig, seed: int) -> ArrayDataset:
    root = data_root(cfg)
    batches = [f"data_batch_{i}" for i in range(1, 6)]
    folder, tried = _find([root / "cifar-10-batches-py", root], [*batches, "test_batch"])
    if folder is None:
        raise _not_found(
            "CIFAR-10", tried,
            f"extract the python version (cifar-10-python.tar.gz, e.g. from torchvision."
            f"datasets.CIFAR10(download=True) on a networked machine) so that "
            f"{root / 'cifar-10-batches-py'}/data_batch_1..5 and test_batch exist.",
            _NO_DOWNLOAD,
        )
    xtr, ytr = readers.read_cifar_batches([folder / b for b in batches], b"labels")
    xte, yte = readers.read_cifar_batches([folder / "test_batch"], b"labels")
    names = readers.read_cifar_names(folder / "batches.meta", b"label_names") or CIFAR10_CLASSES
    return _finish_images(cfg, seed, xtr, ytr, xte, yte, 10, names)


def _cifar100(cfg: DataConfig, seed: int) -> ArrayDataset:
    root = data_root(cfg)
    folder, tried = _find([root / "cifar-100-python", root], ["train", "test"])
    if folder is None:
        raise _not_found(
            "CIFAR-100", tried,
            f"extract the python version (cifar-100-python.tar.gz, e.g. from torchvision."
            f"datasets.CIFAR100(download=True) on a networked machine) so that "
            f"{root / 'cifar-100-python'}/train, test and meta exist.",
            _NO_DOWNLOAD,
        )
    xtr, ytr = readers.read_cifar_batches([folder / "train"], b"fine_labels")
    xte, yte = readers.read_cifar_batches([folder / "test"], b"fine_labels")
    names = (readers.read_cifar_names(folder / "meta", b"fine_label_names")
             or tuple(str(i) for i in range(100)))
    return _finish_images(cfg, seed, xtr, ytr, xte, yte, 100, names)


# --------------------------------------------------------------- TinyImageNet
def _tinyimagenet(cfg: DataConfig, seed: int) -> ArrayDataset:
    root = data_root(cfg)
    required = ["wnids.txt", "train", "val/val_annotations.txt"]
    folder, tried = _find([root / "tiny-imagenet-200", root], required)
    if folder is None:
        raise _not_found(
            "TinyImageNet", tried,
            f"unzip tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip) "
            f"into {root} so that {root / 'tiny-imagenet-200'}/wnids.txt, train/<wnid>/images/ "
            "and val/val_annotations.txt exist.",
            _NO_DOWNLOAD,
        )
    wnids, tr_files, tr_labels, va_files, va_labels = readers.tinyimagenet_index(folder)
    ytr = np.asarray(tr_labels, dtype=np.int64)
    idx = _subsample_idx(cfg, ytr, seed)  # subsample before decoding: decoding is the slow part
    if idx is not None:
        tr_files, ytr = [tr_files[i] for i in idx], ytr[idx]
    xtr, xte = readers.decode_images(tr_files), readers.decode_images(va_files)
    yte = np.asarray(va_labels, dtype=np.int64)
    names = readers.tinyimagenet_names(folder, wnids)
    ds_cfg = cfg.model_copy(update={"max_train_samples": None})  # already applied
    return _finish_images(ds_cfg, seed, xtr, ytr, xte, yte, len(wnids), names)


# -------------------------------------------------------------------- AG News
def _agnews(cfg: DataConfig, seed: int) -> ArrayDataset:
    root = data_root(cfg)
    folder, tried = _find([root / "ag_news_csv", root / "agnews", root], ["train.csv", "test.csv"])
    if folder is None:
        raise _not_found(
            "AG News", tried,
            f"extract the CSV release (ag_news_csv.tgz: train.csv, test.csv with rows "
            f"\"class index\",\"title\",\"description\") into {root / 'ag_news_csv'}.",
            _NO_DOWNLOAD,
        )
    tr_texts, ytr = text.read_agnews_csv(folder / "train.csv")
    te_texts, yte = text.read_agnews_csv(folder / "test.csv")
    tr_tokens = [text.tokenize(t) for t in tr_texts]
    vocab = text.build_vocab(tr_tokens, cfg.vocab_size)  # full train split only, never test
    idx = _subsample_idx(cfg, ytr, seed)
    if idx is not None:
        tr_tokens, ytr = [tr_tokens[i] for i in idx], ytr[idx]
    xtr = text.encode(tr_tokens, vocab, cfg.seq_len)
    xte = text.encode([text.tokenize(t) for t in te_texts], vocab, cfg.seq_len)
    return _build("agnews", xtr, ytr, xte, yte, 4, text.AGNEWS_CLASSES)


# ------------------------------------------------------------------ synthetic
SYNTH_CHUNK = 1 << 18  # samples drawn at a time (16 MB of 8x8 noise): no full-size temporary


def gaussian_clusters(rng: np.random.Generator, means: np.ndarray, n: int,
                      chunk: int = SYNTH_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples of balanced classes, class mean plus unit float32 noise, written chunk by chunk
    into the one float32 array returned (8 M samples of 8x8 peak at that array, 2 GB, not at
    a float64 draw and its casts, 8 GB). Any ``chunk`` gives the same samples."""
    k = len(means)
    y = np.arange(n, dtype=np.int64) % k  # balanced classes, shuffled in place
    rng.shuffle(y)
    x = np.empty((n, *means.shape[1:]), dtype=np.float32)
    flat, centres = x.reshape(n, -1), means.reshape(k, -1)
    for s in range(0, n, max(chunk, 1)):
        part = flat[s:s + chunk]
        rng.standard_normal(dtype=np.float32, out=part)
        part += centres[y[s:s + chunk]]
    return x, y


def _synthetic(cfg: DataConfig, seed: int) -> ArrayDataset:
    shape = tuple(cfg.synthetic_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"data.synthetic_shape={shape}: need positive sizes, e.g. (1, 8, 8)")
    k, n_train = cfg.synthetic_classes, cfg.synthetic_samples
    n_test = max(k, round(0.2 * n_train))
    rng = _rng(seed, _SYNTH)
    means = rng.standard_normal(size=(k, *shape), dtype=np.float32)  # far apart vs unit noise
    xtr, ytr = gaussian_clusters(rng, means, n_train)
    xte, yte = gaussian_clusters(rng, means, n_test)
    idx = _subsample_idx(cfg, ytr, seed)
    if idx is not None:
        xtr, ytr = xtr[idx], ytr[idx]
    return _build("synthetic", xtr, ytr, xte, yte, k, tuple(f"class_{i}" for i in range(k)))


# -------------------------------------------------------------------- parquet
def _parquet(cfg: DataConfig, seed: int) -> ArrayDataset:
    # imported here: pyarrow.compute costs every Ray worker a second at boot (they import this module)
    from cafe_ray.data.tables import load_parquet

    return load_parquet(cfg, seed)


_LOADERS: dict[str, Callable[[DataConfig, int], ArrayDataset]] = {
    "digits": _digits,
    "fashion_mnist": _fashion_mnist,
    "cifar10": _cifar10,
    "cifar100": _cifar100,
    "tinyimagenet": _tinyimagenet,
    "agnews": _agnews,
    "synthetic": _synthetic,
    "parquet": _parquet,
}


# ------------------------------------------------------------- locate only
def locate_dataset(cfg: DataConfig) -> tuple[str | None, list[str]]:
    """Where ``cfg.name`` would load from, without reading it: (folder or note, folders tried).

    Mirrors each loader's candidate folders and required files (``cafe-ray doctor``).
    The folder is None when the dataset is missing.
    """
    if cfg.name == "digits":
        return "embedded in scikit-learn", []
    if cfg.name == "synthetic":
        return "generated in memory (no files)", []
    if cfg.name == "parquet":
        path = Path(cfg.path or "").expanduser()
        return (str(path) if cfg.path and path.exists() else None), [str(path)]
    root = data_root(cfg)
    if cfg.name == "fashion_mnist":
        tried: list[str] = []
        for folder in (root / "FashionMNIST" / "raw", root, DEBIAN_FASHION_MNIST):
            if readers.find_idx_files(folder) is not None:
                return str(folder), tried
            tried.append(str(folder))
        return None, tried
    if cfg.name not in _LOADERS:
        return f"your own loader ({cfg.name})", []
    required = {
        "cifar10": ([root / "cifar-10-batches-py", root], [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
        "cifar100": ([root / "cifar-100-python", root], ["train", "test"]),
        "tinyimagenet": ([root / "tiny-imagenet-200", root], ["wnids.txt", "train", "val/val_annotations.txt"]),
        "agnews": ([root / "ag_news_csv", root / "agnews", root], ["train.csv", "test.csv"]),
    }
    candidates, files = required[cfg.name]
    found, tried = _find(candidates, files)
    return (str(found) if found is not None else None), tried
