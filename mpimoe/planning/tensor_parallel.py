"""Tensor-parallel front-ends (``--tp T``) for the planner: what a group of T
front-end ranks on one node splits, what each rank then holds, and the
collectives the split adds to a pass.

The split is Megatron's: attention heads over the group (GQA: query and KV
heads, each rank the KV cache of its KV heads; MLA: the query heads and the
up-projection ``wkv_b``, while the down-projections to the latent and the
latent cache are every rank's), the dense MLPs and the shared experts
column- then row-parallel, the embedding and the LM head over the
vocabulary; norms, routers and the shared-expert gate are replicated.  One
Allreduce of the group's rows (FP32, d_model wide) follows each
row-parallel product (the attention output, a dense MLP, the shared
experts) and the embedding; the routed experts' results come back as each
rank's disjoint share of the group's tokens and are gathered (Allgather),
and so are the LM head's vocabulary slices.

    >>> from mpimoe.model.config import model_config
    >>> cfg = model_config('paper-61l')
    >>> frontend_rank_params(cfg, 1) == cfg.nonexpert_params
    True
"""

from mpimoe.errors import ConfigError

__all__ = ['tp_problems', 'check_tp', 'attention_split', 'ffn_split', 'split_params',
           'frontend_rank_params', 'kv_elems_per_rank', 'allreduce_s', 'allgather_s']


def tp_problems(cfg, tp):
    """What ``tp`` does not divide: a list of short phrases (empty when it fits)."""
    a = cfg.attention
    sizes = [('n_heads', cfg.n_heads), ('vocab_size', cfg.vocab_size)]
    if not a.mla:
        sizes.insert(1, ('n_kv_heads', cfg.n_kv_heads))
    if cfg.n_dense_layers:
        sizes.append(('d_dense', cfg.d_dense))
    if cfg.shared.n_experts:
        sizes.append(('shared d_hidden', cfg.shared.d_hidden))
    return [f'{name}={n}' for name, n in sizes if n % tp]


def check_tp(cfg, tp):
    """ConfigError (one line, naming the numbers) unless ``tp`` >= 1 divides
    everything the group splits."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConfigError(f'--tp {tp!r}: must be an integer >= 1')
    bad = tp_problems(cfg, tp)
    if bad:
        fits = [t for t in range(2, 65) if not tp_problems(cfg, t)]
        raise ConfigError(f'--tp {tp} must divide {", ".join(bad)} (the front-end group '
                          f'splits them); --tp that fit: 1' + ''.join(f', {t}' for t in fits))


def attention_split(cfg):
    """Parameters of one layer's attention that a TP group divides (the rest of
    ``cfg.attention_params`` every rank holds)."""
    a, d, H = cfg.attention, cfg.d_model, cfg.n_heads
    if a.mla:
        # the query up-projection (or the direct query), wkv_b and wo; the
        # down-projections to the latents, their norms and the layer norms stay
        qk = H * cfg.head_dim
        q = a.q_lora_rank * qk if a.q_lora_rank else d * qk
        return q + a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim) + H * a.v_head_dim * d
    # wq, wk, wv, wo, their biases and a QK-norm over all heads; a per-head
    # QK-norm and the layer norms stay
    q, kv = H * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return 2 * d * q + 2 * d * kv + (q + 2 * kv) * a.qkv_bias + (q + kv) * (a.qk_norm == 'full')


def ffn_split(cfg, i):
    """Parameters of layer i's non-expert FFN that a TP group divides: the
    dense MLP, or the shared experts (the router and the gate stay)."""
    mlp = len(cfg.expert_matrices) * cfg.d_model
    return mlp * (cfg.d_dense if i < cfg.n_dense_layers else cfg.shared.d_hidden)


def split_params(cfg):
    """(split, replicated): the non-expert parameters a TP group divides over
    its ranks and those every rank holds; they sum to ``cfg.nonexpert_params``."""
    split = 2 * cfg.vocab_size * cfg.d_model + sum(
        attention_split(cfg) + ffn_split(cfg, i) for i in range(cfg.n_layers))
    return split, cfg.nonexpert_params - split


def frontend_rank_params(cfg, tp):
    """Non-expert parameters one rank of a TP group of ``tp`` holds."""
    split, replicated = split_params(cfg)
    return split // tp + replicated


def kv_elems_per_rank(cfg, tp):
    """KV cache elements per token and layer on one rank of the group: its
    KV heads' keys and values (GQA), or the whole latent and RoPE key (MLA)."""
    return cfg.kv_token_elems if cfg.attention.mla else cfg.kv_token_elems // tp


def allreduce_s(tp, nbytes, c):
    """Seconds of a ring Allreduce of ``nbytes`` over a group of ``tp`` ranks on
    one node: 2 (T-1)/T of the bytes over each GPU's NVLink, 2 (T-1) latencies
    (constants ``c``: nvlink_gbs, alpha_us); 0 for T = 1."""
    return 2 * allgather_s(tp, nbytes, c)


def allgather_s(tp, nbytes, c):
    """Seconds of a ring Allgather whose result is ``nbytes``: (T-1)/T of them
    over NVLink and T-1 latencies; 0 for T = 1."""
    return (tp - 1) * (nbytes / tp / (c.nvlink_gbs * 1e9) + c.alpha_us * 1e-6)
