"""Device profiles, resource classes, named catalogs and FedScale-style traces.

A *profile* says how fast a simulated device computes and communicates, when it is
online, how often it fails, and what it may run; a *resource class* is what its
client actors get from Ray (num_cpus, num_gpus, memory, custom resources), so
clients of different classes really run with different Ray resources.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cafe_ray.config import ProfilesConfig, load_plugin, plugin_target


@dataclass(frozen=True)
class ResourceClass:
    name: str
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None  # bytes reserved per actor
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per actor
    actors: int | None = None  # pool size (None = profiles.actors_per_class)

    def ray_options(self) -> dict:
        opts: dict = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory:
            opts["memory"] = self.memory
        if self.resources:
            opts["resources"] = dict(self.resources)
        return opts


@dataclass(frozen=True)
class DeviceProfile:
    name: str  # tier name, e.g. "phone"
    resource_class: str  # which actor pool runs it
    flops: float = 1e10  # sustained training compute, FLOP/s
    memory_bytes: int = 4 * 2**30  # device memory
    downlink_mbps: float = 20.0  # server -> client, Mbit/s
    uplink_mbps: float = 5.0  # client -> server, Mbit/s
    availability: float = 1.0  # probability of being online in a round (if no trace)
    failure_prob: float = 0.0  # probability of crashing during a round
    inference_mac_budget: int | None = None  # MACs per sample allowed at inference
    max_depth: int | None = None  # deepest exit (1-based) it may train; None = all
    width_factor: float = 1.0  # channel-width fraction of the sub-model it trains (ScaleFL); 1 = full
    sec_per_sample: float | None = None  # FedScale-style compute speed; overrides flops
    active: tuple[float, ...] = ()  # trace: times the device comes online (s)
    inactive: tuple[float, ...] = ()  # trace: times it goes offline (s)
    trace_period: float | None = None  # trace: length after which it repeats (s)

    def compute_seconds(self, train_macs_per_sample: float, samples: int) -> float:
        """Virtual compute time: 3 x trained MACs x samples / speed (forward + backward)."""
        if self.sec_per_sample is not None:
            return self.sec_per_sample * samples
        return 3.0 * train_macs_per_sample * samples / self.flops

    def comm_seconds(self, bytes_down: int, bytes_up: int) -> float:
        return bytes_down * 8 / (self.downlink_mbps * 1e6) + bytes_up * 8 / (self.uplink_mbps * 1e6)

    def is_online(self, virtual_time: float, rng: np.random.Generator | None = None) -> bool:
        """A trace decides when there is one; else a seeded coin with p = availability."""
        if self.active:
            t = virtual_time % self.trace_period if self.trace_period else virtual_time
            for i, start in enumerate(self.active):
                end = self.inactive[i] if i < len(self.inactive) else float("inf")
                if start <= t < end:
                    return True
            return False
        if rng is None:
            raise ValueError(f"profile {self.name!r}: availability={self.availability} needs a random draw; pass rng")
        return bool(rng.random() < self.availability)


@dataclass(frozen=True)
class Catalog:
    """Named device tiers with proportions, and the resource classes they run on."""

    name: str
    tiers: tuple[tuple[DeviceProfile, float], ...]  # (profile, fraction of clients)
    classes: tuple[ResourceClass, ...]
    description: str = ""


def _catalogs() -> dict[str, Catalog]:
    std = DeviceProfile("standard", "default", flops=2e10, downlink_mbps=50, uplink_mbps=10)
    phone = DeviceProfile(
        "phone", "phone", flops=5e9, memory_bytes=4 * 2**30, downlink_mbps=20, uplink_mbps=5,
        availability=0.8, failure_prob=0.02, inference_mac_budget=2_000_000, max_depth=None,
        width_factor=0.75,
    )
    sbc = DeviceProfile(
        "single_board", "single_board", flops=1e9, memory_bytes=1 * 2**30, downlink_mbps=10,
        uplink_mbps=2, availability=0.9, failure_prob=0.05, inference_mac_budget=500_000,
        max_depth=2, width_factor=0.5,
    )
    edge = DeviceProfile(
        "edge_gpu", "edge_gpu", flops=1e12, memory_bytes=8 * 2**30, downlink_mbps=100,
        uplink_mbps=50, availability=0.95, failure_prob=0.01, inference_mac_budget=None,
        width_factor=1.0,
    )
    return {
        "uniform": Catalog(
            "uniform", ((std, 1.0),), (ResourceClass("default", num_cpus=1.0),),
            "identical devices (20 GFLOP/s, 50/10 Mbit/s), always online",
        ),
        "iot_mix": Catalog(
            "iot_mix",
            ((phone, 0.5), (sbc, 0.3), (edge, 0.2)),
            (
                ResourceClass("phone", num_cpus=0.5),
                ResourceClass("single_board", num_cpus=0.25),
                ResourceClass("edge_gpu", num_cpus=1.0),
            ),
            "50% phones (5 GFLOP/s), 30% single-board computers (1 GFLOP/s, depth <= 2), "
            "20% edge GPUs (1 TFLOP/s); each tier its own Ray resource class",
        ),
    }


CATALOGS = _catalogs()


def load_trace(path: Path) -> Catalog:
    """A FedScale-style device trace (JSON): one entry per device.

    ``{"devices": [{"computation": ms_per_sample, "communication": kbps,
    "active": [...], "inactive": [...], "finish_time": s, "class": "name"}, ...]}``
    ``computation`` and ``communication`` follow FedScale's client_device_capacity;
    ``active``/``inactive``/``finish_time`` its client_behave_trace. JSON, never pickle.
    Optional per device: ``failure_prob``, ``inference_mac_budget``, ``max_depth`` and
    ``width_factor`` (in (0, 1], default 1), as in :class:`DeviceProfile`.
    """
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"profiles.catalog: cannot read trace file {path}: {err}") from None
    devices = raw.get("devices") if isinstance(raw, dict) else None
    if not isinstance(devices, list) or not devices:
        raise ValueError(f"profiles.catalog: {path} must be a JSON object with a non-empty 'devices' list")
    tiers = []
    class_names: list[str] = []
    for i, d in enumerate(devices):
        if "computation" not in d or "communication" not in d:
            raise ValueError(f"profiles.catalog: {path} devices[{i}] needs 'computation' (ms/sample) and 'communication' (kbps)")
        width_factor = float(d.get("width_factor", 1.0))
        if not 0 < width_factor <= 1:
            raise ValueError(f"profiles.catalog: {path} devices[{i}] width_factor must be in (0, 1], got {width_factor}")
        cls = str(d.get("class", "trace"))
        if cls not in class_names:
            class_names.append(cls)
        kbps = float(d["communication"])
        tiers.append((DeviceProfile(
            name=f"trace_{i}", resource_class=cls,
            sec_per_sample=float(d["computation"]) / 1000.0,
            downlink_mbps=kbps / 1000.0, uplink_mbps=kbps / 1000.0,
            failure_prob=float(d.get("failure_prob", 0.0)),
            inference_mac_budget=d.get("inference_mac_budget"),
            max_depth=d.get("max_depth"),
            width_factor=width_factor,
            active=tuple(float(x) for x in d.get("active", ())),
            inactive=tuple(float(x) for x in d.get("inactive", ())),
            trace_period=float(d["finish_time"]) if d.get("finish_time") else None,
        ), 1.0 / len(devices)))
    classes = tuple(ResourceClass(c, num_cpus=1.0) for c in class_names)
    return Catalog(path.stem, tuple(tiers), classes, f"trace of {len(devices)} devices from {path}")


def _plugin_catalog(name: str) -> Catalog:
    """Your own catalog (``package.module:Name`` or an entry point): a Catalog, or a function
    of no arguments that returns one."""
    obj = load_plugin("profiles.catalog", name)
    cat = obj() if callable(obj) and not isinstance(obj, Catalog) else obj
    if not isinstance(cat, Catalog):
        raise ValueError(f"profiles.catalog={name}: got {type(cat).__name__}, not a "
                         "cafe_ray.sim.profiles.Catalog")
    return cat


def resolve_catalog(cfg: ProfilesConfig) -> Catalog:
    """The catalog named by ``profiles.catalog`` with ``profiles.classes`` overrides applied."""
    if cfg.catalog in CATALOGS:
        cat = CATALOGS[cfg.catalog]
    elif Path(cfg.catalog).suffix == ".json":
        p = Path(cfg.catalog)
        if not p.is_file():
            raise ValueError(f"profiles.catalog: trace file {p} not found")
        cat = load_trace(p)
    elif plugin_target("profiles.catalog", cfg.catalog) is not None:
        cat = _plugin_catalog(cfg.catalog)
    else:
        raise ValueError(
            f"profiles.catalog: unknown catalog {cfg.catalog!r}; use one of "
            f"{', '.join(CATALOGS)}, a FedScale-style JSON trace path or package.module:Name"
        )
    known = {c.name for c in cat.classes}
    unknown = set(cfg.classes) - known
    if unknown:
        raise ValueError(f"profiles.classes: unknown class(es) {sorted(unknown)} for catalog {cat.name!r}; classes are {sorted(known)}")
    classes = []
    for c in cat.classes:
        if c.actors is None:
            c = replace(c, actors=cfg.actors_per_class)
        o = cfg.classes.get(c.name)
        if o is not None:
            c = replace(c, **{k: v for k, v in o.model_dump().items() if v is not None})
        classes.append(c)
    return replace(cat, classes=tuple(classes))


def assign_tiers(catalog: Catalog, num_clients: int, seed: int) -> np.ndarray:
    """Client i's tier index: exact tier counts by proportion, shuffled by a seeded RNG."""
    if len(catalog.tiers) > 1 and all(p.name.startswith("trace_") for p, _ in catalog.tiers):
        return np.arange(num_clients, dtype=np.int64) % len(catalog.tiers)
    fracs = np.array([f for _, f in catalog.tiers], dtype=float)
    fracs = fracs / fracs.sum()
    counts = np.floor(fracs * num_clients).astype(int)
    for i in np.argsort(-(fracs * num_clients - counts), kind="stable")[: num_clients - counts.sum()]:
        counts[i] += 1
    tiers = np.repeat(np.arange(len(catalog.tiers)), counts)
    np.random.default_rng([seed, 0x9E3779B9]).shuffle(tiers)
    return tiers.astype(np.int64)


