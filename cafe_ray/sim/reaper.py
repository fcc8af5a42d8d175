"""Leave no Ray processes behind when the command that started a local Ray dies.

``ray.init()`` starts gcs_server, raylet, monitors and, from the raylet, a
``ray::DashboardAgent`` and a ``ray::RuntimeEnvAgent``. ``ray.shutdown()`` stops
them, but when the driver is killed (SIGKILL, OOM killer) Ray 2.60's agents
outlive it, reparented to init, and they ignore SIGTERM.

A local session is recognised by its session directory
(``/tmp/ray/session_<date>_<pid>``): every one of its processes has it on its
command line or holds a log file under it open (the agents and workers rename
their command line, but keep their logs open). Nothing else on the machine
does, so other users' Ray clusters are never touched.

:func:`start_watchdog` spawns a small process (its own session, so Ctrl-C in a
terminal does not reach it) that waits for the driver to die and then kills
whatever is left of the driver's Ray session.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path


def session_pids(session_dir: str | Path, exclude: tuple[int, ...] = ()) -> list[int]:
    """Live (non-zombie) processes whose command line or open files lie under ``session_dir``."""
    sess = str(session_dir).rstrip("/") + "/"
    me = {os.getpid(), *exclude}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in me:
            continue
        pid = int(entry)
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                continue
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if sess in cmd or sess.rstrip("/") + " " in cmd + " ":
                found.append(pid)
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(sess):
                        found.append(pid)
                        break
                except OSError:
                    continue
        except (OSError, IndexError):
            continue  # exited meanwhile, or not ours to read
    return found


def kill_session(session_dir: str | Path, exclude: tuple[int, ...] = (), timeout_s: float = 10.0) -> list[int]:
    """SIGKILL every process of the session until none is left; returns the pids killed."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout_s
    while True:
        pids = session_pids(session_dir, exclude)
        if not pids or time.monotonic() > deadline:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def local_session_dir() -> str | None:
    """The session directory of the Ray instance this process started, if it started one."""
    try:
        from ray._private import worker

        node = worker._global_node
        return node.get_session_dir_path() if node is not None and node.head else None
    except Exception:  # noqa: BLE001 - private API; without it there is simply no watchdog
        return None


def start_watchdog(session_dir: str) -> subprocess.Popen:
    """Spawn the process that cleans up ``session_dir`` once this process has died."""
    # the session dir travels on stdin, not argv: the watchdog must not match itself
    proc = subprocess.Popen(
        [sys.executable, "-m", "cafe_ray.sim.reaper", str(os.getpid())],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True, text=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(session_dir + "\n")
    proc.stdin.close()
    return proc


def _wait_for_exit(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        while True:  # no pidfd: poll
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def main() -> None:
    driver = int(sys.argv[1])
    session_dir = sys.stdin.readline().strip()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _wait_for_exit(driver)
    if session_dir:
        kill_session(session_dir, exclude=(driver,))


if __name__ == "__main__":
    main()
