"""Batched attention through the block KV cache (mpimoe.model.attention)
against per-sequence float64 oracles written here.

The main oracle (:func:`_oracle`) sees the same FP32 queries and 16-bit keys
and values as the attention, so only FP32 rounding separates them: the test
weights (:func:`_select_weights`) are 0/1 matrices that pick disjoint column
blocks of x, so the FP32 projections are exact; RoPE is elementwise FP32 at
the positions, the same bits at the same positions; keys and values are the
round16 of those, as the cache stores them.  Bound (:func:`_oracle`, first
order, doubled for the second-order terms): a score q.k/sqrt(hd) of hd
products is within ``a = (gamma(hd) + 2 eps) scale sum|q k|`` (the sum, the
scaling); subtracting the max adds ``eps |s - max|`` and the max carries the
largest ``a``; FP32 exp is within 4 eps relative: each exponential is within
``e = 2 max a + eps max|s - max| + 4 eps`` relative; their sum of at most
LMAX terms (padding included) within ``gamma(LMAX) + e``; the division adds
eps, so each probability is within ``2e + gamma(LMAX) + eps``; the weighted
sum adds ``gamma(LMAX) sum p|v|``.  Elementwise:
``|out - oracle| <= 2 (2e + 2 gamma(LMAX) + eps) sum_j p_j |v_j|``.
A wrong position, block, mask or companion's key moves the output by O(1).
"""

import math

import numpy as np
import pytest

from contract import EPS32, gamma, unit_roundoff
from mpimoe.backends.backend import round16
from mpimoe.model.attention import Placement, attention
from mpimoe.model.config import model_config
from mpimoe.model.kvcache import BlockKVCache, blocks_for
from mpimoe.model.layers import apply_rope, rope_tables

TINY = model_config('tiny')
#: longer than any padded key length below (for the sums' bound)
LMAX = 256


def _cfg(n_kv_heads):
    """tiny's 4 heads of 16, ``n_kv_heads`` KV heads, d_model = the q, k and v widths."""
    return TINY.replace(n_kv_heads=n_kv_heads,
                        d_model=(TINY.n_heads + 2 * n_kv_heads) * TINY.head_dim)


def _select_weights(cfg):
    """wq, wk, wv pick columns [0, H hd), [H hd, (H + KV) hd), the rest of x;
    wo puts the heads back in the first H hd columns: exact FP32 products."""
    qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    eye = np.eye(cfg.d_model, dtype=np.float32)
    return {'wq': eye[:, :qd], 'wk': eye[:, qd:qd + kvd], 'wv': eye[:, qd + kvd:],
            'wo': eye[:qd]}


def _oracle(xs, cfg, n_new):
    """A sequence's tokens xs [P, d] (float32, positions 0..P-1), the last
    ``n_new`` of them new, through :func:`_select_weights`, in float64 one
    query and head at a time -> (out, bound), float64 [n_new, H*hd] each."""
    P, H, KV, hd = len(xs), cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    qd, kvd = H * hd, KV * hd
    cos, sin = rope_tables(np.arange(P), hd, cfg.rope_theta)
    q = apply_rope(xs[:, :qd].reshape(P, H, hd), cos, sin).astype(np.float64)
    k = round16(apply_rope(xs[:, qd:qd + kvd].reshape(P, KV, hd), cos, sin), cfg.dtype)
    v = round16(xs[:, qd + kvd:].reshape(P, KV, hd), cfg.dtype)
    k, v = k.astype(np.float64), v.astype(np.float64)
    scale = 1 / math.sqrt(hd)
    out, bound = np.empty((n_new, H, hd)), np.empty((n_new, H, hd))
    for i, p in enumerate(range(P - n_new, P)):
        for h in range(H):
            kv = h // (H // KV)
            s = k[:p + 1, kv] @ q[p, h] * scale                             # [p + 1]
            w = np.exp(s - s.max())
            w /= w.sum()
            out[i, h] = w @ v[:p + 1, kv]
            a = (gamma(hd) + 2 * EPS32) * scale * (np.abs(k[:p + 1, kv]) @ np.abs(q[p, h]))
            e = 2 * a.max() + EPS32 * np.abs(s - s.max()).max() + 4 * EPS32
            bound[i, h] = 2 * (2 * e + 2 * gamma(LMAX) + EPS32) * (w @ np.abs(v[:p + 1, kv]))
    return out.reshape(n_new, qd), bound.reshape(n_new, qd)


