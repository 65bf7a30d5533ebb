"""What ``mpimoe convert`` knows of each Hugging Face MoE architecture: how its
``config.json`` maps to a :class:`~mpimoe.model.config.ModelConfig` and its
tensor names to the layout (mpimoe.checkpoint.layout).

=====================  =========================================================
architecture           what differs from Mixtral
=====================  =========================================================
MixtralForCausalLM     (the base: softmax top-k renormalised, GQA, no dense layer)
Qwen2MoeForCausalLM    q/k/v biases; one gated shared expert; ``norm_topk_prob``
Qwen3MoeForCausalLM    QK-norm per head; ``head_dim`` may differ from d / heads
OlmoeForCausalLM       QK-norm over all heads of q and of k; ``norm_topk_prob``
DeepseekV3ForCausalLM  MLA, YaRN RoPE, sigmoid group-limited routing with a score
                       bias and scaling, shared experts, leading dense layers
=====================  =========================================================

DeepSeek's RoPE dimensions are interleaved (``rope_interleave``: pairs (0, 1),
(2, 3), ...); mpimoe rotates halves, pairs (i, i + dim/2), so the converter
reorders the RoPE columns of the query and of the shared RoPE key to [even |
odd] (:func:`rope_order`): the scores, dot products over the same pairs, are
unchanged.  Its multi-token-prediction layers (``num_nextn_predict_layers``,
tensors of layer index >= ``num_hidden_layers``) are not used for inference
and are skipped.
"""

import numpy as np

from mpimoe.errors import ConfigError, clip
from mpimoe.model.config import build_config

__all__ = ['ARCHITECTURES', 'hf_model_config', 'hf_source', 'rope_order', 'listed']

ARCHITECTURES = ('MixtralForCausalLM', 'Qwen2MoeForCausalLM', 'Qwen3MoeForCausalLM',
                 'OlmoeForCausalLM', 'DeepseekV3ForCausalLM')

#: problems of one kind listed by name before "and N more"
_LIST_MAX = 6

#: config.json keys that do not change inference results (metadata, training,
#: generation defaults; ``auto_map``: the remote code DeepSeek-V3's hub files
#: name, which transformers' own class replaces), for every architecture
_HARMLESS = {
    'auto_map', '_name_or_path', 'architectures', 'model_type', 'transformers_version',
    'torch_dtype', 'dtype', 'use_cache', 'bos_token_id', 'pad_token_id', 'initializer_range',
    'attention_dropout', 'output_router_logits', 'router_aux_loss_coef', 'router_jitter_noise',
    'output_attentions', 'output_hidden_states', 'return_dict', 'tokenizer_class',
    'aux_loss_alpha', 'seq_aux', 'pretraining_tp', 'ep_size', 'max_window_layers'}
#: keys every architecture reads: config.json key -> ModelConfig field (required)
_COMMON = {'hidden_size': 'd_model', 'num_hidden_layers': 'n_layers',
           'num_experts_per_tok': 'top_k', 'num_attention_heads': 'n_heads',
           'vocab_size': 'vocab_size', 'rms_norm_eps': 'norm_eps',
           'max_position_embeddings': 'max_position_embeddings'}
#: keys read by the common checks (optional)
_CHECKED = {'hidden_act', 'tie_word_embeddings', 'rope_scaling', 'rope_parameters',
            'rope_theta', 'sliding_window', 'use_sliding_window', 'attention_bias', 'mlp_bias',
            'head_dim', 'eos_token_id', 'num_key_value_heads', 'intermediate_size',
            'moe_intermediate_size', 'norm_topk_prob', 'quantization_config', 'layer_types'}
