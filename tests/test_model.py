"""Known-answer tests of the single-process reference model (mpimoe.model.layers,
mpimoe.model.frontend, mpimoe.moe.router, mpimoe.moe.experts,
mpimoe.model.reference): hand-computed norms, RoPE and activations, the MoE
layer against the dense mixture, the KV cache against full recomputation, batch
independence, and the scale of the synthetic model's activations and routing.
Attention and the KV cache alone: tests/test_attention.py, tests/test_kvcache.py.
"""

import math

import numpy as np
import pytest

from mpimoe.backends.backend import round16
from mpimoe.checkpoint.weights import WeightFile
from contract import (GPU_TIE_RTOL, LOGIT_RTOL, TIE_RTOL, assert_greedy_match,
                      assert_logits_close, next_logits, tie_bound)
from mpimoe.model.config import RouterConfig, model_config
from mpimoe.io.inputs import read_inputs
from mpimoe.model.layers import apply_rope, expert_ffn, ffn, rms_norm, rope_tables
from mpimoe.moe.local import moe_local
from mpimoe.model.reference import load_reference
from mpimoe.moe.router import expert_counts, route, sorted_key_counts


TINY = model_config('tiny')


def _load(path):
    """The whole model of weight file ``path`` as a ReferenceModel."""
    with WeightFile(path) as wf:
        return load_reference(wf)


@pytest.fixture(scope='module')
def tiny_model(tiny_weights):
    return _load(tiny_weights)


@pytest.fixture(scope='module')
def prompts(tiny_inputs):
    """The 12 prompts of tiny_inputs: list of int32 arrays, lengths 3..20."""
    inputs = read_inputs(tiny_inputs, TINY.vocab_size)
    return [inputs.seq(i) for i in range(len(inputs))]


def _prefill(model, prompts):
    """One forward over whole ``prompts`` in a fresh cache -> logits [B, V] at
    each prompt's last token."""
    lengths = np.array([len(p) for p in prompts])
    cache, seqs = model.front.cache_for(lengths)
    return model.forward(np.concatenate(prompts), cache, seqs, lengths)


def _generate_recorded(model, prompts, n):
    """Greedy generation in lock-step (prefill, then one token of every
    sequence per step), recording every forward.

    -> (generated int32 [B, n], logits float32 [n, B, V]): ``logits[s]`` are the
    logits ``generated[:, s]`` was picked from.
    """
    lengths = np.array([len(p) for p in prompts])
    cache, seqs = model.front.cache_for(lengths + n)
    steps = [model.forward(np.concatenate(prompts), cache, seqs, lengths)]
    generated = np.empty((len(prompts), n), dtype=np.int32)
    for s in range(n):
        generated[:, s] = steps[-1].argmax(axis=1)
        if s + 1 < n:
            steps.append(model.forward(generated[:, s].astype(np.int64), cache, seqs,
                                       np.ones(len(prompts), np.int64)))
    return generated, np.stack(steps)


def _run_layers(model, prompts):
    """ReferenceModel.forward over ``prompts`` (one prefill), layer by layer
    through the FrontEnd methods, keeping what forward throws away.

    -> (residual: list of n_layers float32 [T, d], the stream after each layer;
    counts: {moe layer: int64 [E]} token copies per expert; logits float32
    [T, V] at every position: the LM head on all T rows, where forward runs it
    on the last row of each sequence).
    """
    fe, cfg = model.front, model.cfg
    lengths = np.array([len(p) for p in prompts])
    cache, seqs = fe.cache_for(lengths)
    x = fe.embed(np.concatenate(prompts))
    residual, counts = [], {}
    where = fe.place(cache, seqs, lengths)
    for i in range(cfg.n_layers):
        x = x + fe.attention_out(i, x, cache, where).wait()
        h = fe.ffn_input(i, x)
        if i < cfg.n_dense_layers:
            x = x + fe.dense_ffn(i, h).wait()
        else:
            y, counts[i] = moe_local(h, fe.router[i], model.experts[i], cfg)
            x = x + y
        residual.append(x)
    return residual, counts, fe.logits(x)


