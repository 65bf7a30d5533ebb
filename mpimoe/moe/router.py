"""Stage 1 of an MoE layer, **route** (front-end, no communication): gate
scores, top-k choice, combine weights.

Softmax over the router logits, top-k experts per token, the chosen
probabilities renormalised to sum to 1 (as in Mixtral).  An optional
per-expert ``bias`` shifts the *choice* only, never the combine weights (the
auxiliary-loss-free balancing scheme, mpimoe.planning.balance).  With replicas of hot
experts, :func:`spread_copies` picks the copy of its expert each token goes to.
"""

import numpy as np

from mpimoe.backends.backend import array_module

__all__ = ['route', 'spread_copies', 'expert_counts']


def route(h, w_router, top_k, bias=None):
    """Pick ``top_k`` experts per token.

    h: float32 [T, d] (FFN input); w_router: float32 [d, E]; bias: float32 [E]
    or None.  Returns (experts int32 [T, top_k], weights float32 [T, top_k]),
    experts in decreasing score order, ties broken by the lower expert id.
    """
    logits = h @ w_router                                            # [T, E]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    choice = probs if bias is None else probs + bias
    experts = np.argsort(-choice, axis=1, kind='stable')[:, :top_k]  # [T, k]
    weights = np.take_along_axis(probs, experts, axis=1)
    weights /= weights.sum(axis=1, keepdims=True)
    return experts.astype(np.int32), weights.astype(np.float32)


def spread_copies(experts, n_copies, offset=0):
    """Which copy of its expert each token copy goes to: token t's copy to
    expert e goes to copy ``(offset + t) mod n_copies[e]`` (copy 0: the
    primary; a front-end passes its rank as ``offset``, so that front-ends
    sending one token each do not all pick the same copy).

    experts: int [T, k]; n_copies: int [E] (>= 1) -> int64 [T, k], arrays
    of experts' module.
    """
    xp = array_module(experts)
    t = offset + xp.arange(len(experts))                                # [T]
    return t[:, None] % xp.asarray(n_copies)[experts]


def expert_counts(experts, n_experts):
    """Token copies per expert: experts int [T, k] -> int64 [n_experts]."""
    return np.bincount(np.ravel(experts), minlength=n_experts).astype(np.int64)
