"""Cost model: memory per rank and refusals, times checked by hand, monotonicity,
calibration, and `mpimoe plan` with estimates and --emit-sbatch."""

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mpimoe.model.config import model_config
from mpimoe.planning.costmodel import (Constants, Workload, check_memory, describe, load_calibration,
                              make_constants, memory, pass_time, predict)
from mpimoe.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
from mpimoe.planning.placement import make_plan

GB = 1e9


def _paper_61l():
    return make_plan(model_config('paper-61l'), 3904, 'dedicated', gpus_per_node=8)


def _paper_4l(P=72, mode='dedicated', F=8, loads=None):
    return make_plan(model_config('paper-4l'), P, mode, n_frontends=F, gpus_per_node=8,
                     loads=loads)


# -- memory ------------------------------------------------------------------------

def test_memory_paper_61l_dedicated_fits_80_gb():
    plan, cfg = _paper_61l(), model_config('paper-61l')
    fe, ex = memory(plan, Workload(192, 4096))          # one sequence per front-end
    row = 7168 * 2
    assert fe.weights == cfg.nonexpert_params * 2 and round(fe.weights / GB, 2) == 62.66
    assert fe.kv_cache == 2 * 61 * 128 * 128 * 2 * 4096
    assert fe.buffers == 1 * 2 * 4096 * 2 * row          # 1 slot used, send + receive, top-2
    assert ex.weights == 2 * 7168 * 2048 * 2 and ex.kv_cache == 0
    assert ex.buffers == 1 * 2 * 192 * 4096 * 1 * row    # every row of 192 front-ends here
    check_memory([fe, ex], 80)
    assert [m.total for m in memory(plan)] == [fe.weights, ex.weights]


@pytest.mark.parametrize('plan,work,gpu_gb,message', [
    (_paper_61l(), Workload(384, 4096), 80,
     'front-end needs 95.88 GB = weights 62.66 GB + KV cache 32.75 GB + buffers 0.47 GB '
     '(469.76 MB) > GPU memory 80 GB: use more front-ends'),
    (_paper_61l(), None, 60, 'front-end needs 62.66 GB = weights 62.66 GB > GPU memory 60 GB: '
     'its non-expert weights alone do not fit'),
    (make_plan(model_config('paper-4l'), 2, 'packed:16'), None, 60,
     'expert rank needs 68.72 GB = weights 68.72 GB > GPU memory 60 GB: its experts do not fit'),
    (_paper_4l(128, 'dedicated', 64), Workload(64, 65536), 80,
     'expert rank needs 138.51 GB = weights 1.07 GB + buffers 137.44 GB > GPU memory 80 GB: '
     'the worst-case receive buffers'),                      # 2 x 64 x 65536 x 16384 bytes
])
def test_memory_refusal_one_line(plan, work, gpu_gb, message):
    with pytest.raises(ConfigError) as e:
        check_memory(memory(plan, work), gpu_gb)
    assert message in str(e.value) and '\n' not in str(e.value)


# -- time ------------------------------------------------------------------------------

def test_times_by_hand_paper_4l_dedicated():
    # 8 front-ends on node 0, layer m's 16 experts on nodes 1+2m and 2+2m; B = 8 sequences
    # of 128 tokens: one per front-end, so one micro-batch carries tokens (of 2 slots)
    plan, c = _paper_4l(), Constants()
    t = pass_time(plan, Workload(8, 128, 2), c, new_tokens=128)
    rate, hbm = 989e12 * 0.6, 3350e9
    expert_params = 2 * 8192 * 32768
    copies = 1024 * 2 / 16                                        # per expert per layer
    active = 1 - (15 / 16) ** 2048
    expert = max(copies * 2 * expert_params / rate, active * expert_params * 2 / hbm)
    # node 0 sends all 2048 copies of 8192 x 2 bytes; each expert node receives 1024
    network = 3 * 2 * 10e-6 + 2 * 2048 * 8192 * 2 / (200e9 / 8)
    attn_w, gate_w = 4 * 8192 * 8192 + 2 * 8192, 8192 * 16    # wq wk wv wo, two norms
    front = max((2 * 128 * (attn_w + gate_w) + 4 * 8192 * 128 * 129 / 2) / rate,
                ((attn_w + gate_w) * 2 + 128 * 2 * 8192 * 2) / hbm)
    head = max(2 * 8192 * 32000 / rate, 32000 * 8192 * 2 / hbm)
    assert t.micro_batches == 1
    assert t.experts == pytest.approx(4 * expert, rel=1e-12)
    assert t.network == pytest.approx(4 * network, rel=1e-12)
    assert t.frontend == pytest.approx(4 * front + head, rel=1e-12)
    assert t.seconds == pytest.approx(4 * (front + expert + network) + head, rel=1e-12)
    assert t.bound == 'network'


