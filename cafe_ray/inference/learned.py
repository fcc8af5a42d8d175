"""Learned exit policies: a small MLP over the exit observation, stored without pickle.

A saved policy is two files with one stem: ``NAME.safetensors`` (the MLP's weights) and
``NAME.json`` (its architecture, the feature normalisation applied before the first layer,
the MAC budget and full-depth MACs it was trained with, and where it came from). Loading
needs torch and safetensors only: RLlib trains policies (:mod:`cafe_ray.envs.training`)
but evaluation and serving run them without it.

The MLP maps the observation of :func:`~cafe_ray.inference.observation.exit_observation`
to two logits (0 continue, 1 exit), the action space of ``cafe_ray/EarlyExit-v0``; the
policy exits where logit 1 > logit 0 (the greedy action).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cafe_ray.inference.observation import OBS_FEATURES, exit_observation
from cafe_ray.inference.policies import ExitPolicy, confidence_features, register_policy
from cafe_ray.models import ExitCost

FORMAT = "cafe-ray-exit-policy-v1"
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "silu": nn.SiLU, "elu": nn.ELU}


@dataclass(frozen=True)
class PolicySpec:
    """What the JSON sidecar holds: enough to rebuild and feed the MLP."""

    hidden: tuple[int, ...]  # hidden layer widths, e.g. (32, 32)
    activation: str  # one of ACTIVATIONS, after every hidden layer
    shift: tuple[float, ...]  # per-feature: the MLP sees (obs - shift) / scale
    scale: tuple[float, ...]
    full_macs: int  # full-depth MACs of the model trained on (normalises MACs without an ExitCost)
    num_classes: int  # classes of that model (bounds the entropy feature)
    budget: float = 1.0  # MAC budget as a fraction of full MACs (the budget_left feature)
    features: tuple[str, ...] = OBS_FEATURES
    num_actions: int = 2  # 0 continue, 1 exit
    meta: dict[str, Any] = field(default_factory=dict)  # provenance: algorithm, run, client, reward weight

    def __post_init__(self) -> None:
        if tuple(self.features) != OBS_FEATURES:
            raise ValueError(f"policy features {list(self.features)} differ from this version's "
                             f"{list(OBS_FEATURES)}; retrain the policy with `cafe-ray policy train`")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} unsupported; use one of {sorted(ACTIVATIONS)}")
        n = len(OBS_FEATURES)
        if len(self.shift) != n or len(self.scale) != n:
            raise ValueError(f"normalisation needs {n} shift and scale values, got {len(self.shift)}/{len(self.scale)}")
        if any(s <= 0 for s in self.scale):
            raise ValueError(f"normalisation scale must be > 0, got {list(self.scale)}")
        if self.num_actions != 2:
            raise ValueError(f"an exit policy has 2 actions (continue, exit), got {self.num_actions}")

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self), "hidden": list(self.hidden), "shift": list(self.shift),
                "scale": list(self.scale), "features": list(self.features)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PolicySpec:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a cafe-ray exit policy sidecar (format {d.get('format')!r}, expected {FORMAT!r})")
        d = {k: v for k, v in d.items() if k != "format"}
        for k in ("hidden", "shift", "scale", "features"):
            d[k] = tuple(d[k])
        return cls(**d)


class ExitMLP(nn.Module):
    """(B, 6) observation -> (B, 2) action logits: normalise, then Linear/act layers."""

    def __init__(self, spec: PolicySpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("shift", torch.tensor(spec.shift, dtype=torch.float32), persistent=False)
        self.register_buffer("scale", torch.tensor(spec.scale, dtype=torch.float32), persistent=False)
        dims = [len(spec.features), *spec.hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), ACTIVATIONS[spec.activation]()]
        layers.append(nn.Linear(dims[-1], spec.num_actions))
        self.net = nn.Sequential(*layers)

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.net if isinstance(m, nn.Linear)]

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net((obs - self.shift) / self.scale)  # (B, 2)


def policy_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, sidecar) of a policy given either file, the stem, or a folder with policy.*."""
    p = Path(path)
    if p.is_dir():
        p = p / "policy.safetensors"
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def write_policy_files(module: nn.Module, sidecar_json: dict[str, Any], path: str | Path) -> tuple[Path, Path]:
    """``<stem>.safetensors`` (the module's tensors) + ``<stem>.json`` (its spec): the policy format, no pickle."""
    weights, sidecar = policy_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(weights))
    sidecar.write_text(json.dumps(sidecar_json, indent=2) + "\n")
    return weights, sidecar


