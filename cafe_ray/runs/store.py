"""Client state store: each virtual client's personal parameters as a safetensors file.

RAM grows with concurrency, not with registered clients: a state is read when
its client runs and written back when the server accepts its result. Writes are
staged then committed by rename, so a result that the server drops (late,
failed, killed actor) never changes a client's state. Checkpoints snapshot the
store with hard links (writes replace files, never modify them in place).
No pickle anywhere: safetensors only.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

Params = dict[str, torch.Tensor]


class ClientStateStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, client_id: int) -> Path:
        return self.root / f"client_{client_id:07d}.safetensors"

    def _staged(self, client_id: int, round_: int) -> Path:
        return self.root / f".staged_{client_id:07d}_r{round_:06d}.safetensors"

    def load(self, client_id: int) -> Params | None:
        p = self._path(client_id)
        return load_file(str(p)) if p.exists() else None

    def stage(self, client_id: int, round_: int, params: Params) -> None:
        """Write a candidate state that only :meth:`commit` makes current."""
        tensors = {k: v.detach().contiguous().clone() for k, v in params.items()}
        tmp = self._staged(client_id, round_).with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, self._staged(client_id, round_))

    def commit(self, client_id: int, round_: int) -> bool:
        staged = self._staged(client_id, round_)
        if not staged.exists():
            return False
        os.replace(staged, self._path(client_id))
        return True

    def discard_staged(self, client_ids: Iterable[int] | None = None, round_: int | None = None) -> None:
        """Remove candidate states that were not committed.

        With ``client_ids`` and ``round_``: those clients' candidates of that round and any
        half-written one (a worker that died mid-write), O(clients named): what the round
        loop calls, so a round never lists a store that holds every client seen so far.
        Without: every staged file, by listing the whole store.
        """
        if client_ids is None:
            for p in self.root.glob(".staged_*"):
                p.unlink(missing_ok=True)
            return
        if round_ is None:
            raise ValueError("ClientStateStore.discard_staged: pass round_ with client_ids")
        for cid in client_ids:
            staged = self._staged(cid, round_)
            staged.unlink(missing_ok=True)
            staged.with_suffix(".tmp").unlink(missing_ok=True)

    def clients(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.root.glob("client_*.safetensors"))

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("client_*.safetensors"))

    def snapshot(self, dest: str | Path) -> None:
        """Hard-link every committed state into ``dest`` (copy where links fail)."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for p in self.root.glob("client_*.safetensors"):
            try:
                os.link(p, dest / p.name)
            except OSError:
                shutil.copy2(p, dest / p.name)

    def clear(self) -> None:
        for p in self.root.iterdir():
            if p.is_file():
                p.unlink()

    def restore(self, src: str | Path) -> None:
        """Make the store equal to a snapshot taken by :meth:`snapshot`."""
        self.clear()
        for p in Path(src).glob("client_*.safetensors"):
            try:
                os.link(p, self.root / p.name)
            except OSError:
                shutil.copy2(p, self.root / p.name)
