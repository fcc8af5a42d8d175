"""data.name=parquet on real Parquet and Arrow files written in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cafe_ray.config import DataConfig
from cafe_ray.data import load_dataset, partition_clients
from cafe_ray.data.tables import TableError, resolve_clients

from .conftest import make_femnist_like

IMAGE = {"name": "parquet", "features": "pixels", "shape": [1, 8, 8], "label": "label"}


def _cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(**{**IMAGE, "path": str(path), **kw})


def _raw_pixels(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = pq.read_table(path)
    px = np.array(t.column("pixels").to_pylist(), dtype=np.float64)
    return px, t.column("label").to_numpy(), np.array(t.column("writer_id").to_pylist())


def test_natural_partition_gives_one_client_per_writer_in_sorted_order(tmp_path):
    path = make_femnist_like(tmp_path / "train.parquet", writers=5, per_writer=12)
    cfg = resolve_clients(_cfg(path, client="writer_id"))
    assert cfg.num_clients == 5  # the distinct writers; num_clients was not given
    ds = load_dataset(cfg, seed=0)
    splits = partition_clients(ds, cfg, seed=0)
    assert len(splits) == 5 and ds.stats["clients"] == [f"f{w:04d}" for w in range(5)]
    px, label, writer = _raw_pixels(path)
    rows_of = {w: set(np.flatnonzero(writer == w)) for w in np.unique(writer)}
    for s in splits:
        assert len(s.train_idx) == 10 and len(s.test_idx) == 2  # 12 rows, test_fraction 0.2 of what it keeps
        assert set(ds.train_client[s.train_idx]) == {s.client_id} == set(ds.test_client[s.test_idx])
    # every row is a train or a test sample of exactly its writer's client, labels intact
    assert sum(len(s.train_idx) + len(s.test_idx) for s in splits) == len(label)
    assert sorted(ds.y_train.tolist() + ds.y_test.tolist()) == sorted(label.tolist())
    assert all(len(r) == 12 for r in rows_of.values())


def test_standardisation_uses_the_training_split_and_is_recorded(tmp_path):
    path = make_femnist_like(tmp_path / "train.parquet")
    cfg = _cfg(path, test_fraction=0.25)
    ds = load_dataset(cfg, seed=3)
    assert ds.x_train.dtype == np.float32 and ds.x_train.shape[1:] == (1, 8, 8)
    assert abs(float(ds.x_train.mean())) < 1e-4 and abs(float(ds.x_train.std()) - 1) < 1e-3
    assert abs(float(ds.x_test.mean())) > 1e-6  # the test split is scaled by the train statistics
    px, _, _ = _raw_pixels(path)
    # undo the scaling: the recorded statistics rebuild the raw pixels of the training split
    raw_train = ds.x_train * ds.stats["std"][0] + ds.stats["mean"][0]
    assert ds.stats["train_samples"] == len(raw_train) and ds.stats["test_samples"] == len(ds.x_test)
    assert np.isclose(ds.stats["mean"][0], raw_train.mean(), rtol=1e-4)
    assert {tuple(r) for r in np.rint(raw_train.reshape(len(raw_train), -1)).astype(int)} <= \
        {tuple(r) for r in px.astype(int)}
    assert not load_dataset(_cfg(path, standardize=False), seed=3).x_train.mean() < 10  # raw pixels kept


def test_list_column_folder_and_fixed_size_list_read_the_same(tmp_path):
    fixed = load_dataset(_cfg(make_femnist_like(tmp_path / "a.parquet")), seed=0)
    listed = load_dataset(_cfg(make_femnist_like(tmp_path / "b.parquet", fixed=False)), seed=0)
    assert np.array_equal(fixed.x_train, listed.x_train) and np.array_equal(fixed.y_test, listed.y_test)
    folder = tmp_path / "parts"
    table = pq.read_table(tmp_path / "a.parquet")
    folder.mkdir()
    pq.write_table(table.slice(0, 50), folder / "part-0.parquet")
    pq.write_table(table.slice(50), folder / "part-1.parquet")
    parts = load_dataset(_cfg(folder), seed=0)
    assert np.array_equal(parts.x_train, fixed.x_train) and np.array_equal(parts.y_train, fixed.y_train)


def test_numeric_columns_and_token_ids(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    cols = {f"f{i}": rng.normal(size=n) for i in range(4)} | {"y": np.arange(n) % 2}
    pq.write_table(pa.table(cols), tmp_path / "tab.parquet")
    ds = load_dataset(DataConfig(name="parquet", path=str(tmp_path / "tab.parquet"),
                                 features=["f0", "f1", "f2", "f3"], shape=[1, 2, 2], label="y"), seed=0)
    assert ds.x_train.shape[1:] == (1, 2, 2) and ds.num_classes == 2
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(rng.integers(0, 50, n * 6)), 6)
    pq.write_table(pa.table({"ids": tokens, "y": np.arange(n) % 3}), tmp_path / "text.parquet")
    text = DataConfig(name="parquet", path=str(tmp_path / "text.parquet"), features="ids", label="y",
                      vocab_size=50)
    ds = load_dataset(text, seed=0)
    assert ds.is_text and ds.x_train.shape[1:] == (6,) and "mean" not in ds.stats
    with pytest.raises(TableError, match=r"^data\.features=ids: token ids .* 0\.\.39, found 0\.\.4\d"):
        load_dataset(text.model_copy(update={"vocab_size": 40}), seed=0)


def test_test_path_and_a_hugging_face_save_to_disk_folder(tmp_path):
    table = pq.read_table(make_femnist_like(tmp_path / "all.parquet", writers=4, per_writer=10))
    pq.write_table(table.slice(0, 30), tmp_path / "train.parquet")
    pq.write_table(table.slice(30), tmp_path / "test.parquet")
    ds = load_dataset(_cfg(tmp_path / "train.parquet", test_path=str(tmp_path / "test.parquet")), seed=0)
    assert len(ds.y_train) == 30 and len(ds.y_test) == 10
    # save_to_disk's layout: a DatasetDict folder of splits, each Arrow IPC stream files + json
    hf = tmp_path / "hf"
    for split, part in (("train", table.slice(0, 30)), ("test", table.slice(30))):
        (hf / split).mkdir(parents=True)
        with pa.OSFile(str(hf / split / "data-00000-of-00001.arrow"), "wb") as sink, \
                pa.ipc.new_stream(sink, part.schema) as writer:
            writer.write_table(part)
        (hf / split / "state.json").write_text(json.dumps({"_data_files": [
            {"filename": "data-00000-of-00001.arrow"}]}))
    (hf / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    from_hf = load_dataset(_cfg(hf), seed=0)
    assert np.array_equal(from_hf.x_train, ds.x_train) and np.array_equal(from_hf.y_test, ds.y_test)


def test_without_a_client_column_every_partitioner_applies(tmp_path):
    cfg = _cfg(make_femnist_like(tmp_path / "t.parquet"), num_clients=4)
    ds = load_dataset(cfg, seed=0)
    assert ds.train_client is None
    splits = partition_clients(ds, cfg, seed=0)
    assert len(splits) == 4 and sum(len(s.train_idx) for s in splits) == len(ds.y_train)


def _bad(tmp_path: Path, table: pa.Table, **kw) -> str:
    pq.write_table(table, tmp_path / "bad.parquet")
    cfg = _cfg(tmp_path / "bad.parquet", **kw)
    with pytest.raises(TableError) as err:
        load_dataset(resolve_clients(cfg), seed=0)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_every_bad_table_names_its_column_and_what_was_found(tmp_path):
    good = pq.read_table(make_femnist_like(tmp_path / "g.parquet", writers=3, per_writer=5))
    assert "data.features=image: no column 'image'" in _bad(tmp_path, good, features="image")
    assert "data.label=digit: no column 'digit'" in _bad(tmp_path, good, label="digit")
    assert "data.client=user: no column 'user'" in _bad(tmp_path, good, client="user")
    ragged = good.set_column(0, "pixels", pa.array([[0] * 64] * 7 + [[0] * 63] + [[0] * 64] * 7))
    assert "data.features=pixels: ragged lists: row 7 has 63 values where row 0 has 64" in _bad(tmp_path, ragged)
    floats = good.set_column(1, "label", pa.array(np.linspace(0, 1, 15)))
    assert "data.label=label: needs integer class ids 0..K-1, found double values" in _bad(tmp_path, floats)
    strings = good.set_column(1, "label", pa.array(["cat"] * 15))
    assert "found string values (e.g. 'cat' in row 0)" in _bad(tmp_path, strings)
    lonely = good.set_column(2, "writer_id", pa.array(["a"] * 14 + ["b"]))
    msg = _bad(tmp_path, lonely, client="writer_id")
    assert msg.startswith("data.client=writer_id: client 'b' has no test samples after the split")
    assert "data.shape asks for 49" in _bad(tmp_path, good, shape=[1, 7, 7])
    with pytest.raises(TableError, match=r"^data\.num_clients=5: data\.client=writer_id has 3 distinct"):
        resolve_clients(_cfg(tmp_path / "g.parquet", client="writer_id", num_clients=5))
    with pytest.raises(TableError, match=r"^data\.path=.*missing\.parquet: no such file or folder$"):
        load_dataset(_cfg(tmp_path / "missing.parquet"), seed=0)


def test_a_test_table_with_an_unknown_client_is_an_error(tmp_path):
    table = pq.read_table(make_femnist_like(tmp_path / "all.parquet", writers=3, per_writer=6))
    pq.write_table(table.slice(0, 12), tmp_path / "train.parquet")  # writers f0000 and f0001
    pq.write_table(table.slice(12), tmp_path / "test.parquet")  # writer f0002 only
    cfg = _cfg(tmp_path / "train.parquet", test_path=str(tmp_path / "test.parquet"), client="writer_id")
    with pytest.raises(TableError, match=r"^data\.client=writer_id: data\.test_path has client 'f0002'"):
        load_dataset(resolve_clients(cfg), seed=0)


def test_a_categorical_client_column_reads_as_its_values(tmp_path):
    table = pq.read_table(make_femnist_like(tmp_path / "a.parquet", writers=3, per_writer=6))
    encoded = table.set_column(2, "writer_id", table.column("writer_id").dictionary_encode())
    pq.write_table(encoded, tmp_path / "cat.parquet")
    plain = load_dataset(resolve_clients(_cfg(tmp_path / "a.parquet", client="writer_id")), seed=0)
    cat = load_dataset(resolve_clients(_cfg(tmp_path / "cat.parquet", client="writer_id")), seed=0)
    assert cat.stats["clients"] == plain.stats["clients"] == ["f0000", "f0001", "f0002"]
    assert np.array_equal(cat.train_client, plain.train_client)


def test_a_plugin_loader_named_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_loader_mod.py").write_text(
        "import numpy as np\n"
        "from cafe_ray.data import ArrayDataset\n"
        "def load(cfg, seed):\n"
        "    rng = np.random.default_rng(seed)\n"
        "    n = cfg.options['n']\n"
        "    x = rng.normal(size=(n, 1, 4, 4)).astype(np.float32)\n"
        "    y = np.arange(n) % 2\n"
        "    return ArrayDataset('mine', x, y, x[:4], y[:4], 2)\n"
        "def broken(cfg, seed):\n"
        "    return 'not a dataset'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ds = load_dataset(DataConfig(name="my_loader_mod:load", options={"n": 40}), seed=1)
    assert ds.name == "mine" and ds.x_train.shape == (40, 1, 4, 4)
    splits = partition_clients(ds, DataConfig(name="my_loader_mod:load", num_clients=3, options={"n": 40}), 1)
    assert len(splits) == 3
    with pytest.raises(ValueError, match=r"data\.name=my_loader_mod:broken: the loader returned str"):
        load_dataset(DataConfig(name="my_loader_mod:broken"), seed=0)
