"""The presets of the models people run (mpimoe/model/config.py PRESETS) at their
real sizes, and the planner on them (no weights are ever made at these sizes).

Each preset is what convert reads from its model's config.json, and its
parameter count (cfg.nonexpert_params + experts) is exactly that of
transformers' own model of the same config.json (built on the meta device):
a norm or bias miscounted by one vector fails.  Against the published totals
and active counts 2% is allowed: they have two or three significant digits
(Qwen3-30B-A3B's "3.3B" active is 3.35B, 1.6% off), and DeepSeek-V3's "37B"
active is 37.55B here (1.5%; 36.6B without the 0.93B input embedding, which
does no matmul).  Dropping a shared expert (2.6B active, 7%) or MLA's kv_b
up-projection (1.0B, 2.7%) is caught by both tests.
"""

from pathlib import Path

import numpy as np
import pytest

from mpimoe.checkpoint.hf_archs import hf_model_config
from mpimoe.cli.main import main
from mpimoe.model.config import model_config
from mpimoe.model.kvcache import BlockKVCache
from mpimoe.planning.costmodel import (Constants, Workload, kv_cache_bytes, layer_flops, memory,
                                       pass_time)
from mpimoe.planning.placement import make_plan

REPO = Path(__file__).resolve().parents[1]

#: preset -> (total, active) parameters, billions, as the model cards state them
#: (DeepSeek-V3: 671B without its 14B multi-token-prediction module, 37B active)
PUBLISHED = {'deepseek-v3': (671, 37), 'qwen3-235b-a22b': (235, 22),
             'qwen3-30b-a3b': (30.5, 3.3), 'mixtral-8x7b': (46.7, 12.9),
             'olmoe-1b-7b': (6.9, 1.3)}

_QWEN3 = dict(architectures=['Qwen3MoeForCausalLM'], head_dim=128, hidden_act='silu',
              num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
              num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1e6, vocab_size=151936,
              decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=40960,
              tie_word_embeddings=False, sliding_window=None, use_sliding_window=False)
