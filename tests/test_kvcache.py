"""The block KV cache (mpimoe.model.kvcache): reservations and handles,
deterministic allocation and reuse, refusals, positions and overflow, 16-bit
storage, zeroed blocks, and its size against the planner's figure
(mpimoe.planning.costmodel.kv_cache_bytes) and the planner's use of it."""

import numpy as np
import pytest

from mpimoe.backends.backend import DTYPES, round16
from mpimoe.model.config import model_config
from mpimoe.model.kvcache import BLOCK_TOKENS, BlockKVCache, blocks_for
from mpimoe.planning.costmodel import Workload, describe, kv_cache_bytes, make_constants, memory
from mpimoe.planning.placement import make_plan

TINY = model_config('tiny')


def _cache(n_blocks, max_seqs, n_layers=1, dtype='bfloat16', max_seq_tokens=None):
    return BlockKVCache(n_layers, n_blocks, 2, 4, dtype, max_seqs=max_seqs,
                        max_seq_tokens=max_seq_tokens)


def test_blocks_for():
    assert BLOCK_TOKENS == 16
    assert [blocks_for(n) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]
    assert blocks_for(np.array([1, 16, 17])).tolist() == [1, 1, 2]


def test_allocation_is_deterministic_and_refuses_when_full():
    """Handles and blocks smallest first; None when the blocks or the handles
    run out (nothing taken then); ValueError for a sequence no pool of this
    size can hold."""
    cache = _cache(5, 3)
    assert cache.free_blocks == 5 and cache.k[0].shape == (5, BLOCK_TOKENS, 2, 4)
    a, b = cache.allocate(17), cache.allocate(16)
    assert (a, b) == (0, 1) and cache.table[a, :2].tolist() == [0, 1] and cache.table[b, 0] == 2
    assert cache.free_blocks == 2 and cache.capacity[[a, b]].tolist() == [17, 16]
    assert cache.allocate(33) is None and cache.free_blocks == 2       # 3 blocks: 2 free
    c = cache.allocate(0)                                               # no blocks, a handle
    assert c == 2 and cache.free_blocks == 2
    assert cache.allocate(1) is None                                    # no handle left
    with pytest.raises(ValueError, match='81 tokens needs 6 KV blocks'):
        cache.allocate(81)
    with pytest.raises(ValueError, match='needs 2 KV blocks'):
        _cache(8, 2, max_seq_tokens=16).allocate(17)


def test_release_gives_blocks_back_and_reuse_is_deterministic():
    cache = _cache(6, 4)
    a, b, c = cache.allocate(20), cache.allocate(40), cache.allocate(10)   # 2 + 3 + 1 blocks
    assert cache.free_blocks == 0
    cache.release(b)
    assert cache.free_blocks == 3 and cache.length[b] == 0
    d = cache.allocate(33)
    assert d == b and cache.table[d, :3].tolist() == [2, 3, 4]         # b's handle and blocks
    cache.release(a)
    cache.release(c)
    e, f = cache.allocate(16), cache.allocate(32)
    assert (e, f) == (c, a)                                  # the last released first
    assert cache.table[e, 0] == 5 and cache.table[f, :2].tolist() == [0, 1]
    with pytest.raises(ValueError, match='handle 3 is not allocated'):
        cache.release(3)
    cache.release(e)
    with pytest.raises(ValueError, match='not allocated'):
        cache.release(e)


