"""Plug-ins: an algorithm and a model from a module in the working folder (not installed) on
real Ray, and an installed distribution's entry points (built and pip-installed here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from safetensors.numpy import load_file
from typer.testing import CliRunner

from cafe_ray.cli import app
from cafe_ray.runs import rundir

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples" / "bring-your-own"
REPO = Path(__file__).resolve().parents[2]
CAFE_RAY = str(Path(sys.executable).parent / "cafe-ray")
runner = CliRunner()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The docs' example folder, copied: my_fl.py, the configs and a FEMNIST-like file made by
    the example's own script. It becomes the working folder; my_fl is forgotten afterwards."""
    for f in EXAMPLES.iterdir():
        shutil.copy(f, tmp_path / f.name)
    subprocess.run([sys.executable, "make_femnist_like.py", "data/femnist.parquet"], cwd=tmp_path, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    sys.modules.pop("my_fl", None)


def _args(*sets: str) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


@pytest.mark.slow  # a CLI run shipping plug-ins to its actors
@pytest.mark.usefixtures("ray_session")
def test_plugin_algorithm_and_model_from_the_working_folder_run_on_ray(project):
    """Through the Python API, whose round callback follows the coordinator from the driver."""
    import cafe_ray

    rounds: list[dict] = []
    run = cafe_ray.simulate("plugins.yaml", {"output_dir": "runs", "round.num_rounds": 3, "round.eval_every": 3},
                            show_progress=False, on_round=rounds.append)
    run_dir, summary = run.path, run.summary
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[-1]["acc_avg_exit"] == summary["acc_avg_exit"]
    assert summary["algorithm"] == "my_fl:FedAvgM" and summary["num_clients"] == 12
    # the plug-in model's MACs are measured: 784 -> 64 -> (10 | 32 -> 10), Linear layers only
    assert summary["exit_macs"] == [784 * 64 + 64 * 10, 784 * 64 + 64 * 32 + 32 * 10]
    assert summary["acc_avg_exit"] > 0.5  # the writers' classes are easy to tell apart
    server = load_file(str(rundir.latest_checkpoint(run_dir) / rundir.CHECKPOINT_SERVER))
    assert any(k.startswith("momentum/") for k in server)  # FedAvgM's own aggregate ran
    pids = {rec["pid"] for rec in rundir.read_jsonl(run_dir / rundir.CLIENTS)}
    assert len(pids) == 2  # both client actors imported my_fl, shipped to them by the engine


@pytest.mark.parametrize("sets,message", [
    (["algorithm.options.beta=2"], "algorithm.options: my_fl:FedAvgM: beta=2: needs 0 <= beta < 1"),
    (["algorithm.options.gamma=1"], "algorithm.options: my_fl:FedAvgM rejects ['beta', 'gamma', 'server_lr']"),
    (["algorithm.name=nosuch:Algo"], "algorithm.name=nosuch:Algo: cannot import 'nosuch'"),
    (["model.name=my_fl:missing"], "model.name=my_fl:missing: 'my_fl' has no 'missing'"),
    (["algorithm.name=fedavg_ee"], "algorithm.options: fedavg_ee is built in"),
])
def test_a_bad_plugin_is_one_error_line(project, sets, message):
    r = runner.invoke(app, ["validate", "plugins.yaml", *_args(*sets)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.output


DIST = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "cafe-demo-plugins"
        version = "0.1"

        [project.entry-points."cafe_ray.algorithms"]
        fedavgm = "cafe_demo_plugins:FedAvgM"

        [project.entry-points."cafe_ray.models"]
        mlp_ee = "cafe_demo_plugins:mlp_ee"
    """,
}


@pytest.mark.slow  # pip installs a distribution into a new venv
def test_an_installed_distribution_s_entry_points_are_listed_and_usable(tmp_path):
    src = tmp_path / "src"
    (src / "cafe_demo_plugins").mkdir(parents=True)
    shutil.copy(EXAMPLES / "my_fl.py", src / "cafe_demo_plugins" / "__init__.py")
    for name, text in DIST.items():
        (src / name).write_text(textwrap.dedent(text))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(src)], check=True, capture_output=True)
    assert (site / "cafe_demo_plugins" / "__init__.py").is_file()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{site}", "COLUMNS": "200"}

    def cli(*args: str) -> str:
        p = subprocess.run([CAFE_RAY, *args], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    assert any(ln.startswith("fedavgm ") for ln in cli("algorithms").splitlines())
    row = next(ln for ln in cli("models").splitlines() if "mlp_ee" in ln)
    assert "50,816 / 52,544" in row  # measured on its declared example input (1, 28, 28), 10 classes
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"name": "digits", "num_clients": 4},
                                   "algorithm": {"name": "fedavgm", "options": {"beta": 0.5}},
                                   "model": {"name": "mlp_ee", "width": 8}, "output_dir": str(tmp_path)}))
    cli("validate", str(cfg))  # by entry-point name, options checked by the plug-in itself


def test_a_plugin_device_catalog_named_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_fleet.py").write_text(textwrap.dedent("""
        from cafe_ray.sim.profiles import Catalog, DeviceProfile, ResourceClass

        def fleet():
            slow = DeviceProfile("watch", "watch", flops=2e8, max_depth=1)
            fast = DeviceProfile("laptop", "laptop", flops=5e10)
            return Catalog("my_fleet", ((slow, 0.75), (fast, 0.25)),
                           (ResourceClass("watch", num_cpus=0.5), ResourceClass("laptop", num_cpus=1.0)))
        NOT_A_CATALOG = 3
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    from cafe_ray.config import ProfilesConfig
    from cafe_ray.sim.profiles import assign_profiles, resolve_catalog

    try:
        cat = resolve_catalog(ProfilesConfig(catalog="my_fleet:fleet", actors_per_class=1))
        assert cat.name == "my_fleet" and [c.name for c in cat.classes] == ["watch", "laptop"]
        tiers = [p.name for p in assign_profiles(cat, 8, seed=0)]
        assert sorted(tiers) == ["laptop"] * 2 + ["watch"] * 6
        r = runner.invoke(app, ["profiles", "my_fleet:fleet"])
        assert r.exit_code == 0 and "watch" in r.output and "laptop" in r.output, r.output
        with pytest.raises(ValueError, match=r"profiles\.catalog=my_fleet:NOT_A_CATALOG: got int, not a"):
            resolve_catalog(ProfilesConfig(catalog="my_fleet:NOT_A_CATALOG"))
    finally:
        sys.modules.pop("my_fleet", None)