#: keys an architecture reads besides those
_OWN = {'MixtralForCausalLM': {'num_local_experts'},
        'Qwen2MoeForCausalLM': {'num_experts', 'num_local_experts', 'qkv_bias',
                                'shared_expert_intermediate_size', 'decoder_sparse_step',
                                'mlp_only_layers'},
        'Qwen3MoeForCausalLM': {'num_experts', 'num_local_experts', 'decoder_sparse_step',
                                'mlp_only_layers'},
        'OlmoeForCausalLM': {'num_experts', 'num_local_experts', 'clip_qkv'},
        'DeepseekV3ForCausalLM': {'n_routed_experts', 'n_shared_experts', 'first_k_dense_replace',
                                  'n_group', 'topk_group', 'routed_scaling_factor', 'q_lora_rank',
                                  'kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim',
                                  'v_head_dim', 'rope_interleave', 'num_nextn_predict_layers',
                                  'topk_method', 'scoring_func', 'moe_layer_freq',
                                  'qk_head_dim'}}


def listed(what, items):
    """``'missing tensors (9): a, b, c, d, e, f (and 3 more)'``."""
    items = list(items)
    shown = ', '.join(map(str, items[:_LIST_MAX]))
    more = f' (and {len(items) - _LIST_MAX} more)' if len(items) > _LIST_MAX else ''
    return f'{what} ({len(items)}): {shown}{more}'


# ---------------------------------------------------------------- config

def _common_problems(hf, arch):
    """Features of config.json ``hf`` mpimoe does not implement, for any architecture."""
    problems = []
    if hf.get('hidden_act', 'silu') != 'silu':
        problems.append(f'hidden_act {clip(repr(hf["hidden_act"]))}: only silu (SwiGLU experts)')
    if hf.get('tie_word_embeddings', False):
        problems.append('tie_word_embeddings true: mpimoe has an untied lm_head')
    window, max_pos = hf.get('sliding_window'), hf.get('max_position_embeddings')
    if hf.get('use_sliding_window'):
        problems.append('use_sliding_window true: mpimoe attends to the whole sequence')
    elif 'use_sliding_window' not in hf and window is not None and \
            not (isinstance(window, int) and isinstance(max_pos, int) and window >= max_pos):
        problems.append(f'sliding_window {clip(window)} < max_position_embeddings '
                        f'{clip(max_pos)}: mpimoe attends to the whole sequence')
    kinds = hf.get('layer_types')
    if kinds is not None and (not isinstance(kinds, list)
                              or any(k != 'full_attention' for k in kinds)):
        problems.append(f'layer_types {clip(repr(kinds))}: only full_attention')
    for key in ('attention_bias', 'mlp_bias'):
        if hf.get(key):
            problems.append(f'{key} true: mpimoe has no such biases')
    unknown = sorted(set(hf) - _HARMLESS - set(_COMMON) - _CHECKED - _OWN[arch])
    if unknown:
        problems.append(listed(f'unknown config keys for {arch} (they may change the results)',
                               map(clip, unknown)))
    return problems


def _rope(hf, arch):
    """(rope_theta or None, AttentionConfig fields of the RoPE scaling, problems)."""
    params = hf.get('rope_parameters') if isinstance(hf.get('rope_parameters'), dict) else {}
    scaling = hf.get('rope_scaling') if isinstance(hf.get('rope_scaling'), dict) else {}
    rope = {**params, **scaling}
    theta = hf.get('rope_theta', rope.get('rope_theta'))
    kind = rope.get('rope_type', rope.get('type', 'default'))
    plain = {'rope_type', 'type', 'rope_theta'}
    if kind == 'default' and not set(rope) - plain:
        return theta, {}, []
    if kind == 'yarn' and arch == 'DeepseekV3ForCausalLM':
        known = plain | {'factor', 'original_max_position_embeddings', 'beta_fast', 'beta_slow',
                         'mscale', 'mscale_all_dim', 'truncate'}
        if not set(rope) - known and rope.get('truncate', True) and \
                rope.get('original_max_position_embeddings') and rope.get('factor'):
            return theta, {'rope_scaling': 'yarn', 'rope_factor': rope['factor'],
                           'rope_original_max_position': rope['original_max_position_embeddings'],
                           'yarn_beta_fast': rope.get('beta_fast') or 32.0,
                           'yarn_beta_slow': rope.get('beta_slow') or 1.0,
                           'yarn_mscale': rope.get('mscale') or 0.0,
                           'yarn_mscale_all_dim': rope.get('mscale_all_dim') or 0.0}, []
    return theta, {}, [f'RoPE scaling {clip(repr(rope))}: only plain RoPE (and YaRN for '
                       f'DeepSeek-V3, with factor and original_max_position_embeddings)']


