"""Tensor-parallel front-ends in the planner (``mpimoe plan --tp T``,
mpimoe.planning.tensor_parallel): what a group splits, the checks on T and
the node layout, memory and time per front-end rank.

The parameters a group splits are counted again here from the weight
layout's own tensor list (mpimoe.checkpoint.layout.tensor_specs), by name,
for every preset and for the attention variants no preset has.
"""

import math

import numpy as np
import pytest

from mpimoe.checkpoint.layout import nonexpert_tensor_names, tensor_specs
from mpimoe.cli.main import main
from mpimoe.errors import ConfigError
from mpimoe.model.config import PRESETS, model_config
from mpimoe.planning.costmodel import Constants, Workload, memory, pass_time
from mpimoe.planning.placement import make_plan
from mpimoe.planning.tensor_parallel import (allgather_s, allreduce_s, check_tp,
                                             frontend_rank_params, split_params)

#: tensors a group divides (by the last part of the name, or the group they are in)
_SPLIT = {'wq', 'wq_b', 'wk', 'wv', 'wo', 'wkv_b', 'bq', 'bk', 'bv'}

VARIANTS = {
    'qwen2-like': ('tiny', ['attention.qkv_bias=true', 'shared.n_experts=1',
                            'shared.d_expert=64', 'shared.gate=true']),
    'mla-direct-q': ('tiny', ['attention.kind=mla', 'attention.kv_lora_rank=16',
                              'attention.qk_nope_head_dim=8', 'attention.qk_rope_head_dim=8',
                              'attention.v_head_dim=12', 'n_kv_heads=4']),
}
CONFIGS = {**{p: model_config(p) for p in PRESETS},
           **{n: model_config(p, o) for n, (p, o) in VARIANTS.items()}}


def _split_by_name(cfg):
    """Elements of the tensors a group splits, from the layout's names."""
    shapes = dict(tensor_specs(cfg))
    total = 0
    for name in nonexpert_tensor_names(cfg):
        parts = name.split('/')
        last = parts[-1]
        split = (name in ('embed', 'lm_head') or last in _SPLIT
                 or (len(parts) == 4 and parts[2] in ('mlp', 'shared'))
                 or (last in ('q_norm', 'k_norm') and cfg.attention.qk_norm == 'full'))
        total += math.prod(shapes[name]) if split else 0
    return total


@pytest.mark.parametrize('name', CONFIGS)
def test_the_split_is_what_the_layout_holds(name):
    cfg = CONFIGS[name]
    split, replicated = split_params(cfg)
    assert split == _split_by_name(cfg)
    assert split + replicated == cfg.nonexpert_params == frontend_rank_params(cfg, 1)
    assert sum(math.prod(s) for n, s in tensor_specs(cfg) if '/experts/' not in n) == \
        cfg.nonexpert_params


def test_qwen2_like_variant_has_what_it_claims():
    names = nonexpert_tensor_names(CONFIGS['qwen2-like'])
    assert 'layers/1/bq' in names
    assert any(n.endswith('/shared_gate') for n in names)


@pytest.mark.parametrize('preset, tp, message', [
    ('tiny', 3, '--tp 3 must divide n_heads=4, n_kv_heads=2, vocab_size=256, d_dense=128 '
                '(the front-end group splits them); --tp that fit: 1, 2'),
    ('qwen3-235b-a22b', 8, '--tp 8 must divide n_kv_heads=4 (the front-end group splits '
                           'them); --tp that fit: 1, 2, 4'),
])
def test_a_tp_that_does_not_divide_is_one_line(preset, tp, message):
    with pytest.raises(ConfigError) as err:
        check_tp(model_config(preset), tp)
    assert str(err.value) == message and err.value.exit_code == 2


def test_mla_kv_heads_do_not_limit_tp():
    """DeepSeek-V3's latent cache is every head's: its 128 query heads bound T
    (the vocabulary, 129280 = 2^8 x 505, and the hidden sizes allow more)."""
    check_tp(model_config('deepseek-v3'), 128)
    with pytest.raises(ConfigError, match=r'^--tp 256 must divide n_heads=128 \('):
        check_tp(model_config('deepseek-v3'), 256)


@pytest.mark.parametrize('tp', [0, -2, 1.5, True])
def test_tp_must_be_a_positive_integer(tp):
    with pytest.raises(ConfigError, match='must be an integer >= 1'):
        check_tp(model_config('tiny'), tp)


