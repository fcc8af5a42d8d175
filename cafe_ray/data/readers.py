"""Readers for the on-disk formats of the real image datasets.

Each reader parses one published format itself (numpy / pickle / PIL) instead of
going through torchvision's dataset classes: those verify md5 sums and insist on
a fixed folder, which rules out both small test files and other mirrors such as
the Debian package. Readers return raw uint8 arrays; normalisation happens in
:mod:`cafe_ray.data.datasets`.

CIFAR's "python version" is a pickle, and a plain ``pickle.load`` runs whatever
code the file names: a data root named by someone else's run directory could
then run arbitrary code. :class:`CifarUnpickler` therefore admits only the few
numpy/builtin constructors those files contain and refuses everything else.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import IO

import numpy as np


class CorruptDatasetError(ValueError):
    """A dataset file exists but cannot be parsed; the message names the file."""


# ------------------------------------------------------------------------- IDX
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path, expect_ndim: int | None = None) -> np.ndarray:
    """Parse an IDX file (MNIST format), gzip-compressed when its name ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as err:  # BadGzipFile is an OSError
        raise CorruptDatasetError(f"{path}: cannot read IDX file ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise CorruptDatasetError(
            f"{path}: bad IDX magic number {raw[:4].hex() or '<empty>'} "
            "(expected 0000 08 0N); the file is corrupt or not an IDX file"
        )
    ndim = raw[3]
    if expect_ndim is not None and ndim != expect_ndim:
        raise CorruptDatasetError(f"{path}: IDX file has {ndim} dimensions, expected {expect_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptDatasetError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise CorruptDatasetError(
            f"{path}: IDX payload is {len(raw) - header} bytes, header {dims} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def find_idx_files(folder: Path) -> dict[str, Path] | None:
    """The four MNIST-style files in ``folder`` (plain or .gz), or None if any is missing."""
    found: dict[str, Path] = {}
    for key, base in IDX_FILES.items():
        for name in (base, base + ".gz"):
            if (folder / name).is_file():
                found[key] = folder / name
                break
        else:
            return None
    return found


def read_mnist_like(files: dict[str, Path]) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) as uint8 (N, 1, H, W) images and int64 labels."""
    out = []
    for split in ("train", "test"):
        x = read_idx(files[f"{split}_x"], expect_ndim=3)
        y = read_idx(files[f"{split}_y"], expect_ndim=1)
        if len(x) != len(y):
            raise CorruptDatasetError(
                f"{files[f'{split}_x']}: {len(x)} images but {files[f'{split}_y']} has {len(y)} labels"
            )
        out += [x[:, None, :, :], y.astype(np.int64)]
    return tuple(out)


# ----------------------------------------------------------------------- CIFAR
class UnsafePickleError(CorruptDatasetError):
    """A pickle names a callable outside the CIFAR allow-list; nothing from it was run."""


def _allowed_globals() -> dict[tuple[str, str], object]:
    """What real CIFAR batches (Python 2 cPickle, or re-pickled by Python 3) may reference."""
    import codecs

    from numpy._core import multiarray, numeric

    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # Python 3 protocol-2 pickles encode bytes this way
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = vars(numeric)["_frombuffer"]  # protocol 5 arrays (private: absent from the stubs)
    return allowed


class CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array/dtype/scalar constructors (no other callables)."""

    def __init__(self, file: IO[bytes], path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.path}: refused to load: the pickle references {module}.{name}, which a CIFAR "
                "batch never contains (only numpy arrays, lists, bytes and numbers); the file is not a "
                "genuine CIFAR batch and may be malicious. Replace it with the official "
                "cifar-*-python.tar.gz contents") from None


def _unpickle(path: Path) -> dict[bytes, object]:
    try:
        with path.open("rb") as f:
            obj = CifarUnpickler(f, path).load()
    except UnsafePickleError:
        raise
    except Exception as err:  # noqa: BLE001 - pickle raises many types on garbage input
        raise CorruptDatasetError(f"{path}: not a readable CIFAR pickle ({err})") from None
    if not isinstance(obj, dict):
        raise CorruptDatasetError(f"{path}: expected a dict pickle, got {type(obj).__name__}")
    return obj


def read_cifar_batches(paths: list[Path], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate CIFAR python batches into uint8 (N, 3, 32, 32) images and int64 labels."""
    xs, ys = [], []
    for p in paths:
        d = _unpickle(p)
        if b"data" not in d or label_key not in d:
            raise CorruptDatasetError(f"{p}: missing key b'data' or {label_key!r}")
        x = np.asarray(d[b"data"], dtype=np.uint8)
        y = np.asarray(d[label_key], dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
            raise CorruptDatasetError(f"{p}: data {x.shape} / labels {y.shape} are not CIFAR-shaped")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def read_cifar_names(path: Path, key: bytes) -> tuple[str, ...] | None:
    """Class names from batches.meta / meta, or None when the file is absent."""
    if not path.is_file():
        return None
    names = _unpickle(path).get(key)
    if names is None:
        return None
    if not isinstance(names, list | tuple):
        raise CorruptDatasetError(f"{path}: {key!r} holds {type(names).__name__}, not a list of class names")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


# ---------------------------------------------------------------- TinyImageNet
def tinyimagenet_index(folder: Path) -> tuple[list[str], list[Path], list[int], list[Path], list[int]]:
    """List (wnids, train files, train labels, val files, val labels) without decoding images."""
    wnids = [w.strip() for w in (folder / "wnids.txt").read_text().splitlines() if w.strip()]
    if not wnids:
        raise CorruptDatasetError(f"{folder / 'wnids.txt'}: empty class list")
    cls = {w: i for i, w in enumerate(wnids)}
    exts = {".jpeg", ".jpg", ".png"}
    train_files: list[Path] = []
    train_labels: list[int] = []
    for w in wnids:
        d = folder / "train" / w / "images"
        files = sorted(p for p in d.glob("*") if p.suffix.lower() in exts) if d.is_dir() else []
        train_files += files
        train_labels += [cls[w]] * len(files)
    ann = folder / "val" / "val_annotations.txt"
    val_files: list[Path] = []
    val_labels: list[int] = []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in cls:
            raise CorruptDatasetError(f"{ann}:{n}: expected 'file<TAB>wnid<TAB>...' with a known wnid")
        val_files.append(folder / "val" / "images" / parts[0])
        val_labels.append(cls[parts[1]])
    if not train_files:
        raise CorruptDatasetError(f"{folder / 'train'}: no images under train/<wnid>/images/")
    return wnids, train_files, train_labels, val_files, val_labels


def tinyimagenet_names(folder: Path, wnids: list[str]) -> tuple[str, ...]:
    """First synonym from words.txt per wnid, else the wnid itself."""
    words: dict[str, str] = {}
    if (folder / "words.txt").is_file():
        for line in (folder / "words.txt").read_text().splitlines():
            w, _, names = line.partition("\t")
            words[w.strip()] = names.split(",")[0].strip()
    return tuple(words.get(w) or w for w in wnids)


def decode_images(files: list[Path], size: int = 64) -> np.ndarray:
    """Decode image files into uint8 (N, 3, size, size), converting grey/CMYK to RGB."""
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(files):
        try:
            with Image.open(p) as im:
                rgb = im.convert("RGB")
                if rgb.size != (size, size):
                    rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
                out[i] = np.asarray(rgb)
        except (OSError, UnidentifiedImageError) as err:
            raise CorruptDatasetError(f"{p}: cannot decode image ({err})") from None
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))

