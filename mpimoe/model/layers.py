"""Pure layer math of the transformer: norm, RoPE, FFNs (attention:
mpimoe.model.attention; the KV cache: mpimoe.model.kvcache; the front-end
that wires them: mpimoe.model.frontend).

Everything here is FP32 arithmetic (but the 16-bit GEMM products stated
below) on arrays of one array module (NumPy, or CuPy
through NumPy's dispatch; arrays are created with the module of the input,
mpimoe.backends.backend.array_module).  A batch is *packed*: ``x [T, d]`` holds the new
tokens of several sequences back to back, ``ntok [B]`` of them for sequence
``seqs[b]`` of the KV cache.  Prefill has ``ntok = prompt lengths``; a decode
step has ``ntok = 1`` for every sequence.  Index arrays (``seqs``, ``ntok``,
positions, token ids) are host NumPy arrays on either backend.

Weights are FP32 on the NumPy backend.  On CuPy they stay 16-bit on the device
(mpimoe.backends.backend.Backend.weights) and every GEMM reads them so: the
front-end's products (:func:`mm32`) round their input activations to 16 bits
and accumulate and write FP32; the experts' (:func:`mm16`) write their
products in 16 bits (:func:`expert_ffn` states both contracts).  Given
16-bit weights, NumPy computes the same values (slowly): the CPU model of
the GPU contract, for tests and benchmarks/numerics.py.
"""

import functools
import math

import numpy as np

from mpimoe.backends.backend import array_module, round16
from mpimoe.backends.cublas import gemm_f32

__all__ = ['rms_norm', 'rope_tables', 'yarn_mscale', 'yarn_rope', 'apply_rope', 'ffn',
           'expert_ffn', 'activate16', 'ACTIVATION_KERNELS', 'mm32', 'mm16', 'as_f32']


def as_f32(w):
    """A weight as FP32: itself when it is already (always on NumPy)."""
    return w.astype(np.float32, copy=False)


def mm32(x, w):
    """The front-end's product, FP32 out: x [n, k] float32 @ w [k, m] -> [n, m]
    float32, or a batch of them (x [B, n, k] @ w [B, k, m], MLA's products per
    head: w any view of a weight, mpimoe.backends.cublas.gemm_f32).

    FP32 ``w`` (the NumPy backend): an FP32 GEMM.  16-bit ``w`` (the CuPy
    backend): ``x`` rounded to w's dtype, a 16-bit GEMM with FP32
    accumulation and output (mpimoe.backends.cublas.gemm_f32: tensor cores,
    w read as stored).  Against the FP32 GEMM an output differs by the
    rounding of the inputs, at most ``u sum_i |x_i w_i|`` (u = 2^-8 for
    bfloat16), plus the order of the FP32 sums; through the whole model
    benchmarks/numerics.py measures it (README, *Numerics*).  On NumPy a
    16-bit ``w`` gives the same values as on the GPU up to summation order.
    """
    if w.dtype.itemsize != 2:
        return x @ w
    x16 = x.astype(w.dtype)
    if array_module(x) is np:
        return x16.astype(np.float32) @ w.astype(np.float32)
    return gemm_f32(x16, w)


def mm16(x16, w16):
    """The experts' 16-bit GEMM: x16 [n, k] (16-bit values, any float dtype) @
    w16 [k, m] (16-bit), FP32 accumulation, the product written in w16's
    dtype -> [n, m] 16-bit.

    On CuPy cuBLAS on tensor cores writes it so; NumPy (ml_dtypes) returns
    the FP32 sums, rounded here: the same values, slowly, for tests.
    """
    return (x16.astype(w16.dtype, copy=False) @ w16).astype(w16.dtype, copy=False)


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


def ffn(x, w, kind, narrow=None):
    """Dense MLP or one expert: ``mlp`` = down(gelu(up x)), ``swiglu`` = down(silu(gate x) * up x).

    x: [n, d] float32; w: dict of ``up``/``gate`` [d, h] and ``down`` [h, d]
    (float32, or 16-bit on a GPU backend: :func:`mm32`); narrow: optional
    function applied to the hidden activations (rounding to 16 bits for
    experts).  Returns [n, d] float32.
    """
    if kind == 'swiglu':
        hidden = _silu(mm32(x, w['gate'])) * mm32(x, w['up'])
    else:
        hidden = _gelu(mm32(x, w['up']))
    if narrow is not None:
        hidden = narrow(hidden)
    return mm32(hidden, w['down'])


