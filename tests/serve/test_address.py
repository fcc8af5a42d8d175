"""`serve --address` against a cluster whose Serve proxy already runs on another port, and
`bench serve --url` / `--external` against a running server."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cafe_ray.cli import app
from tests.serve.conftest import flat, free_port, read_until

runner = CliRunner()


@pytest.fixture(scope="module")
def gcs(served, ray_session) -> str:
    return ray_session.get_runtime_context().gcs_address


@pytest.mark.slow  # a Serve proxy, then `cafe-ray serve` processes against it
@pytest.mark.parametrize(("args", "flag"), [(["--port", "PORT"], "--port"), (["--host", "0.0.0.0"], "--host")])
def test_serve_stops_with_how_to_restart_when_the_running_proxy_differs(served, serve_run_dir, gcs, args, flag):
    cfg, _ = served
    args = [str(free_port()) if a == "PORT" else a for a in args]
    r = runner.invoke(app, ["serve", str(serve_run_dir), "--address", gcs, *args, "--app-name", "never"])
    out = flat(r.output)
    assert r.exit_code == 2, r.output
    assert f"already listens on 127.0.0.1:{cfg.port}" in out and f"run again without {flag}" in out
    assert "serve.shutdown()" in out and f"ray.init(address='{gcs}')" in out
    from ray import serve

    assert "never" not in serve.status().applications  # nothing was deployed


@pytest.mark.slow  # a Serve proxy, then a `cafe-ray serve` process against it
def test_serve_uses_the_running_proxy_and_prints_its_real_url(served, serve_run_dir, gcs):
    """No --port: the CLI (a separate process) deploys on the running proxy and says where it is."""
    cfg, _ = served
    cmd = [str(Path(sys.executable).parent / "cafe-ray"), "serve", str(serve_run_dir), "--address", gcs,
           "--app-name", "cli-reuse", "--route-prefix", "/reuse"]
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    want = f"http://127.0.0.1:{cfg.port}/reuse"
    try:
        text = read_until(proc, lambda line: "serving" in line and " at " in line)
        assert f"at {want}" in text, text
        assert f"using its proxy on 127.0.0.1:{cfg.port}" in text
        r = httpx.get(f"{want}/healthz", timeout=60)
        assert r.status_code == 200 and r.json()["run"] == serve_run_dir.name
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    assert httpx.get(f"{want}/healthz", timeout=60).status_code == 404  # its app was removed, ours stays
    assert httpx.get(f"{cfg.url}/healthz", timeout=60).status_code == 200


def _bench_args(serve_run_dir, url):
    return ["bench", "serve", str(serve_run_dir), "--url", url, "--requests", "12", "--samples", "2",
            "--concurrency", "2", "--clients", "3", "--rounds", "1", "--threshold", "0.2"]


def _rows(output: str) -> dict[str, list[str]]:
    return {cells[1].strip(): cells[2:] for line in output.splitlines()
            if line.startswith("| ") and (cells := line.split("|")) and cells[1].strip() != "policy"
            and not cells[1].startswith("-")}


@pytest.mark.slow  # a Serve proxy (this module's), loaded over HTTP
def test_bench_serve_loads_a_running_server_by_url(served, serve_run_dir):
    r = runner.invoke(app, _bench_args(serve_run_dir, served[0].url))
    assert r.exit_code == 0, r.output
    rows = _rows(r.output)
    assert set(rows) == {"full depth", "threshold 0.2"}
    for cells in rows.values():
        assert cells[0].strip() == "12" and cells[1].strip() == "0"  # requests, errors
    assert re.search(r"load average \(1/5/15 min\) before: [\d.]+ [\d.]+ [\d.]+", r.output)


@pytest.mark.slow  # a Serve proxy (this module's), loaded by hey
@pytest.mark.skipif(shutil.which("hey") is None, reason="hey is not installed (apt-get install -y hey)")
def test_bench_serve_external_uses_hey(served, serve_run_dir):
    r = runner.invoke(app, [*_bench_args(serve_run_dir, served[0].url), "--external"])
    assert r.exit_code == 0, r.output
    assert "(hey)" in flat(r.output)
    rows = _rows(r.output)
    for cells in rows.values():
        assert cells[0].strip() == "12" and cells[1].strip() == "0"
        assert cells[7].strip().endswith("%")  # accuracy of the answers hey's bodies got


def test_bench_serve_rejects_url_with_address(serve_run_dir):
    r = runner.invoke(app, ["bench", "serve", str(serve_run_dir), "--url", "http://x", "--port", "1"])
    assert r.exit_code == 2 and "cannot be combined" in flat(r.output)


def test_bench_serve_profile_times_every_step(serve_run_dir):
    r = runner.invoke(app, ["bench", "serve", str(serve_run_dir), "--profile", "--samples", "4"])
    assert r.exit_code == 0, r.output
    steps = [line.split("|")[1].strip() for line in r.output.splitlines() if line.startswith("| ")][1:]
    assert len(steps) == 6 and steps[0].startswith("decode+validate json") and steps[-1] == "encode the JSON answer"
    assert "load average before:" in r.output
