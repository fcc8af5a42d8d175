"""A fitted exit policy: combined exits, then a threshold or a learned cascade, swept to a MAC budget.

Two stages, both fitted on validation traces (:func:`fit_cascade`, ``cafe-ray policy fit``):
first, unless ``combine="none"``, a combiner (:mod:`cafe_ray.inference.combiner`) makes exit
``k``'s answer a learned combination of exits ``0..k`` and the client's label prior; then the
decision reads those combined exits, either by their max probability (``decide="threshold"``,
the default: stop when ``1 - max prob <= lam``) or by the learned cascade below
(``decide="cascade"``). The defaults were chosen by 5-fold cross-validation on ``val``.

Why not only RL: the exit decision is a one-step prediction problem with known labels. At exit
``k`` the question is "would going on change the answer for the better?", and a finished run's
validation traces answer it for every sample. So instead of a reward and PPO, small MLPs per
early exit (an ensemble of ``members``, probabilities averaged) are trained, by cross-entropy, to
predict the *outcome of continuing to full depth* (``target="final"``; ``"next"`` judges against
the next exit) from what the cascade has seen so far, in three classes (:data:`OUTCOMES`):

* ``helps``: exit ``k`` is wrong and the last exit right;
* ``hurts``: exit ``k`` is right and the last exit wrong;
* ``same``: both right or both wrong.

The expected accuracy gain of continuing is ``gain_k = P(helps) - P(hurts)``, and continuing
costs ``cascade[k+1] - cascade[k]`` MACs. The policy stops at the first exit where the gain per
MAC fraction spent, ``gain_k * full / (cascade[k+1] - cascade[k])``, is at most ``lam``: one knob,
the price of a full-depth forward pass in accuracy, that trades accuracy for MACs. ``lam`` is
calibrated on validation traces to a mean MAC budget (:meth:`CascadePolicy.calibrate`), like the
budget threshold.

Features at exit ``k`` (:func:`cascade_features`, :data:`FEATURE_SET`): max probability, margin,
entropy and log-odds of the max probability of every exit ``0..k`` (the log-odds resolve the
confident tail, where the few samples still worth continuing hide); exit ``k``'s whole
probability vector (class-aware: some classes are confused more than others); for ``k >= 1``, whether exit ``k`` agrees with exit
``k-1`` and the probability exit ``k-1`` gave exit ``k``'s answer; and, with
``context="label_prior"`` (the default), the client's *label prior*: the class frequencies of its
own training split, as a vector and at exit ``k``'s answer. Under label skew every client's
personal model is biased toward its frequent classes, so "this client rarely sees the class its
shallow exit just answered" is evidence a max-probability threshold cannot use. The prior is a
property of the client, not of the request: a policy is bound to one client's prior
(:meth:`CascadePolicy.for_client`) before it runs. A threshold sees only the max probability of
exit ``k``.

The saved form is two files with one stem, like :mod:`cafe_ray.inference.learned` but with its own
format tag (``cafe-ray-exit-cascade-v1``): ``NAME.safetensors`` (every exit's MLP) and
``NAME.json`` (architecture, feature set, normalisation, cascade MACs, default ``lam``). No pickle,
no RLlib. :func:`load_exit_policy` opens either kind. :mod:`cafe_ray.inference.matched` compares
it with thresholds at equal MACs (``cafe-ray policy fit`` / ``cafe-ray policy equal-macs``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cafe_ray.inference.combiner import COMBINES, ExitCombiner, fit_combiner
from cafe_ray.inference.learned import policy_paths, read_policy_files, write_policy_files
from cafe_ray.inference.policies import ExitPolicy, confidence_features
from cafe_ray.inference.trace import ExitTrace
from cafe_ray.models import ExitCost

if TYPE_CHECKING:
    from cafe_ray.runs import RunArtifacts

FORMAT = "cafe-ray-exit-cascade-v1"
FEATURE_SET = "history-v2"  # bump when cascade_features changes; saved policies name the set they saw
CONTEXTS = ("label_prior", "none")  # per-client context appended to the features (or none)
OUTCOMES = ("same", "helps", "hurts")  # output classes of every exit's MLP, in this order
TARGETS = ("final", "next")  # continuing is judged against the last exit or the next one
DECIDES = ("threshold", "cascade")  # stop on the (combined) max probability, or on the MLPs' learned gain


def feature_dim(k: int, num_classes: int, context: str = "label_prior") -> int:
    """Width of :func:`cascade_features` at exit ``k``."""
    return 4 * (k + 1) + num_classes + (2 if k >= 1 else 0) + (num_classes + 1 if context == "label_prior" else 0)


def _exit_summary(p: torch.Tensor) -> torch.Tensor:
    """(B, 4): max probability, margin, entropy, and the log-odds of the max probability (which
    resolves the confident tail, 0.99 vs 0.9999, where the few samples worth continuing hide)."""
    f = confidence_features(p).to(torch.float32)
    q = p.to(torch.float64)
    top, idx = q.max(dim=1, keepdim=True)
    rest = q.scatter(1, idx, 0.0).sum(dim=1, keepdim=True)  # the small terms summed, not 1 - top (float32 noise)
    odds = top.clamp_min(1e-30).log() - rest.clamp_min(1e-30).log()
    return torch.cat([f, odds.clamp(-40.0, 40.0).to(torch.float32)], dim=1)


def label_prior(labels: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
    """(C,) float32 class frequencies of a client's training labels (uniform when it has none)."""
    y = np.asarray(labels, dtype=np.int64).ravel()
    if y.size == 0:
        return np.full(num_classes, 1.0 / num_classes, dtype=np.float32)
    return (np.bincount(y, minlength=num_classes)[:num_classes] / y.size).astype(np.float32)