def expert_ffn(x16, w, kind, dtype):
    """One expert on the rows it received, with the 16-bit numerics contract:
    inputs arrive as 16-bit values (they crossed the wire), GEMMs accumulate in
    FP32, the hidden activations and the output are rounded to 16 bits.

    x16: [n, d] float32 holding 16-bit-representable values, or the 16-bit
    dtype -> [n, d]: float32 (16-bit-representable) with FP32 weights, the
    weights' 16-bit dtype with 16-bit weights.

    The weights' dtype picks one of two contracts, which differ in one place:

    - FP32 weights (the NumPy backend, the reference): every GEMM product is
      FP32; the activation runs on the FP32 products of the first GEMM(s).
    - 16-bit weights (the CuPy backend): 2-D 16-bit GEMMs, FP32 accumulation
      (cuBLAS), each product *written in 16 bits* (:func:`mm16`), so the activation sees the
      pre-activations rounded (relative error <= u = 2^-8 for bfloat16,
      2^-11 for float16) before it runs in FP32 (:func:`activate16`: one
      fused kernel on CuPy); the down product, written in 16 bits, is the
      output rounded.

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
    Through a whole model (with the front-end's 16-bit GEMM inputs as well)
    benchmarks/numerics.py gpu-contract measures it (README, *Numerics*).
    """
    # an overflow here (an expert rank) ends in NaN/Inf logits, which the
    # front-end refuses in one message (FrontEnd.logits); no NumPy warnings
    with np.errstate(over='ignore', invalid='ignore'):
        if w['down'].dtype.itemsize != 2:
            narrow = lambda a: round16(a, dtype)  # noqa: E731
            return narrow(ffn(x16, w, kind, narrow))
        pre = (mm16(x16, w['gate']), mm16(x16, w['up'])) if kind == 'swiglu' else \
            (mm16(x16, w['up']),)
        return mm16(activate16(kind, *pre), w['down'])


def activate16(kind, *pre):
    """The hidden activations of the 16-bit contract: the pre-activations
    (16-bit GEMM products [n, h]: gate and up for ``swiglu``, up for ``mlp``)
    widened to FP32, the activation of :func:`ffn` in FP32, the result
    rounded to their 16-bit dtype -> [n, h] 16-bit.

    On CuPy one element-wise kernel (:data:`ACTIVATION_KERNELS`) reads the
    16-bit products and writes the 16-bit result: no FP32 array in memory.
    Its ``expf``/``tanhf`` differ from NumPy's by a few FP32 ulps, which
    tests/contract.py's bound allows for.
    """
    xp = array_module(pre[0])
    if xp is not np:
        return _device_activation(kind)(*pre)
    p = [a.astype(np.float32) for a in pre]
    hidden = _silu(p[0]) * p[1] if kind == 'swiglu' else _gelu(p[0])
    return hidden.astype(pre[0].dtype)


#: CuPy ElementwiseKernel (inputs, output, body) of :func:`activate16` per
#: expert kind, T the 16-bit type; the formulas of :func:`_silu` and :func:`_gelu`
ACTIVATION_KERNELS = {
    'swiglu': ('T gate, T up', 'T hidden',
               'const float g = (float)gate; hidden = (T)(g / (1.0f + expf(-g)) * (float)up);'),
    'mlp': ('T up', 'T hidden',
            'const float p = (float)up; hidden = (T)(0.5f * p * (1.0f + tanhf('
            '0.7978845608028654f * (p + 0.044715f * p * p * p))));'),
}


@functools.cache
def _device_activation(kind):
    """The compiled kernel of :data:`ACTIVATION_KERNELS` for ``kind``."""
    import cupy
    inputs, output, body = ACTIVATION_KERNELS[kind]
    return cupy.ElementwiseKernel(inputs, output, body, f'mpimoe_{kind}16')
