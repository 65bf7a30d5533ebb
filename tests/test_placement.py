"""Placement plans: coverage, sizes, F and G inference, misfits, hash, CLI."""

import functools
import itertools
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from mpimoe.model.config import model_config
from mpimoe.errors import ConfigError, DataError
from mpimoe.planning.placement import make_plan, parse_mode
from mpimoe.planning.stats import load_stats
from mpimoe.planning.topology import node_inbound

# (preset, world size, mode) -> expected (F, K, G)
CASES = {
    ('tiny', 9, 'per-layer'): (1, 1, 1),
    ('tiny', 25, 'dedicated'): (1, 1, 3),
    ('tiny', 5, 'packed:2'): (1, 2, 1),
    ('tiny', 13, 'packed:2'): (1, 2, 3),
    ('tiny', 7, 'packed:4'): (1, 4, 3),
    ('paper-61l', 65, 'per-layer'): (1, 1, 1),
    ('paper-61l', 3904, 'dedicated'): (192, 1, 58),
    ('paper-61l', 3713, 'packed:1'): (1, 1, 58),
    ('paper-61l', 12, 'packed:16'): (4, 16, 2),
    ('paper-61l', 240, 'packed:16'): (8, 16, 58),
    ('paper-4l', 17, 'packed:4'): (1, 4, 4),
    ('paper-4l', 5, 'packed:4'): (1, 4, 1),
}