def assign_profiles(catalog: Catalog, num_clients: int, seed: int) -> list[DeviceProfile]:
    """Client i's profile as a list (small N; the engine uses :class:`ProfileTable`)."""
    return [catalog.tiers[t][0] for t in assign_tiers(catalog, num_clients, seed)]


class ProfileTable(Sequence[DeviceProfile]):
    """Every registered client's profile as (tiers, tier index per client).

    ``table[i]`` is client i's :class:`DeviceProfile`; a million clients cost one
    int array, and :meth:`online` decides who is online for all of them in numpy.
    """

    def __init__(self, catalog: Catalog, num_clients: int, seed: int) -> None:
        self.tiers: tuple[DeviceProfile, ...] = tuple(p for p, _ in catalog.tiers)
        self.tier_of = assign_tiers(catalog, num_clients, seed)

    def __len__(self) -> int:
        return len(self.tier_of)

    def __getitem__(self, i: int) -> DeviceProfile:  # type: ignore[override]  # ints only, no slices
        return self.tiers[self.tier_of[i]]

    def __iter__(self) -> Iterator[DeviceProfile]:
        return (self.tiers[t] for t in self.tier_of)

    def online(self, virtual_time: float, seed: int, round_: int) -> np.ndarray | None:
        """Sorted ids of the clients online in round ``round_``; None means every client.

        Trace tiers decide by the virtual clock (once per tier), the others by a
        counter-based coin keyed by (seed, round, client), drawn for all clients at
        once and only when some tier is neither always nor never online.
        """
        from cafe_ray.sim import seeds

        p_on = np.array([_trace_online(p, virtual_time) if p.active else p.availability
                         for p in self.tiers], dtype=np.float64)
        if (p_on >= 1.0).all():
            return None
        p_client = p_on[self.tier_of]
        if np.isin(p_on, (0.0, 1.0)).all():
            return np.flatnonzero(p_client >= 1.0)
        ids = np.arange(len(self.tier_of), dtype=np.int64)
        return np.flatnonzero(seeds.uniforms(seed, round_, seeds.AVAIL, ids) < p_client)

    def to_json(self) -> dict:
        """profiles.json: the tiers once and one tier index per client (not one object each)."""
        return {"tiers": [{**p.__dict__, "active": list(p.active), "inactive": list(p.inactive)}
                          for p in self.tiers],
                "client_tier": self.tier_of.tolist()}


