"""What a user sees when a run stops: one line naming the field (or client, round and
stage), the fix, and where the run stopped with the exact command that resumes it.

Errors raised inside the coordinator or a client actor reach the driver wrapped in
Ray's ``RayTaskError`` (with a remote traceback as its message); :func:`unwrap`
takes the original exception back out, so both executors report the same thing.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cafe_ray.config import ExperimentConfig

DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\]|\(os error (\d+)\)")  # Python's / Rust's (safetensors)


def unwrap(err: BaseException) -> BaseException:
    """The original exception inside Ray's task-error wrappers (itself when not wrapped)."""
    try:
        from ray.exceptions import RayTaskError
    except ImportError:  # pragma: no cover - ray is a dependency
        return err
    seen = 0
    while isinstance(err, RayTaskError) and getattr(err, "cause", None) is not None and seen < 10:
        err = err.cause
        seen += 1
    return err


def _errno_of(err: BaseException) -> int | None:
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    m = _ERRNO_IN_TEXT.search(str(err))  # an OSError wrapped by a client actor or a Rust library
    if m:
        return int(m.group(1) or m.group(2))
    return errno.ENOSPC if "No space left on device" in str(err) else None


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def describe(err: BaseException, cfg: ExperimentConfig | None = None) -> str:
    """One line for ``err``: names the field or client/round/stage, says the fix.

    (A missing dataset keeps its list of the paths tried below that line.)
    """
    err = unwrap(err)
    output_dir = cfg.output_dir if cfg is not None else None
    code = _errno_of(err)
    if code in DISK_FULL:
        what = getattr(err, "filename", None)
        where = f" while writing {what}" if what else ""
        field = f"output_dir={output_dir}" if output_dir else "output_dir"
        detail = "" if isinstance(err, OSError) else f" ({one_line(err)})"
        return (f"{field}: the disk is full{where}{detail}; free space there (or point output_dir at a "
                "larger disk) and resume")
    if isinstance(err, PermissionError) or code == errno.EACCES:
        return f"cannot write {getattr(err, 'filename', '') or 'the run directory'}: permission denied; " \
               "choose a writable output_dir"
    from ray.exceptions import RayActorError  # here, not at the top: callers need not import Ray
    if isinstance(err, RayActorError):
        return ("the coordinator process died (out of memory, or its node was lost): "
                f"{one_line(err)[:300]}")
    from cafe_ray.config import ConfigError
    from cafe_ray.data.base import DatasetNotFoundError
    from cafe_ray.data.readers import CorruptDatasetError

    if isinstance(err, DatasetNotFoundError):
        name = f"data.name={cfg.data.name}: " if cfg is not None else ""
        return f"{name}{str(err).strip()}"
    if isinstance(err, CorruptDatasetError):
        return f"data.root: {one_line(err)}"
    if isinstance(err, (ConfigError, FileNotFoundError)):
        return str(err).strip()  # already names the field
    name = type(err).__name__
    text = one_line(err)
    if name in ("ClientJobError", "ValueError"):
        return text  # names the client, round and stage / the data field
    return f"{name}: {text}" if text else name


class RunStopped(Exception):
    """A run stopped before its last round; says where and how to continue."""

    def __init__(self, reason: str, *, run_dir: Path | None, rounds_done: int, total: int,
                 checkpoint_rounds: int, resume_cmd: str | None) -> None:
        self.reason = reason
        self.run_dir = run_dir
        self.rounds_done = rounds_done
        self.total = total
        self.checkpoint_rounds = checkpoint_rounds
        self.resume_cmd = resume_cmd
        super().__init__(f"{reason} ({self.where()})")

    def where(self) -> str:
        if self.run_dir is None:
            return "no round had finished; the run directory was removed"
        ckpt = (f"the last checkpoint holds {self.checkpoint_rounds} rounds" if self.checkpoint_rounds
                else "no checkpoint yet, so a resume starts from round 1")
        return f"stopped after {self.rounds_done} of {self.total} rounds; {ckpt}; resume with: {self.resume_cmd}"


class RunFailed(RunStopped):
    """An error stopped the run; ``__cause__`` is the unwrapped original exception."""


class RunInterrupted(RunStopped):
    """Ctrl-C (SIGINT) or SIGTERM stopped the run."""


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by the SIGTERM handler that ``cafe-ray simulate`` installs."""


SIGNALS: dict[str, bool] = {"sigterm": False}  # Ray's C calls may re-raise a plain KeyboardInterrupt


def on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM handler: stop like Ctrl-C, remembering that it was SIGTERM."""
    SIGNALS["sigterm"] = True
    raise Terminated()
