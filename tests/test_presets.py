"""The presets of the models people run (mpimoe/model/config.py PRESETS) at their
real sizes, and the planner on them (no weights are ever made at these sizes).

Their parameter counts are checked against the published ones: a wrong width,
a missing shared expert or a miscounted MLA projection moves them by far more
than the 2% allowed, which is the rounding of the published figures (two or
three significant digits: Qwen3-30B-A3B's "3.3B" active is 3.35B).
"""

import numpy as np
import pytest

from mpimoe.model.config import model_config
from mpimoe.model.kvcache import BlockKVCache
from mpimoe.planning.costmodel import Workload, kv_cache_bytes, memory
from mpimoe.planning.placement import make_plan

#: preset -> (total, active) parameters, billions, as the model cards state them
#: (DeepSeek-V3: 671B without its 14B multi-token-prediction module, 37B active)
PUBLISHED = {'deepseek-v3': (671, 37), 'qwen3-235b-a22b': (235, 22),
             'qwen3-30b-a3b': (30.5, 3.3), 'mixtral-8x7b': (46.7, 12.9),
             'olmoe-1b-7b': (6.9, 1.3)}


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
