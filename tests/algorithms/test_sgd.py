"""The local loop's SGD against torch.optim.SGD, bit for bit."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from cafe_ray.algorithms.sgd import SGD
from tests.conftest import make_tiny_een


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.9, 5e-4), (0.5, 1e-2)])
def test_sgd_matches_torch_optim_sgd_bit_for_bit(momentum: float, weight_decay: float) -> None:
    a = make_tiny_een()
    b = copy.deepcopy(a)
    ours = SGD(a.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    ref = torch.optim.SGD(b.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            # exit 0 only on odd steps: some grads are None there and must be skipped by both
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits[0] if step % 2 else logits[-1], y)
            loss.backward()
            opt.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_sgd_rejects_negative_settings() -> None:
    with pytest.raises(ValueError, match="lr, momentum, weight_decay"):
        SGD([torch.nn.Parameter(torch.zeros(1))], lr=-0.1)


def test_local_training_does_not_import_torch_dynamo() -> None:
    """The reason this SGD exists: a round of local SGD leaves torch._dynamo unimported."""
    code = (
        "import sys, torch\n"
        "from cafe_ray.algorithms.training import local_sgd\n"
        "from cafe_ray.algorithms.base import ClientData\n"
        "from cafe_ray.config import TrainConfig\n"
        "from tests.conftest import make_tiny_een\n"
        "from tests.algorithms.helpers import client_ctx, make_clients\n"
        "local_sgd(make_tiny_een(), make_clients(1)[0], client_ctx(0, 0, 1), TrainConfig())\n"
        "print(any(m.startswith('torch._dynamo') for m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