# ---------------------------------------------------------------- RMSNorm

def test_rms_norm_known_values():
    w = np.array([1, 2], np.float32)
    out = rms_norm(np.array([[3, 4]], np.float32), w, 0.0)
    assert out.dtype == np.float32
    # mean of squares (9 + 16) / 2 = 12.5
    np.testing.assert_allclose(out, [[3 / math.sqrt(12.5), 8 / math.sqrt(12.5)]], rtol=1e-6)
    # eps is added to the mean of squares: [1, 1] -> 1 / sqrt(1 + 1); a zero row stays 0
    out = rms_norm(np.array([[1, 1], [0, 0]], np.float32), w, 1.0)
    np.testing.assert_allclose(out, [[1 / math.sqrt(2), 2 / math.sqrt(2)], [0, 0]], rtol=1e-6)


# ---------------------------------------------------------------- RoPE

def _rope(x, positions, theta=10000.0):
    """x: [T, h, hd] -> x rotated by mpimoe's RoPE at ``positions``."""
    x = np.asarray(x, np.float32)
    cos, sin = rope_tables(np.asarray(positions), x.shape[-1], theta)
    return apply_rope(x, cos, sin)


def test_rope_tables_shape_and_position_zero_is_identity():
    cos, sin = rope_tables(np.array([0, 1, 2]), 16, 10000.0)
    assert cos.shape == sin.shape == (3, 8) and cos.dtype == sin.dtype == np.float32
    x = np.random.default_rng(0).standard_normal((1, 3, 16)).astype(np.float32)
    np.testing.assert_array_equal(_rope(x, [0]), x)


@pytest.mark.parametrize('p', [1, 2, 5, 1000])
def test_rope_head_dim_2_rotates_by_p_radians(p):
    out = _rope([[[1, 0]], [[0, 1]]], [p, p])[:, 0]
    c, s = math.cos(p), math.sin(p)
    np.testing.assert_allclose(out, [[c, s], [-s, c]], atol=1e-6)


def test_rope_head_dim_4_pairs_i_with_i_plus_half():
    """Frequencies 1 and theta^-1/2; pairs (0, 2) and (1, 3) (rotate-half layout)."""
    p, theta = 3, 100.0
    out = _rope(np.eye(4)[:, None, :], [p] * 4, theta)[:, 0]
    c1, s1 = math.cos(p), math.sin(p)
    c2, s2 = math.cos(p * theta ** -0.5), math.sin(p * theta ** -0.5)
    expected = [[c1, 0, s1, 0], [0, c2, 0, s2], [-s1, 0, c1, 0], [0, -s2, 0, c2]]
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_rope_scores_depend_on_relative_position_only():
    """q(p+s).k(p'+s) == q(p).k(p') for every head; cos/sin are exact to FP32
    rounding (2^-24 relative), so 16-term dot products agree to ~1e-6 |q||k|."""
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 4, 3, 16)).astype(np.float32)
    pq, pk = np.array([0, 7, 30, 200]), np.array([0, 3, 31, 150])
    base = np.einsum('thd,thd->th', _rope(q, pq), _rope(k, pk))
    scale = np.linalg.norm(q, axis=-1) * np.linalg.norm(k, axis=-1)
    for shift in (1, 17, 1000):
        shifted = np.einsum('thd,thd->th', _rope(q, pq + shift), _rope(k, pk + shift))
        assert np.all(np.abs(shifted - base) <= 1e-5 * scale), shift
    # and the scores do depend on the relative position
    moved = np.einsum('thd,thd->th', _rope(q, pq + 1), _rope(k, pk))
    assert np.abs(moved - base).mean() > 0.01 * scale.mean()


# ---------------------------------------------------------------- FFN activations

