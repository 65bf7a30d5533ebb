"""The weight file's layout (weights/FORMAT.md, version 1): every tensor's name
and shape, in storage order, and how tensors are stored (16-bit words, read and
written in slabs of bounded size).

:func:`tensor_specs` is THE definition of the layout; the writers
(:mod:`mpimoe.checkpoint.writer`, :mod:`mpimoe.checkpoint.convert`) and the
reader (:class:`mpimoe.checkpoint.weights.WeightFile`) all follow it.

    >>> from mpimoe.model.config import model_config
    >>> specs = tensor_specs(model_config('tiny'))
    >>> specs[0]
    ('embed', (256, 64))
"""

import numpy as np

__all__ = ['FORMAT', 'FORMAT_VERSION', 'WORD', 'SLAB_ELEMS', 'tensor_specs',
           'expert_tensor_names', 'nonexpert_tensor_names', 'is_expert', 'row_slabs']

FORMAT = 'mpimoe-weights'
FORMAT_VERSION = 1

#: how every tensor is stored: little-endian 16-bit words (the bits of its dtype)
WORD = np.dtype('<u2')
#: elements generated, written or checked per slab: 4 Mi -> 16 MiB of FP32
SLAB_ELEMS = 4 << 20


def _layer_specs(cfg, i):
    """(name, shape) of layer ``i``: attention, norms, then dense MLP or MoE."""
    d, q, kv = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    p = f'layers/{i}'
    specs = [(f'{p}/attn_norm', (d,)), (f'{p}/wq', (d, q)), (f'{p}/wk', (d, kv)),
             (f'{p}/wv', (d, kv)), (f'{p}/wo', (q, d)), (f'{p}/ffn_norm', (d,))]
    if i < cfg.n_dense_layers:
        return specs + _mlp_specs(cfg, f'{p}/mlp', cfg.d_dense)
    specs.append((f'{p}/router', (d, cfg.n_experts)))
    for e in range(cfg.n_experts):
        specs += _mlp_specs(cfg, f'{p}/experts/{e}', cfg.d_expert)
    return specs


def _mlp_specs(cfg, prefix, hidden):
    """(name, shape) of one MLP: gate/up [d, hidden], down [hidden, d]."""
    d = cfg.d_model
    return [(f'{prefix}/{m}', (hidden, d) if m == 'down' else (d, hidden))
            for m in cfg.expert_matrices]


def tensor_specs(cfg):
    """Every tensor of ``cfg`` as ``(name, shape)``, in storage order.

    Matrices are [in, out] (``y = x @ W``).  Names: ``embed`` [V, d], per layer
    ``layers/{i}/...``, then ``final_norm`` [d] and ``lm_head`` [d, V].
    """
    d, v = cfg.d_model, cfg.vocab_size
    specs = [('embed', (v, d))]
    for i in range(cfg.n_layers):
        specs += _layer_specs(cfg, i)
    return specs + [('final_norm', (d,)), ('lm_head', (d, v))]


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
