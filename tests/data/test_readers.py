"""CIFAR pickles go through a restricted unpickler: real batches load, crafted ones are refused."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from cafe_ray.config import DataConfig
from cafe_ray.data import load_dataset, readers
from tests.data.conftest import make_cifar10


class _RunsCode:
    """What an attacker pickles: unpickling it calls os.system (here: touch a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _batch(n: int = 4) -> dict:
    rng = np.random.default_rng(0)
    return {b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}


def test_malicious_batch_is_refused_and_runs_nothing(tmp_path):
    folder = make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    with (folder / "data_batch_3").open("wb") as f:
        pickle.dump({**_batch(), b"x": _RunsCode(marker)}, f)
    with pytest.raises(readers.UnsafePickleError, match=r"data_batch_3: refused to load: the pickle "
                                                        r"references posix\.system"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert not marker.exists()


@pytest.mark.parametrize("callable_", [eval, exec, getattr, __import__])
def test_builtins_that_run_code_are_refused(tmp_path, callable_):
    path = tmp_path / "b"

    class Evil:
        def __reduce__(self):
            return (callable_, ("1",) if callable_ is not getattr else (1, "real"))

    path.write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(readers.UnsafePickleError, match="builtins"):
        readers.read_cifar_batches([path], b"labels")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_real_batch_formats_load(tmp_path, protocol):
    b = _batch()
    path = tmp_path / "batch"
    raw = pickle.dumps(b, protocol=protocol)
    if protocol == 2:  # what Python 2's cPickle wrote: the pre-numpy-2 module path
        raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        assert b"cnumpy.core.multiarray\n_reconstruct" in raw
    path.write_bytes(raw)
    x, y = readers.read_cifar_batches([path], b"labels")
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.uint8
    np.testing.assert_array_equal(x.reshape(4, -1), b[b"data"])
    assert y.tolist() == b[b"labels"]


def test_meta_names_with_numpy_scalars(tmp_path):
    path = tmp_path / "batches.meta"
    path.write_bytes(pickle.dumps({b"label_names": [b"cat", b"dog"], b"num_vis": np.int64(3072)}))
    assert readers.read_cifar_names(path, b"label_names") == ("cat", "dog")
