"""Load balancing: the gate bias (--balance bias), replicas of hot experts
(--replicas R --stats F) and the topology layout in `mpimoe run --stats`.

Unit tests check the rules (mpimoe.planning.balance, the plan's replica table and
permute keys); MPI tests run the engine on the tiny model and compare with the
single-process reference, with the bounds argued in tests/contract.py: with
replicas or a permuted layout every token still meets the same expert with the
same arithmetic, so the outputs must match the reference's.  The gate bias
changes which experts tokens choose, so there the test is the behaviour: on
weights whose router makes two experts hot, the bias lowers max/mean load.
"""

import itertools
import json
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

from mpirun import mpiexec
from mpimoe.planning.balance import max_over_mean, replicate, update_bias
from mpimoe.model.config import model_config
from mpimoe.errors import ConfigError
from mpimoe.io.outputs import read_outputs
from mpimoe.planning.placement import make_plan
from mpimoe.planning.sbatch import sbatch_script
from mpimoe.runtime.options import JobOptions
from mpimoe.model.reference import run_reference
from mpimoe.moe.router import route, spread_copies
from contract import assert_matches_reference
from test_engine import REF_NEW_TOKENS, RUN_TIMEOUT


# -- the gate bias rule ------------------------------------------------------------

def test_update_bias_moves_by_one_step_against_the_deviation_recentres_and_clips():
    bias = np.array([[0.0, 0.0, 0.0, 0.0], [0.45, -0.45, 0.0, 0.1]], dtype=np.float32)
    load = np.array([[40, 10, 10, 20], [0, 100, 50, 50]])      # means 20 and 50
    got = update_bias(bias, load, step=0.1, clip=0.5)
    assert got.dtype == np.float32
    # above the mean: -step; below: +step; at the mean: 0 ->
    #   [-0.1, 0.1, 0.1, 0] and [0.55, -0.55, 0, 0.1]; minus their means (0.025 each);
    #   then clipped to [-0.5, 0.5]
    np.testing.assert_allclose(got, [[-0.125, 0.075, 0.075, -0.025],
                                     [0.5, -0.5, -0.025, 0.075]], atol=1e-7)
    # no copies: a centred bias stays; a common offset (which changes no choice) goes
    centred = np.array([[0.2, -0.2, 0.1, -0.1]], dtype=np.float32)
    assert (update_bias(centred, np.zeros((1, 4)), 0.1, 0.5) == centred).all()
    np.testing.assert_allclose(update_bias(centred + 0.3, np.zeros((1, 4)), 0.1, 0.5), centred,
                               atol=1e-7)


def test_bias_changes_the_choice_never_the_combine_weights():
    h = np.eye(3, dtype=np.float32)                        # token t has logits w_router[t]
    w = np.log(np.array([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.3, 0.2, 0.5]], np.float32))
    plain, weights = route(h, w, 2)
    assert plain.tolist() == [[0, 1], [1, 2], [2, 0]]
    biased, bweights = route(h, w, 2, bias=np.array([-0.4, 0.0, 0.0], np.float32))
    assert biased.tolist() == [[1, 2], [1, 2], [2, 1]]     # expert 0 never chosen now
    # weights: the softmax probabilities of the chosen experts, renormalised
    np.testing.assert_allclose(bweights, [[0.6, 0.4], [0.625, 0.375], [5 / 7, 2 / 7]],
                               rtol=1e-6)
    np.testing.assert_allclose(weights[1], bweights[1], rtol=1e-6)


def test_max_over_mean():
    assert max_over_mean([[1, 1, 1, 1], [4, 0, 0, 0], [0, 0, 0, 0]]).tolist() == [1.0, 4.0, 0.0]


# -- replicas: the greedy choice -----------------------------------------------------

def _best_max_per_copy(loads, extra):
    """Brute force: the smallest max(load / copies) over every way of giving
    ``extra`` more copies to the pairs of ``loads`` (float [n])."""
    best = np.inf
    for alloc in itertools.product(range(extra + 1), repeat=len(loads)):
        if sum(alloc) == extra:
            best = min(best, (loads / (1 + np.array(alloc))).max())
    return best


def test_replicate_one_per_rank_meets_the_brute_force_optimum():
    rng = np.random.default_rng(5)
    for _ in range(20):
        loads = np.floor(rng.pareto(1.0, (2, 3)) * 50) + 1          # [Lm=2, E=3], > 0
        for n_ranks in (1, 2, 4):
            rows = replicate(loads, n_ranks, per_layer=1, per_rank=1)
            assert len(rows) == n_ranks and sorted(rows[:, 2]) == list(range(n_ranks))
            copies = np.ones_like(loads)
            np.add.at(copies, (rows[:, 0], rows[:, 1]), 1)
            assert (loads / copies).max() == _best_max_per_copy(loads.ravel(), n_ranks)