#: preset -> the keys of its repository's config.json that set the model (the
#: rest are metadata, training settings or FP8 storage, which convert handles)
CONFIG_JSON = {
    # deepseek-ai/DeepSeek-V3
    'deepseek-v3': dict(
        architectures=['DeepseekV3ForCausalLM'], hidden_size=7168, num_hidden_layers=61,
        first_k_dense_replace=3, intermediate_size=18432, moe_intermediate_size=2048,
        num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
        num_experts_per_tok=8, n_shared_experts=1, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, scoring_func='sigmoid', topk_method='noaux_tc',
        norm_topk_prob=True, moe_layer_freq=1, num_nextn_predict_layers=1, hidden_act='silu',
        vocab_size=129280, rms_norm_eps=1e-6, rope_theta=10000, max_position_embeddings=163840,
        rope_scaling=dict(type='yarn', factor=40, original_max_position_embeddings=4096,
                          beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        tie_word_embeddings=False, attention_bias=False),
    # Qwen/Qwen3-235B-A22B
    'qwen3-235b-a22b': dict(_QWEN3, hidden_size=4096, num_hidden_layers=94,
                            num_attention_heads=64, intermediate_size=12288,
                            moe_intermediate_size=1536),
    # Qwen/Qwen3-30B-A3B
    'qwen3-30b-a3b': dict(_QWEN3, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                          intermediate_size=6144, moe_intermediate_size=768),
    # mistralai/Mixtral-8x7B-v0.1
    'mixtral-8x7b': dict(
        architectures=['MixtralForCausalLM'], hidden_size=4096, num_hidden_layers=32,
        intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2, hidden_act='silu', vocab_size=32000,
        rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768, sliding_window=None,
        tie_word_embeddings=False),
    # allenai/OLMoE-1B-7B-0924
    'olmoe-1b-7b': dict(
        architectures=['OlmoeForCausalLM'], hidden_size=2048, num_hidden_layers=16,
        intermediate_size=1024, num_attention_heads=16, num_key_value_heads=16, num_experts=64,
        num_experts_per_tok=8, norm_topk_prob=False, clip_qkv=None, hidden_act='silu',
        vocab_size=50304, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
        tie_word_embeddings=False, attention_bias=False),
}


@pytest.mark.parametrize('name', PUBLISHED)
def test_preset_is_what_convert_reads(name):
    """A plan made from the preset is one of the converted checkpoint (save
    its end-of-sequence ids, which convert takes from generation_config.json)."""
    cfg, _, problems = hf_model_config(CONFIG_JSON[name], ())
    assert problems == [] and cfg == model_config(name)


@pytest.mark.parametrize('name', PUBLISHED)
def test_parameter_count_is_transformers_own(name):
    """Exactly the parameters of transformers' own model of that config.json,
    built on the meta device (no memory): every projection, norm, shared
    expert and router counted, DeepSeek-V3's score bias (a buffer there) too."""
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    hf = CONFIG_JSON[name]
    model_cls = getattr(transformers, hf['architectures'][0])
    with torch.device('meta'):
        model = model_cls(model_cls.config_class(**hf))
    n = sum(p.numel() for p in model.parameters()) + \
        sum(b.numel() for k, b in model.named_buffers() if k.endswith('e_score_correction_bias'))
    assert n == _params(model_config(name))[0]


def _params(cfg):
    """(total, active) parameters: non-expert ones plus all, or top_k, experts per MoE layer."""
    expert = cfg.n_moe_layers * cfg.expert_params
    return cfg.nonexpert_params + cfg.n_experts * expert, cfg.nonexpert_params + cfg.top_k * expert


@pytest.mark.parametrize('name', PUBLISHED)
def test_parameter_counts_are_the_published_ones(name):
    total, active = _params(model_config(name))
    want_total, want_active = PUBLISHED[name]
    assert abs(total / 1e9 - want_total) <= 0.02 * want_total, total
    assert abs(active / 1e9 - want_active) <= 0.02 * want_active, active


def test_deepseek_v3_caches_the_latent_and_the_rope_key():
    """576 16-bit elements per token per layer (512 latent + 64 RoPE key), not
    the 2 x 128 heads x 192 of expanded keys and values; the planner's bytes are
    what BlockKVCache allocates (checked on a small MLA model)."""
    cfg = model_config('deepseek-v3')
    assert cfg.kv_token_elems == 576
    assert kv_cache_bytes(cfg, 4096) == 61 * 576 * 2 * 4096
    small = model_config('tiny', [
        'attention.kind=mla', 'attention.kv_lora_rank=16', 'attention.qk_nope_head_dim=8',
        'attention.qk_rope_head_dim=8', 'attention.v_head_dim=12', 'n_kv_heads=4'])
    cache = BlockKVCache.for_tokens(small, 100, 4)
    assert cache.nbytes == kv_cache_bytes(small, 100) == 4 * 112 * 24 * 2
    assert cache.v == []


def test_deepseek_v3_per_layer_on_264_ranks():
    cfg = model_config('deepseek-v3')
    plan = make_plan(cfg, 264, 'per-layer', n_frontends=8, gpus_per_node=8)
    fe, ex = memory(plan, Workload(256, 4096))
    assert fe.weights == cfg.nonexpert_params * 2
    assert fe.kv_cache == 32 * 4096 * 61 * 576 * 2                   # 32 sequences each
    assert ex.weights == 58 * cfg.expert_params * 2                 # one expert of each layer
    assert round(fe.weights / 1e9, 2) == 34.24 and round(ex.weights / 1e9, 2) == 5.11


@pytest.mark.parametrize('name', PUBLISHED)
def test_plan_on_3904_ranks(name):
    """Each model packs onto 3904 ranks (as many experts per rank as it takes)."""
    cfg = model_config(name)
    pairs = cfg.n_moe_layers * cfg.n_experts
    k = next(k for k in range(1, pairs + 1) if pairs % k == 0 and pairs // k < 3904)
    plan = make_plan(cfg, 3904, f"packed:{k}",
                     n_frontends=3904 - pairs // k, gpus_per_node=8)
    fe, ex = memory(plan)
    assert fe.weights == cfg.nonexpert_params * 2
    assert np.isclose(ex.weights, k * cfg.expert_params * 2)


def test_deepseek_v3_front_end_time_by_hand():
    """One decode step of one sequence per front-end at context 4096 (one
    micro-batch): per layer, the roofline of the attention (MLA's projections
    written out), the dense MLP or the router and the shared expert, and the
    absorbed scores over 576 cached elements per key; the sum over 3 + 58
    layers and the LM head is the front-end stage."""
    cfg = model_config('deepseek-v3')
    plan = make_plan(cfg, 264, 'per-layer', n_frontends=8, gpus_per_node=8)
    c = Constants()
    d, H, r, rope, ctx = 7168, 128, 512, 64, 4096
    attn = (d * 1536 + 1536 + 1536 * H * 192                    # wq_a, q_a_norm, wq_b
            + d * (r + rope) + r + r * H * (128 + 128)          # wkv_a, kv_a_norm, wkv_b
            + H * 128 * d + 2 * d)                              # wo, two norms
    assert cfg.attention_params == attn
    pair = H * (2 * (r + rope) + 2 * r)                         # score + weighted latent sum

    def layer(i, ffn):
        """Seconds of layer i with ``ffn`` weights besides the attention."""
        flops, weights = 2 * (attn + ffn) + pair * ctx, attn + ffn
        assert layer_flops(cfg, i, 1, ctx) == flops
        return max(flops / c.flops, (2 * weights + ctx * 576 * 2) / (c.hbm_gbs * 1e9))
    dense = layer(0, 3 * d * 18432)
    moe = layer(3, d * 256 + 3 * d * 2048)                      # router + shared expert
    head = max(2 * d * 129280 / c.flops, 2 * d * 129280 / (c.hbm_gbs * 1e9))
    t = pass_time(plan, Workload(8, ctx, 2), c, new_tokens=1)
    assert t.micro_batches == 1
    assert t.frontend == pytest.approx(3 * dense + 58 * moe + head, rel=1e-12)


def _readme_plans():
    """(arguments, shown lines) of each ``$ mpimoe plan`` example in README.md
    ('...' stands for lines left out)."""
    blocks = (REPO / 'README.md').read_text().split('```')[1::2]
    out = []
    for block in blocks:
        lines = block.strip('\n').splitlines()
        if lines and lines[0].startswith('$ mpimoe plan '):
            n = next(i for i, t in enumerate(lines) if not t.endswith('\\')) + 1
            command = ' '.join(t.rstrip('\\') for t in lines[:n]).split()
            out.append((command[3:], [t for t in lines[n:] if t != '...']))
    return out


@pytest.mark.parametrize('args,shown', _readme_plans())
def test_readme_plan_examples_are_what_it_prints(args, shown, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                     # --emit-sbatch writes here
    assert main(['plan', *args]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [t for t in shown if t not in printed] == []


DS264 = ['--preset', 'deepseek-v3', '--gpus', '264', '--gpus-per-node', '8', '--placement',
         'per-layer', '--frontends', '8']


@pytest.mark.parametrize('args,lines', [
    (DS264, ['placement per-layer on 264 ranks: 8 front-ends (ranks 0-7) + 256 expert ranks '
             '(ranks 8-263)',
             'weights per expert rank: max 5.11 GB, 58 experts; min 5.11 GB, 58 experts; one '
             'expert = 88.08 MB',
             '  front-end:   34.24 GB = weights 34.24 GB; 43% of 80 GB']),
    # 32 sequences per front-end: KV 32 x 4096 x 61 x 576 x 2 bytes; buffers 2 slots x send
    # and receive x 16 x 4096 tokens x top-8 x 7168 x 2 bytes
    (DS264 + ['--batch-seqs', '256', '--seq-len', '4096'],
     ['  front-end:   73.51 GB = weights 34.24 GB + KV cache 9.21 GB + buffers 30.06 GB; 92% '
      'of 80 GB',
      'prefill: 1,853 tokens/s (1,048,576 tokens in 565.94 s; front-end 14.43 s, experts '
      '282.104 ms, network 558.01 s summed over layers; 2 micro-batches; bound by network)']),
    (['--preset', 'deepseek-v3', '--gpus', '14856', '--gpus-per-node', '8', '--placement',
      'dedicated', '--frontends', '8'],
     ['placement dedicated on 14856 ranks: 8 front-ends (ranks 0-7) + 14848 expert ranks '
      '(ranks 8-14855)']),
])
def test_cli_plans_deepseek_v3(args, lines, capsys):
    assert main(['plan', *args]) == 0
    out = capsys.readouterr().out
    printed = out.splitlines()
    assert [t for t in lines if t not in printed] == []
    assert ('\nprefill: ' in out and '\ndecode: ' in out) == ('--batch-seqs' in args)


@pytest.mark.parametrize('name', PUBLISHED)
def test_cli_predicts_every_preset(name, capsys):
    """per-layer on E expert ranks and 8 front-ends, 64 sequences of 2048 tokens
    (OLMoE's context is 4096): a prediction, the KV cache as kv_token_elems says."""
    cfg = model_config(name)
    assert main(['plan', '--preset', name, '--gpus', str(cfg.n_experts + 8), '--gpus-per-node',
                 '8', '--placement', 'per-layer', '--frontends', '8', '--batch-seqs', '64',
                 '--seq-len', '2048']) == 0
    out = capsys.readouterr().out
    kv = 8 * 2048 * cfg.n_layers * cfg.kv_token_elems * 2          # 8 sequences each
    assert f'KV cache {kv / 1e9:.2f} GB' in out
    assert '\nprefill: ' in out and ' tokens/s (131,072 tokens in ' in out
    assert '\ndecode: ' in out


def test_dedicated_deepseek_v3_on_3904_is_refused_in_one_line(capsys):
    assert main(['plan', '--preset', 'deepseek-v3', '--gpus', '3904', '--placement',
                 'dedicated']) == 2
    err = capsys.readouterr().err
    assert err == ('mpimoe: error: placement dedicated needs 14848 expert ranks + F front-ends: '
                   'world size must be >= 14849 (got 3904)\n')
