"""The CLI through typer's runner: real files, real commands, exit codes and messages."""

import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cafe_ray.cli import app
from cafe_ray.runs import rundir
from cafe_ray.sim.engine import wait_for
from cafe_ray.sim.reaper import kill_session, session_pids

runner = CliRunner()


def test_validate_ok_and_error(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("data: {name: digits}\nround: {num_rounds: 2}\n")
    r = runner.invoke(app, ["validate", str(good)])
    assert r.exit_code == 0 and "ok" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("round: {num_rouds: 2}\n")
    r = runner.invoke(app, ["validate", str(bad)])
    assert r.exit_code == 2
    assert "round.num_rouds" in r.output and "unknown key" in r.output


def test_validate_unknown_algorithm(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("algorithm: {name: fedsgd}\n")
    r = runner.invoke(app, ["validate", str(p)])
    assert r.exit_code == 2 and "algorithm.name='fedsgd': unknown algorithm" in r.output


def test_version_is_the_packages_and_the_projects():
    """`cafe-ray --version` prints cafe_ray.__version__, the version pyproject.toml builds with."""
    from setuptools.config import pyprojecttoml

    import cafe_ray

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"cafe-ray {cafe_ray.__version__}"
    built = pyprojecttoml.read_configuration(Path(__file__).resolve().parents[1] / "pyproject.toml", expand=True)
    assert built["project"]["version"] == cafe_ray.__version__


def test_models_lists_the_zoo():
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0
    for name in ("cnn_small", "conv3", "resnet18_ee", "transformer4"):
        assert name in r.output


def test_algorithms_and_profiles():
    r = runner.invoke(app, ["algorithms"])
    assert r.exit_code == 0 and "cafedistill" in r.output and "fedper_ee" in r.output
    r = runner.invoke(app, ["profiles", "iot_mix"])
    assert r.exit_code == 0 and "single_board" in r.output


def test_partition_writes_heatmap(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: digits, num_clients: 5}\n")
    png = tmp_path / "heat.png"
    r = runner.invoke(app, ["partition", str(cfg), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_sequential_end_to_end(tmp_path):
    r = runner.invoke(app, ["simulate", "--no-progress", "--set", f"output_dir={tmp_path}",
                            "--set", "executor=sequential", "--set", "round.num_rounds=2",
                            "--set", "data.num_clients=4", "--set", "profiles.catalog=uniform"])
    assert r.exit_code == 0, r.output
    (run_dir,) = list(tmp_path.iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["dataset"] == "digits"


def test_simulate_bad_override_is_an_error(tmp_path):
    r = runner.invoke(app, ["simulate", "--set", "round.num_rounds=zero"])
    assert r.exit_code == 2 and "round.num_rounds" in r.output


def test_resume_refuses_new_settings(tmp_path):
    r = runner.invoke(app, ["simulate", "--resume", str(tmp_path), "--set", "seed=3"])
    assert r.exit_code == 2 and "drop CONFIG and --set" in r.output


def _warnings(output: str) -> set[str]:
    return {ln.split(": ", 1)[1] for ln in output.splitlines() if ln.startswith("warning")}


@pytest.mark.parametrize("sets", [[], ["algorithm.fedprox.mu_prox=0.5"]])
def test_resume_prints_no_warning_a_fresh_run_does_not(tmp_path, sets):
    """The saved config writes every algorithm's block; resuming from it warns about none that a
    fresh run of the same config does not warn about."""
    args = [f"output_dir={tmp_path}", "executor=sequential", "round.num_rounds=2", "checkpoint.every=1",
            "data.num_clients=4", "profiles.catalog=uniform", "train.max_steps=2", *sets]
    fresh = runner.invoke(app, ["simulate", "--no-progress", *[a for s in args for a in ("--set", s)]])
    assert fresh.exit_code == 0, fresh.output
    (run_dir,) = tmp_path.iterdir()
    resumed = runner.invoke(app, ["simulate", "--resume", str(run_dir), "--no-progress"])
    assert resumed.exit_code == 0 and "resuming" in resumed.output, resumed.output
    assert _warnings(resumed.output) <= _warnings(fresh.output), resumed.output
    assert any("algorithm.fedprox is set" in w for w in _warnings(fresh.output)) == bool(sets)


# ---------------------------------------------------------------------------
# Failures through the real `cafe-ray` executable on real Ray: each bad case gives
# rc, one `error:` line naming the field, no traceback, no leftover Ray process and
# no lost checkpoint. Each test runs Ray under its own RAY_TMPDIR, so "its"
# processes are exactly those with that folder in their command line or open files
# (plus those still in the CLI's own process session): other Ray users are untouched.

CAFE_RAY = str(Path(sys.executable).parent / "cafe-ray")
TINY = """name: t
data: {name: digits, num_clients: 4, partition: {kind: iid}}
model: {name: cnn_small, width: 8}
algorithm: {name: fedavg_ee}
train: {local_epochs: 1, batch_size: 32, max_steps: 3}
round: {num_rounds: %(rounds)d, eval_every: 100}
profiles: {catalog: uniform, actors_per_class: 1}
checkpoint: {every: 1, keep: 2}
"""


@pytest.fixture
def cli(tmp_path):
    """Start `cafe-ray` as a real process in its own session and RAY_TMPDIR; clean up after."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="crt", dir="/tmp"))  # short: Ray's socket paths are limited
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "CAFE_RAY_OFFLINE": "1",
           "CAFE_RAY_DATA": str(tmp_path / "no-data"), "COLUMNS": "200"}
    procs: list[subprocess.Popen] = []

    def start(*args: str, rounds: int = 3) -> subprocess.Popen:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(TINY % {"rounds": rounds})
        argv = [CAFE_RAY, *args] if args and args[0] in ("validate", "--debug", "doctor") or "--resume" in args \
            else [CAFE_RAY, "simulate", str(cfg), "--no-progress", "--set", f"output_dir={tmp_path / 'runs'}", *args]
        p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        procs.append(p)
        return p

    start.ray_tmp = ray_tmp  # type: ignore[attr-defined]  # the fixture's folders, on what it yields
    start.runs = tmp_path / "runs"  # type: ignore[attr-defined]  # (as above)
    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    kill_session(ray_tmp)  # only this test's Ray, should a test have failed half-way
    for p in procs:
        for pid in _in_session(p.pid):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _in_session(sid: int) -> list[int]:
    """Live processes whose session id is ``sid`` (everything the CLI started stays in it)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] not in ("Z", "X") and int(fields[3]) == sid:
                out.append(int(entry))
    return out


def _no_leftovers(cli, proc: subprocess.Popen) -> bool:
    """True once no process of this test's Ray session, nor of the CLI's session, is alive."""
    return wait_for(lambda: not session_pids(cli.ray_tmp) and not _in_session(proc.pid), timeout=60)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def _ray_started(cli) -> bool:
    return (cli.ray_tmp / "ray").exists()


@pytest.mark.parametrize(("sets", "field"), [
    (["algorithm.name=fedfoo"], "algorithm.name='fedfoo': unknown algorithm"),
    (["executor=sequential", "algorithm.name=fedfoo"], "algorithm.name='fedfoo': unknown algorithm"),
    (["data.num_clients=5000"], "data.num_clients=5000 exceeds the 1438 training samples"),
    (["executor=sequential", "data.num_clients=5000"], "data.num_clients=5000 exceeds"),
    (["data.name=cifar10", "data.root=/nonexistent/cifar"], "data.name=cifar10: CIFAR-10 not found"),
    (["output_dir=/proc/cafe-ray-runs"], "output_dir=/proc/cafe-ray-runs: cannot write there"),
    (["output_dir=/etc/hostname/runs"], "output_dir=/etc/hostname/runs: /etc/hostname is a file"),
])
def test_bad_input_fails_before_ray_starts(cli, sets, field):
    p = cli(*[a for s in sets for a in ("--set", s)])
    rc, _, err = _finish(p)
    assert rc == 2, err
    assert field in _one_error_line(err)
    assert not _ray_started(cli)  # checked before Ray: nothing to clean up, no run directory
    assert not cli.runs.exists() or not any(cli.runs.iterdir())
    assert _no_leftovers(cli, p)


@pytest.mark.parametrize(("sets", "message"), [
    (["model.name=transformer4"], "model.name='transformer4' does not fit dataset 'digits' (image inputs of "
                                  "shape (1, 8, 8)); allowed for images: auto, cnn_small, conv3, resnet18_ee"),
    (["executor=sequential", "model.name=transformer4"], "model.name='transformer4' does not fit dataset 'digits'"),
    (["data.name=synthetic", "data.synthetic_shape=[1, 4, 4]", "model.name=resnet18_ee"],
     "model.name='resnet18_ee' needs H, W >= 8, got input shape (1, 4, 4); set model.name to cnn_small"),
])
def test_a_model_that_does_not_fit_the_data_stops_before_ray_starts(cli, sets, message):
    """One line naming model.name and what fits, rc 2, before Ray starts: no run directory, no Ray."""
    p = cli(*[a for s in sets for a in ("--set", s)])
    rc, _, err = _finish(p)
    assert rc == 2, err
    assert message in _one_error_line(err)
    assert not _ray_started(cli)
    assert not cli.runs.exists() or not any(cli.runs.iterdir())
    assert _no_leftovers(cli, p)


def test_debug_shows_the_traceback(cli):
    rc, _, err = _finish(cli("--debug", "simulate", "--set", "algorithm.name=fedfoo", "--no-progress"))
    assert rc == 2 and "Traceback" in err and "algorithm.name='fedfoo'" in err


def _wait_for_checkpoint(cli, proc: subprocess.Popen) -> Path:
    def ckpt() -> Path | None:
        runs = list(cli.runs.glob("t-*")) if cli.runs.exists() else []
        return rundir.latest_checkpoint(runs[0]) if runs else None

    assert wait_for(lambda: ckpt() is not None or proc.poll() is not None, timeout=300, interval=0.05)
    assert proc.poll() is None, _finish(proc)
    return ckpt().parent.parent  # type: ignore[union-attr]  # the wait above saw one


def _resume_and_check(cli, run_dir: Path, printed: str, rounds: int) -> None:
    """Resume with the exact command the CLI printed; the run completes every round once."""
    cmd = printed.split("resume with: ", 1)[1].split(")")[0].strip()
    argv = shlex.split(cmd)
    assert argv[:3] == ["cafe-ray", "simulate", "--resume"] and Path(argv[3]) == run_dir.resolve()
    p = cli(*argv[1:], "--no-progress")
    rc, out, err = _finish(p)
    assert rc == 0, err
    assert "resuming" in out and "Traceback" not in err
    assert [r["round"] for r in rundir.read_jsonl(run_dir / rundir.METRICS)] == list(range(rounds))
    assert rundir.read_summary(run_dir)["rounds"] == rounds
    assert not (run_dir / rundir.FAILED).exists()
    assert _no_leftovers(cli, p)


@pytest.mark.slow  # CLI runs stopped by a signal, then resumed
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_prints_where_and_resume_command(cli, how):
    rounds = 12
    p = cli(rounds=rounds)
    run_dir = _wait_for_checkpoint(cli, p)
    if how == "ctrl-c":
        os.killpg(p.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
    else:
        p.send_signal(signal.SIGTERM)
    rc, _, err = _finish(p, timeout=120)
    assert rc == (130 if how == "ctrl-c" else 143), err
    line = _one_error_line(err)
    assert ("interrupted (Ctrl-C)" if how == "ctrl-c" else "terminated (SIGTERM)") in line
    assert f"of {rounds} rounds; the last checkpoint holds" in line
    assert _no_leftovers(cli, p)
    ckpt = rundir.latest_checkpoint(run_dir)
    tensors, state = rundir.read_checkpoint(ckpt)  # intact and readable
    assert tensors and state["round"] >= 0
    assert rundir.read_failure(run_dir)["reason"].startswith(("interrupted", "terminated"))
    if how == "ctrl-c":
        _resume_and_check(cli, run_dir, line, rounds)


@pytest.mark.slow  # a CLI run killed with -9, the reaper, then a resume
def test_kill9_leaves_no_ray_processes_and_resumes(cli):
    rounds = 10
    p = cli(rounds=rounds)
    run_dir = _wait_for_checkpoint(cli, p)
    assert session_pids(cli.ray_tmp)  # a local Ray is running for it
    p.kill()
    p.wait()
    assert _no_leftovers(cli, p)  # the watchdog removed Ray's agents too
    assert rundir.read_checkpoint(rundir.latest_checkpoint(run_dir))[0]
    _resume_and_check(cli, run_dir, f"resume with: cafe-ray simulate --resume {run_dir}", rounds)


@pytest.mark.slow  # CLI runs on a filled tmpfs, then a resume
def test_full_disk_stops_cleanly_and_resumes(cli, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    # Room for the run's checkpoints on its own; the filler below takes the rest.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        cli.runs = mnt / "runs"
        rounds = 12
        p = cli("--set", f"output_dir={cli.runs}", rounds=rounds)
        run_dir = _wait_for_checkpoint(cli, p)
        filler = mnt / "filler"
        try:  # fill the disk while the run goes on (it may already be full: opening fails)
            with filler.open("wb") as f:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        rc, _, err = _finish(p, timeout=300)
        assert rc == 2, err
        line = _one_error_line(err)
        assert f"output_dir={cli.runs}: the disk is full" in line and "resume with:" in line
        assert _no_leftovers(cli, p)
        ckpt = rundir.latest_checkpoint(run_dir)
        assert rundir.read_checkpoint(ckpt)[0]  # the last complete checkpoint survived
        assert not list((run_dir / "checkpoints").glob(".tmp_*"))  # no half-written one kept
        filler.unlink(missing_ok=True)
        _resume_and_check(cli, run_dir, line, rounds)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_validate_checks_data_and_clients_like_simulate(tmp_path, monkeypatch):
    monkeypatch.setenv("CAFE_RAY_OFFLINE", "1")
    p = tmp_path / "c.yaml"
    p.write_text(f"output_dir: {tmp_path / 'runs'}\ndata: {{name: digits, num_clients: 5000}}\n")
    r = runner.invoke(app, ["validate", str(p)])
    assert r.exit_code == 2 and "data.num_clients=5000 exceeds the 1438 training samples" in r.output
    r = runner.invoke(app, ["validate", str(p), "--set", "data.name=cifar10", "--set", f"data.root={tmp_path}"])
    assert r.exit_code == 2 and "data.name=cifar10: CIFAR-10 not found" in r.output
    r = runner.invoke(app, ["validate", str(p), "--set", "data.num_clients=200"])
    assert r.exit_code == 0 and "min_size=10 is infeasible for 1438 samples over 200 clients" in r.output
    assert not (tmp_path / "runs").exists()  # validate leaves nothing behind


def test_doctor_reports_without_starting_ray(cli, tmp_path):
    from tests.data.conftest import make_cifar10

    make_cifar10(tmp_path / "data")
    rc, out, err = _finish(cli("doctor", "--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path)))
    assert rc == 0, err
    for item in ("python", "torch", "ray", "2.60.0", "output_dir", "GiB free", "a local Ray (not started) would get CPU="):
        assert item in out, item
    (row,) = [ln for ln in out.splitlines() if "dataset cifar10 " in ln]
    assert f"found {tmp_path / 'data' / 'cifar-10-batches-py'}" in row
    assert "dataset cifar100" in out and "not found" in out
    assert not _ray_started(cli)


def test_doctor_says_which_device_each_class_would_train_on(tmp_path):
    import torch

    from cafe_ray.commands.doctor import class_devices

    rows = dict(class_devices(Path("simulations/quickstart.yaml"), ["profiles.classes.edge_gpu.num_gpus=0.25"]))
    assert rows["phone"] == "num_gpus=0: cpu (no GPU reserved)"
    gpu = "num_gpus=0.25: cuda:0 (GPU 0)" if torch.cuda.is_available() else (
        "num_gpus=0.25: cpu (GPU 0 reserved but torch sees 0 CUDA device(s)")
    assert rows["edge_gpu"].startswith(gpu), rows
    r = runner.invoke(app, ["doctor", "--output-dir", str(tmp_path), "--config", "simulations/quickstart.yaml"])
    assert r.exit_code == 0 and "class edge_gpu trains on" in r.output, r.output
    r = runner.invoke(app, ["doctor", "--output-dir", str(tmp_path), "--config", "simulations/quickstart.yaml",
                            "--set", "engine.gpu_standin=gpu"])
    assert r.exit_code == 2 and "engine.gpu_standin" in r.output