def test_front_end_groups_on_3904_ranks():
    """paper-61l dedicated on 3904 ranks of 8 per node: 192 front-end ranks in
    24 groups of 8 (one node each), the same expert layout as without TP;
    --frontends counts groups."""
    cfg = model_config('paper-61l')
    plain = make_plan(cfg, 3904, 'dedicated', gpus_per_node=8)
    tp = make_plan(cfg, 3904, 'dedicated', gpus_per_node=8, tp=8)
    assert (tp.n_frontends, tp.n_frontend_groups, tp.tp) == (192, 24, 8)
    assert np.array_equal(tp.owner, plain.owner)
    assert tp.plan_hash() != plain.plan_hash()
    again = make_plan(cfg, 3904, 'dedicated', n_frontends=24, gpus_per_node=8, tp=8)
    assert again.plan_hash() == tp.plan_hash()
    assert all(len(set(tp.nodes[g * 8:(g + 1) * 8])) == 1 for g in range(24))
    wb = tp.weight_bytes()
    assert (wb[:192] == frontend_rank_params(cfg, 8) * 2).all()
    assert np.array_equal(wb[192:], plain.weight_bytes()[192:])


@pytest.mark.parametrize('kwargs, message', [
    (dict(gpus_per_node=6, tp=4), '--tp 4: front-end group 1 (ranks 4-7) would straddle nodes '
                                  '[0, 1]; a group must be on one node: choose --tp dividing '
                                  'the GPUs per node (6)'),
    (dict(gpus_per_node=8, tp=16), '--tp 16: front-end group 0 (ranks 0-15) would straddle '
                                   'nodes [0, 1]'),
    (dict(gpus_per_node=8, tp=8, n_frontends=5), 'placement dedicated needs 3712 expert ranks '
                                                 '+ 5 front-ends of 8 ranks: world size must '
                                                 'be 3752 (got 3904)'),
])
def test_layouts_that_do_not_fit_tp(kwargs, message):
    with pytest.raises(ConfigError) as err:
        make_plan(model_config('paper-61l'), 3904, 'dedicated', **kwargs)
    assert str(err.value).startswith(message)


def test_automatic_front_ends_come_in_whole_groups():
    """tiny per-layer needs 8 expert ranks: on 12 ranks F x 2 = 4, on 11 no
    whole number of groups of 2 fits."""
    cfg = model_config('tiny', ['n_heads=8', 'n_kv_heads=4'])
    assert make_plan(cfg, 12, tp=2).n_frontends == 4
    with pytest.raises(ConfigError, match=r'world size must be >= 10 and exceed an expert-rank '
                                          r'count by a multiple of 2 \(got 11\)'):
        make_plan(cfg, 11, tp=2)


def test_memory_per_front_end_rank():
    """GQA (paper-61l): a rank holds its share of the split weights and the KV
    cache of its heads for its group's sequences; MLA (DeepSeek-V3) keeps the
    whole latent cache on every rank.  Sending buffers shrink with the rank's
    share of the tokens."""
    work = Workload(192, 4096, 2)
    for preset, kv_split in (('paper-61l', True), ('deepseek-v3', False)):
        cfg = model_config(preset)
        one = memory(make_plan(cfg, 3904, 'dedicated' if preset == 'paper-61l' else 'packed:4',
                               gpus_per_node=8), work)[0]
        plan = make_plan(cfg, 3904, 'dedicated' if preset == 'paper-61l' else 'packed:4',
                         gpus_per_node=8, tp=2)
        two = memory(plan, work)[0]
        assert two.weights == frontend_rank_params(cfg, 2) * 2
        # 96 groups hold 2 sequences each, 192 front-ends held 1
        assert two.kv_cache == (one.kv_cache if kv_split else 2 * one.kv_cache)
        assert two.buffers == one.buffers


