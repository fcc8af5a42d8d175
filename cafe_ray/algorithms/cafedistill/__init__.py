"""CAFEDistill (arXiv:2601.10015): the project's reference algorithm.

schedule.py R(t) and B_t; selection.py the two-tier student selection S_i;
teacher.py the teacher weights w_ij and aggregated heads hbar_i; loss.py the
local objective L_i; algorithm.py the :class:`CafeDistill` algorithm (registered
as ``cafedistill``). Pure PyTorch + numpy, never Ray.
"""

from cafe_ray.algorithms.cafedistill.algorithm import CafeDistill
from cafe_ray.algorithms.cafedistill.loss import (
    cafedistill_loss,
    kd_term,
    make_loss_fn,
    teacher_logits,
)
from cafe_ray.algorithms.cafedistill.schedule import (
    progress,
    schedule_t,
    student_budget,
    tier1_depth,
)
from cafe_ray.algorithms.cafedistill.selection import (
    StudentPlan,
    head_cosine_scores,
    least_conflict,
    plan_students,
    select_students,
    tier_exits,
    update_cosine_scores,
)
from cafe_ray.algorithms.cafedistill.teacher import (
    aggregate_heads,
    cosine_distances,
    pack_head,
    project_simplex,
    teacher_weights,
    unpack_head,
)

__all__ = [
    "CafeDistill",
    "StudentPlan",
    "aggregate_heads",
    "cafedistill_loss",
    "cosine_distances",
    "head_cosine_scores",
    "kd_term",
    "least_conflict",
    "make_loss_fn",
    "pack_head",
    "plan_students",
    "progress",
    "project_simplex",
    "schedule_t",
    "select_students",
    "student_budget",
    "teacher_logits",
    "teacher_weights",
    "tier1_depth",
    "tier_exits",
    "unpack_head",
    "update_cosine_scores",
]