def test_replicate_respects_rank_and_layer_room_and_skips_idle_experts():
    loads = np.zeros((4, 8))
    loads[:, 0] = [500, 400, 300, 200]
    loads[:, 1:3] = 50                                       # experts 3..7 idle
    for per_layer, per_rank, n_ranks in ((1, 4, 3), (2, 4, 3), (1, 1, 5), (2, 2, 40)):
        rows = replicate(loads, n_ranks, per_layer, per_rank)
        m, e, r = rows.T
        assert len({tuple(x) for x in rows.tolist()}) == len(rows)        # no pair twice
        assert np.bincount(r, minlength=n_ranks).max() <= per_rank
        assert np.bincount(m * n_ranks + r).max() <= per_layer
        assert (e < 3).all()                                                # never idle ones
    # enough room: every rank full
    rows = replicate(loads, 3, per_layer=1, per_rank=4)
    assert np.bincount(rows[:, 2]).tolist() == [4, 4, 4]


# -- replicas in the plan -------------------------------------------------------------

#: token copies [3 MoE layers, 8 experts] of tiny: experts 0 and 1 hot, 5 idle in layer 1
HOT = np.array([[300, 200, 40, 40, 40, 0, 40, 40],
                [40, 250, 40, 40, 40, 40, 40, 40],
                [150, 150, 150, 40, 40, 40, 40, 40]], dtype=float)


def _check_keys(plan):
    """dispatch_keys decode to (rank in layer_ranks, slot in that rank's experts
    of the layer, as rank_experts lists them); copy_ranks lists distinct ranks."""
    cfg = plan.cfg
    for m, layer in enumerate(cfg.moe_layers):
        keys, n, k = plan.dispatch_keys(m)
        ranks, n2 = plan.copy_ranks(m)
        assert (n == n2).all() and ranks[:, 0].tolist() == plan.owner[m].tolist()
        members = plan.layer_ranks(m)
        for e in range(cfg.n_experts):
            assert len(set(ranks[e, :n[e]].tolist())) == n[e]
            for c in range(n[e]):
                pos, slot = divmod(int(keys[e, c]), k)
                assert members[pos] == ranks[e, c]
                here = [x for lyr, x in plan.rank_experts(members[pos]) if lyr == layer]
                assert here[slot] == e


@pytest.mark.parametrize('world, mode, frontends, replicas', [
    (11, 'per-layer', None, 2), (6, 'packed:2', None, 1), (27, 'dedicated', None, 2),
    (18, 'packed:2', 2, 4)])
def test_plan_with_replicas(world, mode, frontends, replicas):
    cfg = model_config('tiny')
    plan = make_plan(cfg, world, mode, frontends, loads=HOT, replicas=replicas)
    base = make_plan(cfg, world - replicas, mode, frontends, loads=HOT)
    P, R = world, replicas
    assert plan.n_replica_ranks == R and plan.n_frontends == base.n_frontends
    assert (plan.replicas[:, 2] >= P - R).all() and set(plan.replicas[:, 2]) == set(range(P - R, P))
    # a replica rank holds at most what an expert rank of the mode holds
    hosted = np.bincount(plan.replicas[:, 2], minlength=P)[P - R:]
    assert hosted.max() <= plan.experts_per_rank * cfg.n_moe_layers // plan.n_groups
    assert (plan.weight_bytes()[P - R:] == hosted * cfg.expert_params * cfg.itemsize).all()
    # the hottest pair has a replica; idle experts none; replica ranks join their layers
    assert [0, 0] in plan.replicas[:, :2].tolist()
    assert [0, 5] not in plan.replicas[:, :2].tolist()
    for m, e, r in plan.replicas.tolist():
        assert r in plan.layer_ranks(m) and (cfg.n_dense_layers + m, e) in plan.rank_experts(r)
    table = plan.replica_table()
    assert sum(len(ranks) - 1 for _, ranks in table) == len(plan.replicas)
    assert all(ranks[0] == plan.owner[layer - 1, e] for (layer, e), ranks in table)
    _check_keys(plan)
    assert plan.plan_hash() != base.plan_hash()
    assert 'replicas: ' in plan.describe() and f'of which {R} replica rank' in plan.describe()


