"""`mpimoe run --backend cupy` under mpiexec against the CPU reference;
skipped without CuPy and a CUDA device.

Every rank of a job shares the one GPU of the test machine (several ranks
per device is how the multi-GPU paths run there).  Tolerances are
tests/contract.py's: the GPU contract (16-bit GEMM inputs on the front-end,
16-bit expert products) differs from the CPU's FP32 one by about 0.6 u
relative L2 per row of logits (99th percentile 2.0 u), inside LOGIT_RTOL =
8 u, and greedy tokens may differ only after a near-tie of the reference's
top two logits, within GPU_TIE_RTOL (tests/contract.py argues both).
Host staging and device buffers hand MPI the same words, so the two modes
give bit-identical outputs.
"""

import json

import numpy as np
import pytest

pytest.importorskip('cupy')

from contract import GPU_TIE_RTOL, assert_matches_reference  # noqa: E402
from mpimoe.backends.backend import cuda_problem, mpi_cuda_support, probe_cuda  # noqa: E402
from mpimoe.io.outputs import read_outputs  # noqa: E402
from mpirun import mpiexec  # noqa: E402

_PROBLEM = cuda_problem(probe_cuda())
if _PROBLEM is not None:
    pytest.skip(f'no usable GPU: {_PROBLEM}', allow_module_level=True)


def _cuda_aware():
    from mpi4py import MPI
    return mpi_cuda_support(MPI) is True


#: seconds one job may take: every rank creates a CUDA context and compiles
#: (or loads from CuPy's cache) its kernels
RUN_TIMEOUT = 240
MAX_NEW = 6

#: (name, weights overrides, world size, options)
CASES = [
    ('packed4-host', (), 3, ['--placement', 'packed:4', '--mpi-gpu', 'host',
                             '--micro-batches', '2']),
    ('per-layer-host', (), 9, ['--mpi-gpu', 'host']),
    # 7 batches of 1-5 sequences in 4 micro-batches: most passes carry empty ones
    ('empty-micro-batches', (), 3, ['--placement', 'packed:4', '--mpi-gpu', 'host',
                                    '--micro-batches', '4', '--batch-tokens', '24']),
    # 2 front-ends on packed:4 (the regroup path), the last round with one idle
    ('F2-packed4-regroup', (), 4, ['--placement', 'packed:4', '--frontends', '2',
                                   '--mpi-gpu', 'host', '--batch-tokens', '24']),
    ('float16', ('dtype=float16',), 3, ['--placement', 'packed:4', '--mpi-gpu', 'host']),
    ('mlp', ('expert_kind=mlp',), 3, ['--placement', 'packed:4', '--mpi-gpu', 'host']),
    # a tensor-parallel group of 2: its Allreduces and Allgathers through host copies
    ('tp2-packed4', (), 4, ['--placement', 'packed:4', '--tp', '2', '--mpi-gpu', 'host']),
]


@pytest.fixture(scope='module')
def reference(make_weights, tiny_reference):
    """``reference(key) -> (weights, CPU reference outputs)``."""
    def get(key):
        weights = make_weights('tiny', key)
        return weights, tiny_reference(weights, MAX_NEW)
    return get


