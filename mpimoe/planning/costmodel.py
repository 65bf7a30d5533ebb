"""Cost model: memory per rank and predicted speed of a placement plan.

Pure arithmetic on a :class:`~mpimoe.planning.placement.Plan`; no MPI, no GPU.  A *pass*
is one forward over the batch of the front-ends: the prefill of B sequences of
S tokens, or one decode step (one new token for each of B sequences at context
S).  The busiest front-end holds ceil(B/F) sequences; it splits them into
M' = min(M, ceil(B/F)) micro-batches (whole sequences, as the engine does).

**Memory** per rank, by role: weights (:meth:`Plan.weight_bytes`); KV cache on
a front-end (:func:`kv_cache_bytes`: what mpimoe.model.kvcache.BlockKVCache
allocates), ``n_layers * cfg.kv_token_elems * 2`` bytes per token (keys and
values of the KV heads, 2 * n_kv_heads * head_dim; MLA: the latent and the
RoPE key, kv_lora_rank + qk_rope_head_dim, 576 for DeepSeek-V3) of a pool of
whole blocks of BLOCK_TOKENS tokens: ``--kv-tokens`` tokens rounded up when
given, else one whole-block reservation of S tokens for each of its ceil(B/F)
sequences; communication buffers, per micro-batch slot a send and a receive
buffer of ``rows * d_model * 2`` bytes, rows = tokens of a micro-batch x top_k
on a front-end, and in the worst case (every row of every front-end's
micro-batch routed here) F x tokens x min(top_k, K) on an expert rank.

**Time** of one pass, per layer, each stage a roofline
``max(FLOPs / (gemm_tflops * gemm_efficiency), bytes read / hbm_gbs)`` per
micro-batch, times M' (weights are read again for every micro-batch):

* front-end: 2 FLOPs per weight and token of the attention
  (``cfg.attention_params``: the real projections, MLA's included), of the
  dense MLP, or of the gate and the shared experts; plus the scores and the
  weighted sum, :func:`pair_flops` per causal query-key pair (q(2c-q+1)/2 per
  sequence for q new tokens at context c): 4 * head_dim per head (GQA), or
  over MLA's absorbed cache 2 (r + rope) + 2 r per head; bytes: those weights
  and the KV cache read;
* experts: the busiest expert rank of the layer; copies per expert = B*q*top_k
  x the expert's share of the layer's load (the stats, else 1/E); an expert's
  weights are read when a micro-batch brings it a row (probability
  1 - (1 - share)^(copies of the micro-batch));
* network (alpha-beta): dispatch and combine each move every copy (d_model *
  2 bytes) once; a node's link carries what crosses it in each direction
  (sequences are dealt to front-ends round-robin; copies between a front-end
  and an expert rank on the same node go over NVLink instead); time = bytes of
  the busiest node and direction / link_gbps, or of the busiest GPU's NVLink /
  nvlink_gbs, whichever is larger.  The messages of one collective travel
  concurrently: each collective (counts, dispatch, combine; per micro-batch
  slot, empty or not, as the engine posts them) adds one alpha;
* an MoE layer pipelines its three stages over the M' micro-batches:
  ``max + (sum - max) / M'`` (the sum for one micro-batch, the slowest stage
  for many); dense layers and the LM head (the B last positions) add their
  front-end time.

**Tensor-parallel front-ends** (``plan.tp`` = T > 1; mpimoe.planning.tensor_parallel):
B is dealt to the F groups, each rank of a group holds and reads its share of
the split weights (and, GQA, of the KV cache), does its share of the FLOPs
and query-key pairs, and dispatches a T-th of its group's copies; per layer
and micro-batch it adds the group's ring collectives over NVLink on the
micro-batch's FP32 rows (an Allreduce after the attention, after a dense MLP
or the shared experts; an Allgather of the routed experts' shares), per pass
an Allreduce of the embedding and an Allgather of the logits.

Prefill tokens/s = B*S / prefill pass; time per output token = decode pass.

**Constants**: mpimoe.planning.constants (defaults, calibration JSON,
command-line options); its names are re-exported here, the planner's API.

    >>> from mpimoe.model.config import model_config
    >>> from mpimoe.planning.placement import make_plan
    >>> plan = make_plan(model_config('paper-4l'), 72, 'dedicated', n_frontends=8,
    ...                  gpus_per_node=8)
    >>> p = predict(plan, Workload(8, 128), make_constants(link_gbps=3200))
    >>> round(p.prefill_tokens_per_s, -3), p.prefill.bound, round(p.decode_ms_per_token, 2)
    (342000.0, 'experts', 1.87)
"""