def test_no_replicas_keeps_keys_and_hash():
    cfg = model_config('tiny')
    for world, mode in ((9, 'per-layer'), (5, 'packed:2'), (7, 'packed:4')):
        plan = make_plan(cfg, world, mode, loads=HOT, replicas=0)
        assert plan.plan_hash() == make_plan(cfg, world, mode, loads=HOT).plan_hash()
        assert len(plan.replicas) == 0
        _check_keys(plan)
        for m in range(cfg.n_moe_layers):
            keys, n, _ = plan.dispatch_keys(m)
            assert keys.shape == (8, 1) and (n == 1).all()


def test_spread_copies_round_robin_by_token():
    experts = np.array([[0, 1], [1, 2], [0, 2], [0, 1], [2, 0]])
    got = spread_copies(experts, np.array([3, 2, 1]))
    assert got.tolist() == [[0, 0], [1, 0], [2, 0], [0, 1], [0, 1]]
    assert spread_copies(experts, np.array([3, 2, 1]), offset=2).tolist() == \
        [[2, 0], [1, 0], [1, 0], [2, 1], [0, 0]]


def test_replica_misfits_one_line():
    cfg = model_config('tiny')
    with pytest.raises(ConfigError, match='--replicas needs --stats'):
        make_plan(cfg, 11, replicas=2)
    with pytest.raises(ConfigError) as e:
        make_plan(cfg, 10, loads=HOT, replicas=2)
    assert str(e.value) == ('placement per-layer needs 8 expert ranks + F front-ends + 2 '
                            'replica ranks: world size must be >= 11 (got 10)')
    with pytest.raises(ConfigError, match=r'world size must be 13 \(got 12\)'):
        make_plan(cfg, 12, n_frontends=2, loads=HOT, replicas=3)
    with pytest.raises(ConfigError, match='replicas=-1: must be an integer >= 0'):
        make_plan(cfg, 9, loads=HOT, replicas=-1)


def test_replicas_paper_61l_dedicated_zipf_fast():
    cfg = model_config('paper-61l')
    loads = np.random.default_rng(3).zipf(1.5, (58, 64)).astype(float)
    t0 = time.perf_counter()
    plan = make_plan(cfg, 3904 + 64, 'dedicated', gpus_per_node=8, loads=loads, replicas=64)
    text = plan.describe()
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f'make_plan + describe took {elapsed:.3f} s'
    assert plan.n_frontends == 192 and len(plan.replicas) == 64
    assert sorted(plan.replicas[:, 2]) == list(range(3904, 3968))          # one pair each
    copies = np.ones_like(loads)
    np.add.at(copies, (plan.replicas[:, 0], plan.replicas[:, 1]), 1)
    assert (loads / copies).max() < loads.max() / 10
    assert 'of which 64 replica ranks (ranks 3904-3967)' in text


