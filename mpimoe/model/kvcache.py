"""The KV cache: keys and values of the sequences in flight, in fixed-size blocks.

Each layer ``l`` has two pools ``k[l], v[l]: [n_blocks, BLOCK_TOKENS, n_kv_heads,
head_dim]`` in the model's 16-bit dtype (``cfg.dtype``; NumPy: the ml_dtypes
type, CuPy: the same dtype on the device).  Multi-head latent attention
(MLA) caches one pool per layer, ``k[l]: [n_blocks, BLOCK_TOKENS, 1,
kv_lora_rank + qk_rope_head_dim]``: each token's compressed latent and its
RoPE key, from which attention computes keys and values (``v`` is empty).
A sequence gets a *handle* (a small int, reused after
:meth:`BlockKVCache.release`) and, for its whole life, the
``ceil(n_tokens / BLOCK_TOKENS)`` blocks its prompt and new tokens need.  Row
``table[h]`` of the block table lists them: the token at position ``p`` of
sequence ``h`` lives in block ``table[h, p // BLOCK_TOKENS]`` at offset
``p % BLOCK_TOKENS``.

Keys and values are rounded to 16 bits (nearest-even) when written and widened
to FP32 when read; that is the only rounding the cache adds to the FP32
attention (mpimoe.model.attention).  A sequence's blocks are zeroed when it
gets them and the unused tail of its table row repeats its first block, so
every position a read touches holds zero or the sequence's own values: a
companion's keys and values (finite or not) never reach it.

The bookkeeping (block table, lengths, free lists) is host NumPy; only the
pools live on the array module ``xp``.  Free blocks and handles are stacks
handed out smallest id first, so allocation is deterministic.
"""

import numpy as np

from mpimoe.backends.backend import DTYPES

__all__ = ['BLOCK_TOKENS', 'blocks_for', 'BlockKVCache']

#: tokens per block
BLOCK_TOKENS = 16


