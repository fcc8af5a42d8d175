"""Typed experiment configuration, loaded from YAML with ``--set a.b=value`` overrides.

One pydantic model per concern; unknown keys and bad values are rejected with the
field path and what is allowed. The CLI and YAML files only *build* these models.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# --------------------------------------------------------------------------- data
class PartitionConfig(_Strict):
    kind: Literal["iid", "dirichlet", "shards"] = Field(
        "dirichlet", description="how labels are split over clients: iid, dirichlet (Dirichlet(alpha) "
                                 "label skew) or shards (k pathological label shards per client)")
    alpha: float = Field(0.3, gt=0, description="dirichlet: concentration (smaller = more skew)")
    min_size: int = Field(10, ge=1, description="dirichlet: fewest training samples a client may hold")
    shards_per_client: int = Field(2, ge=1, description="shards: label shards (k) per client")


BUILTIN_DATASETS: tuple[str, ...] = (
    "digits", "fashion_mnist", "cifar10", "cifar100", "tinyimagenet", "agnews", "synthetic", "parquet",
)
BUILTIN_MODELS: tuple[str, ...] = ("cnn_small", "conv3", "resnet18_ee", "transformer4")


def _check_name(kind: str, name: str, builtin: tuple[str, ...]) -> str:
    """``name`` when it is built in, an import path or an installed entry point."""
    if name in builtin or is_import_path(name) or name in entry_point_names(kind):
        return name
    raise ValueError(f"unknown {kind} {name!r}; allowed: {', '.join(builtin)}, an installed "
                     f"entry point ({PLUGIN_GROUPS[kind]}) or your own package.module:Name")


class DataConfig(_Strict):
    name: str = Field(
        "digits", description="dataset: " + ", ".join(f"`{n}`" for n in BUILTIN_DATASETS) + "; digits is "
                              "embedded (no download); the real datasets load from their standard file "
                              "formats under root; synthetic is generated; parquet reads your own "
                              "Parquet/Arrow files (path, features, label, client); or your own loader "
                              "as package.module:function (docs/bring-your-own.md)")
    root: str | None = Field(None, description="data root of the real datasets (null = $CAFE_RAY_DATA, "
                                               "else ~/.cache/cafe-ray/data); only Fashion-MNIST is "
                                               "ever downloaded (when a network is reachable)")
    num_clients: int = Field(10, ge=1, description="registered (virtual) clients")
    partition: PartitionConfig = Field(PartitionConfig(), description="how the pooled training set is split "
                                                                        "over the clients")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="client test size relative to its train size; "
                                                              "follows the client's label distribution")
    val_fraction: float = Field(
        0.0, ge=0, lt=1,
        description="fraction of each client's training data held out as its validation split "
                    "(stratified by the client's labels, deterministic in the seed); sweeps, "
                    "studies and exit-threshold calibration read it instead of the test split. "
                    "0 = no validation split")
    max_train_samples: int | None = Field(None, ge=1, description="subsample the pooled training set to this "
                                                                  "many samples, for speed (null = all)")
    synthetic_samples: int = Field(2000, ge=10, description="synthetic: number of training samples")
    synthetic_classes: int = Field(10, ge=2, description="synthetic: number of classes")
    synthetic_shape: tuple[int, ...] = Field((1, 8, 8), description="synthetic: input shape (C, H, W)")
    seq_len: int = Field(64, ge=4, description="agnews: tokens per sample")
    vocab_size: int = Field(20000, ge=10, description="agnews, and parquet token-id features: vocabulary "
                                                      "size (every id must lie below it)")
    path: str | None = Field(None, description="parquet: the training table, a Parquet file or a folder of "
                                               "Parquet files (or of the .arrow files of a Hugging Face "
                                               "save_to_disk folder)")
    test_path: str | None = Field(None, description="parquet: a separate test table, same columns (null = "
                                                    "each client's test split is held out of its rows)")
    features: str | list[str] | None = Field(
        None, description="parquet: one list / fixed-size-list column per sample (reshaped by shape), or a "
                          "list of numeric columns (one value each)")
    shape: tuple[int, ...] | None = Field(
        None, description="parquet: the per-sample input shape, e.g. [1, 28, 28] for images (C, H, W) or "
                          "[64] for token ids (null = one flat vector)")
    label: str = Field("label", description="parquet: the integer class-id column (0..K-1)")
    client: str | None = Field(
        None, description="parquet: natural partition: one client per distinct value of this column, in "
                          "sorted order; num_clients may then be omitted and partition is not used")
    standardize: bool = Field(
        True, description="parquet: standardise float features per channel (the first axis of shape) with "
                          "the training split's mean and std, which the run stores in data_stats.json")

    options: dict[str, Any] = Field(
        {}, description="a plug-in dataset's own settings (data.name: package.module:function), free "
                        "keys it reads from the DataConfig it gets")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return _check_name("data", v, BUILTIN_DATASETS)

    @model_validator(mode="after")
    def _parquet_fields(self) -> DataConfig:
        if self.name == "parquet" and (self.path is None or self.features is None):
            missing = " and ".join(f for f in ("path", "features") if getattr(self, f) is None)
            raise ValueError(f"data.name=parquet needs data.{missing.replace(' and ', ' and data.')} "
                             "(the table and its feature column(s); docs/bring-your-own.md)")
        if self.shape is not None and (not self.shape or min(self.shape) < 1):
            raise ValueError(f"data.shape={list(self.shape)}: need positive sizes, e.g. [1, 28, 28]")
        return self


# -------------------------------------------------------------------------- model
class ModelConfig(_Strict):
    name: str = Field(
        "auto", description="early-exit architecture (`cafe-ray models`): `auto`, "
                            + ", ".join(f"`{n}`" for n in BUILTIN_MODELS) + ", or your own builder as "
                            "package.module:function (docs/bring-your-own.md); auto picks by dataset: "
                            "cnn_small for digits/fashion_mnist/synthetic, conv3 for cifar10, resnet18_ee "
                            "for cifar100/tinyimagenet, transformer4 for agnews, and by input shape for "
                            "parquet and plug-in datasets")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return _check_name("model", v, ("auto", *BUILTIN_MODELS))
    width: int = Field(32, ge=4, description="base channel width (CNNs) / embedding size (transformer4)")


# ---------------------------------------------------------------------- algorithm
class FedProxConfig(_Strict):
    mu_prox: float = Field(0.01, ge=0, description="fedprox_ee: proximal weight of "
                                                   "(mu_prox/2)*||theta - theta_global||^2")


class SelectionConfig(_Strict):
    similarity: Literal["update_sketch", "update_cosine", "head_cosine", "random"] = Field(
        "update_sketch",
        description="tier-2 conflict proxy (CAFEDISTILL.md step 3). update_sketch: cosine of the client's "
                    "backbone update to the same round's aggregate of the OTHER participants (leave-one-out), "
                    "on a fixed-size count sketch, so the server keeps m-1 floats per client; update_cosine: "
                    "the spec's proxy (full stored update vs the previous aggregate); head_cosine; random")
    sketch_dim: int = Field(
        1024, ge=8, description="update_sketch: buckets of the count sketch of each stage's update")
    schedule: Literal["progressive", "all"] = Field(
        "progressive", description="progressive: the student budget follows R(t) = min(2t/T, 1); "
                                   "all: every student every round")
    order: Literal["shallow_first", "deep_first"] = Field(
        "shallow_first", description="tier-1 depth priority: shallow_first or deep_first")
    schedule_clock: Literal["global", "client"] = Field(
        "client",
        description="clock of R(t): global = the round t; client = the client's own visit count v_i over "
                    "its expected visits T*n_t/n (equal to global under full participation), so that under "
                    "partial participation a client's students are not scheduled by rounds it never saw")
    ramp: float = Field(
        0.25, gt=0, le=1,
        description="fraction of the run (of T, or of the expected visits under schedule_clock=client) over "
                    "which R grows to 1: R(t) = min(t / (ramp * T), 1); 0.5 is the spec's min(2t/T, 1)")


# The specification's original defaults (docs/specification.md steps 1-9, before
# the validation study): `algorithm.cafedistill.preset: spec` restores them; fields
# given explicitly still win over the preset.
CAFEDISTILL_SPEC_PRESET: dict[str, Any] = {
    "lam": 1.0, "tau": 3.0, "mu": 0.5, "kd_backbone": "full", "kd_warmup": "none", "kd_start_round": 0,
    "kd_needs_trained_teacher": False, "kd_gate": "none", "kd_target": "full", "center_heads": False,
    "own_head": "stored", "unselected": "frozen", "heads": "personal", "kd_last_exit": False,
    "residual_init": "zero", "kd_shared": "none", "residual_ce": "detached", "residual_generic": "live",
    "selection": {"similarity": "update_cosine", "schedule_clock": "global", "ramp": 0.5},
}


# Fields added after runs were made, with the value that reproduces a run whose saved config
# predates the field (the study cache reuses such a run only when the field has that value).
LEGACY_VALUES: dict[str, Any] = {
    "algorithm.cafedistill.heads": "personal",
    "algorithm.cafedistill.kd_last_exit": False,
    "algorithm.cafedistill.selection.ramp": 0.5,
    "algorithm.cafedistill.residual_init": "zero",
    "algorithm.cafedistill.kd_shared": "none",
    "algorithm.cafedistill.residual_ce": "detached",
    "algorithm.cafedistill.residual_generic": "live",
    "algorithm.cafedistill.teacher": "qp",
    "algorithm.cafedistill.teacher_distance": "head",
    "algorithm.cafedistill.measure_interference": False,
    "algorithm.cafedistill.kd_exit_gate": "none",
    "algorithm.fedrod.personal_ce": "detached",
    "algorithm.fedrod.personal_generic": "live",
    "algorithm.fedper.head_init": "shared",
    "algorithm.fedrep.head_init": "shared",
}


class CafeDistillConfig(_Strict):
    preset: Literal["default", "spec"] = Field(
        "default",
        description="default = the defaults chosen by the validation study (docs/results.md, "
                    "'Choosing CAFEDistill's defaults'); spec = the specification's original defaults "
                    "(lam 1, tau 3, mu 0.5, KD into the backbone from round 0, frozen unselected heads, "
                    "update_cosine). Fields set explicitly override the preset")
    lam: float = Field(1.0, ge=0, description="lambda: KD weight (0 = no distillation); the KD term is "
                                                "lambda * tau^2 * KL, so lambda*tau^2 is the effective weight "
                                                "(1, the specification's, re-chosen on validation with "
                                                "residual_ce: backbone; CHANGELOG.md has the earlier values)")
    tau: float = Field(3.0, gt=0, description="tau: distillation temperature")
    mu: float = Field(2.0, gt=0, description="mu: teacher-weight QP regulariser (small = own teacher, "
                                               "large = uniform over the pool)")
    teachers: Literal["all_seen", "participants"] = Field(
        "all_seen", description="pool of teacher heads j: all_seen (every stored last-exit head) or "
                                "participants (this round's participants)")
    kd_backbone: Literal["full", "detach", "scaled"] = Field(
        "full",
        description="how the KD gradient reaches the backbone stages feeding a student: full; detach (KD "
                    "trains the student head on detached features, CE still trains the backbone); scaled "
                    "(the KD gradient into the backbone times kd_backbone_scale)")
    kd_backbone_scale: float = Field(0.5, ge=0, le=1, description="kd_backbone=scaled: backbone gradient factor")
    kd_warmup: Literal["none", "progress", "round"] = Field(
        "progress",
        description="KD warm-up: none (lambda from round 0); progress (lambda * R(t), on the schedule's "
                    "clock); round (lambda from round kd_start_round on, 0-based)")
    kd_start_round: int = Field(0, ge=0, description="kd_warmup=round: the first round with KD")
    kd_needs_trained_teacher: bool = Field(
        True, description="no KD while the teacher pool holds no trained head (round 0: the initial head)")
    kd_gate: Literal["none", "teacher_correct", "teacher_confident"] = Field(
        "teacher_confident",
        description="per-sample gating of KD: none; teacher_correct (distil only where the aggregated "
                    "teacher's argmax is the label); teacher_confident (only where the teacher's "
                    "probability of the label exceeds the student's)")
    kd_exit_gate: Literal["none", "teacher_better"] = Field(
        "none",
        description="per-round gating of KD by exit: none; teacher_better (before local training, a student "
                    "exit is distilled this round only if the aggregated teacher's accuracy on the client's "
                    "training data is above that exit's own: no KD toward a teacher weaker than the student)")
    kd_target: Literal["full", "own_classes", "prior_corrected"] = Field(
        "own_classes",
        description="label-aware KD target: full (KL over every class); own_classes (KL restricted to "
                    "and renormalised over the classes in the client's training labels; chosen on "
                    "validation); prior_corrected (teacher logits + log of "
                    "the client's label prior)")
    center_heads: bool = Field(
        True, description="teacher weights from D_ij = 1 - cos(h_i - h_init, h_j - h_init): distances of "
                          "what training changed, not of the shared initial weights")
    own_head: Literal["stored", "live"] = Field(
        "stored",
        description="the client's own term in hbar_i: stored (its last upload) or live (the server sends "
                    "sum_{j!=i} w_ij h_j and w_ii; the client adds w_ii times its current head; same traffic)")
    kd_last_exit: bool = Field(
        False, description="also distil the teacher exit m itself from hbar_i (its own term included), so a "
                           "client's last head borrows from similar clients' heads; off in the specification")
    residual_init: Literal["zero", "prior"] = Field(
        "prior", description="heads=generic_residual: a client's residual heads start at zero (FedRoD's "
                             "choice) or with the log of its label prior as bias (prior: its personal "
                             "logits start as the Bayes correction of the balanced generic head)")
    heads: Literal["personal", "generic_residual"] = Field(
        "generic_residual",
        description="exit heads: personal (spec: every head personal, only the backbone shared); "
                    "generic_residual (every exit also has a shared generic head trained by balanced "
                    "softmax and averaged, as FedRoD; a client's exit logits are generic + its personal "
                    "residual head on detached features, and CE, KD and the schedule act on those)")
    kd_shared: Literal["none", "personal", "generic"] = Field(
        "personal",
        description="heads=generic_residual: what KD reaches beyond the residual heads. none (KD moves the "
                    "students' residual heads only); personal (the KD gradient of a student's personal "
                    "logits also flows into its generic head and the backbone under it); generic (an extra "
                    "KD term, same lambda_t, tau and gate, distils the generic last exit, the average of "
                    "every client's last head, into the students' generic exits and the backbone). With "
                    "heads=personal there is no generic stack: kd_backbone sets the KD path and 'generic' "
                    "is an error")
    residual_ce: Literal["detached", "backbone"] = Field(
        "backbone",
        description="heads=generic_residual: what the personal CE trains. detached (FedRoD: the residual "
                    "heads only, on detached features); backbone (the same "
                    "logits, computed so that the CE gradient also reaches the backbone stages, as "
                    "FedPer-EE's personal CE does; never the generic heads, which BSM alone trains; chosen "
                    "on validation). No effect with heads=personal, whose CE trains the "
                    "backbone already")
    residual_generic: Literal["live", "received", "received_ce"] = Field(
        "received_ce",
        description="heads=generic_residual: the generic head a client's residual heads are added to while "
                    "it trains. live (FedRoD: its generic head as BSM moves it during local training); "
                    "received (the round's global generic head, held fixed: the head its personal logits "
                    "use at inference, after the server averages). Under received the personal CE and KD "
                    "never reach the generic heads; received_ce puts only the personal CE on the received "
                    "heads and leaves KD on the live logits (kd_shared still reaches the generic heads; "
                    "chosen on validation). No effect with heads=personal")
    unselected: Literal["frozen", "ce_detached", "excluded"] = Field(
        "ce_detached",
        description="exits outside S_i (the teacher excepted). frozen (spec): their personal heads are out of "
                    "the optimizer and their personal CE is dropped; ce_detached: they are trained by their "
                    "personal CE like a selected student, without KD (with heads=personal on detached "
                    "features; under generic_residual the CE follows residual_ce, so with residual_ce=backbone "
                    "it reaches the backbone and S_i changes no gradient but KD's); excluded: no term at all, "
                    "also no balanced softmax of their generic heads, which the server then averages over the "
                    "clients that trained them (an unselected exit sends no gradient anywhere, as the "
                    "specification's step 3 says; the same as frozen with heads=personal)")
    teacher: Literal["qp", "uniform", "own"] = Field(
        "qp",
        description="teacher weights w_ij: qp (the specification's QP on head distances, step 4); uniform (the "
                    "mean of the pool's heads); own (the client's own stored last head: local self-distillation). "
                    "A client without a stored head gets the pool's mean head under all three")
    teacher_distance: Literal["head", "weights"] = Field(
        "head",
        description="what D_ij = 1 - cos compares: head (weight and bias, the specification's h_j) or weights "
                    "(the weight matrices only: a last head's bias mostly encodes its client's label prior, so "
                    "whole-head cosines largely measure label-support overlap)")
    measure_interference: bool = Field(
        False,
        description="diagnostic, no effect on training: before local training, the cosine between every pair of "
                    "exits' loss gradients on the backbone stages they share (one batch), recorded per client "
                    "and round as grad_cos_k_l in clients.jsonl (`cafe-ray interference RUN_DIR`)")
    selection: SelectionConfig = Field(SelectionConfig(), description="student schedule and selection "
                                                                       "(CAFEDISTILL.md steps 2-3)")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """preset: spec fills every field not given explicitly with the specification's value."""
        if not isinstance(data, dict) or data.get("preset") != "spec":
            return data
        out = dict(data)
        for key, value in CAFEDISTILL_SPEC_PRESET.items():
            if key == "selection":
                sel = out.get("selection") or {}
                if isinstance(sel, BaseModel):
                    sel = sel.model_dump(exclude_unset=True)
                out["selection"] = {**value, **sel}
            elif key not in out:
                out[key] = value
        return out

    @model_validator(mode="after")
    def _kd_shared_needs_generic_heads(self) -> CafeDistillConfig:
        if self.kd_shared == "generic" and self.heads != "generic_residual":
            raise ValueError(
                "algorithm.cafedistill.kd_shared='generic' needs heads: generic_residual (personal heads "
                "have no generic exits to distil); set kd_shared: personal or none")
        return self


