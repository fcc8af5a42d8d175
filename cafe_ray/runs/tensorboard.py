"""Every round's metrics as TensorBoard event files (``logging.tensorboard: true``).

The run directory's ``metrics.jsonl`` stays the record; the event files are a view of
it for people who already watch runs in TensorBoard. The writer is tensorboardX,
which comes with Ray Tune, so TensorBoard costs no new dependency.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FOLDER = "tensorboard"


class TensorBoardLog:
    """Scalars of each round's record, at step = round (``acc_exit`` as ``acc_exit/1..M``)."""

    def __init__(self, run_dir: Path) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / FOLDER))

    def add(self, record: dict[str, Any]) -> None:
        step = int(record["round"])
        for key, value in sorted(record.items()):
            if key == "round":
                continue
            if isinstance(value, list | tuple):
                for i, v in enumerate(value):
                    if _is_number(v):
                        self.writer.add_scalar(f"{key}/{i + 1}", float(v), step)
            elif _is_number(value):
                self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
