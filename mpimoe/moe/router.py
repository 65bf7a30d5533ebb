"""Stage 1 of an MoE layer, **route** (front-end, no communication): gate
scores, top-k choice, combine weights, as ``cfg.router`` says
(mpimoe.model.config.RouterConfig).

Scores are a softmax over the router logits (Mixtral, Qwen, OLMoE) or an
independent sigmoid per expert (DeepSeek-V3).  A per-expert ``bias`` shifts
the *choice* only, never the combine weights: the checkpoint's score
correction (DeepSeek-V3's ``e_score_correction_bias``) plus the
auxiliary-loss-free balancing bias (mpimoe.planning.balance).  With
``n_group > 1`` a token chooses only among the experts of its ``topk_group``
best groups, a group scoring the sum of its two best choice scores
(DeepSeek-V3's group-limited routing).  The combine weights are the chosen
experts' unbiased scores, renormalised to sum to 1 when ``norm_topk_prob``,
times ``routed_scaling_factor``.  With replicas of hot experts,
:func:`spread_copies` picks the copy of its expert each token goes to.
"""

import numpy as np

from mpimoe.backends.backend import array_module
from mpimoe.model.config import RouterConfig

__all__ = ['route', 'spread_copies', 'expert_counts', 'key_counts', 'sorted_key_counts']


def route(h, w_router, top_k, bias=None, rcfg=RouterConfig()):
    """Pick ``top_k`` experts per token.

    h: float32 [T, d] (FFN input); w_router: float32 [d, E]; bias: float32 [E]
    or None (added to the scores for the choice only); rcfg: the model's
    RouterConfig (default: Mixtral's softmax, renormalised).  Returns (experts
    int32 [T, top_k], weights float32 [T, top_k]), experts in decreasing
    choice-score order, ties broken by the lower expert id.
    """
    logits = h @ w_router                                            # [T, E]
    if rcfg.scoring == 'sigmoid':
        scores = 1.0 / (1.0 + np.exp(-logits))
    else:
        scores = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores /= scores.sum(axis=1, keepdims=True)
    choice = scores if bias is None else scores + bias
    if rcfg.n_group > 1:
        choice = _best_groups(choice, rcfg.n_group, rcfg.topk_group)
    experts = np.argsort(-choice, axis=1, kind='stable')[:, :top_k]  # [T, k]
    weights = np.take_along_axis(scores, experts, axis=1)
    if rcfg.norm_topk_prob:
        # + 1e-20 as DeepSeek-V3 (a no-op in FP32 for softmax scores)
        weights /= weights.sum(axis=1, keepdims=True) + np.float32(1e-20)
    if rcfg.routed_scaling_factor != 1.0:
        weights *= np.float32(rcfg.routed_scaling_factor)
    return experts.astype(np.int32), weights.astype(np.float32)


def _best_groups(choice, n_group, topk_group):
    """choice [T, E] with the experts outside each token's ``topk_group`` best
    of ``n_group`` equal groups set to -inf; a group scores the sum of its two
    best choice scores (ties: the lower group)."""
    xp = array_module(choice)
    T, E = choice.shape
    grouped = choice.reshape(T, n_group, E // n_group)
    top2 = -np.sort(-grouped, axis=2)[:, :, :2]                         # [T, G, 2]
    best = np.argsort(-top2.sum(axis=2), axis=1, kind='stable')[:, :topk_group]
    keep = xp.zeros((T, n_group), dtype=bool)
    keep[xp.arange(T)[:, None], best] = True
    return np.where(np.repeat(keep, E // n_group, axis=1), choice, np.float32(-np.inf))


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
    """Token copies per expert: experts int [T, k] -> int64 [n_experts], on
    experts' module (:func:`key_counts`)."""
    return key_counts(np.ravel(experts), n_experts)


def key_counts(keys, n_keys, order=None):
    """How many of ``keys`` (int [n], each in [0, n_keys)) equal each key:
    int64 [n_keys], on their module.

    NumPy: ``bincount``.  CuPy: :func:`sorted_key_counts` of the keys sorted
    (``keys[order]`` where the caller has their stable argsort ``order``),
    because CuPy's ``bincount`` reads the largest key back to the host (a
    synchronisation per call); this stays on the device until the caller
    copies the counts.
    """
    xp = array_module(keys)
    if xp is np:
        return np.bincount(keys, minlength=n_keys).astype(np.int64)
    return sorted_key_counts(xp.sort(keys) if order is None else keys[order], n_keys)


def sorted_key_counts(sorted_keys, n_keys):
    """:func:`key_counts` of keys already sorted (int [n], ascending), by
    binary search, on their module."""
    xp = array_module(sorted_keys)
    edges = xp.searchsorted(sorted_keys, xp.arange(n_keys + 1), side='left')
    return xp.diff(edges).astype(np.int64)
