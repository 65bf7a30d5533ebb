"""Greedy generation, shared by the reference and the front-ends.

A *forward* is any callable ``forward(tokens, cache, seqs, ntok) -> logits``
that runs the whole model over a packed batch (tokens int [T]; seqs, ntok
int [B]) and returns float32 [B, vocab], the logits at each sequence's last
new token.  The reference runs the experts in-process; the engine's
front-ends run them over MPI.
"""

import numpy as np

__all__ = ['generate']


def generate(forward, new_cache, prompts, max_new_tokens):
    """Prefill ``prompts`` together, then decode greedily, one token per step.

    prompts: list of B int arrays; new_cache(capacity int [B]) -> KV cache.
    Returns (generated int32 [B, max_new_tokens], last_logits float32 [B, V]:
    the logits at the last prompt position).
    """
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    cache = new_cache(lengths + max_new_tokens)
    seqs = np.arange(len(prompts))
    # an overflow ends in NaN/Inf logits, which the forward refuses in one
    # message (mpimoe.model.layers.FrontEnd.logits); NumPy's warnings would only add lines
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
