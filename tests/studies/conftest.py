"""Sweeps sign Ray Tune's pickled state with a per-user key: the tests use their own key file."""

from __future__ import annotations

import os

import pytest

from cafe_ray.studies.signing import KEY_ENV


@pytest.fixture(scope="session", autouse=True)
def _signing_key(tmp_path_factory):
    """A key file of the test session (created 0600 on first use), never the user's own."""
    old = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = str(tmp_path_factory.mktemp("key") / "signing.key")
    yield
    if old is None:
        os.environ.pop(KEY_ENV, None)
    else:
        os.environ[KEY_ENV] = old
