"""Causal multi-head attention with GQA and RoPE over a packed batch, through
the block KV cache (mpimoe.model.kvcache).

A batch is packed as in mpimoe.model.layers: ``x [T, d]`` holds the new
tokens of sequences ``seqs`` (cache handles) back to back, ``ntok[b]`` of them
for ``seqs[b]``.  The new keys and values go into the cache with one
fancy-indexed assignment (block, offset per token); then the sequences are
attended in groups, without a loop over sequences or tokens.  A group holds
the sequences whose new tokens ``n`` and whose keys ``L`` (context after this
step) fall in the same power-of-two bucket, decode rows (``n = 1``) apart:
its queries are padded to its longest ``n`` (padding rows repeat the last
query and are dropped), its keys gathered through the block tables into
``[B, KV, L, hd]``, L its longest context rounded up to whole blocks.

So a decode query is never padded to a long prompt, nor a short context to
a long one: padding at most doubles a sequence's ``n`` and ``L``.  Peak
memory is one group's: its gathered keys and values, ``float32 [B, KV, L,
hd]`` each (4 bytes per element where the cache holds 2), and its scores,
``float32 [B, H, n, L]``, once (masking and softmax run in place); at most 4 times what the group's sequences need unpadded.

**Numerics.**  The same FP32 arithmetic as a per-sequence loop (projections,
RoPE, scores, masked softmax, weighted sum), except that keys and values are
rounded to 16 bits (``cfg.dtype``) in the cache and widened to FP32 when
read; prefill queries read them from the cache like decode queries, and the
reference model uses the same cache, so the reference and the engine round
alike.  Masked scores are ``-inf`` and add ``exp(-inf) = 0`` exactly to the
softmax sums; padded keys hold zeros or the sequence's own values, so they
add exact zeros to the weighted sum.  A sequence's result therefore depends
on its companions only through the FP32 summation order (the padded length
changes how NumPy's pairwise sums and the BLAS kernels group the same
terms): a few FP32 ulps of the sums' magnitudes.

On CuPy everything stays on the device (the array module is the input's,
mpimoe.backends.backend.array_module); index arrays are built on the host and
moved with ``xp.asarray``; the gathered 16-bit keys and values are widened to
FP32 before the batched matmuls (no 16-bit batched GEMM).
"""

import math

import numpy as np

from mpimoe.backends.backend import array_module
from mpimoe.model.layers import mm32, apply_rope, rope_tables

__all__ = ['attention']


def attention(x, w, cfg, cache, layer, seqs, ntok):
    """x: [T, d] float32 (already normed); w: dict with ``wq [d, H*hd]``,
    ``wk, wv [d, KV*hd]``, ``wo [H*hd, d]``; cache: a
    :class:`~mpimoe.model.kvcache.BlockKVCache`; seqs, ntok: int [B] (host)
    with ``sum(ntok) == T``.  Writes the new keys/values into ``cache`` at
    layer ``layer`` (the caller advances the cache after the last layer);
    ValueError, before writing, when they overflow a sequence's reservation.
    Returns [T, d] float32.
    """
    xp = array_module(x)
    T = x.shape[0]
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    seqs, ntok = np.asarray(seqs, np.int64), np.asarray(ntok, np.int64)
    pos, blocks, offsets = cache.locate(seqs, ntok)                         # [T] each
    cos, sin = (xp.asarray(t) for t in rope_tables(pos, hd, cfg.rope_theta))
    q = apply_rope(mm32(x, w['wq']).reshape(T, H, hd), cos, sin)
    k = apply_rope(mm32(x, w['wk']).reshape(T, KV, hd), cos, sin)
    v = mm32(x, w['wv']).reshape(T, KV, hd)
    cache.write(layer, blocks, offsets, k, v)
    out = xp.empty((T, H, hd), dtype=np.float32)
    first = np.cumsum(ntok) - ntok                                          # [B]
    live = ntok > 0
    group = _buckets(ntok, cache.length[seqs] + ntok)                       # [B]
    for g in np.unique(group[live]):
        rows = live & (group == g)
        _attend(q, out, cache, layer, seqs[rows], first[rows], ntok[rows], KV)
    return mm32(out.reshape(T, H * hd), w['wo'])


def _buckets(ntok, keys):
    """The group of each sequence: int [B] from the power-of-two buckets of its
    new tokens ``ntok`` [B] (1: decode, a group of its own) and of its
    ``keys`` [B] (context after the step)."""
    log2 = lambda a: np.ceil(np.log2(np.maximum(a, 1))).astype(np.int64)  # noqa: E731
    return log2(ntok) * 64 + log2(keys)


def _attend(q, out, cache, layer, seqs, first, ntok, KV):
    """One group: the queries of ``seqs`` [B] (their ``ntok[b]`` new tokens at
    rows ``first[b]..`` of q [T, H, hd]) against their cached keys and values
    (the new ones written); writes those rows of out [T, H, hd]."""
    xp = array_module(q)
    B, n = len(seqs), int(ntok.max())
    _, H, hd = q.shape
    G = H // KV                         # query heads per KV head, in consecutive groups
    j = np.minimum(np.arange(n)[None, :], ntok[:, None] - 1)   # [B, n] padding repeats the last
    qpos = cache.length[seqs][:, None] + j                                   # [B, n]
    keys, vals = cache.gather(layer, seqs, int(qpos.max()) + 1)             # [B, KV, L, hd]
    L = keys.shape[2]
    qs = q[xp.asarray(first[:, None] + j)]                                  # [B, n, H, hd]
    qs = qs.reshape(B, n, KV, G, hd).transpose(0, 2, 3, 1, 4).reshape(B, KV, G * n, hd)
    scores = (qs @ keys.transpose(0, 1, 3, 2)).reshape(B, KV, G, n, L)
    scores *= np.float32(1.0 / math.sqrt(hd))
    # query j of sequence b sits at position qpos[b, j] and sees keys 0 .. qpos[b, j]
    visible = xp.arange(L)[None, None, :] <= xp.asarray(qpos)[:, :, None]   # [B, n, L]
    xp.copyto(scores, np.float32(-np.inf), where=~visible[:, None, None])      # in place
    scores -= scores.max(axis=-1, keepdims=True)
    xp.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    o = scores.reshape(B, KV, G * n, L) @ vals                              # [B, KV, G*n, hd]
    o = o.reshape(B, KV, G, n, hd).transpose(0, 3, 1, 2, 4).reshape(B * n, H, hd)
    real = np.flatnonzero(np.arange(n)[None, :] < ntok[:, None])            # [T_group]
    out[xp.asarray((first[:, None] + j).ravel()[real])] = o[xp.asarray(real)]