from dataclasses import dataclass, fields

import numpy as np

from mpimoe.errors import ConfigError
from mpimoe.model.kvcache import BLOCK_TOKENS, blocks_for
from mpimoe.planning.constants import NAMES, Constants, load_calibration, make_constants
from mpimoe.planning.tensor_parallel import (allgather_s, allreduce_s, attention_split, ffn_split,
                                             kv_elems_per_rank)
from mpimoe.planning.text import plural as _count, size_text as _size

__all__ = ['Constants', 'Workload', 'RankMemory', 'PassTime', 'Prediction',
           'load_calibration', 'make_constants', 'kv_cache_bytes', 'memory', 'check_memory',
           'predict', 'pass_time', 'describe']

_GB = 1e9


@dataclass(frozen=True)
class Workload:
    """The batch of one pass."""

    batch_seqs: int
    """B: sequences in flight over all front-ends."""
    seq_len: int
    """S: tokens per sequence (prompt length; the context of a decode step)."""
    micro_batches: int = 2
    """M: micro-batches per pass and front-end (the engine's --micro-batches)."""

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f'{f.name}={v!r}: must be an integer >= 1')

    def seqs_per_frontend(self, plan):
        """ceil(B / F): sequences of the busiest front-end (group, with --tp)."""
        return -(-self.batch_seqs // plan.n_frontend_groups)


# -- memory --------------------------------------------------------------------

@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank needs."""

    role: str
    weights: int
    kv_cache: int
    buffers: int

    @property
    def total(self):
        return self.weights + self.kv_cache + self.buffers


def kv_cache_bytes(cfg, kv_tokens, tp=1):
    """Bytes of a front-end's KV cache pool for ``kv_tokens`` tokens: whole
    blocks of BLOCK_TOKENS tokens, ``cfg.kv_token_elems`` per token and layer in 16 bits
    (equal to ``BlockKVCache.for_tokens(cfg, kv_tokens, ...).nbytes``); on one
    rank of a TP group of ``tp``, its KV heads' share (MLA: all of it)."""
    tokens = BLOCK_TOKENS * blocks_for(kv_tokens)
    return cfg.n_layers * tokens * kv_elems_per_rank(cfg, tp) * cfg.itemsize


def memory(plan, work=None, kv_tokens=None):
    """[front-end, largest expert rank] :class:`RankMemory`.

    kv_tokens: the front-end's KV pool in tokens (``--kv-tokens``); None: with
    a workload, a whole-block reservation of S tokens for each of the busiest
    front-end's ceil(B/F) sequences, without one no KV cache.  Without a
    workload no buffers either.
    """
    cfg = plan.cfg
    wb = plan.weight_bytes()
    fe_w, ex_w = int(wb[0]), int(wb[plan.n_frontends:].max())
    if kv_tokens is None and work is not None:
        kv_tokens = work.seqs_per_frontend(plan) * BLOCK_TOKENS * blocks_for(work.seq_len)
    kv = 0 if kv_tokens is None else kv_cache_bytes(cfg, kv_tokens, plan.tp)
    if work is None:
        return [RankMemory('front-end', fe_w, kv, 0), RankMemory('expert rank', ex_w, 0, 0)]
    seqs = work.seqs_per_frontend(plan)
    M = min(work.micro_batches, seqs)
    mb_tokens = -(-seqs // M) * work.seq_len                    # largest micro-batch
    rank_tokens = -(-mb_tokens // plan.tp)      # a TP rank dispatches its share of them
    row = cfg.d_model * cfg.itemsize
    fe_buf = M * 2 * rank_tokens * cfg.top_k * row
    # a token sends at most min(top_k, K) copies to one rank (K experts of a layer)
    ex_buf = M * 2 * plan.n_frontends * rank_tokens * min(cfg.top_k, plan.experts_per_rank) \
        * row
    return [RankMemory('front-end', fe_w, int(kv), int(fe_buf)),
            RankMemory('expert rank', ex_w, 0, int(ex_buf))]


_ADVICE = {
    'front-end': 'use more front-ends (--frontends), fewer sequences (--batch-seqs) '
                 'or shorter ones (--seq-len), or split each front-end over T ranks (--tp T)',
    'front-end weights': 'its non-expert weights alone do not fit: split them over the '
                         'ranks of a node with --tp T (tensor-parallel front-ends), or use '
                         'GPUs with more memory',
    'expert rank': 'the worst-case receive buffers (every row of a pass to this rank) do '
                   'not fit: use a smaller batch (--batch-seqs, --seq-len)',
    'expert rank weights': 'its experts do not fit: use more GPUs or a placement with '
                           'fewer experts per rank (dedicated, packed:K with smaller K)',
}


def check_memory(mems, gpu_memory_gb):
    """Raise ConfigError (one line) for the first role whose total exceeds the GPU."""
    if not gpu_memory_gb > 0:
        raise ConfigError(f'GPU memory {gpu_memory_gb:g} GB: must be > 0')
    cap = gpu_memory_gb * _GB
    for m in mems:
        if m.total > cap:
            why = m.role + (' weights' if m.weights > cap else '')
            raise ConfigError(f'{m.role} needs {_parts(m)} > GPU memory {gpu_memory_gb:g} '
                              f'GB: {_ADVICE[why]}')


def _parts(m):
    """'79.27 GB = weights 62.66 GB + KV cache 16.37 GB + buffers 0.23 GB'."""
    parts = [f'weights {_size(m.weights)}']
    if m.kv_cache:
        parts.append(f'KV cache {_size(m.kv_cache)}')
    if m.buffers:
        parts.append(f'buffers {_size(m.buffers)}')
    return f'{_size(m.total)} = ' + ' + '.join(parts)


# -- time ------------------------------------------------------------------------

@dataclass(frozen=True)
class PassTime:
    """Seconds of one pass and its stages summed over layers (before overlap)."""

    seconds: float
    frontend: float
    experts: float
    network: float
    micro_batches: int

    @property
    def bound(self):
        """The stage with the largest sum: 'front-end', 'experts' or 'network'."""
        named = {'front-end': self.frontend, 'experts': self.experts, 'network': self.network}
        return max(named, key=named.get)


@dataclass(frozen=True)
class Prediction:
    prefill: PassTime
    decode: PassTime
    prefill_tokens_per_s: float
    decode_ms_per_token: float


def predict(plan, work, consts):
    """Prefill and decode of ``work`` on ``plan`` with machine ``consts``."""
    pre = pass_time(plan, work, consts, new_tokens=work.seq_len)
    dec = pass_time(plan, work, consts, new_tokens=1)
    return Prediction(pre, dec, work.batch_seqs * work.seq_len / pre.seconds,
                      1e3 * dec.seconds)


def pass_time(plan, work, c, new_tokens):
    """One pass adding ``new_tokens`` per sequence at context ``work.seq_len``."""
    cfg, T = plan.cfg, plan.tp
    seqs = work.seqs_per_frontend(plan)
    M = min(work.micro_batches, seqs)
    fe = _frontend_layers(cfg, seqs, new_tokens, work.seq_len, M, c, T)      # [n_layers]
    exp, net = _moe_layers(plan, work.batch_seqs, new_tokens, M, work.micro_batches, c)
    stages = np.stack([fe[cfg.n_dense_layers:], exp, net])                    # [3, Lm]
    top = stages.max(axis=0)
    moe = top + (stages.sum(axis=0) - top) / M
    # the LM head's vocabulary slice on each TP rank, then the logits gathered;
    # the embedding's slices summed once per pass
    head = _roofline(2 * seqs * cfg.d_model * cfg.vocab_size / T,
                     cfg.vocab_size * cfg.d_model * cfg.itemsize / T, c) \
        + allgather_s(T, seqs * cfg.vocab_size * 4, c) \
        + allreduce_s(T, seqs * new_tokens * cfg.d_model * 4, c)
    total = fe[:cfg.n_dense_layers].sum() + moe.sum() + head
    return PassTime(float(total), float(fe.sum() + head), float(exp.sum()), float(net.sum()), M)


def _roofline(flops, nbytes, c):
    return max(flops / c.flops, nbytes / (c.hbm_gbs * _GB))


def _layer_weights(cfg, i, tp=1):
    """(attention, FFN) weights of layer i outside the experts (the FFN part is
    the dense MLP, or the router and the shared experts) on one rank of a TP
    group of ``tp`` (its share of what the group splits, the rest whole)."""
    ffn_w = len(cfg.expert_matrices) * cfg.d_model * cfg.d_dense if i < cfg.n_dense_layers \
        else cfg.d_model * cfg.n_experts + cfg.shared_params
    attn_split, ffn_part = attention_split(cfg), ffn_split(cfg, i)
    return (cfg.attention_params - attn_split + attn_split / tp,
            ffn_w - ffn_part + ffn_part / tp)


def pair_flops(cfg):
    """FLOPs of one query-key pair over all heads: its score and its share of
    the weighted sum, 4 * n_heads * head_dim; MLA (absorbed) scores over the
    latent and RoPE key and sums latents, n_heads * (4r + 2 rope)."""
    a = cfg.attention
    if a.mla:
        return cfg.n_heads * (4 * a.kv_lora_rank + 2 * a.qk_rope_head_dim)
    return 4 * cfg.n_heads * cfg.head_dim


def layer_flops(cfg, i, tokens, pairs, tp=1):
    """FLOPs of layer i's non-expert work on ``tokens`` new tokens that make
    ``pairs`` causal query-key pairs (MLA's up-projections, absorbed, count
    once per token among the attention weights), on one rank of a TP group
    of ``tp`` (its heads' pairs)."""
    attn_w, ffn_w = _layer_weights(cfg, i, tp)
    return 2 * tokens * (attn_w + ffn_w) + pair_flops(cfg) * pairs / tp


def pass_flops(cfg, tokens, pairs, copies, rows_out):
    """FLOPs a forward pass does: every layer's non-expert work, ``copies``
    token copies through an expert (summed over the MoE layers) and the LM
    head on ``rows_out`` rows."""
    return (sum(layer_flops(cfg, i, tokens, pairs) for i in range(cfg.n_layers))
            + 2 * copies * cfg.expert_params + 2 * rows_out * cfg.d_model * cfg.vocab_size)


def _frontend_layers(cfg, seqs, q, ctx, M, c, tp=1):
    """Seconds of every layer's non-expert work on the busiest front-end (a
    rank of its TP group of ``tp``, the group's collectives included): float
    [n_layers].  seqs sequences, q new tokens each at context ctx."""
    tokens = seqs * q
    pairs = seqs * q * (2 * ctx - q + 1) / 2                    # causal query-key pairs
    kv_bytes = seqs * ctx * kv_elems_per_rank(cfg, tp) * cfg.itemsize
    rows = tokens / M * cfg.d_model * 4                          # a micro-batch's FP32 rows
    out = np.empty(cfg.n_layers)
    for i in range(cfg.n_layers):
        weights = sum(_layer_weights(cfg, i, tp)) * cfg.itemsize
        # an Allreduce after the attention and after a dense MLP or the shared
        # experts; the routed experts' shares gathered
        moe = i >= cfg.n_dense_layers
        group = allreduce_s(tp, rows, c) * (1 + (not moe or bool(cfg.shared.n_experts))) \
            + allgather_s(tp, rows, c) * moe
        out[i] = M * (_roofline(layer_flops(cfg, i, tokens, pairs, tp) / M,
                                weights + kv_bytes / M, c) + group)
    return out


def _shares(plan):
    """float [Lm, E]: each expert's share of its layer's copies (stats, else 1/E)."""
    E = plan.cfg.n_experts
    if plan.loads is None:
        return np.full(plan.owner.shape, 1.0 / E)
    tot = plan.loads.sum(axis=1, keepdims=True)
    return np.where(tot > 0, plan.loads / np.where(tot > 0, tot, 1), 1.0 / E)


def _moe_layers(plan, B, q, M, slots, c):
    """Seconds of the busiest expert rank and of the network, per MoE layer:
    two float [Lm].  B sequences of q new tokens over all front-ends, M non-empty
    micro-batches of ``slots`` (every slot posts its collectives, empty or not)."""
    cfg, P, F = plan.cfg, plan.world_size, plan.n_frontends
    T = B * q
    nodes = plan.nodes
    n_nodes = plan.n_nodes
    share = _shares(plan)                                                 # [Lm, E]
    copies = T * cfg.top_k * share                                        # [Lm, E]
    active = 1 - (1 - share) ** (T * cfg.top_k / M)                       # per micro-batch
    # sequences are dealt round-robin to the front-end groups: group g sends a
    # share n_g / B of the copies, each of its T ranks a T-th of it
    groups = plan.n_frontend_groups
    n_g = np.arange(groups) < B % groups
    fe_share = np.repeat((B // groups + n_g) / B / plan.tp, plan.tp)       # [F]
    fe_frac = np.bincount(nodes[:F], weights=fe_share, minlength=n_nodes)  # [N]
    fe_top = np.zeros(n_nodes)                                            # busiest front-end
    np.maximum.at(fe_top, nodes[:F], fe_share)
    row = cfg.d_model * cfg.itemsize
    one = cfg.expert_params * cfg.itemsize
    link, nvlink = c.link_gbps / 8 * _GB, c.nvlink_gbs * _GB               # bytes/s
    exp, net = np.empty(cfg.n_moe_layers), np.empty(cfg.n_moe_layers)
    for m, ranks in enumerate(plan.owner):                                # ranks: [E]
        rank_copies = np.bincount(ranks, weights=copies[m], minlength=P)  # [P]
        rank_active = np.bincount(ranks, weights=active[m], minlength=P)
        per_mb = np.maximum(rank_copies / M * 2 * cfg.expert_params / c.flops,
                            rank_active * one / (c.hbm_gbs * _GB))
        exp[m] = M * per_mb.max()
        # copies into each node's expert ranks; what crosses its link each way
        X = np.bincount(nodes[ranks], weights=copies[m], minlength=n_nodes)   # [N]
        across = max((X * (1 - fe_frac)).max(), (fe_frac * (X.sum() - X)).max())
        inside = max((rank_copies * fe_frac[nodes]).max(), (X * fe_top).max())
        bytes_s = max(across * row / link, inside * row / nvlink)            # one direction
        net[m] = 3 * slots * c.alpha_us * 1e-6 + 2 * bytes_s
    return exp, net


# -- text -----------------------------------------------------------------------

def describe(plan, work, consts, gpu_memory_gb, baseline=None, kv_tokens=None):
    """Lines: memory per role (kv_tokens: as in :func:`memory`), the constants
    and their sources, and (with a workload) the prediction; ``baseline`` (a
    Plan, e.g. the block layout with the same stats) adds its prediction for
    comparison."""
    pool = '' if kv_tokens is None else f'a KV cache of {kv_tokens:,} tokens per front-end, '
    if work is None:
        what = 'weights only: --batch-seqs and --seq-len add the KV cache,' if kv_tokens is None \
            else f'weights and {pool[:-2]}; --batch-seqs and --seq-len add'
        head = f'memory per rank ({what} buffers and time estimates):'
    else:
        head = (f'memory per rank (B = {work.batch_seqs} sequences x S = {work.seq_len} tokens '
                f'over {_frontends_text(plan)}, {pool}'
                f'{_mbs(work.micro_batches)}):')
    lines = [head]
    for m in memory(plan, work, kv_tokens):
        worst = ' (buffers: worst case, every row to this rank)' if m.role == 'expert rank' \
            and m.buffers else ''
        share = 100 * m.total / (gpu_memory_gb * _GB)
        lines.append(f'  {m.role + ":":12s} {_parts(m)}; {share:.0f}% of {gpu_memory_gb:g} GB'
                     f'{worst}')
    if work is None:
        return lines
    lines.append('cost model constants (the model is stated in mpimoe/planning/costmodel.py):')
    lines += [f'  {n:16s} {getattr(consts, n):<8g} {consts.source.get(n, "assumed")}'
              for n in NAMES]
    lines += _describe_prediction(predict(plan, work, consts), work)
    if baseline is not None:
        b = predict(baseline, work, consts)
        lines.append(f'block layout with the same stats: prefill {b.prefill_tokens_per_s:,.0f} '
                     f'tokens/s, decode {_time(b.decode.seconds)} per output token')
    return lines


def _frontends_text(plan):
    """'192 front-ends', or with --tp '96 front-end groups of 2 ranks'."""
    if plan.tp == 1:
        return _count(plan.n_frontends, 'front-end')
    return f'{_count(plan.n_frontend_groups, "front-end group")} of {plan.tp} ranks'


def _describe_prediction(p, work):
    def stages(t):
        return (f'front-end {_time(t.frontend)}, experts {_time(t.experts)}, network '
                f'{_time(t.network)} summed over layers; '
                f'{_mbs(t.micro_batches)}; bound by {t.bound}')
    lines = [
        f'prefill: {p.prefill_tokens_per_s:,.0f} tokens/s ({work.batch_seqs * work.seq_len:,} '
        f'tokens in {_time(p.prefill.seconds)}; {stages(p.prefill)})',
        f'decode: {_time(p.decode.seconds)} per output token (B = {work.batch_seqs} '
        f'sequences at context {work.seq_len}; {stages(p.decode)})',
    ]
    if p.decode.micro_batches < work.micro_batches:
        used = p.decode.micro_batches
        verb = 'fills' if used == 1 else 'fill'
        lines.append(f'note: {_count(used, "sequence")} per front-end {verb} only {used} of '
                     f'its {work.micro_batches} micro-batches (less overlap); more sequences '
                     f'per front-end fill them')
    return lines


def _mbs(n):
    return f'{n} micro-batch' + ('' if n == 1 else 'es')


def _time(seconds):
    """'13.69 s', '2.876 ms', '4.20 us'."""
    if seconds >= 1:
        return f'{seconds:.2f} s'
    return f'{1e3 * seconds:.3f} ms' if seconds >= 1e-3 else f'{1e6 * seconds:.2f} us'