def test_nodes_layout():
    cfg = model_config('paper-4l')
    loads = np.ones((4, 16))
    loads[:, :3] = 100
    block = make_plan(cfg, 24, 'per-layer', n_frontends=8, gpus_per_node=8, loads=loads)
    same = make_plan(cfg, 24, 'per-layer', n_frontends=8, nodes=np.arange(24) // 8, loads=loads)
    assert same.plan_hash() == block.plan_hash() and same.gpus_per_node == 8
    cyclic = make_plan(cfg, 24, 'per-layer', n_frontends=8, nodes=np.arange(24) % 3,
                       loads=loads)
    assert cyclic.n_nodes == 3 and (cyclic.owner != block.owner).any()
    assert 'the MPI node layout' in cyclic.describe()
    for bad in (np.arange(23), -np.ones(24, int), np.full(24, 0.5)):
        with pytest.raises(ConfigError, match='nodes must be 24 node indices'):
            make_plan(cfg, 24, 'per-layer', n_frontends=8, nodes=bad)


def test_sbatch_with_stats_passes_them_to_the_run():
    cfg = model_config('paper-4l')
    loads = np.full((4, 16), 10.0)
    loads[:, :3] = 200
    plan = make_plan(cfg, 76, 'dedicated', n_frontends=8, gpus_per_node=8, loads=loads,
                     replicas=4)
    text = sbatch_script(plan, '--preset paper-4l', stats='/data/run 1.json')
    assert ("--placement dedicated --frontends 8 --stats '/data/run 1.json' --replicas 4 "
            "--micro-batches 2") in text
    assert f'plan hash {plan.plan_hash()}' in text
    with pytest.raises(ConfigError, match='give stats exactly when the plan has loads'):
        sbatch_script(plan, '--preset paper-4l')


def _stats_file(path, counts, layers):
    path.write_text(json.dumps({'expert_loads': {'layers': layers,
                                                 'counts': np.asarray(counts).tolist()}}))
    return str(path)


def test_cli_plan_replicas(tmp_path):
    stats = _stats_file(tmp_path / 'run.json', HOT.astype(int), [1, 2, 3])
    job = tmp_path / 'job.sbatch'
    r = subprocess.run([sys.executable, '-m', 'mpimoe', 'plan', '--preset', 'tiny', '--gpus',
                        '11', '--gpus-per-node', '11', '--stats', stats, '--replicas', '2',
                        '--full', '--emit-sbatch', str(job)], capture_output=True, text=True,
                       timeout=20)
    assert r.returncode == 0, r.stderr
    plan = make_plan(model_config('tiny'), 11, loads=HOT, replicas=2)
    assert 'rank 9 (node 0): replicas: layer 1 expert 0; ' in r.stdout
    for (layer, e), ranks in plan.replica_table():
        assert f'layer {layer} expert {e}: {len(ranks)} copies on ranks ' \
               f'{", ".join(map(str, ranks))} (primary first)' in r.stdout
    assert f'--stats {stats} --replicas 2' in job.read_text()


# -- MPI: the engine ---------------------------------------------------------------------

@pytest.fixture(scope='module')
def reference(tiny_weights, skewed, tiny_inputs, tmp_path_factory):
    """``reference(weights) -> outputs`` of `mpimoe reference` (REF_NEW_TOKENS, logits)."""
    root = tmp_path_factory.mktemp('ref')
    done = {}

    def get(weights):
        if weights not in done:
            out = root / f'{len(done)}.h5'
            run_reference(JobOptions(weights=weights, input=tiny_inputs, output=str(out),
                                     max_new_tokens=REF_NEW_TOKENS, save_logits=True),
                          log=lambda *a: None)
            done[weights] = read_outputs(out)
        return done[weights]

    return get


def _run(weights, inputs, tmp_path, n, extra, max_new=REF_NEW_TOKENS):
    out, metrics = tmp_path / 'out.h5', tmp_path / 'run.json'
    proc = mpiexec(n, ['run', '--weights', weights, '--input', inputs, '--output', out,
                       '--max-new-tokens', max_new, '--save-logits', '--metrics', metrics,
                       '--overwrite', *extra], timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    return read_outputs(out), json.loads(metrics.read_text())


@pytest.mark.timeout(3 * RUN_TIMEOUT)
def test_gate_bias_lowers_max_over_mean(skewed, reference, tiny_inputs, tmp_path):
    """Steps of <= 24 tokens (about 20 of them): the bias learnt in the first
    steps steers the later ones away from experts 0 and 1."""
    rounds = ['--batch-tokens', '24']
    got, off = _run(skewed, tiny_inputs, tmp_path, 9, rounds)
    # --balance off: the reference
    assert_matches_reference(got, reference(skewed), skewed, tiny_inputs, REF_NEW_TOKENS)
    assert off['balance']['bias'] is None
    before = np.array(off['expert_loads']['max_over_mean'])         # [Lm]
    assert (before > 1.8).all(), before                            # the file is skewed
    bias_opts = ['--balance', 'bias', '--balance-step', '0.03']
    for n, extra in ((9, []), (10, ['--frontends', '2'])):
        _, on = _run(skewed, tiny_inputs, tmp_path, n, rounds + bias_opts + extra)
        after = np.array(on['expert_loads']['max_over_mean'])
        assert (after < before).all(), (before, after)
        b = on['balance']
        bias = np.array(b['bias'])                                  # [Lm, E]
        assert bias.shape == (3, 8) and (np.abs(bias) <= 0.5).all()
        assert (bias[:, :2] < 0).all() and (bias[:, 2:].max(axis=1) > 0).all(), bias
        assert (b['mode'], b['every'], b['step'], b['clip']) == ('bias', 1, 0.03, 0.5)
        # every front-end ends with rank 0's bias (each routed with it)
        crc = zlib.crc32(bias.astype(np.float32).tobytes())
        assert [r['bias_crc32'] for r in on['ranks'] if r['role'] == 'front-end'] == \
            [crc] * (n - 8)
        # one window per step (--balance-every 1), as many as rank 0 ran
        steps = on['ranks'][0]['steps']
        assert len(b['max_over_mean_history']) == steps and steps >= 10, steps
        assert np.array(on['expert_loads']['counts']).sum() == \
            np.array(off['expert_loads']['counts']).sum()


def _copies_rows(report):
    """{(layer, expert): [rows computed by each copy]} from run.json's ranks."""
    out = {}
    for r in report['ranks']:
        for (layer, e), rows in zip(r.get('experts', []), r.get('rows', [])):
            out.setdefault((layer, e), []).append(rows)
    return out


@pytest.mark.timeout(2 * RUN_TIMEOUT)
@pytest.mark.parametrize('n, mode, extra, replicas', [
    (11, 'per-layer', [], 2),
    (6, 'packed:2', [], 1),
    (11, 'per-layer', ['--frontends', '2', '--batch-tokens', '40'], 1),
])
def test_replicas_equal_reference(tiny_weights, reference, tiny_inputs, tmp_path, n, mode,
                                  extra, replicas):
    stats = _stats_file(tmp_path / 'stats.json', HOT.astype(int), [1, 2, 3])
    got, report = _run(tiny_weights, tiny_inputs, tmp_path, n,
                       ['--placement', mode, '--stats', stats, '--replicas', replicas, *extra])
    assert_matches_reference(got, reference(tiny_weights), tiny_weights, tiny_inputs,
                             REF_NEW_TOKENS)
    frontends = 2 if '--frontends' in extra else None
    plan = make_plan(model_config('tiny'), n, mode, frontends, loads=HOT, replicas=replicas)
    p = report['placement']
    assert (p['hash'], p['replica_ranks']) == (plan.plan_hash(), replicas)
    assert p['replicas'] == [[layer, e, ranks] for (layer, e), ranks in plan.replica_table()]
    # every copy of a replicated expert computes rows; all copies together what was routed
    loads = np.array(report['expert_loads']['counts'])                 # [Lm, E]
    rows = _copies_rows(report)
    for (layer, e), ranks in plan.replica_table():
        assert len(rows[layer, e]) == len(ranks) and min(rows[layer, e]) > 0, rows[layer, e]
    assert all(sum(v) == loads[layer - 1, e] for (layer, e), v in rows.items())
    for r in report['ranks'][n - replicas:]:
        assert r['role'] == 'expert' and sum(r['rows']) > 0


@pytest.mark.timeout(2 * RUN_TIMEOUT)
def test_stats_layout_equals_reference(tiny_weights, reference, tiny_inputs, tmp_path):
    """packed:2 with stats whose hot experts share a rank in the block layout:
    the run permutes the experts (on the one node of mpiexec) and still equals
    the reference."""
    stats = _stats_file(tmp_path / 'stats.json', HOT.astype(int), [1, 2, 3])
    cfg = model_config('tiny')
    plan = make_plan(cfg, 5, 'packed:2', loads=HOT, nodes=np.zeros(5, int))
    assert (plan.owner != plan.block_owner).any()
    got, report = _run(tiny_weights, tiny_inputs, tmp_path, 5,
                       ['--placement', 'packed:2', '--stats', stats])
    assert_matches_reference(got, reference(tiny_weights), tiny_weights, tiny_inputs,
                             REF_NEW_TOKENS)
    assert report['placement']['hash'] == plan.plan_hash()
    hosted = {tuple(p) for r in report['ranks'] for p in r.get('experts', [])}
    assert len(hosted) == 24
    for r in report['ranks'][1:]:
        assert sorted(map(tuple, r['experts'])) == plan.rank_experts(r['rank'])


@pytest.mark.timeout(RUN_TIMEOUT)
@pytest.mark.parametrize('extra, message', [
    (['--replicas', '1'], 'mpimoe: error: --replicas needs --stats: the expert loads of a '
     'previous run say which experts are hot'),
    (['--balance', 'bias', '--balance-every', '0'], 'mpimoe: error: --balance-every 0: must '
     'be >= 1'),
])
def test_run_refusals_one_line(tiny_weights, tiny_inputs, tmp_path, extra, message):
    proc = mpiexec(9, ['run', '--weights', tiny_weights, '--input', tiny_inputs, '--output',
                       tmp_path / 'out.h5', *extra], timeout=RUN_TIMEOUT)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    # said once, by rank 0 (MPICH adds its own Abort lines)
    assert [x for x in proc.stderr.splitlines() if x.startswith('mpimoe:')] == [message], \
        proc.stderr
    assert not (tmp_path / 'out.h5').exists()
