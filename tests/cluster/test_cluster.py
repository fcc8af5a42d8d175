"""cluster.yaml and cluster-local.yaml against Ray's validator and `cafe-ray cluster check`
(images, GPUs, device classes), and a real multi-node Ray cluster on this machine (`ray start`
raylets as subprocesses) running a simulation through its address. docs/scale-out.md explains
both files."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cafe_ray.cli import app
from cafe_ray.cluster.check import check_cluster, image_info, wheels_glibc
from cafe_ray.config import load_config
from cafe_ray.runs import rundir
from cafe_ray.sim.profiles import resolve_catalog
from tests.cluster.fake import free_ports

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
IOT_MIX = ROOT / "simulations" / "cluster_iot_mix.yaml"
UBUNTU_1804_SSM = "resolve:ssm:/aws/service/canonical/ubuntu/server/18.04/stable/current/amd64/hvm/ebs-gp2/ami-id"


# --------------------------------------------------------------- cluster.yaml
def _cluster_yaml(name: str = "cluster.yaml") -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _write(tmp_path: Path, raw: dict, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _check(path: Path, **kw):
    kw.setdefault("constraints", ROOT / "constraints.txt")
    return check_cluster(path, **kw)


def test_cluster_yaml_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _cluster_yaml()
    cfg = prepare_config(copy.deepcopy(raw))  # what `ray up` does before validating
    validate_config(cfg)
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in cfg["available_node_types"]


def test_ray_validator_rejects_a_broken_cluster_yaml():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = _cluster_yaml()
    bad["available_node_types"]["gpu_edge"]["instance"] = "g5.xlarge"  # not a node-type field
    with pytest.raises(jsonschema.ValidationError, match="instance"):
        validate_config(prepare_config(bad))


def test_cluster_yaml_installs_like_make_install_and_pins_an_image_per_node_type():
    raw = _cluster_yaml()
    assert any("setup-node.sh head" in c for c in raw["head_setup_commands"])
    assert any("setup-node.sh worker" in c for c in raw["worker_setup_commands"])
    script = (ROOT / "cafe_ray" / "cluster" / "setup-node.sh").read_text()
    assert 'pip" install -q "${src[@]}" -c "$CONSTRAINTS" -e "$REPO"' in script  # as `make install`, from the cache
    make = (ROOT / "Makefile").read_text()
    assert "pip install -q -c constraints.txt -e" in make  # what `make install` runs
    assert raw["file_mounts"]["~/cafe-ray"] == "."
    assert any("cafe-ray/data" in remote for remote in raw["file_mounts"])
    types = raw["available_node_types"]
    for name, t in types.items():
        info = image_info(t["node_config"]["ImageId"])
        assert info is not None and info.os in ("ubuntu22.04", "ubuntu24.04"), name
    assert any(t["node_config"]["InstanceType"].startswith(("g4dn", "g5", "g6", "p4", "p5"))
               for t in types.values()), "a GPU node type"
    assert all(t.get("min_workers", 0) == 0 for n, t in types.items() if n != raw["head_node_type"])
    assert raw["idle_timeout_minutes"] > 0


def test_device_classes_can_target_the_resources_cluster_nodes_advertise():
    """The pinning documented in docs/scale-out.md asks only for advertised resources."""
    advertised = {r for t in _cluster_yaml()["available_node_types"].values() for r in t.get("resources", {})}
    cfg = load_config(IOT_MIX)
    wanted = {r for c in resolve_catalog(cfg.profiles).classes for r in c.resources}
    assert wanted == {"iot", "edge_gpu"} and wanted <= advertised


# ------------------------------------------------------------ cluster check
def test_check_passes_on_the_shipped_files():
    rep = _check(ROOT / "cluster.yaml", configs=[load_config(IOT_MIX)])
    assert rep.ok, rep.errors
    assert any("every device class" in n for n in rep.notes)
    local = _check(ROOT / "cluster-local.yaml", vouched={"hosts": "ubuntu22.04"},
                   configs=[load_config(ROOT / "simulations" / "quickstart.yaml",
                                        ["profiles.classes.phone.resources={iot: 1}"])])
    assert local.ok, local.errors


def test_cli_cluster_check_passes_on_the_shipped_cluster_yaml():
    r = CliRunner().invoke(app, ["cluster", "check", str(ROOT / "cluster.yaml"), "--config", str(IOT_MIX)])
    assert r.exit_code == 0, r.output
    assert "ready for `ray up`" in r.output


@pytest.mark.parametrize("image", ["", UBUNTU_1804_SSM, "ami-0a2b85e15b7c0ac34"])  # none = Ray's default DLAMI
def test_check_fails_on_an_ubuntu_1804_image_naming_glibc(tmp_path, image):
    raw = _cluster_yaml()
    for t in raw["available_node_types"].values():
        if image:
            t["node_config"]["ImageId"] = image
        else:
            del t["node_config"]["ImageId"]
    rep = _check(_write(tmp_path, raw))
    assert not rep.ok
    text = "\n".join(rep.errors)
    assert "'gpu_edge'" in text and "ubuntu18.04" in text and "glibc 2.27" in text and ">= 2.28" in text
    assert "'hosts'" not in text
    if not image:  # said as what it is
        assert "Ray's default image (no ImageId)" in text
    r = CliRunner().invoke(app, ["cluster", "check", str(tmp_path / "cluster.yaml"),
                                 "--constraints", str(ROOT / "constraints.txt")])
    assert r.exit_code == 1 and "ubuntu18.04" in r.output


def test_check_fails_when_a_class_is_not_advertised(tmp_path):
    raw = _cluster_yaml()
    raw["available_node_types"]["gpu_edge"]["resources"] = {}
    path = _write(tmp_path, raw)
    rep = _check(path, configs=[load_config(IOT_MIX)])
    assert not rep.ok
    assert any("'edge_gpu'" in e and "edge_gpu: 1" in e and "no node type advertises it" in e for e in rep.errors)
    r = CliRunner().invoke(app, ["cluster", "check", str(path), "--config", str(IOT_MIX),
                                 "--constraints", str(ROOT / "constraints.txt")])
    assert r.exit_code == 1 and "edge_gpu" in r.output


def test_check_refuses_unknown_images_unless_vouched_for(tmp_path):
    raw = _cluster_yaml()
    raw["available_node_types"]["cpu_iot"]["node_config"]["ImageId"] = "ami-0123456789abcdef0"
    path = _write(tmp_path, raw)
    rep = _check(path)
    assert any("unknown image 'ami-0123456789abcdef0'" in e and "--os" in e for e in rep.errors)
    assert _check(path, vouched={"ami-0123456789abcdef0": "ubuntu24.04"}).ok
    old = _check(path, vouched={"ami-0123456789abcdef0": "ubuntu20.04"})
    assert old.ok  # glibc 2.31 >= 2.28
    with pytest.raises(ValueError, match="unknown OS"):
        _check(path, vouched={"ami-0123456789abcdef0": "windows"})


def test_check_fails_on_a_gpu_the_torch_build_does_not_support(tmp_path):
    raw = _cluster_yaml()
    raw["available_node_types"]["gpu_edge"]["node_config"]["InstanceType"] = "p3.2xlarge"  # V100, sm_70
    rep = _check(_write(tmp_path, raw))
    assert any("'gpu_edge'" in e and "V100" in e and "CUDA 13" in e for e in rep.errors), rep.errors


def test_check_fails_on_a_gpu_image_without_a_driver(tmp_path):
    raw = _cluster_yaml()
    ssm = "resolve:ssm:/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
    raw["available_node_types"]["gpu_edge"]["node_config"]["ImageId"] = ssm
    rep = _check(_write(tmp_path, raw))
    assert [e for e in rep.errors if "ships no NVIDIA driver" in e and "'gpu_edge'" in e], rep.errors


def test_check_needs_the_os_of_on_prem_hosts_and_reads_their_resources():
    rep = _check(ROOT / "cluster-local.yaml")
    assert any("--os hosts=" in e for e in rep.errors)
    cfg = load_config(ROOT / "simulations" / "quickstart.yaml", ["profiles.classes.phone.resources={nope: 1}"])
    rep = _check(ROOT / "cluster-local.yaml", vouched={"hosts": "ubuntu24.04"}, configs=[cfg])
    assert any("'phone'" in e and "nope: 1" in e for e in rep.errors), rep.errors


def test_check_passes_the_shipped_workers_because_the_head_pins_them_at_bring_up():
    rep = _check(ROOT / "cluster.yaml")
    assert rep.ok, rep.errors
    assert sum("pinned at bring-up to the head's own AMI" in n for n in rep.notes) == 2  # cpu_iot, gpu_edge


def test_check_fails_on_a_worker_resolve_ssm_image_without_the_permission(tmp_path):
    raw = _cluster_yaml()
    raw["head_setup_commands"] = [c for c in raw["head_setup_commands"] if "pin-image" not in c]
    rep = _check(_write(tmp_path, raw))
    errs = [e for e in rep.errors if "ssm:GetParameters" in e]
    assert {e.split("'")[1] for e in errs} == {"cpu_iot", "gpu_edge"}, rep.errors
    assert all("cafe-ray cluster pin-image" in e and "--from-instance" in e for e in errs)
    # pinned at bring-up, but one worker type on another parameter than the head's: that one fails
    raw = _cluster_yaml()
    raw["available_node_types"]["cpu_iot"]["node_config"]["ImageId"] = (
        "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id")
    rep = _check(_write(tmp_path, raw))
    assert [e.split("'")[1] for e in rep.errors if "ssm:GetParameters" in e] == ["cpu_iot"], rep.errors
    # a head instance profile of your own: its policy cannot be read here, so a warning says what it needs
    raw = _cluster_yaml()
    raw["head_setup_commands"] = [c for c in raw["head_setup_commands"] if "pin-image" not in c]
    raw["available_node_types"]["head"]["node_config"]["IamInstanceProfile"] = {"Name": "cafe-ray-head"}
    rep = _check(_write(tmp_path, raw))
    assert rep.ok, rep.errors
    assert any("ssm:GetParameters" in w and "'gpu_edge'" in w for w in rep.warnings)


def test_check_fails_on_a_gpu_node_type_with_a_cpu_torch_build(tmp_path):
    cpu = tmp_path / "constraints.txt"
    cpu.write_text("".join(line + "\n" for line in (ROOT / "constraints.txt").read_text().splitlines()
                           if not line.startswith(("nvidia-", "cuda-"))))
    rep = check_cluster(ROOT / "cluster.yaml", constraints=cpu)
    errs = [e for e in rep.errors if "CPU build" in e]
    assert len(errs) == 1 and "'gpu_edge' has a A10G GPU" in errs[0] and "torch 2.14.1" in errs[0], rep.errors
    r = CliRunner().invoke(app, ["cluster", "check", str(ROOT / "cluster.yaml"), "--constraints", str(cpu)])
    assert r.exit_code == 1 and "CPU build" in r.output


def _fake_resolver(calls: list):
    def resolve(region: str, names: list[str]) -> dict[str, str]:
        calls.append((region, list(names)))
        return {n: "ami-0123456789abcdef0" for n in names}
    return resolve


def test_pin_image_writes_the_resolved_ami_and_check_still_knows_its_os(tmp_path, monkeypatch):
    from cafe_ray.cluster import images

    path = tmp_path / "cluster.yaml"
    path.write_text((ROOT / "cluster.yaml").read_text())
    calls: list = []
    monkeypatch.setattr(images, "ssm_resolver", _fake_resolver(calls))
    r = CliRunner().invoke(app, ["cluster", "pin-image", str(path)])
    assert r.exit_code == 0, r.output
    assert calls == [("us-west-2", ["/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/"
                                    "latest/ami-id"])]  # one parameter, asked once
    text = path.read_text()
    assert "ImageId: resolve:ssm:" not in text and text.count("ImageId: ami-0123456789abcdef0  # pinned from") == 3
    assert text.startswith("# cafe-ray on AWS")  # comments kept
    rep = _check(path, configs=[load_config(IOT_MIX)])
    assert rep.ok, rep.errors  # no --os needed: the pin comment names the image family
    assert not any("ssm:GetParameters" in e for e in rep.errors)
    r = CliRunner().invoke(app, ["cluster", "pin-image", str(path)])
    assert r.exit_code == 0 and "no resolve:ssm: image to pin" in r.output and len(calls) == 1


def test_pin_image_refuses_a_parameter_that_is_not_an_ami(tmp_path):
    from cafe_ray.cluster.images import pin_file

    path = tmp_path / "cluster.yaml"
    path.write_text((ROOT / "cluster.yaml").read_text())
    with pytest.raises(ValueError, match="not an AMI id"):
        pin_file(path, lambda region, names: {n: "" for n in names})
    assert path.read_text() == (ROOT / "cluster.yaml").read_text()  # untouched


def test_pin_image_from_instance_gives_workers_the_heads_ami_over_imds(tmp_path, monkeypatch):
    """The head's own AMI id from a local stand-in of the EC2 metadata service (IMDSv2, real HTTP)."""
    import http.server
    import threading

    class Imds(http.server.BaseHTTPRequestHandler):
        def do_PUT(self):
            ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
            self._send(200 if ok else 400, b"tok")

        def do_GET(self):
            ok = self.path == "/latest/meta-data/ami-id" and self.headers.get("X-aws-ec2-metadata-token") == "tok"
            self._send(200 if ok else 401, b"ami-0fedcba9876543210")

        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    from ray.autoscaler._private.util import prepare_config

    boot = tmp_path / "ray_bootstrap_config.yaml"
    boot.write_text(json.dumps(prepare_config(_cluster_yaml())))  # as `ray up` writes it on the head
    srv = http.server.HTTPServer(("127.0.0.1", 0), Imds)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("CAFE_RAY_IMDS_URL", f"http://127.0.0.1:{srv.server_address[1]}")
        r = CliRunner().invoke(app, ["cluster", "pin-image", str(boot), "--from-instance"])
    finally:
        srv.shutdown()
    assert r.exit_code == 0, r.output
    types = json.loads(boot.read_text())["available_node_types"]
    assert types["cpu_iot"]["node_config"]["ImageId"] == types["gpu_edge"]["node_config"]["ImageId"] == (
        "ami-0fedcba9876543210")
    assert types["head"]["node_config"]["ImageId"].startswith("resolve:ssm:")  # launched by `ray up`: untouched
    monkeypatch.setenv("CAFE_RAY_IMDS_URL", "http://127.0.0.1:1")  # not on EC2: one line, rc 2
    r = CliRunner().invoke(app, ["cluster", "pin-image", str(boot), "--from-instance"])
    assert r.exit_code == 2 and "no instance metadata" in r.output


