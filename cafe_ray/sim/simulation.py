"""The round loop, written once: sampling, dispatch, virtual clock, aggregation,
evaluation, metrics and checkpoints. It runs inside the coordinator actor (or
in-process with the sequential executor) and knows algorithms only through
their interface.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cafe_ray.algorithms import ClientResult, RoundContext, ServerState, build_algorithm
from cafe_ray.config import ExperimentConfig
from cafe_ray.models import exit_macs, make_model
from cafe_ray.runs import rundir
from cafe_ray.runs.store import ClientStateStore
from cafe_ray.runs.tensorboard import TensorBoardLog
from cafe_ray.sim import seeds
from cafe_ray.sim.executor import Executor
from cafe_ray.sim.plan import RunPlan
from cafe_ray.sim.profiles import Catalog, ClientClasses, ProfileTable
from cafe_ray.sim.runner import EvalJob, EvalResult, FitJob

ExecutorFactory = Callable[..., Executor]


@dataclass
class Progress:
    round: int = 0  # rounds completed
    total: int = 0
    status: str = "starting"  # starting | running | done | failed
    acc_avg_exit: float | None = None
    virtual_time_s: float = 0.0
    failed_total: int = 0
    message: str = ""


def sample_participants(profiles: ProfileTable, cfg: ExperimentConfig, t: int, virtual_time: float) -> list[int]:
    """Round t's participants, sorted: O(participants) Python work at any number of registered clients.

    Who is online is decided for all clients at once in numpy (see
    :meth:`ProfileTable.online`); the draw among them is numpy's ``choice`` without
    replacement, which for k << N touches k entries (Floyd's algorithm).
    """
    online = profiles.online(virtual_time, cfg.seed, t)
    n_online = len(profiles) if online is None else len(online)
    if n_online == 0:
        return []
    k = min(n_online, max(cfg.round.min_clients, math.ceil(cfg.round.fraction * n_online)))
    rng = seeds.rng(cfg.seed, t, -1, seeds.SAMPLE)
    chosen = rng.choice(n_online, size=k, replace=False)
    if online is not None:
        chosen = online[chosen]
    return np.sort(chosen).tolist()


AUTO_EVAL_ALL_UP_TO = 1000  # round.eval_clients=auto: all clients up to this many, else a sample of this many


def eval_clients(cfg: ExperimentConfig, t: int, participants: list[int]) -> tuple[str, Sequence[int]]:
    """(resolved round.eval_clients, sorted client ids) for an evaluation in round t."""
    n = cfg.data.num_clients
    choice = cfg.round.eval_clients
    if choice == "auto":
        choice = "all" if n <= AUTO_EVAL_ALL_UP_TO else f"sample:{AUTO_EVAL_ALL_UP_TO}"
    if choice == "participants":
        return choice, participants
    if choice.startswith("sample:"):
        k = int(choice.split(":", 1)[1])
        if k < n:
            picked = seeds.rng(cfg.seed, t, -1, seeds.EVAL).choice(n, size=k, replace=False)
            return choice, np.sort(picked).tolist()
        choice = "all"
    return choice, range(n)


class Simulation:
    """One experiment in one run directory; ``run()`` goes to the last round."""

    def __init__(self, plan: RunPlan | ExperimentConfig, run_dir: str | Path, executor_factory: ExecutorFactory,
                 resume: bool = False) -> None:
        """``plan``: the run resolved once (:class:`RunPlan`: catalog, and the data when the
        caller loaded it already, e.g. preflight); a bare config is resolved here."""
        if not isinstance(plan, RunPlan):
            plan = RunPlan.resolve(plan)
        cfg = self.cfg = plan.cfg
        self.run_dir = Path(run_dir)
        self.progress = Progress(total=cfg.round.num_rounds)
        self.catalog: Catalog = plan.catalog
        self.profiles = ProfileTable(self.catalog, cfg.data.num_clients, cfg.seed)
        self.store = ClientStateStore(self.run_dir / "store")
        # the executor starts its workers first (Ray: actor processes boot while the data
        # loads below) and gets the data when it is ready
        self.executor = executor_factory(
            cfg=cfg, dataset=None, splits=None, store_root=str(self.store.root),
            classes=self.catalog.classes, client_class=ClientClasses(self.profiles),
        )
        try:
            dataset, splits = plan.data()
            plan = plan.without_data()  # the executor's copy below is the one kept
            # keep the executor's copy (Ray: zero-copy views of the object store), not a second one
            self.dataset, self.splits = self.executor.attach(dataset, splits)
        except BaseException:
            self.executor.shutdown()  # the workers already started: do not leave them behind
            raise
        del dataset, splits
        self.algorithm = build_algorithm(cfg)
        model = make_model(cfg, self.dataset)
        self.num_exits = model.num_exits
        self.cost = exit_macs(model, self.dataset.input_shape,
                              torch.int64 if self.dataset.is_text else torch.float32)
        self.state: ServerState = self.algorithm.init_server_state(model)
        self.start_round = 0
        self.virtual_time = 0.0
        self.cum_down = 0
        self.cum_up = 0
        self.devices: dict[str, set[str]] = {}  # resource class -> torch devices its clients trained on
        self.vectorized: dict[str, set[str]] = {}  # resource class -> how its actors train cohorts (engine.vectorize)
        if resume:
            self._restore()
        else:
            rundir.save_splits(self.run_dir / rundir.SPLITS, self.splits)
            rundir.write_profiles(self.run_dir, self.profiles.to_json())
            rundir.write_data_stats(self.run_dir, self.dataset.stats)

    # ------------------------------------------------------------------ loop
    def run(self, on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        cfg = self.cfg
        T = cfg.round.num_rounds
        self.progress.status = "running"
        self.progress.round = self.start_round
        tensorboard = TensorBoardLog(self.run_dir) if cfg.logging.tensorboard else None
        try:
            for t in range(self.start_round, T):
                rec = self._round(t)
                rundir.append_jsonl(self.run_dir / rundir.METRICS, [rec])
                if tensorboard is not None:
                    tensorboard.add(rec)
                self.progress.round = t + 1
                self.progress.virtual_time_s = self.virtual_time
                if rec.get("acc_avg_exit") is not None:
                    self.progress.acc_avg_exit = rec["acc_avg_exit"]
                if (t + 1) % cfg.checkpoint.every == 0 or t == T - 1:
                    self._checkpoint(t)
                if on_round:
                    on_round(rec)
            summary = self._finish()
            self.progress.status = "done"
            return summary
        except BaseException as err:
            self.progress.status = "failed"
            self.progress.message = f"{type(err).__name__}: {err}"
            raise
        finally:
            self.executor.shutdown()
            if tensorboard is not None:
                tensorboard.close()

    def _sample(self, t: int) -> list[int]:
        return sample_participants(self.profiles, self.cfg, t, self.virtual_time)

    def _train_macs(self, depth: int) -> int:
        return self.cost.train_macs(max(1, min(depth, self.num_exits)))

    def _round(self, t: int) -> dict[str, Any]:
        cfg, T = self.cfg, self.cfg.round.num_rounds
        wall0 = time.perf_counter()
        participants = self._sample(t)
        crashed = {i for i in participants if (p := self.profiles[i].failure_prob) > 0  # no draw when it cannot fail
                   and seeds.rng(cfg.seed, t, i, seeds.FAIL).random() < p}
        ctx = RoundContext(t, T, seeds.derive_seed(cfg.seed, t), tuple(participants))
        payloads = self.algorithm.server_payloads(self.state, ctx) if participants else {}
        jobs = [FitJob(i, t, T, seeds.derive_seed(cfg.seed, t, i, seeds.TRAIN),
                       self.profiles[i].max_depth, payloads[i], width_factor=self.profiles[i].width_factor)
                for i in participants if i not in crashed]
        results = {r.client_id: r for r in self.executor.run_fit(jobs)}

        accepted: list[ClientResult] = []
        client_recs: list[dict[str, Any]] = []
        times: list[float] = []
        down = up = 0
        dropped = failed = 0
        deadline = cfg.round.deadline_s
        sizes: dict[int, int] = {}  # id(payload) -> bytes: most clients get the same payload object
        for i in participants:
            prof = self.profiles[i]
            rec: dict[str, Any] = {"round": t, "client": i, "profile": prof.name,
                                   "resource_class": prof.resource_class}
            key = id(payloads[i])
            if key not in sizes:
                sizes[key] = payloads[i].nbytes
            b_down = sizes[key]
            down += b_down
            if i in crashed:
                # drawn before dispatch: the client never ran on any node
                rec.update(status="failed", reason="simulated failure (profile failure_prob)", bytes_down=b_down,
                           node_id=None, node_id_reason="not dispatched: the failure is drawn before the round runs")
                failed += 1
                client_recs.append(rec)
                continue
            res = results[i]
            if res.output is None:
                rec.update(status="failed", reason=res.error, bytes_down=b_down,
                           node_id=(res.worker or {}).get("node_id"))  # where its worker died (None: unknown)
                failed += 1
                client_recs.append(rec)
                continue
            out = res.output
            w = res.worker
            device = f"{w['device']} ({w['device_note']})" if w.get("device_note") else w.get("device", "cpu")
            self.devices.setdefault(prof.resource_class, set()).add(device)
            if "cohort" in w or "vectorize" in w:  # auto: "measuring" until an actor decides
                note = w.get("vectorize") or "on"
                notes = self.vectorized.setdefault(prof.resource_class, set())
                if note != "auto: measuring":
                    notes.discard("auto: measuring")
                    notes.add(note)
                elif not notes:
                    notes.add(note)
            b_up = out.upload.nbytes
            up += b_up
            v = (prof.compute_seconds(self._train_macs(out.trained_depth), out.samples_processed)
                 + prof.comm_seconds(b_down, b_up))
            late = deadline is not None and v > deadline
            times.append(v)
            rec.update(status="late" if late else "ok", virtual_s=v, bytes_down=b_down, bytes_up=b_up,
                       wall_s=res.wall_s, samples=out.samples_processed, pid=res.worker.get("pid"),
                       node_id=res.worker.get("node_id"), actor_resources=res.worker.get("resources"),
                       device=device, cohort=w.get("cohort"),
                       **{k: float(x) for k, x in out.metrics.items()})
            client_recs.append(rec)
            if late:
                dropped += 1
            else:
                accepted.append(ClientResult(i, out))
        for r in accepted:
            self.store.commit(r.client_id, t)
        committed = {r.client_id for r in accepted}  # the rest (late, failed) leave no candidate behind
        self.store.discard_staged([i for i in participants if i not in committed], t)
        self.state = self.algorithm.aggregate(self.state, accepted, ctx)

        round_v = (min(max(times), deadline) if deadline is not None else max(times)) if times else 0.0
        self.virtual_time += round_v
        self.cum_down += down
        self.cum_up += up
        self.progress.failed_total += failed
        train_losses = [float(r.output.metrics["train_loss"]) for r in accepted if "train_loss" in r.output.metrics]
        rec = {
            "round": t, "participants": len(participants), "completed": len(accepted),
            "failed": failed, "dropped_late": dropped,
            "train_loss": float(np.mean(train_losses)) if train_losses else None,
            "round_virtual_s": round_v, "virtual_time_s": self.virtual_time,
            "bytes_down": down, "bytes_up": up, "cum_bytes_down": self.cum_down, "cum_bytes_up": self.cum_up,
            # local compute: forward/backward sample passes of every client that trained (ClientOutput)
            "samples_processed": int(sum(int(r.get("samples", 0)) for r in client_recs)),
        }
        if (t + 1) % cfg.round.eval_every == 0 or t == T - 1:
            rec.update(self._evaluate(t, participants))
        rundir.append_jsonl(self.run_dir / rundir.CLIENTS, client_recs)
        # the round's wall time includes its log writes, all but this record's own line
        rec["wall_s"] = time.perf_counter() - wall0
        return rec

    def _evaluate(self, t: int, participants: list[int]) -> dict[str, Any]:
        cfg = self.cfg
        scope, who = eval_clients(cfg, t, participants)
        payload = self.algorithm.eval_payload(self.state)
        jobs = [EvalJob(i, t, cfg.round.num_rounds, seeds.derive_seed(cfg.seed, t, i, seeds.TRAIN), payload)
                for i in who]
        results: list[EvalResult] = sorted(self.executor.run_eval(jobs), key=lambda r: r.client_id)
        results = [r for r in results if r.num_test > 0]
        if not results:
            return {}
        n = sum(r.num_test for r in results)
        acc_exit = [sum(r.correct[k] for r in results) / n for k in range(self.num_exits)]
        per_client = [float(np.mean(r.accuracies)) for r in results]
        rundir.append_jsonl(self.run_dir / rundir.EVAL, [
            {"round": t, "client": r.client_id, "num_test": r.num_test, "acc_exit": r.accuracies,
             **({"num_val": r.num_val, "val_acc_exit": r.val_accuracies} if r.num_val else {})}
            for r in results])
        out = {
            "acc_exit": acc_exit,
            "acc_avg_exit": float(np.mean(acc_exit)),
            "acc_worst_client": float(min(per_client)),
            "acc_worst_client_last_exit": float(min(r.accuracies[-1] for r in results)),
            "eval_clients": len(results),
            "eval_scope": scope,
        }
        with_val = [r for r in results if r.num_val]
        if with_val:  # the validation split: what sweeps, studies and calibration read
            nv = sum(r.num_val for r in with_val)
            val_exit = [sum(r.val_correct[k] for r in with_val) / nv for k in range(self.num_exits)]
            out.update(val_acc_exit=val_exit, val_acc_avg_exit=float(np.mean(val_exit)),
                       val_acc_worst_client=float(min(np.mean(r.val_accuracies) for r in with_val)))
        return out

    # ------------------------------------------------------- checkpoint/resume
    def _checkpoint(self, t: int) -> None:
        """Atomic (rundir.atomic_checkpoint): a crash or full disk never leaves half of one."""
        root = self.run_dir / "checkpoints"
        tensors = {k: v.detach().contiguous().clone() for k, v in self.state.tensors.items()}
        self.store.discard_staged()  # anything a lost worker wrote late; the snapshot lists the store anyway
        with rundir.atomic_checkpoint(root, t) as tmp:
            self.store.snapshot(tmp / "store")
            rundir.write_checkpoint_files(tmp, tensors, {
                "round": t, "meta": self.state.meta, "virtual_time_s": self.virtual_time,
                "cum_bytes_down": self.cum_down, "cum_bytes_up": self.cum_up, "seed": self.cfg.seed,
                "failed_total": self.progress.failed_total,
                "rng": "stateless: every draw derives from (seed, round, client, stream)",
            })
        rundir.prune_checkpoints(root, self.cfg.checkpoint.keep)
        rundir.write_parquet(rundir.read_jsonl(self.run_dir / rundir.METRICS), self.run_dir / "metrics.parquet")

    def _restore(self) -> None:
        ckpt = rundir.latest_checkpoint(self.run_dir)
        if ckpt is None:
            # no checkpoint yet: start over in the same directory
            for f in rundir.ROUND_LOGS:
                (self.run_dir / f).unlink(missing_ok=True)
            self.store.clear()
            return
        tensors, st = rundir.read_checkpoint(ckpt)
        self.state = ServerState(tensors=tensors, meta=st["meta"])
        self.store.restore(ckpt / "store")
        t = int(st["round"])
        self.start_round = t + 1
        self.virtual_time = float(st["virtual_time_s"])
        self.cum_down, self.cum_up = int(st["cum_bytes_down"]), int(st["cum_bytes_up"])
        self.progress.failed_total = int(st.get("failed_total", 0))
        for f in rundir.ROUND_LOGS:
            rundir.truncate_jsonl(self.run_dir / f, t)

    def _finish(self) -> dict[str, Any]:
        records = rundir.read_jsonl(self.run_dir / rundir.METRICS)
        rundir.write_parquet(records, self.run_dir / "metrics.parquet")
        rundir.write_parquet(rundir.read_jsonl(self.run_dir / rundir.CLIENTS), self.run_dir / "clients.parquet")
        rundir.plot_accuracy(records, self.run_dir / "accuracy.png",
                             f"{self.cfg.name}: {self.cfg.algorithm.name} on {self.cfg.data.name}")
        empty: dict[str, Any] = {}
        last_eval = next((r for r in reversed(records) if r.get("acc_exit")), empty)
        summary = {
            "name": self.cfg.name, "algorithm": self.cfg.algorithm.name, "dataset": self.cfg.data.name,
            "rounds": len(records), "num_clients": self.cfg.data.num_clients,
            "acc_exit": last_eval.get("acc_exit"), "acc_avg_exit": last_eval.get("acc_avg_exit"),
            "acc_worst_client": last_eval.get("acc_worst_client"),
            **{k: last_eval[k] for k in ("val_acc_exit", "val_acc_avg_exit", "val_acc_worst_client")
               if k in last_eval},
            "virtual_time_s": self.virtual_time, "cum_bytes_down": self.cum_down, "cum_bytes_up": self.cum_up,
            "failed_total": sum(r.get("failed", 0) for r in records),
            "dropped_late_total": sum(r.get("dropped_late", 0) for r in records),
            "wall_time_s": sum(r.get("wall_s", 0.0) for r in records),
            "exit_macs": list(self.cost.cumulative),
            # which torch device each resource class trained on (a GPU class: cuda:N, or why not)
            "devices": {c: sorted(d) for c, d in sorted(self.devices.items())},
            # engine.vectorize per resource class: on, or what auto measured and chose
            "vectorize": {c: sorted(n) for c, n in sorted(self.vectorized.items())},
            "final_checkpoint": str(rundir.latest_checkpoint(self.run_dir)),
        }
        rundir.write_summary(self.run_dir, summary)
        return summary
