"""The local objective L_i of CAFEDistill (arXiv:2601.10015): KD term and gradient paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cafe_ray.algorithms.cafedistill.loss import (
    KDStats,
    cafedistill_loss,
    kd_term,
    make_loss_fn,
    teacher_logits,
)
from cafe_ray.models.base import EarlyExitNet


def batch(seed: int = 0, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def teacher_head(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 16, generator=g).requires_grad_(), torch.randn(4, generator=g).requires_grad_()


def test_kd_is_zero_when_student_equals_teacher() -> None:
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    assert float(kd_term(z, z.clone(), tau=3.0)) == pytest.approx(0.0, abs=1e-6)


def test_kd_is_tau_squared_kl() -> None:
    g = torch.Generator().manual_seed(1)
    s, t, tau = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), 2.0
    p, q = F.softmax(t / tau, 1), F.softmax(s / tau, 1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    assert float(kd_term(s, t, tau)) == pytest.approx(tau * tau * float(kl), rel=1e-5)


def test_teacher_logits_are_phi_times_head() -> None:
    phi, (w, b) = torch.randn(3, 16, generator=torch.Generator().manual_seed(2)), teacher_head()
    z = teacher_logits(phi, w, b)
    torch.testing.assert_close(z, phi @ w.detach().T + b.detach())
    assert not z.requires_grad


def test_kd_gradient_reaches_neither_teacher_head_nor_deeper_backbone(tiny_een: EarlyExitNet) -> None:
    x, y = batch()
    w, b = teacher_head()
    logits, phi = tiny_een.forward_with_features(x)
    zbar = F.linear(phi, w, b)  # deliberately not detached: kd_term must cut the path itself
    kd_term(logits[0], zbar, tau=3.0).backward()
    assert w.grad is None and b.grad is None
    # student exit 0 reads stage 0 only: stages 1..m-1 could only get a gradient via zbar
    for name, p in tiny_een.named_parameters():
        if name.startswith(("stages.1.", "stages.2.")):
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
    assert tiny_een.stages[0][0].weight.grad is not None


def test_loss_fn_trains_no_teacher_head(tiny_een: EarlyExitNet) -> None:
    w, b = teacher_head()
    make_loss_fn(w, b, students=(0, 1), lam=1.0, tau=3.0)(tiny_een, *batch()).backward()
    assert w.grad is None and b.grad is None


def test_unselected_exit_gets_no_gradient(tiny_een: EarlyExitNet) -> None:
    w, b = teacher_head()
    make_loss_fn(w, b, students=(1,), lam=1.0, tau=3.0)(tiny_een, *batch()).backward()
    assert all(p.grad is None for p in tiny_een.exits[0].parameters())
    assert all(p.grad is not None for p in tiny_een.exits[1].parameters())
    assert all(p.grad is not None for p in tiny_een.exits[2].parameters())


def test_no_students_is_teacher_cross_entropy(tiny_een: EarlyExitNet) -> None:
    x, y = batch()
    logits = tiny_een(x)
    total, kd = cafedistill_loss(logits, torch.zeros_like(logits[-1]), y, (), lam=1.0, tau=3.0)
    torch.testing.assert_close(total, F.cross_entropy(logits[-1], y))
    assert float(kd) == 0.0


def test_loss_is_ce_plus_lambda_kd(tiny_een: EarlyExitNet) -> None:
    x, y = batch()
    logits = tiny_een(x)
    zbar = torch.randn(logits[-1].shape, generator=torch.Generator().manual_seed(3))
    total, kd = cafedistill_loss(logits, zbar, y, (0, 1), lam=0.5, tau=2.0)
    expected_kd = kd_term(logits[0], zbar, 2.0) + kd_term(logits[1], zbar, 2.0)
    expected = sum(F.cross_entropy(z, y) for z in logits) + 0.5 * expected_kd
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(kd, expected_kd.detach())


def test_lambda_zero_skips_distillation(tiny_een: EarlyExitNet) -> None:
    x, y = batch()
    logits = tiny_een(x)
    zbar = torch.randn(logits[-1].shape, generator=torch.Generator().manual_seed(4))
    total, kd = cafedistill_loss(logits, zbar, y, (0,), lam=0.0, tau=3.0)
    torch.testing.assert_close(total, F.cross_entropy(logits[-1], y) + F.cross_entropy(logits[0], y))
    assert float(kd) == 0.0


def test_kd_stats_are_sample_weighted() -> None:
    stats = KDStats()
    stats.add(torch.tensor(1.0), 1)
    stats.add(torch.tensor(4.0), 3)
    assert stats.mean == pytest.approx(13 / 4)
    assert KDStats().mean == 0.0