@pytest.mark.slow  # the node set-up script waiting out a held dpkg lock
def test_setup_node_waits_for_the_dpkg_lock(tmp_path):
    script = ROOT / "cafe_ray" / "cluster" / "setup-node.sh"
    lock = tmp_path / "lock-frontend"
    lock.touch()
    holder = subprocess.Popen(["flock", str(lock), "sleep", "4"])  # another apt, as at first boot
    try:
        time.sleep(0.5)
        env = {**os.environ, "APT_LOCKS": str(lock), "APT_WAIT_S": "60"}
        start = time.monotonic()
        res = subprocess.run(["bash", str(script), "wait-apt"], env=env, capture_output=True, text=True, timeout=90)
        assert res.returncode == 0, res.stdout + res.stderr
        assert time.monotonic() - start >= 2.5 and "waiting for another apt/dpkg" in res.stdout
    finally:
        holder.wait(timeout=30)
    holder = subprocess.Popen(["flock", str(lock), "sleep", "30"])
    try:
        time.sleep(0.5)
        env = {**os.environ, "APT_LOCKS": str(lock), "APT_WAIT_S": "3"}
        res = subprocess.run(["bash", str(script), "wait-apt"], env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 1 and "still locked after 3s" in res.stdout
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_check_reports_rays_schema_errors(tmp_path):
    raw = _cluster_yaml()
    raw["max_wokers"] = 3
    rep = _check(_write(tmp_path, raw))
    assert not rep.ok and "schema" in rep.errors[0] and "max_wokers" in rep.errors[0]


def test_wheels_glibc_comes_from_the_installed_wheel_tags():
    need, who = wheels_glibc(["torch", "torchvision", "pyarrow", "numpy"])
    assert need == (2, 28) and "torch" in who
    assert wheels_glibc(["no-such-package"]) == ((2, 17), [])


# ---------------------------------------------------------- local multi-node
_TOKEN = uuid.uuid4().hex  # this test cluster's own auth token, shared by its processes only


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=_TOKEN)
    return env


