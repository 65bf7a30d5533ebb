"""``mpimoe convert`` of the architectures beside Mixtral (mpimoe/checkpoint/hf_archs.py).

Random tiny transformers models of each architecture (every parameter and the
score-bias buffer drawn N(0, 1), so no two tensors agree by accident) are
saved in BF16 by ``save_pretrained`` and converted; every tensor of the
weight file must equal its Hugging Face tensor bit for bit: conversion only
moves BF16 values (transposes, DeepSeek's RoPE row permutation, the score
bias widened exactly to FP32), it never computes one.  The tests name the
Hugging Face tensor of each mpimoe tensor themselves (``_mpimoe_name``), so a
swapped mapping fails.  FP8 checkpoints are built by hand (``_write_checkpoint``
of tests/test_convert.py) and compared with a NumPy block dequantization done
the same way (FP32 product, one rounding to BF16), so equality is exact too.
"""

import json
import os
import re
import shutil

import ml_dtypes
import numpy as np
import pytest

from mpimoe.checkpoint.layout import tensor_specs
from mpimoe.checkpoint.weights import WeightFile
from mpimoe.cli.main import main
from mpimoe.model.config import AttentionConfig, RouterConfig, SharedExpertConfig
from test_convert import BF16, _hf_config, _hf_tensors, _write_checkpoint

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
TINY = dict(vocab_size=96, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
            rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=False)
YARN = {'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 128,
        'beta_fast': 32.0, 'beta_slow': 1.0, 'mscale': 0.8, 'mscale_all_dim': 0.6,
        'rope_theta': 5e4}
DEEPSEEK = dict(TINY, num_key_value_heads=4, intermediate_size=40, moe_intermediate_size=24,
                n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
                first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10)

#: name -> (transformers config class, its arguments, what the converted config must hold)
MODELS = {
    'qwen2': ('Qwen2MoeConfig', dict(TINY, num_key_value_heads=2, intermediate_size=40,
                                     moe_intermediate_size=24, shared_expert_intermediate_size=32,
                                     num_experts=6, num_experts_per_tok=2),
              dict(n_experts=6, d_expert=24, n_kv_heads=2, head_dim=12, n_dense_layers=0,
                   router=RouterConfig(norm_topk_prob=False),
                   attention=AttentionConfig(qkv_bias=True),
                   shared=SharedExpertConfig(n_experts=1, d_expert=32, gate=True))),
    'qwen3': ('Qwen3MoeConfig', dict(TINY, num_key_value_heads=2, head_dim=16,
                                     intermediate_size=40, moe_intermediate_size=24,
                                     num_experts=6, num_experts_per_tok=3, norm_topk_prob=True),
              dict(n_experts=6, top_k=3, d_expert=24, n_kv_heads=2, head_dim=16,
                   router=RouterConfig(norm_topk_prob=True),
                   attention=AttentionConfig(qk_norm='head'), shared=SharedExpertConfig())),
    'olmoe': ('OlmoeConfig', dict(TINY, num_key_value_heads=2, intermediate_size=24,
                                  num_experts=6, num_experts_per_tok=2, eos_token_id=5),
              dict(n_experts=6, d_expert=24, n_kv_heads=2, head_dim=12, eos_token_id=(5,),
                   router=RouterConfig(norm_topk_prob=False),
                   attention=AttentionConfig(qk_norm='full'), shared=SharedExpertConfig())),
    # low-rank queries, YaRN, interleaved RoPE (permuted on conversion)
    'deepseek': ('DeepseekV3Config', dict(DEEPSEEK, q_lora_rank=16, rope_parameters=YARN),
                 dict(n_experts=8, d_expert=24, d_dense=40, n_dense_layers=1, n_kv_heads=4,
                      head_dim=14, rope_theta=5e4,
                      router=RouterConfig(scoring='sigmoid', norm_topk_prob=True, n_group=4,
                                          topk_group=2, routed_scaling_factor=2.5,
                                          score_bias=True),
                      attention=AttentionConfig(
                          kind='mla', q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8,
                          qk_rope_head_dim=6, v_head_dim=10, rope_scaling='yarn', rope_factor=4.0,
                          rope_original_max_position=128, yarn_mscale=0.8,
                          yarn_mscale_all_dim=0.6),
                      shared=SharedExpertConfig(n_experts=2, d_expert=24))),
    # queries projected directly, plain RoPE in rotate-half layout (not permuted)
    'deepseek-q-direct': ('DeepseekV3Config', dict(DEEPSEEK, q_lora_rank=None,
                                                   rope_interleave=False, norm_topk_prob=False),
                          dict(n_dense_layers=1, head_dim=14,
                               router=RouterConfig(scoring='sigmoid', norm_topk_prob=False,
                                                   n_group=4, topk_group=2,
                                                   routed_scaling_factor=2.5, score_bias=True),
                               attention=AttentionConfig(kind='mla', kv_lora_rank=12,
                                                         qk_nope_head_dim=8, qk_rope_head_dim=6,
                                                         v_head_dim=10))),
}