def cascade_features(history: Sequence[torch.Tensor], prior: torch.Tensor | None = None) -> torch.Tensor:
    """(B, feature_dim(k, C, context)) float32 features at exit ``k = len(history) - 1``.

    ``history``: the softmax probabilities (B, C) of exits 0..k for the same B samples.
    ``prior``: the client's label prior, (C,) or (B, C); None for ``context="none"``.
    """
    if not history:
        raise ValueError("cascade features need the probabilities of at least one exit")
    cur = history[-1]
    top = cur.argmax(dim=1, keepdim=True)  # (B, 1)
    parts = [_exit_summary(p) for p in history]
    parts.append(cur.to(torch.float32))
    if len(history) >= 2:
        prev = history[-2]
        parts.append((prev.argmax(dim=1, keepdim=True) == top).to(torch.float32))
        parts.append(prev.gather(1, top).to(torch.float32))
    if prior is not None:
        pr = prior.to(torch.float32).expand(cur.shape[0], cur.shape[1]) if prior.ndim == 1 else prior.to(torch.float32)
        if pr.shape != cur.shape:
            raise ValueError(f"label prior of shape {tuple(prior.shape)} for probabilities {tuple(cur.shape)}")
        parts += [pr, pr.gather(1, top)]
    return torch.cat(parts, dim=1)


