"""Causal multi-head attention over a packed batch, through the block KV cache
(mpimoe.model.kvcache): grouped-query attention (with the q/k/v biases of
Qwen2-MoE, the QK-norm of Qwen3-MoE and OLMoE) or DeepSeek's multi-head
latent attention (MLA, in its absorbed form: :func:`_mla_qkv`), with RoPE,
optionally YaRN-scaled (mpimoe.model.layers.rope_tables).

A batch is packed as in mpimoe.model.layers: ``x [T, d]`` holds the new
tokens of sequences ``seqs`` (cache handles) back to back, ``ntok[b]`` of them
for ``seqs[b]``.  Where they go in the cache, their RoPE tables and their
groups (below) are the same for every layer: a :class:`Placement` holds them,
computed once per pass.  The new keys and values go into the cache with one
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
``float32 [B, H, n, L]``, once (masking and softmax run in place); at most 4
times what the group's sequences need unpadded.

**Numerics.**  The same FP32 arithmetic as a per-sequence loop (projections,
RoPE, scores, masked softmax, weighted sum), except that keys and values (MLA:
latents and RoPE keys) are rounded to 16 bits (``cfg.dtype``) in the cache and widened to FP32 when
read; prefill queries read them from the cache like decode queries, and the
reference model uses the same cache, so the reference and the engine round
alike.  Masked scores are ``-inf`` and add ``exp(-inf) = 0`` exactly to the
softmax sums; padded keys hold zeros or the sequence's own values, so they
add exact zeros to the weighted sum.  A sequence's result therefore depends
on its companions only through the FP32 summation order (the padded length
changes how NumPy's pairwise sums and the BLAS kernels group the same
terms): a few FP32 ulps of the sums' magnitudes.  MLA's absorbed form
multiplies the same matrices in another association than transformers'
expanded keys and values (``(q W_uk^T) c`` for ``q (W_uk^T c)``): again FP32
rounding only.

On CuPy everything stays on the device (the array module is the input's,
mpimoe.backends.backend.array_module); index arrays are built on the host and
moved with ``xp.asarray``; the gathered 16-bit keys and values are widened to
FP32 before the batched matmuls of the scores and weighted sums.  MLA's
absorbed products read ``wkv_b`` as stored, head by head, through mm32 (on a
GPU a strided-batched 16-bit GEMM with FP32 output).
"""

import math

import numpy as np

from mpimoe.backends.backend import array_module
from mpimoe.model.layers import apply_rope, as_f32, mm32, rms_norm, rope_tables, yarn_mscale

__all__ = ['Placement', 'attention']


class Placement:
    """Where a micro-batch's new tokens go in the KV cache, and what every
    layer of one pass needs of them, computed once per pass: for the next
    ``ntok[b]`` tokens of ``seqs[b]`` (int [B], host) in ``cache`` for model
    ``cfg`` (ValueError, before anything is written, when they overflow a
    sequence's reservation).  ``blocks``, ``offsets`` int [T] (on the
    cache's array module); ``cos``, ``sin`` float32 [T, rope_dim/2] (on
    the array module: the RoPE tables, built and moved once, not per layer);
    ``groups``: per group of sequences attended together, (its rows of
    ``seqs``, their first row in the batch, their new tokens), int [b] each
    (host).
    """

    def __init__(self, cache, cfg, seqs, ntok):
        xp = cache.xp
        seqs, ntok = np.asarray(seqs, np.int64), np.asarray(ntok, np.int64)
        pos, blocks, offsets = cache.locate(seqs, ntok)                          # [T] each
        self.blocks, self.offsets = xp.asarray(blocks), xp.asarray(offsets)
        self.cos, self.sin = (xp.asarray(t) for t in rope_tables(pos, cfg.rope_dim,
                                                                 cfg.rope_theta, cfg.attention))
        first = np.cumsum(ntok) - ntok                                           # [B]
        live = ntok > 0
        group = _buckets(ntok, cache.length[seqs] + ntok)                        # [B]
        self.groups = [(seqs[rows], first[rows], ntok[rows])
                       for rows in (live & (group == g) for g in np.unique(group[live]))]


