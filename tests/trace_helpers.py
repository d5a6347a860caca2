"""Small hand-built RoutingTraces shared by the analysis and figure tests."""

import numpy as np

from moe_lab.routing.trace import RoutingTrace


def make_trace(expert_ids, doc_ids=None, token_ids=None, domains=None, E=4, logits=None, pieces=None, weights=None):
    ids = np.asarray(expert_ids)
    if ids.ndim == 2:
        ids = ids[None]
    L, N, k = ids.shape
    doc_ids = np.zeros(N, int) if doc_ids is None else np.asarray(doc_ids)
    positions = np.concatenate([np.arange((doc_ids == d).sum()) for d in np.unique(doc_ids)])
    token_ids = np.arange(10, 10 + N) if token_ids is None else np.asarray(token_ids)
    w = np.full((L, N, k), 1.0 / k) if weights is None else np.asarray(weights)
    return RoutingTrace(token_ids=token_ids, doc_ids=doc_ids, positions=positions, expert_ids=ids, weights=w,
                        router_logits=logits, domains=domains or [], n_experts=E, pieces=pieces)
