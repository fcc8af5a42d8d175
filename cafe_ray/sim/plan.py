"""One run, resolved once: the plan that is built before Ray starts and handed down.

``cafe-ray simulate`` builds it in preflight (:func:`cafe_ray.sim.preflight.preflight`),
before Ray starts: the device catalog with its resource classes and pool sizes, and the
dataset with its client splits. Everything after reads the plan instead of resolving
the config again: the autoscaler request and the client actor pools take its classes,
the round loop its catalog, data and splits. The coordinator actor gets the plan as a
small picklable value (:meth:`RunPlan.without_data`); the dataset and splits, the big
arrays, go to the object store once and reach it by reference.

A plan without data (TinyImageNet, whose preflight only indexes the files; a remote
cluster whose nodes read the data themselves) loads and partitions it where the round
loop runs, once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from cafe_ray.config import ExperimentConfig
from cafe_ray.data import load_dataset, partition_clients
from cafe_ray.data.base import ArrayDataset, ClientSplit, ClientSplits
from cafe_ray.sim.profiles import Catalog, ResourceClass, resolve_catalog


def as_client_splits(splits: Sequence[ClientSplit]) -> ClientSplits:
    """Splits as flat CSR arrays (a partition may return a list of per-client splits)."""
    return splits if isinstance(splits, ClientSplits) else ClientSplits.from_list(splits)


def resolve_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with what only the data can tell filled in: a natural partition (``data.client``)
    has as many clients as the column has distinct values. A TableError names the field."""
    if cfg.data.name != "parquet" or cfg.data.client is None:
        return cfg  # (pyarrow is imported only for a table)
    from cafe_ray.data.tables import resolve_clients

    data = resolve_clients(cfg.data)
    return cfg if data is cfg.data else cfg.model_copy(update={"data": data})


def load_data(cfg: ExperimentConfig) -> tuple[ArrayDataset, ClientSplits]:
    """The experiment's dataset and its client splits: the one place a run partitions its data."""
    dataset = load_dataset(cfg.data, seed=cfg.seed)
    return dataset, as_client_splits(partition_clients(dataset, cfg.data, seed=cfg.seed))


@dataclass(frozen=True)
class RunPlan:
    """A config resolved for one run: its catalog (tiers, resource classes, pool sizes) and,
    when loaded already, its dataset and client splits."""

    cfg: ExperimentConfig
    catalog: Catalog  # profiles.catalog with profiles.classes applied
    dataset: ArrayDataset | None = field(default=None, repr=False, compare=False)
    splits: ClientSplits | None = field(default=None, repr=False, compare=False)

    @classmethod
    def resolve(cls, cfg: ExperimentConfig, data: tuple[ArrayDataset, Sequence[ClientSplit]] | None = None) -> RunPlan:
        """Resolve ``cfg``'s catalog (a ValueError names the field); ``data``: already loaded."""
        return cls(resolve_config(cfg), resolve_catalog(cfg.profiles)).with_data(data)

    @property
    def classes(self) -> tuple[ResourceClass, ...]:
        """The client actor pools at full size: one resource class each."""
        return self.catalog.classes

    @property
    def has_data(self) -> bool:
        return self.dataset is not None and self.splits is not None

    def with_data(self, data: tuple[ArrayDataset, Sequence[ClientSplit]] | None) -> RunPlan:
        if data is None:
            return replace(self, dataset=None, splits=None)
        return replace(self, dataset=data[0], splits=as_client_splits(data[1]))

    def without_data(self) -> RunPlan:
        """The plan minus its arrays: what travels to the coordinator as an actor argument."""
        return self.with_data(None)

    def data(self) -> tuple[ArrayDataset, ClientSplits]:
        """(dataset, splits): the plan's, else loaded and partitioned now."""
        if self.dataset is not None and self.splits is not None:
            return self.dataset, self.splits
        return load_data(self.cfg)
