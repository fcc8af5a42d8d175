"""ASHA whose rungs survive an interrupted sweep.

``Tuner.restore`` brings back Tune's trials but not its scheduler's state: the ASHA rungs
(each milestone's recorded metric values) start empty (ray-project/ray#30838), so after a
resume no trial is compared against the trials that finished before the interruption and
early stopping decides differently. :class:`ResumableASHA` is Ray's ``ASHAScheduler`` plus
:meth:`~ResumableASHA.replay`: on resume, the results every *finished* trial reported are
fed through the same rung bookkeeping ASHA applied when they arrived, which rebuilds the
rungs exactly (a trial's entries depend only on its own results). Unfinished trials are not
replayed: they restart and report again (cafe_ray.studies.sweep re-reports every evaluation
their simulation checkpoint holds), and ASHA then decides for them as it would have. With
``max_concurrent_trials=1`` the decisions are those of the uninterrupted sweep; with
concurrent trials they are as exact as ASHA's own arrival order allows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import SimpleNamespace

from ray.tune.schedulers import ASHAScheduler


class ResumableASHA(ASHAScheduler):
    """Ray's ASHA (one bracket) whose rungs can be rebuilt from reported results."""

    def replay(self, histories: Mapping[str, Iterable[tuple[float, float]]],
               pending: Iterable[str] = ()) -> None:
        """Rebuild the rungs from ``trial_id -> [(time_attr value, metric), ...]`` in report order.

        ``pending`` are the trials that will run again (they get a bracket, no rung entries).
        """
        if self._metric_op is None:
            raise ValueError("ResumableASHA.replay needs the scheduler's metric and mode")
        bracket = self._brackets[0]
        for trial_id, results in histories.items():
            stub = SimpleNamespace(trial_id=trial_id)  # rungs key on the trial id only
            for t, value in results:
                bracket.on_result(stub, t, self._metric_op * value)
        for trial_id in [*histories, *pending]:
            self._trial_info.setdefault(trial_id, bracket)

    def rungs(self) -> list[tuple[float, dict[str, float]]]:
        """(milestone, {trial_id: metric as ASHA compares it}) per rung, highest first."""
        return [(m, dict(rec)) for m, rec in self._brackets[0]._rungs]
