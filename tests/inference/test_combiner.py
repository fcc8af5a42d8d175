"""Combined exits: the fit recovers a label prior and independent evidence, and every path agrees."""

import json

import numpy as np
import pytest
import torch

from cafe_ray.inference import CascadePolicy, load_exit_policy, predict_batch
from cafe_ray.inference.budget import calibrate_threshold
from cafe_ray.inference.cascade import (
    CascadeSpec,
    FitSettings,
    cross_validate,
    fit_cascade,
    is_fitted_policy,
    label_prior,
    save_cascade,
)
from cafe_ray.inference.combiner import ExitCombiner, fit_combiner
from cafe_ray.inference.trace import ExitTrace
from tests.inference.helpers import HAND_CASCADE, HAND_COST, as_input, sliced_een

PRIOR_A = label_prior([0] * 5 + [1] * 85 + [2] * 10, 3)
PRIOR_B = label_prior([0] * 10 + [1] * 5 + [2] * 85, 3)


def skewed_trace(n: int, seed: int, signal: tuple[float, ...] = (0.8, 1.2, 1.6)) -> tuple[ExitTrace, np.ndarray]:
    """Two clients (class 1 common for A, class 2 for B; labels drawn from their priors). Every
    exit's logits are ``signal[k]`` on the label plus independent unit noise and know nothing of
    the client: Bayes says add the log prior, and averaging exits averages their noise away."""
    rng = np.random.default_rng(seed)
    client_b = rng.random(n) < 0.5
    priors = np.where(client_b[:, None], PRIOR_B[None], PRIOR_A[None]).astype(np.float32)
    labels = np.array([rng.choice(3, p=p / p.sum()) for p in priors])
    logits = rng.normal(size=(n, len(signal), 3))
    logits[np.arange(n), :, labels] += np.asarray(signal)[None]
    return ExitTrace(logits.astype(np.float32), labels, np.array(HAND_CASCADE)), priors


def test_the_fit_learns_the_prior_and_the_earlier_exits():
    (tr, p_tr), (te, p_te) = skewed_trace(3000, seed=0), skewed_trace(3000, seed=1)
    comb = fit_combiner(tr, p_tr)
    w1, beta0 = comb.weights(1)[0], comb.weights(0)[2]
    assert float(beta0) > 0.5  # the prior is used: the exits never saw it
    assert 0.2 < float(w1[0]) < float(w1[1])  # exit 0 counts at exit 1, less than exit 1 itself
    acc_plain = te.correct.mean(axis=0)
    acc_comb = comb.transform(te, p_te).correct.mean(axis=0)
    assert (acc_comb > acc_plain + 0.03).all(), (acc_plain, acc_comb)
    # without the prior term only the exits are combined: exit 0 alone cannot improve much
    plain = fit_combiner(tr, use_prior=False)
    acc_np = plain.transform(te, None).correct.mean(axis=0)
    assert acc_np[0] < acc_comb[0] - 0.03 and acc_np[2] > acc_plain[2]
    with pytest.raises(ValueError, match="reads the client's label prior"):
        comb.transform(te, None)
    with pytest.raises(ValueError, match="label prior of shape"):
        comb.transform(te, p_te[:5])


def test_an_identity_combiner_changes_nothing():
    tr, _ = skewed_trace(50, seed=2)
    out = ExitCombiner(3, 3, use_prior=False).transform(tr, None)
    assert np.allclose(out.probs, tr.probs, atol=1e-6)


def test_a_threshold_on_combined_exits_beats_the_plain_threshold_at_equal_macs():
    (tr, p_tr), (te, p_te) = skewed_trace(3000, seed=3), skewed_trace(3000, seed=4)
    pol = CascadePolicy(net=fit_cascade(tr, FitSettings(), prior=p_tr))  # defaults: combine prior, decide threshold
    assert pol.combines and pol.spec.decide == "threshold" and pol.net.nets is not None and len(pol.net.nets) == 0
    budget = 0.3 * HAND_CASCADE[-1]
    lam, macs = pol.calibrate(tr, budget, prior=p_tr)
    t, _ = calibrate_threshold(tr, macs)
    ex_p, ex_t = pol.exits_at(pol.prices(te, p_te), lam), te.threshold_exits(t)
    assert abs(te.mean_macs(ex_p) - te.mean_macs(ex_t)) <= 0.1 * budget
    assert pol.answers(te, p_te).accuracy(ex_p) > te.accuracy(ex_t) + 0.03
    cv = cross_validate(tr, FitSettings(), [budget], folds=3, prior=p_tr)
    assert cv["mean_gain_curve"] > 0.03
    assert pol.describe()["threshold"] == pytest.approx(1.0 - pol.lam)