#: Hugging Face name inside a layer -> mpimoe leaf (MoE-block names under "mlp.")
_LEAVES = {
    'input_layernorm.weight': 'attn_norm', 'post_attention_layernorm.weight': 'ffn_norm',
    'self_attn.q_proj.weight': 'wq', 'self_attn.k_proj.weight': 'wk',
    'self_attn.v_proj.weight': 'wv', 'self_attn.o_proj.weight': 'wo',
    'self_attn.q_proj.bias': 'bq', 'self_attn.k_proj.bias': 'bk', 'self_attn.v_proj.bias': 'bv',
    'self_attn.q_norm.weight': 'q_norm', 'self_attn.k_norm.weight': 'k_norm',
    'self_attn.q_a_proj.weight': 'wq_a', 'self_attn.q_a_layernorm.weight': 'q_a_norm',
    'self_attn.q_b_proj.weight': 'wq_b', 'self_attn.kv_a_proj_with_mqa.weight': 'wkv_a',
    'self_attn.kv_a_layernorm.weight': 'kv_a_norm', 'self_attn.kv_b_proj.weight': 'wkv_b',
    'mlp.gate.weight': 'router', 'mlp.gate.e_score_correction_bias': 'router_bias',
    'mlp.shared_expert_gate.weight': 'shared_gate'}
MIXTRAL_W = {'1': 'gate', '3': 'up', '2': 'down'}
_TOP = {'model.embed_tokens.weight': 'embed', 'model.norm.weight': 'final_norm',
        'lm_head.weight': 'lm_head'}


def _mpimoe_name(hf):
    """Hugging Face tensor name -> mpimoe tensor name."""
    if hf in _TOP:
        return _TOP[hf]
    layer, rest = re.fullmatch(r'model\.layers\.(\d+)\.(.+)', hf).groups()
    # Mixtral's names of the MoE block
    rest = re.sub(r'^block_sparse_moe\.', 'mlp.', rest)
    rest = re.sub(r'\.w([123])\.weight$', lambda m: f'.{MIXTRAL_W[m[1]]}_proj.weight', rest)
    mlp = re.fullmatch(r'mlp\.(?:experts\.(\d+)\.|(shared_experts?)\.)?(gate|up|down)_proj\.weight',
                       rest)
    if mlp:
        expert, shared, matrix = mlp.groups()
        group = f'experts/{expert}' if expert else 'shared' if shared else 'mlp'
        return f'layers/{layer}/{group}/{matrix}'
    return f'layers/{layer}/{_LEAVES[rest]}'


def _rotate_half_rows(w, heads, nope, rope):
    """HF rows [heads x (nope + rope), in] with each head's rope rows interleaved
    (pairs 2i, 2i+1) -> rope rows as [evens | odds] (rotate-half pairs i, i + rope/2)."""
    w = w.reshape(heads, nope + rope, -1)
    part = w[:, nope:]
    return np.concatenate([w[:, :nope], part[:, 0::2], part[:, 1::2]], axis=1) \
        .reshape(heads * (nope + rope), -1)


