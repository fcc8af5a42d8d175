"""CAFEDistill: conflict-aware federated early-exit distillation.

Liu, Zhou, Tong, "CAFEDistill: Learning Personalized and Dynamic Models through
Federated Early-Exit Network Distillation", arXiv:2601.10015 (2026); the
project's reconstruction is docs/specification.md, whose notation (n, m, R(t),
S_i, w_ij, mu, lambda, tau) this module keeps.

One round t:
- server (:meth:`CafeDistill.server_payloads`): the progressive schedule R(t)
  and budget B_t, the two-tier student selection S_i, the teacher weights w_ij
  and one aggregated teacher head hbar_i per participant;
- client (:meth:`CafeDistill.client_update`): global backbone + personal exit
  heads, local SGD on L_i (CE of the teacher exit and of the selected students,
  plus lambda_t * tau^2 * KL to the detached teacher logits); heads of exits
  outside S_i are frozen (``unselected: frozen``, out of the optimizer) or
  trained by CE on detached features (``ce_detached``);
- server (:meth:`CafeDistill.aggregate`): sample-weighted mean of the backbones;
  every uploaded last-exit head h_i is stored for the next teacher weights.

Server state (``ServerState.tensors``, namespaced):
- ``global/<backbone key>``: the shared backbone;
- ``init_head/weight|bias``: the last head of the deterministic initial model;
- ``heads/<cid>/weight|bias``: client cid's latest uploaded last-exit head h_cid;
- ``upd/<cid>/<key>`` and ``aggupd/<key>`` (``update_cosine`` only, the spec's
  proxy): the client's latest backbone update and the previous round's
  aggregated update, for the parameters of stages 0..m-2 (the tier-2 exit is at
  most m-2, so deeper stages are never compared);
- ``meta["conflict"][cid]`` (``update_sketch``): m-1 floats per client, the
  leave-one-out cosine of its last update to the other participants' aggregate
  of that round, per exit prefix, computed on count sketches (selection.py);
- ``meta["visits"][cid]``: completed rounds per client (``schedule_clock: client``).

Options beyond the specification (each a field of ``algorithm.cafedistill``;
``preset: spec`` restores the specification's behaviour): the KD weight
lambda_t (:meth:`CafeDistill.kd_weights`: warm-up on R(t) or from a round, and
no KD while no trained teacher head exists), ``center_heads`` (D_ij on h - h_init),
``own_head: live`` (the server sends sum_{j!=i} w_ij h_j and w_ii, the client adds
w_ii times its current head), ``schedule_clock`` (:meth:`CafeDistill.clocks`) and,
in loss.py, ``kd_backbone``, ``kd_gate``, ``kd_target``, ``unselected`` and ``kd_shared``.
- ``selhead/<cid>/<e>`` (``head_cosine`` only): client cid's latest flattened
  head of exit e.

``heads: generic_residual`` (the default; the specification's is ``personal``):
the shared ``global/`` state is the whole network (backbone and *generic* exit
heads, averaged like FedRoD-EE's), every client keeps a personal residual linear
head per exit (``phead.{k}.*``, :mod:`cafe_ray.algorithms.fedrod`), its exit
logits are generic + residual, and h_i is its generic + residual last head.
Selection, teacher weights and traffic-per-client stay as above (the upload adds
the generic heads, as FedRoD-EE's does). ``kd_shared: personal`` (the default) lets
the KD gradient of the students' personal logits into their generic heads and the
backbone stages under them; ``none`` keeps it in the residual heads.

Decisions where the specification is open (each documented where it is made):
- the schedule's t is 1-based: t = round + 1 (see schedule.py);
- a participant without a stored head gets the *uniform* mix of the pool's heads:
  with no h_i, D_i is constant and the QP's solution is uniform; with an empty
  pool (round 0) its teacher is the initial last head;
- ``head_cosine`` needs heads the server never sees otherwise: the payload of
  round t names the exit ``select_exit`` that round t+1's tier 2 will compete
  for, and the client uploads that one head too (counted in the upload bytes,
  still below FedAvg-EE, which uploads every head);
- the device's ``ClientContext.max_depth`` is not used: CAFEDistill trains the
  whole network (trained_depth = m) on every client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cafe_ray.algorithms.aggregation import StreamingMean, flatten
from cafe_ray.algorithms.base import (
    GLOBAL_NS,
    Algorithm,
    ClientContext,
    ClientData,
    ClientOutput,
    ClientResult,
    Message,
    Params,
    RoundContext,
    ServerState,
    global_params,
    load_params,
    register,
    with_global,
)
from cafe_ray.algorithms.cafedistill.loss import (
    KDOptions,
    KDStats,
    forward_stages,
    label_prior,
    make_loss_fn,
    make_residual_loss_fn,
)
from cafe_ray.algorithms.cafedistill.schedule import progress, schedule_t, tier1_depth
from cafe_ray.algorithms.cafedistill.selection import (
    CountSketch,
    StudentPlan,
    head_cosine_scores,
    keys_feeding_exit,
    loo_sketch_scores,
    plan_students,
    select_students,
    tier_exits,
    update_cosine_scores,
)
from cafe_ray.algorithms.cafedistill.teacher import (
    aggregate_heads,
    pack_head,
    teacher_weights,
    unpack_head,
)
from cafe_ray.algorithms.fedrod import (
    balanced_softmax_loss,
    load_summed_heads,
    personal_ce_logits,
    received_heads,
    residual_heads,
    residual_state,
)
from cafe_ray.algorithms.heads import HeadProbe, final_linear_keys
from cafe_ray.algorithms.interference import exit_gradient_cosines, stage_parameters
from cafe_ray.algorithms.training import local_sgd
from cafe_ray.config import CafeDistillConfig
from cafe_ray.models.base import EXIT_PREFIX, EarlyExitNet, exit_of_key, stage_of_key

# Message tensor keys (besides the backbone's own ``stages.*`` keys).
TEACHER_W, TEACHER_B = "teacher.weight", "teacher.bias"  # hbar_i, server -> client
HEAD_W, HEAD_B = "head.weight", "head.bias"  # h_i, client -> server
SELECT_HEAD_NS = "select_head/"  # head_cosine: "select_head/exits.{e}.*", client -> server

# Server-state namespaces.
INIT_W, INIT_B = "init_head/weight", "init_head/bias"
AGGUPD_NS = "aggupd/"

_SELECTION_STREAM = 0xCAFE  # numpy RNG stream of the tier-2 tie-break


def _head_key(cid: int, part: str) -> str:
    return f"heads/{cid}/{part}"


def _upd_key(cid: int, key: str) -> str:
    return f"upd/{cid}/{key}"


def _selhead_key(cid: int, e: int) -> str:
    return f"selhead/{cid}/{e}"


def _stored_head_ids(state: ServerState) -> list[int]:
    """Clients whose last-exit head the server holds, sorted."""
    return sorted(
        int(k.split("/")[1]) for k in state.tensors if k.startswith("heads/") and k.endswith("/weight")
    )


def _students_of(payload: Message, m: int) -> tuple[int, ...]:
    if "students" not in payload.meta:
        raise ValueError("payload.meta['students'] is missing: a CAFEDistill client needs the payload of CafeDistill.server_payloads")
    students = tuple(int(k) for k in payload.meta["students"])
    bad = [k for k in students if not 0 <= k <= m - 2]
    if bad:
        raise ValueError(f"student exits must be in [0, m-2] = [0, {m - 2}] (exit m-1 is the teacher), got {bad}")
    return students


def _exit_wise_mean(new: Params, old: Params, results: Sequence[ClientResult]) -> Params:
    """``unselected: excluded``: each exit's generic head averaged over the clients that trained it.

    A client that left exit e out of its loss uploads e's head unchanged; counting it
    would pull the average back toward the old head. An exit nobody trained keeps it.
    """
    by_exit: dict[int, list[str]] = {}
    for k in old:
        e = exit_of_key(k)
        if e is not None:
            by_exit.setdefault(e, []).append(k)
    out = dict(new)
    for e, keys in by_exit.items():
        trainers = [r for r in results if e in r.output.upload.meta.get("trained_exits", [e])]
        if not trainers:
            out.update({k: old[k] for k in keys})
            continue
        mean = StreamingMean()
        for r in trainers:
            mean.add({k: r.output.upload.tensors[k] for k in keys}, float(r.output.num_samples))
        out.update(mean.result(like={k: old[k] for k in keys}))
    return out


@register
class CafeDistill(Algorithm):
    """CAFEDistill (arXiv:2601.10015): shared backbone, personal heads, selected students
    distilled from one aggregated teacher head per client."""

    name = "cafedistill"
    personalized = True

    @property
    def hp(self) -> CafeDistillConfig:
        return self.cfg.algorithm.cafedistill

    # ----------------------------------------------------------------- server
    def init_server_state(self, model: EarlyExitNet) -> ServerState:
        """The initial backbone, the initial last head (round-0 teacher) and the key lists."""
        m = model.num_exits
        head = model.last_head
        if head.bias is None:
            raise ValueError("CAFEDistill needs a last-exit head with a bias (nn.Linear(..., bias=True))")
        sd = model.state_dict()
        param_names = {n for n, _ in model.named_parameters()}
        update_keys = [
            k for k in model.backbone_keys()
            if k in param_names and (stage_of_key(k) or 0) <= m - 2
        ]
        tensors = {INIT_W: head.weight.detach().clone(), INIT_B: head.bias.detach().clone()}
        shared = list(sd) if self.hp.heads == "generic_residual" else model.backbone_keys()
        backbone = {k: sd[k].detach().clone() for k in shared}
        meta = {"num_exits": m, "update_keys": update_keys, "visits": {}, "conflict": {}}
        return with_global(ServerState(tensors=tensors, meta=meta), backbone)

    def plan(self, state: ServerState, ctx: RoundContext) -> StudentPlan:
        """Round ctx.round's R(t), B_t, d, tier exits and r (t = ctx.round + 1), global clock."""
        sel = self.hp.selection
        t, T = self._ramped(schedule_t(ctx.round), ctx.num_rounds)
        return plan_students(
            t, T, int(state.meta["num_exits"]), len(ctx.participants), schedule=sel.schedule, order=sel.order,
        )

    def _ramped(self, t: int, T: int) -> tuple[int, int]:
        """(t, T) with T stretched to 2 * ramp * T, so that R = min(t / (ramp * T), 1); exact integers."""
        ramp = self.hp.selection.ramp
        if ramp == 0.5:
            return t, T
        return t * 1000, max(1, T * max(1, round(2000 * ramp)))

    def clocks(self, state: ServerState, ctx: RoundContext) -> dict[int, tuple[int, int]]:
        """(t, T) of R(t) = min(2t/T, 1) for every participant, on ``selection.schedule_clock``.

        global: (round + 1, T). client: R_i = min(2 v_i / V, 1) with v_i the
        client's 1-based visit (completed rounds + 1) and V = T * n_t / n its
        expected visits, written exactly as (v_i * n, T * n_t). Under full
        participation (n_t = n) both clocks agree. ``selection.ramp`` rho != 0.5
        stretches T to 2 rho T (R = min(t / (rho T), 1)), kept integer by
        scaling both by 1000 (rho has at most three decimals of effect).
        """
        sel = self.hp.selection
        T = ctx.num_rounds
        if sel.schedule_clock == "global":
            t = schedule_t(ctx.round)
            clocks = {cid: (t, T) for cid in ctx.participants}
        else:
            n = max(self.cfg.data.num_clients, len(ctx.participants), 1)
            n_t = max(len(ctx.participants), 1)
            visits: dict[str, int] = state.meta.get("visits", {})
            clocks = {cid: ((int(visits.get(str(cid), 0)) + 1) * n, T * n_t) for cid in ctx.participants}
        return {cid: self._ramped(t, T_) for cid, (t, T_) in clocks.items()}

    def students(self, state: ServerState, ctx: RoundContext) -> dict[int, tuple[int, ...]]:
        """S_i for every participant (two-tier, seeded by ctx.seed).

        Participants on the same clock value share one plan, and tier 2 competes
        among them (with the global clock: one group, the spec's selection).
        """
        sel = self.hp.selection
        m = int(state.meta["num_exits"])
        clocks = self.clocks(state, ctx)
        rng = np.random.default_rng([ctx.seed % 2**63, _SELECTION_STREAM])
        out: dict[int, tuple[int, ...]] = {}
        for clock in sorted(set(clocks.values())):
            group = tuple(c for c in ctx.participants if clocks[c] == clock)
            plan = plan_students(clock[0], clock[1], m, len(group), schedule=sel.schedule, order=sel.order)
            scores = self._conflict_scores(state, plan, group)
            out.update(select_students(plan, group, scores, rng))
        return out

    def kd_weights(self, state: ServerState, ctx: RoundContext) -> dict[int, float]:
        """lambda_t per participant: lambda after the warm-up, 0 without a trained teacher."""
        hp = self.hp
        pool = set(_stored_head_ids(state))
        if hp.teachers == "participants":
            pool &= set(ctx.participants)
        if hp.kd_needs_trained_teacher and not pool:
            return {cid: 0.0 for cid in ctx.participants}
        if hp.kd_warmup == "round":
            lam = hp.lam if ctx.round >= hp.kd_start_round else 0.0
            return {cid: lam for cid in ctx.participants}
        if hp.kd_warmup == "progress" and hp.selection.schedule == "progressive":
            return {cid: hp.lam * progress(t, T) for cid, (t, T) in self.clocks(state, ctx).items()}
        return {cid: hp.lam for cid in ctx.participants}

    def teacher_heads(
        self, state: ServerState, participants: Sequence[int]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """hbar_i = sum_j w_ij h_j (weight, bias) for every participant i, own head as stored."""
        return {cid: (w, b) for cid, (w, b, _) in self.teacher_messages(state, participants, live=False).items()}

    def teacher_messages(
        self, state: ServerState, participants: Sequence[int], live: bool | None = None
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor, float]]:
        """(head weight, head bias, w_ii) sent to every participant i.

        Pool of j: every stored head (``teachers: all_seen``) or the participants'
        (``participants``). Teacher weights come from D_ij on the heads, centred on
        the initial head under ``center_heads``. A participant without a stored
        head has no D_i; with D_i constant the QP's minimiser is the uniform w, so
        it gets the pool's mean head; with an empty pool (round 0) the initial
        last head. ``own_head: live`` (or ``live=True``): the head is
        sum_{j != i} w_ij h_j and the client adds w_ii times its current head
        (w_ii = 0 where the client has no stored head); otherwise w_ii = 0 is
        returned and the head is the full hbar_i.
        """
        live = self.hp.own_head == "live" if live is None else live
        init_w, init_b = state.tensors[INIT_W], state.tensors[INIT_B]
        C, D = init_w.shape
        stored = _stored_head_ids(state)
        if self.hp.teachers == "participants":
            have = set(stored)
            stored = [c for c in sorted(participants) if c in have]
        if not stored:
            return {cid: (init_w, init_b, 0.0) for cid in participants}
        H = np.stack(
            [pack_head(state.tensors[_head_key(j, "weight")], state.tensors[_head_key(j, "bias")]) for j in stored]
        )  # (n_pool, C*D + C)
        pos = {cid: i for i, cid in enumerate(stored)}
        rows = [cid for cid in participants if cid in pos]
        out: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        if rows:
            idx = [pos[c] for c in rows]
            W = self._mixing_weights(H, idx, init_w, init_b)  # (len(rows), n_pool)
            own = np.zeros(len(rows))
            if live:
                own = W[np.arange(len(rows)), idx].copy()
                W[np.arange(len(rows)), idx] = 0.0  # the client adds w_ii * its live head
            for cid, hbar, w_ii in zip(rows, aggregate_heads(W, H), own, strict=True):
                out[cid] = (*unpack_head(hbar, C, D), float(w_ii))
        newcomers = [cid for cid in participants if cid not in pos]
        if newcomers:
            uniform = unpack_head(H.mean(axis=0), C, D)
            out.update({cid: (*uniform, 0.0) for cid in newcomers})
        return out

    def _mixing_weights(self, H: np.ndarray, idx: list[int], init_w: torch.Tensor, init_b: torch.Tensor) -> np.ndarray:
        """w_ij for the pool rows ``idx``: the QP (``teacher: qp``), or an ablation's fixed mix.

        ``teacher_distance: weights`` compares the heads' weight matrices only: the
        bias of a last head mostly encodes its client's label prior (the
        balanced-softmax generic head plus a residual started at the log prior), so
        cosines of whole heads largely measure label-support overlap.
        """
        hp = self.hp
        if hp.teacher == "uniform":
            return np.full((len(idx), H.shape[0]), 1.0 / H.shape[0])
        if hp.teacher == "own":
            W = np.zeros((len(idx), H.shape[0]))
            W[np.arange(len(idx)), idx] = 1.0
            return W
        center = pack_head(init_w, init_b) if hp.center_heads else None
        if hp.teacher_distance == "weights":
            p = init_w.numel()
            H, center = H[:, :p], (center[:p] if center is not None else None)
        return teacher_weights(H, hp.mu, rows=idx, center=center)

    def server_payloads(self, state: ServerState, ctx: RoundContext) -> dict[int, Message]:
        """Per participant: the global backbone, hbar_i (one head) and S_i."""
        students = self.students(state, ctx)
        teachers = self.teacher_messages(state, ctx.participants)
        lams = self.kd_weights(state, ctx)
        backbone = global_params(state)
        select_exit = self._next_select_exit(ctx, int(state.meta["num_exits"]))
        out: dict[int, Message] = {}
        for cid in ctx.participants:
            w, b, own = teachers[cid]
            meta: dict[str, Any] = {"students": list(students[cid]), "lam": lams[cid]}
            if own:
                meta["own_weight"] = own
            if select_exit is not None:
                meta["select_exit"] = select_exit
            out[cid] = Message(tensors={**backbone, TEACHER_W: w, TEACHER_B: b}, meta=meta)
        return out

    def aggregate(self, state: ServerState, results: Sequence[ClientResult], ctx: RoundContext) -> ServerState:
        """Weighted mean of the backbones; store every h_i (and the selection history)."""
        if not results:
            return state
        old = global_params(state)
        mean = StreamingMean()
        for r in results:
            up = r.output.upload.tensors
            missing = [k for k in (*old, HEAD_W, HEAD_B) if k not in up]
            if missing:
                raise KeyError(f"client {r.client_id}: upload lacks {missing[:5]}; it must come from CafeDistill.client_update")
            mean.add({k: up[k] for k in old}, float(r.output.num_samples))
        new = mean.result(like=old)
        if any("trained_exits" in r.output.upload.meta for r in results):
            new = _exit_wise_mean(new, old, results)

        tensors = {k: v for k, v in state.tensors.items() if not k.startswith(GLOBAL_NS)}
        similarity = self.hp.selection.similarity
        update_keys: list[str] = list(state.meta["update_keys"])
        for r in results:
            up, cid = r.output.upload.tensors, r.client_id
            tensors[_head_key(cid, "weight")] = up[HEAD_W].detach().clone()
            tensors[_head_key(cid, "bias")] = up[HEAD_B].detach().clone()
            if similarity == "update_cosine":
                for k in update_keys:
                    tensors[_upd_key(cid, k)] = (up[k] - old[k]).detach()
            e = r.output.upload.meta.get("select_exit")
            if similarity == "head_cosine" and e is not None:
                sel = {k[len(SELECT_HEAD_NS):]: v for k, v in up.items() if k.startswith(SELECT_HEAD_NS)}
                tensors[_selhead_key(cid, int(e))] = flatten(sel).to(torch.float32)
        if similarity == "update_cosine":
            for k in update_keys:
                tensors[AGGUPD_NS + k] = (new[k] - old[k]).detach()
        meta = dict(state.meta)
        visits = dict(meta.get("visits", {}))
        for r in results:
            visits[str(r.client_id)] = int(visits.get(str(r.client_id), 0)) + 1
        meta["visits"] = visits
        if similarity == "update_sketch":
            conflict = dict(meta.get("conflict", {}))
            conflict.update({str(c): v for c, v in self._sketch_scores(old, results, update_keys).items()})
            meta["conflict"] = conflict
        return with_global(ServerState(tensors=tensors, meta=meta), new)

    def _sketch(self, stage: int, length: int) -> CountSketch:
        """The count sketch of stage ``stage``'s update (regenerated from the seed, cached)."""
        cache: dict[tuple[int, int], CountSketch] = self.__dict__.setdefault("_sketches", {})
        key = (stage, length)
        if key not in cache:
            cache[key] = CountSketch(length, self.hp.selection.sketch_dim, self.cfg.seed * 1_000_003 + 7919 * stage + 1)
        return cache[key]

    def _sketch_scores(
        self, old: Params, results: Sequence[ClientResult], update_keys: Sequence[str]
    ) -> dict[int, list[float]]:
        """update_sketch: per participant, m-1 leave-one-out cosines (one per exit prefix)."""
        m_1 = max((stage_of_key(k) or 0) for k in update_keys) + 1 if update_keys else 0
        by_stage = [sorted(k for k in update_keys if stage_of_key(k) == s) for s in range(m_1)]
        sketches: dict[int, list[torch.Tensor]] = {}
        weights: dict[int, float] = {}
        for r in results:
            up = r.output.upload.tensors
            sk = []
            for s, keys in enumerate(by_stage):
                vec = torch.cat([(up[k] - old[k]).reshape(-1).to(torch.float64) for k in keys]) if keys else torch.zeros(1, dtype=torch.float64)
                sk.append(self._sketch(s, vec.numel())(vec))
            sketches[r.client_id] = sk
            weights[r.client_id] = float(r.output.num_samples)
        return loo_sketch_scores(sketches, weights)

    def _conflict_scores(
        self, state: ServerState, plan: StudentPlan, participants: Sequence[int]
    ) -> dict[int, float]:
        """Tier-2 scores (higher = less conflict); {} when there is no tier 2 or for ``random``."""
        e = plan.tier2_exit
        similarity = self.hp.selection.similarity
        if e is None or similarity == "random":
            return {}
        if similarity == "update_sketch":
            conflict: dict[str, list[float]] = state.meta.get("conflict", {})
            return {
                cid: float(conflict[str(cid)][e])
                for cid in participants
                if str(cid) in conflict and e < len(conflict[str(cid)])
            }
        if similarity == "update_cosine":
            keys = keys_feeding_exit(state.meta["update_keys"], e)
            if not keys or AGGUPD_NS + keys[0] not in state.tensors:
                return {}
            reference = {k: state.tensors[AGGUPD_NS + k] for k in keys}
            updates = {
                cid: {k: state.tensors[_upd_key(cid, k)] for k in keys}
                for cid in participants
                if _upd_key(cid, keys[0]) in state.tensors
            }
            return update_cosine_scores(participants, updates, reference, keys)
        heads = {cid: state.tensors[_selhead_key(cid, e)] for cid in participants if _selhead_key(cid, e) in state.tensors}
        return head_cosine_scores(participants, heads)

    def _next_select_exit(self, ctx: RoundContext, m: int) -> int | None:
        """head_cosine: the exit round t+1's tier 2 competes for (uploaded this round).

        Predicted on the global clock (with the ramp); under ``schedule_clock: client``
        a client's tier-2 exit may differ, and a head the server lacks scores 0.
        """
        sel = self.hp.selection
        if sel.similarity != "head_cosine" or sel.schedule == "all":
            return None
        nxt = ctx.round + 1
        if nxt >= ctx.num_rounds:
            return None
        _, e = tier_exits(tier1_depth(*self._ramped(schedule_t(nxt), ctx.num_rounds), m), m, sel.order)
        return e

    # ----------------------------------------------------------------- client
    def client_update(
        self, model: EarlyExitNet, payload: Message, personal: Params | None, data: ClientData, ctx: ClientContext
    ) -> ClientOutput:
        """Train the backbone, the teacher head and the heads of S_i on L_i; freeze the rest."""
        m = model.num_exits
        students = _students_of(payload, m)
        if TEACHER_W not in payload.tensors or TEACHER_B not in payload.tensors:
            raise KeyError(f"payload lacks {TEACHER_W!r}/{TEACHER_B!r}: it must come from CafeDistill.server_payloads")
        shared = {k: v for k, v in payload.tensors.items() if k not in (TEACHER_W, TEACHER_B)}
        load_params(model, shared)
        hp = self.hp
        residual = hp.heads == "generic_residual"
        if personal and not residual:
            load_params(model, personal)

        # unselected = frozen: exits outside S_i (other than the teacher) are out of
        # the optimizer, so neither momentum nor weight decay can move them.
        # ce_detached: they train on CE over detached features (loss.py).
        frozen = set(range(m - 1)) - set(students) if hp.unselected in ("frozen", "excluded") else set()
        stats = KDStats()
        opts = KDOptions(
            lam=float(payload.meta.get("lam", hp.lam)), tau=hp.tau, backbone=hp.kd_backbone,
            backbone_scale=hp.kd_backbone_scale, gate=hp.kd_gate, target=hp.kd_target, unselected=hp.unselected,
            last_exit=hp.kd_last_exit, shared=hp.kd_shared, residual_ce=hp.residual_ce,
            residual_generic=hp.residual_generic,
        )
        prior = label_prior(data.y_train, model.num_classes) if hp.kd_target != "full" else None
        own_weight = float(payload.meta.get("own_weight", 0.0))
        teacher = (payload.tensors[TEACHER_W], payload.tensors[TEACHER_B])
        heads: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] | None = None
        if residual:
            counts = torch.bincount(data.y_train.long(), minlength=model.num_classes).to(torch.float32)
            heads = residual_heads(model, personal, hp.residual_init, counts)
        if hp.kd_exit_gate == "teacher_better" and opts.lam > 0 and students:
            opts = replace(opts, skip_kd=self._students_at_least_as_good(model, data, teacher, own_weight, heads,
                                                                         students))
        if heads is not None:
            # generic heads (and the backbone) always train by BSM; frozen applies to the residuals
            loss_fn = make_residual_loss_fn(HeadProbe(model), heads, counts, *teacher, students, opts, stats,
                                            prior=prior, own_weight=own_weight)
            excluded = frozen if hp.unselected == "excluded" else set()  # their generic heads stay put too
            trainable = [*(p for n, p in model.named_parameters() if exit_of_key(n) not in excluded),
                         *(p for k, pair in enumerate(heads) if k not in frozen for p in pair)]
        else:
            loss_fn = make_loss_fn(*teacher, students, opts, stats=stats, prior=prior, own_weight=own_weight)
            trainable = [p for n, p in model.named_parameters() if exit_of_key(n) not in frozen]
        interference = self._interference(model, data, heads) if hp.measure_interference else {}
        loss, seen = local_sgd(model, data, ctx, self.cfg.train, loss_fn, params=trainable)

        sd = model.state_dict()
        upload = {k: sd[k].detach().clone() for k in shared}
        upload[HEAD_W] = model.last_head.weight.detach().clone()
        upload[HEAD_B] = model.last_head.bias.detach().clone()
        if residual:  # h_i is the client's personal last head: generic + residual
            if hp.residual_generic != "live":  # the received generic head, the one the residual corrects
                wk, bk = final_linear_keys(model, m - 1)
                upload[HEAD_W], upload[HEAD_B] = shared[wk].clone(), shared[bk].clone()
            upload[HEAD_W] += heads[m - 1][0].detach()
            upload[HEAD_B] += heads[m - 1][1].detach()
            personal_out = residual_state(heads)
        else:
            personal_out = {k: v.detach().clone() for k, v in sd.items() if k.startswith(EXIT_PREFIX)}
        up_meta: dict[str, Any] = {}
        if residual and hp.unselected == "excluded":  # the server averages an exit's generic head over its trainers
            up_meta["trained_exits"] = sorted(set(range(m)) - frozen)
        if "select_exit" in payload.meta:
            e = int(payload.meta["select_exit"])
            upload.update({SELECT_HEAD_NS + k: sd[k].detach().clone() for k in model.head_keys(e)})
            up_meta["select_exit"] = e
        return ClientOutput(
            upload=Message(tensors=upload, meta=up_meta),
            personal=personal_out,
            num_samples=data.num_train,
            samples_processed=seen,
            trained_depth=m,
            metrics={"train_loss": loss, "kd_loss": stats.mean, "num_students": float(len(students)),
                     "kd_lam": opts.lam, "kd_kept": stats.kept_fraction,
                     "kd_exits": float(len(opts.kd_exits(students, m))), **interference},
        )

    @torch.no_grad()
    def _students_at_least_as_good(
        self, model: EarlyExitNet, data: ClientData, teacher: tuple[torch.Tensor, torch.Tensor], own_weight: float,
        heads: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] | None, students: Sequence[int],
    ) -> tuple[int, ...]:
        """kd_exit_gate teacher_better: the students already as accurate as the teacher on the client's data.

        Measured before local training on (up to 512 of) the client's training samples,
        with the logits the client uses: the student's personal logits and zbar from its
        current last-stage feature. Those students get no KD this round.
        """
        m = model.num_exits
        x, y = data.x_train[:512], data.y_train[:512]
        w, b = teacher
        was = model.training
        model.eval()
        try:
            if heads is None:
                logits, _, phi = forward_stages(model, x)
                if own_weight:
                    w = w + own_weight * model.last_head.weight
                    b = b + own_weight * model.last_head.bias
                student = {k: logits[k] for k in students}
            else:
                probe = HeadProbe(model)
                logits, feats = probe(x)
                phi = feats[m - 1]
                if own_weight:
                    w = w + own_weight * (probe.linears[m - 1].weight + heads[m - 1][0])
                    b = b + own_weight * (probe.linears[m - 1].bias + heads[m - 1][1])
                student = {k: logits[k] + F.linear(feats[k], *heads[k]) for k in students}
        finally:
            model.train(was)
        teacher_acc = float((F.linear(phi, w, b).argmax(dim=1) == y).float().mean())
        return tuple(k for k in students if float((student[k].argmax(dim=1) == y).float().mean()) >= teacher_acc)

    def _interference(
        self, model: EarlyExitNet, data: ClientData, heads: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] | None
    ) -> dict[str, float]:
        """measure_interference: the exits' gradient cosines on the shared stages, before training.

        Exit k's loss is what its supervised terms put on the backbone on the client's
        first batch: the CE of its logits with personal heads; its balanced softmax plus
        its personal CE (on the ``residual_ce`` path) under generic_residual. KD is left
        out: the question is whether the exits' own objectives conflict.
        """
        n = min(self.cfg.train.batch_size, data.num_train)
        if n == 0:
            return {}
        x, y = data.x_train[:n], data.y_train[:n]
        buffers = [b.clone() for b in model.buffers()]  # a forward in train mode may move BatchNorm's statistics
        try:
            return self._gradient_cosines(model, x, y, data, heads)
        finally:
            with torch.no_grad():
                for b, saved in zip(model.buffers(), buffers, strict=True):
                    b.copy_(saved)

    def _gradient_cosines(self, model: EarlyExitNet, x: torch.Tensor, y: torch.Tensor, data: ClientData,
                          heads: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] | None) -> dict[str, float]:
        hp, m = self.hp, model.num_exits
        if heads is None:
            losses = [F.cross_entropy(z, y) for z in model(x)]
        else:
            counts = torch.bincount(data.y_train.long(), minlength=model.num_classes).to(torch.float32)
            probe = HeadProbe(model)
            logits, feats = probe(x)
            received = received_heads(probe) if hp.residual_generic != "live" else None
            z_ce = personal_ce_logits(probe, logits, feats, heads, list(range(m)), ce=hp.residual_ce,
                                      received=received)
            losses = [balanced_softmax_loss(logits[k], y, counts) + F.cross_entropy(z_ce[k], y) for k in range(m)]
        return exit_gradient_cosines(losses, stage_parameters(model))

    # ------------------------------------------------------------- evaluation
    def eval_payload(self, state: ServerState) -> Message:
        """The global backbone (and, under generic_residual, the generic heads)."""
        return Message(tensors=global_params(state))

    def load_for_eval(
        self, model: EarlyExitNet, payload: Message, personal: Params | None, data: ClientData, ctx: ClientContext
    ) -> None:
        """Personal heads; under generic_residual W^G + W^P in every exit's final linear layer."""
        load_params(model, payload.tensors)
        if self.hp.heads == "generic_residual":
            load_summed_heads(model, personal)
        elif personal:
            load_params(model, personal)
