"""The local objective of CAFEDistill (arXiv:2601.10015), step 8, and its named options.

    L_i = CE(y, z_m) + sum_{k in S_i} [ CE(y, z_k)
          + lambda_t * tau^2 * KL( softmax(zbar/tau) || softmax(z_k/tau) ) ]
          (+ sum_{k not in S_i, k < m} CE(y, E_k(stopgrad(h_k)))   when unselected = ce_detached)

with zbar = phi(x)^T hbar_i from the client's *current* backbone feature. The
teacher path is detached: hbar_i is frozen and zbar carries no gradient, so
distillation never moves the teacher head nor, through zbar, the deeper backbone.

Options (``algorithm.cafedistill.*``, see :class:`KDOptions`):
- ``kd_backbone``: the KD gradient reaches the stages feeding student k fully,
  not at all (``detach``: the KD term sees E_k(stopgrad(h_k)); CE still trains
  the backbone), or scaled by s (``scaled``: E_k(h_k) with the backward through
  h_k multiplied by s; the forward value is bit-identical);
- ``kd_gate``: per-sample mask of the KD term (teacher right, or teacher more
  confident in the label than the student); masked samples add 0 and the batch
  mean still divides by the batch size;
- ``kd_target``: KL over the client's own classes only (both distributions
  renormalised there), or the teacher's logits shifted by the client's log label
  prior;
- ``unselected``: exits outside S_i (the teacher excepted) are frozen (their heads out
  of the optimizer), trained by their CE (``ce_detached``: on detached features with
  personal heads; under ``heads: generic_residual`` the personal CE takes the
  ``residual_ce`` path, so with ``residual_ce: backbone`` it reaches the backbone), or
  ``excluded`` (no term at all: under generic_residual their generic heads' balanced
  softmax is dropped too, so an unselected exit sends no gradient anywhere, as the
  specification's step 3 says; with personal heads the same as frozen);
- ``kd_last_exit``: the teacher exit m gets the KD term too (its head and, in the
  plain form, the backbone under it learn toward hbar_i).

``heads: generic_residual`` (:func:`make_residual_loss_fn`) puts L_i on FedRoD's
two-head form: every exit has a shared generic head E_k^G (trained, with the
backbone, by the balanced softmax BSM and averaged by the server) and a personal
residual linear head P_k on f_k, the input of E_k^G's final linear layer. The
client's exit logits are z_k = E_k^G(x).detach() + P_k(f_k.detach()), and the
terms above act on them:
    L_i = sum_k BSM(y, z_k^G) + CE(y, z_m) + sum_{k in S_i} [ CE(y, z_k)
          + lambda_t * tau^2 * KL( softmax(zbar/tau) || softmax(z_k/tau) ) ]
with zbar = f_m(x)^T hbar_i (``kd_backbone`` has no effect in this form). With
lambda_t = 0 and every head trained it is FedRoD-EE's loss, term for term (tested
bit for bit). Under ``kd_shared: none`` KD moves only the personal heads; ``kd_shared`` lets KD reach
the shared stack: ``personal`` computes the KD term on E_k^G(x) + P_k(f_k) without
the detaches (its gradient reaches E_k^G and the stages under exit k);
``generic`` adds lambda_t * sum_{k in S_i} tau^2 KL(softmax(z_m^G/tau) || softmax(z_k^G/tau))
(z_m^G detached, same gate), the generic last exit, which averages every
client's last head, teaching the generic students and the backbone.
``residual_ce: backbone`` computes the personal CE on
E_k^G(f_k) with W, b detached, + P_k(f_k): the same logits, so its gradient reaches the
backbone (as FedPer-EE's personal CE does) but never the generic heads, which stay
trained by BSM alone. ``residual_generic: received`` adds the residuals to the
round's global generic heads, held fixed (W_k^G0, b_k^G0, snapshot when the loss is
built) instead of the live ones: z_k = (W_k^G0 + W_k^P) f_k + b_k^G0 + b_k^P, with f_k
detached where the live form detaches it. The residual then learns to correct the
generic head the client's personal logits use at inference (the server's average,
not the client's locally moved copy); the personal CE and KD never reach E_k^G.
``received_ce`` does so for the personal CE only: the KD term stays on the live
logits, so that under ``kd_shared: personal`` it still reaches the generic students.

With lambda_t = 0, every student selected and no option active, L_i is
computed with the same operations in the same order as FedPer-EE's sum of
per-exit CE, so the two are bit-identical (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from cafe_ray.algorithms.fedrod import (
    PRIOR_FLOOR,
    balanced_softmax_loss,
    personal_ce_logits,
    personal_logits,
    received_heads,
)
from cafe_ray.algorithms.heads import HeadProbe
from cafe_ray.algorithms.training import LossFn, tensor_sum
from cafe_ray.models.base import EarlyExitNet

KD_BACKBONE = ("full", "detach", "scaled")
KD_GATES = ("none", "teacher_correct", "teacher_confident")
KD_TARGETS = ("full", "own_classes", "prior_corrected")
UNSELECTED = ("frozen", "ce_detached", "excluded")
KD_SHARED = ("none", "personal", "generic")
RESIDUAL_CE = ("detached", "backbone")
RESIDUAL_GENERIC = ("live", "received", "received_ce")


@dataclass(frozen=True)
class KDOptions:
    """The per-client, per-round knobs of L_i (lam is lambda_t, after any warm-up)."""

    lam: float
    tau: float
    backbone: str = "full"
    backbone_scale: float = 1.0
    gate: str = "none"
    target: str = "full"
    unselected: str = "frozen"
    last_exit: bool = False  # kd_last_exit: the teacher exit m is distilled from hbar_i too
    shared: str = "none"  # kd_shared (generic_residual only): none | personal | generic
    residual_ce: str = "detached"  # residual_ce (generic_residual only): detached | backbone
    residual_generic: str = "live"  # residual_generic (generic_residual only): live | received | received_ce
    skip_kd: tuple[int, ...] = ()  # students left out of KD this round (kd_exit_gate: teacher_better)

    def kd_exits(self, students: Sequence[int], m: int) -> tuple[int, ...]:
        """The exits the KD term covers: S_i (less ``skip_kd``), plus m-1 (0-based) under kd_last_exit."""
        kept = tuple(k for k in students if k not in self.skip_kd)
        return (*kept, m - 1) if self.last_exit else kept

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("kd_backbone", self.backbone, KD_BACKBONE),
            ("kd_gate", self.gate, KD_GATES),
            ("kd_target", self.target, KD_TARGETS),
            ("unselected", self.unselected, UNSELECTED),
            ("kd_shared", self.shared, KD_SHARED),
            ("residual_ce", self.residual_ce, RESIDUAL_CE),
            ("residual_generic", self.residual_generic, RESIDUAL_GENERIC),
        ):
            if value not in allowed:
                raise ValueError(f"algorithm.cafedistill.{name}: {value!r} is not one of {allowed}")
        if self.lam < 0 or self.tau <= 0:
            raise ValueError(f"algorithm.cafedistill: need lam >= 0 and tau > 0, got lam={self.lam}, tau={self.tau}")


@torch.no_grad()
def teacher_logits(phi: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """zbar = phi(x) hbar_W^T + hbar_b, detached: (B, D) -> (B, C)."""
    return F.linear(phi.detach(), weight.detach(), bias.detach())


def scale_grad(h: torch.Tensor, s: float) -> torch.Tensor:
    """h in the forward pass (bit for bit); its gradient times s in the backward pass."""
    d = h.detach()
    return d + s * (h - d)


def kd_per_sample(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * KL(softmax(teacher/tau) || softmax(student/tau)) per sample (B,); teacher detached."""
    log_p_t = F.log_softmax(teacher.detach() / tau, dim=1)
    log_p_s = F.log_softmax(student / tau, dim=1)
    return tau * tau * (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)


