"""Pure layer math of the transformer: norm, RoPE, FFNs (attention:
mpimoe.model.attention; the KV cache: mpimoe.model.kvcache; the front-end
that wires them: mpimoe.model.frontend).

Everything here is FP32 arithmetic on arrays of one array module (NumPy, or CuPy
through NumPy's dispatch; arrays are created with the module of the input,
mpimoe.backends.backend.array_module).  A batch is *packed*: ``x [T, d]`` holds the new
tokens of several sequences back to back, ``ntok [B]`` of them for sequence
``seqs[b]`` of the KV cache.  Prefill has ``ntok = prompt lengths``; a decode
step has ``ntok = 1`` for every sequence.  Index arrays (``seqs``, ``ntok``,
positions, token ids) are host NumPy arrays on either backend.

Weights are FP32 on the NumPy backend.  On CuPy they stay 16-bit on the device
(mpimoe.backends.backend.Backend.weights): the non-expert matrices are widened to FP32
at each use (:func:`mm32`: same arithmetic as on the CPU), the experts'
matrices go to 16-bit GEMMs (:func:`expert_ffn` states both contracts).
"""

import math

import numpy as np

from mpimoe.backends.backend import round16

__all__ = ['rms_norm', 'rope_tables', 'yarn_mscale', 'yarn_rope', 'apply_rope', 'ffn',
           'expert_ffn', 'mm32', 'mm16', 'as_f32']


def as_f32(w):
    """A weight as FP32: itself when it is already (always on NumPy)."""
    return w.astype(np.float32, copy=False)


def mm32(x, w):
    """x: [n, k] float32 @ w: [k, m] (float32, or 16-bit widened here) -> [n, m] float32."""
    return x @ as_f32(w)


def mm16(x16, w16):
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
    return x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * as_f32(w)


def rope_tables(positions, head_dim, theta, scaling=None):
    """positions: int [T] -> (cos, sin), each float32 [T, head_dim/2].

    scaling: the model's AttentionConfig, or None; with ``rope_scaling ==
    'yarn'`` the frequencies and the cos/sin magnitude of :func:`yarn_rope`.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    magnitude = 1.0
    if scaling is not None and scaling.rope_scaling == 'yarn':
        inv_freq, magnitude = yarn_rope(inv_freq, scaling, head_dim, theta)
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    return ((magnitude * np.cos(angles)).astype(np.float32),
            (magnitude * np.sin(angles)).astype(np.float32))


def yarn_mscale(factor, mscale):
    """YaRN's magnitude correction for a context extended ``factor`` times."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_rope(inv_freq, a, dim, theta):
    """YaRN (as transformers' ``_compute_yarn_parameters``, correction range
    truncated): frequencies that turn fewer than ``yarn_beta_slow`` times over
    the original context are interpolated (divided by ``rope_factor``), those
    that turn more than ``yarn_beta_fast`` times kept, a linear ramp between.

    inv_freq: float64 [dim/2] unscaled; a: AttentionConfig -> (float64
    [dim/2], the cos/sin magnitude)."""
    factor, original = a.rope_factor, a.rope_original_max_position

    def turns_dim(turns):              # the dimension whose frequency turns `turns` times
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(turns_dim(a.yarn_beta_fast)), 0)
    high = min(math.ceil(turns_dim(a.yarn_beta_slow)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / max(high - low, 0.001), 0, 1)
    kept = 1 - ramp
    inv_freq = inv_freq / factor * (1 - kept) + inv_freq * kept
    if a.yarn_mscale and a.yarn_mscale_all_dim:
        magnitude = yarn_mscale(factor, a.yarn_mscale) / yarn_mscale(factor, a.yarn_mscale_all_dim)
    else:
        magnitude = yarn_mscale(factor, 1.0)
    return inv_freq, magnitude


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + head_dim/2) of every head (the Llama/Mixtral layout).

    x: [T, h, head_dim] float32; cos, sin: [T, head_dim/2] -> [T, h, head_dim].
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _gelu(x):
    """GELU, tanh approximation."""
    return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * (x + 0.044715 * x * x * x)))


def _silu(x):
    return x / (1.0 + np.exp(-x))


def ffn(x, w, kind, narrow=None, mm=mm32):
    """Dense MLP or one expert: ``mlp`` = down(gelu(up x)), ``swiglu`` = down(silu(gate x) * up x).

    x: [n, d] float32; w: dict of ``up``/``gate`` [d, h] and ``down`` [h, d]
    (float32, or 16-bit on a GPU backend); narrow: optional function applied to
    the hidden activations (rounding to 16 bits for experts); mm: the matrix
    product (:func:`mm32`: FP32; :func:`mm16`: 16-bit GEMMs).  Returns [n, d].
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
      (cuBLAS), each product *rounded to 16 bits* (:func:`mm16`), so the
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
    mm = mm16 if w['down'].dtype.itemsize == 2 else mm32
    # an overflow here (an expert rank) ends in NaN/Inf logits, which the
    # front-end refuses in one message (FrontEnd.logits); no NumPy warnings
    with np.errstate(over='ignore', invalid='ignore'):
        return narrow(ffn(x16, w, kind, narrow, mm))