HEAD_INIT_DESCRIPTION = ("a client's personal exit heads at its first visit: shared (the model's initial heads) "
                         "or prior (the same, plus the log of the client's label prior in every exit's final "
                         "bias: the prior initialisation CAFEDistill's residual heads use)")


class FedPerConfig(_Strict):
    head_init: Literal["shared", "prior"] = Field("shared", description=HEAD_INIT_DESCRIPTION)


class FedRepConfig(_Strict):
    head_epochs: int = Field(1, ge=1, description="local epochs on the heads (backbone frozen) before the "
                                                  "backbone's")
    head_init: Literal["shared", "prior"] = Field("shared", description=HEAD_INIT_DESCRIPTION)


class FedBABUConfig(_Strict):
    finetune_epochs: int = Field(5, ge=0, description="epochs of head fine-tuning on the client's train split "
                                                      "before every evaluation and when served (0 = none)")
    finetune_lr: float | None = Field(None, gt=0, description="fine-tuning learning rate (null = train.lr)")


class DittoConfig(_Strict):
    lam: float = Field(0.1, ge=0, description="lambda: weight of (lambda/2)*||v - w_global||^2 on the "
                                              "personal model")
    personal_epochs: int | None = Field(None, ge=1, description="epochs on the personal model "
                                                                "(null = train.local_epochs)")