def _trace_online(p: DeviceProfile, virtual_time: float) -> float:
    return 1.0 if p.is_online(virtual_time) else 0.0


def check_fits(classes: Sequence[ResourceClass], available: dict[str, float]) -> list[ResourceClass]:
    """Shrink pools (largest first, never below one actor) until the cluster can host them.

    Raises a ValueError naming the class and field when even one actor per class
    cannot be placed: a pool that can never be scheduled would hang the run.
    """
    pools = {c.name: c.actors or 1 for c in classes}

    def demand() -> dict[str, float]:
        need: dict[str, float] = {}
        for c in classes:
            n = pools[c.name]
            need["CPU"] = need.get("CPU", 0) + n * c.num_cpus
            need["GPU"] = need.get("GPU", 0) + n * c.num_gpus
            if c.memory:
                need["memory"] = need.get("memory", 0) + n * c.memory
            for r, v in c.resources.items():
                need[r] = need.get(r, 0) + n * v
        return need

    def over() -> list[str]:
        return [r for r, v in demand().items() if v > available.get(r, 0) + 1e-9]

    while over():
        shrinkable = [c for c in classes if pools[c.name] > 1]
        if not shrinkable:
            r = over()[0]
            names = [c.name for c in classes if (c.num_gpus if r == "GPU" else c.num_cpus if r == "CPU"
                                                  else (c.memory or 0) if r == "memory" else c.resources.get(r, 0)) > 0]
            field = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}.get(r, f"resources.{r}")
            raise ValueError(
                f"the cluster has {available.get(r, 0):g} {r} but one actor per class of "
                f"{names} needs {demand()[r]:g}: lower profiles.classes.<class>.{field}, "
                f"or run on a cluster whose nodes advertise {r}"
            )
        biggest = max(shrinkable, key=lambda c: (pools[c.name], c.name))
        pools[biggest.name] -= 1
    return [replace(c, actors=pools[c.name]) for c in classes]


class ClientClasses(Mapping[int, str]):
    """client id -> resource class name, read from a :class:`ProfileTable` (no per-client dict)."""

    def __init__(self, table: ProfileTable) -> None:
        self.names = tuple(p.resource_class for p in table.tiers)
        self.tier_of = table.tier_of

    def __getitem__(self, client_id: int) -> str:
        if not 0 <= client_id < len(self.tier_of):
            raise KeyError(client_id)
        return self.names[self.tier_of[client_id]]

    def __len__(self) -> int:
        return len(self.tier_of)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.tier_of)))
