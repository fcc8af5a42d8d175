"""The learned cascade: features, fitting on a crafted signal, calibration, save/load, predict_batch."""

import json

import numpy as np
import pytest
import torch

from cafe_ray.inference import (
    CascadePolicy,
    LearnedPolicy,
    available_policies,
    load_exit_policy,
    predict_batch,
    save_policy,
)
from cafe_ray.inference.budget import calibrate_threshold
from cafe_ray.inference.cascade import (
    FEATURE_SET,
    OUTCOMES,
    CascadeSpec,
    FitSettings,
    cascade_features,
    cross_validate,
    feature_dim,
    fit_cascade,
    is_fitted_policy,
    label_prior,
    load_cascade,
    outcome_targets,
    save_cascade,
)
from cafe_ray.inference.trace import ExitTrace
from tests.inference.helpers import HAND_CASCADE, HAND_COST, as_input, sliced_een
from tests.inference.test_learned import random_mlp


def _exit_probs(conf: np.ndarray, pred0: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n, 3 exits, 3 classes): exit 0 answers pred0 with confidence conf, exits 1-2 the label at 0.95."""
    n = len(labels)
    probs = np.zeros((n, 3, 3))
    probs[:, 0, :] = ((1 - conf) / 2)[:, None]
    probs[np.arange(n), 0, pred0] = conf
    for k in (1, 2):
        probs[:, k, :] = 0.025
        probs[np.arange(n), k, labels] = 0.95
    return probs


def crafted_trace(n: int, seed: int) -> ExitTrace:
    """3 exits, 3 classes. Exit 0's confidence is drawn alike for right and wrong answers, but every
    answer 'class 0' at exit 0 is wrong (the label is 1); exits 1 and 2 are right and sure. A
    max-probability threshold cannot tell exit 0's wrong answers from its right ones; a policy
    that reads exit 0's whole probability vector can."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.5, 0.95, n)
    wrong = rng.random(n) < 1 / 3
    labels = np.where(wrong, 1, rng.integers(1, 3, n))
    pred0 = np.where(wrong, 0, labels)
    probs = _exit_probs(conf, pred0, labels)
    return ExitTrace(np.log(probs).astype(np.float32), labels, np.array(HAND_CASCADE))


MLP = {"combine": "none", "decide": "cascade"}  # the outcome MLPs on the exits as they are
NO_PRIOR = {"context": "none", **MLP}


def prior_trace(n: int, seed: int) -> tuple[ExitTrace, np.ndarray]:
    """Two clients with opposite label priors (client A: class 1 at 90%, client B: class 2 at 90%).
    Exit 0 answers class 1 or 2 with the same spread of confidence; it is wrong exactly when it
    answers the class its client rarely sees. Only the client's label prior tells them apart."""
    rng = np.random.default_rng(seed)
    client_b = rng.random(n) < 0.5
    common = np.where(client_b, 2, 1)
    rare = 3 - common
    wrong = rng.random(n) < 0.3
    labels = common.copy()
    pred0 = np.where(wrong, rare, common)
    conf = rng.uniform(0.5, 0.95, n)
    probs = _exit_probs(conf, pred0, labels)
    prior_a, prior_b = label_prior([0] * 5 + [1] * 90 + [2] * 5, 3), label_prior([0] * 5 + [1] * 5 + [2] * 90, 3)
    priors = np.where(client_b[:, None], prior_b[None], prior_a[None])
    return ExitTrace(np.log(probs).astype(np.float32), labels, np.array(HAND_CASCADE)), priors


def test_label_prior():
    assert label_prior(np.array([0, 0, 2, 2]), 3).tolist() == [0.5, 0.0, 0.5]
    assert label_prior(np.array([], dtype=np.int64), 4).tolist() == [0.25] * 4


