"""Resuming a sweep loads only the Ray Tune state this installation signed: a tampered or an added
pickle is refused (rc 2, one line) before anything is unpickled; an untouched sweep resumes as
before; --trust-pickles resumes a folder signed with another key, and says what it loads."""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import stat
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cafe_ray.cli import app
from cafe_ray.config import load_config
from cafe_ray.studies import signing
from cafe_ray.studies.sweep import run_sweep
from tests.studies.test_sweep import _base


class _Marker:
    """Unpickling this creates a file: the proof that a pickle's code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ray_session):
    """A real finished sweep (one trial, one round), and the CLI arguments that resume it."""
    tmp = tmp_path_factory.mktemp("signed")
    cfg, sp = tmp / "c.yaml", tmp / "s.yaml"
    cfg.write_text(yaml.safe_dump(_base(tmp, round={"num_rounds": 1, "fraction": 1.0, "eval_every": 1})))
    space = {"train.lr": {"grid": [0.05]}}
    sp.write_text(yaml.safe_dump(space))
    out = tmp / "sweep"
    run_sweep(load_config(cfg).model_dump(mode="json"), space, out, verbose=0)  # as `cafe-ray sweep` does
    return out, ["sweep", str(cfg), "--space", str(sp), "--resume"]


def _copy(out: Path, dest: Path) -> Path:
    shutil.copytree(out, dest)
    return dest


def _table(out: Path) -> list[dict]:
    """results.csv without the run_dir column (the copies live elsewhere)."""
    with (out / "results.csv").open() as f:
        return [{k: v for k, v in row.items() if k != "run_dir"} for row in csv.DictReader(f)]


def _resume(args: list[str], out: Path, *extra: str):
    return CliRunner().invoke(app, [*args, "--out", str(out), *extra])


def test_the_key_is_created_owner_only_and_covers_every_pickle_tune_wrote(sweep):
    out, _ = sweep
    key = signing.key_path()
    assert key.is_file() and stat.S_IMODE(key.stat().st_mode) == 0o600
    manifest = json.loads((out / signing.MANIFEST).read_text())
    assert "tune/tuner.pkl" in manifest["files"]
    assert any(Path(r).name.startswith("experiment_state-") for r in manifest["files"])
    assert any(Path(r).name == "params.pkl" for r in manifest["files"])
    assert not any(Path(r).name in ("result.json", "progress.csv") for r in manifest["files"])
    assert all(not f.why for f in signing.findings(out))


def _refused(args: list[str], copy: Path, marker: Path, says: str) -> None:
    """`sweep --resume` exits 2 with one line saying ``says``, and no pickle ran."""
    r = _resume(args, copy)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert says in lines[0] and "--trust-pickles" in lines[0], lines[0]
    assert not marker.exists()  # resume never unpickled it


def test_a_tampered_pickle_is_refused_before_it_is_unpickled(sweep, tmp_path):
    out, args = sweep
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Marker(marker))
    pickle.loads(evil)  # the payload does run when unpickled
    assert marker.exists()
    marker.unlink()
    copy = _copy(out, tmp_path / "tampered")
    (copy / "tune" / "tuner.pkl").write_bytes(evil)
    _refused(args, copy, marker, "tune/tuner.pkl differs from its digest")


def test_an_added_pickle_is_refused_before_it_is_unpickled(sweep, tmp_path):
    from ray._common.utils import binary_to_hex
    from ray.tune.utils.serialization import _loads_with_cloudpickle

    out, args = sweep
    marker = tmp_path / "pwned"
    # a newer experiment state: Tune restores the newest one, and its cloudpickle blobs run on load
    state = json.dumps({"trial_data": [], "stats": {}, "runner_data": {
        "_type": "CLOUDPICKLE_FALLBACK", "value": binary_to_hex(pickle.dumps(_Marker(marker)))}})
    _loads_with_cloudpickle(state)
    assert marker.exists()
    marker.unlink()
    copy = _copy(out, tmp_path / "added")
    (copy / "tune" / "experiment_state-2099-01-01_00-00-00.json").write_text(state)
    _refused(args, copy, marker, "experiment_state-2099-01-01_00-00-00.json has no digest")
    os.remove(copy / signing.MANIFEST)  # a folder without digests at all: refused the same way
    _refused(args, copy, marker, "tune/tuner.pkl has no digest")


def test_an_untouched_sweep_resumes_and_another_keys_needs_trust_pickles(sweep, tmp_path, monkeypatch):
    out, args = sweep
    mine = _copy(out, tmp_path / "mine")
    r = _resume(args, mine)
    assert r.exit_code == 0, r.output
    assert _table(mine) == _table(out)

    theirs = _copy(out, tmp_path / "theirs")
    monkeypatch.setenv(signing.KEY_ENV, str(tmp_path / "other.key"))  # another user
    r = _resume(args, theirs)
    assert r.exit_code == 2 and "was signed with another key" in r.output, r.output
    r = _resume(args, theirs, "--trust-pickles")
    assert r.exit_code == 0, r.output
    assert "warning: --trust-pickles" in r.output and "tune/tuner.pkl: was signed with another key" in r.output
    assert _table(theirs) == _table(out)
    assert all(not f.why for f in signing.findings(theirs))  # re-signed: ours from now on


def test_a_key_readable_by_others_is_refused(tmp_path, monkeypatch):
    key = tmp_path / "k"
    monkeypatch.setenv(signing.KEY_ENV, str(key))
    signing.load_key()
    key.chmod(0o644)
    with pytest.raises(signing.ConfigError, match="readable by other users.*chmod 600"):
        signing.load_key()
