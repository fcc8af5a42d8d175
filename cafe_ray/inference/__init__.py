"""Dynamic inference: exit policies and accuracy-versus-MACs evaluation.

Policies by name (:func:`build_policy`): ``full``, ``threshold``, ``entropy``, ``budget``
(a threshold calibrated to a mean MAC budget) and ``learned`` (a saved MLP, e.g. trained
with RLlib on ``cafe_ray/EarlyExit-v0``). A fitted policy (:class:`CascadePolicy`, supervised:
answers from a learned combination of every exit so far and the client's label prior
(:mod:`cafe_ray.inference.combiner`), then stops on a threshold or a learned cascade) is opened
with :func:`load_exit_policy`; it is not in the registry, as it needs a fitted file and a client
to be bound to. Evaluation is in :mod:`cafe_ray.inference.evaluate`.
"""

from cafe_ray.inference.budget import BudgetThreshold, calibrate_threshold
from cafe_ray.inference.cascade import CascadePolicy, load_exit_policy
from cafe_ray.inference.dynamic import Prediction, predict_batch
from cafe_ray.inference.learned import (
    ExitMLP,
    LearnedPolicy,
    PolicySpec,
    load_policy_mlp,
    save_policy,
)
from cafe_ray.inference.observation import OBS_FEATURES, exit_observation, observation_bounds
from cafe_ray.inference.policies import (
    EntropyThreshold,
    ExitPolicy,
    FullDepth,
    Threshold,
    available_policies,
    build_policy,
    confidence_features,
    register_policy,
)
from cafe_ray.inference.trace import ExitTrace

__all__ = [
    "OBS_FEATURES", "BudgetThreshold", "CascadePolicy", "EntropyThreshold", "ExitMLP", "ExitPolicy", "ExitTrace", "FullDepth",
    "LearnedPolicy", "PolicySpec", "Prediction", "Threshold", "available_policies", "build_policy",
    "calibrate_threshold", "confidence_features", "exit_observation", "load_exit_policy", "load_policy_mlp", "observation_bounds",
    "predict_batch", "register_policy", "save_policy",
]
