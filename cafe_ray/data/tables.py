"""Your own data from Parquet or Arrow files (``data.name: parquet``) as an :class:`ArrayDataset`.

A researcher's data rarely comes in a format a simulator knows; it usually is, or can
be written as, a table: one row per sample, the input in one list column (or several
numeric columns), an integer label, and often the writer, user or device that produced
it. Reading that table with pyarrow (memory-mapped) gives the same contiguous arrays as
every built-in dataset, so partitioners, the Ray layer and the models need not know.

* ``data.path``: one Parquet file, or a folder of them (read in name order), or the
  ``.arrow`` files of a Hugging Face ``save_to_disk`` folder (a ``DatasetDict`` folder
  reads its ``train`` and, unless ``test_path`` is set, its ``test`` split).
* ``data.features``: a list / fixed-size-list / fixed-shape-tensor column (nested lists
  are flattened), reshaped to ``data.shape``; or a list of numeric columns. Integer
  features of a 1-D shape are token ids (int64, for text models); everything else is
  float32, standardised per channel (the first axis of ``shape``) with the statistics
  of the training split.
* ``data.client``: the natural partition; :func:`natural_clients` maps each sample to
  client 0..n-1 (the distinct values in sorted order).
* Without ``data.test_path`` each client's test split is held out of its own rows
  (``test_fraction`` relative to what it keeps), or, without ``data.client``, a seeded
  stratified share of the pool as for digits.

Every problem with a file raises :class:`TableError`, one line naming the field, the
column and what was found.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cafe_ray.config import DataConfig
from cafe_ray.data.base import ArrayDataset


class TableError(ValueError):
    """A table that cannot be used; the one-line message names the field and the column."""


@dataclass(frozen=True)
class TableData:
    """The arrays of one table, before the train/test split."""

    x: np.ndarray
    y: np.ndarray
    client: np.ndarray | None  # the raw values of data.client, one per row


# ------------------------------------------------------------------------ files
def _files(path: Path, field: str) -> list[Path]:
    """The Parquet or Arrow files behind ``path`` (a file or a folder)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise TableError(f"data.{field}={path}: no such file or folder")
    if (path / "dataset_dict.json").is_file():  # a Hugging Face DatasetDict: its train split
        return _files(path / "train", field)
    files = sorted(path.glob("*.parquet")) or sorted(path.glob("*.arrow"))
    if not files:
        raise TableError(f"data.{field}={path}: the folder holds no .parquet or .arrow files")
    return files


def _read_file(path: Path, columns: list[str], field: str, roles: dict[str, str]) -> pa.Table:
    try:
        if path.suffix == ".arrow":  # Hugging Face save_to_disk writes the IPC stream format
            with pa.memory_map(str(path)) as source:
                try:
                    table = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    table = pa.ipc.open_file(source).read_all()
        else:
            table = pq.read_table(path, memory_map=True)
    except (pa.ArrowException, OSError) as err:
        raise TableError(f"data.{field}={path}: not a readable Parquet/Arrow file ({err})") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        what = "column" if len(missing) == 1 else "columns"
        role = roles.get(missing[0], "features")
        raise TableError(f"data.{role}={missing[0]}: no {what} {', '.join(map(repr, missing))} in "
                         f"{path}; its columns: {', '.join(table.column_names)}")
    return table.select(columns)


def read_table(path: str | Path, columns: list[str], field: str = "path",
               roles: dict[str, str] | None = None) -> pa.Table:
    """``columns`` of every file behind ``path``, concatenated (memory-mapped where possible).

    ``roles``: column -> the config field that names it, for the missing-column message.
    """
    tables = [_read_file(f, columns, field, roles or {}) for f in _files(Path(path).expanduser(), field)]
    try:
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    except pa.ArrowInvalid as err:
        raise TableError(f"data.{field}={path}: the files' columns do not match ({err})") from None


# ---------------------------------------------------------------------- columns
def _feature_columns(cfg: DataConfig) -> list[str]:
    return [cfg.features] if isinstance(cfg.features, str) else list(cfg.features or [])