def _expected(hf_name, a, cfg, interleaved):
    """(mpimoe name, what the weight file must hold) for HF tensor ``a``
    (BF16 or FP32 values); ``interleaved``: DeepSeek's RoPE layout."""
    name = _mpimoe_name(hf_name)
    at = cfg.attention
    if interleaved:
        if name.endswith(('/wq', '/wq_b')):
            a = _rotate_half_rows(a, cfg.n_heads, at.qk_nope_head_dim, at.qk_rope_head_dim)
        elif name.endswith('/wkv_a'):
            a = _rotate_half_rows(a, 1, at.kv_lora_rank, at.qk_rope_head_dim)
    if name.endswith('router_bias'):
        return name, a.astype(np.float32)
    return name, a.T if a.ndim == 2 and name != 'embed' else a


def _read_safetensors(directory):
    """{name: array} of a save_pretrained directory, BF16 as ml_dtypes bfloat16."""
    from safetensors.torch import load_file
    import torch
    out = {}
    for file in sorted(os.listdir(directory)):
        if file.endswith('.safetensors'):
            for name, t in load_file(os.path.join(directory, file)).items():
                assert t.dtype == torch.bfloat16, name
                out[name] = t.view(torch.int16).numpy().view(BF16)
    return out


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    """Factory: name of MODELS -> directory of its random model saved in BF16."""
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    torch.set_num_threads(1)
    root, made = tmp_path_factory.mktemp('archs'), {}

    def make(name):
        if name not in made:
            cls, kwargs, _ = MODELS[name]
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(
                getattr(transformers, cls)(**kwargs))
            with torch.no_grad():
                for t in model.state_dict().values():
                    t.normal_()
            model.to(torch.bfloat16).save_pretrained(root / name)
            made[name] = root / name
        return made[name]

    return make


def _convert(src, out, *extra):
    return main(['convert', '--from-hf', str(src), '--out', str(out), *extra])


def _assert_converted(out, hf_tensors, interleaved=False, skipped=()):
    """Every tensor of ``out`` is its HF tensor, and every HF tensor (but
    ``skipped``) is in ``out``; -> the config."""
    with WeightFile(out) as wf:
        assert wf.validate() == []
        cfg = wf.config
        specs = dict(tensor_specs(cfg))
        seen = set()
        for hf_name, a in hf_tensors.items():
            if hf_name in skipped:
                continue
            name, want = _expected(hf_name, a, cfg, interleaved)
            got = wf.read(name)
            assert got.shape == specs[name], name
            assert got.dtype == want.dtype and got.tobytes() == np.ascontiguousarray(want) \
                .tobytes(), f'{name} differs from {hf_name}'
            seen.add(name)
        assert seen == set(specs)
        return cfg


@pytest.mark.parametrize('name', MODELS)
def test_architecture_converts_bit_for_bit(name, saved, tmp_path, capsys):
    directory = saved(name)
    out = tmp_path / 'w.h5'
    assert _convert(directory, out) == 0
    arch = json.loads((directory / 'config.json').read_text())['architectures'][0]
    assert f'({arch})' in capsys.readouterr().out
    interleaved = name == 'deepseek'
    cfg = _assert_converted(out, _read_safetensors(directory), interleaved)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.vocab_size, cfg.norm_eps) == \
        (48, 3, 4, 96, 1e-6)
    assert (cfg.max_position_embeddings, cfg.expert_kind, cfg.dtype) == (512, 'swiglu', 'bfloat16')
    for field, value in MODELS[name][2].items():
        assert getattr(cfg, field) == value, field


def test_multi_token_prediction_layer_is_skipped(saved, tmp_path, capsys):
    """DeepSeek-V3's checkpoints carry layer num_hidden_layers (MTP), which
    mpimoe (and transformers) do not run; a layer beyond it is refused."""
    from safetensors.torch import load_file, save_file
    src = tmp_path / 'hf'
    shutil.copytree(saved('deepseek'), src)
    tensors = load_file(src / 'model.safetensors')
    mtp = {f'model.layers.3.{n[len("model.layers.2."):]}': t.clone()
           for n, t in tensors.items() if n.startswith('model.layers.2.')}
    save_file({**tensors, **mtp}, src / 'model.safetensors', metadata={'format': 'pt'})
    assert _convert(src, tmp_path / 'w.h5') == 0
    assert f'note: skipping the {len(mtp)} tensor(s) of the multi-token-prediction layer(s) 3:' \
        in capsys.readouterr().out
    _assert_converted(tmp_path / 'w.h5', _read_safetensors(src), True, skipped=set(mtp))
    save_file({**tensors, 'model.layers.4.input_layernorm.weight': tensors['model.norm.weight']
                                                                   .clone()},
              src / 'model.safetensors', metadata={'format': 'pt'})
    assert _convert(src, tmp_path / 'w2.h5') == 65
    assert 'unexpected tensors (a feature mpimoe lacks, e.g. biases or shared experts?) (1): ' \
        'model.layers.4.input_layernorm.weight' in capsys.readouterr().err


