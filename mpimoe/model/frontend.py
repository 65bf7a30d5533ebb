"""The front-end's part of the model: embedding, attention blocks, dense FFNs,
norms, routers and LM head (everything but the experts), over the layer math
of mpimoe.model.layers and mpimoe.model.attention and the KV cache of
mpimoe.model.kvcache.
"""

import numpy as np

from mpimoe.backends.backend import array_module
from mpimoe.errors import DataError
from mpimoe.model.attention import Placement, attention
from mpimoe.model.kvcache import BLOCK_TOKENS, BlockKVCache, blocks_for
from mpimoe.model.layers import as_f32, mm32, ffn, rms_norm
from mpimoe.moe.layer import MoELayer
from mpimoe.parallel.posted import Posted

__all__ = ['FrontEnd']


class FrontEnd:
    """The non-expert part of the model: embedding, attention, dense FFNs,
    norms, routers and LM head; what a front-end rank holds.

    tensors: dict name -> array, names as in weights/FORMAT.md: float32 (NumPy
    backend) or 16-bit device arrays (CuPy: read as they are by the GEMMs,
    mpimoe.model.layers.mm32; the routers, small, widened to FP32 once here).

    :meth:`logits` refuses NaN or Inf logits (DataError, exit 65: the weights are
    finite, the loader checks, so the model's own numbers overflowed; no rerun
    helps) and names the first stage whose output was not finite: each block
    notes whether its input is finite (a device scalar, no synchronisation),
    and the notes are read only when the logits are not finite.
    """

    def __init__(self, cfg, tensors):
        self.cfg = cfg
        self.t = tensors
        # per layer: its own tensors (norms, attention), not those of its groups
        self.layer = [{} for _ in range(cfg.n_layers)]
        for name, t in tensors.items():
            parts = name.split('/')
            if len(parts) == 3 and parts[0] == 'layers':
                self.layer[int(parts[1])][parts[2]] = t
        self.dense = {i: {m: tensors[f'layers/{i}/mlp/{m}'] for m in cfg.expert_matrices}
                      for i in range(cfg.n_dense_layers)}
        self.router = {i: as_f32(tensors[f'layers/{i}/router']) for i in cfg.moe_layers}
        self.router_bias = {i: tensors.get(f'layers/{i}/router_bias') for i in cfg.moe_layers}
        self.shared = {i: {m: tensors[f'layers/{i}/shared/{m}'] for m in cfg.expert_matrices}
                       for i in cfg.moe_layers} if cfg.shared.n_experts else {}
        self.xp = array_module(tensors['embed'])
        # what the attention runs on: the model's heads here; one rank's share of
        # them, and the group's sums of QK-norm squares, in a TPFrontEnd
        self.heads, self._sum_squares = cfg, None
        self._finite = []       # this pass: (stage number, all finite? device bool)

    def moe_layers(self, dispatcher, timers=None):
        """The MoE layers over ``dispatcher``: layer index -> MoELayer."""
        return {i: MoELayer(i, self.router[i], self.cfg, dispatcher, timers,
                            self.router_bias[i]) for i in self.cfg.moe_layers}

    def new_cache(self, kv_tokens, max_seqs):
        """A :class:`~mpimoe.model.kvcache.BlockKVCache` on this front-end's
        array module for ``kv_tokens`` tokens (rounded up to whole blocks) of
        at most ``max_seqs`` sequences."""
        return BlockKVCache.for_tokens(self.cfg, kv_tokens, max_seqs, self.xp)

    def cache_for(self, lengths):
        """A new cache just large enough for sequences of ``lengths`` [B]
        tokens in all, and their handles: (cache, int [B])."""
        cache = self.new_cache(BLOCK_TOKENS * int(blocks_for(lengths).sum()), len(lengths))
        return cache, np.array([cache.allocate(int(n)) for n in lengths])

    def embed(self, tokens):
        """tokens: int [T] (host) -> x: float32 [T, d]."""
        return as_f32(self.t['embed'][self.xp.asarray(tokens)])

    def _note(self, stage, x):
        """Keep whether ``x``, the output of stage number ``stage`` (see
        :meth:`_stage_name`), is finite, for the message of :meth:`logits`."""
        self._finite.append((stage, self.xp.isfinite(x).all()))

    def _stage_name(self, stage):
        """Stage 0 is the embedding, 2i+1 the attention of layer i, 2i+2 its FFN."""
        if stage == 0:
            return 'the embedding'
        i, part = divmod(stage - 1, 2)
        kind = 'attention' if part == 0 else 'dense MLP' if i < self.cfg.n_dense_layers \
            else 'MoE FFN'
        return f'the {kind} of layer {i}'

    def _check_finite(self, logits):
        """DataError when logits [n, vocab] hold NaN or Inf; clears the notes."""
        notes, self._finite = self._finite, []
        if bool(self.xp.isfinite(logits).all()):
            return
        bad = [stage for stage, finite in notes if not bool(finite)]
        where = self._stage_name(min(bad)) if bad else 'the final norm and LM head'
        raise DataError(f'the logits are NaN or Inf: the activations were first non-finite '
                        f'after {where} (the weights are finite, so the numbers overflowed '
                        f'FP32, or {self.cfg.dtype} on the wire); check or reconvert the weights')

    def place(self, cache, seqs, ntok):
        """Where the next ``ntok[b]`` tokens of ``seqs[b]`` go in ``cache``,
        for every layer of one pass: a mpimoe.model.attention.Placement."""
        return Placement(cache, self.cfg, seqs, ntok)

    def attention_out(self, i, x, cache, where):
        """The attention of layer i, attn(norm(x)), to add to the residual x
        [T, d]: a Posted of [T, d] (mpimoe.parallel.posted; :meth:`_sum`);
        where: the pass's :meth:`place` of its tokens."""
        self._note(2 * i, x)
        w = self.layer[i]
        return self._sum(attention(rms_norm(x, w['attn_norm'], self.cfg.norm_eps), w,
                                   self.heads, cache, i, where, self._sum_squares))

    def ffn_input(self, i, x):
        """The normed input of layer i's FFN: [T, d]."""
        self._note(2 * i + 1, x)
        return rms_norm(x, self.layer[i]['ffn_norm'], self.cfg.norm_eps)

    def dense_ffn(self, i, h):
        """Dense MLP of layer i (i < n_dense_layers): [T, d] -> a Posted of [T, d]."""
        return self._sum(ffn(h, self.dense[i], self.cfg.expert_kind))

    def shared_ffn(self, i, h):
        """The shared experts of MoE layer i (as one MLP, with the dense ones'
        arithmetic: mpimoe.model.layers.mm32), gated by ``sigmoid(h @
        shared_gate)`` where the model has the gate: h [T, d] -> a Posted of
        [T, d] (``self.shared`` is empty without them)."""
        y = self._sum(ffn(h, self.shared[i], self.cfg.expert_kind))
        if not self.cfg.shared.gate:
            return y
        gate = 1.0 / (1.0 + self.xp.exp(-mm32(h, self.layer[i]['shared_gate'])))    # [T, 1]

        def gated(y):
            y *= gate
            return y
        return y.then(gated)

    def logits(self, x):
        """Final norm and LM head: x [n, d] -> float32 [n, vocab]; DataError
        when they are not finite, naming the stage where that began."""
        self._note(2 * self.cfg.n_layers, x)
        out = self._vocab(mm32(rms_norm(x, self.t['final_norm'], self.cfg.norm_eps),
                               self.t['lm_head']))
        self._check_finite(out)
        return out

    def _sum(self, part):
        """A row-parallel product's sum over the ranks that share it, a Posted:
        ``part`` itself, ready, here (a TPFrontEnd's sum over its group is
        posted)."""
        return Posted.ready(part)

    def _vocab(self, logits):
        """The logits of the whole vocabulary from this rank's: themselves here."""
        return logits