class FedAMPConfig(_Strict):
    alpha_k: float = Field(1.0, gt=0, description="alpha_k: step of the attentive message passing (scales xi_ij)")
    sigma: float = Field(10.0, gt=0, description="sigma: scale of A'(x) = exp(-x/sigma)/sigma, "
                                                 "x = ||theta_i - theta_j||^2 (grows with model size)")
    lam: float = Field(1.0, ge=0, description="lambda: the local proximal term is "
                                              "lambda/(2 alpha_k) * ||theta - u_i||^2")
    min_self_weight: float = Field(
        0.5, ge=0, le=1,
        description="floor of the own weight xi_ii in u_i: when the neighbours' attention weights sum above "
                    "1 - min_self_weight they are rescaled to that sum (0 = the old rule, whose own weight "
                    "went to 0 with the default sigma)")


class PFedGraphConfig(_Strict):
    alpha: float = Field(0.8, gt=0, description="alpha: graph QP regulariser toward the data-size weights p")
    lam: float = Field(0.01, ge=0, description="lambda: local pull lambda * (1 - cos(theta, theta_bar_i))")


class FedRoDConfig(_Strict):
    personal_init: Literal["zero", "generic", "prior"] = Field(
        "zero", description="personal heads start at zero, at a copy of the generic head, or at zero weights "
                            "with the log of the client's label prior as bias (the Bayes correction of the "
                            "balanced generic head, before any training)")
    personal_ce: Literal["detached", "backbone"] = Field(
        "detached",
        description="what the personal CE trains: detached (FedRoD: the personal heads only, on detached "
                    "features) or backbone (the same logits, with the gradient also reaching the backbone "
                    "stages, as FedPer-EE's personal CE does; never the generic heads, which the balanced "
                    "softmax alone trains). CAFEDistill's residual_ce")
    personal_generic: Literal["live", "received"] = Field(
        "live",
        description="the generic head a personal head is added to in the personal CE: live (FedRoD: the "
                    "client's generic head as its balanced softmax moves it) or received (the round's global "
                    "generic head, held fixed: the one the personal logits use at inference, after the server "
                    "averages). CAFEDistill's residual_generic: received_ce")


