"""Keyed digests of the pickled state in a sweep folder, checked before Ray Tune loads it.

Ray Tune keeps a sweep's state as pickles (``tune/tuner.pkl``, the searcher state,
``params.pkl``) and as JSON with cloudpickle blobs inside (``experiment_state-*.json``);
``Tuner.restore`` and ``tune.ExperimentAnalysis`` unpickle them, and unpickling runs
whatever code the file names. A sweep folder received from someone else must therefore
never reach them. While a sweep runs, :class:`Signer` records an HMAC-SHA256 of every
file under ``tune/`` in ``OUT/pickles.sig.json``, keyed with a per-user secret kept
outside the folder (:func:`key_path`). Before a resume, :func:`check_trusted` refuses
the folder when one of those files has no digest, or a digest that differs (another
key, or a change after it was written), before anything is unpickled.

Every file under ``tune/`` is covered except Tune's plain-text logs (:data:`PLAIN`),
which Tune reads as CSV/JSON only: a file Tune might load is never left out because
its name was not foreseen.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cafe_ray.config import ConfigError

KEY_ENV = "CAFE_RAY_SIGNING_KEY"  # path of the key file (tests and shared accounts point it elsewhere)
MANIFEST = "pickles.sig.json"
FORMAT = "cafe-ray-pickle-digests-v1"
TUNE_DIR = "tune"
# written by Tune's loggers and read back as text only (pandas / json), never unpickled
PLAIN = frozenset({"result.json", "progress.csv", "params.json", "error.txt", ".validate_storage_marker"})
PLAIN_PREFIXES = ("events.out.tfevents.",)


class UntrustedSweepError(ConfigError):
    """A sweep folder holds pickled state this installation did not write."""


# ---------------------------------------------------------------------- the key
def key_path() -> Path:
    """``$CAFE_RAY_SIGNING_KEY``, else ``$XDG_CONFIG_HOME/cafe-ray/signing.key`` (``~/.config``)."""
    env = os.environ.get(KEY_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cafe-ray" / "signing.key"


def load_key(create: bool = True) -> bytes:
    """The per-user secret; created (owner-only, 0600) on first use when ``create``."""
    path = key_path()
    if not path.exists() and create:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first: use theirs
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as err:
        raise ConfigError(f"signing key {path}: cannot read it ({err.strerror}); set {KEY_ENV} to a key file "
                          "you own") from None
    if mode & 0o077:
        raise ConfigError(f"signing key {path}: readable by other users (mode {mode & 0o777:o}), so they could "
                          f"sign sweep folders as you; run: chmod 600 {path}")
    if len(text) < 32:
        raise ConfigError(f"signing key {path}: too short ({len(text)} characters); delete it and a new one is "
                          "made on the next sweep")
    return text.encode()


def key_id(key: bytes) -> str:
    """A name for the key that reveals nothing about it (to tell 'another key' from 'modified')."""
    return hmac.new(key, b"cafe-ray key id", hashlib.sha256).hexdigest()[:16]


# -------------------------------------------------------------------- the files
def is_plain(name: str) -> bool:
    return name in PLAIN or name.startswith(PLAIN_PREFIXES)


def covered_files(out: Path) -> list[str]:
    """Paths (relative to ``out``, posix) of every file under ``tune/`` that is not a plain log."""
    root = out / TUNE_DIR
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if not is_plain(name):
                found.append((Path(dirpath) / name).relative_to(out).as_posix())
    # tuner.pkl first: it is what Tune unpickles first, so it is what an error names first
    return sorted(found, key=lambda rel: (rel != f"{TUNE_DIR}/tuner.pkl", rel))


def digest(key: bytes, out: Path, rel: str) -> str:
    """HMAC-SHA256 over the path and the bytes (a signed file cannot be renamed into another role)."""
    mac = hmac.new(key, FORMAT.encode() + b"\0" + rel.encode() + b"\0", hashlib.sha256)
    with (out / rel).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            mac.update(chunk)
    return mac.hexdigest()


def read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("files"), dict):
        return None
    return raw


def _write_manifest(out: Path, key: bytes, files: dict[str, str]) -> None:
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "key_id": key_id(key), "files": dict(sorted(files.items()))},
                              indent=1))
    os.replace(tmp, out / MANIFEST)


# --------------------------------------------------------------------- signing
class Signer:
    """Re-signs the changed files under ``OUT/tune`` (cheap: a stat per file, a hash per change).

    Also a Ray Tune callback (its ``on_step_end``/``on_experiment_end`` hooks), so the
    digests follow every experiment-state snapshot within a second and a driver killed
    mid-sweep leaves a folder that resumes. Pickled into ``tuner.pkl`` with the run
    config: it holds the folder only, never the key.
    """

    def __init__(self, out: str | Path, every_s: float = 1.0) -> None:
        self.out = str(Path(out).resolve())
        self.every_s = every_s
        self._seen: dict[str, tuple[int, int, str]] = {}
        self._last = 0.0
        self._key: bytes | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"out": self.out, "every_s": self.every_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["out"], state.get("every_s", 1.0))

    def sign(self, full: bool = False) -> None:
        """Record a digest of every covered file; ``full`` rehashes even unchanged ones."""
        import time

        out = Path(self.out)
        if not (out / TUNE_DIR).is_dir():
            return
        if self._key is None:
            self._key = load_key()
        files: dict[str, str] = {}
        seen: dict[str, tuple[int, int, str]] = {}
        for rel in covered_files(out):
            try:
                st = (out / rel).stat()
                old = self._seen.get(rel)
                if not full and old and old[:2] == (st.st_size, st.st_mtime_ns):
                    d = old[2]
                else:
                    d = digest(self._key, out, rel)
            except OSError:  # removed meanwhile (Tune's temporary files)
                continue
            files[rel] = d
            seen[rel] = (st.st_size, st.st_mtime_ns, d)
        if full or seen != self._seen:
            _write_manifest(out, self._key, files)
        self._seen = seen
        self._last = time.monotonic()

    # Ray Tune callback hooks (duck-typed: tune.Callback's other hooks are looked up on it)
    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        import time

        if time.monotonic() - self._last >= self.every_s:
            self.sign()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.sign(full=True)


def tune_callback(out: str | Path) -> Any:
    """A :class:`Signer` that is also a ``ray.tune.Callback`` (Tune checks the type)."""
    return _sweep_signer_class()(out)


def _sweep_signer_class() -> type:
    cls = globals().get("SweepSigner")
    if cls is None:
        from ray.tune import Callback  # imported on first use: checking a folder needs no Ray

        cls = type("SweepSigner", (Signer, Callback), {"__module__": __name__, "__qualname__": "SweepSigner"})
        globals()["SweepSigner"] = cls
    return cls


def __getattr__(name: str) -> Any:  # unpickling tuner.pkl looks SweepSigner up by name
    if name == "SweepSigner":
        return _sweep_signer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sign(out: str | Path) -> None:
    """Sign every covered file of the sweep in ``out`` now (after Tune wrote its final state)."""
    Signer(out).sign(full=True)


# ------------------------------------------------------------------- checking
@dataclass(frozen=True)
class Finding:
    rel: str  # the file, relative to the sweep folder
    why: str  # "" when its digest matches this installation's key


def findings(out: str | Path) -> list[Finding]:
    """Every covered file of ``out`` with what is wrong with its digest ("" = signed by this key)."""
    out = Path(out)
    key = load_key()
    manifest = read_manifest(out)
    rels = covered_files(out)
    if manifest is None:
        why = (f"has no digest: the folder has no valid {MANIFEST} (a sweep written by another installation, "
               "or by a cafe-ray that did not sign)")
        return [Finding(rel, why) for rel in rels]
    other_key = manifest.get("key_id") != key_id(key)
    res = []
    for rel in rels:
        want = manifest["files"].get(rel)
        if want is None:
            res.append(Finding(rel, "has no digest (a file added after the sweep ran)"))
        elif other_key:
            res.append(Finding(rel, "was signed with another key (another user or machine)"))
        elif not hmac.compare_digest(str(want), digest(key, out, rel)):
            res.append(Finding(rel, "differs from its digest (changed after the sweep wrote it)"))
        else:
            res.append(Finding(rel, ""))
    return res


def check_trusted(out: str | Path, action: str = "--resume") -> None:
    """Raise :class:`UntrustedSweepError` (one line) unless every covered file is signed by this key."""
    out = Path(out)
    bad = [f for f in findings(out) if f.why]
    if not bad:
        return
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    raise UntrustedSweepError(
        f"{action}: {out / bad[0].rel} {bad[0].why}{more}; Ray Tune would unpickle it, which runs any code it "
        "holds, so nothing was loaded. Resume a folder you trust deliberately with --trust-pickles "
        "(it lists what it loads)")


def trust_report(out: str | Path) -> list[str]:
    """Lines for ``--trust-pickles``: every file Tune may unpickle and whether this key signed it."""
    return [f"{Path(out) / f.rel}: {f.why or 'signed by this installation'}" for f in findings(out)]
