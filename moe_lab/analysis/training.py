"""Analyses of routing over training: how early the router settles.

Inputs are the router snapshots a training run saves (``router_snapshots.npz``: the top-k
experts chosen for fixed probe tokens at regular steps), not a single trace.
"""

from __future__ import annotations

import numpy as np


def router_saturation(snapshot_indices: np.ndarray) -> np.ndarray:
    """OLMoE's router saturation: for every snapshot s and layer l, the mean over probe tokens of
    |topk_s ∩ topk_final| / k, the share of each token's final experts already chosen at s.

    ``snapshot_indices`` [S, L, N, k] (the last snapshot is the final model) -> [S, L]; 1 at the
    last snapshot by definition, about k/E for a router that has not learned anything yet.
    """
    idx = np.asarray(snapshot_indices).astype(np.int64)
    if idx.ndim != 4:
        raise ValueError(f"snapshot_indices must be [snapshots, layers, tokens, k], got shape {idx.shape}")
    S, L, N, k = idx.shape
    E = int(idx.max()) + 1
    onehot = np.zeros((S, L, N, E), dtype=bool)  # [S, L, N, E] chosen experts
    np.put_along_axis(onehot, idx, True, axis=-1)
    return (onehot & onehot[-1:]).sum(-1).mean(-1) / k