def test_collective_times_and_the_front_end_stage():
    """Ring collectives: an Allreduce moves 2 (T-1)/T of the bytes over each
    GPU's NVLink with 2 (T-1) latencies, an Allgather half that; T = 1 costs
    nothing.  With T = 2 the decode front-end stage of paper-61l is each
    rank's roofline plus, per layer and micro-batch, its Allreduces (after
    the attention, after a dense MLP) and the Allgather of the routed
    experts' shares, plus the LM head's slice, the logits' Allgather and the
    embedding's Allreduce."""
    c = Constants()
    assert allreduce_s(1, 1e9, c) == allgather_s(1, 1e9, c) == 0
    assert allreduce_s(4, 1e9, c) == pytest.approx(
        2 * 3 / 4 * 1e9 / (c.nvlink_gbs * 1e9) + 6 * c.alpha_us * 1e-6)
    cfg = model_config('paper-61l')
    plan = make_plan(cfg, 3904, 'dedicated', gpus_per_node=8, tp=2)
    work = Workload(192, 4096, 1)                           # 2 sequences per group
    t = pass_time(plan, work, c, new_tokens=1)
    one = pass_time(make_plan(cfg, 3904, 'dedicated', gpus_per_node=8), Workload(96, 4096, 1),
                    c, new_tokens=1)
    rows = 2 * cfg.d_model * 4
    collectives = (cfg.n_dense_layers * 2 * allreduce_s(2, rows, c)
                   + cfg.n_moe_layers * (allreduce_s(2, rows, c) + allgather_s(2, rows, c))
                   + allgather_s(2, 2 * cfg.vocab_size * 4, c) + allreduce_s(2, rows, c))
    # each rank does half of the split work of 2 sequences, the work of 1 without TP...
    assert t.frontend > collectives
    assert t.frontend - collectives < one.frontend * 1.01


def test_cli_plan_with_tp(capsys, tmp_path):
    args = ['plan', '--preset', 'paper-61l', '--gpus', '3904', '--gpus-per-node', '8',
            '--placement', 'dedicated', '--gpu-memory-gb', '64']
    assert main([*args, '--tp', '2']) == 0
    out = capsys.readouterr().out
    assert 'front-ends: 96 groups of 2 ranks (tensor parallel, one node each); weights per ' \
           'front-end rank: 31.36 GB' in out
    assert main([*args, '--tp', '3']) == 2
    err = capsys.readouterr().err
    assert err == ('mpimoe: error: --tp 3 must divide n_heads=128, n_kv_heads=128, '
                   'vocab_size=129280 (the front-end group splits them); --tp that fit: 1, 2, '
                   '4, 8, 16, 32, 64\n')
    job = tmp_path / 'tp.sbatch'
    assert main([*args, '--tp', '2', '--emit-sbatch', str(job)]) == 0
    text = job.read_text()
    # the job's run options give `mpimoe run` the same plan (96 groups of 2)
    assert '--placement dedicated --frontends 96 --tp 2 ' in text
    plan = make_plan(model_config('paper-61l'), 3904, 'dedicated', n_frontends=96,
                     gpus_per_node=8, tp=2)
    assert f'plan hash {plan.plan_hash()}' in text and 'front-ends in groups of 2' in text


# -- reading a shard -------------------------------------------------------------------

SHARD_VARIANTS = {
    'tiny': (),
    'qwen2-like': VARIANTS['qwen2-like'][1],
    'mla-direct-q': VARIANTS['mla-direct-q'][1],
    'olmoe-like': ('attention.qk_norm=full',),
}


@pytest.mark.parametrize('name', SHARD_VARIANTS)
def test_each_rank_reads_its_block_and_the_group_every_checksum(make_weights, name):
    """read_shard: each rank's tensors are its shard_part blocks of the whole
    tensors, bit for bit (read from the file as hyperslabs); the split tensors
    read whole (checksummed) are the ones verifiers() gives each rank, so
    every one is verified by exactly one rank of the group."""
    from mpimoe.checkpoint.weights import WeightFile
    from mpimoe.model.tp_frontend import read_shard, shard_part, verifiers
    path = make_weights('tiny', SHARD_VARIANTS[name])
    with WeightFile(path) as wf:
        cfg, whole = wf.config, wf.read_nonexpert()
        shapes = dict(tensor_specs(cfg))
        for T in (2, 4):
            verified = []
            for t in range(T):
                reads = []                              # (name, part) of each read
                real = wf.read
                wf.read = lambda n, verify=True, part=None: (reads.append((n, part))
                                                             or real(n, verify, part))
                try:
                    got = read_shard(wf, t, T)
                finally:
                    del wf.read
                assert sorted(got) == sorted(whole)
                for n, a in got.items():
                    part = shard_part(cfg, n, shapes[n], t, T)
                    want = whole[n] if part is None else whole[n][part]
                    assert a.dtype == want.dtype and np.array_equal(a.view(np.uint8),
                                                                    want.view(np.uint8)), n
                    root = a                          # no view pins a whole tensor
                    while root.base is not None:
                        root = root.base
                    assert root.nbytes == a.nbytes, n
                mine = [n for n, part in reads if part is None
                        and shard_part(cfg, n, shapes[n], t, T) is not None]
                assert sorted(mine) == sorted(n for n, r in verifiers(cfg, T).items() if r == t)
                verified += mine
            split = [n for n in whole if shard_part(cfg, n, shapes[n], 0, T) is not None]
            assert sorted(verified) == sorted(split)


