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
:class:`OrderedASHA` (what sweeps use) also makes the decisions independent of the order in
which concurrent trials arrive at a rung, so an uninterrupted concurrent sweep is reproducible
and a resumed one decides as the uninterrupted one did.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import SimpleNamespace
from typing import Any

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
        bracket: Any = self._brackets[0]  # fed stubs for trials and float milestones
        for trial_id, results in histories.items():
            stub = SimpleNamespace(trial_id=trial_id)  # rungs key on the trial id only
            for t, value in results:
                bracket.on_result(stub, t, self._metric_op * value)
        for trial_id in [*histories, *pending]:
            self._trial_info.setdefault(trial_id, bracket)

    def rungs(self) -> list[tuple[float, dict[str, float]]]:
        """(milestone, {trial_id: metric as ASHA compares it}) per rung, highest first."""
        return [(m, dict(rec)) for m, rec in self._brackets[0]._rungs]


class OrderedASHA(ResumableASHA):
    """ASHA that decides each rung in trial order, so concurrent sweeps are reproducible.

    Ray's ASHA compares a trial arriving at a rung with whatever other trials reached that
    rung before it, so which trials it stops depends on which finished their rounds first.
    Here a result that reaches a rung is held (``NOOP``: the trial waits in its report, as
    Tune's function trainables do until told to continue) until every *earlier* trial
    (Tune's creation order) has either reported at that rung or finished; then ASHA's own
    bookkeeping decides it, and the trial is continued or stopped. The rung a trial is
    compared against is then exactly the earlier trials' values, as in a one-at-a-time
    sweep, whatever the arrival order.

    It cannot deadlock when trials start in creation order (Tune starts pending trials in
    that order; trials that all need the same resources keep it): the earliest unsettled
    trial never waits. If every running trial has been held for ``patience_s`` while an
    earlier trial still waits to start (unequal trial sizes let a later one start first),
    the earliest held trial is decided from what has arrived, as Ray's ASHA would.
    """

    def __init__(self, *args: Any, patience_s: float = 30.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.patience_s = patience_s
        self._held: dict[str, tuple[Any, dict]] = {}  # trial id -> (trial, result)
        self._held_since: float | None = None
        self._done: set[str] = set()
        self._releasing = False

    def replay(self, histories: Mapping[str, Iterable[tuple[float, float]]],
               pending: Iterable[str] = ()) -> None:
        super().replay(histories, pending)
        self._done.update(histories)  # finished: settled at every rung they never reached

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_held"] = {}  # trials and results are live objects; a restored sweep re-reports
        return state

    # ------------------------------------------------------------------ the rule
    def _milestone(self, trial_id: str, result: dict) -> float | None:
        """The rung this result makes the trial record at (None: ASHA records nothing)."""
        if self._time_attr not in result or self._metric not in result:
            return None
        t = result[self._time_attr]
        if t >= self._max_t and self._stop_last_trials:
            return None  # stopped at max_t by ASHA without a comparison
        for milestone, recorded in self._brackets[0]._rungs:  # highest first, as ASHA walks them
            if t < milestone or trial_id in recorded:
                continue
            return milestone
        return None

    def _settled(self, trial_id: str, milestone: float) -> bool:
        rec = next(r for m, r in self._brackets[0]._rungs if m == milestone)
        return trial_id in rec or trial_id in self._done

    def _decidable(self, controller: Any, trial: Any, result: dict) -> bool:
        milestone = self._milestone(trial.trial_id, result)
        if milestone is None:
            return True
        for other in controller.get_trials():  # creation order
            if other.trial_id == trial.trial_id:
                return True
            if not self._settled(other.trial_id, milestone):
                return False
        return True

    # ------------------------------------------------------------------ Tune hooks
    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if not self._decidable(tune_controller, trial, result):
            self._held[trial.trial_id] = (trial, dict(result))
            self._release(tune_controller)
            return self.NOOP
        decision = super().on_trial_result(tune_controller, trial, result)
        self._release(tune_controller)
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._done.add(trial.trial_id)
        self._held.pop(trial.trial_id, None)
        super().on_trial_complete(tune_controller, trial, result)
        self._release(tune_controller)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self._done.add(trial.trial_id)
        self._held.pop(trial.trial_id, None)
        super().on_trial_error(tune_controller, trial)
        self._release(tune_controller)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._done.add(trial.trial_id)
        self._held.pop(trial.trial_id, None)
        super().on_trial_remove(tune_controller, trial)
        self._release(tune_controller)

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        self._release(tune_controller)  # called every step: the patience clock runs here
        return super().choose_trial_to_run(tune_controller)

    def _release(self, tune_controller: Any) -> None:
        """Decide every held result that has become decidable, earliest trial first."""
        import time

        if self._releasing:
            return
        self._releasing = True
        try:
            progress = True
            while progress and self._held:
                progress = False
                order = {t.trial_id: i for i, t in enumerate(tune_controller.get_trials())}
                for trial_id in sorted(self._held, key=lambda k: order.get(k, 1 << 30)):
                    trial, result = self._held[trial_id]
                    if self._decidable(tune_controller, trial, result):
                        self._decide(tune_controller, trial_id)
                        progress = True
                        break
            if not self._held:
                self._held_since = None
                return
            running = [t for t in tune_controller.get_trials() if t.status == "RUNNING"]
            if any(t.trial_id not in self._held for t in running):
                self._held_since = None
                return
            now = time.monotonic()
            if self._held_since is None:
                self._held_since = now
            elif now - self._held_since >= self.patience_s:  # an earlier trial cannot start
                order = {t.trial_id: i for i, t in enumerate(tune_controller.get_trials())}
                self._decide(tune_controller, min(self._held, key=lambda k: order.get(k, 1 << 30)))
                self._held_since = None
        finally:
            self._releasing = False

    def _decide(self, tune_controller: Any, trial_id: str) -> None:
        trial, result = self._held.pop(trial_id)
        decision = super().on_trial_result(tune_controller, trial, result)
        if getattr(trial, "status", "RUNNING") != "RUNNING":
            return  # being stopped meanwhile (the sweep was interrupted): Tune handles it
        controller = getattr(tune_controller, "_tune_controller", tune_controller)  # Tune's restricting wrapper
        if decision == self.STOP:
            controller.stop_trial(trial)
        else:
            controller._schedule_trial_train(trial)
