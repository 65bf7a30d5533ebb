"""The next token of each sequence: greedy, or sampled by Gumbel-max from a
random stream that depends only on (seed, id, step).

A sampled token is ``argmax(logits / T + G)`` over the tokens top_k and
top_p keep, ``G`` standard Gumbel noise: this samples softmax(logits / T)
restricted to those tokens exactly (the Gumbel-max trick).  ``G`` for step
``s`` of sequence ``id`` is drawn by a Philox generator keyed by
sha256(seed, id) at the counter ``s``: any step is reachable directly, so a
token never depends on which sequences share its batch, on the world size,
or on a resume.  ``step`` is the number of tokens the sequence has already
generated (0 for the first new token).

    tokens = sample(logits, params, ids, steps)     # int32 [B]
"""

import hashlib

import numpy as np

__all__ = ['noise', 'choice_scores', 'sample']


def noise(seed, seq_id, step, vocab):
    """Standard Gumbel noise of step ``step`` of sequence ``seq_id``: float64 [vocab].

    The key is the first 128 bits of sha256(seed as 8 bytes little-endian,
    the id's UTF-8); the step is the counter's second 64-bit word, the first
    counting the draws of the step (vocab / 4 < 2^64 of them), so the steps'
    streams never overlap.  Each raw 64-bit word gives U = (top 53 bits + 1/2)
    / 2^53 in (0, 1), and G = -log(-log U): finite, and defined by the Philox
    algorithm alone (not by a NumPy version's distributions).
    """
    digest = hashlib.sha256(int(seed).to_bytes(8, 'little') + seq_id.encode('utf-8')).digest()
    bits = np.random.Philox(key=int.from_bytes(digest[:16], 'little'), counter=int(step) << 64)
    u = ((bits.random_raw(vocab) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53
    return -np.log(-np.log(u))


def _kept(z, top_k, top_p):
    """The tokens top_k and then top_p keep, in decreasing ``z`` (ties: lower
    id first): int [m].

    top_k keeps the k largest (0: all), found by a partition, not a sort of
    the whole vocabulary; top_p then keeps the fewest leading tokens whose
    probabilities softmax(z), renormalised over those top_k kept, sum to at
    least top_p (1: all), at least one.
    """
    V = len(z)
    if top_k and top_k < V:
        t = np.partition(z, V - top_k)[V - top_k]                # the k-th largest
        above = np.flatnonzero(z > t)
        kept = np.concatenate([above, np.flatnonzero(z == t)[:top_k - len(above)]])
    else:
        kept = np.arange(V)
    kept = kept[np.lexsort((kept, -z[kept]))]
    if top_p < 1:
        head = z[kept]
        cum = np.cumsum(np.exp(head - head[0]))
        kept = kept[:int(np.searchsorted(cum, top_p * cum[-1], side='left')) + 1]
    return kept


def choice_scores(logits_row, params, seq_id, step):
    """Scores whose argmax is the chosen token: float64 [V].

    logits_row: float32 [V]; params: SamplingParams.  Temperature 0: the
    logits themselves (greedy; top_k and top_p do not apply); else logits / T
    plus :func:`noise`, -inf outside the tokens top_k / top_p keep.
    """
    z = np.asarray(logits_row, dtype=np.float64)
    if params.temperature == 0:
        return z
    z = z / params.temperature
    scores = z + noise(params.seed, seq_id, step, len(z))
    if params.top_k or params.top_p < 1:
        kept = _kept(z, params.top_k, params.top_p)
        out = np.full_like(scores, -np.inf)
        out[kept] = scores[kept]
        return out
    return scores


def sample(logits, params, ids, steps):
    """The next token of each row: int32 [B].

    logits: float32 [B, V] (host); params: list of B SamplingParams; ids:
    list of B ids; steps: int [B], the tokens each row has generated so far.
    Greedy rows take np.argmax (the lowest id on ties) all at once and draw
    no noise; each other row the argmax of :func:`choice_scores`.
    """
    out = np.empty(len(params), dtype=np.int32)
    greedy = np.array([p.temperature == 0 for p in params], dtype=bool)
    if greedy.any():
        out[greedy] = np.argmax(logits[greedy], axis=1)
    for i in np.flatnonzero(~greedy):
        out[i] = np.argmax(choice_scores(logits[i], params[i], ids[i], int(steps[i])))
    return out
