"""`serve --direct-ingress`: each replica answers HTTP on its own port (Ray Serve's direct
ingress), giving the same answers as the proxy; the flag's refusals; the replica-URL discovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from cafe_ray.cli import app
from cafe_ray.serve import ingress
from tests.serve.conftest import flat, free_port, read_until

runner = CliRunner()


@pytest.mark.slow  # a `cafe-ray serve --direct-ingress` process with its own Ray and Serve
def test_serve_direct_ingress_answers_on_the_replica_port_like_the_proxy(serve_run_dir, serve_artifacts):
    """A separate `cafe-ray serve --direct-ingress` (its own local Ray): the printed replica URL
    answers /healthz for this run and predicts exactly what the proxy URL predicts."""
    port, base = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(COLUMNS="250", **{ingress.PORT_ENV: str(base), ingress.MAX_PORT_ENV: str(base + 50)})
    cmd = [str(Path(sys.executable).parent / "cafe-ray"), "serve", str(serve_run_dir), "--direct-ingress",
           "--port", str(port), "--no-access-log"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        text = read_until(proc, lambda line: "direct ingress:" in line or "error:" in line)
        proxy = f"http://127.0.0.1:{port}"
        assert f"at {proxy}" in text, text
        assert "direct ingress: replica 1 at " in text, text  # else the warning says why (e.g. a timeout)
        direct = text.split("direct ingress: replica 1 at ", 1)[1].split()[0]
        assert direct.startswith("http://127.0.0.1:") and not direct.startswith(proxy), text
        assert int(direct.rsplit(":", 1)[1]) >= base
        assert httpx.get(f"{direct}/healthz", timeout=60).json()["run"] == serve_run_dir.name
        cid = serve_artifacts.client_ids[0]
        x, _ = serve_artifacts.client_data(cid, "test")
        body = {"inputs": np.asarray(x[:5]).tolist(), "policy": "threshold", "threshold": 0.5}
        a = httpx.post(f"{direct}/v1/clients/{cid}/predict", json=body, timeout=60)
        b = httpx.post(f"{proxy}/v1/clients/{cid}/predict", json=body, timeout=60)
        assert a.status_code == b.status_code == 200
        assert a.json() == b.json()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_direct_ingress_refuses_a_cluster_address(serve_run_dir):
    r = runner.invoke(app, ["serve", str(serve_run_dir), "--direct-ingress", "--address", "127.0.0.1:1"])
    assert r.exit_code == 2 and f"start every node with {ingress.ENV}=1" in flat(r.output)
    r = runner.invoke(app, ["bench", "serve", str(serve_run_dir), "--direct-ingress", "--url", "http://x"])
    assert r.exit_code == 2 and "cannot be combined with --url or --address" in flat(r.output)


def test_enabling_after_ray_serve_was_imported_is_refused(monkeypatch):
    import ray.serve  # noqa: F401 - the test session has imported it already

    monkeypatch.delenv(ingress.ENV, raising=False)
    with pytest.raises(RuntimeError, match="before Ray Serve is imported"):
        ingress.enable_direct_ingress()
    assert not ingress.enabled()


class _Health(BaseHTTPRequestHandler):
    run = ""

    def do_GET(self) -> None:
        ok = self.path in ("/healthz", "/app/healthz")
        data = json.dumps({"status": "ok", "run": self.run}).encode() if ok else b"{}"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def _server(port: int, run: str) -> ThreadingHTTPServer:
    handler = type("H", (_Health,), {"run": run})
    srv = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_replica_urls_find_this_runs_replicas_only(monkeypatch, tmp_path):
    base = free_port()
    servers = []
    try:
        for offset, run in ((0, "another-run"), (2, "my-run")):
            try:
                servers.append(_server(base + offset, run))
            except OSError:
                pytest.skip("the ports next to a free one are taken")
        monkeypatch.setenv(ingress.PORT_ENV, str(base))
        urls = ingress.replica_urls("0.0.0.0", tmp_path / "my-run", replicas=1, span=4, timeout_s=5)
        assert urls == [f"http://127.0.0.1:{base + 2}"]
        assert ingress.replica_urls("127.0.0.1", tmp_path / "no-such-run", replicas=1, span=4, timeout_s=0) == []
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