def test_features_follow_the_history():
    p0 = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    p1 = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]])
    f0, f1 = cascade_features([p0]), cascade_features([p0, p1])
    assert f0.shape == (2, feature_dim(0, 3, "none")) == (2, 7) and f1.shape == (2, feature_dim(1, 3, "none")) == (2, 13)
    assert torch.allclose(f0[:, 4:], p0) and torch.allclose(f1[:, :4], f0[:, :4])
    # log-odds of the max probability, from the small terms (0.2 + 0.1, not 1 - 0.7)
    assert f0[:, 3].tolist() == pytest.approx([np.log(0.7 / 0.3), np.log(0.8 / 0.2)], rel=1e-5)
    assert f1[:, -2].tolist() == [1.0, 0.0]  # argmax agreement of exits 1 and 0
    assert f1[:, -1].tolist() == pytest.approx([0.7, 0.1])  # exit 0's probability of exit 1's answer
    with pytest.raises(ValueError, match="at least one exit"):
        cascade_features([])
    prior = torch.tensor([0.1, 0.3, 0.6])
    fp = cascade_features([p0, p1], prior)
    assert fp.shape == (2, feature_dim(1, 3, "label_prior")) == (2, 17)
    assert torch.allclose(fp[:, :13], f1) and fp[:, -1].tolist() == pytest.approx([0.1, 0.1])


def test_outcome_targets():
    correct = np.array([[True, True, False], [False, True, True], [False, False, True], [True, True, True]])
    assert [OUTCOMES[i] for i in outcome_targets(correct, 0)] == ["hurts", "helps", "helps", "same"]
    assert [OUTCOMES[i] for i in outcome_targets(correct, 0, "next")] == ["same", "helps", "same", "same"]
    with pytest.raises(ValueError, match="target must be one of"):
        outcome_targets(correct, 0, "best")


@pytest.mark.slow  # trains a model and fits a cascade
def test_the_cascade_beats_a_threshold_where_confidence_is_blind():
    train, test = crafted_trace(900, seed=0), crafted_trace(900, seed=1)
    pol = CascadePolicy(net=fit_cascade(train, FitSettings(hidden=(16,), steps=300, seed=0, **NO_PRIOR)))
    # 198 MACs: 60% of the samples stop at exit 0 (110 MACs), the rest at exit 1 (330). A threshold
    # stops a random 60% (a third of them wrong: 80% accuracy); the cascade can stop right ones only.
    budget = 0.3 * HAND_CASCADE[-1]
    lam, macs = pol.calibrate(train, budget)
    assert macs <= budget
    t, _ = calibrate_threshold(train, macs)
    ex_p, ex_t = pol.exits_at(pol.prices(test), lam), test.threshold_exits(t)
    assert test.mean_macs(ex_p) <= 1.1 * test.mean_macs(ex_t)
    assert test.accuracy(ex_p) > test.accuracy(ex_t) + 0.1
    cv = cross_validate(train, FitSettings(hidden=(16,), steps=200, **NO_PRIOR), [budget], folds=3)
    assert cv["mean_gain_curve"] > 0.1 and cv["folds"] == 3


def test_the_label_prior_is_what_tells_wrong_answers_apart():
    (train, p_train), (test, p_test) = prior_trace(1200, seed=0), prior_trace(1200, seed=1)
    pol = CascadePolicy(net=fit_cascade(train, FitSettings(hidden=(16,), steps=300, **MLP), prior=p_train))
    budget = 0.3 * HAND_CASCADE[-1]  # 60% stop at exit 0: a threshold's pick is 30% wrong
    lam, macs = pol.calibrate(train, budget, prior=p_train)
    t, _ = calibrate_threshold(train, macs)
    ex_p, ex_t = pol.exits_at(pol.prices(test, p_test), lam), test.threshold_exits(t)
    assert test.mean_macs(ex_p) <= 1.1 * test.mean_macs(ex_t)
    assert test.accuracy(ex_p) > test.accuracy(ex_t) + 0.1
    with pytest.raises(ValueError, match="reads the client's label prior"):
        pol.prices(test)
    with pytest.raises(ValueError, match="reads the client's label prior"):
        fit_cascade(train, FitSettings(steps=5))


def test_calibration_is_monotone_and_within_budget():
    tr = crafted_trace(300, seed=2)
    pol = CascadePolicy(net=fit_cascade(tr, FitSettings(hidden=(), steps=100, **NO_PRIOR)))
    macs = [pol.calibrate(tr, b)[1] for b in (110, 200, 300, 450, 660)]
    assert all(m <= b + 1e-9 for m, b in zip(macs, (110, 200, 300, 450, 660), strict=True))
    assert macs == sorted(macs) and macs[0] == 110 and macs[-1] <= 660
    with pytest.raises(ValueError, match="below the first exit"):
        pol.calibrate(tr, 100)


