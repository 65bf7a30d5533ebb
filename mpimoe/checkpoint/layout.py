"""The weight file's layout (weights/FORMAT.md, version 2; version 1 is the
same layout for a config without the version-2 groups): every tensor's name
and shape, in storage order, and how tensors are stored (16-bit words, but
FP32 for the router's score bias; read and written in slabs of bounded size).

:func:`tensor_specs` is THE definition of the layout; the writers
(:mod:`mpimoe.checkpoint.writer`, :mod:`mpimoe.checkpoint.convert`) and the
reader (:class:`mpimoe.checkpoint.weights.WeightFile`) all follow it.

    >>> from mpimoe.model.config import model_config
    >>> specs = tensor_specs(model_config('tiny'))
    >>> specs[0]
    ('embed', (256, 64))
"""

import numpy as np

__all__ = ['FORMAT', 'FORMAT_VERSION', 'READ_VERSIONS', 'WORD', 'FP32', 'SLAB_ELEMS',
           'tensor_specs', 'tensor_dtype', 'storage_of', 'expert_tensor_names',
           'nonexpert_tensor_names', 'is_expert', 'row_slabs']

FORMAT = 'mpimoe-weights'
#: the version written
FORMAT_VERSION = 2
#: the versions read (a version-1 file's config has no groups: their defaults apply)
READ_VERSIONS = (1, 2)

#: how tensors are stored: little-endian 16-bit words (the bits of their dtype) ...
WORD = np.dtype('<u2')
#: ... but for the few FP32 ones (tensor_dtype), little-endian float32
FP32 = np.dtype('<f4')
#: elements generated, written or checked per slab: 4 Mi -> 16 MiB of FP32
SLAB_ELEMS = 4 << 20


def _layer_specs(cfg, i):
    """(name, shape) of layer ``i``: attention, norms, then dense MLP or MoE."""
    d, p = cfg.d_model, f'layers/{i}'
    specs = [(f'{p}/attn_norm', (d,))] + _attention_specs(cfg, p) + [(f'{p}/ffn_norm', (d,))]
    if i < cfg.n_dense_layers:
        return specs + _mlp_specs(cfg, f'{p}/mlp', cfg.d_dense)
    specs.append((f'{p}/router', (d, cfg.n_experts)))
    if cfg.router.score_bias:
        specs.append((f'{p}/router_bias', (cfg.n_experts,)))
    if cfg.shared.n_experts:
        specs += _mlp_specs(cfg, f'{p}/shared', cfg.shared.d_hidden)
        if cfg.shared.gate:
            specs.append((f'{p}/shared_gate', (d, 1)))
    for e in range(cfg.n_experts):
        specs += _mlp_specs(cfg, f'{p}/experts/{e}', cfg.d_expert)
    return specs


def _attention_specs(cfg, p):
    """(name, shape) of one layer's attention (prefix ``p``), GQA or MLA."""
    a, d, H, hd = cfg.attention, cfg.d_model, cfg.n_heads, cfg.head_dim
    if a.mla:
        r, q = a.kv_lora_rank, H * hd
        specs = [(f'{p}/wq', (d, q))] if not a.q_lora_rank else \
            [(f'{p}/wq_a', (d, a.q_lora_rank)), (f'{p}/q_a_norm', (a.q_lora_rank,)),
             (f'{p}/wq_b', (a.q_lora_rank, q))]
        return specs + [(f'{p}/wkv_a', (d, r + a.qk_rope_head_dim)), (f'{p}/kv_a_norm', (r,)),
                        (f'{p}/wkv_b', (r, H * (a.qk_nope_head_dim + a.v_head_dim))),
                        (f'{p}/wo', (H * a.v_head_dim, d))]
    q, kv = H * hd, cfg.n_kv_heads * hd
    specs = [(f'{p}/wq', (d, q)), (f'{p}/wk', (d, kv)), (f'{p}/wv', (d, kv))]
    if a.qkv_bias:
        specs += [(f'{p}/bq', (q,)), (f'{p}/bk', (kv,)), (f'{p}/bv', (kv,))]
    if a.qk_norm != 'none':
        full = a.qk_norm == 'full'
        specs += [(f'{p}/q_norm', (q if full else hd,)), (f'{p}/k_norm', (kv if full else hd,))]
    return specs + [(f'{p}/wo', (q, d))]


def _mlp_specs(cfg, prefix, hidden):
    """(name, shape) of one MLP: gate/up [d, hidden], down [hidden, d]."""
    d = cfg.d_model
    return [(f'{prefix}/{m}', (hidden, d) if m == 'down' else (d, hidden))
            for m in cfg.expert_matrices]


def tensor_specs(cfg):
    """Every tensor of ``cfg`` as ``(name, shape)``, in storage order.

    Matrices are [in, out] (``y = x @ W``).  Names: ``embed`` [V, d], per layer
    ``layers/{i}/...`` (attention, then dense MLP or router, shared experts
    and experts), then ``final_norm`` [d] and ``lm_head`` [d, V].
    """
    d, v = cfg.d_model, cfg.vocab_size
    specs = [('embed', (v, d))]
    for i in range(cfg.n_layers):
        specs += _layer_specs(cfg, i)
    return specs + [('final_norm', (d,)), ('lm_head', (d, v))]


def tensor_dtype(name, cfg):
    """The dtype tensor ``name`` holds: ``float32`` for a router's score bias
    (a choice between near-equal scores must not move by BF16 rounding),
    else ``cfg.dtype``."""
    return 'float32' if name.endswith('/router_bias') else cfg.dtype


def storage_of(dtype):
    """The HDF5 type of a tensor of ``dtype``: FP32 or WORD."""
    return FP32 if dtype == 'float32' else WORD


def expert_tensor_names(layer, e, cfg):
    """Names of expert ``e`` of MoE layer ``layer``, one per ``cfg.expert_matrices``."""
    if layer not in cfg.moe_layers or not 0 <= e < cfg.n_experts:
        raise ValueError(f'(layer {layer}, expert {e}) is not an expert of this model: '
                         f'MoE layers {cfg.n_dense_layers}..{cfg.n_layers - 1}, '
                         f'experts 0..{cfg.n_experts - 1}')
    return [f'layers/{layer}/experts/{e}/{m}' for m in cfg.expert_matrices]


def is_expert(name):
    """Whether tensor ``name`` belongs to an expert (lies in an ``experts`` group)."""
    return '/experts/' in name


def nonexpert_tensor_names(cfg):
    """Names of every tensor outside the ``experts`` groups (a front-end's part)."""
    return [n for n, _ in tensor_specs(cfg) if not is_expert(n)]


def row_slabs(shape):
    """Row ranges ``(r0, r1)`` covering ``shape[0]`` with <= SLAB_ELEMS per slab."""
    row = int(np.prod(shape[1:], dtype=np.int64))
    step = max(1, SLAB_ELEMS // row)
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]