class FedPACConfig(_Strict):
    lam_proto: float = Field(1.0, ge=0, description="lambda: weight of the MSE feature alignment to the global "
                                                    "prototypes")
    head_epochs: int = Field(1, ge=1, description="local epochs on the heads (backbone frozen) before the "
                                                  "backbone's")
    head_lr: float | None = Field(None, gt=0, description="learning rate of the head phase (null = train.lr)")
    min_weight: float = Field(1e-3, ge=0, lt=1, description="head-combination weights below this are zeroed "
                                                            "(then renormalised)")


class DepthFLConfig(_Strict):
    kd_weight: float = Field(1.0, ge=0, description="weight of the mutual self-distillation among a client's "
                                                    "exits (0 = off)")
    temperature: float = Field(1.0, gt=0, description="distillation temperature (DepthFL uses 1)")
    rampup_rounds: int = Field(0, ge=0, description="the KD weight ramps up as exp(-5(1 - t/R)^2) over R "
                                                    "rounds (0 = constant)")


class ScaleFLConfig(_Strict):
    kd_weight: float = Field(1.0, ge=0, description="gamma: weight of the KD from the deepest trained exit "
                                                    "(0 = off)")
    temperature: float = Field(3.0, gt=0, description="distillation temperature T")
    kd_start: float = Field(0.25, ge=0, le=1, description="KD is on once round >= kd_start * T (ScaleFL: 25%)")
    depth_weighted: bool = Field(True, description="weight exit j's loss by j+1 (ScaleFL), rescaled to mean 1 "
                                                   "over the trained exits")