def _run(weights, inputs, out_dir, n, extra):
    out, metrics = out_dir / 'out.h5', out_dir / 'run.json'
    proc = mpiexec(n, ['run', '--weights', weights, '--input', inputs, '--output', out,
                       '--max-new-tokens', MAX_NEW, '--save-logits', '--metrics', metrics,
                       '--backend', 'cupy', *extra], timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    return read_outputs(out), json.loads(metrics.read_text()), proc.stderr


@pytest.mark.timeout(RUN_TIMEOUT + 60)
@pytest.mark.parametrize('name, overrides, n, extra', CASES, ids=[c[0] for c in CASES])
def test_gpu_engine_equals_the_cpu_reference(reference, tiny_inputs, tmp_path, name,
                                             overrides, n, extra):
    weights, ref = reference(overrides)
    got, report, stderr = _run(weights, tiny_inputs, tmp_path, n, extra)
    assert report['backend']['name'] == 'cupy' and report['backend']['mpi_gpu'] == 'host'
    assert 'GPU of each rank' in stderr
    # the ranks share the one GPU: MFU is counted over 1 device's peak
    assert report['backend']['gpus_used'] == report['summary']['mfu_devices'] == 1
    assert_matches_reference(got, ref, weights, tiny_inputs, MAX_NEW, tie_rtol=GPU_TIE_RTOL)


@pytest.mark.timeout(2 * RUN_TIMEOUT + 60)
def test_device_buffers_give_what_host_staging_gives(reference, tiny_inputs, tmp_path):
    """--mpi-gpu device (a CUDA-aware MPI; the start-up exchange must pass)
    against --mpi-gpu host: the same words cross MPI, so bit-identical."""
    if not _cuda_aware():
        pytest.skip('this MPI library reports no CUDA support: --mpi-gpu device is not tried')
    weights, ref = reference(())
    opts = ['--placement', 'packed:4', '--micro-batches', '2']
    (tmp_path / 'host').mkdir()
    (tmp_path / 'device').mkdir()
    host, _, _ = _run(weights, tiny_inputs, tmp_path / 'host', 3, [*opts, '--mpi-gpu', 'host'])
    dev, report, stderr = _run(weights, tiny_inputs, tmp_path / 'device', 3,
                               [*opts, '--mpi-gpu', 'device'])
    assert report['backend']['mpi_gpu'] == 'device', stderr
    assert all(np.array_equal(a, b) for a, b in zip(dev['generated'], host['generated'],
                                                    strict=True))
    assert np.array_equal(dev['last_logits'], host['last_logits'])
    assert_matches_reference(dev, ref, weights, tiny_inputs, MAX_NEW, tie_rtol=GPU_TIE_RTOL)


@pytest.mark.timeout(2 * RUN_TIMEOUT + 60)
def test_gpu_bias_balancing_steers_away_from_hot_experts(skewed, tiny_inputs, tmp_path):
    """--balance bias on the GPU, on weights whose router makes experts 0 and
    1 hot, in steps of <= 24 tokens: the bias the GPU run learns pushes them
    down and lowers max/mean load below the same file's on the CPU without
    balancing; both front-ends (2 on packed:4) end with rank 0's bias; and,
    as a sanity check (tiny has no EOS: every sequence runs its 6 tokens),
    the same number of token copies is routed.

    Not asserted: counts or tokens equal to a CPU run with the bias.  The
    GPU contract moves router scores by a few u (tests/contract.py), so a
    token at a near-tie of two experts' scores may go to the other one, and
    from there the bias, updated from integer counts, takes its own path:
    what is invariant is what the bias does, not the path."""
    import zlib
    opts = ['--placement', 'packed:4', '--frontends', '2', '--batch-tokens', '24']
    bias_opts = ['--balance', 'bias', '--balance-step', '0.03']
    (tmp_path / 'gpu').mkdir()
    (tmp_path / 'cpu').mkdir()
    _, on, _ = _run(skewed, tiny_inputs, tmp_path / 'gpu', 4,
                    [*opts, *bias_opts, '--mpi-gpu', 'host'])
    proc = mpiexec(4, ['run', '--weights', skewed, '--input', tiny_inputs, '--output',
                       tmp_path / 'cpu' / 'out.h5', '--max-new-tokens', MAX_NEW,
                       '--metrics', tmp_path / 'cpu' / 'run.json', '--backend', 'numpy',
                       *opts], timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    off = json.loads((tmp_path / 'cpu' / 'run.json').read_text())
    before = np.array(off['expert_loads']['max_over_mean'])         # [Lm]
    after = np.array(on['expert_loads']['max_over_mean'])
    assert (before > 1.8).all() and (after < before).all(), (before, after)
    bias = np.array(on['balance']['bias'])                          # [Lm, E]
    assert (np.abs(bias) <= 0.5).all() and (bias[:, :2] < 0).all(), bias
    crc = zlib.crc32(bias.astype(np.float32).tobytes())
    assert [r['bias_crc32'] for r in on['ranks'] if r['role'] == 'front-end'] == [crc, crc]
    assert np.array(on['expert_loads']['counts']).sum() == \
        np.array(off['expert_loads']['counts']).sum()


_EXCHANGE = r'''
import json
from mpimoe.backends.backend import Backend
from mpimoe.backends.binding import bind_early
bind_early('cupy')
from mpimoe.parallel.gpu_mpi import choose_mpi_gpu, device_exchange_problem
from mpimoe.parallel.mpiutil import MPI, local_rank
world = MPI.COMM_WORLD
gpu = Backend('cupy')
gpu.bind(world.rank, local_rank(world), lambda line: None)
out = {'self_test': gpu.self_test(), 'auto': list(choose_mpi_gpu(world, gpu, 'auto', 30.0))}
everyone = world.gather(out, root=0)
if world.rank == 0:
    print(json.dumps(everyone), flush=True)
'''


@pytest.mark.timeout(RUN_TIMEOUT)
def test_start_up_checks_on_the_device(tmp_path):
    """Under mpiexec on the GPU: the BF16 self-test passes on every rank, and
    --mpi-gpu auto takes device buffers only when the library says it
    supports CUDA and the one-row exchange of device buffers arrives intact."""
    import subprocess
    import sys
    from mpirun import mpiexec_path
    proc = subprocess.run([mpiexec_path(), '-n', '2', sys.executable, '-m', 'mpi4py', '-c',
                           _EXCHANGE], capture_output=True, text=True, timeout=RUN_TIMEOUT - 20)
    assert proc.returncode == 0, proc.stderr
    ranks = json.loads(proc.stdout)
    assert [r['self_test'] for r in ranks] == [None, None]
    mode, why, warnings = ranks[0]['auto']
    assert all(r['auto'] == ranks[0]['auto'] for r in ranks)
    if _cuda_aware():
        assert mode == 'device' and not warnings, (why, warnings)
    else:
        assert mode == 'host' and why.startswith('auto: the MPI library ') and not warnings


@pytest.mark.timeout(RUN_TIMEOUT)
def test_moe_layer_bench_on_the_gpu():
    """`bench moe-layer --backend cupy` on 3 ranks sharing the GPU: the layer
    over MPI gives what moe_local gives on the device, and the overlap line
    has its three times.

    Both run the same 16-bit expert arithmetic on the same rows; only
    cuBLAS's choice of kernel for another number of rows (a micro-batch
    against the whole batch) may sum in another order, which can flip a
    16-bit rounding of a product or an output by one ulp: a few u of an
    output at worst (tests/contract.py's expert bound), so 8 u (LOGIT_RTOL's
    width) of the largest MoE output (the residual, the same on both sides,
    left out) bounds it, where a wrong row gives O(1)."""
    import re
    proc = mpiexec(3, ['bench', 'moe-layer', '--backend', 'cupy', '--mpi-gpu', 'host',
                       '--placement', 'packed:4', '--d-model', 256, '--experts', 8,
                       '--d-expert', 512, '--tokens', 1024, '--repeats', 2, '--warmup', 1],
                   timeout=RUN_TIMEOUT - 20)
    assert proc.returncode == 0, proc.stderr
    m = re.search(r'check: max \|layer - single-process moe_local\| = (\S+) \(largest '
                  r'\|MoE output\| (\S+);', proc.stdout)
    assert m, proc.stdout
    error, scale = map(float, m.groups())
    assert scale > 0 and error <= 2.0 ** -5 * scale, proc.stdout
    m = re.search(r'overlap efficiency (-?[\d.]+) = \(T_comm ([\d.]+) \+ T_comp ([\d.]+) - '
                  r'T_layer ([\d.]+)\)', proc.stdout)
    assert m and all(float(v) > 0 for v in m.groups()[1:]), proc.stdout
