"""Write a FEMNIST-like Parquet file: 28x28 greyscale "characters" from 12 writers.

One row per sample: the pixels in one fixed-size-list column, the class id, the
writer's id. Each writer draws only a few of the 10 classes and with their own
stroke weight, so the natural partition (one client per writer) is non-IID the way
LEAF's FEMNIST is.

    python make_femnist_like.py data/femnist.parquet
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def make(path: Path, writers: int = 12, per_writer: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows, labels, ids = [], [], []
    for w in range(writers):
        classes = rng.choice(10, size=3, replace=False)  # a writer's own few classes
        weight = rng.uniform(120, 250)  # a writer's own stroke intensity
        for _ in range(per_writer):
            c = int(rng.choice(classes))
            img = rng.normal(10, 8, (28, 28))
            r0, c0 = 2 + (c // 5) * 12, 2 + (c % 5) * 5  # each class strokes its own region
            img[r0:r0 + 12, c0:c0 + 4] += weight
            rows.append(np.clip(img, 0, 255).astype(np.uint8).ravel())
            labels.append(c)
            ids.append(f"writer_{w:03d}")
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(rows)), 28 * 28)
    table = pa.table({"pixels": pixels, "label": pa.array(labels, pa.int64()), "writer_id": ids})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


if __name__ == "__main__":
    print(make(Path(sys.argv[1] if len(sys.argv) > 1 else "data/femnist.parquet")))
