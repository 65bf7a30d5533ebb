"""Pure layer math of the transformer: norm, RoPE, attention with KV cache, FFNs.

Everything here is FP32 arithmetic on arrays of one array module (NumPy, or CuPy
through NumPy's dispatch; arrays are created with the module of the input,
mpimoe.backends.backend.array_module).  A batch is *packed*: ``x [T, d]`` holds the new
tokens of several sequences back to back, ``ntok [B]`` of them for sequence
``seqs[b]`` of the KV cache.  Prefill has ``ntok = prompt lengths``; a decode
step has ``ntok = 1`` for every sequence.  Index arrays (``seqs``, ``ntok``,
positions, token ids) are host NumPy arrays on either backend.

Weights are FP32 on the NumPy backend.  On CuPy they stay 16-bit on the device
(mpimoe.backends.backend.Backend.weights): the non-expert matrices are widened to FP32
at each use (:func:`_mm`: same arithmetic as on the CPU), the experts'
matrices go to 16-bit GEMMs (:func:`expert_ffn` states both contracts).
"""

import math

import numpy as np

from mpimoe.backends.backend import array_module, round16
from mpimoe.errors import DataError

__all__ = ['rms_norm', 'rope_tables', 'apply_rope', 'KVCache', 'attention', 'ffn',
           'expert_ffn', 'FrontEnd']


def _f32(w):
    """A weight as FP32: itself when it is already (always on NumPy)."""
    return w.astype(np.float32, copy=False)


def _mm(x, w):
    """x: [n, k] float32 @ w: [k, m] (float32, or 16-bit widened here) -> [n, m] float32."""
    return x @ _f32(w)


def _mm16(x16, w16):
    """The 16-bit GEMM of the GPU contract: x16 [n, k] (float32 holding 16-bit
    values, or 16-bit) @ w16 [k, m] (16-bit), FP32 accumulation, the product
    rounded to 16 bits (cuBLAS writes it so) -> [n, m] float32.

    On CuPy a 2-D matmul of 16-bit operands: cuBLAS on tensor cores.  On NumPy
    (ml_dtypes) the same values, slowly: for tests of this contract on a CPU.
    """
    y = x16.astype(w16.dtype, copy=False) @ w16
    return y.astype(w16.dtype, copy=False).astype(np.float32)


def rms_norm(x, w, eps):
    """x: [T, d] float32, w: [d] -> [T, d] float32."""
    return x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * _f32(w)