def outcome_targets(correct: np.ndarray, k: int, target: str = "final") -> np.ndarray:
    """(N,) int64 index into :data:`OUTCOMES` of continuing from exit ``k`` to the last exit
    (``target="final"``) or to the next one (``"next"``)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    now, last = correct[:, k], correct[:, -1 if target == "final" else k + 1]
    out = np.zeros(correct.shape[0], dtype=np.int64)
    out[~now & last] = OUTCOMES.index("helps")
    out[now & ~last] = OUTCOMES.index("hurts")
    return out


@dataclass(frozen=True)
class CascadeSpec:
    """What the JSON sidecar holds: enough to rebuild the per-exit MLPs and price their decisions."""

    num_exits: int
    num_classes: int
    exit_macs: tuple[int, ...]  # cascade MACs to reach each exit (the continue cost comes from it)
    hidden: tuple[int, ...]  # hidden widths of every exit's MLP
    shift: tuple[tuple[float, ...], ...]  # per early exit: the MLP sees (features - shift) / scale
    scale: tuple[tuple[float, ...], ...]
    lam: float = 0.0  # default operating point (cascade: accuracy per full-depth MACs; threshold: 1 - t);
    # a budget overrides it
    context: str = "label_prior"  # one of CONTEXTS
    members: int = 1  # ensemble size per exit (different initialisations, averaged probabilities)
    feature_set: str = FEATURE_SET
    outcomes: tuple[str, ...] = OUTCOMES
    meta: dict[str, Any] = field(default_factory=dict)  # provenance: run, clients, split, seed, fit loss
    combine: str = "none"  # one of COMBINES: answers from the combined exits (cafe_ray.inference.combiner)
    decide: str = "cascade"  # one of DECIDES ("threshold": no MLPs, shift/scale empty, members 0)

    def __post_init__(self) -> None:
        if self.feature_set != FEATURE_SET:
            raise ValueError(f"cascade policy feature set {self.feature_set!r} differs from this version's "
                             f"{FEATURE_SET!r}; refit it with `cafe-ray policy fit`")
        if self.context not in CONTEXTS:
            raise ValueError(f"cascade policy context {self.context!r} unknown; use one of {CONTEXTS}")
        if tuple(self.outcomes) != OUTCOMES:
            raise ValueError(f"cascade policy outcomes {list(self.outcomes)} differ from {list(OUTCOMES)}")
        if self.num_exits < 2 or self.num_classes < 2:
            raise ValueError(f"need >= 2 exits and >= 2 classes, got {self.num_exits} exits, {self.num_classes} classes")
        if len(self.exit_macs) != self.num_exits:
            raise ValueError(f"exit_macs has {len(self.exit_macs)} values for {self.num_exits} exits")
        if self.combine not in COMBINES:
            raise ValueError(f"cascade policy combine {self.combine!r} unknown; use one of {COMBINES}")
        if self.decide not in DECIDES:
            raise ValueError(f"cascade policy decide {self.decide!r} unknown; use one of {DECIDES}")
        if not math.isfinite(self.lam):
            raise ValueError(f"lam must be finite, got {self.lam}")
        if self.decide == "threshold":
            if self.shift or self.scale or self.members or self.hidden or self.context != "none":
                raise ValueError("a policy that decides by threshold has no MLPs: hidden, shift and scale must be "
                                 "empty, members 0 and context 'none'")
            return
        for name, rows in (("shift", self.shift), ("scale", self.scale)):
            if len(rows) != self.num_exits - 1:
                raise ValueError(f"{name}: one row per early exit ({self.num_exits - 1}), got {len(rows)}")
            for k, row in enumerate(rows):
                if len(row) != feature_dim(k, self.num_classes, self.context):
                    raise ValueError(f"{name}[{k}] has {len(row)} values, exit {k} has "
                                     f"{feature_dim(k, self.num_classes, self.context)} features")
        if any(s <= 0 for row in self.scale for s in row):
            raise ValueError("normalisation scale must be > 0")
        if self.members < 1:
            raise ValueError(f"members (ensemble size) must be >= 1, got {self.members}")

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self), "exit_macs": list(self.exit_macs), "hidden": list(self.hidden),
                "shift": [list(r) for r in self.shift], "scale": [list(r) for r in self.scale],
                "outcomes": list(self.outcomes)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CascadeSpec:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a cafe-ray cascade policy sidecar (format {d.get('format')!r}, expected {FORMAT!r})")
        d = {k: v for k, v in d.items() if k != "format"}
        for k in ("exit_macs", "hidden", "outcomes"):
            d[k] = tuple(d[k])
        for k in ("shift", "scale"):
            d[k] = tuple(tuple(r) for r in d[k])
        return cls(**d)


class CascadeNet(nn.Module):
    """Per early exit, ``spec.members`` MLPs (an ensemble): features -> logits over :data:`OUTCOMES`;
    and the exits' combiner unless ``spec.combine == "none"``."""

    def __init__(self, spec: CascadeSpec) -> None:
        super().__init__()
        self.spec = spec
        self.combiner = None if spec.combine == "none" else ExitCombiner(spec.num_exits, spec.num_classes,
                                                                         spec.combine == "prior")
        self.nets = nn.ModuleList()
        for k in range(spec.num_exits - 1 if spec.decide == "cascade" else 0):
            dims = [feature_dim(k, spec.num_classes, spec.context), *spec.hidden]
            members = nn.ModuleList()
            for _ in range(spec.members):
                layers: list[nn.Module] = []
                for a, b in zip(dims[:-1], dims[1:], strict=True):
                    layers += [nn.Linear(a, b), nn.ReLU()]
                layers.append(nn.Linear(dims[-1], len(OUTCOMES)))
                members.append(nn.Sequential(*layers))
            self.nets.append(members)
            self.register_buffer(f"shift_{k}", torch.tensor(spec.shift[k], dtype=torch.float32), persistent=False)
            self.register_buffer(f"scale_{k}", torch.tensor(spec.scale[k], dtype=torch.float32), persistent=False)

    def logits(self, features: torch.Tensor, k: int, member: int = 0) -> torch.Tensor:
        x = (features - getattr(self, f"shift_{k}")) / getattr(self, f"scale_{k}")
        return self.nets[k][member](x)

    def gain(self, features: torch.Tensor, k: int) -> torch.Tensor:
        """(B,) expected accuracy gain of continuing from exit ``k``: P(helps) - P(hurts), averaged
        over the ensemble."""
        p = torch.stack([self.logits(features, k, j).softmax(dim=1) for j in range(self.spec.members)]).mean(dim=0)
        return p[:, OUTCOMES.index("helps")] - p[:, OUTCOMES.index("hurts")]

    def price(self, features: torch.Tensor, k: int) -> torch.Tensor:
        """(B,) gain per full-depth MACs of continuing: stop where it is <= lam."""
        macs = self.spec.exit_macs
        return self.gain(features, k) * (macs[-1] / (macs[k + 1] - macs[k]))