def test_ffn_known_values():
    x = np.array([[1, -1], [2, 0]], np.float32)
    eye = np.eye(2, dtype=np.float32)
    # mlp: down(gelu(up x)) with GELU's tanh form: gelu(1), gelu(-1), gelu(2), gelu(0)
    out = ffn(x, {'up': eye, 'down': eye}, 'mlp')
    np.testing.assert_allclose(out, [[0.8411919906, -0.1588080094], [1.9545976941, 0]],
                               rtol=1e-6, atol=1e-7)
    # swiglu: down(silu(gate x) * up x) with up = 2: 2 x^2 sigmoid(x)
    out = ffn(x, {'gate': eye, 'up': 2 * eye, 'down': eye}, 'swiglu')
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    np.testing.assert_allclose(out, [[2 * sig(1), 2 * sig(-1)], [8 * sig(2), 0]], rtol=1e-6)


def test_expert_output_is_16_bit():
    rng = np.random.default_rng(2)
    w = {m: rng.standard_normal(s).astype(np.float32) / 8 for m, s in
         (('gate', (64, 32)), ('up', (64, 32)), ('down', (32, 64)))}
    x16 = round16(rng.standard_normal((5, 64)).astype(np.float32), 'bfloat16')
    y = expert_ffn(x16, w, 'swiglu', 'bfloat16')
    assert y.dtype == np.float32 and y.shape == (5, 64)
    np.testing.assert_array_equal(round16(y, 'bfloat16'), y)


# ---------------------------------------------------------------- router

def test_route_weights_sum_to_one_in_decreasing_order():
    rng = np.random.default_rng(3)
    h = rng.standard_normal((50, 16)).astype(np.float32)
    w_router = rng.standard_normal((16, 8)).astype(np.float32)
    experts, weights = route(h, w_router, 3)
    assert experts.shape == weights.shape == (50, 3)
    assert experts.dtype == np.int32 and weights.dtype == np.float32
    np.testing.assert_allclose(weights.sum(axis=1), 1, rtol=1e-6)
    assert np.all(np.diff(weights, axis=1) <= 0)
    # the chosen experts are the 3 largest logits, best first, in float64 too
    logits = h.astype(np.float64) @ w_router
    np.testing.assert_array_equal(experts, np.argsort(-logits, axis=1)[:, :3])
    assert len({tuple(r) for r in experts.tolist()}) > 10       # not a constant choice


def test_route_known_weights_and_ties_to_the_lower_id():
    # one token with logits [0, ln 3, ln 3, ln 2]: probabilities [1, 3, 3, 2] / 9
    h = np.ones((1, 1), np.float32)
    w_router = np.log(np.array([[1, 3, 3, 2]], np.float32))
    experts, weights = route(h, w_router, 3)
    assert experts.tolist() == [[1, 2, 3]]
    np.testing.assert_allclose(weights, [[3 / 8, 3 / 8, 2 / 8]], rtol=1e-6)
    # all equal: the lowest ids, equal weights
    experts, weights = route(np.zeros((2, 4), np.float32), np.ones((4, 6), np.float32), 4)
    assert experts.tolist() == [[0, 1, 2, 3]] * 2
    np.testing.assert_allclose(weights, 0.25, rtol=1e-6)


def test_route_bias_changes_the_choice_not_the_weights():
    h = np.ones((1, 1), np.float32)
    w_router = np.log(np.array([[1, 3, 4, 2]], np.float32))    # probabilities [1, 3, 4, 2] / 10
    bias = np.array([0.5, 0, 0, 0], np.float32)                 # lifts expert 0 to 0.6
    experts, weights = route(h, w_router, 2, bias)
    assert experts.tolist() == [[0, 2]]
    np.testing.assert_allclose(weights, [[1 / 5, 4 / 5]], rtol=1e-6)
    assert route(h, w_router, 2)[0].tolist() == [[2, 1]]


def _hf_router(kind, **config):
    """A transformers router with random weights: (module, w_router float32 [d, E])."""
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    if kind == 'deepseek':
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
        module = DeepseekV3TopkRouter(transformers.DeepseekV3Config(**config))
        module.e_score_correction_bias.normal_(std=0.1)
    else:
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
        module = Qwen2MoeTopKRouter(transformers.Qwen2MoeConfig(**config))
    with torch.no_grad():
        module.weight.normal_(std=0.25)
    return module, module.weight.detach().numpy().T.copy()