def kd_term(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * KL(softmax(teacher/tau) || softmax(student/tau)), batch mean; teacher detached."""
    p_teacher = F.softmax(teacher.detach() / tau, dim=1)
    return tau * tau * F.kl_div(F.log_softmax(student / tau, dim=1), p_teacher, reduction="batchmean")


def gate_mask(gate: str, student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) float mask of the samples KD may use.

    teacher_correct: argmax zbar == y. teacher_confident: softmax(zbar)[y] >
    softmax(z_k)[y] (temperature 1: the models' own confidences).
    """
    if gate == "none":
        return torch.ones_like(y, dtype=student.dtype)
    with torch.no_grad():
        if gate == "teacher_correct":
            return (teacher.argmax(dim=1) == y).to(student.dtype)
        if gate == "teacher_confident":
            p_t = F.softmax(teacher, dim=1).gather(1, y[:, None])[:, 0]
            p_s = F.softmax(student.detach(), dim=1).gather(1, y[:, None])[:, 0]
            return (p_t > p_s).to(student.dtype)
    raise ValueError(f"algorithm.cafedistill.kd_gate: {gate!r} is not one of {KD_GATES}")


def label_prior(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The client's label distribution (C,) from its training labels."""
    counts = torch.bincount(y, minlength=num_classes).to(torch.float32)
    return counts / counts.sum().clamp_min(1.0)


def target_views(
    target: str, student: torch.Tensor, teacher: torch.Tensor, prior: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) logits the KL compares under ``kd_target``.

    own_classes: the columns of the classes with prior > 0 (softmax renormalises
    there); prior_corrected: teacher + log(max(prior, PRIOR_FLOOR)).
    """
    if target == "full":
        return student, teacher
    if prior is None:
        raise ValueError(f"kd_target={target!r} needs the client's label prior")
    if target == "own_classes":
        own = torch.nonzero(prior > 0)[:, 0]
        return student[:, own], teacher[:, own]
    if target == "prior_corrected":
        return student, teacher + prior.clamp_min(PRIOR_FLOOR).log()[None, :]
    raise ValueError(f"algorithm.cafedistill.kd_target: {target!r} is not one of {KD_TARGETS}")


def forward_stages(model: EarlyExitNet, x: torch.Tensor, detached_exits: frozenset[int] = frozenset()) -> tuple[
    list[torch.Tensor], list[torch.Tensor], torch.Tensor
]:
    """(exit logits, stage outputs h_k, phi(x)); heads in ``detached_exits`` read stopgrad(h_k)."""
    logits: list[torch.Tensor] = []
    hs: list[torch.Tensor] = []
    h = x
    m = model.num_exits
    phi = x
    for k, (stage, head) in enumerate(zip(model.stages, model.exits, strict=True)):
        h = stage(h)
        hs.append(h)
        if k == m - 1:
            last = model.last_exit
            phi = last.phi(h)
            logits.append(last.linear(phi))
        else:
            logits.append(head(h.detach() if k in detached_exits else h))
    return logits, hs, phi


def cafedistill_loss(
    logits: Sequence[torch.Tensor],
    zbar: torch.Tensor,
    y: torch.Tensor,
    students: Sequence[int],
    lam: float,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_i, the undivided KD part sum_k tau^2 KL) for one batch, the spec's plain form.

    logits: every exit's (B, C) logits, the teacher last; students: S_i (0-based).
    """
    m = len(logits)
    ces = [F.cross_entropy(logits[k], y) for k in sorted({*students, m - 1})]
    total = tensor_sum(ces)
    kd = logits[-1].new_zeros(())
    if lam > 0:
        for k in students:
            kd = kd + kd_term(logits[k], zbar, tau)
        total = total + lam * kd
    return total, kd.detach()


@dataclass
class KDStats:
    """Running sample-weighted means of the KD term and of the gate's kept fraction."""

    total: float = 0.0
    samples: int = 0
    kept: float = 0.0
    gated: int = 0

    def add(self, kd: torch.Tensor, n: int, kept: float | None = None, gated: int = 0) -> None:
        self.total += float(kd) * n
        self.samples += n
        if kept is not None:
            self.kept += kept
            self.gated += gated

    @property
    def mean(self) -> float:
        return self.total / self.samples if self.samples else 0.0

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.gated if self.gated else 1.0


def make_loss_fn(
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor,
    students: Sequence[int],
    lam: float | KDOptions,
    tau: float | None = None,
    stats: KDStats | None = None,
    *,
    prior: torch.Tensor | None = None,
    own_weight: float = 0.0,
) -> LossFn:
    """L_i as a ``local_sgd`` loss; records the KD term (and the gate's kept fraction) into ``stats``.

    ``lam`` is either lambda_t (with ``tau``: the spec's plain form) or a
    :class:`KDOptions`. ``own_weight`` > 0 (own_head = live) adds w_ii times the
    client's *current* last head (detached) to the received teacher head, which
    then holds only sum_{j != i} w_ij h_j.
    """
    opts = lam if isinstance(lam, KDOptions) else KDOptions(lam=float(lam), tau=float(tau if tau is not None else 1.0))
    students = tuple(sorted(students))

    def loss(model: EarlyExitNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = model.num_exits
        unselected = frozenset(range(m - 1)) - set(students) if opts.unselected == "ce_detached" else frozenset()
        logits, hs, phi = forward_stages(model, x, unselected)
        trained = sorted({*students, m - 1, *unselected})
        total = tensor_sum(F.cross_entropy(logits[k], y) for k in trained)
        kd = logits[-1].new_zeros(())
        if opts.lam > 0 and opts.kd_exits(students, m):
            w, b = teacher_weight, teacher_bias
            if own_weight:
                w = w + own_weight * model.last_head.weight.detach()
                b = b + own_weight * model.last_head.bias.detach()
            zbar = teacher_logits(phi, w, b)
            zs: dict[int, torch.Tensor] = {}
            for k in students:
                zs[k] = logits[k]
                if opts.backbone == "detach":
                    zs[k] = model.exits[k](hs[k].detach())
                elif opts.backbone == "scaled":
                    zs[k] = model.exits[k](scale_grad(hs[k], opts.backbone_scale))
            if opts.last_exit:
                zs[m - 1] = logits[m - 1]
            kd = _kd_sum(opts.kd_exits(students, m), zs, zbar, y, opts, prior, stats)
            total = total + opts.lam * kd
        elif stats is not None:
            stats.add(kd, int(y.shape[0]))
        return total

    return loss


def _kd_sum(
    students: Sequence[int], student_logits: dict[int, torch.Tensor], zbar: torch.Tensor, y: torch.Tensor,
    opts: KDOptions, prior: torch.Tensor | None, stats: KDStats | None = None,
) -> torch.Tensor:
    """sum_k gated tau^2 KL / B over the students; records it and the gate's kept samples in ``stats``."""
    kd = zbar.new_zeros(())
    kept, gated = 0.0, 0
    for k in students:
        z = student_logits[k]
        mask = gate_mask(opts.gate, z, zbar, y)
        s_view, t_view = target_views(opts.target, z, zbar, prior)
        kd = kd + (kd_per_sample(s_view, t_view, opts.tau) * mask).sum() / y.shape[0]
        kept += float(mask.sum())
        gated += int(y.shape[0])
    if stats is not None:
        stats.add(kd.detach(), int(y.shape[0]), kept, gated)
    return kd


def make_residual_loss_fn(
    probe: HeadProbe,
    heads: Sequence[tuple[torch.nn.Parameter, torch.nn.Parameter]],
    counts: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor,
    students: Sequence[int],
    opts: KDOptions,
    stats: KDStats | None = None,
    *,
    prior: torch.Tensor | None = None,
    own_weight: float = 0.0,
) -> LossFn:
    """L_i under ``heads: generic_residual`` (module docstring); ``heads[k]`` = (W_k^P, b_k^P).

    ``own_weight`` > 0 (own_head = live) adds w_ii times the client's current
    personal last head (generic + residual, detached) to the received teacher head.
    """
    students = tuple(sorted(students))

    received = received_heads(probe) if opts.residual_generic in ("received", "received_ce") else None
    kd_received = received if opts.residual_generic == "received" else None

    def fixed(k: int, f: torch.Tensor) -> torch.Tensor:
        """(W_k^G0 + W_k^P) f + b_k^G0 + b_k^P: the residual on the received generic head."""
        w0, b0 = received[k]  # type: ignore[index]  # fixed() runs only with a received head
        return F.linear(f, w0 + heads[k][0], b0 + heads[k][1])

    def loss(model: EarlyExitNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = model.num_exits
        unselected = frozenset(range(m - 1)) - set(students) if opts.unselected == "ce_detached" else frozenset()
        logits, feats = probe(x)
        trained = sorted({*students, m - 1, *unselected})
        if opts.unselected == "excluded":  # an exit outside S_i adds no term at all, not even its BSM
            generic = tensor_sum(balanced_softmax_loss(logits[k], y, counts) for k in trained)
        else:
            generic = tensor_sum(balanced_softmax_loss(z, y, counts) for z in logits)
        z_ce = personal_ce_logits(probe, logits, feats, list(heads), trained, ce=opts.residual_ce, received=received)
        total = generic + tensor_sum(F.cross_entropy(z_ce[k], y) for k in trained)
        kd = logits[-1].new_zeros(())
        if opts.lam > 0 and opts.kd_exits(students, m):
            w, b = teacher_weight, teacher_bias
            if own_weight:
                last_w, last_b = kd_received[m - 1] if kd_received is not None else (
                    probe.linears[m - 1].weight.detach(), probe.linears[m - 1].bias.detach())
                w = w + own_weight * (last_w + heads[m - 1][0].detach())
                b = b + own_weight * (last_b + heads[m - 1][1].detach())
            zbar = teacher_logits(feats[m - 1], w, b)
            kd_exits = opts.kd_exits(students, m)
            if kd_received is not None:  # the KD reaches the residuals, and the backbone under kd_shared personal
                z_kd = {k: fixed(k, feats[k] if opts.shared == "personal" else feats[k].detach()) for k in kd_exits}
            elif opts.shared == "personal":  # the KD gradient also reaches E_k^G and the stages under it
                z_kd = {k: logits[k] + F.linear(feats[k], *heads[k]) for k in kd_exits}
            elif opts.residual_ce == "detached" and received is None:  # the CE's logits: the residual heads' gradient only
                z_kd = z_ce
            else:  # KD still reaches the residual heads only, though the CE reaches the backbone
                z_kd = {k: personal_logits(logits[k], feats[k], *heads[k]) for k in kd_exits}
            kd = _kd_sum(kd_exits, z_kd, zbar, y, opts, prior, stats)
            generic_students = [k for k in students if k not in opts.skip_kd]
            if opts.shared == "generic" and generic_students:
                # the generic last exit (every client's last head, averaged) teaches the generic students
                z_g = {k: logits[k] for k in generic_students}
                kd = kd + _kd_sum(generic_students, z_g, logits[m - 1].detach(), y, replace(opts, target="full"), None)
            total = total + opts.lam * kd
        elif stats is not None:
            stats.add(kd, int(y.shape[0]))
        return total

    return loss
