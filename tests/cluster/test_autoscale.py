"""Simulations that make a real Ray autoscaler add nodes (Ray's fake multi-node provider
on this machine: the autoscaler launches and kills raylets exactly as it would cloud
instances), a worker node killed mid-run, and an exact resume afterwards.

Each test starts its own head with 1 CPU plus a worker type (1 CPU) with
``min_workers: 0``; only that worker type advertises the ``remote_dev`` resource.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from cafe_ray.runs import rundir
from tests.cluster.fake import BIN, FakeCluster, fake_autoscaling_cluster

WORKER_TYPES = {"remote": {"resources": {"CPU": 1, "remote_dev": 2}, "node_config": {},
                           "min_workers": 0, "max_workers": 1}}
HEAD = {"CPU": 1, "head_only": 1}

_NODES = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
print(json.dumps([{"id": n["NodeID"], "resources": n["Resources"]} for n in ray.nodes() if n["Alive"]]))
"""


def _nodes(c: FakeCluster) -> list[dict]:
    out = subprocess.run([str(BIN / "python"), "-c", _NODES, c.address], env=c.env, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _config(tmp_path: Path, *, remote: int, local: int, **top) -> Path:
    """A trace catalog with two classes: ``local`` (head CPUs) and ``remote`` (needs remote_dev)."""
    trace = tmp_path / "devices.json"
    trace.write_text(json.dumps({"devices": [
        {"computation": 5.0, "communication": 20000.0, "class": "remote"} for _ in range(remote)] + [
        {"computation": 20.0, "communication": 5000.0, "class": "local"} for _ in range(local)]}))
    raw = {
        "name": "auto", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "data": {"name": "digits", "num_clients": remote + local, "partition": {"kind": "iid"}},
        "model": {"name": "cnn_small", "width": 8}, "algorithm": {"name": "fedavg_ee"},
        "train": {"local_epochs": 1, "batch_size": 32, "max_steps": 4},
        "round": {"num_rounds": 2, "fraction": 1.0, "eval_every": 2},
        "profiles": {"catalog": str(trace), "autoscale_timeout_s": 240, "classes": {
            "remote": {"resources": {"remote_dev": 1}, "num_cpus": 0.5, "actors": 1},
            "local": {"num_cpus": 0.5, "actors": 1}}},
    }
    for k, v in top.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _simulate(c: FakeCluster, args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "cafe-ray"), "simulate", *args, "--address", c.address, "--no-progress"],
                            env=c.env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


IDLE_S = 20  # the cluster's idle_timeout_minutes, in seconds


@pytest.mark.slow  # a real autoscaler launching and idling a raylet: minutes
def test_simulate_makes_the_autoscaler_launch_the_node_a_class_needs_then_it_goes_when_idle(tmp_path):
    cfg = _config(tmp_path, remote=3, local=3)
    with fake_autoscaling_cluster(dict(HEAD), WORKER_TYPES, idle_timeout_minutes=IDLE_S / 60) as c:
        before = _nodes(c)
        assert len(before) == 1 and not any(n["resources"].get("remote_dev") for n in before)
        proc = _simulate(c, [str(cfg)], tmp_path)
        out, _ = proc.communicate(timeout=420)
        ended = time.monotonic()
        assert proc.returncode == 0, out[-4000:]
        after = _nodes(c)
        # the run withdrew its request and its actors are gone: the launched node is idle and the
        # autoscaler terminates it once idle_timeout_minutes have passed (not before)
        assert any(n["resources"].get("remote_dev") for n in after), after
        while any(n["resources"].get("remote_dev") for n in _nodes(c)):
            assert time.monotonic() - ended < IDLE_S + 120, "the idle node was never removed"
            time.sleep(2)
        gone_after = time.monotonic() - ended
        assert [n["id"] for n in _nodes(c)] == [before[0]["id"]]  # the head stays
    assert gone_after >= IDLE_S / 2, gone_after  # the node was idle from the run's end (give or take)
    assert "waiting for the autoscaler" in out, out[-2000:]
    launched = [n["id"] for n in after if n["resources"].get("remote_dev")]
    head = [n["id"] for n in after if n["resources"].get("head_only")]
    assert len(launched) == 1 and launched[0] != before[0]["id"]
    run_dir = next((tmp_path / "runs").glob("auto-*"))
    recs = rundir.read_jsonl(run_dir / "clients.jsonl")
    by_class: dict[str, set] = {}
    for r in recs:
        assert r["status"] == "ok", r
        by_class.setdefault(r["resource_class"], set()).add(r["node_id"])
    assert by_class == {"remote": {launched[0]}, "local": {head[0]}}
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 2