def test_two_micro_batches_overlap_stages():
    plan, c = _paper_4l(), Constants()
    one = pass_time(plan, Workload(64, 128, 1), c, new_tokens=128)
    two = pass_time(plan, Workload(64, 128, 2), c, new_tokens=128)
    assert two.micro_batches == 2 and two.seconds < one.seconds
    # one micro-batch: stages add up (dense layers: none; head once)
    head = max(2 * 8 * 8192 * 32000 / c.flops, 32000 * 8192 * 2 / (c.hbm_gbs * GB))
    assert one.seconds == pytest.approx(one.frontend + one.experts + one.network, rel=1e-12)
    assert one.seconds > max(one.frontend - head, one.experts, one.network)


FASTER = [('gemm_tflops', 2), ('gemm_efficiency', 1 / 0.6), ('hbm_gbs', 2),
          ('link_gbps', 16), ('nvlink_gbs', 2), ('alpha_us', 0.1)]
PLANS = {'61l-dedicated': _paper_61l, '4l-dedicated': _paper_4l,
         '4l-packed4': lambda: _paper_4l(24, 'packed:4'),
         'tiny-one-node': lambda: make_plan(model_config('tiny'), 9)}


@pytest.mark.parametrize('name', list(PLANS))
@pytest.mark.parametrize('work', [Workload(8, 128), Workload(192, 4096, 4), Workload(1, 16)])
def test_faster_machine_never_predicts_slower(name, work):
    plan, base = PLANS[name](), Constants()
    ref = predict(plan, work, base)
    for key, factor in FASTER:
        p = predict(plan, work, make_constants(**{key: getattr(base, key) * factor}))
        assert p.prefill.seconds <= ref.prefill.seconds, key
        assert p.decode.seconds <= ref.decode.seconds, key


