"""SIGTERM stops `cafe-ray serve` (its own local Ray) promptly, and no Ray or Serve process is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.serve.conftest import free_port, read_until

STOP_WITHIN_S = 10  # what `docker stop` and systemd give before SIGKILL


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.slow  # a `cafe-ray serve` process with its own Ray and Serve, then SIGTERM
def test_sigterm_stops_the_server_and_every_process_it_started(serve_run_dir):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["COLUMNS"] = "250"
    cmd = [str(Path(sys.executable).parent / "cafe-ray"), "serve", str(serve_run_dir), "--port", str(port),
           "--no-access-log"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        text = read_until(proc, lambda line: "Ctrl-C to stop" in line or "error:" in line)
        assert f"http://127.0.0.1:{port}" in text, text
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=60).json()["run"] == serve_run_dir.name
        started = psutil.Process(proc.pid).children(recursive=True)  # Ray's GCS, raylet, workers, Serve actors
        assert len(started) >= 3
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=STOP_WITHIN_S)
        took = time.monotonic() - t0
        assert rc == 0, (rc, proc.stdout.read()[-2000:])
        deadline = time.monotonic() + 5  # a child may still be exiting as its parent returns
        while _alive(started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(started), _alive(started)
        assert took < STOP_WITHIN_S
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
