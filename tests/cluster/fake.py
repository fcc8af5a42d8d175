"""A real autoscaling Ray cluster on this machine: Ray's fake multi-node provider.

The head is one `ray start --head --block --autoscaling-config=...` process with
``RAY_FAKE_CLUSTER=1``; its autoscaler (the monitor) launches worker "nodes" as more
raylets on this machine, exactly as a cloud provider would launch instances, and
terminates them when idle. Own temp dir, ports and auth token; stopped by killing
exactly the processes of its own session (never `ray stop`, which would stop every
Ray on the machine, and not ``AutoscalingCluster``, which calls `ray stop --force`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class FakeCluster:
    address: str
    env: dict[str, str]
    temp: Path
    head: subprocess.Popen
    log: Path
    extra: dict = field(default_factory=dict)

    def session_pids(self) -> list[int]:
        """Every live process of this cluster: the head's session (the raylets the
        autoscaler launches are children of its monitor and stay in that session)."""
        sid = self.head.pid
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            with contextlib.suppress(OSError, ProcessLookupError):
                if os.getsid(int(d.name)) == sid:
                    pids.append(int(d.name))
        return pids

    def raylet_pid(self, node_id: str) -> int:
        """PID of the raylet of ``node_id`` (a fake node id is passed on its command line)."""
        for pid in self.session_pids():
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if any(c.endswith(b"/raylet") for c in cmd[:1]) and any(node_id.encode() in c for c in cmd):
                    return pid
        raise LookupError(f"no raylet of node {node_id} in session {self.head.pid}")


def _fake_config(gcs: str, head_resources: dict, worker_types: dict, idle_timeout_minutes: float) -> dict:
    return {
        "cluster_name": f"fake-{uuid.uuid4().hex[:6]}",
        "max_workers": sum(t.get("max_workers", 1) for t in worker_types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "gcs_address": gcs, "disable_launch_config_check": True,
                     "disable_node_updaters": True,
                     "use_node_id_as_ip": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0},
            **worker_types,
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@contextlib.contextmanager
def fake_autoscaling_cluster(head_resources: dict, worker_types: dict,
                             idle_timeout_minutes: float = 5.0) -> Iterator[FakeCluster]:
    """Head with ``head_resources`` (CPU included) plus autoscaled ``worker_types``."""
    temp = Path(tempfile.mkdtemp(prefix="crfk", dir="/tmp"))  # short: unix socket paths are limited
    gcs_port, client, nm, om, al, ag, re_, me, dash = free_ports(9)
    address = f"127.0.0.1:{gcs_port}"
    cfg_path = temp / "autoscaler.json"
    cfg_path.write_text(json.dumps(_fake_config(address, {k: v for k, v in head_resources.items()},
                                                worker_types, idle_timeout_minutes)))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex,
               RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    res = dict(head_resources)
    cpus = res.pop("CPU", 1)
    log = temp / "head.log"
    with log.open("w") as f:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", f"--num-cpus={cpus}",
             f"--resources={json.dumps(res)}", f"--autoscaling-config={cfg_path}", f"--temp-dir={temp}",
             f"--ray-client-server-port={client}", "--include-dashboard=false", f"--dashboard-port={dash}",
             f"--node-manager-port={nm}", f"--object-manager-port={om}",
             f"--dashboard-agent-listen-port={al}", f"--dashboard-agent-grpc-port={ag}",
             f"--runtime-env-agent-port={re_}", f"--metrics-export-port={me}",
             "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats"],
            stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    cluster = FakeCluster(address, env, temp, head, log)
    try:
        end = time.time() + 90
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if head.poll() is not None or time.time() > end:
                raise RuntimeError(f"fake cluster head did not come up:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)
        yield cluster
    finally:
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                head.wait(timeout=30)
        for pid in cluster.session_pids():  # raylets the autoscaler launched, leftovers
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=5)
        shutil.rmtree(temp, ignore_errors=True)
