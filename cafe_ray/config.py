"""Typed experiment configuration, loaded from YAML with ``--set a.b=value`` overrides.

One pydantic model per concern; unknown keys and bad values are rejected with the
field path and what is allowed. The CLI and YAML files only *build* these models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# --------------------------------------------------------------------------- data
class PartitionConfig(_Strict):
    kind: Literal["iid", "dirichlet", "shards"] = "dirichlet"  # how labels are split over clients
    alpha: float = Field(0.3, gt=0)  # Dirichlet concentration (smaller = more skew)
    min_size: int = Field(10, ge=1)  # dirichlet: fewest training samples a client may hold
    shards_per_client: int = Field(2, ge=1)  # shards: label shards ("k") per client


class DataConfig(_Strict):
    name: Literal[
        "digits", "fashion_mnist", "cifar10", "cifar100", "tinyimagenet", "agnews", "synthetic"
    ] = "digits"  # dataset; digits is embedded (no download)
    root: str | None = None  # data root for real datasets (None = defaults, see README)
    num_clients: int = Field(10, ge=1)  # registered (virtual) clients
    partition: PartitionConfig = PartitionConfig()
    test_fraction: float = Field(0.2, gt=0, lt=1)  # client test size relative to its train size
    max_train_samples: int | None = Field(None, ge=1)  # subsample the pooled train set (speed)
    synthetic_samples: int = Field(2000, ge=10)  # synthetic: number of training samples
    synthetic_classes: int = Field(10, ge=2)  # synthetic: number of classes
    synthetic_shape: tuple[int, ...] = (1, 8, 8)  # synthetic: input shape (C, H, W)
    seq_len: int = Field(64, ge=4)  # agnews: tokens per sample
    vocab_size: int = Field(20000, ge=10)  # agnews: vocabulary size


# -------------------------------------------------------------------------- model
class ModelConfig(_Strict):
    name: Literal["auto", "cnn_small", "conv3", "resnet18_ee", "transformer4"] = "auto"
    # auto: cnn_small for digits/fashion_mnist/synthetic, conv3 for cifar10,
    # resnet18_ee for cifar100/tinyimagenet, transformer4 for agnews
    width: int = Field(32, ge=4)  # base channel width / embedding dim


# ---------------------------------------------------------------------- algorithm
class FedProxConfig(_Strict):
    mu_prox: float = Field(0.01, ge=0)  # weight of (mu_prox/2)*||theta - theta_global||^2


class SelectionConfig(_Strict):
    similarity: Literal["update_cosine", "head_cosine", "random"] = "update_cosine"
    # tier-2 conflict proxy (CAFEDISTILL.md step 3)
    schedule: Literal["progressive", "all"] = "progressive"  # all = every student every round
    order: Literal["shallow_first", "deep_first"] = "shallow_first"  # tier-1 depth priority


class CafeDistillConfig(_Strict):
    lam: float = Field(1.0, ge=0)  # lambda: KD weight (0 = no distillation)
    tau: float = Field(3.0, gt=0)  # distillation temperature
    mu: float = Field(0.5, gt=0)  # teacher-weight QP regulariser (small = own teacher)
    teachers: Literal["all_seen", "participants"] = "all_seen"  # pool of teacher heads j
    selection: SelectionConfig = SelectionConfig()


class FedRepConfig(_Strict):
    head_epochs: int = Field(1, ge=1)  # local epochs on the heads (backbone frozen) before the backbone's


class FedBABUConfig(_Strict):
    finetune_epochs: int = Field(5, ge=0)  # epochs of head fine-tuning before evaluation (0 = none)
    finetune_lr: float | None = Field(None, gt=0)  # fine-tuning learning rate (None = train.lr)


class DittoConfig(_Strict):
    lam: float = Field(0.1, ge=0)  # lambda: weight of (lambda/2)*||v - w_global||^2 on the personal model
    personal_epochs: int | None = Field(None, ge=1)  # epochs on the personal model (None = train.local_epochs)


class FedAMPConfig(_Strict):
    alpha_k: float = Field(1.0, gt=0)  # alpha_k: step of the attentive message passing (scales xi_ij)
    sigma: float = Field(10.0, gt=0)  # sigma: scale of A'(x) = exp(-x/sigma)/sigma, x = ||theta_i - theta_j||^2 (grows with model size)
    lam: float = Field(1.0, ge=0)  # lambda: local proximal weight is lambda/(2 alpha_k) * ||theta - u_i||^2


class PFedGraphConfig(_Strict):
    alpha: float = Field(0.8, gt=0)  # alpha: graph QP regulariser toward the data-size weights p
    lam: float = Field(0.01, ge=0)  # lambda: local pull lambda * (1 - cos(theta, theta_bar_i))


class FedRoDConfig(_Strict):
    personal_init: Literal["zero", "generic"] = "zero"  # personal heads start at zero or at a copy of the generic head


class FedPACConfig(_Strict):
    lam_proto: float = Field(1.0, ge=0)  # lambda: weight of the MSE feature alignment to the global prototypes
    head_epochs: int = Field(1, ge=1)  # local epochs on the heads (backbone frozen) before the backbone's
    head_lr: float | None = Field(None, gt=0)  # learning rate of the head phase (None = train.lr)
    min_weight: float = Field(1e-3, ge=0, lt=1)  # head-combination weights below this are zeroed (then renormalised)


class DepthFLConfig(_Strict):
    kd_weight: float = Field(1.0, ge=0)  # weight of the mutual self-distillation among a client's exits (0 = off)
    temperature: float = Field(1.0, gt=0)  # distillation temperature (DepthFL uses 1)
    rampup_rounds: int = Field(0, ge=0)  # kd weight ramps up as exp(-5(1 - t/R)^2) over R rounds (0 = constant)


class ScaleFLConfig(_Strict):
    kd_weight: float = Field(1.0, ge=0)  # gamma: weight of the KD from the deepest trained exit (0 = off)
    temperature: float = Field(3.0, gt=0)  # distillation temperature T
    kd_start: float = Field(0.25, ge=0, le=1)  # KD is on once round >= kd_start * T (ScaleFL: 25%)
    depth_weighted: bool = True  # weight exit j's loss by j+1 (ScaleFL), rescaled to mean 1 over trained exits


class AlgorithmConfig(_Strict):
    name: str = "fedavg_ee"  # registry name, see `cafe-ray algorithms`
    fedprox: FedProxConfig = FedProxConfig()
    cafedistill: CafeDistillConfig = CafeDistillConfig()
    fedrep: FedRepConfig = FedRepConfig()  # fedrep_ee
    fedbabu: FedBABUConfig = FedBABUConfig()  # fedbabu_ee
    ditto: DittoConfig = DittoConfig()  # ditto_ee
    fedamp: FedAMPConfig = FedAMPConfig()  # fedamp_ee
    pfedgraph: PFedGraphConfig = PFedGraphConfig()  # pfedgraph_ee
    fedrod: FedRoDConfig = FedRoDConfig()  # fedrod_ee
    fedpac: FedPACConfig = FedPACConfig()  # fedpac_ee
    depthfl: DepthFLConfig = DepthFLConfig()  # depthfl
    scalefl: ScaleFLConfig = ScaleFLConfig()  # scalefl


class TrainConfig(_Strict):
    local_epochs: int = Field(1, ge=1)  # E: passes over the client's data per round
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_steps: int | None = Field(None, ge=1)  # cap on local steps per round (None = epochs)


# ------------------------------------------------------------------- simulation
class RoundConfig(_Strict):
    num_rounds: int = Field(20, ge=1)  # T
    fraction: float = Field(1.0, gt=0, le=1)  # q: fraction of available clients sampled
    min_clients: int = Field(1, ge=1)  # at least this many participants when available
    deadline_s: float | None = Field(None, gt=0)  # virtual deadline; later clients dropped
    eval_every: int = Field(5, ge=1)  # evaluate every k rounds (and at the last round)
    eval_clients: Literal["all", "participants"] = "all"  # whom to evaluate


class ResourceClassOverride(_Strict):
    actors: int | None = Field(None, ge=1)  # pool size for this class
    num_cpus: float | None = Field(None, ge=0)
    num_gpus: float | None = Field(None, ge=0)
    memory: int | None = Field(None, ge=0)  # bytes
    resources: dict[str, float] | None = None  # custom Ray resources


class ProfilesConfig(_Strict):
    catalog: str = "uniform"  # named catalog (uniform, iot_mix, ...) or a trace file path
    actors_per_class: int = Field(2, ge=1)  # default pool size per resource class
    classes: dict[str, ResourceClassOverride] = {}  # per-class overrides of the catalog


class CheckpointConfig(_Strict):
    every: int = Field(5, ge=1)  # checkpoint every k rounds (and at the last round)
    keep: int = Field(2, ge=1)  # how many checkpoints to keep


class ExperimentConfig(_Strict):
    name: str = "experiment"  # run directory prefix
    seed: int = 0  # every random choice derives from (seed, round, client)
    output_dir: str = "runs"  # where run directories are created
    executor: Literal["ray", "sequential"] = "ray"  # sequential: in-process, for debugging
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    train: TrainConfig = TrainConfig()
    round: RoundConfig = RoundConfig()
    profiles: ProfilesConfig = ProfilesConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()



# ------------------------------------------------------------------ loading
def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling (see the configuration reference in README)"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a raw config dict."""
    out = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set round.num_rounds=5")
        key, _, value = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is a value, not a section")
            node = nxt
        node[parts[-1]] = _parse_value(value)
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def build_config(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML config (or defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p} (pass a YAML file, e.g. simulations/quickstart.yaml)")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
        source = str(p)
    raw = apply_overrides(raw, overrides or [])
    return build_config(raw, source)


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