def _first(hf, *keys):
    """The value of the first of ``keys`` that config.json ``hf`` gives (not null)."""
    return next((hf[k] for k in keys if hf.get(k) is not None), None)


def _dense_prefix(hf, n_layers, problems):
    """Qwen's dense layers (``mlp_only_layers``, ``decoder_sparse_step``) as the
    count of leading ones; a pattern that is not a prefix is a problem."""
    only, step = hf.get('mlp_only_layers') or [], hf.get('decoder_sparse_step') or 1
    if not isinstance(n_layers, int) or not isinstance(step, int) or step < 1 \
            or not isinstance(only, list):
        return 0
    dense = [i for i in range(n_layers) if i in only or (i + 1) % step]
    if dense != list(range(len(dense))):
        problems.append(f'dense layers {clip(dense)} (mlp_only_layers, decoder_sparse_step): '
                        f'mpimoe runs the dense layers first, then MoE layers only')
    return len(dense)


def _arch_fields(hf, arch, problems):
    """ModelConfig fields (groups as dicts) particular to ``arch``."""
    moe_width = _first(hf, 'moe_intermediate_size', 'intermediate_size')
    fields = {'n_experts': _first(hf, 'num_local_experts', 'num_experts', 'n_routed_experts'),
              'n_kv_heads': hf.get('num_key_value_heads'), 'd_expert': moe_width,
              'd_dense': hf.get('intermediate_size') or moe_width, 'n_dense_layers': 0}
    # absent: the default of transformers' config class (True for DeepSeek-V3)
    router = {'norm_topk_prob': bool(hf.get('norm_topk_prob', arch == 'DeepseekV3ForCausalLM'))}
    attention, shared = {}, {}
    if arch == 'MixtralForCausalLM':
        fields['d_expert'] = hf.get('intermediate_size')
        router = {}
    elif arch == 'Qwen2MoeForCausalLM':
        fields['n_dense_layers'] = _dense_prefix(hf, hf.get('num_hidden_layers'), problems)
        attention['qkv_bias'] = bool(hf.get('qkv_bias', True))
        if hf.get('shared_expert_intermediate_size'):
            shared = {'n_experts': 1, 'd_expert': hf['shared_expert_intermediate_size'],
                      'gate': True}
    elif arch == 'Qwen3MoeForCausalLM':
        fields['n_dense_layers'] = _dense_prefix(hf, hf.get('num_hidden_layers'), problems)
        attention['qk_norm'] = 'head'
    elif arch == 'OlmoeForCausalLM':
        attention['qk_norm'] = 'full'
        if hf.get('clip_qkv') is not None:
            problems.append(f'clip_qkv {clip(hf["clip_qkv"])}: mpimoe does not clip q, k, v')
    else:
        _deepseek_fields(hf, fields, router, attention, shared, problems)
    return fields, router, attention, shared


