"""Pairwise model geometry and per-client model storage for personalized aggregation.

FedAMP-EE needs squared distances ||theta_i - theta_j||^2 and pFedGraph-EE cosine
similarities between whole early-exit networks. Both come from one Gram matrix
G_ij = <theta_i, theta_j>, accumulated key by key in float64 so that memory is
one parameter tensor per client at a time, never n flattened models.

Server states that keep one model per client store it under ``<ns><cid>/<key>``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cafe_ray.algorithms.base import Params, ServerState


def float_keys(params: Params) -> list[str]:
    """The floating-point keys of a parameter dict, sorted (counters are not geometry)."""
    return sorted(k for k, v in params.items() if torch.is_floating_point(v))


def gram(models: Sequence[Params], keys: Sequence[str] | None = None) -> np.ndarray:
    """G_ij = sum over ``keys`` of <theta_i[k], theta_j[k]> (float64, (n, n))."""
    if not models:
        return np.zeros((0, 0))
    ks = list(keys) if keys is not None else float_keys(models[0])
    G = np.zeros((len(models), len(models)))
    for k in ks:
        X = torch.stack([m[k].detach().reshape(-1).to(torch.float64) for m in models])  # (n, numel)
        G += (X @ X.T).numpy()
    return G


def squared_distances(G: np.ndarray) -> np.ndarray:
    """||theta_i - theta_j||^2 from the Gram matrix (clipped at 0 against rounding)."""
    d = np.diag(G)
    return np.maximum(d[:, None] + d[None, :] - 2.0 * G, 0.0)


def cosine_similarities(G: np.ndarray) -> np.ndarray:
    """cos(theta_i, theta_j) from the Gram matrix; a zero vector has cosine 0 to all (1 to itself)."""
    norms = np.sqrt(np.maximum(np.diag(G), 0.0))
    safe = np.where(norms > 0, norms, 1.0)
    C = G / safe[:, None] / safe[None, :]
    C[norms == 0, :] = 0.0
    C[:, norms == 0] = 0.0
    np.fill_diagonal(C, 1.0)
    return np.clip(C, -1.0, 1.0)


def mix(models: Sequence[Params], weights: Sequence[float], like: Params) -> Params:
    """sum_j weights[j] * models[j] for the floating keys of ``like``; other keys copied from it."""
    out: Params = {}
    for k, ref in like.items():
        if not torch.is_floating_point(ref):
            out[k] = ref.clone()
            continue
        acc = torch.zeros_like(ref, dtype=torch.float64)
        for w, m in zip(weights, models, strict=True):
            if w != 0.0:
                acc += float(w) * m[k].detach().to(torch.float64)
        out[k] = acc.to(ref.dtype)
    return out


# ------------------------------------------------------------- per-client storage
def stored_ids(state: ServerState, ns: str) -> list[int]:
    """Clients with a model stored under namespace ``ns`` (e.g. "models/"), sorted."""
    return sorted({int(k[len(ns):].split("/", 1)[0]) for k in state.tensors if k.startswith(ns)})


def load_client(state: ServerState, ns: str, cid: int) -> Params:
    prefix = f"{ns}{cid}/"
    return {k[len(prefix):]: v for k, v in state.tensors.items() if k.startswith(prefix)}


def store_client(tensors: Params, ns: str, cid: int, params: Params) -> None:
    """Write (in place, into a tensors dict) client ``cid``'s params under ``ns``."""
    prefix = f"{ns}{cid}/"
    for k in [k for k in tensors if k.startswith(prefix)]:
        del tensors[k]
    tensors.update({prefix + k: v.detach().clone() for k, v in params.items()})