# ------------------------------------------------------------------ fitting
@dataclass(frozen=True)
class FitSettings:
    """How :func:`fit_cascade` trains: full-batch AdamW, fixed steps (no early stopping on val)."""

    hidden: tuple[int, ...] = (32,)
    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-2
    seed: int = 0
    target: str = "final"  # one of TARGETS
    context: str = "label_prior"  # one of CONTEXTS (the MLPs' features: decide "cascade" only)
    members: int = 5  # ensemble size per exit (decide "cascade" only)
    combine: str = "prior"  # one of COMBINES: fit a combiner of the exits first (chosen by 5-fold CV on val)
    decide: str = "threshold"  # one of DECIDES (chosen by 5-fold CV on val; docs/inference.md)


def _prior_rows(prior: np.ndarray | torch.Tensor | None, n: int, c: int, context: str) -> torch.Tensor | None:
    """The per-sample (n, C) prior a fit or a trace needs, or None for context 'none'."""
    if context == "none":
        return None
    if prior is None:
        raise ValueError("this cascade policy reads the client's label prior (context 'label_prior'): pass "
                         "prior= (label_prior(y_train, C)), bind it with CascadePolicy.for_client(prior), or fit "
                         "with context='none'")
    pr = torch.as_tensor(np.asarray(prior, dtype=np.float32))
    pr = pr.expand(n, c) if pr.ndim == 1 else pr
    if tuple(pr.shape) != (n, c):
        raise ValueError(f"label prior of shape {tuple(pr.shape)}; expected ({c},) or ({n}, {c})")
    return pr


def trace_features(trace: ExitTrace, k: int, prior: torch.Tensor | None) -> torch.Tensor:
    """:func:`cascade_features` of every sample of ``trace`` at exit ``k``."""
    probs = torch.from_numpy(trace.probs)
    return cascade_features([probs[:, j] for j in range(k + 1)], prior)


def fit_cascade(trace: ExitTrace, settings: FitSettings = FitSettings(), meta: dict[str, Any] | None = None,
                prior: np.ndarray | None = None) -> CascadeNet:
    """Fit a policy on ``trace`` (e.g. every client's ``val`` split, pooled): the exits' combiner
    (unless ``settings.combine == "none"``), then, for ``decide="cascade"``, every early exit's
    outcome MLP on the combined exits.

    ``prior``: (N, C) each sample's client label prior (or (C,) for one client); needed for
    ``combine="prior"`` and for the MLPs unless ``settings.context == "none"``. Every sample trains
    every exit (not only those a policy would let through), so the fit does not depend on the
    operating point.
    """
    if trace.num_samples < 10:
        raise ValueError(f"fitting a cascade policy needs >= 10 samples, got {trace.num_samples}")
    if settings.context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {settings.context!r}")
    if settings.combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {settings.combine!r}")
    if settings.decide not in DECIDES:
        raise ValueError(f"decide must be one of {DECIDES}, got {settings.decide!r}")
    torch.manual_seed(settings.seed)
    m, c = trace.num_exits, trace.num_classes
    comb = None
    if settings.combine != "none":
        comb = fit_combiner(trace, prior, use_prior=settings.combine == "prior")
        trace = comb.transform(trace, prior)
    base = {**(meta or {}), "samples": trace.num_samples}
    if settings.decide == "threshold":
        lam = within_one_point(trace)
        spec = CascadeSpec(m, c, tuple(int(v) for v in trace.exit_macs), (), (), (), lam=lam, context="none",
                           members=0, combine=settings.combine, decide="threshold",
                           meta={**base, "default_threshold": 1.0 - lam})
        net = CascadeNet(spec)
    else:
        pr = _prior_rows(prior, trace.num_samples, c, settings.context)
        feats = [trace_features(trace, k, pr) for k in range(m - 1)]
        shift = tuple(tuple(float(v) for v in f.mean(dim=0)) for f in feats)
        scale = tuple(tuple(float(max(v, 1e-3)) for v in f.std(dim=0)) for f in feats)
        spec = CascadeSpec(m, c, tuple(int(v) for v in trace.exit_macs), tuple(settings.hidden), shift, scale,
                           context=settings.context, members=settings.members, combine=settings.combine,
                           decide="cascade",
                           meta={**base, "seed": settings.seed, "steps": settings.steps, "lr": settings.lr,
                                 "weight_decay": settings.weight_decay, "target": settings.target})
        net = CascadeNet(spec)
        losses = []
        for k in range(m - 1):
            y = torch.from_numpy(outcome_targets(trace.correct, k, settings.target))
            member_losses = []
            for j in range(settings.members):
                opt = torch.optim.AdamW(net.nets[k][j].parameters(), lr=settings.lr,
                                        weight_decay=settings.weight_decay)
                for _ in range(settings.steps):
                    opt.zero_grad()
                    loss = nn.functional.cross_entropy(net.logits(feats[k], k, j), y)
                    loss.backward()
                    opt.step()
                member_losses.append(float(loss.detach()))
            losses.append(float(np.mean(member_losses)))
        net.spec.meta["final_loss"] = losses
    if comb is not None:
        net.combiner.load_state_dict(comb.state_dict())
        net.spec.meta["combiner"] = comb.describe()
    return net.eval()