def _deepseek_fields(hf, fields, router, attention, shared, problems):
    """DeepSeek-V3's MLA, routing and shared experts into the field dicts."""
    for key, want in (('topk_method', 'noaux_tc'), ('scoring_func', 'sigmoid')):
        if hf.get(key, want) != want:
            problems.append(f'{key} {clip(repr(hf[key]))}: only {want!r} (DeepSeek-V3)')
    if hf.get('moe_layer_freq', 1) != 1:
        problems.append(f'moe_layer_freq {clip(hf["moe_layer_freq"])}: only 1 (every layer '
                        f'after the dense ones is MoE)')
    nope, rope = hf.get('qk_nope_head_dim'), hf.get('qk_rope_head_dim')
    if hf.get('qk_head_dim') is not None and isinstance(nope, int) and isinstance(rope, int) \
            and hf['qk_head_dim'] != nope + rope:
        problems.append(f'qk_head_dim {clip(hf["qk_head_dim"])}: must be qk_nope_head_dim + '
                        f'qk_rope_head_dim = {nope + rope}')
    fields['n_kv_heads'] = hf.get('num_attention_heads')
    fields['n_dense_layers'] = hf.get('first_k_dense_replace') or 0
    fields['head_dim'] = nope + rope if isinstance(nope, int) and isinstance(rope, int) else None
    router.update(scoring='sigmoid', score_bias=True, n_group=hf.get('n_group') or 1,
                  topk_group=hf.get('topk_group') or 1,
                  routed_scaling_factor=hf.get('routed_scaling_factor', 1.0))
    attention.update(kind='mla', q_lora_rank=hf.get('q_lora_rank') or 0,
                     kv_lora_rank=hf.get('kv_lora_rank'), qk_nope_head_dim=nope,
                     qk_rope_head_dim=rope, v_head_dim=hf.get('v_head_dim'))
    if hf.get('n_shared_experts'):
        shared.update(n_experts=hf['n_shared_experts'], d_expert=fields['d_expert'])