def _kill_node(c: FakeCluster, node_id: str) -> int:
    """SIGKILL every process of one fake node (its raylet and what the raylet started):
    the processes whose environment carries the node id the provider gave it."""
    marker = f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode()
    killed = 0
    for pid in c.session_pids():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in env:
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


_COMPARE_DROP = {"wall_s", "pid", "node_id", "actor_resources"}


def _rows(path: Path, rounds: set[int]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in _COMPARE_DROP}
            for r in rundir.read_jsonl(path) if r["round"] in rounds]


# two single-slot worker nodes: the remote pool's two actors land one per node
TWO_NODES = {"remote": {"resources": {"CPU": 1, "remote_dev": 1}, "node_config": {},
                        "min_workers": 0, "max_workers": 2}}


@pytest.mark.slow  # a real autoscaled cluster, a run, a kill and a resume: minutes
def test_a_worker_node_killed_mid_run_fails_its_clients_then_resume_is_exact(tmp_path):
    # fits on the remote nodes take long enough (many steps) that the kill lands while
    # some are in flight; rounds 0..3, evaluation at the end only, checkpoint every round.
    # The killed node does not come back (the fake provider, unlike a cloud, keeps counting
    # it as pending), so the run finishes on the surviving remote actor.
    cfg = _config(tmp_path, remote=8, local=2, train={"local_epochs": 10, "batch_size": 8, "max_steps": 150},
                  round={"num_rounds": 4, "fraction": 1.0, "eval_every": 4},
                  checkpoint={"every": 1, "keep": 10},
                  profiles={"autoscale_timeout_s": 30, "classes": {
                      "remote": {"resources": {"remote_dev": 1}, "num_cpus": 0.5, "actors": 2},
                      "local": {"num_cpus": 0.5, "actors": 1}}})
    with fake_autoscaling_cluster(dict(HEAD), TWO_NODES) as c:
        proc = _simulate(c, [str(cfg)], tmp_path)
        runs = tmp_path / "runs"
        killed_node = None
        end = time.time() + 300
        while time.time() < end and proc.poll() is None:
            run_dirs = list(runs.glob("auto-*")) if runs.exists() else []
            if run_dirs and any(r["round"] == 0 for r in rundir.read_jsonl(run_dirs[0] / "clients.jsonl")):
                # round 0 is logged, round 1's fits are being dispatched: kill the remote node
                remote = [r for r in rundir.read_jsonl(run_dirs[0] / "clients.jsonl")
                          if r["resource_class"] == "remote" and r["status"] == "ok"]
                killed_node = remote[0]["node_id"]
                assert _kill_node(c, killed_node) >= 1
                break
            time.sleep(0.1)
        assert killed_node is not None, "round 0 never finished"
        out, _ = proc.communicate(timeout=420)
        assert proc.returncode == 0, out[-4000:]

        run_dir = next(runs.glob("auto-*"))
        clients = rundir.read_jsonl(run_dir / "clients.jsonl")
        died = [r for r in clients if r["status"] == "failed"]
        assert died, "no client was in flight on the killed node"
        assert all(r["round"] == 1 and r["resource_class"] == "remote" and r["node_id"] == killed_node
                   and r["reason"].startswith("worker died") for r in died), died
        metrics = rundir.read_jsonl(run_dir / "metrics.jsonl")
        assert [m["round"] for m in metrics] == [0, 1, 2, 3]
        assert metrics[1]["failed"] == len(died) and metrics[1]["completed"] == 10 - len(died)
        assert all(m["failed"] == 0 for m in metrics if m["round"] != 1)
        # before the kill the remote class used both launched nodes, after it only the survivor
        first = {r["node_id"] for r in clients if r["round"] == 0 and r["resource_class"] == "remote"}
        later = {r["node_id"] for r in clients if r["round"] >= 2 and r["resource_class"] == "remote"}
        assert len(first) == 2 and killed_node in first
        assert len(later) == 1 and killed_node not in later
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["failed_total"] == len(died) and summary["rounds"] == 4

        # resume from the checkpoint of the round with the failures: rounds 2 and 3 again
        copy = tmp_path / "resumed"
        shutil.copytree(run_dir, copy)
        for ck in (copy / "checkpoints").glob("round_*"):
            if int(ck.name.rsplit("_", 1)[1]) > 1:
                shutil.rmtree(ck)
        proc = _simulate(c, ["--resume", str(copy)], tmp_path)
        out, _ = proc.communicate(timeout=420)
        assert proc.returncode == 0, out[-4000:]
    for name in (rundir.METRICS, rundir.CLIENTS, rundir.EVAL):
        assert _rows(copy / name, {0, 1, 2, 3}) == _rows(run_dir / name, {0, 1, 2, 3}), name
    resumed = json.loads((copy / "summary.json").read_text())
    for k in ("acc_exit", "acc_avg_exit", "acc_worst_client", "failed_total", "virtual_time_s",
              "cum_bytes_down", "cum_bytes_up"):
        assert resumed[k] == summary[k], k