@pytest.mark.parametrize('work', [Workload(256, 512), Workload(256, 16, 4)])
def test_more_gpus_never_predict_slower(work):
    c = Constants()
    # more expert ranks, front-ends fixed: packed:16 ... dedicated on 4 layer groups
    by_k = [_paper_4l(8 + 4 * 16 // k, f'packed:{k}') for k in (16, 8, 4, 2, 1)]
    # more front-ends, in whole nodes, each still filling its micro-batches (B >= M * F)
    by_f = [_paper_4l(f + 64, 'dedicated', f) for f in (8, 16, 32, 64)]
    by_f61 = [make_plan(model_config('paper-61l'), f + 3712, 'dedicated', n_frontends=f,
                        gpus_per_node=8) for f in (8, 64, 128)]
    for plans in (by_k, by_f, by_f61):
        t = [predict(p, work, c) for p in plans]
        for a, b in zip(t, t[1:]):
            assert b.prefill.seconds <= a.prefill.seconds
            assert b.decode.seconds <= a.decode.seconds


def test_fewer_sequences_than_micro_batches_is_flagged():
    # B = 64 on 64 front-ends: one sequence each, so one of two micro-batches works and
    # nothing overlaps: slower prefill than on 32 front-ends (stated, not hidden)
    work, c = Workload(64, 512), Constants()
    on32, on64 = (predict(_paper_4l(f + 64, 'dedicated', f), work, c) for f in (32, 64))
    assert on64.prefill.micro_batches == 1 and on32.prefill.micro_batches == 2
    assert on64.prefill.seconds > on32.prefill.seconds
    text = '\n'.join(describe(_paper_4l(128, 'dedicated', 64), work, c, 80))
    assert 'note: 1 sequence per front-end fills only 1 of its 2 micro-batches' in text


def test_balanced_stats_predict_faster_than_block_layout():
    loads = np.full((4, 16), 10.0)
    loads[:, :3] = 200                          # block layout: all hot experts on one node
    work, c = Workload(64, 512), Constants()
    # 32 front-ends on 4 nodes: the expert nodes' links, not the front-ends', are busiest
    plan = _paper_4l(96, 'dedicated', 32, loads=loads)
    balanced = predict(plan, work, c)
    block = predict(dataclasses.replace(plan, owner=plan.block_owner), work, c)
    uniform = predict(_paper_4l(96, 'dedicated', 32), work, c)
    assert balanced.prefill.network < block.prefill.network
    assert balanced.prefill.seconds < block.prefill.seconds
    assert balanced.decode.seconds <= block.decode.seconds
    assert balanced.prefill.experts > uniform.prefill.experts     # the hot expert's rank


def test_thousands_of_ranks_under_a_second():
    t0 = time.perf_counter()
    plan = _paper_61l()
    work = Workload(192, 4096)
    check_memory(memory(plan, work), 80)
    text = describe(plan, work, Constants(), 80)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f'plan + memory + prediction took {elapsed:.3f} s'
    assert [line.split(':')[0] for line in text[-3:]] == ['prefill', 'decode', 'note']


# -- constants ---------------------------------------------------------------------------

def test_calibration_sources_and_precedence(tmp_path):
    path = tmp_path / 'calib.json'
    path.write_text(json.dumps({'gemm_tflops': 700, 'gemm_efficiency': 1, 'link_gbps': 100,
                                'alpha_us': 3.5}))
    c = make_constants(load_calibration(str(path)), str(path), link_gbps=400)
    assert (c.gemm_tflops, c.gemm_efficiency, c.link_gbps, c.alpha_us) == (700, 1, 400, 3.5)
    assert c.source['gemm_tflops'] == f'measured ({path})'
    assert c.source['link_gbps'] == 'option --link-gbps'
    assert c.source['hbm_gbs'].startswith('assumed (H100')
    assert c.hbm_gbs == 3350 and c.flops == 700e12


@pytest.mark.parametrize('doc,message', [
    ({'gemm_tflop': 1}, "unknown keys ['gemm_tflop']; valid keys: gemm_tflops,"),
    ({'alpha_us': '10'}, 'alpha_us must be a number'),
    ([1, 2], 'expected a JSON object'),
    ({'gemm_efficiency': 1.5}, r'gemm_efficiency=1.5: must be in (0, 1]'),
])
def test_bad_calibration_one_line(tmp_path, doc, message):
    path = tmp_path / 'c.json'
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError) as e:
        load_calibration(str(path))
    assert message in str(e.value) and '\n' not in str(e.value)


def test_bad_constants_and_workload():
    with pytest.raises(ConfigError, match=r'gemm_efficiency=1.5: must be in \(0, 1\]'):
        make_constants(gemm_efficiency=1.5)
    with pytest.raises(ConfigError, match='link_gbps=0: must be a number > 0'):
        Constants(link_gbps=0)
    with pytest.raises(ConfigError, match='seq_len=0: must be an integer >= 1'):
        Workload(8, 0)


# -- the command line ---------------------------------------------------------------------

def _plan(*args):
    code = ('import sys; from mpimoe.cli.main import main; rc = main(sys.argv[1:]); '
            'assert "mpi4py" not in sys.modules; sys.exit(rc)')
    return subprocess.run([sys.executable, '-c', code, 'plan', *map(str, args)],
                          capture_output=True, text=True, timeout=20)


P61 = ['--preset', 'paper-61l', '--gpus', 3904, '--gpus-per-node', 8, '--placement', 'dedicated']


def test_cli_emit_sbatch_paper_61l(tmp_path):
    job = tmp_path / 'job.sbatch'
    r = _plan(*P61, '--batch-seqs', 192, '--seq-len', 4096, '--emit-sbatch', job)
    assert r.returncode == 0, r.stderr
    assert f'wrote {job}: 488 nodes x 8 tasks (3904 in all)' in r.stdout
    assert 'link_gbps        200      assumed' in r.stdout
    assert '\nprefill: ' in r.stdout and '\ndecode: ' in r.stdout
    text = job.read_text()
    for line in ('#SBATCH --nodes=488', '#SBATCH --ntasks=3904', '#SBATCH --ntasks-per-node=8',
                 '#SBATCH --gpus-per-node=8', '#SBATCH --signal=B:USR1@120', '#SBATCH --requeue',
                 'srun -K1 --cpu-bind=cores python -m mpi4py -m mpimoe run',
                 '--placement dedicated --frontends 192 --micro-batches 2 --kv-tokens 4096 --max-seqs 1',
                 f'plan hash {_paper_61l().plan_hash()}'):
        assert line in text
    assert subprocess.run(['bash', '-n', str(job)], timeout=10).returncode == 0
    # never overwritten: one line, exit 65, file unchanged
    again = _plan(*P61, '--emit-sbatch', job)
    assert again.returncode == 65 and again.stdout == ''
    assert again.stderr == f'mpimoe: error: --emit-sbatch {job}: file exists; remove it or ' \
                           f'choose another name\n'
    assert job.read_text() == text


@pytest.mark.parametrize('args,code,message', [
    (P61 + ['--batch-seqs', 384, '--seq-len', 4096], 2, 'front-end needs 95.88 GB'),
    (P61 + ['--batch-seqs', 384], 2, '--batch-seqs and --seq-len go together'),
    (['--preset', 'tiny', '--gpus', 9], 0, None),
    (['--preset', 'tiny', '--gpus', 9, '--emit-sbatch', 'JOB'], 2,
     '--emit-sbatch needs --gpus-per-node'),
    (['--preset', 'tiny', '--gpus', 9, '--calibration', 'MISSING'], 65,
     'MISSING: cannot read: No such file or directory'),
])
def test_cli_refusals_one_line(tmp_path, args, code, message):
    args = [str(tmp_path / a) if a in ('JOB', 'MISSING') else a for a in args]
    r = _plan(*args)
    assert r.returncode == code, r.stderr
    if message:
        assert r.stdout == '' and len(r.stderr.splitlines()) == 1
        assert message in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path / 'JOB').exists()