def hf_model_config(hf, eos, eos_from='config.json'):
    """config.json ``hf`` (dict) and the end-of-sequence ids (tuple; read from
    the file ``eos_from``) -> (ModelConfig or None, architecture or None,
    problems [str]).  The config is None when a
    required key is missing or invalid; problems lists every feature mpimoe
    cannot run as well."""
    archs = hf.get('architectures')
    arch = archs[0] if isinstance(archs, list) and len(archs) == 1 \
        and archs[0] in ARCHITECTURES else None
    if arch is None:
        return None, None, [f'architectures {clip(repr(archs))}: mpimoe converts '
                            f'{", ".join(ARCHITECTURES)}']
    problems = _common_problems(hf, arch)
    fields, router, attention, shared = _arch_fields(hf, arch, problems)
    theta, scaling, rope_problems = _rope(hf, arch)
    problems += rope_problems
    fields.update({f: hf.get(k) for k, f in _COMMON.items()})
    d, heads = hf.get('hidden_size'), hf.get('num_attention_heads')
    # as transformers: head_dim, else hidden_size // num_attention_heads
    fields.setdefault('head_dim', hf.get('head_dim') or (
        d // heads if isinstance(d, int) and isinstance(heads, int) and heads > 0 else None))
    missing = [k for k, v in [*((k, hf.get(k)) for k in _COMMON), ('rope_theta', theta),
                              *(('n_experts / d_expert / num_key_value_heads', v)
                                for v in (fields['n_experts'], fields['d_expert'],
                                          fields['n_kv_heads']))] if v is None]
    if missing:
        return None, arch, problems + [listed('missing config keys', missing)]
    try:
        cfg = build_config({**fields, 'expert_kind': 'swiglu', 'rope_theta': theta,
                            'dtype': 'bfloat16', 'eos_token_id': eos, 'router': router,
                            'attention': {**attention, **scaling}, 'shared': shared})
    except (ConfigError, TypeError) as e:
        given = 'config.json does' if eos_from == 'config.json' else \
            f'config.json and {eos_from} do'
        return None, arch, problems + [f'{given} not give a valid model: {e}']
    return cfg, arch, problems


# ---------------------------------------------------------------- names

_TOP = {'embed': ('model.embed_tokens.weight', False), 'final_norm': ('model.norm.weight', False),
        'lm_head': ('lm_head.weight', True)}
#: per-layer leaf -> (Hugging Face name after ``model.layers.{i}.``, transposed?)
_LAYER = {'attn_norm': ('input_layernorm.weight', False),
          'ffn_norm': ('post_attention_layernorm.weight', False),
          'wq': ('self_attn.q_proj.weight', True), 'wk': ('self_attn.k_proj.weight', True),
          'wv': ('self_attn.v_proj.weight', True), 'wo': ('self_attn.o_proj.weight', True),
          'bq': ('self_attn.q_proj.bias', False), 'bk': ('self_attn.k_proj.bias', False),
          'bv': ('self_attn.v_proj.bias', False), 'q_norm': ('self_attn.q_norm.weight', False),
          'k_norm': ('self_attn.k_norm.weight', False),
          'wq_a': ('self_attn.q_a_proj.weight', True),
          'q_a_norm': ('self_attn.q_a_layernorm.weight', False),
          'wq_b': ('self_attn.q_b_proj.weight', True),
          'wkv_a': ('self_attn.kv_a_proj_with_mqa.weight', True),
          'kv_a_norm': ('self_attn.kv_a_layernorm.weight', False),
          'wkv_b': ('self_attn.kv_b_proj.weight', True),
          'router': ('mlp.gate.weight', True),
          'router_bias': ('mlp.gate.e_score_correction_bias', False),
          'shared_gate': ('mlp.shared_expert_gate.weight', True)}
_MATRIX = {'gate': 'gate_proj', 'up': 'up_proj', 'down': 'down_proj'}
_MIXTRAL_EXPERT = {'gate': 'w1', 'up': 'w3', 'down': 'w2'}


def hf_source(name, arch='MixtralForCausalLM'):
    """mpimoe tensor name -> (Hugging Face tensor name, transposed?).

        >>> hf_source('layers/3/experts/5/up')
        ('model.layers.3.block_sparse_moe.experts.5.w3.weight', True)
        >>> hf_source('layers/0/shared/down', 'DeepseekV3ForCausalLM')
        ('model.layers.0.mlp.shared_experts.down_proj.weight', True)
    """
    parts = name.split('/')
    if len(parts) == 1:
        return _TOP[name]
    prefix = f'model.layers.{parts[1]}.'
    mixtral = arch == 'MixtralForCausalLM'
    if len(parts) == 3:
        hf, transposed = _LAYER[parts[2]]
        return prefix + (hf.replace('mlp.', 'block_sparse_moe.') if mixtral else hf), transposed
    if parts[2] == 'experts':
        if mixtral:
            return f'{prefix}block_sparse_moe.experts.{parts[3]}.' \
                   f'{_MIXTRAL_EXPERT[parts[4]]}.weight', True
        return f'{prefix}mlp.experts.{parts[3]}.{_MATRIX[parts[4]]}.weight', True
    group = {'mlp': 'mlp', 'shared': 'mlp.shared_experts' if arch == 'DeepseekV3ForCausalLM'
             else 'mlp.shared_expert'}[parts[2]]
    return f'{prefix}{group}.{_MATRIX[parts[3]]}.weight', True


def rope_order(name, cfg, interleaved):
    """The column order that brings tensor ``name`` ([in, out], after the
    transpose) from interleaved to rotate-half RoPE: int [out], or None when
    it has no RoPE columns (or the source is not interleaved)."""
    a = cfg.attention
    leaf = name.rsplit('/', 1)[-1]
    if not (interleaved and a.mla and leaf in ('wq', 'wq_b', 'wkv_a')):
        return None
    rope = a.qk_rope_head_dim
    halves = np.concatenate([np.arange(0, rope, 2), np.arange(1, rope, 2)])
    if leaf == 'wkv_a':
        return np.concatenate([np.arange(a.kv_lora_rank), a.kv_lora_rank + halves])
    head = np.concatenate([np.arange(a.qk_nope_head_dim), a.qk_nope_head_dim + halves])
    return (np.arange(cfg.n_heads)[:, None] * cfg.head_dim + head).ravel()
