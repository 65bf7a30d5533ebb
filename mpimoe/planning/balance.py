"""Load-balancing policies, decided by rank 0 (the coordinator) from expert
loads: the gate bias and replicas of hot experts.  Pure NumPy, no MPI.

**Gate bias** (auxiliary-loss-free balancing, as in DeepSeek-V3).  A bias
``b`` [n_moe_layers, E] is added to the gate probabilities for the *choice* of
the top-k experts only (:func:`mpimoe.moe.router.route`); the combine weights stay
the softmax probabilities.  Every ``every`` forward passes rank 0 sums the
token copies per expert of those passes (``load``) and moves every expert's
bias one fixed step against its deviation from its layer's mean, then
re-centres the layer's biases on 0 and clips them:

    b <- b - step * sign(load - mean(load over the layer's experts))
    b <- clip(b - mean(b over the layer's experts), -clip, clip)

so an expert above the mean becomes less likely to be chosen, one below more.
Adding one constant to a layer's biases changes no choice, so re-centring only
keeps them away from the clip: without it, a pass with fewer token copies than
experts (most experts below the mean) pushes every bias up.  One update moves
a bias by at most ``2 * step``, and ``|b| <= clip``.

**Replicas** (hot experts on extra ranks, greedy like DeepSeek's EPLB).
:func:`replicate` repeatedly gives one more copy to the (layer, expert) with
the highest load per copy, on an extra rank that can still take it.

    >>> import numpy as np
    >>> loads = np.array([[90., 10, 10, 10], [40, 30, 20, 10]])
    >>> replicate(loads, n_ranks=2, per_layer=1, per_rank=2).tolist()
    [[0, 0, 0], [0, 0, 1], [1, 0, 0], [1, 1, 1]]

Layer 0's expert 0 (90 copies) gets a copy on each extra rank (90 -> 30 per
copy); layer 1's experts 0 and 1 (40, then 30 > 20) the remaining room.
"""

import heapq

import numpy as np

__all__ = ['BIAS_RULE', 'update_bias', 'max_over_mean', 'replicate']

#: :func:`update_bias` in one line (run.json records it)
BIAS_RULE = ('every `every` passes: bias <- bias - step * sign(load - mean load of the layer); '
             'bias <- clip(bias - mean bias of the layer, -clip, clip); the bias is added to '
             'the gate probabilities to choose the experts, never to the combine weights')


def update_bias(bias, load, step, clip):
    """One gate-bias update (module docstring).

    bias: float32 [Lm, E]; load: int or float [Lm, E] token copies per expert
    since the last update -> float32 [Lm, E].
    """
    dev = load - load.mean(axis=1, keepdims=True)                        # [Lm, E]
    moved = bias - np.float32(step) * np.sign(dev).astype(np.float32)
    return np.clip(moved - moved.mean(axis=1, keepdims=True), -clip, clip).astype(np.float32)


def max_over_mean(loads):
    """Imbalance per layer: max over experts / mean over experts, 0 for a
    layer without copies.  loads: [..., E] -> float64 [...]."""
    loads = np.asarray(loads, dtype=np.float64)
    mean = loads.mean(axis=-1)
    return np.where(mean > 0, loads.max(axis=-1) / np.where(mean > 0, mean, 1), 0.0)


def replicate(loads, n_ranks, per_layer, per_rank):
    """Choose replicas of hot experts and the extra ranks that host them.

    Repeatedly take the (layer, expert) with the highest load per copy (ties:
    lower layer, then lower expert) and give it one more copy on the extra rank
    that has the most free room (then the most room left in that layer, then
    the lowest index) among those with fewer than ``per_rank`` replicas in all,
    fewer than ``per_layer`` of that layer, and no copy of that expert.  A pair
    no rank can take is passed over; it stops when the ranks are full or only
    idle experts (load 0) are left.

    loads: float [Lm, E] token copies per expert -> int64 [X, 3] rows
    (MoE layer index, expert, extra rank in [0, n_ranks)), sorted.
    """
    loads = np.asarray(loads, dtype=np.float64)
    lm, n_experts = loads.shape
    copies = np.ones((lm, n_experts), dtype=np.int64)
    room = np.full(n_ranks, per_rank, dtype=np.int64)                     # [R]
    layer_room = np.full((lm, n_ranks), per_layer, dtype=np.int64)        # [Lm, R]
    has = np.zeros((lm, n_experts, n_ranks), dtype=bool)                  # [Lm, E, R]
    heap = [(-w, m, e) for (m, e), w in np.ndenumerate(loads) if w > 0]
    heapq.heapify(heap)
    rows = []
    while heap and room.any():
        _, m, e = heapq.heappop(heap)
        ok = (room > 0) & (layer_room[m] > 0) & ~has[m, e]                # [R]
        if not ok.any():
            continue
        r = int(np.argmax(np.where(ok, room * (per_layer + 1) + layer_room[m], -1)))
        room[r] -= 1
        layer_room[m, r] -= 1
        has[m, e, r] = True
        copies[m, e] += 1
        rows.append((m, e, r))
        heapq.heappush(heap, (-loads[m, e] / copies[m, e], m, e))
    return np.array(sorted(rows), dtype=np.int64).reshape(-1, 3)