def test_cli_stats_with_emit_sbatch_passes_them_to_the_run(tmp_path):
    loads = np.full((4, 16), 10)
    loads[:, :3] = 200
    stats = tmp_path / 'run.json'
    stats.write_text(json.dumps({'expert_loads': {'layers': [0, 1, 2, 3],
                                                  'counts': loads.tolist()}}))
    base = ['--preset', 'paper-4l', '--gpus', 72, '--gpus-per-node', 8, '--frontends', 8,
            '--placement', 'dedicated', '--stats', stats]
    r = _plan(*base, '--batch-seqs', 64, '--seq-len', 512)
    assert r.returncode == 0, r.stderr
    assert 'block layout with the same stats: prefill' in r.stdout
    job = tmp_path / 'job'
    r = _plan(*base, '--emit-sbatch', job)
    assert r.returncode == 0, r.stderr
    assert f'--placement dedicated --frontends 8 --stats {stats} --micro-batches 2' \
        in job.read_text()
    assert subprocess.run(['bash', '-n', str(job)], timeout=10).returncode == 0


def test_slurm_example_is_what_emit_sbatch_writes(tmp_path):
    """slurm/mpimoe.sbatch is the output of the command in its second line:
    the template and the example cannot drift apart."""
    example = REPO / 'slurm' / 'mpimoe.sbatch'
    text = example.read_text()
    command = text.splitlines()[1].removeprefix('# Written by: mpimoe ').split()
    job = tmp_path / 'job.sbatch'
    r = subprocess.run([sys.executable, '-m', 'mpimoe', *command[:-1], str(job)],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert job.read_text() == text
