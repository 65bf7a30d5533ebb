"""The one layer loop: a forward pass of the whole model over a packed batch,
for the reference, the engine's front-ends and ``mpimoe bench``.

The batch (``tokens`` [T] of sequences ``seqs`` with ``ntok`` new tokens
each) is cut into micro-batches of consecutive sequences.  The loop walks
layer by layer and, within a layer, micro-batch by micro-batch: at an MoE
layer it dispatches micro-batch m and moves on to m+1, so m's rows travel
(and its experts compute) while m+1 computes; m's result is combined just
before m's next attention block.  A layer's shared experts (if any) run
on the front-end right after its routed rows are sent.  With the local dispatcher and one
micro-batch this is the plain sequential model.
"""

import numpy as np

from mpimoe.backends.backend import to_numpy
from mpimoe.moe.layer import NoTimers

__all__ = ['forward', 'micro_batches']


def forward(front, moe, tokens, cache, seqs, ntok, mbs=None, timers=None, poll=None):
    """One pass of the model.

    front: mpimoe.model.frontend.FrontEnd; moe: MoE layer index ->
    mpimoe.moe.layer.MoELayer; tokens: int [T] (host); seqs, ntok: int [B]
    (host; cache handles and new tokens of each); mbs: list of (a, b) ranges
    of sequences (default: one micro-batch), the same count on every
    front-end; poll(): called after each stage (progresses transfers).
    Advances the cache.  Returns logits float32 [B, V] (host) at each
    sequence's last new token.
    """
    timers = timers or NoTimers()
    span = timers.span
    mbs = [(0, len(ntok))] if mbs is None else mbs
    bounds = np.concatenate([[0], np.cumsum(ntok)]).astype(np.int64)
    xs = [front.embed(tokens[bounds[a]:bounds[b]]) for a, b in mbs]
    # cache rows, RoPE tables and attention groups: once per pass, for every layer
    where = [front.place(cache, seqs[a:b], ntok[a:b]) if a < b else None for a, b in mbs]
    pending = [None] * len(mbs)                 # per micro-batch: its MoEHandle in flight
    for i in range(front.cfg.n_layers):
        for m, (a, b) in enumerate(mbs):
            if pending[m] is not None:
                xs[m] = moe[pending[m].layer].combine(pending[m], xs[m])
                pending[m] = None
            if a == b:                # an empty micro-batch only posts its collectives
                if i in moe:
                    pending[m] = moe[i].dispatch_empty(m)
                continue
            with span('attention', 'compute', layer=i, mb=m):
                xs[m] = front.attention_block(i, xs[m], cache, where[m])
                h = front.ffn_input(i, xs[m])
            if i in moe:
                pending[m] = moe[i].dispatch(h, m)
                if front.shared:      # they compute while the routed rows travel
                    with span('shared', 'compute', layer=i, mb=m):
                        xs[m] = xs[m] + front.shared_ffn(i, h)
            else:
                with span('dense', 'compute', layer=i, mb=m):
                    xs[m] = xs[m] + front.dense_ffn(i, h)
            if poll is not None:
                poll()
    for m, handle in enumerate(pending):
        if handle is not None:
            xs[m] = moe[handle.layer].combine(handle, xs[m])
    cache.advance(seqs, ntok)
    x = front.xp.concatenate(xs)                    # mbs holds at least one range
    with span('head', 'compute'):
        return to_numpy(front.logits(x[front.xp.asarray(bounds[1:] - 1)]))


def micro_batches(ntok, m, min_tokens=1):
    """Split B sequences into consecutive groups of about equal tokens: m, or
    fewer when the pass has under ``min_tokens`` tokens per group (at least one).

    ntok: int [B] -> list of exactly m (a, b) ranges, the unused ones empty at
    the end, so every front-end posts the same number of collectives per layer.
    """
    cum = np.concatenate([[0], np.cumsum(ntok)])
    k = int(max(1, min(m, cum[-1] // min_tokens)))
    targets = cum[-1] * np.arange(1, k) / k
    cuts = np.searchsorted(cum, targets, side='left').clip(0, len(ntok))
    edges = np.concatenate([[0], cuts, [len(ntok)] * (m - k + 1)]).astype(int)
    edges = np.maximum.accumulate(edges)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