def test_a_corrupt_split_tensor_fails_on_its_verifying_rank(make_weights, tmp_path):
    """A flipped word in lm_head's block of the rank that does not read it
    whole: the one rank that does finds the checksum mismatch.  A NaN there
    (checksum rewritten to match) is found by both: by the block's rank at
    its place in the whole tensor."""
    import shutil
    import zlib
    import h5py
    from mpimoe.checkpoint.weights import WeightFile
    from mpimoe.errors import DataError
    from mpimoe.model.tp_frontend import read_shard, verifiers
    from mpimoe.model.config import model_config
    src = make_weights('tiny')
    verifier = verifiers(model_config('tiny'), 2)['lm_head']
    owner = 1 - verifier
    for kind in ('flip', 'nan'):
        path = tmp_path / f'{kind}.h5'
        shutil.copyfile(src, path)
        with h5py.File(path, 'r+') as f:
            ds = f['lm_head']                                 # [d, V]: 2 blocks of columns
            row = ds[3]
            j = owner * ds.shape[1] // 2 + 5
            row[j] = 0x7FC0 if kind == 'nan' else row[j] ^ 0x0100
            ds[3] = row
            if kind == 'nan':
                ds.attrs['crc32'] = zlib.crc32(ds[...].tobytes())
        failed = {}
        with WeightFile(str(path)) as wf:
            for t in range(2):
                try:
                    read_shard(wf, t, 2)
                except DataError as e:
                    failed[t] = str(e)
        if kind == 'nan':
            assert sorted(failed) == [0, 1], failed
            assert all(f'lm_head: value at [3, {j}] is NaN or Inf' in m for m in failed.values())
        else:
            assert list(failed) == [verifier], failed
            assert 'lm_head: checksum mismatch' in failed[verifier], failed


@pytest.mark.skipif(not __import__('os').path.exists('/proc/self/io'), reason='Linux /proc')
def test_a_block_of_columns_reads_its_bytes_not_the_tensor(make_weights):
    """A TP rank's block of lm_head's columns (1/4 of each row) costs about
    its own bytes of reads (WeightFile opens without HDF5's sieve buffer,
    through which it read a 64 KiB window per row, here the whole tensor):
    counted by the kernel (rchar);
    the slack is the dataset's metadata."""
    from mpimoe.checkpoint.weights import WeightFile
    from mpimoe.model.tp_frontend import shard_part

    def rchar():
        with open('/proc/self/io') as f:
            return int(dict(line.split(': ') for line in f.read().splitlines())['rchar'])
    with WeightFile(make_weights('tiny')) as wf:
        shape = dict(tensor_specs(wf.config))['lm_head']
        part = shard_part(wf.config, 'lm_head', shape, 1, 4)
        before = rchar()
        block = wf.read('lm_head', part=part)
        read = rchar() - before
    whole = math.prod(shape) * 2
    assert block.nbytes == whole // 4 and read <= block.nbytes + 4096 < whole, (read, whole)


def test_whole_tensor_reads_are_shared_by_bytes():
    """verifiers(): every split tensor has one verifying rank, and the bytes
    each rank reads whole differ by at most the largest tensor (deepseek-v3,
    T = 4 and 8; tiny, T = 2)."""
    from mpimoe.model.tp_frontend import shard_part, verifiers
    for preset, T in (('deepseek-v3', 4), ('deepseek-v3', 8), ('tiny', 2)):
        cfg = model_config(preset)
        shapes = dict(tensor_specs(cfg))
        split = {n for n in nonexpert_tensor_names(cfg)
                 if shard_part(cfg, n, shapes[n], 0, T) is not None}
        v = verifiers(cfg, T)
        assert set(v) == split and set(v.values()) <= set(range(T))
        load = [sum(math.prod(shapes[n]) for n, r in v.items() if r == t) for t in range(T)]
        assert max(load) - min(load) <= max(math.prod(shapes[n]) for n in split), (preset, T)