# ------------------------------------------------------------ the pieces
def test_requests_and_growth_follow_the_classes():
    from cafe_ray.sim.autoscale import demand_bundles, fits_fully, grow_plan, shortfall, shrink_note
    from cafe_ray.sim.profiles import ResourceClass, check_fits

    phone = ResourceClass("phone", num_cpus=0.5, resources={"iot": 1}, actors=4)
    gpu = ResourceClass("edge_gpu", num_cpus=1, num_gpus=0.25, resources={"edge_gpu": 1}, actors=2)
    assert demand_bundles([phone, gpu]) == [{"CPU": 0.5, "iot": 1.0}] * 4 + [
        {"CPU": 1.0, "GPU": 0.25, "edge_gpu": 1.0}] * 2
    head_only = {"CPU": 4.0, "iot": 2.0}
    assert not fits_fully([phone], head_only)
    assert shortfall([phone, gpu], head_only) == {"iot": 2.0, "GPU": 0.5, "edge_gpu": 2.0}
    fitted = check_fits([phone], head_only)
    assert shrink_note([phone], fitted) == ("the cluster cannot host every client actor now; pools shrunk: "
                                            "phone 4 -> 2 (they grow again when nodes join)")
    assert shrink_note([phone], [phone]) is None
    # a node joins with 3 CPUs, 1 GPU, 4 edge_gpu, 1 iot: the pinned GPU actors first (2 CPUs),
    # then one phone (iot runs out before CPU does)
    joined = {"CPU": 3.0, "GPU": 1.0, "edge_gpu": 4.0, "iot": 1.0}
    assert grow_plan({"phone": 2, "edge_gpu": 0}, [phone, gpu], joined) == {"edge_gpu": 2, "phone": 1}
    assert grow_plan({"phone": 4, "edge_gpu": 2}, [phone, gpu], joined) == {}


def test_a_cluster_without_an_autoscaler_is_not_waited_for(ray_session):
    from cafe_ray.sim.autoscale import autoscaler_state, scale_for
    from cafe_ray.sim.profiles import ResourceClass

    assert not autoscaler_state().present  # ray.init(): Ray's read-only autoscaler
    said: list[str] = []
    big = ResourceClass("big", num_cpus=1, resources={"not_here": 1}, actors=3)
    available = scale_for([big], timeout_s=600, report=said.append)  # returns at once
    assert "not_here" not in available
    assert said and "no autoscaler manages this cluster" in said[0] and "not_here 3" in said[0]


def test_simulated_failures_have_an_explicit_null_node_and_a_reason(tmp_path):
    from cafe_ray.config import load_config
    from cafe_ray.sim.engine import run_simulation

    trace = tmp_path / "flaky.json"
    trace.write_text(json.dumps({"devices": [
        {"computation": 5.0, "communication": 20000.0, "failure_prob": 0.5} for _ in range(6)]}))
    cfg_path = tmp_path / "flaky.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "name": "flaky", "seed": 0, "output_dir": str(tmp_path / "runs"), "executor": "sequential",
        "data": {"name": "digits", "num_clients": 6, "partition": {"kind": "iid"}},
        "model": {"name": "cnn_small", "width": 8}, "algorithm": {"name": "fedavg_ee"},
        "train": {"local_epochs": 1, "batch_size": 32, "max_steps": 2},
        "round": {"num_rounds": 2, "fraction": 1.0, "eval_every": 2},
        "profiles": {"catalog": str(trace)}}))
    run_dir, _ = run_simulation(load_config(cfg_path), show_progress=False)
    rows = rundir.read_jsonl(run_dir / "clients.jsonl")
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and len(failed) < len(rows)
    assert all("node_id" in r and r["node_id"] is None and r["node_id_reason"].startswith("not dispatched")
               for r in failed)