def _wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    raise RuntimeError(f"`ray start` did not come up:\n{path.read_text(errors='replace')[-3000:]}")


def _node_args(temp: str) -> list[str]:
    nm, om, al, ag, re_, me = free_ports(6)
    return ["--block", "--num-cpus=1", f"--temp-dir={temp}",
            f"--node-manager-port={nm}", f"--object-manager-port={om}",
            f"--dashboard-agent-listen-port={al}", f"--dashboard-agent-grpc-port={ag}",
            f"--runtime-env-agent-port={re_}", f"--metrics-export-port={me}",
            "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats"]


@contextlib.contextmanager
def local_cluster(worker_resources: list[dict[str, float]]):
    """A head raylet plus one raylet per entry, each its own `ray start --block` process.

    Own temp dir and ports; stopped by SIGTERM to exactly these processes (never
    `ray stop`, which would stop every Ray on the machine).
    """
    temp = tempfile.mkdtemp(prefix="crmn", dir="/tmp")  # short: unix socket paths are limited
    logs = Path(temp)
    gcs, client = free_ports(2)
    address = f"127.0.0.1:{gcs}"
    procs: list[subprocess.Popen] = []

    def launch(args: list[str], name: str) -> None:
        log = logs / f"{name}.log"
        with log.open("w") as f:
            procs.append(subprocess.Popen([str(BIN / "ray"), "start", *args], stdout=f, stderr=subprocess.STDOUT,
                                          env=_env(), start_new_session=True))
        _wait_for_text(log, "Ray runtime started", procs[-1], timeout=60)

    try:
        launch(["--head", f"--port={gcs}", f"--ray-client-server-port={client}", "--include-dashboard=false",
                '--resources={"head_only": 1}', *_node_args(temp)], "head")
        for i, res in enumerate(worker_resources):
            launch([f"--address={address}", f"--resources={json.dumps(res)}", *_node_args(temp)], f"worker{i}")
        yield address
    finally:
        for p in reversed(procs):  # workers first, the head (GCS) last
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=5)
            with contextlib.suppress(ProcessLookupError):  # leftovers of exactly this node's group
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


