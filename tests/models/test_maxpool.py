"""MaxPool2x2: exactly nn.MaxPool2d(2) without autograd (the fast path) and with it (the kernel)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cafe_ray.models.zoo import MaxPool2x2


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 5, 7, 9), (4, 6, 6), (1, 1, 2, 3)])
def test_same_values_as_the_pooling_kernel_without_autograd(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).relu()  # many exact ties at 0, as after a ReLU
    x.view(-1)[::7] = 1.0  # ties at a positive value too
    x.view(-1)[5 % x.numel()] = float("nan")
    x.view(-1)[11 % x.numel()] = float("-inf")
    with torch.no_grad():
        torch.testing.assert_close(MaxPool2x2()(x), nn.MaxPool2d(2)(x), rtol=0, atol=0, equal_nan=True)
    with torch.inference_mode():
        torch.testing.assert_close(MaxPool2x2()(x), nn.MaxPool2d(2)(x), rtol=0, atol=0, equal_nan=True)


def test_with_autograd_it_is_the_kernel_and_its_gradient():
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)).relu().requires_grad_()
    y = x.detach().clone().requires_grad_()
    MaxPool2x2()(x).sum().backward()
    nn.MaxPool2d(2)(y).sum().backward()
    assert torch.equal(x.grad, y.grad)  # one winner per window, ties included
