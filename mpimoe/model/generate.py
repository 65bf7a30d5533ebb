"""Greedy generation, shared by the reference and the front-ends.

A *forward* is any callable ``forward(tokens, cache, seqs, ntok) -> logits``
that runs the whole model over a packed batch (tokens int [T]; seqs, ntok
int [B]) and returns float32 [B, vocab], the logits at each sequence's last
new token.  The reference runs the experts in-process; the engine's
front-ends run them over MPI.
"""

import numpy as np

from mpimoe.model.kvcache import BLOCK_TOKENS, blocks_for

__all__ = ['generate']


def generate(forward, new_cache, prompts, max_new_tokens):
    """Prefill ``prompts`` together, then decode greedily, one token per step.

    prompts: list of B int arrays; new_cache(kv_tokens, max_seqs) -> a
    :class:`~mpimoe.model.kvcache.BlockKVCache` (FrontEnd.new_cache), made
    just large enough for every sequence's prompt + ``max_new_tokens``.
    Returns (generated int32 [B, max_new_tokens], last_logits float32 [B, V]:
    the logits at the last prompt position).
    """
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    capacity = lengths + max_new_tokens
    cache = new_cache(BLOCK_TOKENS * int(blocks_for(capacity).sum()), len(prompts))
    seqs = np.array([cache.allocate(int(n)) for n in capacity], dtype=np.int64)
    # an overflow ends in NaN/Inf logits, which the forward refuses in one
    # message (mpimoe.model.frontend.FrontEnd.logits); NumPy's warnings would only add lines
    with np.errstate(over='ignore', invalid='ignore'):
        logits = forward(np.concatenate(prompts).astype(np.int64), cache, seqs, lengths)
        last_logits = logits
        generated = np.empty((len(prompts), max_new_tokens), dtype=np.int32)
        ones = np.ones(len(prompts), dtype=np.int64)
        for step in range(max_new_tokens):
            generated[:, step] = np.argmax(logits, axis=1)
            if step + 1 < max_new_tokens:
                logits = forward(generated[:, step].astype(np.int64), cache, seqs, ones)
    return generated, last_logits