def attention(x, w, cfg, cache, layer, where, sum_squares=None):
    """x: [T, d] float32 (already normed); w: the layer's tensors
    (mpimoe.checkpoint.layout: GQA ``wq [d, H*hd]``, ``wk, wv [d, KV*hd]``,
    ``wo [H*hd, d]``, optional biases and QK-norm gains; MLA: see
    :func:`_mla_qkv`); cache: a :class:`~mpimoe.model.kvcache.BlockKVCache`
    of ``cfg``; where: the pass's :class:`Placement` of these T tokens.  Writes
    the new keys/values into ``cache`` at layer ``layer`` (the caller advances
    the cache after the last layer).  Returns [T, d] float32.

    sum_squares: for a rank holding a slice of the heads (mpimoe.model.tp_frontend),
    a function summing [T, 2] partial sums (of squares, of columns) over its group, so that
    a QK-norm over all heads (``qk_norm == 'full'``) normalises by the whole
    query's and key's RMS; None: the heads are all here.
    """
    xp = array_module(x)
    if cfg.attention.mla:
        q, latent = _mla_qkv(x, w, cfg, where.cos, where.sin)
        cache.write(layer, where.blocks, where.offsets, latent)
        n_kv, v_width = 1, cfg.attention.kv_lora_rank
    else:
        q, k, v = _gqa_qkv(x, w, cfg, where.cos, where.sin, sum_squares)
        cache.write(layer, where.blocks, where.offsets, k, v)
        n_kv, v_width = cfg.n_kv_heads, cfg.head_dim
    out = xp.empty((x.shape[0], cfg.n_heads, v_width), dtype=np.float32)
    for seqs, first, ntok in where.groups:
        _attend(q, out, cache, layer, seqs, first, ntok, n_kv, softmax_scale(cfg), v_width)
    if cfg.attention.mla:
        out = _mla_values(out, w, cfg)
    return mm32(out.reshape(x.shape[0], -1), w['wo'])


def softmax_scale(cfg):
    """The scale of the attention scores: 1/sqrt(query-key width), times
    YaRN's ``mscale(factor, yarn_mscale_all_dim)**2`` where set (DeepSeek-V3)."""
    a = cfg.attention
    scale = 1.0 / math.sqrt(cfg.head_dim)
    if a.rope_scaling == 'yarn' and a.yarn_mscale_all_dim:
        scale *= yarn_mscale(a.rope_factor, a.yarn_mscale_all_dim) ** 2
    return np.float32(scale)


