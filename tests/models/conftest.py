"""Model tests: keep the MACs cache out of ~/.cache and start each test with an empty memory cache."""

from __future__ import annotations

import pytest

from cafe_ray.models import macs


@pytest.fixture(autouse=True)
def isolated_macs_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAFE_RAY_CACHE", str(tmp_path / "cache"))
    macs.clear_memory_cache()
    yield tmp_path / "cache" / "macs.json"
    macs.clear_memory_cache()
