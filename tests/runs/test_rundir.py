"""The run directory's reliability pieces: atomic checkpoints, recorded warnings, failure notes."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from cafe_ray.runs import rundir


def _ckpt(root, t, fail=False):
    with rundir.atomic_checkpoint(root, t) as tmp:
        rundir.write_checkpoint_files(tmp, {"w": torch.full((3,), float(t))}, {"round": t})
        if fail:
            raise OSError(28, "No space left on device")


def test_failed_checkpoint_keeps_the_previous_one(tmp_path):
    root = tmp_path / "checkpoints"
    _ckpt(root, 0)
    with pytest.raises(OSError, match="No space left"):
        _ckpt(root, 1, fail=True)
    assert sorted(p.name for p in root.iterdir()) == ["round_000000"]  # no half-written folder left
    assert rundir.latest_checkpoint(tmp_path).name == "round_000000"
    tensors, state = rundir.read_checkpoint(root / "round_000000")
    assert state == {"round": 0} and tensors["w"].tolist() == [0.0, 0.0, 0.0]
    _ckpt(root, 1)
    assert rundir.latest_checkpoint(tmp_path).name == "round_000001"


def test_warnings_are_recorded_once_and_restored(tmp_path):
    before = warnings.showwarning
    undo = rundir.capture_warnings(tmp_path, "coordinator", echo=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("data.partition.min_size=10 is infeasible", stacklevel=1)
            warnings.warn("data.partition.min_size=10 is infeasible", stacklevel=1)
    finally:
        undo()
    assert warnings.showwarning is before
    (rec,) = rundir.read_warnings(tmp_path)
    assert rec["source"] == "coordinator" and rec["category"] == "UserWarning"
    assert rec["message"] == "data.partition.min_size=10 is infeasible"
    assert rundir.record_warning(tmp_path, "actor", "another") is True
    assert rundir.record_warning(tmp_path, "actor", "another") is False


def test_failure_note_roundtrip(tmp_path):
    assert rundir.read_failure(tmp_path) == {}
    rundir.write_failure(tmp_path, {"reason": "interrupted (Ctrl-C)", "rounds_done": 3})
    assert json.loads((tmp_path / rundir.FAILED).read_text())["rounds_done"] == 3
    assert rundir.read_failure(tmp_path)["reason"] == "interrupted (Ctrl-C)"
    rundir.clear_failure(tmp_path)
    assert not (tmp_path / rundir.FAILED).exists()
