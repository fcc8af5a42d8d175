"""ASHA decisions in trial order: the same trials stop at the same rungs whatever order
concurrent trials report in (Ray's own ASHA does not), with Tune's controller played by a
small stand-in that runs trials two at a time in creation order, as Tune starts them."""

from __future__ import annotations

import random
from types import SimpleNamespace

from ray.tune.schedulers import ASHAScheduler

from cafe_ray.studies.asha import OrderedASHA

# accuracy after each round (4 rounds); rungs at rounds 1, 2 and 4 (grace 1, factor 2)
CURVES = {
    "t0": [0.30, 0.50, 0.60, 0.70], "t1": [0.40, 0.45, 0.50, 0.52], "t2": [0.20, 0.60, 0.70, 0.80],
    "t3": [0.35, 0.40, 0.42, 0.44], "t4": [0.50, 0.55, 0.58, 0.60], "t5": [0.10, 0.20, 0.30, 0.90],
}


class _Controller:
    """Tune's controller as a scheduler sees it: trials in creation order, stop and train."""

    def __init__(self, scheduler, concurrency: int, seed: int) -> None:
        self.s, self.rng, self.concurrency = scheduler, random.Random(seed), concurrency
        self.trials = [SimpleNamespace(trial_id=k, status="PENDING", rounds=0) for k in CURVES]
        self.ready: set[str] = set()  # running and not waiting for a decision

    def get_trials(self) -> list:
        return self.trials

    def stop_trial(self, trial) -> None:
        trial.status = "TERMINATED"
        self.ready.discard(trial.trial_id)
        self.s.on_trial_complete(self, trial, self._result(trial))

    def _schedule_trial_train(self, trial) -> None:
        self.ready.add(trial.trial_id)

    def _result(self, trial) -> dict:
        return {"round": trial.rounds, "acc": CURVES[trial.trial_id][trial.rounds - 1]}

    def run(self) -> dict[str, int]:
        for t in self.trials:
            self.s.on_trial_add(self, t)
        while any(t.status != "TERMINATED" for t in self.trials):
            running = [t for t in self.trials if t.status == "RUNNING"]
            for t in self.trials:  # start pending trials in creation order while there is room
                if t.status == "PENDING" and len(running) < self.concurrency:
                    t.status = "RUNNING"
                    running.append(t)
                    self.ready.add(t.trial_id)
            self.s.choose_trial_to_run(self)
            chosen = self.rng.choice(sorted(self.ready))
            trial = next(t for t in self.trials if t.trial_id == chosen)
            self.ready.discard(trial.trial_id)
            trial.rounds += 1  # one round done: report it (arrival order: chosen at random)
            decision = self.s.on_trial_result(self, trial, self._result(trial))
            if decision == "STOP":
                self.stop_trial(trial)
            elif decision == "CONTINUE":
                self.ready.add(trial.trial_id)
        return {t.trial_id: t.rounds for t in self.trials}


def _asha(cls):
    return cls(time_attr="round", metric="acc", mode="max", max_t=4, grace_period=1, reduction_factor=2)


def test_rung_decisions_do_not_depend_on_arrival_order():
    outcomes = {seed: _Controller(_asha(OrderedASHA), concurrency=2, seed=seed).run() for seed in range(12)}
    first = outcomes[0]
    assert all(o == first for o in outcomes.values()), outcomes
    assert sorted(first.values()) != [4] * len(CURVES)  # some trials were stopped early
    # exactly what one trial at a time (no concurrency: creation order) decides
    assert first == _Controller(_asha(OrderedASHA), concurrency=1, seed=0).run()
    assert first == _Controller(_asha(ASHAScheduler), concurrency=1, seed=0).run()
    # Ray's ASHA at the same concurrency: the arrival order changes which trials stop
    plain = {seed: _Controller(_asha(ASHAScheduler), concurrency=2, seed=seed).run() for seed in range(12)}
    assert len({tuple(sorted(o.items())) for o in plain.values()}) > 1


def test_a_held_trial_is_decided_after_patience_when_an_earlier_one_cannot_start():
    s = _asha(OrderedASHA)
    s.patience_s = 0.0
    ctl = _Controller(s, concurrency=1, seed=0)
    late, early = ctl.trials[1], ctl.trials[0]
    for t in ctl.trials:
        s.on_trial_add(ctl, t)
    late.status, late.rounds = "RUNNING", 1  # started before t0 (unequal sizes): t0 waits to start
    assert s.on_trial_result(ctl, late, ctl._result(late)) == "NOOP"
    assert early.status == "PENDING" and late.trial_id not in ctl.ready
    s.choose_trial_to_run(ctl)  # every running trial is held, for longer than patience_s
    s.choose_trial_to_run(ctl)
    assert late.trial_id in ctl.ready  # decided (continued) instead of waiting forever