class _Stream:
    """Sequences fed to attention a step at a time; every step's output
    checked against :func:`_oracle`.  tokens: handle -> float32 [P, d] so far."""

    def __init__(self, cfg, cache, seed):
        self.cfg, self.cache, self.w = cfg, cache, _select_weights(cfg)
        self.rng = np.random.default_rng(seed)
        self.tokens = {}

    def step(self, todo, new=None, unchecked=()):
        """todo: list of (handle, n new tokens), the packed order; new: handle
        -> float32 [n, d] to use (default random).  Runs attention, advances
        the cache, asserts the oracle bound (but for the handles
        ``unchecked``) -> {handle: output float32 [n, d]}."""
        new = dict(new or {})
        for h, n in todo:
            if h not in new:
                new[h] = 1.5 * self.rng.standard_normal((n, self.cfg.d_model)).astype(np.float32)
            self.tokens[h] = np.concatenate([self.tokens.get(h, new[h][:0]), new[h]])
        seqs, ntok = (np.array(c, np.int64) for c in zip(*todo))
        y = attention(np.concatenate([new[h] for h, _ in todo]), self.w, self.cfg, self.cache,
                      0, Placement(self.cache, self.cfg, seqs, ntok))
        self.cache.advance(seqs, ntok)
        assert y.dtype == np.float32
        qd = self.cfg.n_heads * self.cfg.head_dim
        parts = dict(zip(seqs.tolist(), np.split(y, np.cumsum(ntok)[:-1])))
        for h, n in todo:
            if h in unchecked:
                continue
            ref, bound = _oracle(self.tokens[h], self.cfg, n)
            assert not parts[h][:, qd:].any()
            err = np.abs(parts[h][:, :qd] - ref)
            assert np.all(err <= bound), \
                f'sequence {h}: |error| {err.max():.3g}, {(err / bound).max():.2f}x the bound'
        return parts


def _cache(cfg, n_blocks, max_seqs):
    return BlockKVCache(1, n_blocks, cfg.n_kv_heads, cfg.head_dim, cfg.dtype, max_seqs=max_seqs)


@pytest.mark.parametrize('n_kv_heads', [1, 2, 4])
def test_mixed_batches_match_oracle(n_kv_heads):
    """Prefills across block boundaries, a one-token prompt (in the decode
    group), decodes next to prefills, a prefill onto a cached context, a
    sequence sitting a step out, packed in no handle order."""
    cfg = _cfg(n_kv_heads)
    cache = _cache(cfg, 40, 8)
    s = _Stream(cfg, cache, seed=n_kv_heads)
    a, b, c, d, e = (cache.allocate(n) for n in (40, 30, 60, 40, 20))
    s.step([(a, 20), (b, 3), (c, 33)])
    s.step([(d, 17), (a, 1), (e, 1), (b, 1), (c, 1)])
    s.step([(d, 1), (a, 1), (e, 1), (b, 5)])                      # c sits out
    s.step([(c, 1), (e, 16), (b, 1), (a, 1)])
    assert cache.length[[a, b, c, d, e]].tolist() == [23, 10, 35, 18, 18]


def test_sequence_does_not_depend_on_its_companions():
    """A sequence alone and, with other handles and blocks, among companions
    with longer contexts (more padding in both groups): both within the oracle
    bound, so within twice it of each other; the difference is FP32
    summation order only (printed in units of the FP32 spacing)."""
    cfg = _cfg(2)
    rng = np.random.default_rng(11)
    mine = [1.5 * rng.standard_normal((n, cfg.d_model)).astype(np.float32) for n in (9, 1, 1, 3)]
    alone = _Stream(cfg, _cache(cfg, 8, 2), seed=1)
    h = alone.cache.allocate(20)
    got_alone = [alone.step([(h, len(x))], {h: x})[h] for x in mine]
    crowd = _Stream(cfg, _cache(cfg, 30, 6), seed=2)
    x, y, z = (crowd.cache.allocate(n) for n in (90, 50, 80))
    crowd.step([(x, 70), (y, 2)])
    g = crowd.cache.allocate(20)
    assert g != h and crowd.cache.table[g, 0] != alone.cache.table[h, 0]
    got_crowd = [crowd.step([(y, 1), (g, 9), (x, 1), (z, 40)], {g: mine[0]})[g]]
    got_crowd += [crowd.step([(x, 1), (g, 1), (z, 1)], {g: m})[g] for m in mine[1:3]]
    got_crowd.append(crowd.step([(z, 5), (g, 3), (y, 1)], {g: mine[3]})[g])
    worst = 0.0
    qd = cfg.n_heads * cfg.head_dim
    for i, (a, b) in enumerate(zip(got_alone, got_crowd)):
        bound = _oracle(np.concatenate(mine[:i + 1]), cfg, len(mine[i]))[1]
        assert np.all(np.abs(a[:, :qd] - b[:, :qd]) <= 2 * bound), f'step {i}'
        ulps = np.abs(a - b) / np.spacing(np.maximum(np.abs(a), np.abs(b)))
        worst = max(worst, float(np.nan_to_num(ulps).max()))
    print(f'alone vs with companions: at most {worst:.0f} FP32 ulps apart')