# The built-in algorithms' registry names, known without importing them (and torch): preflight
# checks algorithm.name against these before Ray starts; a test keeps them equal to the registry.
BUILTIN_ALGORITHMS: tuple[str, ...] = (
    "cafedistill", "depthfl", "ditto_ee", "fedamp_ee", "fedavg_ee", "fedbabu_ee", "fedpac_ee", "fedper_ee",
    "fedprox_ee", "fedrep_ee", "fedrod_ee", "local_ee", "pfedgraph_ee", "scalefl",
)
# Those that train in batched cohorts (engine.vectorize), known the same way (a test keeps them
# equal to the classes' own ``vectorizable``): preflight warns when vectorize is asked of another.
BUILTIN_VECTORIZABLE: tuple[str, ...] = ("fedavg_ee", "fedper_ee", "fedrod_ee")


class AlgorithmConfig(_Strict):
    name: str = Field("fedavg_ee", description="registry name of the algorithm (`cafe-ray algorithms`), an "
                                               "installed entry point (cafe_ray.algorithms) or your own "
                                               "class as package.module:Name (docs/bring-your-own.md)")
    options: dict[str, Any] = Field(
        {}, description="a plug-in algorithm's hyperparameters: passed to its constructor as keyword "
                        "arguments (it validates them); built-in algorithms read their own section")
    fedprox: FedProxConfig = Field(FedProxConfig(), description="fedprox_ee hyperparameters")
    cafedistill: CafeDistillConfig = Field(CafeDistillConfig(), description="cafedistill hyperparameters "
                                                                             "(docs/algorithms.md)")
    fedper: FedPerConfig = Field(FedPerConfig(), description="fedper_ee hyperparameters")
    fedrep: FedRepConfig = Field(FedRepConfig(), description="fedrep_ee hyperparameters")
    fedbabu: FedBABUConfig = Field(FedBABUConfig(), description="fedbabu_ee hyperparameters")
    ditto: DittoConfig = Field(DittoConfig(), description="ditto_ee hyperparameters")
    fedamp: FedAMPConfig = Field(FedAMPConfig(), description="fedamp_ee hyperparameters")
    pfedgraph: PFedGraphConfig = Field(PFedGraphConfig(), description="pfedgraph_ee hyperparameters")
    fedrod: FedRoDConfig = Field(FedRoDConfig(), description="fedrod_ee hyperparameters")
    fedpac: FedPACConfig = Field(FedPACConfig(), description="fedpac_ee hyperparameters")
    depthfl: DepthFLConfig = Field(DepthFLConfig(), description="depthfl hyperparameters")
    scalefl: ScaleFLConfig = Field(ScaleFLConfig(), description="scalefl hyperparameters")


