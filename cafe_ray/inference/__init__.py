"""Dynamic inference: exit policies and accuracy-versus-MACs evaluation."""

from cafe_ray.inference.dynamic import Prediction, predict_batch
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

__all__ = [
    "EntropyThreshold", "ExitPolicy", "FullDepth", "Prediction", "Threshold", "available_policies",
    "build_policy", "confidence_features", "predict_batch", "register_policy",
]