def test_blocks_are_reused_after_release():
    """Ten sequences through a pool that holds two or three at a time: each
    is admitted when allocate finds room, prefilled next to the others'
    decodes, released when done; every step within the oracle bound (a
    reused block's old keys never show), and the blocks all come back."""
    cfg = _cfg(2)
    cache = _cache(cfg, 6, 3)
    s = _Stream(cfg, cache, seed=3)
    rng = np.random.default_rng(4)
    waiting = [(int(rng.integers(2, 30)), int(rng.integers(1, 4))) for _ in range(10)]
    running, owners, admitted = {}, {}, 0        # handle -> decodes left; block -> handles
    while waiting or running:
        todo = [(h, 1) for h in running]
        while waiting and (h := cache.allocate(sum(waiting[0]))) is not None:
            prompt, running[h] = waiting.pop(0)
            todo.append((h, prompt))
            admitted += 1
            for blk in cache.table[h, :blocks_for(cache.capacity[h])].tolist():
                owners.setdefault(blk, []).append(admitted)
        assert todo, 'a waiting sequence never fits'
        s.step(todo)
        for h, n in todo:
            if n == 1:
                running[h] -= 1
                if running[h] == 0:
                    del running[h]
                    s.tokens.pop(h)
                    cache.release(h)
    assert admitted == 10 and max(len(o) for o in owners.values()) >= 3
    assert cache.free_blocks == 6


def test_a_companions_non_finite_values_do_not_reach_a_sequence():
    """A sequence whose keys and values are all NaN (Inf inputs) shares a prefill with a
    shorter one, whose table row is padded to the group's length: its padding
    reads its own block, so it stays within the bound; then the NaN blocks
    are released and handed to a new sequence: zeroed first, so it stays too."""
    cfg = _cfg(2)
    cache = _cache(cfg, 4, 3)
    s = _Stream(cfg, cache, seed=6)
    bad, b = cache.allocate(40), cache.allocate(5)
    inf = np.full((40, cfg.d_model), np.inf, np.float32)
    with np.errstate(invalid='ignore'):
        s.step([(bad, 40), (b, 3)], {bad: inf}, unchecked={bad})
    assert not np.isfinite(cache.v[0][cache.table[bad, 0]].astype(np.float32)).any()
    cache.release(bad)
    s.tokens.pop(bad)
    c = cache.allocate(20)
    assert cache.table[c, 0] == 0                       # the first of the NaN blocks
    s.step([(c, 3), (b, 1)])
    s.step([(b, 1), (c, 1)])


def test_overflow_raises_before_writing():
    """One token more than a sequence reserved: ValueError, the pools unchanged."""
    cfg = _cfg(2)
    cache = _cache(cfg, 4, 2)
    s = _Stream(cfg, cache, seed=5)
    a, b = cache.allocate(5), cache.allocate(16)
    s.step([(a, 4), (b, 16)])
    before = [p.copy() for p in cache.k + cache.v]
    x = np.ones((3, cfg.d_model), np.float32)
    with pytest.raises(ValueError, match='overflow'):
        attention(x, s.w, cfg, cache, 0,
                  Placement(cache, cfg, np.array([a, b]), np.array([2, 1])))
    assert all(np.array_equal(p, q, equal_nan=True) for p, q in zip(before, cache.k + cache.v))
    s.step([(a, 1)])


# ---------------------------------------------------------------- with real projections