def _flatten_lists(col: pa.ChunkedArray, name: str, per_row: int | None) -> tuple[np.ndarray, int]:
    """(flat values, values per row) of a (nested) list column; ragged or null rows are errors."""
    arr = col.combine_chunks()
    if isinstance(arr, pa.ExtensionArray):  # fixed-shape tensors: a fixed-size list underneath
        arr = arr.storage
    n = len(arr)
    if arr.null_count:
        row = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise TableError(f"data.features={name}: row {row} is null; every row needs a value")
    width = 1
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or \
            pa.types.is_fixed_size_list(arr.type):
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != lengths[0]).any():
            bad = int(np.flatnonzero(lengths != lengths[0])[0])
            raise TableError(f"data.features={name}: ragged lists: row {bad // width} has "
                             f"{int(lengths[bad])} values where row 0 has {int(lengths[0])} (every row "
                             "needs the same length)")
        width *= int(lengths[0]) if len(lengths) else 1
        arr = arr.flatten()
        if arr.null_count:
            raise TableError(f"data.features={name}: null values inside the lists")
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
        raise TableError(f"data.features={name}: needs numbers, found {arr.type}")
    if per_row is not None and width != per_row:
        raise TableError(f"data.features={name}: rows hold {width} values but data.shape asks for {per_row}")
    return arr.to_numpy(zero_copy_only=False), (width if n else per_row or 0)


def _features(table: pa.Table, cfg: DataConfig) -> np.ndarray:
    """(N, *shape) features: integer ids stay int64 for a 1-D shape, else float32."""
    cols = _feature_columns(cfg)
    per_row = int(np.prod(cfg.shape)) if cfg.shape else None
    if len(cols) == 1 and not _is_scalar(table.column(cols[0]).type):
        flat, width = _flatten_lists(table.column(cols[0]), cols[0], per_row)
        x = flat.reshape(len(table), width)
    else:
        parts = []
        for c in cols:
            t = table.column(c).type
            if not _is_scalar(t) or not (pa.types.is_integer(t) or pa.types.is_floating(t)):
                raise TableError(f"data.features: column {c!r} is {t}; a list of feature columns needs one "
                                 "number per row in each (or name a single list column)")
            if table.column(c).null_count:
                raise TableError(f"data.features: column {c!r} has {table.column(c).null_count} null values")
            parts.append(table.column(c).to_numpy())
        x = np.stack(parts, axis=1) if parts else np.zeros((len(table), 0))
        if per_row is not None and x.shape[1] != per_row:
            raise TableError(f"data.features: {x.shape[1]} columns but data.shape asks for {per_row} values")
    shape = tuple(cfg.shape) if cfg.shape else (x.shape[1],)
    x = x.reshape(len(table), *shape)
    if len(shape) == 1 and np.issubdtype(x.dtype, np.integer):
        return np.ascontiguousarray(x, dtype=np.int64)
    return np.ascontiguousarray(x, dtype=np.float32)


def _is_scalar(t: pa.DataType) -> bool:
    return not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
                or isinstance(t, pa.ExtensionType))


def _labels(table: pa.Table, cfg: DataConfig) -> np.ndarray:
    col = table.column(cfg.label)
    if col.null_count:
        raise TableError(f"data.label={cfg.label}: {col.null_count} null labels")
    if not pa.types.is_integer(col.type):
        sample = col.slice(0, 1).to_pylist()
        raise TableError(f"data.label={cfg.label}: needs integer class ids 0..K-1, found {col.type} values "
                         f"(e.g. {sample[0]!r} in row 0); map the classes to integers first")
    y = col.to_numpy().astype(np.int64)
    if len(y) and y.min() < 0:
        raise TableError(f"data.label={cfg.label}: class ids must be >= 0, found {int(y.min())}")
    return y


def _client_values(table: pa.Table, column: str) -> np.ndarray:
    col = table.column(column)
    if pa.types.is_dictionary(col.type):  # a pandas categorical: its values
        col = col.cast(col.type.value_type)
    if col.null_count:
        raise TableError(f"data.client={column}: {col.null_count} rows have no client (null)")
    if not (_is_scalar(col.type) and (pa.types.is_integer(col.type) or pa.types.is_string(col.type)
                                      or pa.types.is_large_string(col.type))):
        raise TableError(f"data.client={column}: needs integer or string ids, found {col.type}")
    return np.asarray(col.to_numpy(zero_copy_only=False))