class TrainConfig(_Strict):
    local_epochs: int = Field(1, ge=1, description="E: local passes over the client's data per round")
    batch_size: int = Field(32, ge=1, description="local SGD batch size")
    lr: float = Field(0.05, gt=0, description="local SGD learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="local SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="local SGD weight decay")
    max_steps: int | None = Field(None, ge=1, description="cap on local steps per round (null = local_epochs "
                                                          "full passes)")


# ------------------------------------------------------------------- simulation
class RoundConfig(_Strict):
    num_rounds: int = Field(20, ge=1, description="T: number of rounds")
    fraction: float = Field(1.0, gt=0, le=1, description="q: fraction of the online clients sampled per round")
    min_clients: int = Field(1, ge=1, description="at least this many participants when that many are online")
    deadline_s: float | None = Field(None, gt=0, description="virtual deadline of a round in seconds; later "
                                                             "clients are dropped and reported (null = the round "
                                                             "lasts until its slowest participant)")
    eval_every: int = Field(5, ge=1, description="evaluate every k rounds (and at the last round)")
    eval_clients: str = Field(
        "auto", pattern=r"^(auto|all|participants|sample:[1-9][0-9]*)$",
        description="whom an evaluation round evaluates: all registered clients; participants (this "
                    "round's); sample:K (K clients drawn per evaluation round from (seed, round), the same "
                    "K for every algorithm); auto = all up to 1000 registered clients, else sample:1000. "
                    "metrics.jsonl records the resolved choice as eval_scope")