def _naive_attention(x, w, cfg):
    """One sequence, positions 0..n-1, float64, head by head, keys and values
    not rounded: x [n, d] -> (out [n, d], bound16 [n, d]).

    bound16 bounds what rounding keys and values to 16 bits (u = 2^-8
    relative for bfloat16) moves out: a key moves its score by at most
    ``D = u scale |q|.|k|``, which moves each probability by at most
    ``expm1(2 D_max)`` relative; a value moves by at most ``u |v|``.  So a
    head's output moves by ``(expm1(2 D_max) (1 + u) + u) sum_j p_j |v_j|``,
    and out by that through ``|wo|``."""
    n, H, KV, hd = len(x), cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    u = unit_roundoff(cfg.dtype)
    cos, sin = rope_tables(np.arange(n), hd, cfg.rope_theta)
    x = x.astype(np.float64)
    q = apply_rope((x @ w['wq']).reshape(n, H, hd), cos, sin)
    k = apply_rope((x @ w['wk']).reshape(n, KV, hd), cos, sin)
    v = (x @ w['wv']).reshape(n, KV, hd)
    out, moved = np.empty((n, H, hd)), np.empty((n, H, hd))
    later = np.triu_indices(n, 1)
    for head in range(H):
        kv = head // (H // KV)          # query heads share a KV head in consecutive groups
        scores = q[:, head] @ k[:, kv].T / math.sqrt(hd)                        # [n, n]
        scores[later] = -np.inf
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out[:, head] = p @ v[:, kv]
        D = u / math.sqrt(hd) * np.abs(q[:, head]) @ np.abs(k[:, kv]).T        # [n, n]
        D[later] = 0
        grow = np.expm1(2 * D.max(axis=1)) * (1 + u) + u                        # [n]
        moved[:, head] = grow[:, None] * (p @ np.abs(v[:, kv]))
    return (out.reshape(n, H * hd) @ w['wo'],
            moved.reshape(n, H * hd) @ np.abs(np.asarray(w['wo'], np.float64)))


def _attention_weights(cfg, rng):
    d, q, kv = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {name: (rng.standard_normal(s) / math.sqrt(s[0])).astype(np.float32)
            for name, s in (('wq', (d, q)), ('wk', (d, kv)), ('wv', (d, kv)), ('wo', (q, d)))}


@pytest.mark.parametrize('n_kv_heads', [1, 2, 4])
def test_attention_prefill_and_decode_match_naive_loop(n_kv_heads):
    """Random projections: two packed sequences, prefill, then two one-token
    decode steps through the cache, against the float64 loop over the whole
    sequences without 16-bit keys and values.  Bound: the 16-bit rounding's
    (:func:`_naive_attention`) plus the FP32 part, GEMMs over d = 64 and
    softmax sums: errors ~ 64 2^-24 of the magnitudes, so 2^-14 of the
    largest output."""
    cfg = TINY.replace(n_kv_heads=n_kv_heads)
    rng = np.random.default_rng(5)
    w = _attention_weights(cfg, rng)
    seqs_x = [rng.standard_normal((n, cfg.d_model)).astype(np.float32) for n in (7, 4)]
    cache = BlockKVCache(1, 2, cfg.n_kv_heads, cfg.head_dim, cfg.dtype, max_seqs=2)
    seqs, pre = np.array([cache.allocate(7), cache.allocate(4)]), np.array([5, 2])
    out = [attention(np.concatenate([seqs_x[0][:5], seqs_x[1][:2]]), w, cfg, cache, 0,
                     Placement(cache, cfg, seqs, pre))]
    cache.advance(seqs, pre)
    for step in range(2):
        ones = np.ones(2, np.int64)
        out.append(attention(np.stack([seqs_x[0][5 + step], seqs_x[1][2 + step]]), w, cfg,
                             cache, 0, Placement(cache, cfg, seqs, ones)))
        cache.advance(seqs, ones)
    got = [np.concatenate([out[0][:5], out[1][:1], out[2][:1]]),
           np.concatenate([out[0][5:], out[1][1:], out[2][1:]])]
    for g, x in zip(got, seqs_x):
        ref, bound16 = _naive_attention(x, w, cfg)
        err = np.abs(g - ref)
        assert np.all(err <= bound16 + 2.0 ** -14 * np.abs(ref).max()), err.max()
        assert err.max() > 2.0 ** -14 * np.abs(ref).max()      # the 16-bit cache shows


def test_attention_is_causal():
    """Changing token 5 leaves the outputs of positions 0..4 bit for bit equal
    (masked scores are exp(-inf) = 0 exactly) and changes positions 5.."""
    rng = np.random.default_rng(6)
    w = _attention_weights(TINY, rng)
    x = rng.standard_normal((8, TINY.d_model)).astype(np.float32)
    y = x.copy()
    y[5] = rng.standard_normal(TINY.d_model)
    outs = []
    for v in (x, y):
        cache = BlockKVCache(1, 1, TINY.n_kv_heads, TINY.head_dim, TINY.dtype, max_seqs=1)
        outs.append(attention(v, w, TINY, cache, 0,
                              Placement(cache, TINY, np.array([cache.allocate(8)]), np.array([8]))))
    a, b = outs
    np.testing.assert_array_equal(a[:5], b[:5])
    assert np.all(np.abs(a[5:] - b[5:]).max(axis=1) > 1e-3)