def read(path: str | Path, cfg: DataConfig, field: str = "path") -> TableData:
    """Features, labels and (when ``data.client`` is set) client values of one table."""
    roles = {c: "features" for c in _feature_columns(cfg)} | {cfg.label: "label"}
    if cfg.client:
        roles[cfg.client] = "client"
    table = read_table(path, list(roles), field, roles)
    if len(table) == 0:
        raise TableError(f"data.{field}={path}: the table has no rows")
    x, y = _features(table, cfg), _labels(table, cfg)
    return TableData(x, y, _client_values(table, cfg.client) if cfg.client else None)


def client_names(cfg: DataConfig) -> np.ndarray:
    """The distinct values of ``data.client`` in the training table, sorted: client i is the i-th.

    Reads that one column only, so a run can size itself before loading the features.
    """
    if cfg.path is None or cfg.client is None:
        raise ValueError("client_names needs data.path and data.client")
    table = read_table(cfg.path, [cfg.client], "path", {cfg.client: "client"})
    return np.unique(_client_values(table, cfg.client))


# ------------------------------------------------------------------ statistics
def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (first per-sample axis) mean and std of float features; std 0 becomes 1."""
    axes = tuple(i for i in range(x.ndim) if i != 1)
    mean = x.mean(axis=axes, dtype=np.float64)
    std = x.std(axis=axes, dtype=np.float64)
    std[std == 0] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    shape = (1, len(mean)) + (1,) * (x.ndim - 2)
    out = x - mean.reshape(shape)
    out /= std.reshape(shape)
    return np.ascontiguousarray(out, dtype=np.float32)



# ------------------------------------------------------------------------ load
_HOLDOUT, _SUBSAMPLE = 4, 5  # rng purposes (datasets.py uses 1-3)


def _rng(seed: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**64, purpose])


def _test_table(cfg: DataConfig) -> str | Path | None:
    """``data.test_path``, else the ``test`` split of a Hugging Face DatasetDict folder."""
    if cfg.test_path is not None:
        return cfg.test_path
    root = Path(cfg.path or "").expanduser()
    if (root / "dataset_dict.json").is_file() and (root / "test").is_dir():
        return root / "test"
    return None


def _holdout(y: np.ndarray, groups: np.ndarray | None, fraction: float,
             rng: np.random.Generator) -> np.ndarray:
    """Sorted test rows: ``fraction`` of each group's rows relative to what it keeps (>= 1 each).

    ``groups``: the client of each row (each client keeps >= 1 training row), or None: one
    stratified share of the pool.
    """
    share = fraction / (1 + fraction)
    if groups is None:
        from cafe_ray.data.sampling import stratified_subsample

        return stratified_subsample(y, max(1, round(share * len(y))), rng)
    codes = np.unique(groups, return_inverse=True)[1].ravel()  # strings too
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    picks = []
    for rows in np.split(order, bounds):
        m = min(max(1, round(share * len(rows))), len(rows) - 1)
        if m > 0:
            picks.append(rng.choice(rows, size=m, replace=False))
    return np.sort(np.concatenate(picks)).astype(np.int64) if picks else np.zeros(0, np.int64)


def _client_ids(values: np.ndarray, names: np.ndarray, cfg: DataConfig, where: str) -> np.ndarray:
    """Client index (position in ``names``) of each row; a value ``names`` lacks is an error."""
    ids = np.searchsorted(names, values)
    ids = np.minimum(ids, len(names) - 1)
    unknown = names[ids] != values
    if unknown.any():
        raise TableError(f"data.client={cfg.client}: {where} has client {values[unknown][0]!r}, which the "
                         "training table (data.path) does not have")
    return ids.astype(np.int64)


def _check_clients(cfg: DataConfig, names: np.ndarray, train: np.ndarray, test: np.ndarray) -> None:
    """Every client keeps >= 1 training and >= 1 test sample after the split."""
    for what, ids in (("training", train), ("test", test)):
        counts = np.bincount(ids, minlength=len(names))
        if (counts == 0).any():
            empty = names[int(np.flatnonzero(counts == 0)[0])]
            why = {"training": "after holding out its test split and data.max_train_samples",
                   "test": "in data.test_path" if cfg.test_path else
                           "after the split (it has a single row)"}[what]
            raise TableError(f"data.client={cfg.client}: client {empty!r} has no {what} samples {why}; "
                             f"{int((counts == 0).sum())} of {len(names)} clients are empty (remove their rows "
                             "or give each at least two)")


def load_parquet(cfg: DataConfig, seed: int) -> ArrayDataset:
    """``data.path`` (and ``data.test_path``) as contiguous arrays; see the module docstring."""
    from cafe_ray.data.sampling import stratified_subsample

    if cfg.path is None:
        raise TableError("data.path: data.name=parquet needs the path of a Parquet file or folder")
    train = read(cfg.path, cfg)
    x, y, groups = train.x, train.y, train.client
    test_path = _test_table(cfg)
    if test_path is not None:
        test = read(test_path, cfg, "test_path")
        x_te, y_te, groups_te = test.x, test.y, test.client
        if x_te.shape[1:] != x.shape[1:]:
            raise TableError(f"data.test_path={test_path}: features of shape {x_te.shape[1:]}, the training "
                             f"table's are {x.shape[1:]}")
    else:
        held = _holdout(y, groups, cfg.test_fraction, _rng(seed, _HOLDOUT))
        keep = np.setdiff1d(np.arange(len(y)), held, assume_unique=True)
        x_te, y_te = x[held], y[held]
        groups_te = groups[held] if groups is not None else None
        x, y = x[keep], y[keep]
        groups = groups[keep] if groups is not None else None
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(y):
        idx = stratified_subsample(y, cfg.max_train_samples, _rng(seed, _SUBSAMPLE))
        x, y = x[idx], y[idx]
        groups = groups[idx] if groups is not None else None
    train_client = test_client = None
    names = np.zeros(0)
    if cfg.client is not None:
        assert train.client is not None and groups is not None and groups_te is not None  # read() returns it
        names = np.unique(train.client)  # the whole training table's values, as client_names(cfg) reads them
        train_client = _client_ids(groups, names, cfg, "data.path")
        test_client = _client_ids(groups_te, names, cfg, "data.test_path")
        _check_clients(cfg, names, train_client, test_client)
    k = int(max(y.max(), y_te.max() if len(y_te) else 0)) + 1
    if k < 2:
        raise TableError(f"data.label={cfg.label}: found a single class (0); a classifier needs >= 2")
    stats: dict[str, Any] = {
        "source": str(cfg.path), "test_source": str(test_path) if test_path is not None else None,
        "train_samples": len(y), "test_samples": len(y_te), "num_classes": k,
        "input_shape": list(x.shape[1:]), "dtype": str(x.dtype),
    }
    if names.size:
        stats["clients"] = [v.item() if hasattr(v, "item") else v for v in names]
    if x.dtype == np.int64:
        top = int(max(x.max(), x_te.max() if x_te.size else 0)) if x.size else 0
        if top >= cfg.vocab_size or (x.size and x.min() < 0):
            raise TableError(f"data.features={cfg.features}: token ids must lie in 0..data.vocab_size-1 "
                             f"= 0..{cfg.vocab_size - 1}, found {int(x.min())}..{top}; raise data.vocab_size")
    elif cfg.standardize:
        mean, std = channel_stats(x)
        x, x_te = standardise(x, mean, std), standardise(x_te, mean, std)
        stats.update(standardized=True, mean=mean.tolist(), std=std.tolist(),
                     stats_from="the training split (after the test hold-out and max_train_samples)")
    return ArrayDataset(
        name="parquet", x_train=np.ascontiguousarray(x), y_train=np.ascontiguousarray(y, np.int64),
        x_test=np.ascontiguousarray(x_te), y_test=np.ascontiguousarray(y_te, np.int64),
        num_classes=k, classes=tuple(str(i) for i in range(k)),
        train_client=train_client, test_client=test_client, stats=stats,
    )


def resolve_clients(cfg: DataConfig) -> DataConfig:
    """``cfg`` with ``num_clients`` set to the natural partition's client count (``data.client``).

    A ``num_clients`` given explicitly must agree: it is then a check, not a choice.
    """
    if cfg.name != "parquet" or cfg.client is None:
        return cfg
    n = len(client_names(cfg))
    if "num_clients" in cfg.model_fields_set and cfg.num_clients != n:
        raise TableError(f"data.num_clients={cfg.num_clients}: data.client={cfg.client} has {n} distinct "
                         "values, one client each; omit data.num_clients or set it to that number")
    return cfg if cfg.num_clients == n else cfg.model_copy(update={"num_clients": n})