class ResourceClassOverride(_Strict):
    actors: int | None = Field(None, ge=1, description="pool size of this class (null = "
                                                       "profiles.actors_per_class)")
    num_cpus: float | None = Field(None, ge=0, description="Ray num_cpus of each actor (null = the catalog's)")
    num_gpus: float | None = Field(None, ge=0, description="Ray num_gpus of each actor (null = the catalog's)")
    memory: int | None = Field(None, ge=0, description="Ray memory of each actor in bytes (null = the "
                                                       "catalog's)")
    resources: dict[str, float] | None = Field(
        None, description="custom Ray resources of each actor, e.g. {edge_gpu: 1}: only nodes that "
                          "advertise them host the class (docs/scale-out.md)")


class ProfilesConfig(_Strict):
    catalog: str = Field("uniform", description="device catalog: a named one (uniform, iot_mix; "
                                                "`cafe-ray profiles`), a FedScale-style JSON trace path, "
                                                "or your own as package.module:Name (a Catalog, or a "
                                                "function returning one) or an entry point "
                                                "(cafe_ray.catalogs)")
    actors_per_class: int = Field(2, ge=1, description="pool size per resource class (shrunk to what the "
                                                       "cluster can host)")
    classes: dict[str, ResourceClassOverride] = Field(
        {}, description="per-class overrides of the catalog's Ray options, by resource-class name")
    autoscale_timeout_s: float = Field(
        300.0, ge=0,
        description="on a cluster with an autoscaler (`ray up`), how long a simulation waits for it to add "
                    "the nodes its client actor pools need before shrinking the pools to what is up "
                    "(0 = do not wait; the request stands, so pools grow when nodes join later)")


class EngineConfig(_Strict):
    chunk_clients: int | None = Field(
        None, ge=1,
        description="virtual clients per Ray task (one actor call trains a chunk and returns numpy "
                    "arrays); None = adaptive: one chunk per actor, balanced by the clients' samples "
                    "(at most 64 clients each). Metrics do not depend on it")
    vectorize: Literal["off", "on", "auto"] = Field(
        "off",
        description="train a chunk's clients as one batched computation when the algorithm supports it "
                    "(`cafe-ray algorithms`): CNNs as one grouped-kernel network C clients wide, other "
                    "models under torch.func.vmap; cohorts group clients of similar local work. "
                    "on = always; auto = each actor times its first "
                    "cohorts both ways and keeps the faster (the choice, and so the float rounding, "
                    "may then differ between runs); off = one client after the other. true/false "
                    "mean on/off. Results match the plain path up to float rounding (which SGD "
                    "amplifies over many local steps) and are deterministic for a given chunk")

    @field_validator("vectorize", mode="before")
    @classmethod
    def _vectorize_bool(cls, v: object) -> object:
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    gpu_standin: Literal["cpu"] | None = Field(
        None,
        description="a device that takes the place of the GPU a resource class reserves (num_gpus): "
                    "cpu runs a GPU class's device path (the device chosen from the actor's GPU ids, "
                    "model, batches and state moved there and back) on a machine without CUDA. "
                    "None = the actor trains on its GPU (cuda:N) when torch sees CUDA, else on the "
                    "CPU with a warning")


class CheckpointConfig(_Strict):
    every: int = Field(5, ge=1, description="checkpoint every k rounds (and at the last round)")
    keep: int = Field(2, ge=1, description="how many checkpoints to keep (the last n)")


class LoggingConfig(_Strict):
    tensorboard: bool = Field(
        False, description="also write every round's metrics as TensorBoard event files under "
                           "<run dir>/tensorboard (tensorboardX, which Ray Tune installs): "
                           "`tensorboard --logdir runs`")


class ExperimentConfig(_Strict):
    name: str = Field("experiment", description="run directory prefix")
    seed: int = Field(0, description="every random choice derives from (seed, round, client, stream)")
    output_dir: str = Field("runs", description="where run directories are created")
    executor: Literal["ray", "sequential"] = Field(
        "ray", description="ray (actor pools per resource class) or sequential (in-process, for "
                           "debugging; same results)")
    data: DataConfig = Field(DataConfig(), description="the dataset and its split over clients")
    model: ModelConfig = Field(ModelConfig(), description="the early-exit network")
    algorithm: AlgorithmConfig = Field(AlgorithmConfig(), description="the federated algorithm and its "
                                                                       "hyperparameters")
    train: TrainConfig = Field(TrainConfig(), description="local training (SGD) on a client")
    round: RoundConfig = Field(RoundConfig(), description="rounds, sampling, deadlines, evaluation")
    profiles: ProfilesConfig = Field(ProfilesConfig(), description="device profiles and the Ray resource "
                                                                    "classes that run them")
    engine: EngineConfig = Field(EngineConfig(), description="how the executor batches client work")
    checkpoint: CheckpointConfig = Field(CheckpointConfig(), description="crash-safe checkpoints (--resume)")
    logging: LoggingConfig = Field(LoggingConfig(), description="extra logs of a run's metrics")