def read_policy_files(path: str | Path, kind: str, command: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """(sidecar JSON, tensors, weights path) of a saved policy; names ``command`` when a file is missing."""
    weights, sidecar = policy_paths(path)
    for f in (weights, sidecar):
        if not f.is_file():
            raise FileNotFoundError(f"{kind}: {f} not found; a policy is NAME.safetensors + NAME.json, "
                                    f"as written by `{command}`")
    return json.loads(sidecar.read_text()), load_file(str(weights)), weights


def save_policy(mlp: ExitMLP, path: str | Path) -> tuple[Path, Path]:
    """Write ``<stem>.safetensors`` + ``<stem>.json``; returns both paths."""
    return write_policy_files(mlp, mlp.spec.to_json(), path)


def load_policy_mlp(path: str | Path) -> ExitMLP:
    """Rebuild the MLP from its sidecar and weights (no pickle, no RLlib)."""
    spec, state, weights = read_policy_files(path, "learned policy", "cafe-ray policy train")
    mlp = ExitMLP(PolicySpec.from_json(spec))
    expected = set(mlp.state_dict())
    if set(state) != expected:
        raise ValueError(f"learned policy {weights}: tensors {sorted(state)} do not match the sidecar's "
                         f"architecture {sorted(expected)}")
    mlp.load_state_dict(state)
    return mlp.eval()


class LearnedPolicy(ExitPolicy):
    """Exit where a saved :class:`ExitMLP` prefers action 1 (exit) over 0 (continue).

    ``budget`` (a fraction of full MACs) overrides the one it was trained with. Inside
    :func:`~cafe_ray.inference.predict_batch` MACs are normalised by the model's own full-depth
    cost; called directly, by the ``full_macs`` recorded at training.
    """

    name = "learned"

    def __init__(self, path: str | Path, budget: float | None = None) -> None:
        self.path = Path(path)
        self.mlp = load_policy_mlp(path)
        self.spec = self.mlp.spec
        self.budget = self.spec.budget if budget is None else float(budget)
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"learned policy: budget is a fraction of full MACs in (0, 1], got {self.budget}")

    def observe(self, probs: torch.Tensor, k: int, num_exits: int, macs_spent: torch.Tensor,
                full_macs: int | None = None) -> torch.Tensor:
        """(B, 6) observation, exactly as ``cafe_ray/EarlyExit-v0`` builds it."""
        return exit_observation(confidence_features(probs), k, num_exits, macs_spent,
                                full_macs or self.spec.full_macs, self.budget, probs.shape[1])

    @torch.no_grad()
    def decide(self, probs: torch.Tensor, k: int, num_exits: int, macs_spent: torch.Tensor,
               cost: ExitCost | None = None) -> torch.Tensor:
        obs = self.observe(probs, k, num_exits, macs_spent, cost.cascade[-1] if cost is not None else None)
        logits = self.mlp(obs)  # (B, 2)
        return logits[:, 1] > logits[:, 0]

    def should_exit(self, probs, k, num_exits, macs_spent):
        return self.decide(probs, k, num_exits, macs_spent)

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "path": str(self.path), "budget": self.budget,
                "trained": self.spec.meta}


register_policy("learned", LearnedPolicy)
