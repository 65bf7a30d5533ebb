"""The MoE layer's stages that do not communicate: **permute**, **expert**,
**unpermute**; used by the MoE layer (mpimoe.moe.layer) on every path.

The distributed engine runs the same functions with **dispatch** and
**combine** (mpimoe.parallel.slots) between them, so both paths do the same
arithmetic in the same order.

Arrays are NumPy or CuPy (one module per call, mpimoe.backends.backend.array_module):
on CuPy every stage runs on the device, with no loop over tokens and no copy
of rows to the host; only the row counts per key come back (one copy per
layer and micro-batch: MPI needs them), to size the transfers and slice the
rows of each expert's GEMMs.
"""

import numpy as np

from mpimoe.backends.backend import array_module, to_numpy
from mpimoe.model.layers import expert_ffn
from mpimoe.moe.router import key_counts

__all__ = ['permute', 'unpermute', 'run_experts']


def permute(x16, key, n_keys, out=None):
    """Sort the token copies by ``key`` (destination, then expert).

    x16: [T, d] (FP32 values or 16-bit words); key: int [T, k], each in
    [0, n_keys); out: optional [T*k, d] array to gather into (a send buffer).
    Returns (rows [T*k, d] grouped by key, order int64 [T*k]: the flat copy
    index ``t*k + j`` of each row, counts int64 [n_keys]: rows per key).
    """
    k = key.shape[1]
    flat = np.ravel(key)
    order = np.argsort(flat, kind='stable')
    rows = np.take(x16, order // k, axis=0, out=out)
    return rows, order, key_counts(flat, n_keys, order)


def unpermute(y, order, weights):
    """Inverse of :func:`permute` plus the weighted sum over the k copies.

    y: [T*k, d] in permuted order, float32 or 16-bit (widened after the
    gather, which then moves half the bytes); order: int64 [T*k]; weights:
    float32 [T, k].  Returns float32 [T, d] = sum_j weights[t, j] * y[copy(t, j)],
    summed in slot order j = 0, 1, ...
    """
    T, k = weights.shape
    where = np.empty_like(order)                  # [T*k]: row of y holding copy t*k + j
    where[order] = array_module(order).arange(len(order))
    slots = y[where].astype(np.float32, copy=False).reshape(T, k, y.shape[1])
    out = weights[:, 0, None] * slots[:, 0]
    for j in range(1, k):
        out += weights[:, j, None] * slots[:, j]
    return out


def run_experts(rows, counts, experts, kind, dtype, poll=None, chunk=None):
    """Stage **expert**: each expert on its contiguous block of rows.

    rows: [n, d] grouped by expert, float32 (16-bit values) or, on a GPU,
    the 16-bit dtype; counts: int [len(experts)] rows per expert (sum n;
    host or device); experts: list of weight dicts.  With ``chunk``, each
    block is computed ``chunk`` rows at a time and ``poll()`` is called
    between pieces (to progress MPI transfers in flight).  Returns [n, d]
    of rows' dtype (mpimoe.model.layers.expert_ffn).
    """
    out = np.empty_like(rows)
    start = 0
    for w, c in zip(experts, to_numpy(counts).tolist()):
        step = chunk or max(c, 1)
        for a in range(start, start + c, step):
            b = min(a + step, start + c)
            out[a:b] = expert_ffn(rows[a:b], w, kind, dtype)
            if poll is not None:
                poll()
        start += c
    return out
