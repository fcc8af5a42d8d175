"""Batched (cohort) losses: each client's mean CE over its real samples, padding left out."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cafe_ray.algorithms.batched import cohort_exit_ce, masked_ce


def test_masked_ce_is_each_clients_mean_ce_over_its_own_rows():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 2, 5, generator=g)
    y = torch.randint(0, 5, (4, 2), generator=g)
    w = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 0]], dtype=torch.float32)  # client 1 has 2 samples
    got = masked_ce(z, y, w)
    torch.testing.assert_close(got[0], F.cross_entropy(z[:, 0], y[:, 0]))
    torch.testing.assert_close(got[1], F.cross_entropy(z[:2, 1], y[:2, 1]))
    torch.testing.assert_close(cohort_exit_ce([z, 2 * z], y, w), got + masked_ce(2 * z, y, w))


def test_a_minus_inf_logit_on_a_padding_row_leaves_loss_and_gradient_finite():
    """A balanced softmax gives -inf to classes a client never saw; padding rows carry label 0."""
    z = torch.zeros(2, 1, 3, requires_grad=True)
    prior = torch.tensor([float("-inf"), 0.0, 0.0])  # class 0 never seen
    y = torch.tensor([[1], [0]])  # row 1 is padding with the dummy label 0
    w = torch.tensor([[1.0], [0.0]])
    loss = masked_ce(z + prior, y, w)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(z.grad).all()
    torch.testing.assert_close(loss, torch.tensor([torch.log(torch.tensor(2.0)).item()]))
    assert (z.grad[1] == 0).all()  # the padding row trains nothing