# ------------------------------------------------------------------ plug-ins
# An algorithm, a model or a dataset of your own: ``package.module:Name`` (imported from the
# working folder, PYTHONPATH or an installed package), or the name of an entry point that an
# installed distribution declares in one of these groups.
PLUGIN_GROUPS: dict[str, str] = {
    "algorithm": "cafe_ray.algorithms", "model": "cafe_ray.models", "data": "cafe_ray.datasets",
    "profiles.catalog": "cafe_ray.catalogs",
}


def is_import_path(name: str) -> bool:
    """``package.module:Name`` (dotted identifiers on both sides of one colon)."""
    module, sep, attr = name.partition(":")
    return bool(sep) and all(p.isidentifier() for p in (*module.split("."), *attr.split(".")))


def entry_point_names(kind: str) -> dict[str, str]:
    """name -> ``module:attr`` of the entry points installed for ``kind`` (algorithm, model, data)."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=PLUGIN_GROUPS[kind])}


def plugin_target(kind: str, name: str) -> str | None:
    """``module:attr`` that a ``kind`` field (``algorithm`` for ``algorithm.name``, ...) names
    when it names a plug-in, else None."""
    if is_import_path(name):
        return name
    return entry_point_names(kind).get(name)


def search_working_folder() -> None:
    """Put the working folder on ``sys.path`` (last) where it is not: the ``cafe-ray`` script
    starts with its own folder there instead, and plug-ins sit next to the config."""
    import os
    import sys

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())


def load_plugin(kind: str, name: str) -> Any:
    """The object a plug-in name refers to; a ConfigError naming ``<kind>.name`` otherwise.

    The working folder is searched too (where the ``cafe-ray`` script does not put it on
    ``sys.path``), so ``mymodule:MyAlgorithm`` next to the config just works.
    """
    import importlib

    field = kind if "." in kind else f"{kind}.name"  # profiles.catalog; algorithm.name, ...
    target = plugin_target(kind, name)
    if target is None:
        raise ConfigError(f"{field}={name!r}: not a built-in name, an installed entry point "
                          f"({PLUGIN_GROUPS[kind]}) or an import path package.module:Name")
    module_name, _, attr = target.partition(":")
    search_working_folder()
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{field}={name}: cannot import {module_name!r} ({err}); put it in the "
                          "working folder or on PYTHONPATH, or install its package") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{field}={name}: {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


def plugin_modules(cfg: ExperimentConfig) -> list[str]:
    """Top-level modules of the plug-ins ``cfg`` names by import path: what Ray's workers need."""
    names = (cfg.algorithm.name, cfg.model.name, cfg.data.name, cfg.profiles.catalog)
    return sorted({n.partition(":")[0].split(".")[0] for n in names if is_import_path(n)})


# ------------------------------------------------------------------ loading
def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling (see docs/configuration.md or `cafe-ray config-reference`)"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a raw config dict."""
    out = deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set round.num_rounds=5")
        key, _, value = item.partition("=")
        set_dotted(out, key, _parse_value(value), f"--set {item!r}")
    return out


def set_dotted(raw: dict[str, Any], key: str, value: Any, where: str | None = None) -> None:
    """``raw[a][b][c] = value`` for ``key`` "a.b.c" (sections created as needed), in place."""
    where = where or f"override {key!r}"
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"{where}: empty key")
    node = raw
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: {p!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def deep_copy(d: Mapping[str, Any]) -> dict[str, Any]:
    """Nested mappings as fresh dicts (values shared): what overrides may write into."""
    return {k: deep_copy(v) if isinstance(v, Mapping) else v for k, v in d.items()}


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


def fill_legacy(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (a config a run saved) with every LEGACY_VALUES field it predates set to the old behaviour."""
    for key, value in LEGACY_VALUES.items():
        *parents, leaf = key.split(".")
        node: Any = raw
        for part in parents:  # a section the run predates entirely is created
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(leaf, value)
    return raw


def load_saved_config(path: str | Path) -> ExperimentConfig:
    """The config a run directory saved, read as that run was made.

    A field added after the run gets the value that reproduces it
    (``LEGACY_VALUES``), not today's default: a CAFEDistill run saved before
    ``heads`` existed had personal heads, and must load them.
    """
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{p}: cannot read the saved config: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return build_config(fill_legacy(raw), str(p))


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