def rope_tables(positions, head_dim, theta):
    """positions: int [T] -> (cos, sin), each float32 [T, head_dim/2]."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + head_dim/2) of every head (the Llama/Mixtral layout).

    x: [T, h, head_dim] float32; cos, sin: [T, head_dim/2] -> [T, h, head_dim].
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


class KVCache:
    """Keys and values of ``B`` sequences for every layer, preallocated.

    Sequence ``b`` owns rows ``[start[b], start[b] + capacity[b])`` of each
    layer's buffers ``k[l], v[l]: float32 [sum(capacity), n_kv_heads, head_dim]``;
    ``length[b]`` rows of it are filled.
    """

    def __init__(self, n_layers, capacity, n_kv_heads, head_dim, xp=np):
        """capacity: int [B] rows per sequence; xp: array module of the buffers
        (the bookkeeping stays in NumPy)."""
        capacity = np.asarray(capacity, dtype=np.int64)
        self.start = np.concatenate([[0], np.cumsum(capacity)[:-1]]).astype(np.int64)
        self.capacity = capacity
        self.length = np.zeros(len(capacity), dtype=np.int64)
        shape = (int(capacity.sum()), n_kv_heads, head_dim)
        self.k = [xp.zeros(shape, np.float32) for _ in range(n_layers)]
        self.v = [xp.zeros(shape, np.float32) for _ in range(n_layers)]

    def positions(self, seqs, ntok):
        """Absolute positions of the next ``ntok[b]`` tokens of ``seqs[b]``: int64 [T]."""
        base = np.repeat(self.length[seqs], ntok)
        first = np.repeat(np.cumsum(ntok) - ntok, ntok)
        return base + np.arange(int(np.sum(ntok))) - first

    def advance(self, seqs, ntok):
        """Mark ``ntok[b]`` more rows of ``seqs[b]`` as filled (after all layers ran)."""
        self.length[seqs] += ntok
        if np.any(self.length[seqs] > self.capacity[seqs]):
            raise ValueError('KV cache overflow: a sequence outgrew its capacity')


def attention(x, w, cfg, cache, layer, seqs, ntok):
    """Causal multi-head attention with GQA and RoPE over a packed batch.

    x: [T, d] float32 (already normed); w: dict with ``wq [d, H*hd]``,
    ``wk, wv [d, KV*hd]``, ``wo [H*hd, d]``; seqs, ntok: int [B] with
    ``sum(ntok) == T``.  Writes the new keys/values into ``cache`` at layer
    ``layer`` (the caller advances the cache after the last layer).
    Returns [T, d] float32.
    """
    xp = array_module(x)
    T = x.shape[0]
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    tables = rope_tables(cache.positions(seqs, ntok), hd, cfg.rope_theta)
    cos, sin = (xp.asarray(t) for t in tables)
    q = apply_rope(_mm(x, w['wq']).reshape(T, H, hd), cos, sin)
    k = apply_rope(_mm(x, w['wk']).reshape(T, KV, hd), cos, sin)
    v = _mm(x, w['wv']).reshape(T, KV, hd)
    out = xp.empty((T, H, hd), dtype=np.float32)
    kbuf, vbuf = cache.k[layer], cache.v[layer]
    scale = np.float32(1.0 / math.sqrt(hd))
    t0 = 0
    # one sequence at a time: its new queries against its whole cache
    for s, n in zip(np.asarray(seqs).tolist(), np.asarray(ntok).tolist()):
        p0, base = int(cache.length[s]), int(cache.start[s])
        kbuf[base + p0:base + p0 + n] = k[t0:t0 + n]
        vbuf[base + p0:base + p0 + n] = v[t0:t0 + n]
        keys, vals = kbuf[base:base + p0 + n], vbuf[base:base + p0 + n]   # [L, KV, hd]
        qs = q[t0:t0 + n].reshape(n, KV, H // KV, hd)                     # [n, KV, G, hd]
        scores = np.einsum('nkgd,lkd->kgnl', qs, keys) * scale            # [KV, G, n, L]
        # query j sits at position p0 + j and sees keys 0 .. p0 + j
        causal = xp.arange(p0 + n)[None, :] > (p0 + xp.arange(n))[:, None]
        scores = xp.where(causal, np.float32(-np.inf), scores)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        out[t0:t0 + n] = np.einsum('kgnl,lkd->nkgd', probs, vals).reshape(n, H, hd)
        t0 += n
    return _mm(out.reshape(T, H * hd), w['wo'])


def _gelu(x):
    """GELU, tanh approximation."""
    return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * (x + 0.044715 * x * x * x)))


def _silu(x):
    return x / (1.0 + np.exp(-x))


def ffn(x, w, kind, narrow=None, mm=_mm):
    """Dense MLP or one expert: ``mlp`` = down(gelu(up x)), ``swiglu`` = down(silu(gate x) * up x).

    x: [n, d] float32; w: dict of ``up``/``gate`` [d, h] and ``down`` [h, d]
    (float32, or 16-bit on a GPU backend); narrow: optional function applied to
    the hidden activations (rounding to 16 bits for experts); mm: the matrix
    product (:func:`_mm`: FP32; :func:`_mm16`: 16-bit GEMMs).  Returns [n, d].
    """
    if kind == 'swiglu':
        hidden = _silu(mm(x, w['gate'])) * mm(x, w['up'])
    else:
        hidden = _gelu(mm(x, w['up']))
    if narrow is not None:
        hidden = narrow(hidden)
    return mm(hidden, w['down'])


def expert_ffn(x16, w, kind, dtype):
    """One expert on the rows it received, with the 16-bit numerics contract:
    inputs arrive as 16-bit values (they crossed the wire), GEMMs accumulate in
    FP32, the hidden activations and the output are rounded to 16 bits.

    x16: [n, d] float32 holding 16-bit-representable values (or, with 16-bit
    weights, the 16-bit dtype) -> [n, d] float32 (16-bit-representable).

    The weights' dtype picks one of two contracts, which differ in one place:

    - FP32 weights (the NumPy backend, the reference): every GEMM product is
      FP32; the activation runs on the FP32 products of the first GEMM(s).
    - 16-bit weights (the CuPy backend): 2-D 16-bit GEMMs, FP32 accumulation
      (cuBLAS), each product *rounded to 16 bits* (:func:`_mm16`), so the
      activation sees the pre-activations rounded (relative error <= u = 2^-8
      for bfloat16, 2^-11 for float16) before it runs in FP32.

    Everything else rounds at the same places (hidden activations, output).
    Between the two, an output element differs at worst by one 16-bit ulp of
    itself (its final rounding) plus, through the down matrix, the
    pre-activation rounding times the activation's slope (|gelu'| <= 1.13,
    |silu'| <= 1.1) and one ulp of each hidden activation:
    ``|dy| <= 2u|y| + |W_down|^T (1.13 u |p| + 2u |hidden|)`` (mlp, p the
    pre-activations; tests/contract.py).  That worst case adds |terms| where
    signs are random; the typical difference is much smaller: the relative L2
    difference of an expert's output is about u (bfloat16: 3.9e-3; measured
    0.94 u to 1.09 u on Gaussian data, d = 64 .. 7168, per row at most 1.25 u
    from d = 1024), the size of one bf16 rounding, where a bug gives O(1).
    Through a model the difference stays that small: the tiny preset's logits
    moved by at most 0.4 u (relative L2) between the two contracts.
    """
    narrow = lambda a: round16(a, dtype)  # noqa: E731
    mm = _mm16 if w['down'].dtype.itemsize == 2 else _mm
    # an overflow here (an expert rank) ends in NaN/Inf logits, which the
    # front-end refuses in one message (FrontEnd.logits); no NumPy warnings
    with np.errstate(over='ignore', invalid='ignore'):
        return narrow(ffn(x16, w, kind, narrow, mm))


class FrontEnd:
    """The non-expert part of the model: embedding, attention, dense FFNs,
    norms, routers and LM head; what a front-end rank holds.

    tensors: dict name -> array, names as in weights/FORMAT.md: float32 (NumPy
    backend) or 16-bit device arrays (CuPy: widened to FP32 at use; the routers,
    small, once here).

    :meth:`logits` refuses NaN or Inf logits (DataError, exit 65: the weights are
    finite, the loader checks, so the model's own numbers overflowed; no rerun
    helps) and names the first stage whose output was not finite: each block
    notes whether its input is finite (a device scalar, no synchronisation),
    and the notes are read only when the logits are not finite.
    """

    def __init__(self, cfg, tensors):
        self.cfg = cfg
        self.t = tensors
        self.layer = [{name: tensors[f'layers/{i}/{name}'] for name in
                       ('attn_norm', 'wq', 'wk', 'wv', 'wo', 'ffn_norm')}
                      for i in range(cfg.n_layers)]
        self.dense = {i: {m: tensors[f'layers/{i}/mlp/{m}'] for m in cfg.expert_matrices}
                      for i in range(cfg.n_dense_layers)}
        self.router = {i: _f32(tensors[f'layers/{i}/router']) for i in cfg.moe_layers}
        self.xp = array_module(tensors['embed'])
        self._finite = []       # this pass: (stage number, all finite? device bool)

    def new_cache(self, capacity):
        """A KV cache for sequences of the given capacities (prompt + new tokens)."""
        return KVCache(self.cfg.n_layers, capacity, self.cfg.n_kv_heads, self.cfg.head_dim,
                       self.xp)

    def embed(self, tokens):
        """tokens: int [T] (host) -> x: float32 [T, d]."""
        return _f32(self.t['embed'][self.xp.asarray(tokens)])

    def _note(self, stage, x):
        """Keep whether ``x``, the output of stage number ``stage`` (see
        :meth:`_stage_name`), is finite, for the message of :meth:`logits`."""
        self._finite.append((stage, self.xp.isfinite(x).all()))

    def _stage_name(self, stage):
        """Stage 0 is the embedding, 2i+1 the attention of layer i, 2i+2 its FFN."""
        if stage == 0:
            return 'the embedding'
        i, part = divmod(stage - 1, 2)
        kind = 'attention' if part == 0 else 'dense MLP' if i < self.cfg.n_dense_layers \
            else 'MoE FFN'
        return f'the {kind} of layer {i}'

    def _check_finite(self, logits):
        """DataError when logits [n, vocab] hold NaN or Inf; clears the notes."""
        notes, self._finite = self._finite, []
        if bool(self.xp.isfinite(logits).all()):
            return
        bad = [stage for stage, finite in notes if not bool(finite)]
        where = self._stage_name(min(bad)) if bad else 'the final norm and LM head'
        raise DataError(f'the logits are NaN or Inf: the activations were first non-finite '
                        f'after {where} (the weights are finite, so the numbers overflowed '
                        f'FP32, or {self.cfg.dtype} on the wire); check or reconvert the weights')

    def attention_block(self, i, x, cache, seqs, ntok):
        """Residual attention block of layer i: x + attn(norm(x)); x: [T, d]."""
        self._note(2 * i, x)
        w = self.layer[i]
        return x + attention(rms_norm(x, w['attn_norm'], self.cfg.norm_eps), w, self.cfg,
                             cache, i, seqs, ntok)

    def ffn_input(self, i, x):
        """The normed input of layer i's FFN: [T, d]."""
        self._note(2 * i + 1, x)
        return rms_norm(x, self.layer[i]['ffn_norm'], self.cfg.norm_eps)

    def dense_ffn(self, i, h):
        """Dense MLP of layer i (i < n_dense_layers): [T, d] -> [T, d]."""
        return ffn(h, self.dense[i], self.cfg.expert_kind)

    def logits(self, x):
        """Final norm and LM head: x [n, d] -> float32 [n, vocab]; DataError
        when they are not finite, naming the stage where that began."""
        self._note(2 * self.cfg.n_layers, x)
        out = _mm(rms_norm(x, self.t['final_norm'], self.cfg.norm_eps), self.t['lm_head'])
        self._check_finite(out)
        return out
