"""The one layer loop: a forward pass of the whole model over a packed batch,
for the reference, the engine's front-ends and ``mpimoe bench``.

The batch (``tokens`` [T] of sequences ``seqs`` with ``ntok`` new tokens
each) is cut into micro-batches of consecutive sequences.  Each micro-batch
walks the layers as a generator (:func:`_micro_batch`) that pauses once per
layer, after its FFN stage, and the pass runs them in turn, in micro-batch
order: at an MoE layer micro-batch m dispatches its rows and pauses, so m's
rows travel (and its experts compute) while m+1 computes; m's result is
combined just before m's next attention block.  A layer's shared experts
(if any) run on the front-end right after its routed rows are sent.  In a
tensor-parallel group the sum over the group of m's dense MLP or shared
experts travels over the pause too; its attention's sum is waited for in
place: a pause there would hold m's dispatch behind m+1's combine and
attention, so that with the experts as fast as the front-end a layer of M
micro-batches would take M+1 attention times instead of M.  With the local
dispatcher and one micro-batch this is the plain sequential model.
"""

import numpy as np

from mpimoe.backends.backend import to_numpy
from mpimoe.moe.layer import NoTimers

__all__ = ['forward', 'micro_batches']

_DONE = object()


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
    mbs = [(0, len(ntok))] if mbs is None else mbs
    bounds = np.concatenate([[0], np.cumsum(ntok)]).astype(np.int64)
    xs = [front.embed(tokens[bounds[a]:bounds[b]]) for a, b in mbs]
    # cache rows, RoPE tables and attention groups: once per pass, for every layer
    where = [front.place(cache, seqs[a:b], ntok[a:b]) if a < b else None for a, b in mbs]
    runs = [_micro_batch(front, moe, xs, m, cache, where[m], timers.span, poll)
            for m in range(len(mbs))]
    while runs:                 # in turn, in micro-batch order, to each one's next pause
        runs = [run for run in runs if next(run, _DONE) is not _DONE]
    cache.advance(seqs, ntok)
    x = front.xp.concatenate(xs)                    # mbs holds at least one range
    with timers.span('head', 'compute'):
        return to_numpy(front.logits(x[front.xp.asarray(bounds[1:] - 1)]))


def _micro_batch(front, moe, xs, m, cache, where, span, poll):
    """Micro-batch m's way through the layers, from xs[m] [T_m, d] to its
    output, left in xs[m]; where: its Placement, None for an empty one.

    A generator: it pauses (yields) after the FFN stage of every layer, once
    its MoE rows, or a TP group's sum of its dense or shared experts, are on
    their way.  Every micro-batch pauses as often, an empty one included (it
    only posts its MoE collectives), so that all post their collectives in
    micro-batch order on every rank.
    """
    poll = poll or (lambda: None)
    x, handle = xs[m], None
    for i in range(front.cfg.n_layers):
        if handle is not None:
            x = moe[handle.layer].combine(handle, x)
            handle = None
        if where is None:
            if i in moe:
                handle = moe[i].dispatch_empty(m)
            yield
            continue
        with span('attention', 'compute', layer=i, mb=m):
            x = x + front.attention_out(i, x, cache, where).wait()
            h = front.ffn_input(i, x)
        if i in moe:
            handle = moe[i].dispatch(h, m)
            stage, out = 'shared', None
            if front.shared:      # they compute while the routed rows travel
                with span('shared', 'compute', layer=i, mb=m):
                    out = front.shared_ffn(i, h)
        else:
            stage = 'dense'
            with span('dense', 'compute', layer=i, mb=m):
                out = front.dense_ffn(i, h)
        poll()
        yield
        if out is not None:
            with span(stage, 'compute', layer=i, mb=m):
                x = x + out.wait()
    if handle is not None:
        x = moe[handle.layer].combine(handle, x)
    xs[m] = x


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
