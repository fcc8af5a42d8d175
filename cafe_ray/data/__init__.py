"""Datasets as contiguous numpy arrays and their split over federated clients."""

from cafe_ray.data.base import ArrayDataset, ClientSplit, DatasetNotFoundError
from cafe_ray.data.datasets import load_dataset
from cafe_ray.data.partition import partition_clients

__all__ = ["ArrayDataset", "ClientSplit", "DatasetNotFoundError", "load_dataset", "partition_clients"]
