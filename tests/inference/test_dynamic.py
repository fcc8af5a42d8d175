"""predict_batch against a reference that runs every exit on every sample."""

import pytest
import torch

from cafe_ray.inference import FullDepth, Threshold, predict_batch
from cafe_ray.models import cnn_small
from cafe_ray.models.macs import exit_macs


def reference(model, x, threshold: float | None, cost):
    """Each sample's answer at the first exit whose top probability reaches the threshold."""
    with torch.no_grad():
        probs = [z.softmax(dim=1) for z in model(x)]
    m = len(probs)
    exits = torch.full((x.shape[0],), m - 1, dtype=torch.long)
    if threshold is not None:
        for i in range(x.shape[0]):
            exits[i] = next(k for k in range(m) if k == m - 1 or probs[k][i].max() >= threshold)
    out = torch.stack([probs[int(k)][i] for i, k in enumerate(exits)])
    return out, exits, torch.tensor(cost.cascade)[exits]


@pytest.mark.parametrize("threshold", [None, 0.0, 0.2, 0.5, 0.8, 1.0])
def test_predict_batch_matches_running_every_exit(threshold):
    torch.manual_seed(0)
    model = cnn_small((1, 9, 9), 5, width=4).eval()  # odd sides: the pooling drops an edge
    cost = exit_macs(model, (1, 9, 9))
    x = torch.randn(40, 1, 9, 9) * 3
    p = predict_batch(model, x, FullDepth() if threshold is None else Threshold(threshold), cost)
    probs, exits, macs = reference(model, x, threshold, cost)
    assert p.exits.tolist() == exits.tolist()
    assert p.macs.tolist() == macs.tolist()
    torch.testing.assert_close(p.probs, probs)
    torch.testing.assert_close(p.confidence, probs.max(dim=1).values)
    assert p.labels.tolist() == probs.argmax(dim=1).tolist()
    if threshold == 0.5:  # the case that exercises every branch: some stop early, some go on
        assert 0 < int((exits == 0).sum()) < x.shape[0] and int((exits > 0).sum()) > 0


def test_policies_see_the_macs_every_running_sample_has_spent():
    class Spy(Threshold):
        def __init__(self) -> None:
            super().__init__(0.5)
            self.seen: list[tuple[int, list[int]]] = []

        def should_exit(self, probs, k, num_exits, macs_spent):
            self.seen.append((k, macs_spent.tolist()))
            return super().should_exit(probs, k, num_exits, macs_spent)

    torch.manual_seed(1)
    model = cnn_small((1, 8, 8), 3, width=4).eval()
    cost = exit_macs(model, (1, 8, 8))
    spy = Spy()
    predict_batch(model, torch.randn(16, 1, 8, 8), spy, cost)
    assert spy.seen and all(set(spent) == {cost.cascade[k]} for k, spent in spy.seen)


@pytest.mark.parametrize("policy", [FullDepth(), Threshold(0.5)])
def test_an_empty_batch_gives_empty_answers(policy):
    model = cnn_small((1, 8, 8), 3, width=4).eval()
    p = predict_batch(model, torch.zeros(0, 1, 8, 8), policy, exit_macs(model, (1, 8, 8)))
    assert [tuple(t.shape) for t in (p.labels, p.exits, p.confidence, p.macs, p.probs)] == [(0,)] * 4 + [(0, 3)]