def _gqa_qkv(x, w, cfg, cos, sin, sum_squares=None):
    """Queries [T, H, hd], keys and values [T, KV, hd] (float32): projections,
    biases, QK-norm (over each head, or over all heads of q and of k: of the
    group's heads with ``sum_squares``, see :func:`attention`), RoPE."""
    T, a, eps = x.shape[0], cfg.attention, cfg.norm_eps
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q, k, v = mm32(x, w['wq']), mm32(x, w['wk']), mm32(x, w['wv'])
    if a.qkv_bias:
        q, k, v = q + as_f32(w['bq']), k + as_f32(w['bk']), v + as_f32(w['bv'])
    if a.qk_norm == 'full' and sum_squares is None:
        q, k = rms_norm(q, w['q_norm'], eps), rms_norm(k, w['k_norm'], eps)
    elif a.qk_norm == 'full':
        q, k = (_group_rms_norm(t, w[n], eps, sum_squares) for t, n in ((q, 'q_norm'),
                                                                       (k, 'k_norm')))
    q, k, v = q.reshape(T, H, hd), k.reshape(T, KV, hd), v.reshape(T, KV, hd)
    if a.qk_norm == 'head':
        q, k = rms_norm(q, w['q_norm'], eps), rms_norm(k, w['k_norm'], eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _group_rms_norm(x, w, eps, sum_squares):
    """RMSNorm of rows split over a group: x [T, c] this rank's columns, w [c]
    their gains; the mean of squares is over every rank's columns:
    ``sum_squares`` adds up [T, 2] (sums of squares, columns) over the group."""
    xp = array_module(x)
    mine = xp.concatenate([xp.sum(x * x, axis=-1, keepdims=True),
                           xp.full((x.shape[0], 1), x.shape[1], np.float32)], axis=1)
    total = sum_squares(mine)                                               # [T, 2]
    return x * (1.0 / xp.sqrt(total[:, :1] / total[:, 1:] + eps)) * as_f32(w)


def _mla_qkv(x, w, cfg, cos, sin):
    """Multi-head latent attention, absorbed: (queries [T, H, r + rope],
    latent [T, 1, r + rope]), float32, whose dot products are the scores.

    A query head is ``[nope | rope]``; the key of head h is ``[c @ Wuk_h |
    k_rope]`` with c = norm(x @ wkv_a[:, :r]) the latent (width r =
    kv_lora_rank), k_rope = rope(x @ wkv_a[:, r:]) shared by the heads, and
    Wuk_h [r, nope] the key part of head h's columns of ``wkv_b [r, H*(nope
    + v)]``.  So ``q . k = (q_nope @ Wuk_h^T) . c + q_rope . k_rope``: the
    query absorbs Wuk_h and the cache holds only ``[c | k_rope]``.
    """
    a, eps, H = cfg.attention, cfg.norm_eps, cfg.n_heads
    T, r, nope = x.shape[0], a.kv_lora_rank, a.qk_nope_head_dim
    if a.q_lora_rank:
        q = mm32(rms_norm(mm32(x, w['wq_a']), w['q_a_norm'], eps), w['wq_b'])
    else:
        q = mm32(x, w['wq'])
    q = q.reshape(T, H, cfg.head_dim)
    kv = mm32(x, w['wkv_a'])                                                # [T, r + rope]
    latent = rms_norm(kv[:, :r], w['kv_a_norm'], eps)
    k_rope = apply_rope(kv[:, None, r:], cos, sin)                          # [T, 1, rope]
    w_uk = _wkv_b(w, cfg)[:, :, :nope]                                      # [H, r, nope]
    q_latent = mm32(q[:, :, :nope].transpose(1, 0, 2), w_uk.transpose(0, 2, 1)).transpose(1, 0, 2)
    xp = array_module(x)
    queries = xp.concatenate([q_latent, apply_rope(q[:, :, nope:], cos, sin)], axis=-1)
    return queries, xp.concatenate([latent[:, None], k_rope], axis=-1)


def _mla_values(o, w, cfg):
    """The heads' values from their attention over the latents: o [T, H, r]
    (weights times latents) @ Wuv_h [r, v] -> [T, H, v] float32."""
    w_uv = _wkv_b(w, cfg)[:, :, cfg.attention.qk_nope_head_dim:]            # [H, r, v]
    return mm32(o.transpose(1, 0, 2), w_uv).transpose(1, 0, 2)


def _wkv_b(w, cfg):
    """wkv_b [r, H*(nope+v)] viewed as [H, r, nope + v] (no copy: mm32 reads
    each head's columns where they are)."""
    a = cfg.attention
    return w['wkv_b'].reshape(a.kv_lora_rank, cfg.n_heads, -1).transpose(1, 0, 2)


def _buckets(ntok, keys):
    """The group of each sequence: int [B] from the power-of-two buckets of its
    new tokens ``ntok`` [B] (1: decode, a group of its own) and of its
    ``keys`` [B] (context after the step)."""
    log2 = lambda a: np.ceil(np.log2(np.maximum(a, 1))).astype(np.int64)  # noqa: E731
    return log2(ntok) * 64 + log2(keys)


def _attend(q, out, cache, layer, seqs, first, ntok, KV, scale, v_width):
    """One group: the queries of ``seqs`` [B] (their ``ntok[b]`` new tokens at
    rows ``first[b]..`` of q [T, H, hd]) against their cached keys and values
    (the new ones written; without value pools the first ``v_width`` columns
    of the keys: MLA's latents); writes those rows of out [T, H, v_width]."""
    xp = array_module(q)
    B, n = len(seqs), int(ntok.max())
    _, H, hd = q.shape
    G = H // KV                         # query heads per KV head, in consecutive groups
    j = np.minimum(np.arange(n)[None, :], ntok[:, None] - 1)   # [B, n] padding repeats the last
    qpos = cache.length[seqs][:, None] + j                                   # [B, n]
    keys, vals = cache.gather(layer, seqs, int(qpos.max()) + 1)             # [B, KV, L, hd]
    vals = keys[..., :v_width] if vals is None else vals                    # [B, KV, L, dv]
    L = keys.shape[2]
    qs = q[xp.asarray(first[:, None] + j)]                                  # [B, n, H, hd]
    qs = qs.reshape(B, n, KV, G, hd).transpose(0, 2, 3, 1, 4).reshape(B, KV, G * n, hd)
    scores = (qs @ keys.transpose(0, 1, 3, 2)).reshape(B, KV, G, n, L)
    scores *= scale
    # query j of sequence b sits at position qpos[b, j] and sees keys 0 .. qpos[b, j]
    visible = xp.arange(L)[None, None, :] <= xp.asarray(qpos)[:, :, None]   # [B, n, L]
    xp.copyto(scores, np.float32(-np.inf), where=~visible[:, None, None])      # in place
    scores -= scores.max(axis=-1, keepdims=True)
    xp.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    o = scores.reshape(B, KV, G * n, L) @ vals                              # [B, KV, G*n, dv]
    o = o.reshape(B, KV, G, n, v_width).transpose(0, 3, 1, 2, 4).reshape(B * n, H, v_width)
    real = np.flatnonzero(np.arange(n)[None, :] < ntok[:, None])            # [T_group]
    out[xp.asarray((first[:, None] + j).ravel()[real])] = o[xp.asarray(real)]
