"""``cafe_ray/EarlyExit-v0``: decide, exit by exit, when a sample has been computed enough.

The environment replays a trained client model's exits (CAFEDistill, arXiv:2601.10015,
personalised early-exit networks). Every exit's logits are computed once per split
(:class:`~cafe_ray.inference.trace.ExitTrace`), so a step is an index, not a forward pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, SupportsFloat

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from cafe_ray.inference.observation import OBS_FEATURES, exit_observation, observation_bounds
from cafe_ray.inference.trace import ExitTrace
from cafe_ray.models import ExitCost

if TYPE_CHECKING:
    from cafe_ray.runs import RunArtifacts

CONTINUE, EXIT = 0, 1


class EarlyExitEnv(gym.Env[np.ndarray, np.int64]):
    """
    ## Description

    An episode walks one sample through the exits of a trained early-exit network. At each
    exit the agent sees how confident that exit is and what has been spent, and chooses to
    stop there (the prediction is that exit's argmax) or to run the next stage. Samples come
    from one client's split of a finished run (``cafe-ray simulate``), or from all clients'
    splits pooled (``client_id=None``), or from precomputed arrays
    (:meth:`from_arrays`). The trade-off is set by ``cost_weight``: how many accuracy
    points one full-depth forward pass is worth giving up.

    ## Action Space

    ``Discrete(2)``:

    | Num | Action                                    |
    |-----|-------------------------------------------|
    | 0   | continue to the next exit                 |
    | 1   | exit here and predict this exit's argmax  |

    At the last exit both actions end the episode with the last exit's prediction.

    ## Observation Space

    ``Box(6,)`` float32, about the current exit k (0-based) of m:

    | Num | Observation  | Min | Max             | Meaning                                        |
    |-----|--------------|-----|-----------------|------------------------------------------------|
    | 0   | max_prob     | 0   | 1               | largest softmax probability at exit k          |
    | 1   | margin       | 0   | 1               | top-1 minus top-2 probability                  |
    | 2   | entropy      | 0   | log(C)          | softmax entropy in nats (C classes)            |
    | 3   | depth        | 0   | 1               | k / (m - 1)                                    |
    | 4   | macs_spent   | 0   | 1               | cascade MACs through exit k / full-depth MACs  |
    | 5   | budget_left  | 0   | 1               | max(budget - macs_spent, 0)                    |

    Cascade MACs through exit k count every stage *and exit head* 0..k, which is what
    :func:`cafe_ray.inference.predict_batch` spends on a sample that exits at k; full-depth
    MACs are the cascade through the last exit.

    ## Rewards

    Zero on every step but the last. On the last: ``1`` if the prediction is correct else
    ``0``, minus ``cost_weight * macs_spent`` (MACs spent / full-depth MACs). An undiscounted
    return is therefore accuracy minus ``cost_weight`` times the normalised cost.

    ## Starting State

    A sample is drawn uniformly from the split with ``self.np_random``
    (``options={"index": i}`` picks sample i instead); the agent stands at exit 0, whose
    cost (stage 0 + head 0) is already spent.

    ## Episode End

    Termination: the agent exits, or reaches the last exit. Truncation: only from the
    registration's ``max_episode_steps`` (a guard; an episode has at most m steps).

    ## Arguments

    ```python
    import gymnasium as gym
    import cafe_ray  # registers cafe_ray/EarlyExit-v0 (cheaply: no torch until gym.make)

    env = gym.make("cafe_ray/EarlyExit-v0", run_dir="runs/quickstart-...", client_id=0,
                   split="val", cost_weight=0.1, budget=1.0)
    obs, info = env.reset(seed=42)
    obs, reward, terminated, truncated, info = env.step(1)  # exit at exit 0
    ```

    * ``run_dir``: a finished run directory (or pass ``trace=`` / use :meth:`from_arrays`).
    * ``client_id``: whose personal model and data; ``None`` pools every client.
    * ``split``: ``"val"`` (default; calibration data), ``"holdout"``, ``"test"`` or ``"train"``.
    * ``cost_weight``: >= 0, reward lost for a full-depth forward pass.
    * ``budget``: the MAC budget as a fraction of full-depth MACs, in (0, 1]; it only shapes
      the ``budget_left`` feature (the cost enters the reward through ``cost_weight``).
    * ``render_mode``: ``None``, ``"ansi"`` (a text line) or ``"rgb_array"`` (an (64, 16 m, 3)
      uint8 image: one bar per exit reached, its height the exit's max probability; the exit
      taken turns green if its prediction was right, red if wrong), so wrappers that record
      or display episodes (``RecordVideo``, stable-baselines3's ``make_vec_env``) work.

    Building from ``run_dir`` runs the client models once per (checkpoint, client, split): the
    per-sample exit outputs are cached in the run directory (:func:`cached_trace`), so a vector
    of N environments costs one pass, not N.
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}
    FRAME_HEIGHT, BAR_WIDTH = 64, 16

    def __init__(self, run_dir: str | Path | None = None, client_id: int | None = 0, split: str = "val", *,
                 trace: ExitTrace | None = None, cost_weight: float = 0.1, budget: float = 1.0,
                 render_mode: str | None = None) -> None:
        if (run_dir is None) == (trace is None):
            raise ValueError("EarlyExitEnv: pass exactly one of run_dir= (a `cafe-ray simulate` run directory) "
                             "or trace= (an ExitTrace; see EarlyExitEnv.from_arrays)")
        if not cost_weight >= 0:
            raise ValueError(f"cost_weight must be >= 0, got {cost_weight}")
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget is a fraction of full-depth MACs in (0, 1], got {budget}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        if trace is None:
            assert run_dir is not None  # exactly one of the two, checked above
            trace = load_trace(run_dir, client_id, split)
        self.trace = trace
        self.cost_weight = float(cost_weight)
        self.budget = float(budget)
        self.render_mode = render_mode
        n, m, c = trace.logits.shape
        low, high = observation_bounds(c)
        self.observation_space = spaces.Box(low, high, dtype=np.float32)
        self.action_space = spaces.Discrete(2)
        # (N, m, 6) every observation the episode can meet, built once.
        obs = [exit_observation(torch.from_numpy(trace.confidence[:, k]), k, m,
                                torch.full((n,), int(trace.exit_macs[k]), dtype=torch.int64),
                                trace.full_macs, self.budget, c) for k in range(m)]
        self._obs = torch.stack(obs, dim=1).numpy()
        self._cost = (trace.exit_macs / trace.full_macs).astype(np.float64)  # (m,) normalised cascade MACs
        self._index: int | None = None  # current sample; None before reset / after the episode ended
        self._exit = 0
        self._shown: tuple[int, int, bool | None] | None = None  # (sample, exit, correct if decided) to render

    # ------------------------------------------------------------ construction
    @classmethod
    def from_arrays(cls, logits: np.ndarray, labels: np.ndarray, exit_macs: ExitCost | np.ndarray | list[int],
                    **kwargs: Any) -> EarlyExitEnv:
        """From precomputed exits: logits (N, m, C), labels (N,), and the cascade MACs to reach each
        exit ((m,) strictly increasing, or an :class:`ExitCost`, whose ``cascade`` is used)."""
        return cls(trace=ExitTrace(np.asarray(logits), np.asarray(labels), _cascade(exit_macs)), **kwargs)

    @property
    def observations(self) -> np.ndarray:
        """(N, m, 6) float32 read-only: the observation of every sample at every exit."""
        v = self._obs.view()
        v.flags.writeable = False
        return v

    # ---------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        n = self.trace.num_samples
        if options and "index" in options:
            i = int(options["index"])
            if not 0 <= i < n:
                raise ValueError(f"options['index'] must be in [0, {n - 1}], got {i}")
        else:
            i = int(self.np_random.integers(n))
        self._index, self._exit = i, 0
        self._shown = (i, 0, None)
        return self._obs[i, 0].copy(), {"index": i, "exit": 0}

    def step(self, action: Any) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        if self._index is None:
            raise RuntimeError("EarlyExitEnv.step called before reset() or after the episode ended; call reset()")
        if not self.action_space.contains(action):
            raise ValueError(f"action must be 0 (continue) or 1 (exit), got {action!r}")
        i, k = self._index, self._exit
        last = self.trace.num_exits - 1
        if int(action) == CONTINUE and k < last:
            self._exit = k + 1
            self._shown = (i, k + 1, None)
            return self._obs[i, k + 1].copy(), 0.0, False, False, {"index": i, "exit": k + 1}
        correct = bool(self.trace.correct[i, k])
        reward = float(correct) - self.cost_weight * float(self._cost[k])
        info = {"index": i, "exit": k, "macs": int(self.trace.exit_macs[k]), "correct": correct,
                "prediction": int(self.trace.logits[i, k].argmax()), "label": int(self.trace.labels[i])}
        self._index = None
        self._shown = (i, k, correct)
        return self._obs[i, k].copy(), reward, True, False, info

    def render(self) -> str | np.ndarray | None:
        if self.render_mode == "rgb_array":
            return self._frame()
        if self.render_mode != "ansi":
            return None
        if self._index is None:
            return "EarlyExit: no episode running (call reset())"
        o = self._obs[self._index, self._exit]
        feats = ", ".join(f"{n}={v:.3f}" for n, v in zip(OBS_FEATURES, o, strict=True))
        return f"sample {self._index} exit {self._exit + 1}/{self.trace.num_exits}: {feats}"


    def _frame(self) -> np.ndarray:
        """(64, 16 m, 3) uint8: max-probability bars of the exits reached; the decision's colour."""
        m, h, w = self.trace.num_exits, self.FRAME_HEIGHT, self.BAR_WIDTH
        img = np.full((h, w * m, 3), 255, dtype=np.uint8)
        img[:, ::w] = 220  # exit separators
        if self._shown is None:
            return img
        i, k, correct = self._shown
        conf = self.trace.confidence[i, :, 0]
        for j in range(k + 1):
            top = int(round((1.0 - float(conf[j])) * (h - 1)))
            colour = (70, 130, 180) if j < k or correct is None else (46, 160, 67) if correct else (214, 39, 40)
            img[top:, j * w + 2 : (j + 1) * w - 2] = colour
        if correct is None:  # the exit the agent stands at: a black marker on top
            img[:2, k * w + 2 : (k + 1) * w - 2] = 0
        return img


def _cascade(exit_macs: ExitCost | np.ndarray | list[int]) -> np.ndarray:
    return np.asarray(exit_macs.cascade if isinstance(exit_macs, ExitCost) else exit_macs, dtype=np.int64)


def cached_trace(run: RunArtifacts, client_id: int, split: str) -> ExitTrace:
    """Client ``client_id``'s exit trace on ``split``, from the run directory's cache
    (:func:`cafe_ray.runs.rundir.exit_trace_path`), computed once and cached if absent."""
    from cafe_ray.runs import rundir

    path = rundir.exit_trace_path(run.run_dir, run.round, client_id, split)
    hit = rundir.read_exit_trace(path)
    if hit is not None and np.array_equal(hit["exit_macs"], np.asarray(run.exit_cost.cascade)):
        return ExitTrace(hit["logits"], hit["labels"], hit["exit_macs"])
    trace = ExitTrace.from_run(run, client_id, split)
    rundir.write_exit_trace(path, trace.logits, trace.labels, trace.exit_macs)
    return trace


def check_client_id(run: RunArtifacts, client_id: int | None) -> list[int]:
    """The client ids ``client_id`` stands for (``None``: all), or a ValueError listing the valid ones."""
    ids = run.client_ids
    if client_id is None:
        return ids
    if isinstance(client_id, bool) or not isinstance(client_id, int | np.integer) or int(client_id) not in ids:
        shown = f"{ids[0]}..{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else ", ".join(map(str, ids))
        raise ValueError(f"client_id={client_id!r}: run {run.run_dir.name} has no such client; valid ids are "
                         f"{shown} ({len(ids)} clients), or None to pool them all")
    return [int(client_id)]


def load_trace(run_dir: str | Path | RunArtifacts, client_id: int | None, split: str) -> ExitTrace:
    """One client's (or, for ``None``, every client's pooled) exit trace on ``split``."""
    from cafe_ray.runs import RunArtifacts

    run = run_dir if isinstance(run_dir, RunArtifacts) else RunArtifacts(run_dir)
    return ExitTrace.concat([cached_trace(run, i, split) for i in check_client_id(run, client_id)])