def test_positions_advance_and_overflow():
    cache = _cache(4, 2)
    a, b = cache.allocate(5), cache.allocate(3)
    seqs = np.array([b, a])
    assert cache.positions(seqs, np.array([2, 3])).tolist() == [0, 1, 0, 1, 2]
    cache.advance(seqs, np.array([2, 3]))
    pos, blocks, offsets = cache.locate(seqs, np.array([1, 2]))
    assert pos.tolist() == [2, 3, 4] and offsets.tolist() == [2, 3, 4]
    assert blocks.tolist() == [cache.table[b, 0]] + [cache.table[a, 0]] * 2
    with pytest.raises(ValueError, match='overflow'):
        cache.locate(seqs, np.array([2, 1]))
    with pytest.raises(ValueError, match='overflow'):
        cache.advance(seqs, np.array([1, 3]))
    assert cache.length[seqs].tolist() == [2, 3]                       # unchanged by a refusal
    cache.release(a)
    with pytest.raises(ValueError, match='not allocated'):
        cache.advance(np.array([a]), np.array([1]))


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_keys_and_values_are_stored_in_16_bits_per_layer(dtype):
    """write rounds to the 16-bit dtype (exactly round16), gather widens back
    to FP32 [B, KV, L, hd], L whole blocks; the other layer is untouched;
    past the filled length a sequence reads zeros, and past its own blocks
    (padding to the longest) its first block again."""
    cache = _cache(4, 2, n_layers=2, dtype=dtype)
    assert all(p.dtype == DTYPES[dtype] for p in cache.k + cache.v)
    a, b = cache.allocate(20), cache.allocate(3)
    seqs, ntok = np.array([a, b]), np.array([18, 3])
    rng = np.random.default_rng(0)
    k, v = rng.standard_normal((2, 21, 2, 4)).astype(np.float32)
    _, blocks, offsets = cache.locate(seqs, ntok)
    cache.write(1, blocks, offsets, k, v)
    keys, vals = cache.gather(1, seqs, 18)
    assert keys.dtype == vals.dtype == np.float32 and keys.shape == (2, 2, 32, 4)
    for got, want in ((keys, k), (vals, v)):
        np.testing.assert_array_equal(got[0, :, :18], round16(want[:18], dtype).transpose(1, 0, 2))
        np.testing.assert_array_equal(got[1, :, :3], round16(want[18:], dtype).transpose(1, 0, 2))
        assert not got[0, :, 18:].any() and not got[1, :, 3:16].any()
        np.testing.assert_array_equal(got[1, :, 16:], got[1, :, :16])   # its own block again
    assert not (k[:18] == round16(k[:18], dtype)).all()                # rounding happened
    assert not any(p.any() for p in (cache.k[0], cache.v[0]))


def test_a_reused_block_is_zeroed():
    cache = _cache(2, 2)
    a = cache.allocate(16)
    _, blocks, offsets = cache.locate(np.array([a]), np.array([16]))
    ones = np.ones((16, 2, 4), np.float32)
    cache.write(0, blocks, offsets, ones, ones)
    cache.release(a)
    b = cache.allocate(16)
    assert cache.table[b, 0] == blocks[0]
    assert not any(p.any() for p in cache.k + cache.v)


@pytest.mark.parametrize('preset,kv_tokens', [('tiny', 0), ('tiny', 1), ('tiny', 16),
                                              ('tiny', 1000), ('small', 4097)])
def test_nbytes_is_the_planners_figure(preset, kv_tokens):
    cfg = model_config(preset)
    cache = BlockKVCache.for_tokens(cfg, kv_tokens, max_seqs=4)
    assert cache.nbytes == kv_cache_bytes(cfg, kv_tokens)
    assert cache.nbytes == (2 * cfg.n_layers * BLOCK_TOKENS * blocks_for(kv_tokens)
                            * cfg.n_kv_heads * cfg.head_dim * 2)
    # the table is as wide as the longest sequence the model takes, or the pool
    assert cache.table.shape == (4, min(blocks_for(kv_tokens),
                                        blocks_for(cfg.max_position_embeddings)))


def test_planner_front_end_memory_is_the_pool():
    """memory(): --kv-tokens' pool when given (with or without a workload),
    else a whole-block reservation of S tokens per sequence of the busiest
    front-end (ceil(5 / 2) = 3 sequences of 20 tokens: 2 blocks each)."""
    cfg = model_config('tiny')
    plan = make_plan(cfg, 26, 'dedicated', n_frontends=2)
    work = Workload(5, 20)
    assert memory(plan, work)[0].kv_cache == kv_cache_bytes(cfg, 3 * 2 * BLOCK_TOKENS)
    assert memory(plan, work, kv_tokens=1000)[0].kv_cache == kv_cache_bytes(cfg, 1000)
    fe, ex = memory(plan, None, kv_tokens=1000)
    assert fe.kv_cache == kv_cache_bytes(cfg, 1000) and fe.buffers == ex.kv_cache == 0
    assert memory(plan)[0].kv_cache == 0
    head = describe(plan, None, make_constants(), 80, kv_tokens=1000)[0]
    assert 'weights and a KV cache of 1,000 tokens per front-end' in head
