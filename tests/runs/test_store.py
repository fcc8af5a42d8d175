import pytest
import torch

from cafe_ray.runs.store import ClientStateStore


def test_staged_state_is_invisible_until_commit(tmp_path):
    s = ClientStateStore(tmp_path)
    s.stage(3, 0, {"w": torch.ones(2)})
    assert s.load(3) is None
    assert s.commit(3, 0)
    assert torch.equal(s.load(3)["w"], torch.ones(2))


def test_discarded_stage_never_lands(tmp_path):
    s = ClientStateStore(tmp_path)
    s.stage(1, 5, {"w": torch.zeros(1)})
    s.discard_staged()
    assert not s.commit(1, 5) and s.load(1) is None


def test_snapshot_survives_later_writes(tmp_path):
    s = ClientStateStore(tmp_path / "store")
    s.stage(0, 0, {"w": torch.tensor([1.0])})
    s.commit(0, 0)
    s.snapshot(tmp_path / "snap")
    s.stage(0, 1, {"w": torch.tensor([2.0])})
    s.commit(0, 1)
    assert s.load(0)["w"].item() == 2.0
    s.restore(tmp_path / "snap")
    assert s.load(0)["w"].item() == 1.0
    assert s.clients() == [0]


def test_store_files_are_safetensors(tmp_path):
    s = ClientStateStore(tmp_path)
    s.stage(7, 0, {"a": torch.arange(3, dtype=torch.float32)})
    s.commit(7, 0)
    from safetensors.torch import load_file

    (f,) = tmp_path.glob("client_*.safetensors")
    assert torch.equal(load_file(str(f))["a"], torch.arange(3, dtype=torch.float32))


def test_discarding_named_candidates_touches_only_them(tmp_path, monkeypatch):
    s = ClientStateStore(tmp_path)
    for cid in (1, 2):
        s.stage(cid, 4, {"w": torch.ones(1)})
    s.stage(2, 3, {"w": torch.ones(1)})  # another round's candidate: not named, stays
    (tmp_path / ".staged_0000009_r000004.tmp").write_bytes(b"half")  # a worker died mid-write
    monkeypatch.setattr(type(tmp_path), "glob", lambda *a, **k: pytest.fail("named discard lists the store"))
    s.discard_staged([1, 9], 4)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".staged_0000002_r000003.safetensors",
                                                            ".staged_0000002_r000004.safetensors"]
    assert s.commit(2, 4) and not s.commit(1, 4)
    with pytest.raises(ValueError, match="round_"):
        s.discard_staged([1])
