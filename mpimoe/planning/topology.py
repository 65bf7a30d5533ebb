"""Topology layout: the experts of each MoE layer permuted over that layer's
slots so that the node links carry the loads evenly.  Pure NumPy, no MPI.

Given the expert loads of a previous run (token copies [Lm, E]),
:func:`balance_layers` permutes the experts *within* each MoE layer over that
layer's slots (the same ranks, the same number of experts per rank) so that
the busiest node receives as few token copies as we can find: greedy LPT,
hottest expert first to the least loaded node with a free slot (ties by node
index), then pairwise swaps out of the busiest node while they lower it; then
the same within each node over its ranks.  A layer keeps the block layout
unless the result is strictly better on (busiest node, busiest rank).

    >>> import numpy as np
    >>> owner = np.array([[2, 2, 3, 3]], np.int32)      # 1 layer, 2 experts per rank
    >>> nodes = np.array([0, 0, 1, 2], np.int32)        # ranks 2 and 3 on nodes 1 and 2
    >>> balance_layers(owner, nodes, np.array([[9., 8, 1, 1]])).tolist()
    [[2, 3, 3, 2]]
"""

import numpy as np

__all__ = ['balance_layers', 'node_inbound', 'copy_loads']


def node_inbound(owner, nodes, loads):
    """Token copies into each node per MoE layer: float64 [Lm, n_nodes].
    owner: int [Lm, E] ranks; nodes: int [P]; loads: float [Lm, E]."""
    n_nodes = int(nodes.max()) + 1
    return np.stack([np.bincount(nodes[row], weights=w, minlength=n_nodes)
                     for row, w in zip(owner, loads)])


def copy_loads(loads, rep):
    """Each copy's share of the loads, a replicated expert's split evenly over
    its primary and its replicas: float64 [Lm, E].  loads: float [Lm, E];
    rep: int [X, 3] replica rows (MoE layer, expert, rank)."""
    copies = np.ones(np.shape(loads), dtype=np.int64)                    # [Lm, E]
    np.add.at(copies, (rep[:, 0], rep[:, 1]), 1)
    return loads / copies


def balance_layers(owner, nodes, loads):
    """Per MoE layer, the LPT permutation of its experts over its slots where it
    beats the block layout.  owner: int32 [Lm, E]; nodes: int32 [P];
    loads: float64 [Lm, E] -> int32 [Lm, E]."""
    out = owner.copy()
    tol = 1e-9 * max(float(loads.sum()), 1.0)                    # float sums of equal sets
    for m, w in enumerate(loads):
        cand = _lpt_layer(owner[m], nodes, w)
        (n0, r0), (n1, r1) = _busiest(owner[m], nodes, w), _busiest(cand, nodes, w)
        if n1 < n0 - tol or (n1 <= n0 + tol and r1 < r0 - tol):
            out[m] = cand
    return out


def _busiest(row, nodes, w):
    """(busiest node, busiest rank) inbound copies of one layer.  row: int [E]
    ranks; w: float [E] copies per expert."""
    return (np.bincount(nodes[row], weights=w).max(), np.bincount(row, weights=w).max())


def _lpt_layer(row, nodes, w):
    """:func:`_pack` of one layer's experts over its slots: first over nodes, then
    over the ranks of each node.  row: int [E] ranks of the block layout (each rank as
    often as it has experts); w: float [E] -> int32 [E] new ranks."""
    ranks, cap = np.unique(row, return_counts=True)                   # [R] each
    node_ids, node_of_rank = np.unique(nodes[ranks], return_inverse=True)
    node_cap = np.bincount(node_of_rank, weights=cap).astype(np.int64)
    to_node = _pack(w, node_cap)                                      # [E]
    out = np.empty_like(row)
    for j in range(len(node_ids)):
        items = np.flatnonzero(to_node == j)
        here = np.flatnonzero(node_of_rank == j)
        out[items] = ranks[here[_pack(w[items], cap[here])]]
    return out


def _pack(w, capacity):
    """Items into bins of fixed capacity, heaviest bin as light as we can:
    :func:`_lpt`, then :func:`_swap_down`.  w: float [n]; capacity: int [B]
    summing to n -> int [n] bin of each item."""
    return _swap_down(w, _lpt(w, capacity), len(capacity))


def _swap_down(w, bins, n_bins):
    """Swap an item of the heaviest bin (lowest index on ties) with a lighter item
    elsewhere while that lowers the heaviest bin's load without making the other
    bin as heavy; the best swap first.  w: float [n]; bins: int [n] -> int [n]."""
    bins = bins.copy()
    tol = 1e-12 * max(float(w.sum()), 1.0)
    while True:
        load = np.bincount(bins, weights=w, minlength=n_bins)               # [B]
        b = int(np.argmax(load))
        mine, other = np.flatnonzero(bins == b), np.flatnonzero(bins != b)
        if not len(other):
            return bins
        d = w[mine][:, None] - w[other][None, :]                           # [|mine|, |other|]
        after = np.maximum(load[b] - d, load[bins[other]][None, :] + d)    # new max of the two
        i, j = np.unravel_index(np.argmin(after), after.shape)
        if not after[i, j] < load[b] - tol:
            return bins
        bins[mine[i]], bins[other[j]] = bins[other[j]], b


def _lpt(w, capacity):
    """Greedy LPT with capacities: heaviest item first (ties by index) to the bin
    of least load that has room (ties by lowest bin).  w: float [n];
    capacity: int [B] summing to n -> int [n] bin of each item."""
    load = np.zeros(len(capacity))
    room = np.array(capacity, dtype=np.int64)
    out = np.empty(len(w), dtype=np.int64)
    for i in np.argsort(-w, kind='stable'):
        b = int(np.argmin(np.where(room > 0, load, np.inf)))
        out[i] = b
        load[b] += w[i]
        room[b] -= 1
    return out
