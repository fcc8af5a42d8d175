"""Fixtures that write tiny datasets in their REAL on-disk formats."""

from __future__ import annotations

import csv
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _offline_and_isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No download attempts, and no reading of the user's real data root."""
    monkeypatch.setenv("CAFE_RAY_OFFLINE", "1")
    monkeypatch.setenv("CAFE_RAY_DATA", str(tmp_path / "default-root"))


def write_idx(path: Path, arr: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_mnist_like(folder: Path, n_train: int = 30, n_test: int = 10, compress: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte",
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10, compress)


def _dump(path: Path, obj: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f)


def make_cifar10(root: Path, per_batch: int = 10, n_test: int = 10) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(1, 6):
        _dump(folder / f"data_batch_{i}", {
            b"batch_label": f"training batch {i} of 5".encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [b"x.png"] * per_batch})
    _dump(folder / "test_batch", {b"labels": list(range(n_test)),
                                  b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)})
    _dump(folder / "batches.meta", {b"label_names": [b"airplane", b"automobile", b"bird", b"cat",
                                                     b"deer", b"dog", b"frog", b"horse", b"ship",
                                                     b"truck"], b"num_vis": 3072})
    return folder


def make_cifar100(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name, n in (("train", n_train), ("test", n_test)):
        _dump(folder / name, {b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
                              b"coarse_labels": [0] * n,
                              b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)})
    _dump(folder / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    return folder


def make_tinyimagenet(root: Path, wnids: tuple[str, ...] = ("n01443537", "n01629819", "n01641577"),
                      per_class: int = 3, per_val: int = 2) -> Path:
    from PIL import Image

    folder = root / "tiny-imagenet-200"
    rng = np.random.default_rng(3)
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (folder / "words.txt").write_text(
        "\n".join(f"{w}\tname{i}, synonym" for i, w in enumerate(wnids)) + "\nn999\tunused\n")
    for w in wnids:
        d = folder / "train" / w / "images"
        d.mkdir(parents=True)
        (folder / "train" / w / f"{w}_boxes.txt").write_text("")
        for j in range(per_class):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{w}_{j}.JPEG")
    lines = []
    for j in range(per_val * len(wnids)):
        name = f"val_{j}.JPEG"
        mode_img = rng.integers(0, 256, (64, 64), dtype=np.uint8)  # greyscale, as some real ones are
        Image.fromarray(mode_img, mode="L").save(folder / "val" / "images" / name)
        lines.append(f"{name}\t{wnids[j % len(wnids)]}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


AG_ROWS = [
    (3, "Wall St. Bears Claw Back Into the Black (Reuters)",
     "Reuters - Short-sellers, Wall Street's dwindling\\band of ultra-cynics, are seeing green again."),
    (1, "Iraq Halts Oil Exports", "Authorities have halted oil export flows from the main pipeline."),
    (2, "Phelps Wins Gold", "Michael Phelps won the gold medal in the 400 individual medley."),
    (4, "New Chip Is Faster", "Intel unveiled a faster chip on Monday, the company said."),
    (2, "Red Sox Win", "The Red Sox beat the Yankees 5-3 on Monday night &lt;b&gt;again&lt;/b&gt;."),
    (4, "Space Probe Launch", "NASA launched a probe to study the sun on Monday."),
]


def make_agnews(root: Path, header: bool = False) -> Path:
    folder = root / "ag_news_csv"
    folder.mkdir(parents=True)
    for name, rows in (("train.csv", AG_ROWS * 3), ("test.csv", AG_ROWS[:4])):
        with (folder / name).open("w", newline="") as f:
            w = csv.writer(f, quoting=csv.QUOTE_ALL)
            if header:
                w.writerow(["Class Index", "Title", "Description"])
            w.writerows([[str(c), t, d] for c, t, d in rows])
    (folder / "classes.txt").write_text("World\nSports\nBusiness\nSci/Tech\n")
    return folder


def make_femnist_like(path: Path, writers: int = 6, per_writer: int = 20, side: int = 8,
                      classes: int = 4, seed: int = 0, fixed: bool = True) -> Path:
    """A FEMNIST-like Parquet file: uint8 pixels in one list column, an int label, a writer id.

    Each class lights its own block of pixels, so a small CNN learns it in a few rounds.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n = writers * per_writer
    label = rng.integers(0, classes, n).astype(np.int64)
    px = rng.integers(0, 64, (n, side * side)).astype(np.uint8)
    block = side * side // classes
    for c in range(classes):
        px[label == c, c * block:(c + 1) * block] += 150
    values = pa.array(px.ravel())
    pixels = (pa.FixedSizeListArray.from_arrays(values, side * side) if fixed
              else pa.ListArray.from_arrays(pa.array(np.arange(n + 1) * side * side, pa.int32()), values))
    writer = [f"f{w:04d}" for w in np.repeat(np.arange(writers), per_writer)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"pixels": pixels, "label": label, "writer_id": writer}), path)
    return path
