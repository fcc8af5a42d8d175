"""Combined exits: the answer at exit ``k`` built from every exit so far, plus the client's label prior.

Why: a sample that reaches exit ``k`` has already paid for exits ``0..k-1``, and their opinions
are free evidence (Zero Time Waste, Wolczyk et al. 2021, ensembles earlier exits the same way).
Under label skew there is a second, larger gap: each client's personal exits under-use its own
label frequencies (CAFEDistill's shallow exits learn from a teacher aggregated over every client),
so a learned weight on the log prior corrects them. At exit ``k`` the combined logits are

``z_k = sum_{j <= k} w_kj * log_softmax(logits_j) + b_k + beta_k * log(prior + PRIOR_EPS)``

with one weight per exit so far, one bias per class and one prior weight: a multinomial logistic
regression on fixed log-probabilities, so the fit is convex and deterministic (full-batch L-BFGS,
no seed). It starts from the identity (``w_kk = 1``, everything else 0), and ``combine="plain"``
leaves the prior term out. The combined logits replace exit ``k``'s logits everywhere: in the
answer, in the confidence a threshold reads, and in the history a learned cascade reads.

Cost: ``(k + 2) * C`` multiply-adds at exit ``k`` (about 100 for 3 exits and 10 classes), not
counted in a model's MACs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from cafe_ray.inference.trace import ExitTrace

COMBINES = ("prior", "plain", "none")  # with the client's label prior, without it, or exits left alone
PRIOR_EPS = 1e-3  # log(prior + eps): a class the client never saw is unlikely, not impossible


class ExitCombiner(nn.Module):
    """Per exit ``k``: weights over the log-probabilities of exits ``0..k``, a class bias, a prior weight."""

    def __init__(self, num_exits: int, num_classes: int, use_prior: bool) -> None:
        super().__init__()
        if num_exits < 1 or num_classes < 2:
            raise ValueError(f"combiner: need >= 1 exit and >= 2 classes, got {num_exits} and {num_classes}")
        self.num_exits, self.num_classes, self.use_prior = num_exits, num_classes, bool(use_prior)
        for k in range(num_exits):
            w = torch.zeros(k + 1)
            w[k] = 1.0
            self.register_buffer(f"w_{k}", w)
            self.register_buffer(f"b_{k}", torch.zeros(num_classes))
            self.register_buffer(f"beta_{k}", torch.zeros(1))

    def weights(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return getattr(self, f"w_{k}"), getattr(self, f"b_{k}"), getattr(self, f"beta_{k}")

    def log_prior(self, prior: np.ndarray | torch.Tensor | None, n: int) -> torch.Tensor | None:
        """(n, C) log prior rows, or None when this combiner does not read the prior."""
        if not self.use_prior:
            return None
        if prior is None:
            raise ValueError("this combiner reads the client's label prior (combine='prior'): bind it with "
                             "CascadePolicy.for_client(prior) or pass prior=, or fit with combine='plain'")
        pr = torch.as_tensor(prior, dtype=torch.float32)
        pr = pr.expand(n, self.num_classes) if pr.ndim == 1 else pr
        if tuple(pr.shape) != (n, self.num_classes):
            raise ValueError(f"label prior of shape {tuple(pr.shape)}; expected ({self.num_classes},) or "
                             f"({n}, {self.num_classes})")
        return (pr + PRIOR_EPS).log()

    @torch.no_grad()
    def combine(self, logp: Sequence[torch.Tensor], log_prior: torch.Tensor | None) -> torch.Tensor:
        """(B, C) combined logits at exit ``k = len(logp) - 1`` from the log-softmax of exits 0..k."""
        k = len(logp) - 1
        w, b, beta = self.weights(k)
        z = b + w[0] * logp[0]
        for j in range(1, k + 1):
            z = z + w[j] * logp[j]
        if log_prior is not None:
            z = z + beta * log_prior
        return z

    @torch.no_grad()
    def transform(self, trace: ExitTrace, prior: np.ndarray | torch.Tensor | None) -> ExitTrace:
        """The trace with every exit's logits replaced by the combined ones (what
        :func:`~cafe_ray.inference.predict_batch` computes for a combining policy)."""
        self._check(trace)
        logp = torch.from_numpy(trace.logits).log_softmax(dim=2)
        lp = self.log_prior(prior, trace.num_samples)
        hist = [logp[:, j] for j in range(trace.num_exits)]
        z = torch.stack([self.combine(hist[: k + 1], lp) for k in range(trace.num_exits)], dim=1)
        return ExitTrace(z.numpy(), trace.labels, trace.exit_macs)

    def _check(self, trace: ExitTrace) -> None:
        if (trace.num_exits, trace.num_classes) != (self.num_exits, self.num_classes):
            raise ValueError(f"combiner fitted for {self.num_exits} exits x {self.num_classes} classes, used on "
                             f"{trace.num_exits} x {trace.num_classes}")

    def describe(self) -> list[dict[str, object]]:
        return [{"exit": k, "weights": [round(float(v), 4) for v in w], "prior_weight": round(float(beta), 4)}
                for k, (w, _, beta) in ((k, self.weights(k)) for k in range(self.num_exits))]


def fit_combiner(trace: ExitTrace, prior: np.ndarray | None = None, use_prior: bool = True,
                 bias_l2: float = 1e-3, max_iter: int = 200) -> ExitCombiner:
    """Fit every exit's combination by cross-entropy on ``trace`` (e.g. every client's ``val`` pooled).

    ``prior``: (N, C) each sample's client label prior (or (C,) for one client); needed when
    ``use_prior``. ``bias_l2`` keeps the class biases small where a class is rare in ``trace``.
    """
    comb = ExitCombiner(trace.num_exits, trace.num_classes, use_prior)
    logp = torch.from_numpy(trace.logits).double().log_softmax(dim=2)
    y = torch.from_numpy(trace.labels)
    lp = comb.log_prior(prior, trace.num_samples)
    lp = None if lp is None else lp.double()
    for k in range(trace.num_exits):
        fitted = _fit_exit(logp[:, : k + 1], y, lp, [t.double() for t in comb.weights(k)], bias_l2, max_iter)
        for dst, src in zip(comb.weights(k), fitted, strict=True):
            dst.copy_(src.to(torch.float32))
    return comb.eval()


def _fit_exit(logp: torch.Tensor, y: torch.Tensor, log_prior: torch.Tensor | None, init: list[torch.Tensor],
              bias_l2: float, max_iter: int) -> list[torch.Tensor]:
    """(w, b, beta) of one exit, from ``init``, by L-BFGS on the cross-entropy of the combination."""
    w, b, beta = (t.clone().requires_grad_(True) for t in init)
    params = [w, b] + ([beta] if log_prior is not None else [])
    opt = torch.optim.LBFGS(params, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = (logp * w[None, :, None]).sum(dim=1) + b
        if log_prior is not None:
            z = z + beta * log_prior
        loss = nn.functional.cross_entropy(z, y) + bias_l2 * (b**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return [w.detach(), b.detach(), beta.detach()]