def test_round_trip_and_predict_batch_agree_with_the_trace(tmp_path):
    tr, priors = prior_trace(240, seed=3)
    net = fit_cascade(tr, FitSettings(hidden=(8,), steps=80, seed=1, **MLP), meta={"run": "crafted"}, prior=priors)
    w, j = save_cascade(net, tmp_path / "cas", lam=0.2)
    side = json.loads(j.read_text())
    assert side["format"] == "cafe-ray-exit-cascade-v1" and side["feature_set"] == FEATURE_SET
    assert side["lam"] == 0.2 and side["meta"]["run"] == "crafted" and side["exit_macs"] == HAND_CASCADE
    assert side["context"] == "label_prior" and side["members"] == 5
    assert len(loaded_keys := net.state_dict()) == 2 * 5 * 4 and "nets.1.4.2.weight" in loaded_keys
    loaded = load_exit_policy(w)
    assert isinstance(loaded, CascadePolicy) and loaded.lam == 0.2
    assert np.array_equal(loaded.prices(tr, priors), CascadePolicy(net=net).prices(tr, priors))
    assert CascadePolicy(j, lam=0.1).lam == 0.1 and "cascade" not in available_policies()  # not served by name
    # predict_batch (samples leave the batch, the history shrinks with it) == the policy on the
    # trace, for each client bound to its own prior
    model = sliced_een(3, 3)
    for prior in np.unique(priors, axis=0):
        rows = np.flatnonzero((priors == prior).all(axis=1))
        sub = ExitTrace(tr.logits[rows], tr.labels[rows], tr.exit_macs)
        for lam in (-0.5, 0.0, 0.05, 0.2, 0.5):
            pol = loaded.with_lam(lam).for_client(prior)
            pred = predict_batch(model, as_input(torch.from_numpy(sub.logits)), pol, HAND_COST)
            ex = pol.exits_at(pol.prices(sub), lam)
            assert np.array_equal(pred.exits.numpy(), ex)
            assert np.array_equal(pred.macs.numpy(), sub.exit_macs[ex])
    with pytest.raises(ValueError, match="reads the client's label prior"):
        predict_batch(model, as_input(torch.from_numpy(tr.logits)), loaded, HAND_COST)
    with pytest.raises(ValueError, match="3 finite class frequencies"):
        loaded.for_client([0.5, 0.5])


def test_load_exit_policy_opens_rl_policies_too(tmp_path):
    w, j = save_policy(random_mlp(), tmp_path / "rl")
    assert isinstance(load_exit_policy(w), LearnedPolicy) and not is_fitted_policy(w)
    j.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_exit_policy(w)


def test_a_sidecar_from_another_feature_set_is_refused(tmp_path):
    net = fit_cascade(crafted_trace(60, seed=4), FitSettings(hidden=(4,), steps=5, **NO_PRIOR))
    w, j = save_cascade(net, tmp_path / "cas")
    side = json.loads(j.read_text())
    j.write_text(json.dumps({**side, "feature_set": "history-v1"}))
    with pytest.raises(ValueError, match="refit it with `cafe-ray policy fit`"):
        load_cascade(w)
    j.write_text(json.dumps({**side, "hidden": [5]}))
    with pytest.raises(ValueError, match="do not match the sidecar's architecture"):
        load_cascade(w)
    with pytest.raises(ValueError, match="shift\\[0\\] has 2 values"):
        CascadeSpec(3, 3, (110, 330, 660), (4,), ((0.0, 0.0), (0.0,) * 13), ((1.0,) * 7, (1.0,) * 13),
                    context="none")
    with pytest.raises(ValueError, match="members"):
        CascadeSpec(3, 3, (110, 330, 660), (4,), ((0.0,) * 7, (0.0,) * 13), ((1.0,) * 7, (1.0,) * 13),
                    context="none", members=0)
    with pytest.raises(FileNotFoundError, match="cafe-ray policy fit"):
        load_cascade(tmp_path / "missing")


def test_a_cascade_refuses_a_model_of_another_shape():
    pol = CascadePolicy(net=fit_cascade(crafted_trace(60, seed=5), FitSettings(hidden=(4,), steps=5, **NO_PRIOR)))
    with pytest.raises(ValueError, match="fitted for 3 exits x 3 classes"):
        pol.decide_history([torch.full((2, 4), 0.25)], 0, 3, torch.zeros(2))