@pytest.mark.parametrize("decide", ["threshold", "cascade"])
def test_predict_batch_answers_with_the_combined_exits_and_agrees_with_the_trace(tmp_path, decide):
    tr, priors = skewed_trace(400, seed=5)
    settings = FitSettings(decide=decide, hidden=(8,), steps=40, members=2)
    w, j = save_cascade(fit_cascade(tr, settings, prior=priors), tmp_path / "p", lam=0.1)
    side = json.loads(j.read_text())
    assert side["combine"] == "prior" and side["decide"] == decide and len(side["meta"]["combiner"]) == 3
    loaded = load_exit_policy(w)
    assert isinstance(loaded, CascadePolicy) and loaded.combines and is_fitted_policy(w)
    model = sliced_een(3, 3)
    for prior in (PRIOR_A, PRIOR_B):
        rows = np.flatnonzero((priors == prior).all(axis=1))
        sub = ExitTrace(tr.logits[rows], tr.labels[rows], tr.exit_macs)
        seen = loaded.for_client(prior).answers(sub)
        for lam in (-0.5, 0.05, 0.2, 0.4, 1.5):
            pol = loaded.with_lam(lam).for_client(prior)
            pred = predict_batch(model, as_input(torch.from_numpy(sub.logits)), pol, HAND_COST)
            ex = pol.exits_at(pol.prices(sub), lam)
            assert np.array_equal(pred.exits.numpy(), ex)
            assert np.array_equal(pred.labels.numpy(), seen.logits.argmax(axis=2)[np.arange(len(ex)), ex])
            assert np.allclose(pred.probs.numpy(), seen.probs[np.arange(len(ex)), ex], atol=1e-5)
    with pytest.raises(ValueError, match="reads the client's label prior"):
        predict_batch(model, as_input(torch.from_numpy(tr.logits)), loaded, HAND_COST)
    with pytest.raises(ValueError, match="run it through predict_batch"):
        loaded.should_exit(torch.full((2, 3), 1 / 3), 0, 3, torch.zeros(2))


def test_a_threshold_policy_without_a_combiner_is_a_max_probability_threshold():
    tr, _ = skewed_trace(300, seed=6)
    pol = CascadePolicy(net=fit_cascade(tr, FitSettings(combine="none")))
    assert not pol.combines and pol.answers(tr) is tr
    for t in (0.4, 0.55, 0.7, 0.9):
        lam = 1.0 - t
        assert np.array_equal(pol.exits_at(pol.prices(tr), lam), tr.threshold_exits(np.float32(1.0) - np.float32(lam)))


def test_a_threshold_spec_has_no_mlps():
    with pytest.raises(ValueError, match="has no MLPs"):
        CascadeSpec(3, 3, (110, 330, 660), (), (), (), context="none", members=2, decide="threshold")
    with pytest.raises(ValueError, match="combine 'mean' unknown"):
        CascadeSpec(3, 3, (110, 330, 660), (), (), (), context="none", members=0, decide="threshold", combine="mean")
    with pytest.raises(ValueError, match="decide must be one of"):
        fit_cascade(skewed_trace(20, seed=7)[0], FitSettings(decide="rl", combine="none"))


def test_the_default_operating_point_is_the_cheapest_within_one_point_of_full_depth():
    tr, priors = skewed_trace(2000, seed=8, signal=(2.0, 2.5, 3.5))
    pol = CascadePolicy(net=fit_cascade(tr, FitSettings(), prior=priors))
    seen = pol.answers(tr, priors)
    ex = pol.exits_at(pol.prices(tr, priors), pol.lam)
    full = seen.accuracy(np.full(tr.num_samples, 2))
    assert seen.accuracy(ex) >= full - 0.01 - 1e-9
    assert seen.mean_macs(ex) < 0.8 * tr.full_macs  # it does exit early
    assert pol.spec.meta["default_threshold"] == pytest.approx(1.0 - pol.lam)
    # a slightly cheaper threshold falls out of the 1-point margin (or exits everything already)
    cheaper = pol.exits_at(pol.prices(tr, priors), pol.lam + 0.02)
    assert seen.accuracy(cheaper) < full - 0.01 or seen.mean_macs(cheaper) == tr.exit_macs[0]