@pytest.mark.parametrize('kind, config, rcfg', [
    # sigmoid scores, score bias, 4 groups of 4 of which 2, 3 experts, weights x 2.5
    ('deepseek', dict(hidden_size=16, n_routed_experts=16, num_experts_per_tok=3, n_group=4,
                      topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True),
     RouterConfig(scoring='sigmoid', n_group=4, topk_group=2, routed_scaling_factor=2.5,
                  score_bias=True)),
    ('deepseek', dict(hidden_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
                      topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False),
     RouterConfig(scoring='sigmoid', norm_topk_prob=False, score_bias=True)),
    # softmax, top-k weights not renormalised (Qwen2-MoE, OLMoE)
    ('qwen2', dict(hidden_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
     RouterConfig(norm_topk_prob=False)),
], ids=['deepseek-groups', 'sigmoid-plain', 'softmax-unnormalised'])
def test_route_matches_transformers_routers(kind, config, rcfg):
    """route() against transformers' own router on 200 tokens: the same set of
    experts and weights within FP32 rounding (a few ulps: 1e-6 relative).  Both
    sides compute in FP32 from the same values but in other orders, so a choice
    whose deciding gap (the k-th against the (k+1)-th choice score, or the
    topk_group-th group against the next) is under 1e-5 may flip: such tokens
    are left out, and at least 190 must remain."""
    import torch
    module, w_router = _hf_router(kind, **config)
    h = np.random.default_rng(4).standard_normal((200, 16)).astype(np.float32)
    with torch.no_grad():
        _, hf_weights, hf_experts = module(torch.from_numpy(h))
    bias = module.e_score_correction_bias.numpy() if kind == 'deepseek' else None
    experts, weights = route(h, w_router, config['num_experts_per_tok'], bias, rcfg)
    logits = h.astype(np.float64) @ w_router
    scores = 1 / (1 + np.exp(-logits)) if rcfg.scoring == 'sigmoid' else \
        np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    choice = scores + (0 if bias is None else bias)
    gaps = []
    if rcfg.n_group > 1:
        groups = np.sort(np.sort(choice.reshape(200, rcfg.n_group, -1), axis=2)[:, :, -2:]
                         .sum(axis=2), axis=1)[:, ::-1]
        gaps.append(groups[:, rcfg.topk_group - 1] - groups[:, rcfg.topk_group])
    k = config['num_experts_per_tok']
    top = np.sort(choice, axis=1)[:, ::-1]
    gaps.append(top[:, k - 1] - top[:, k])
    clear = np.min(gaps, axis=0) > 1e-5
    assert clear.sum() >= 190
    hf_experts, hf_weights = hf_experts.numpy(), hf_weights.numpy()
    for t in np.flatnonzero(clear):
        order = np.argsort(hf_experts[t])
        assert sorted(experts[t].tolist()) == hf_experts[t][order].tolist()
        np.testing.assert_allclose(weights[t][np.argsort(experts[t])], hf_weights[t][order],
                                   rtol=1e-6)
    # best choice first
    assert np.all(np.diff(np.take_along_axis(choice, experts, axis=1)[clear], axis=1) <= 0)


def test_group_limited_routing_picks_within_the_best_groups():
    # 4 experts in 2 groups; sigmoid scores s; group scores (sum of both) favour
    # group 1 although expert 0 scores highest alone
    s = np.array([[0.9, 0.1, 0.6, 0.6]], np.float32)
    h = np.ones((1, 1), np.float32)
    w_router = np.log(s / (1 - s))                                  # sigmoid^-1
    rcfg = RouterConfig(scoring='sigmoid', n_group=2, topk_group=1, routed_scaling_factor=2.0)
    experts, weights = route(h, w_router, 2, rcfg=rcfg)
    assert experts.tolist() == [[2, 3]]
    np.testing.assert_allclose(weights, [[1.0, 1.0]], rtol=1e-6)   # 0.5 each, times 2
    experts, _ = route(h, w_router, 2, rcfg=RouterConfig(scoring='sigmoid'))
    assert experts.tolist() == [[0, 2]]


def test_expert_counts():
    counts = expert_counts(np.array([[0, 3], [3, 1], [0, 3]]), 5)
    assert counts.dtype == np.int64 and counts.tolist() == [2, 1, 0, 3, 0]


# ---------------------------------------------------------------- MoE layer

@pytest.mark.parametrize('overrides', [(), ('expert_kind=mlp',)])
def test_moe_with_all_experts_is_the_dense_mixture(make_weights, overrides):
    """top_k = E: moe_local == sum_e softmax(h W)_e expert_e(h), in float64 here.

    Every expert gets every token in token order, so its GEMMs see the same
    [T, d] rows as expert_ffn on all of h16 below: the expert outputs agree
    exactly, and the difference is the FP32 route and combine arithmetic.
    Router logits: |error| <= d 2^-24 (|h| @ |W|) (dot-product bound); a logit
    error delta moves a probability by <= 2 max|delta| relative; softmax, the
    renormalisation and the E-term weighted sum add <= 2 (E + 8) 2^-24.
    """
    model = _load(make_weights('tiny', overrides))
    cfg = model.cfg.replace(top_k=model.cfg.n_experts)
    layer, E = cfg.moe_layers[-1], cfg.n_experts
    w_router, experts = model.front.router[layer], model.experts[layer]
    h = np.random.default_rng(4).standard_normal((40, cfg.d_model)).astype(np.float32)
    out, counts = moe_local(h, w_router, experts, cfg)
    assert counts.tolist() == [40] * E
    logits = h.astype(np.float64) @ w_router.astype(np.float64)                 # [T, E]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    h16 = round16(h, cfg.dtype)
    y = np.stack([expert_ffn(h16, w, cfg.expert_kind, cfg.dtype) for w in experts], 1)  # [T, E, d]
    dense = np.einsum('te,ted->td', probs, y)
    eps = 2.0 ** -24
    delta = cfg.d_model * eps * (np.abs(h) @ np.abs(w_router)).max(axis=1)      # [T]
    bound = (2 * delta + 2 * (E + 8) * eps)[:, None] * np.einsum('te,ted->td', probs, np.abs(y))
    assert np.all(np.abs(out - dense) <= bound)
    assert np.abs(dense).max() > 0.1                     # the experts are not all zero


# ---------------------------------------------------------------- causality

def test_model_is_causal(tiny_model):
    """The whole model: a token changed at position 8 leaves the logits of
    positions 0..7 equal within LOGIT_RTOL (other tokens' expert GEMMs change
    shape with the routing of the new token) and changes later ones by O(1)."""
    prompt = np.random.default_rng(9).integers(0, TINY.vocab_size, 12)
    changed = prompt.copy()
    changed[8] = (changed[8] + 1) % TINY.vocab_size
    a, b = (_run_layers(tiny_model, [p])[2] for p in (prompt, changed))
    assert_logits_close(b[:8], a[:8], 'positions before the change')
    rel = np.linalg.norm(b[8:] - a[8:], axis=1) / np.linalg.norm(a[8:], axis=1)
    assert np.all(rel > 0.05), rel


# ---------------------------------------------------------------- KV cache, batching

@pytest.mark.parametrize('overrides', [(), ('expert_kind=mlp',), ('n_kv_heads=1',),
                                       ('n_kv_heads=4',)])
def test_cached_decode_equals_full_recompute(make_weights, tiny_inputs, overrides):
    """Decode step s (one token through the KV cache) against a fresh prefill of
    prompt + generated[:s]: logits within LOGIT_RTOL, and the same greedy token
    except where the prefill's two top logits are within tie_bound (both
    evaluations are teacher-forced on the same tokens, so every step is
    compared)."""
    model = _load(make_weights('tiny', overrides))
    inputs = read_inputs(tiny_inputs, model.cfg.vocab_size)
    prompts = [inputs.seq(i) for i in range(len(inputs))]
    n = 8
    generated, logits = _generate_recorded(model, prompts, n)
    worst = 0.0
    for s in range(n):
        full = _prefill(model, [np.concatenate([p, g[:s]]) for p, g in zip(prompts, generated)])
        for b in np.flatnonzero(full.argmax(axis=1) != generated[:, s]):
            gap = full[b].max() - full[b, generated[b, s]]
            assert gap <= tie_bound(full[b]), f'step {s}, sequence {b}: gap {gap:.3g}'
        worst = max(worst, assert_logits_close(full, logits[s], f'step {s}'))
    print(f'cached decode vs recompute {overrides}: max relative L2 difference {worst:.2e} '
          f'(tolerance {LOGIT_RTOL:.2e})')


def test_sequence_does_not_depend_on_its_companions(tiny_model, prompts):
    """Prompt 3 alone, first, middle and last in batches with other companions
    (longer and shorter): the same tokens (up to a near-tie:
    contract.assert_greedy_match), the logits of every step up to there within
    LOGIT_RTOL."""
    n, target = 6, prompts[3]
    alone_tokens, alone_logits = _generate_recorded(tiny_model, [target], n)
    batches = [(prompts[:6], 3), ([target, prompts[0], prompts[11], prompts[5]], 0),
               ([prompts[7], target], 1), ([prompts[8], prompts[9], target], 2)]
    worst = 0.0
    for batch, pos in batches:
        tokens, logits = _generate_recorded(tiny_model, batch, n)
        tie = assert_greedy_match([tokens[pos]], alone_tokens,
                                  lambda i, t: next_logits(tiny_model, target, t))
        same = tie[0][1] + 1 if tie else n           # steps decoded from the same tokens
        worst = max(worst, assert_logits_close(logits[:same, pos], alone_logits[:same, 0],
                                               f'batch of {len(batch)}'))
    print(f'alone vs in a batch: max relative L2 difference {worst:.2e} '
          f'(tolerance {LOGIT_RTOL:.2e})')


def test_greedy_match_accepts_a_divergence_only_at_a_near_tie(tiny_model, prompts):
    """contract.assert_greedy_match on real rows: another evaluation that takes
    the runner-up token where the two top logits are within tie_bound passes
    (whatever it decodes after), one that does so at the widest gap fails,
    naming the sequence and step."""
    tokens, logits = _generate_recorded(tiny_model, prompts, 6)        # logits [n, B, V]
    top = np.sort(logits, axis=-1)
    rms = np.sqrt(np.mean(logits.astype(np.float64) ** 2, axis=-1))
    ratio = (top[..., -1] - top[..., -2]) / (TIE_RTOL * rms)             # [n, B]
    near, far = (np.unravel_index(f(ratio), ratio.shape) for f in (np.argmin, np.argmax))
    assert ratio[near] <= 1 < ratio[far], (ratio[near], ratio[far])

    def recompute(i, t):
        return next_logits(tiny_model, prompts[i], t)

    for (step, seq), accepted in ((near, True), (far, False)):
        other = tokens.copy()
        other[seq, step] = np.argsort(logits[step, seq])[-2]
        other[seq, step + 1:] = 0
        if accepted:
            assert [t[:2] for t in assert_greedy_match(other, tokens, recompute)] == \
                [(seq, step)]
        else:
            with pytest.raises(AssertionError, match=f'sequence {seq}, step {step}: '):
                assert_greedy_match(other, tokens, recompute)


# ---------------------------------------------------------------- scale of the synthetic model

def test_layer_by_layer_run_is_the_forward(tiny_model, prompts):
    """_run_layers (the instrumentation below) computes what forward computes:
    its last residual stream, through the LM head on the same rows as forward,
    bit for bit (the same arithmetic in the same shapes); its logits at every
    position, from one larger LM-head GEMM (another summation order on some
    BLAS kernels), within LOGIT_RTOL at the last positions."""
    batch = prompts[:4]
    residual, _, logits = _run_layers(tiny_model, batch)
    last = np.cumsum([len(p) for p in batch]) - 1
    expected = _prefill(tiny_model, batch)
    np.testing.assert_array_equal(tiny_model.front.logits(residual[-1][last]), expected)
    assert_logits_close(logits[last], expected, 'LM head on every position')


@pytest.mark.parametrize('preset', ['tiny', 'small'])
def test_synthetic_weights_keep_activations_order_one(make_weights, preset):
    """256 random tokens: every token's residual RMS after every layer is in
    [0.2, 20]; each MoE layer sends tokens to every expert, none gets more than
    half of the copies."""
    model = _load(make_weights(preset))
    cfg = model.cfg
    rng = np.random.default_rng(8)
    batch = [rng.integers(0, cfg.vocab_size, 32) for _ in range(8)]
    residual, counts, logits = _run_layers(model, batch)
    for i, x in enumerate(residual):
        rms = np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=1))
        assert 0.2 <= rms.min() and rms.max() <= 20, \
            f'layer {i}: residual RMS in [{rms.min():.3g}, {rms.max():.3g}]'
    assert np.isfinite(logits).all()
    assert sorted(counts) == cfg.moe_layers
    for i, c in counts.items():
        assert c.sum() == 256 * cfg.top_k
        assert c.min() >= 1 and c.max() <= c.sum() / 2, f'layer {i}: counts {c.tolist()}'