_NODES_SCRIPT = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
end = time.time() + 30
while time.time() < end:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) >= int(sys.argv[2]):
        break
    time.sleep(0.5)
print(json.dumps([{"id": n["NodeID"], "resources": n["Resources"]} for n in nodes]))
"""


def _nodes(address: str, expect: int) -> list[dict]:
    out = subprocess.run([str(BIN / "python"), "-c", _NODES_SCRIPT, address, str(expect)], env=_env(),
                         capture_output=True, text=True, timeout=90, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _tiny(tmp_path: Path, name: str, clients: int, **top) -> Path:
    """A small fedavg_ee config on digits, written to tmp_path/<name>.yaml."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "seed": 0, "output_dir": str(tmp_path / "runs"),
        "data": {"name": "digits", "num_clients": clients, "partition": {"kind": "iid"}},
        "model": {"name": "cnn_small", "width": 8}, "algorithm": {"name": "fedavg_ee"}, **top}))
    return path


@pytest.mark.slow  # three `ray start` raylets and a CLI run through their address: minutes
def test_multi_node_simulation_pins_a_device_class_to_the_node_that_advertises_it(tmp_path):
    base = _tiny(tmp_path, "multinode", 10, train={"local_epochs": 1, "batch_size": 32, "max_steps": 5},
                 round={"num_rounds": 2, "fraction": 1.0, "eval_every": 2}, profiles={"catalog": "iot_mix"})
    with local_cluster([{"pinned": 2}]) as address:
        nodes = _nodes(address, expect=2)
        assert len(nodes) == 2
        pinned = [n["id"] for n in nodes if n["resources"].get("pinned")]
        head = [n["id"] for n in nodes if n["resources"].get("head_only")]
        assert len(pinned) == 1 and len(head) == 1
        # edge_gpu clients ask for the custom resource only the worker raylet advertises,
        # phones and single-board computers for the one only the head advertises
        sets = ["profiles.classes.edge_gpu.resources={pinned: 1}", "profiles.classes.edge_gpu.num_cpus=0.5",
                "profiles.classes.edge_gpu.actors=2",
                "profiles.classes.phone.resources={head_only: 0.5}", "profiles.classes.phone.num_cpus=0.5",
                "profiles.classes.phone.actors=1",
                "profiles.classes.single_board.resources={head_only: 0.5}",
                "profiles.classes.single_board.num_cpus=0.5", "profiles.classes.single_board.actors=1"]
        cmd = [str(BIN / "cafe-ray"), "simulate", str(base), "--address", address, "--no-progress"]
        for s in sets:
            cmd += ["--set", s]
        res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=150, cwd=tmp_path)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run_dir = next((tmp_path / "runs").glob("multinode-*"))
    recs = [r for r in rundir.read_jsonl(run_dir / "clients.jsonl") if r["status"] == "ok"]
    by_class: dict[str, set] = {}
    for r in recs:
        by_class.setdefault(r["resource_class"], set()).add(r["node_id"])
    assert by_class.get("edge_gpu") == {pinned[0]}, by_class
    assert by_class.get("phone") == {head[0]} and by_class.get("single_board") == {head[0]}, by_class
    assert all(r["actor_resources"].get("pinned") == 1 for r in recs if r["resource_class"] == "edge_gpu")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["acc_avg_exit"] is not None


