"""Element-wise bounds on the difference of two evaluations of one expert
(mpimoe.model.expert_ffn), for tests that compare backends.

    bound = expert_bound(x16, w, 'mlp', 'bfloat16', rounded_pre=1)   # [n, d]
    assert np.all(np.abs(y_gpu - y_cpu) <= bound)

Both evaluations take the same 16-bit inputs and weights and round the hidden
activations and the output to 16 bits; they may differ in

- the order of their FP32 sums: a dot product of length n is within
  gamma_n sum|x_i w_i| of the exact one (gamma_n = n 2^-24 / (1 - n 2^-24)), so
  two are within twice that;
- the rounding of the pre-activations (the GEMM products feeding the
  activation) to 16 bits: ``rounded_pre = 1`` when one of them rounds (the
  GPU contract against the CPU's FP32 one), 2 when both do (the GPU contract
  on two devices): each rounding moves a value by at most u |value|, u = 2^-8
  (bfloat16) or 2^-11 (float16);
- the FP32 evaluation of the activation (tanh or exp of two libraries): a few
  2^-24 of the magnitudes involved; 32 2^-24 is allowed.

A difference D of two values before a rounding that both apply leaves at most
D + 2u |value| after it (each rounding moves its value by u |value|).  The
activations are Lipschitz: |gelu'| <= 1.1290 (tanh form), |silu'| <= 1.0999.
Everything is evaluated in float64 from the exact products, so the bound is
rigorous to first order in u (second-order terms are below 2^-16 relative and
covered by rounding the constants up).
"""

import numpy as np

__all__ = ['EPS32', 'unit_roundoff', 'gamma', 'expert_bound', 'GELU_SLOPE', 'SILU_SLOPE',
           'LOGIT_RTOL']

#: unit roundoff of FP32
EPS32 = 2.0 ** -24
#: max |d gelu / dx| (tanh form) and max |d silu / dx|, rounded up
GELU_SLOPE, SILU_SLOPE = 1.13, 1.1


#: Bound on the relative L2 difference ``|a - b| / |b|`` of one row of logits
#: between two computations of the same token that differ only in batching
#: (companions in the batch, prefill versus cached decode).  They do the same
#: FP32 arithmetic in differently shaped GEMMs: relative differences of about
#: sqrt(d) 2^-24, ~1e-6.  But the values entering an expert, its hidden
#: activations and its output are rounded to bf16 (mpimoe.model.expert_ffn), so
#: an FP32 difference that straddles a rounding midpoint moves that element by
#: one bf16 ulp: at most eps(bfloat16) = 2^-7 of the element, so at most 2^-7 of
#: the norm of its vector.  The synthetic weights preserve norms (N(0, 1/d_in)
#: matrices, RMSNorm before every block, output projections scaled down;
#: test_synthetic_weights_keep_activations_order_one) and the residual stream
#: carries an FFN output with gain <= 1, so one flip moves a row of logits by at
#: most ~2^-7 relative (typically 2^-7 / sqrt(d), the element being one of d).
#: A flip needs an FP32 difference (~2^-24 sqrt(d) relative) to straddle a
#: midpoint (2^-8 relative apart): probability ~1e-4 per rounding, over the
#: ~10^3 roundings of a token's experts, so a row sees well under one flip on
#: average; we allow four worst-case flips.  A real bug (a wrong position,
#: mask, cache row or a companion's token) changes the logits by O(1).
LOGIT_RTOL = 4 * 2.0 ** -7


def unit_roundoff(dtype):
    """Half the spacing of the 16-bit format relative to a value: u."""
    return {'bfloat16': 2.0 ** -8, 'float16': 2.0 ** -11}[dtype]


def gamma(n):
    """Bound on the relative error of an FP32 sum of n terms (any order)."""
    return n * EPS32 / (1 - n * EPS32)


def _gelu(x):
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))


def _silu(x):
    return x / (1.0 + np.exp(-x))


def expert_bound(x16, w, kind, dtype, rounded_pre):
    """Bound on |y_a - y_b| for two evaluations of expert_ffn(x16, w, kind, dtype).

    x16: [n, d] (16-bit values, any float dtype); w: dict of matrices (16-bit
    values); rounded_pre: how many of the two round the pre-activations
    (1 or 2).  Returns float64 [n, d].
    """
    u = unit_roundoff(dtype)
    x = np.asarray(x16, np.float64)
    W = {m: np.asarray(a, np.float64) for m, a in w.items()}
    d, h = W['down'].shape[1], W['down'].shape[0]

    def pre(m):
        """A pre-activation, exact, and the bound on its difference: [n, h] each."""
        p = x @ W[m]
        sums = 2 * gamma(d) * (np.abs(x) @ np.abs(W[m]))
        return p, rounded_pre * u * (np.abs(p) + sums) + sums

    if kind == 'swiglu':
        (g, dg), (v, dv) = pre('gate'), pre('up')
        a = _silu(g) * v
        da = SILU_SLOPE * dg * (np.abs(v) + dv) + np.abs(_silu(g)) * dv
        da += 32 * EPS32 * (np.abs(a) + np.abs(g * v))
    else:
        p, dp = pre('up')
        a = _gelu(p)
        da = GELU_SLOPE * dp + 32 * EPS32 * (np.abs(a) + np.abs(p))
    dhid = (1 + u) * da + 2 * u * np.abs(a)                          # after both round
    hid = np.abs(a) * (1 + u)
    z = a @ W['down']
    dz = dhid @ np.abs(W['down']) + 2 * gamma(h) * (hid @ np.abs(W['down']))
    return (1 + u) * dz + 2 * u * (np.abs(z) + dz)                   # after both round