def blocks_for(n_tokens):
    """Blocks that hold ``n_tokens`` tokens: ceil(n_tokens / BLOCK_TOKENS)
    (an int, or elementwise on an int array)."""
    return -(-n_tokens // BLOCK_TOKENS)


class BlockKVCache:
    """A pool of ``n_blocks`` blocks per layer shared by at most ``max_seqs``
    sequences; see the module docstring.

    Public state (host NumPy, indexed by handle): ``length`` int64
    [max_seqs] positions filled, ``capacity`` int64 [max_seqs] tokens
    reserved, ``table`` int32 [max_seqs, max_blocks_per_seq] block ids;
    ``free_blocks`` blocks not reserved.
    """

    def __init__(self, n_layers, n_blocks, n_kv_heads, head_dim, dtype, xp=np, max_seqs=None,
                 max_seq_tokens=None, values=True):
        """dtype: 'bfloat16' or 'float16'; xp: array module of the pools;
        max_seqs: handles (default n_blocks); max_seq_tokens: the longest
        reservation of one sequence, which sets the table's width (default:
        the whole pool); values: whether there are value pools (False: MLA)."""
        self.dtype = DTYPES[dtype]
        self.xp = xp
        max_seqs = n_blocks if max_seqs is None else max_seqs
        width = n_blocks if max_seq_tokens is None else min(n_blocks, blocks_for(max_seq_tokens))
        shape = (n_blocks, BLOCK_TOKENS, n_kv_heads, head_dim)
        self.k = [xp.zeros(shape, self.dtype) for _ in range(n_layers)]
        self.v = [xp.zeros(shape, self.dtype) for _ in range(n_layers * values)]
        self.table = np.zeros((max_seqs, width), np.int32)
        self.capacity = np.zeros(max_seqs, np.int64)
        self.length = np.zeros(max_seqs, np.int64)
        self.live = np.zeros(max_seqs, bool)
        self._free = np.arange(n_blocks, dtype=np.int32)[::-1].copy()  # stack: top at the end
        self.free_blocks = n_blocks
        self._handles = list(range(max_seqs))[::-1]

    @classmethod
    def for_tokens(cls, cfg, kv_tokens, max_seqs, xp=np):
        """The cache of a model config holding ``kv_tokens`` tokens (rounded up
        to whole blocks) for at most ``max_seqs`` sequences of at most
        ``cfg.max_position_embeddings`` tokens each: ``cfg.kv_token_elems``
        16-bit elements per token per layer."""
        heads, width = (1, cfg.kv_token_elems) if cfg.attention.mla else \
            (cfg.n_kv_heads, cfg.head_dim)
        return cls(cfg.n_layers, blocks_for(int(kv_tokens)), heads, width, cfg.dtype, xp,
                   max_seqs, cfg.max_position_embeddings, values=not cfg.attention.mla)

    @property
    def nbytes(self):
        """Bytes the pools take (the host bookkeeping not counted)."""
        return sum(a.nbytes for a in self.k + self.v)


    # -- sequences ---------------------------------------------------------------

    def allocate(self, n_tokens):
        """Reserve blocks for a sequence of ``n_tokens`` tokens in all (prompt +
        new tokens) -> its handle, or None when the free blocks or handles do not
        suffice now.  ValueError when no pool of this size could ever hold it."""
        need = blocks_for(n_tokens)
        if n_tokens < 0 or need > self.table.shape[1]:
            raise ValueError(f'a sequence of {n_tokens} tokens needs {need} KV blocks of '
                             f'{BLOCK_TOKENS} tokens; one sequence may hold at most '
                             f'{self.table.shape[1]} (the pool holds {len(self._free)} blocks)')
        if need > self.free_blocks or not self._handles:
            return None
        h = self._handles.pop()
        top = self.free_blocks
        blocks = self._free[top - need:top][::-1].copy()                # smallest id first
        self.free_blocks -= need
        self.table[h, :need] = blocks
        self.table[h, need:] = blocks[0] if need else 0
        self.capacity[h], self.length[h], self.live[h] = n_tokens, 0, True
        where = self.xp.asarray(blocks)
        for pool in self.k + self.v:
            pool[where] = 0
        return h

    def release(self, handle):
        """Give the blocks and the handle of a sequence back."""
        if not (0 <= handle < len(self.live) and self.live[handle]):
            raise ValueError(f'KV cache handle {handle} is not allocated')
        need = int(blocks_for(self.capacity[handle]))
        self._free[self.free_blocks:self.free_blocks + need] = self.table[handle, :need][::-1]
        self.free_blocks += need
        self.live[handle] = False
        self.capacity[handle] = self.length[handle] = 0
        self._handles.append(handle)

    # -- positions -----------------------------------------------------------------

    def positions(self, seqs, ntok):
        """Absolute positions of the next ``ntok[b]`` tokens of ``seqs[b]``: int64 [T]."""
        base = np.repeat(self.length[seqs], ntok)
        first = np.repeat(np.cumsum(ntok) - ntok, ntok)
        return base + np.arange(int(np.sum(ntok))) - first

    def _check(self, seqs, ntok):
        """ValueError unless ``ntok[b]`` more tokens fit ``seqs[b]``'s reservation."""
        if not self.live[seqs].all():
            h = seqs[np.argmin(self.live[seqs])]
            raise ValueError(f'KV cache handle {h} is not allocated')
        over = np.flatnonzero(self.length[seqs] + ntok > self.capacity[seqs])
        if over.size:
            b = over[0]
            h = seqs[b]
            raise ValueError(f'KV cache overflow: sequence {h} holds {self.length[h]} tokens, '
                             f'{ntok[b]} more exceed its reservation of {self.capacity[h]}')

    def locate(self, seqs, ntok):
        """Where the next ``ntok[b]`` tokens of ``seqs[b]`` go: (positions,
        blocks, offsets), each int [T] (host); ValueError (before anything is
        written) when they overflow a reservation."""
        self._check(seqs, ntok)
        pos = self.positions(seqs, ntok)
        rows = np.repeat(seqs, ntok)
        return pos, self.table[rows, pos // BLOCK_TOKENS], pos % BLOCK_TOKENS

    def advance(self, seqs, ntok):
        """Mark ``ntok[b]`` more positions of ``seqs[b]`` as filled (after all
        layers ran); ValueError on overflow."""
        self._check(seqs, ntok)
        self.length[seqs] += ntok

    # -- keys and values -------------------------------------------------------------

    def write(self, layer, blocks, offsets, k, v=None):
        """Store keys and values of T tokens at (blocks, offsets) from
        :meth:`locate`, rounded to 16 bits: k, v float32 [T, KV, hd] (v None
        without value pools)."""
        where = (self.xp.asarray(blocks), self.xp.asarray(offsets))
        self.k[layer][where] = k.astype(self.dtype)
        if self.v:
            self.v[layer][where] = v.astype(self.dtype)

    def gather(self, layer, seqs, n_keys):
        """The first ``n_keys`` positions (and up to the end of their block) of
        each of ``seqs`` [B]: (keys, values), each float32 [B, KV, L, hd] with
        L = BLOCK_TOKENS * blocks_for(n_keys) (values None without value
        pools).  Positions past a sequence's filled length hold zeros or its
        own values (module docstring)."""
        nb = blocks_for(n_keys)
        where = self.xp.asarray(self.table[seqs, :nb])                        # [B, nb]

        def read(pool):
            blocks = pool[where]                                     # [B, nb, BLOCK, KV, hd]
            B, _, _, KV, hd = blocks.shape
            return blocks.reshape(B, nb * BLOCK_TOKENS, KV, hd) \
                .transpose(0, 2, 1, 3).astype(np.float32, order='C')
        return read(self.k[layer]), read(self.v[layer]) if self.v else None