def within_one_point(trace: ExitTrace, tolerance: float | None = None) -> float:
    """The default ``lam`` of a threshold decider: ``1 - t`` for the smallest max-probability
    threshold ``t`` (the cheapest) whose accuracy on ``trace`` is within ``tolerance`` (default
    :data:`~cafe_ray.inference.evaluate.TOLERANCE`, 1 point) of full depth, the rule ``cafe-ray
    evaluate`` reports by, searched over up to 513 of the observed confidences (accuracy is not
    monotone in ``t``, so it is a scan). A budget (``calibrate``) overrides it."""
    from cafe_ray.inference.evaluate import TOLERANCE

    tol = TOLERANCE if tolerance is None else tolerance
    full = trace.accuracy(np.full(trace.num_samples, trace.num_exits - 1))
    conf = np.unique(trace.confidence[:, :-1, 0])
    for t in np.concatenate([conf[:: max(1, conf.size // 512)], [conf[-1]]]):  # ascending: cheapest first
        if trace.accuracy(trace.threshold_exits(float(t))) >= full - tol:
            return float(np.float32(1.0) - np.float32(t))
    return -1.0  # nothing within the margin: full depth (1 - max prob <= -1 never holds)


def check_fit_split(split: str) -> None:
    """A policy is fitted on 'val' or 'train': 'holdout' is where it is reported, and 'test' holds it.

    With a validation split (data.val_fraction > 0) the holdout is the whole test split;
    without one it is half of it (RunArtifacts.client_data): either way fitting on 'test'
    would read the samples the policy is later judged on.
    """
    if split in ("holdout", "test"):
        raise ValueError(f"--split {split}: fit the policy on 'val' (or 'train'), not on '{split}': it overlaps "
                         "'holdout', where `cafe-ray policy equal-macs` compares the policy with thresholds")


def fit_for_run(run: str | Path | RunArtifacts, settings: FitSettings = FitSettings(), split: str = "val",
                clients: Sequence[int] | None = None) -> CascadeNet:
    """One cascade policy for a run, fitted on its clients' ``split`` traces pooled (never ``holdout``:
    that is where :mod:`cafe_ray.inference.matched` reports)."""
    from cafe_ray.runs import RunArtifacts

    check_fit_split(split)
    art = run if isinstance(run, RunArtifacts) else RunArtifacts(run)
    ids = art.client_ids if clients is None else [int(c) for c in clients]
    traces, priors = [], []
    for cid in ids:
        if cid not in art.splits:
            raise KeyError(f"client {cid} is not in this run (clients 0..{len(art.splits) - 1})")
        if art.client_data(cid, split)[1].shape[0]:
            traces.append(ExitTrace.from_run(art, cid, split))
            priors.append(np.repeat(client_prior(art, cid)[None], traces[-1].num_samples, axis=0))
    if not traces:
        raise ValueError(f"{art.run_dir}: no client has samples in split {split!r}")
    meta = {"run": Path(art.run_dir).name, "split": split, "clients": ids, "algorithm": art.cfg.algorithm.name}
    return fit_cascade(ExitTrace.concat(traces), settings, meta, np.concatenate(priors))


def cv_for_run(run: str | Path | RunArtifacts, settings: FitSettings = FitSettings(), split: str = "val",
               folds: int = 5, budgets: Sequence[float] = (0.1, 0.15, 0.2, 0.25, 0.3, 0.5),
               seed: int = 0) -> dict[str, Any]:
    """:func:`cross_validate` on a run's ``split`` traces pooled; ``budgets`` are fractions of the
    full-depth forward pass (the keys of the result)."""
    from cafe_ray.runs import RunArtifacts

    check_fit_split(split)
    art = run if isinstance(run, RunArtifacts) else RunArtifacts(run)
    traces, priors = [], []
    for cid in art.client_ids:
        if art.client_data(cid, split)[1].shape[0]:
            traces.append(ExitTrace.from_run(art, cid, split))
            priors.append(np.repeat(client_prior(art, cid)[None], traces[-1].num_samples, axis=0))
    if not traces:
        raise ValueError(f"{art.run_dir}: no client has samples in split {split!r}")
    full = float(art.exit_cost.cumulative[-1])
    usable = [b for b in budgets if b * full >= art.exit_cost.cascade[0]]  # no policy spends less than exit 0
    if not usable:
        raise ValueError(f"every budget {list(budgets)} is below the first exit's cost "
                         f"({art.exit_cost.cascade[0] / full:.3f} of full depth)")
    out = cross_validate(ExitTrace.concat(traces), settings, [b * full for b in usable], folds, seed,
                         np.concatenate(priors))
    out["budgets"] = {str(b): v for b, v in zip(usable, out["budgets"].values(), strict=True)}
    out["skipped_budgets"] = [b for b in budgets if b not in usable]
    return out


def client_prior(run: RunArtifacts, client_id: int) -> np.ndarray:
    """(C,) label prior of client ``client_id``: the class frequencies of its training split."""
    y = run.client_data(client_id, "train")[1]
    return label_prior(y, run.dataset.num_classes)


def _subset(trace: ExitTrace, idx: np.ndarray) -> ExitTrace:
    return ExitTrace(trace.logits[idx], trace.labels[idx], trace.exit_macs)


def cross_validate(trace: ExitTrace, settings: FitSettings, budgets: Sequence[float], folds: int = 5,
                   seed: int = 0, prior: np.ndarray | None = None) -> dict[str, Any]:
    """K-fold estimate, inside ``trace`` alone (e.g. val), of the cascade's accuracy gain over a
    max-probability threshold at equal MACs: what the fit defaults were chosen on.

    Per fold: fit on the other folds, calibrate ``lam`` there to each budget (MACs per sample),
    match the threshold there to the cascade's MACs, then read both on the left-out fold. Out-of-
    fold samples are pooled; ``gain`` is cascade - threshold accuracy, ``gain_curve`` the same
    against the left-out threshold curve interpolated at the cascade's MACs (no MAC mismatch).
    """
    from cafe_ray.inference.budget import calibrate_threshold

    if folds < 2:
        raise ValueError(f"cross-validation needs >= 2 folds, got {folds}")
    n = trace.num_samples
    needs_prior = settings.combine == "prior" or (settings.decide == "cascade" and settings.context != "none")
    pr = _prior_rows(prior, n, trace.num_classes, "label_prior" if needs_prior else "none")
    pr = None if pr is None else pr.numpy()
    order = np.random.default_rng(seed).permutation(n)
    parts = np.array_split(order, folds)
    rows = {b: {"policy": [], "threshold": [], "curve": [], "macs": []} for b in budgets}
    grid = np.unique(np.concatenate([[0.0], np.quantile(trace.confidence[:, :-1, 0], np.linspace(0, 1, 128)),
                                     [math.inf]]))
    for f in range(folds):
        test_idx, train_idx = parts[f], np.concatenate([p for i, p in enumerate(parts) if i != f])
        tr, te = _subset(trace, train_idx), _subset(trace, test_idx)
        p_tr, p_te = (None, None) if pr is None else (pr[train_idx], pr[test_idx])
        pol = CascadePolicy(net=fit_cascade(tr, settings, prior=p_tr))
        te_prices, tr_prices = pol.prices(te, p_te), pol.prices(tr, p_tr)
        te_answers = pol.answers(te, p_te)  # the combined exits, when the policy combines
        cur_macs = np.array([te.mean_macs(te.threshold_exits(g)) for g in grid])
        cur_acc = np.array([te.accuracy(te.threshold_exits(g)) for g in grid])
        for b in budgets:
            lam, tr_macs = pol.calibrate(tr, b, prices=tr_prices)
            t, _ = calibrate_threshold(tr, tr_macs)
            ex = pol.exits_at(te_prices, lam)
            m = te.mean_macs(ex)
            w = te.num_samples
            rows[b]["policy"].append(te_answers.accuracy(ex) * w)
            rows[b]["threshold"].append(te.accuracy(te.threshold_exits(t)) * w)
            rows[b]["curve"].append(float(np.interp(m, *_mono(cur_macs, cur_acc))) * w)
            rows[b]["macs"].append(m * w)
    out = {}
    for b, r in rows.items():
        pol_acc, thr, cur, macs = (sum(r[k]) / n for k in ("policy", "threshold", "curve", "macs"))
        out[str(b)] = {"policy": pol_acc, "threshold": thr, "gain": pol_acc - thr, "gain_curve": pol_acc - cur,
                       "mean_macs": macs}
    return {"folds": folds, "seed": seed, "budgets": out,
            "mean_gain_curve": float(np.mean([v["gain_curve"] for v in out.values()])),
            "mean_gain": float(np.mean([v["gain"] for v in out.values()]))}


def _mono(macs: np.ndarray, acc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xs, inv = np.unique(macs, return_inverse=True)
    return xs, np.bincount(inv, weights=acc) / np.bincount(inv)


# ------------------------------------------------------------------ saving
def save_cascade(net: CascadeNet, path: str | Path, lam: float | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.safetensors`` + ``<stem>.json`` (``lam``: the default operating point)."""
    spec = net.spec if lam is None else CascadeSpec(**{**net.spec.__dict__, "lam": float(lam)})
    return write_policy_files(net, spec.to_json(), path)


def load_cascade(path: str | Path) -> CascadeNet:
    spec, state, weights = read_policy_files(path, "cascade policy", "cafe-ray policy fit")
    net = CascadeNet(CascadeSpec.from_json(spec))
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if {k: tuple(v.shape) for k, v in state.items()} != expected:
        raise ValueError(f"cascade policy {weights}: tensors {sorted(state)} do not match the sidecar's "
                         f"architecture {expected}")
    net.load_state_dict(state)
    return net.eval()


# ------------------------------------------------------------------ the policy
class CascadePolicy(ExitPolicy):
    """Stop at the first exit whose price of continuing is <= ``lam``.

    The price is the learned gain of continuing per full-depth MACs (``decide="cascade"``) or one
    minus the max probability (``decide="threshold"``, i.e. a threshold of ``1 - lam``), both read
    from the combined exits when the policy has a combiner (``combines``). Reads the
    probabilities of every exit so far (``uses_history``): :func:`~cafe_ray.inference.predict_batch`
    passes them to :meth:`decide_history`, after :meth:`combine`.
    """

    name = "cascade"
    uses_history = True

    def __init__(self, path: str | Path | None = None, lam: float | None = None, *, net: CascadeNet | None = None,
                 prior: np.ndarray | Sequence[float] | None = None) -> None:
        if (path is None) == (net is None):
            raise ValueError("cascade policy: give either a saved policy path or net=, not both or neither")
        self.path = None if path is None else Path(path)
        self.net = load_cascade(path) if net is None else net.eval()
        self.spec = self.net.spec
        self.lam = self.spec.lam if lam is None else float(lam)
        if not math.isfinite(self.lam):
            raise ValueError(f"cascade policy: lam must be finite, got {lam}")
        self.prior: torch.Tensor | None = None
        if prior is not None:
            pr = torch.as_tensor(np.asarray(prior, dtype=np.float32))
            if tuple(pr.shape) != (self.spec.num_classes,) or not bool(torch.isfinite(pr).all()) or bool((pr < 0).any()):
                raise ValueError(f"cascade policy: prior must be {self.spec.num_classes} finite class frequencies "
                                 f"(label_prior(y_train, C)), got shape {tuple(pr.shape)}")
            self.prior = pr

    @property
    def combines(self) -> bool:
        """Whether answers come from the combined exits (:meth:`combine`) rather than exit k alone."""
        return self.net.combiner is not None

    def with_lam(self, lam: float) -> CascadePolicy:
        return self._copy(CascadePolicy(lam=lam, net=self.net, prior=self.prior))

    def for_client(self, prior: np.ndarray | Sequence[float]) -> CascadePolicy:
        """This policy bound to one client's label prior (see :func:`client_prior`)."""
        return self._copy(CascadePolicy(lam=self.lam, net=self.net, prior=prior))

    def _copy(self, other: CascadePolicy) -> CascadePolicy:
        other.path = self.path  # where it was loaded from, for describe()
        return other

    def _prior(self, prior: np.ndarray | torch.Tensor | None, n: int) -> torch.Tensor | None:
        return _prior_rows(self.prior if prior is None else prior, n, self.spec.num_classes, self.spec.context)

    def _check(self, num_exits: int, num_classes: int) -> None:
        if (num_exits, num_classes) != (self.spec.num_exits, self.spec.num_classes):
            raise ValueError(f"cascade policy fitted for {self.spec.num_exits} exits x {self.spec.num_classes} "
                             f"classes, used on a model with {num_exits} x {num_classes}")

    @torch.no_grad()
    def combine(self, logp: Sequence[torch.Tensor], k: int) -> torch.Tensor:
        """(B, C) the logits this policy answers with at exit ``k``, from the log-softmax of exits 0..k."""
        if self.net.combiner is None:
            return logp[k]
        self._check(self.spec.num_exits, logp[k].shape[1])
        return self.net.combiner.combine(logp[: k + 1], self.net.combiner.log_prior(self.prior, logp[k].shape[0]))

    @torch.no_grad()
    def answers(self, trace: ExitTrace, prior: np.ndarray | None = None) -> ExitTrace:
        """``trace`` as this policy sees and answers it: the combined exits (or ``trace`` itself).

        ``prior``: (C,) or (N, C) label priors (default: the bound client's)."""
        self._check(trace.num_exits, trace.num_classes)
        if self.net.combiner is None:
            return trace
        return self.net.combiner.transform(trace, self.prior if prior is None else prior)

    def _price(self, history: Sequence[torch.Tensor], k: int, prior: torch.Tensor | None) -> torch.Tensor:
        if self.spec.decide == "threshold":
            return 1.0 - history[-1].max(dim=1).values  # float32, as the trace's prices
        return self.net.price(cascade_features(history, prior), k)

    @torch.no_grad()
    def decide_history(self, history: Sequence[torch.Tensor], k: int, num_exits: int, macs_spent: torch.Tensor,
                       cost: ExitCost | None = None) -> torch.Tensor:
        """Bool (B,): stop at exit ``k`` given the (combined) probabilities of exits 0..k (``history``)."""
        self._check(num_exits, history[-1].shape[1])
        prior = None if self.spec.decide == "threshold" else self._prior(None, history[-1].shape[0])
        return self._price(history, k, prior) <= self.lam

    def should_exit(self, probs, k, num_exits, macs_spent):
        """Exit 0 only, and only without a combiner: the rest needs :func:`predict_batch`."""
        if k != 0 or self.combines:
            raise ValueError("the cascade policy needs the probabilities of every exit so far (and combines them); "
                             "run it through predict_batch (which passes them to combine and decide_history)")
        return self.decide_history([probs], k, num_exits, macs_spent)

    # ----------------------------------------------------- on exit traces
    @torch.no_grad()
    def prices(self, trace: ExitTrace, prior: np.ndarray | None = None) -> np.ndarray:
        """(N, m-1) float64: the price of continuing at every early exit of every sample.

        ``prior``: (C,) or (N, C) label priors (default: the bound client's)."""
        seen = self.answers(trace, prior)
        probs = torch.from_numpy(seen.probs)
        pr = None if self.spec.decide == "threshold" else self._prior(prior, trace.num_samples)
        cols = [self._price([probs[:, j] for j in range(k + 1)], k, pr) for k in range(trace.num_exits - 1)]
        return torch.stack(cols, dim=1).to(torch.float64).numpy()

    @staticmethod
    def exits_at(prices: np.ndarray, lam: float) -> np.ndarray:
        """(N,) exit taken at ``lam`` given :meth:`prices` (compared in float32, as torch does)."""
        stop = prices.astype(np.float32) <= np.float32(lam)
        return np.where(stop.any(axis=1), stop.argmax(axis=1), prices.shape[1])

    def calibrate(self, trace: ExitTrace, budget: float, prior: np.ndarray | None = None,
                  prices: np.ndarray | None = None) -> tuple[float, float]:
        """(lam, mean MACs on ``trace``): the smallest ``lam`` whose mean MACs <= ``budget``.

        Mean MACs never increase with ``lam``; candidates are midpoints between observed prices.
        ``prices``: :meth:`prices` of ``trace`` if already computed.
        """
        if budget < trace.exit_macs[0]:
            raise ValueError(f"budget {budget:,.0f} MACs/sample is below the first exit's {int(trace.exit_macs[0]):,}")
        pr = self.prices(trace, prior) if prices is None else prices
        values = np.unique(pr.astype(np.float32).astype(np.float64))
        mids = (values[:-1] + values[1:]) / 2
        cands = np.unique(np.concatenate([[values[0] - 1.0], mids, [values[-1] + 1.0]]).astype(np.float32))
        cands = cands.astype(np.float64)
        lo, hi = 0, len(cands) - 1  # cands[-1]: everything stops at exit 0 (feasible, checked above)
        while lo < hi:
            mid = (lo + hi) // 2
            if trace.mean_macs(self.exits_at(pr, cands[mid])) <= budget:
                hi = mid
            else:
                lo = mid + 1
        lam = float(cands[lo])
        return lam, trace.mean_macs(self.exits_at(pr, lam))

    def describe(self) -> dict[str, Any]:
        out = {"policy": self.name, "path": None if self.path is None else str(self.path), "lam": self.lam,
               "decide": self.spec.decide, "combine": self.spec.combine, "context": self.spec.context,
               "fitted": self.spec.meta}
        if self.spec.decide == "threshold":
            out["threshold"] = 1.0 - self.lam  # on the combined max probability
        return out


def is_fitted_policy(path: str | Path) -> bool:
    """Whether ``path`` names a ``policy fit`` policy (this module's format) rather than an RL one,
    read from the sidecar's ``format`` without loading either."""
    _, sidecar = policy_paths(path)
    if not sidecar.is_file():
        return False
    try:
        return json.loads(sidecar.read_text()).get("format") == FORMAT
    except json.JSONDecodeError as err:
        raise ValueError(f"exit policy sidecar {sidecar} is not valid JSON: {err}") from err


def load_exit_policy(path: str | Path) -> ExitPolicy:
    """A saved exit policy of either kind: an RL :class:`~cafe_ray.inference.LearnedPolicy` or a
    :class:`CascadePolicy`, told apart by the sidecar's ``format``."""
    from cafe_ray.inference.learned import LearnedPolicy

    return CascadePolicy(path) if is_fitted_policy(path) else LearnedPolicy(path)
