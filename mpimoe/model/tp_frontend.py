"""A front-end rank's share of the model in a tensor-parallel group of T
ranks (``--tp T``), Megatron-style, over the group's collectives
(mpimoe.parallel.tp_group.TensorGroup).

Rank t of the group holds:

- query heads ``[t H/T, (t+1) H/T)`` with their KV heads (GQA; query heads
  are consecutive per KV head, so they stay together) and the KV cache of
  those heads: the columns of ``wq, wk, wv`` (and biases) and the rows of
  ``wo``; MLA: the columns of ``wq_b`` (or ``wq``) and ``wkv_b`` and the rows
  of ``wo``, while the down-projection ``wkv_a`` (and ``wq_a``), their norms
  and the latent cache are every rank's;
- hidden columns ``[t h/T, (t+1) h/T)`` of the dense MLPs and the shared
  experts (gate/up columns, down rows);
- vocabulary rows ``[t V/T, (t+1) V/T)`` of the embedding and columns of the
  LM head;
- all other norms (a QK-norm over all heads, OLMoE's, keeps the gains of its
  heads and sums the squares over the group), the routers and the
  shared-expert gate.

The row-parallel products (the attention output, a dense MLP, the shared
experts) and the embedding are summed over the group by an Allreduce (the
products' posted, for the forward pass to run another micro-batch while the
sums of the dense MLPs and shared experts travel: mpimoe.model.forward),
the LM head's logits gathered; each rank then holds the whole hidden state
and the same logits.  The routed experts see each token once: rank t routes and
dispatches its :func:`~mpimoe.parallel.tp_group.share` of the micro-batch's
rows, and the combined rows are gathered back (:class:`GroupMoE`).

Numerics: the same FP32 arithmetic as one front-end, except that the sums
over heads and hidden columns are cut into T partial sums added by the
Allreduce: the FP32 summation order differs, as between two batchings
(tests/contract.py's bounds).  The embedding's sum adds exact zeros.
"""

import math

import numpy as np

from mpimoe.checkpoint.layout import nonexpert_tensor_names, tensor_specs
from mpimoe.model.frontend import FrontEnd
from mpimoe.model.kvcache import BlockKVCache
from mpimoe.parallel.posted import Posted
from mpimoe.parallel.tp_group import share

__all__ = ['shard_part', 'verifiers', 'read_shard', 'TPFrontEnd', 'GroupMoE']


def shard_part(cfg, name, shape, t, T):
    """Rank t of T's block of the non-expert tensor ``name`` [shape], as
    described in the module docstring: a tuple of slices over its leading
    dimensions (as mpimoe.checkpoint.weights.WeightFile.read takes it), or
    None where every rank holds the whole tensor."""
    last = name.rsplit('/', 1)[-1]
    group = name.split('/')[2] if name.count('/') == 3 else None
    rows = (name == 'embed' or last == 'wo' or (group in ('mlp', 'shared') and last == 'down'))
    cols = (name == 'lm_head' or last in ('wq', 'wq_b', 'wk', 'wv', 'wkv_b', 'bq', 'bk', 'bv')
            or (last in ('q_norm', 'k_norm') and cfg.attention.qk_norm == 'full')
            or (group in ('mlp', 'shared') and last != 'down'))
    if rows:
        n = shape[0] // T
        return (slice(t * n, (t + 1) * n),)
    if cols:
        n = shape[-1] // T
        return tuple(slice(0, k) for k in shape[:-1]) + (slice(t * n, (t + 1) * n),)
    return None


def verifiers(cfg, T):
    """Which rank of a group of T reads each split tensor whole and verifies
    its checksum: dict name -> rank, the largest tensor first onto the rank
    with the fewest such bytes yet (ties: the lowest rank), so that the
    whole-tensor reads are shared by bytes, the same on every rank."""
    shapes = dict(tensor_specs(cfg))
    split = [n for n in nonexpert_tensor_names(cfg)
             if shard_part(cfg, n, shapes[n], 0, T) is not None]
    load, out = [0] * T, {}
    for name in sorted(split, key=lambda n: -math.prod(shapes[n])):   # stable: file order
        rank = load.index(min(load))
        out[name] = rank
        load[rank] += math.prod(shapes[name])
    return out