# ------------------------------------------------------- unreachable --address
def test_simulate_with_an_address_nobody_listens_on_fails_fast_in_one_line(tmp_path):
    cfg = _tiny(tmp_path, "nowhere", 4, round={"num_rounds": 1})
    start = time.monotonic()
    res = subprocess.run([str(BIN / "cafe-ray"), "simulate", str(cfg), "--address", "127.0.0.1:1", "--no-progress"],
                         env=_env(), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    took = time.monotonic() - start
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert res.returncode == 2, res.stdout + res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: --address 127.0.0.1:1: cannot reach"), lines
    assert "ray start --head" in lines[0] and "ray status" in lines[0]
    assert took < 30, took
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(("address", "expect"), [
    ("127.0.0.1:6380", ("127.0.0.1", 6380)), ("ray://head.example:10002", ("head.example", 10002)),
    ("ray://head", ("head", 10001)), ("10.0.0.5", ("10.0.0.5", 6379)), ("[::1]:7000", ("::1", 7000)),
    ("auto", None), ("local", None)])
def test_addresses_name_a_host_and_port(address, expect):
    from cafe_ray.sim.reach import split_address

    assert split_address(address) == expect


def test_an_address_with_a_listener_passes_and_a_bad_port_is_named():
    import socket

    from cafe_ray.sim.reach import UnreachableAddressError, check_reachable

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        check_reachable(f"127.0.0.1:{srv.getsockname()[1]}")  # something answers: Ray takes over
    with pytest.raises(UnreachableAddressError, match="port 'x' is not a number"):
        check_reachable("127.0.0.1:x")


TEN_NODES = ["profiles.classes.phone.actors=64", "profiles.classes.single_board.actors=64",
             "profiles.classes.edge_gpu.actors=12"]


def test_check_sizes_the_pools_in_nodes_and_warns_when_max_workers_is_too_low(tmp_path):
    from cafe_ray.cluster.check import pool_nodes

    assert pool_nodes(load_config(IOT_MIX), _cluster_yaml()) == {"cpu_iot": 2, "gpu_edge": 2}
    ten = load_config(IOT_MIX, TEN_NODES)
    assert pool_nodes(ten, _cluster_yaml()) == {"cpu_iot": 6, "gpu_edge": 3}  # the guide's ten-node example
    rep = _check(ROOT / "cluster.yaml", configs=[ten])
    assert rep.ok and any("cpu_iot x6" in n and "gpu_edge x3" in n and "10 nodes" in n for n in rep.notes)
    raw = _cluster_yaml()
    raw["available_node_types"]["gpu_edge"]["max_workers"] = 2
    raw["max_workers"] = 8
    rep = _check(_write(tmp_path, raw), configs=[ten])
    assert any("3 gpu_edge nodes but gpu_edge.max_workers is 2" in w for w in rep.warnings), rep.warnings
    assert any("9 worker nodes but max_workers is 8" in w for w in rep.warnings), rep.warnings