@pytest.mark.parametrize('preset,world,mode', list(CASES))
def test_every_pair_hosted_once_by_block_rule(preset, world, mode):
    cfg = model_config(preset)
    plan = make_plan(cfg, world, mode)
    F, K, G = CASES[preset, world, mode]
    assert (plan.n_frontends, plan.experts_per_rank, plan.n_groups) == (F, K, G)
    lm, E = cfg.n_moe_layers, cfg.n_experts
    assert plan.owner.shape == (lm, E) and plan.owner.dtype == np.int32
    # every expert rank hosts K experts of each of the Lm/G layers of its group, no front-end any
    hosted = np.bincount(plan.owner.ravel(), minlength=world)
    assert (hosted[:F] == 0).all() and (hosted[F:] == K * lm // G).all()
    # rank_experts inverts owner: each (layer, expert) appears exactly once over all ranks
    pairs = [p for r in range(world) for p in plan.rank_experts(r)]
    assert sorted(pairs) == [(layer, e) for layer in cfg.moe_layers for e in range(E)]
    for r in (F, world - 1):
        for layer, e in plan.rank_experts(r):
            assert plan.owner[layer - cfg.n_dense_layers, e] == r


def test_per_layer_tiny_9_ranks():
    cfg = model_config('tiny')
    plan = make_plan(cfg, 9)
    assert plan.mode == 'per-layer' and plan.n_expert_ranks == 8
    assert plan.is_frontend(0) and not plan.is_frontend(1)
    assert plan.rank_experts(0) == []
    assert plan.rank_experts(3) == [(1, 2), (2, 2), (3, 2)]
    assert plan.layer_ranks(0) == list(range(9))
    assert (plan.nodes == 0).all() and plan.n_nodes == 1
    assert 'ranks 1-8: expert e = rank-1 of layers 1-3' in plan.describe()


def test_dedicated_paper_61l_3904_ranks():
    cfg = model_config('paper-61l')
    t0 = time.perf_counter()
    plan = make_plan(cfg, 3904, 'dedicated', gpus_per_node=8)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, f'make_plan took {elapsed:.3f} s'
    assert plan.n_frontends == 192 and plan.n_expert_ranks == 3712
    assert [plan.rank_experts(r) for r in (192, 255, 256, 3903)] == \
        [[(3, 0)], [(3, 63)], [(4, 0)], [(60, 63)]]
    wb = plan.weight_bytes()
    assert (wb[192:] == 58_720_256).all()                    # 2 x 7168 x 2048 x 2 bytes
    assert (wb[:192] == cfg.nonexpert_params * 2).all()
    assert plan.n_nodes == 488 and plan.nodes.dtype == np.int32
    assert plan.nodes[191] == 23 and plan.nodes[192] == 24
    assert plan.layer_ranks(1) == list(range(192)) + list(range(256, 320))
    text = plan.describe()
    assert len(text.splitlines()) <= 36
    assert 'ranks 192-255: layer 3 experts 0-63 (one each)' in text
    assert '58.72 MB' in text and '488 x 8 ranks' in text
    assert len(plan.describe(full=True).splitlines()) > 3904


def test_packed_describe_and_g_inference():
    plan = make_plan(model_config('paper-4l'), 17, 'packed:4', n_frontends=1)
    assert (plan.n_expert_ranks, plan.n_groups) == (16, 4)
    assert plan.rank_experts(5) == [(1, 0), (1, 1), (1, 2), (1, 3)]
    assert plan.layer_ranks(1) == [0, 5, 6, 7, 8]
    assert 'ranks 5-8: layer 1, experts 0-15 in blocks of 4' in plan.describe()


@pytest.mark.parametrize('preset,world,mode,frontends,message', [
    ('paper-61l', 64, 'dedicated', None,
     'placement dedicated needs 3712 expert ranks + F front-ends: world size must be >= 3713 '
     '(got 64)'),
    ('paper-61l', 3904, 'dedicated', 2, 'world size must be 3714 (got 3904)'),
    ('tiny', 8, 'per-layer', None, 'world size must be >= 9 (got 8)'),
    ('paper-4l', 12, 'packed:4', 1, 'needs 4, 8 or 16 (4 per layer group, G dividing 4 MoE '
     'layers) expert ranks + 1 front-end: world size must be 5, 9 or 17 (got 12)'),
    ('paper-4l', 3, 'packed:4', None, 'world size must be >= 5 (got 3)'),
    ('paper-4l', 17, 'packed:3', None, 'K=3 must divide n_experts=16'),
    ('tiny', 9, 'per-layer', 0, 'n_frontends=0: must be an integer >= 1'),
])
def test_misfit_raises_with_fitting_sizes(preset, world, mode, frontends, message):
    with pytest.raises(ConfigError) as e:
        make_plan(model_config(preset), world, mode, n_frontends=frontends)
    assert message in str(e.value) and '\n' not in str(e.value)


def test_parse_mode():
    assert parse_mode('per-layer') == ('per-layer', 1)
    assert parse_mode('dedicated') == ('dedicated', 1)
    assert parse_mode('packed:4') == ('packed', 4)
    for bad in ('packed', 'packed:0', 'packed:x', 'dedicated:2', 'round-robin'):
        with pytest.raises(ConfigError):
            parse_mode(bad)


def test_plan_hash_deterministic_and_mode_sensitive():
    cfg = model_config('tiny')
    a, b = make_plan(cfg, 25, 'dedicated'), make_plan(cfg, 25, 'dedicated')
    assert a.plan_hash() == b.plan_hash() and len(a.plan_hash()) == 16
    assert (a.owner == b.owner).all()
    assert make_plan(cfg, 25, 'packed:1').plan_hash() != a.plan_hash()
    assert make_plan(cfg, 17, 'per-layer').plan_hash() != make_plan(cfg, 17, 'packed:1',
                                                                    n_frontends=9).plan_hash()
    assert make_plan(cfg.replace(top_k=3), 25, 'dedicated').plan_hash() != a.plan_hash()


def test_plan_arrays_read_only():
    plan = make_plan(model_config('tiny'), 9)
    with pytest.raises(ValueError):
        plan.owner[0, 0] = 5


def _mpimoe(*args):
    code = ('import sys; from mpimoe.cli.main import main; rc = main(sys.argv[1:]); '
            'assert "mpi4py" not in sys.modules; sys.exit(rc)')
    return subprocess.run([sys.executable, '-c', code, *args], capture_output=True,
                          text=True, timeout=10)


def test_cli_plan_paper_61l_dedicated():
    r = _mpimoe('plan', '--preset', 'paper-61l', '--gpus', '3904', '--gpus-per-node', '8',
                '--placement', 'dedicated')
    assert r.returncode == 0, r.stderr
    assert 'nodes: 488 x 8 ranks' in r.stdout and '192 front-ends' in r.stdout


def test_cli_plan_as_module():
    r = subprocess.run([sys.executable, '-m', 'mpimoe', 'plan', '--preset', 'tiny',
                        '--gpus', '9', '--full'], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    assert 'rank 8 (node 0): layers 1-3 expert 7' in r.stdout


def test_cli_plan_misfit_one_line_exit_2():
    r = _mpimoe('plan', '--preset', 'paper-61l', '--gpus', '64', '--placement', 'dedicated')
    assert r.returncode == 2 and r.stdout == ''
    assert r.stderr.startswith('mpimoe: error: placement dedicated needs 3712 expert ranks')
    assert len(r.stderr.splitlines()) == 1 and 'Traceback' not in r.stderr


# -- topology: balancing node links for measured expert loads -------------------

def _optimum(w, n_groups):
    """Brute force: the smallest possible busiest-group sum over partitions of the
    items w (tuple [n]) into n_groups groups of n / n_groups items."""
    n, cap, full = len(w), len(w) // n_groups, (1 << len(w)) - 1

    @functools.lru_cache(maxsize=None)
    def best(mask):                      # mask: items already placed
        if mask == full:
            return 0.0
        free = [i for i in range(n) if not mask >> i & 1]
        out = np.inf
        for rest in itertools.combinations(free[1:], cap - 1):
            group = (free[0],) + rest
            s = sum(w[i] for i in group)
            if s < out:
                out = min(out, max(s, best(mask | sum(1 << i for i in group))))
        return out
    return best(0)


#: token copies [4 MoE layers, 16 experts] of paper-4l: a few hot experts per layer
HOT = np.full((4, 16), 10.0)
HOT[0, [0, 1, 2]] = [100, 90, 80]          # all three hot ones in the first node block
HOT[1, [3, 9, 14]] = [120, 60, 60]
HOT[2, [0, 5, 10, 15]] = 50
HOT[3, [6, 7]] = [300, 200]            # both in the first node block


@pytest.mark.parametrize('gpus_per_node', [8, 4])
def test_balanced_per_layer_meets_brute_force_optimum(gpus_per_node):
    # 16 expert ranks on 2 (or 4) nodes of their own, front-ends on the first node(s)
    cfg, F = model_config('paper-4l'), gpus_per_node
    plan = make_plan(cfg, F + 16, 'per-layer', n_frontends=F, gpus_per_node=gpus_per_node,
                     loads=HOT)
    block = make_plan(cfg, F + 16, 'per-layer', n_frontends=F, gpus_per_node=gpus_per_node)
    ours = node_inbound(plan.owner, plan.nodes, HOT).max(axis=1)            # [Lm]
    ident = node_inbound(block.owner, block.nodes, HOT).max(axis=1)
    best = [_optimum(tuple(w), 16 // gpus_per_node) for w in HOT]
    assert (ours <= ident).all() and ours.tolist() == best
    assert ours[0] < ident[0]                              # the clustered hot layer gains
    # still one expert per layer per rank, on the same ranks; the engine's view agrees
    hosted = np.bincount(plan.owner.ravel(), minlength=plan.world_size)
    assert (hosted[:F] == 0).all() and (hosted[F:] == cfg.n_moe_layers).all()
    for m in range(cfg.n_moe_layers):
        assert sorted(plan.owner[m]) == list(range(F, F + 16))
        assert plan.layer_ranks(m) == block.layer_ranks(m)
    pairs = sorted(p for r in range(plan.world_size) for p in plan.rank_experts(r))
    assert pairs == [(layer, e) for layer in cfg.moe_layers for e in range(16)]
    assert plan.plan_hash() != block.plan_hash()


def test_balanced_never_worse_on_heavy_tailed_loads():
    cfg = model_config('paper-4l')
    rng = np.random.default_rng(7)
    for gpn in (8, 8, 8, 8, 4):              # brute force over 4 nodes takes ~1 s
        loads = np.floor(rng.pareto(1.2, (4, 16)) * 100)
        plan = make_plan(cfg, gpn + 16, 'per-layer', n_frontends=gpn, gpus_per_node=gpn,
                         loads=loads)
        ours = node_inbound(plan.owner, plan.nodes, loads).max(axis=1)
        ident = node_inbound(plan.block_owner, plan.nodes, loads).max(axis=1)
        assert (ours <= ident).all()
        assert (ours >= [_optimum(tuple(w), 16 // gpn) for w in loads]).all()


def test_balanced_packed_keeps_k_per_rank_and_uniform_keeps_block_layout():
    cfg = model_config('paper-4l')
    loads = np.ones((4, 16))
    loads[:, :4] = 50                                  # block layout: all hot on rank 1
    plan = make_plan(cfg, 5, 'packed:4', n_frontends=1, loads=loads)
    per_rank = np.stack([np.bincount(row, minlength=5) for row in plan.owner])
    assert (per_rank[:, 1:] == 4).all()
    assert np.bincount(plan.owner[0], weights=loads[0]).max() == 53    # one hot per rank
    assert 'the stats permute the experts within 4 MoE layers' in plan.describe()
    flat = make_plan(cfg, 5, 'packed:4', n_frontends=1, loads=np.full((4, 16), 3.0))
    assert (flat.owner == flat.block_owner).all()
    assert flat.plan_hash() == make_plan(cfg, 5, 'packed:4', n_frontends=1).plan_hash()


def test_balanced_dedicated_paper_61l_thousands_of_ranks_fast():
    cfg = model_config('paper-61l')
    loads = np.random.default_rng(3).zipf(1.5, (58, 64)).astype(float)
    t0 = time.perf_counter()
    plan = make_plan(cfg, 3904, 'dedicated', gpus_per_node=8, loads=loads)
    text = plan.describe()
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f'make_plan + describe took {elapsed:.3f} s'
    ours, ident = (node_inbound(o, plan.nodes, loads).max() for o in
                   (plan.owner, plan.block_owner))
    assert ours < ident
    assert f'busiest node {ident:.6g}' in text and f'busiest node {ours:.6g}' in text
    assert plan.layer_ranks(1) == list(range(192)) + list(range(256, 320))


@pytest.mark.parametrize('loads,message', [
    (np.ones((3, 8)), 'expert loads have shape [3, 8]; this model needs [n_moe_layers, '
     'n_experts] = [4, 16]'),
    (-np.ones((4, 16)), 'must be finite and >= 0'),
    ([['a'] * 16] * 4, 'expert loads must be numbers'),
])
def test_bad_loads_one_line(loads, message):
    with pytest.raises(ConfigError) as e:
        make_plan(model_config('paper-4l'), 17, loads=loads)
    assert message in str(e.value) and '\n' not in str(e.value)


def _run_json(path, counts, layers):
    """A run.json with the keys `mpimoe run --metrics` writes for expert loads."""
    path.write_text(json.dumps({'expert_loads': {'layers': layers, 'counts': counts,
                                                 'max_over_mean': [1.0] * len(counts)}}))
    return str(path)


def test_load_stats(tmp_path):
    cfg = model_config('tiny')
    counts = [[i * 8 + e for e in range(8)] for i in range(3)]
    loads = load_stats(_run_json(tmp_path / 'ok.json', counts, [1, 2, 3]), cfg)
    assert loads.dtype == np.float64 and loads.tolist() == counts
    for name, doc, message in [
            ('layers.json', {'expert_loads': {'layers': [0, 1, 2], 'counts': counts}},
             'loads are for MoE layers [0, 1, 2], this model has [1, 2, 3]'),
            ('shape.json', {'expert_loads': {'counts': counts[:2]}}, 'shape [2, 8]'),
            ('none.json', {'summary': {}}, 'no expert_loads.counts'),
    ]:
        (tmp_path / name).write_text(json.dumps(doc))
        with pytest.raises(DataError) as e:
            load_stats(str(tmp_path / name), cfg)
        assert message in str(e.value) and '\n' not in str(e.value)
    (tmp_path / 'bad.json').write_text('{')
    with pytest.raises(DataError, match='not valid JSON'):
        load_stats(str(tmp_path / 'bad.json'), cfg)
    with pytest.raises(DataError, match='cannot read'):
        load_stats(str(tmp_path / 'missing.json'), cfg)


def test_cli_plan_stats_prints_node_loads(tmp_path):
    stats = _run_json(tmp_path / 'run.json', HOT.astype(int).tolist(), [0, 1, 2, 3])
    r = _mpimoe('plan', '--preset', 'paper-4l', '--gpus', '24', '--gpus-per-node', '8',
                '--frontends', '8', '--stats', stats, '--full')
    assert r.returncode == 0, r.stderr
    assert ('block layout:   busiest node 560 (node 1, layer 3); sum over layers of the '
            'busiest node 1230') in r.stdout
    assert ('balanced (LPT): busiest node 370 (node 1, layer 3); sum over layers of the '
            'busiest node 950') in r.stdout
    assert '2 of 4 MoE layers permuted: busiest node -33.9%, sum over layers -22.8%' in r.stdout
    assert 'node 1: block 560, balanced 370' in r.stdout
    assert 'node 2: block 180, balanced 270' in r.stdout
    assert ('rank 8 (node 1): layer 0 expert 0; layer 1 expert 0; layer 2 expert 0; layer 3 '
            'expert 6, 4.29 GB') in r.stdout
    assert 'rank 16 (node 2): layer 0 expert 1; layer 1 expert 8; layer 2 expert 8; ' in r.stdout