def read_shard(wf, t, T):
    """Rank t of T's non-expert tensors of ``wf`` (a WeightFile): dict name ->
    16-bit host array (float32 for an FP32 tensor), :func:`shard_part` of
    each, names unchanged.

    The I/O is the group's, not T whole copies of the front-end: a split
    tensor is read by each rank as its block only, except by the rank that
    :func:`verifiers` names, which reads it whole, verifies its checksum (a
    checksum covers the whole tensor) and keeps its block; so the group
    reads the split tensors about twice over and verifies every checksum,
    and no rank holds more than its shard and one whole tensor.
    """
    cfg = wf.config
    shapes, mine = dict(tensor_specs(cfg)), verifiers(cfg, T)
    out = {}
    for name in nonexpert_tensor_names(cfg):
        part = shard_part(cfg, name, shapes[name], t, T)
        if part is None:
            out[name] = wf.read(name)
        elif mine[name] == t:
            out[name] = wf.read(name)[part].copy()      # the whole one freed
        else:
            out[name] = wf.read(name, part=part)
    return out


class TPFrontEnd(FrontEnd):
    """The FrontEnd of rank ``group.rank`` of a TP group: cfg the whole model's,
    tensors its :func:`read_shard`; FrontEnd's blocks run on a config of its own
    heads (``self.heads``) and sum or gather through the group.

    overlap: post the row-parallel products' sums, so that the forward pass
    runs the other micro-batches while those of the dense MLPs and shared
    experts travel (mpimoe.model.forward); False: wait for each in place (the
    baseline of benchmarks/tp_overlap.py).
    """

    def __init__(self, cfg, tensors, group, overlap=True):
        super().__init__(cfg, tensors)
        T = group.size
        self.group = group
        # a config of this rank's heads (MLA's n_kv_heads is n_heads, and shapes
        # nothing: one latent per token)
        self.heads = cfg.replace(n_heads=cfg.n_heads // T, n_kv_heads=cfg.n_kv_heads // T)
        self.vocab = share(cfg.vocab_size, group.rank, T)            # [v0, v1)
        # OLMoE's QK-norm over all heads: its sums over the group
        self._sum_squares = group.allreduce if cfg.attention.qk_norm == 'full' else None
        self._sum = group.post_allreduce if overlap else \
            (lambda part: Posted.ready(group.allreduce(part)))
        self._vocab = group.allgather_cols

    def moe_layers(self, dispatcher, timers=None):
        return {i: GroupMoE(layer, self.group)
                for i, layer in super().moe_layers(dispatcher, timers).items()}

    def new_cache(self, kv_tokens, max_seqs):
        """The KV cache of this rank's heads (MLA: the whole latent cache)."""
        return BlockKVCache.for_tokens(self.heads, kv_tokens, max_seqs, self.xp)

    def embed(self, tokens):
        """tokens int [T] (host) -> float32 [T, d]: this rank's vocabulary rows,
        zeros for the others', summed over the group."""
        v0, v1 = self.vocab
        tokens = np.asarray(tokens)
        mine = (tokens >= v0) & (tokens < v1)
        x = self.xp.zeros((len(tokens), self.cfg.d_model), np.float32)
        if mine.any():
            x[self.xp.asarray(np.flatnonzero(mine))] = super().embed(tokens[mine] - v0)
        return self.group.allreduce(x)


class GroupMoE:
    """An MoE layer seen by one rank of a TP group: it routes and dispatches
    its :func:`share` of a micro-batch's rows and gathers every rank's
    combined rows.  layer: the rank's MoELayer (its counts count this
    rank's share; ``bias`` is set on it)."""

    def __init__(self, layer, group):
        self.inner, self.group = layer, group

    def take_counts(self):
        return self.inner.take_counts()

    @property
    def bias(self):
        return self.inner.bias

    @bias.setter
    def bias(self, value):
        self.inner.bias = value

    @property
    def layer(self):
        return self.inner.layer

    def dispatch(self, h, mb):
        """h float32 [n, d] (the same rows on every rank of the group) -> the
        MoEHandle of this rank's share, which remembers n."""
        lo, hi = share(len(h), self.group.rank, self.group.size)
        handle = self.inner.dispatch(h[lo:hi], mb) if hi > lo else self.inner.dispatch_empty(mb)
        handle.group_rows = len(h)
        return handle

    def dispatch_empty(self, mb):
        handle = self.inner.dispatch_empty(mb)
        handle.group_rows = 0
        return handle

    def combine(self, handle, x):
        """x float32 [n, d] + the layer's output, gathered over the group."""
        n = handle.group_rows
        if not n:
            return self.inner.combine(handle, x)
        lo, hi = share(n, self.group.rank, self.group.size)
        mine = self.inner.combine(handle, x[lo:hi])
        return self.group.allgather_rows(mine, n)

