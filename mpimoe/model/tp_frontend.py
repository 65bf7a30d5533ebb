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
experts) and the embedding are summed over the group by an Allreduce, the
LM head's logits gathered; each rank then holds the whole hidden state and
the same logits.  The routed experts see each token once: rank t routes and
dispatches its :func:`~mpimoe.parallel.tp_group.share` of the micro-batch's
rows, and the combined rows are gathered back (:class:`GroupMoE`).

Numerics: the same FP32 arithmetic as one front-end, except that the sums
over heads and hidden columns are cut into T partial sums added by the
Allreduce: the FP32 summation order differs, as between two batchings
(tests/contract.py's bounds).  The embedding's sum adds exact zeros.
"""

import numpy as np

from mpimoe.model.frontend import FrontEnd
from mpimoe.model.kvcache import BlockKVCache
from mpimoe.parallel.tp_group import share

__all__ = ['shard', 'TPFrontEnd', 'GroupMoE']


def _cols(a, t, T):
    n = a.shape[-1] // T
    return a[..., t * n:(t + 1) * n]


def _rows(a, t, T):
    n = a.shape[0] // T
    return a[t * n:(t + 1) * n]


def shard(cfg, tensors, t, T):
    """Rank t of T's tensors: dict name -> array (host or device), the
    slices of ``tensors`` (all non-expert tensors) described in the module
    docstring; names unchanged.  Slices are copied, so the whole tensors can
    be freed."""
    out = {}
    for name, a in tensors.items():
        last = name.rsplit('/', 1)[-1]
        group = name.split('/')[2] if name.count('/') == 3 else None
        if name == 'embed':
            a = _rows(a, t, T)
        elif name == 'lm_head' or last in ('wq', 'wq_b', 'wk', 'wv', 'wkv_b', 'bq', 'bk', 'bv'):
            a = _cols(a, t, T)
        elif last == 'wo':
            a = _rows(a, t, T)
        elif last in ('q_norm', 'k_norm') and cfg.attention.qk_norm == 'full':
            a = _cols(a, t, T)          # gains of the whole query / key: this rank's part
        elif group in ('mlp', 'shared'):
            a = _rows(a, t, T) if last == 'down' else _cols(a, t, T)
        out[name] = a.copy()
    return out


class TPFrontEnd(FrontEnd):
    """The FrontEnd of rank ``group.rank`` of a TP group: cfg the whole model's,
    tensors its :func:`shard`; FrontEnd's blocks run on a config of its own
    heads (``self.heads``) and sum or gather through the group."""

    def __init__(self, cfg, tensors, group):
        super().__init__(cfg, tensors)
        T = group.size
        self.group = group
        # a config of this rank's heads (MLA's n_kv_heads is n_heads, and shapes
        # nothing: one latent per token)
        self.heads = cfg.replace(n_heads=cfg.n_heads // T, n_kv_heads=cfg.n_kv_heads // T)
        self.vocab = share(cfg.vocab_size, group.rank, T)            # [v0, v1)
        # OLMoE's QK-norm over all heads: its sums over the group
        self._sum_squares = group.allreduce if cfg.attention.qk_norm == 'full' else None
        self._sum, self._vocab = group.allreduce, group.allgather_cols

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