def test_gpu_contract_on_numpy_within_its_bounds(tiny_weights, tiny_inputs):
    """The model with its 16-bit weights (the GPU's numerics contract,
    mpimoe.model.layers: front-end GEMM inputs rounded to 16 bits, expert
    products written in 16 bits; here NumPy computes the same values) against
    the FP32 reference on the test prompts, 8 greedy tokens: a different
    contract (the logits are not bit-equal), last logits of the prompts
    within LOGIT_RTOL per row, greedy tokens equal except after near-ties
    within GPU_TIE_RTOL (tests/contract.py argues both).  A wrong operand or
    layout in the 16-bit path moves logits by O(1); a product left in FP32
    is caught by tests/test_backend.py's contract test, not here."""
    with WeightFile(tiny_weights) as wf:
        ref, gpu, cfg = load_reference(wf), load_reference(wf, dict), wf.config
    seqs = read_inputs(tiny_inputs, cfg.vocab_size)
    prompts = [seqs.seq(i) for i in range(len(seqs))]
    got, _ = gpu.generate(prompts, 8)
    want, _ = ref.generate(prompts, 8)
    _, first_got = gpu.generate(prompts, 0)
    _, first_want = ref.generate(prompts, 0)
    assert not np.array_equal(first_got, first_want)
    assert_logits_close(first_got, first_want, 'GPU contract, last prompt logits')
    assert_greedy_match(got, want, lambda i, t: next_logits(ref, prompts[i], t),
                        tie_rtol=GPU_TIE_RTOL)


def test_sorted_key_counts_equal_bincount():
    """sorted_key_counts (binary search over sorted keys: key_counts on CuPy,
    no host read-back) against NumPy's bincount: empty input, keys never
    used, the last key."""
    rng = np.random.default_rng(12)
    for n, n_keys in ((0, 5), (1, 1), (1000, 7), (5000, 3904)):
        keys = rng.integers(0, n_keys, n)
        assert sorted_key_counts(np.sort(keys), n_keys).tolist() == \
            np.bincount(keys, minlength=n_keys).tolist()


def test_regroup_order_is_the_stable_sort_by_expert():
    """The expert rank's regroup (rows arriving by (peer, local expert),
    computed by (expert, peer)) equals a stable argsort of the rows' expert
    labels, with empty blocks, one peer, and 3904 peers."""
    from mpimoe.runtime.expert import regroup_order
    rng = np.random.default_rng(13)
    for size, k in ((3, 2), (1, 4), (5, 3), (3904, 2)):
        counts = rng.integers(0, 4, (size, k)) * rng.integers(0, 2, (size, k))
        labels = np.repeat(np.tile(np.arange(k), size), counts.ravel())
        assert regroup_order(counts).tolist() == np.argsort(labels, kind='stable').tolist()