# ---------------------------------------------------------------- FP8

BLOCK = [16, 32]        # not square, and neither divides every matrix: edge blocks are partial
QUANT = {'quant_method': 'fp8', 'fmt': 'e4m3', 'activation_scheme': 'dynamic',
         'weight_block_size': BLOCK}


def _fp8_checkpoint(directory, quantized):
    """A Mixtral checkpoint whose ``quantized`` matrices are FP8 with random
    scales of BLOCK blocks; -> (config, {name: BF16 or FP8 or FP32 array})."""
    hf = _hf_config(quantization_config=QUANT)
    rng = np.random.default_rng(3)
    tensors = {n: a.astype(BF16) for n, a in _hf_tensors(hf).items()}
    for name in quantized:
        rows, cols = tensors[name].shape
        tensors[name] = (4 * rng.standard_normal((rows, cols), np.float32)).astype(FP8)
        scales = (-(-rows // BLOCK[0]), -(-cols // BLOCK[1]))
        tensors[name + '_scale_inv'] = rng.uniform(1e-3, 2, scales).astype(np.float32)
    _write_checkpoint(directory, hf, tensors, dtype=np.float32)
    return hf, tensors


def _dequantized(w, scale):
    """NumPy block dequantization: w [r, c] FP8 times the scale of its block -> BF16."""
    full = np.repeat(np.repeat(scale, BLOCK[0], axis=0), BLOCK[1], axis=1)[:w.shape[0], :w.shape[1]]
    return (w.astype(np.float32) * full).astype(BF16)


FP8_MATRICES = ('model.layers.0.self_attn.q_proj.weight', 'model.layers.1.self_attn.o_proj.weight',
                'model.layers.1.block_sparse_moe.experts.4.w2.weight', 'lm_head.weight')


def test_fp8_blocks_are_dequantized(tmp_path, capsys):
    _, tensors = _fp8_checkpoint(tmp_path / 'hf', FP8_MATRICES)
    assert _convert(tmp_path / 'hf', tmp_path / 'w.h5') == 0
    assert 'note: dequantizing 4 FP8 (e4m3) tensors with their 16x32 block scales to bfloat16' \
        in capsys.readouterr().out
    plain = {n: a for n, a in tensors.items() if a.dtype == BF16}
    for name in FP8_MATRICES:
        plain[name] = _dequantized(tensors[name], tensors[name + '_scale_inv'])
    _assert_converted(tmp_path / 'w.h5', plain)


# ---------------------------------------------------------------- refusals

def _edit_config(directory, **changes):
    path = directory / 'config.json'
    hf = json.loads(path.read_text())
    hf.update(changes)
    path.write_text(json.dumps(hf))


def _refused(src, tmp_path, capsys, parts):
    """Conversion fails with exit 65 and one line naming every part; nothing written."""
    out = tmp_path / 'w.h5'
    before = sorted(os.listdir(tmp_path))
    assert _convert(src, out) == 65
    err = capsys.readouterr().err
    assert err.count('\n') == 1, err
    for part in parts:
        assert part in err, (part, err)
    assert sorted(os.listdir(tmp_path)) == before


def _copy(saved, name, tmp_path):
    shutil.copytree(saved(name), tmp_path / 'hf')
    return tmp_path / 'hf'


def test_deepseek_refusals(saved, tmp_path, capsys):
    src = _copy(saved, 'deepseek', tmp_path)
    _edit_config(src, scoring_func='softmax', topk_method='group_limited_greedy',
                 moe_layer_freq=2, qk_head_dim=12,
                 rope_parameters={'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 1e4})
    _refused(src, tmp_path, capsys, [
        'cannot convert: ', "scoring_func 'softmax': only 'sigmoid'",
        "topk_method 'group_limited_greedy': only 'noaux_tc'", 'moe_layer_freq 2: only 1',
        'qk_head_dim 12: must be qk_nope_head_dim + qk_rope_head_dim',
        "RoPE scaling {'rope_type': 'linear'", 'and YaRN for DeepSeek-V3'])


def test_qwen_refusals(saved, tmp_path, capsys):
    src = _copy(saved, 'qwen2', tmp_path)
    _edit_config(src, use_sliding_window=True, decoder_sparse_step=2, mlp_only_layers=[0],
                 hidden_act='gelu', layer_types=['full_attention', 'sliding_attention',
                                                 'full_attention'], shared_expert_bias=True)
    os.remove(src / 'model.safetensors')
    _refused(src, tmp_path, capsys, [
        'use_sliding_window true: mpimoe attends to the whole sequence',
        'dense layers [0, 2] (mlp_only_layers, decoder_sparse_step): mpimoe runs the dense '
        'layers first', "hidden_act 'gelu': only silu",
        "layer_types ['full_attention', 'sliding_attention'", 'unknown config keys',
        ': shared_expert_bias', 'neither model.safetensors nor model.safetensors.index.json'])


def test_olmoe_refusals(saved, tmp_path, capsys):
    """Config and tensor problems together: clipping, rope scaling, a missing
    QK-norm and a misshapen expert."""
    from safetensors.torch import load_file, save_file
    src = _copy(saved, 'olmoe', tmp_path)
    _edit_config(src, clip_qkv=8.0, rope_scaling={'rope_type': 'yarn', 'factor': 2.0,
                                                  'original_max_position_embeddings': 64})
    tensors = load_file(src / 'model.safetensors')
    del tensors['model.layers.1.self_attn.k_norm.weight']
    tensors['model.layers.2.mlp.experts.5.up_proj.weight'] = tensors['lm_head.weight'].clone()
    save_file(tensors, src / 'model.safetensors', metadata={'format': 'pt'})
    _refused(src, tmp_path, capsys, [
        'clip_qkv 8.0: mpimoe does not clip q, k, v', "'rope_type': 'yarn'", 'only plain RoPE',
        'missing tensors (1): model.layers.1.self_attn.k_norm.weight',
        'model.layers.2.mlp.experts.5.up_proj.weight: shape [96, 48], config.json implies '
        '[24, 48]'])


def test_fp8_refusals(tmp_path, capsys):
    """A misshapen scale, a missing one, an FP8 norm and an F16 scale: one line."""
    q, o, down, _ = FP8_MATRICES
    _, tensors = _fp8_checkpoint(tmp_path / 'hf', FP8_MATRICES)
    tensors[q + '_scale_inv'] = tensors[q + '_scale_inv'][:, :1]
    del tensors[o + '_scale_inv']
    tensors['model.norm.weight'] = tensors['model.norm.weight'].astype(FP8)
    tensors[down + '_scale_inv'] = tensors[down + '_scale_inv'].astype(np.float16)
    _write_checkpoint(tmp_path / 'hf', _hf_config(quantization_config=QUANT), tensors,
                      dtype=np.float32)
    _refused(tmp_path / 'hf', tmp_path, capsys, [
        f'missing tensors (1): {o}_scale_inv',
        f'{q}_scale_inv: shape [3, 1], config.json implies [3, 2]',
        'model.norm.weight: dtype F8_E4M3 (only matrices may be FP8',
        f'{down}_scale_inv: dtype F16 (only F32)'])


def test_fp8_needs_its_quantization_config(tmp_path, capsys):
    _, tensors = _fp8_checkpoint(tmp_path / 'hf', FP8_MATRICES[:1])
    _write_checkpoint(tmp_path / 'hf', _hf_config(quantization_config=dict(QUANT, fmt='e5m2')),
                      tensors, dtype=np.float32)
    _refused(tmp_path / 'hf', tmp_path, capsys, [
        "quantization_config {'quant_method': 'fp8', 'fmt': 'e5m2'",
        'only FP8 e4m3 with a weight_block_size',
        f'{FP8_MATRICES[0]}: FP8 needs a config.json quantization_config with '
        f'weight_block_size'])
