import pytest

from tests.inference.helpers import tiny_run


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A finished tiny FedPer-EE run (digits, 6 clients, 3 rounds), shared by the session."""
    return tiny_run(tmp_path_factory.getbasetemp() / "inference-runs", "fedper_ee")


@pytest.fixture(scope="session")
def run_dir_fedavg(tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp() / "inference-runs", "fedavg_ee")
