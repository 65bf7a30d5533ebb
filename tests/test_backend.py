"""The backend decisions and buffers that need no GPU (mpimoe.backends.backend), and
the NumPy path of the array-generic model code.

Every branch of ``--backend`` and ``--mpi-gpu`` is driven through the pure
functions' arguments (a :class:`CudaProbe` stands for what a machine shows,
a boolean for what the MPI library says); the probe and the MPI query also
run for real on this machine.  HostStaging runs on the NumPy backend, where
its buffers are ordinary arrays and the sizing logic is the same as on CuPy.
The GPU counterparts are in tests/test_gpu.py (skipped without CuPy and a device).
"""

import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from contract import expert_bound
from mpimoe.backends.backend import (DTYPES, Backend, CudaProbe, HostStaging, Rows, array_module,
                                    choose_backend, cuda_problem, grown_capacity,
                                    mpi_cuda_support, mpi_gpu_mode, probe_cuda, round16,
                                    to_numpy)
from mpimoe.backends.binding import LocalRank, bind_device
from mpimoe.errors import ConfigError, MpimoeError, UsageError
from mpimoe.bench.gpu import GpuBenchOptions, run_gpu_bench
from mpimoe.model.layers import _gelu, _silu, expert_ffn
from mpimoe.moe.local import moe_local
from mpimoe.moe.router import route

NO_CUPY = CudaProbe()
BROKEN_CUPY = CudaProbe(error='libnvrtc.so.12: cannot open shared object file')
OLD_CUPY = CudaProbe('13.6.0', 2)
NO_DEVICE = CudaProbe('14.2.0', 0, 'cudaErrorNoDevice: no CUDA-capable device is detected', '')
NO_DRIVER = CudaProbe('14.2.0', 0, 'cudaErrorInsufficientDriver: CUDA driver version is '
                      'insufficient for CUDA runtime version')
GPUS = CudaProbe('14.2.0', 4, '', '0,1,2,3', numpy_version='2.3.5')
OLD_NUMPY = CudaProbe('14.2.0', 4, '', '0,1,2,3', numpy_version='2.1.1')


# ---------------------------------------------------------------- --backend

def _select(requested, probe):
    """(Backend, the log line `mpimoe run` prints) for --backend requested."""
    name, why = choose_backend(requested, probe)
    return Backend(name), f'backend: {name} ({why})'


def test_numpy_is_chosen_without_probing():
    # choose_backend('numpy') runs no probe: nothing about CUDA is looked at
    backend, line = _select('numpy', None)
    assert backend.name == 'numpy' and backend.xp is np and not backend.is_gpu
    assert line == 'backend: numpy (as requested)'


@pytest.mark.parametrize('probe, why', [
    (NO_CUPY, "auto: CuPy is not installed (pip install -e '.[gpu]')"),
    (BROKEN_CUPY, 'auto: CuPy cannot be imported (libnvrtc.so.12: cannot open shared object '
                  'file)'),
    (OLD_CUPY, "auto: CuPy 13.6.0 is too old: BF16 needs CuPy >= 14 (pip install -e '.[gpu]')"),
    (NO_DEVICE, "auto: no CUDA device is visible (CUDA_VISIBLE_DEVICES=''): "
                'cudaErrorNoDevice: no CUDA-capable device is detected'),
    (NO_DRIVER, 'auto: no CUDA device is visible (CUDA_VISIBLE_DEVICES=unset): '
                'cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA '
                'runtime version'),
])
def test_auto_falls_back_to_numpy_and_says_why(probe, why):
    backend, line = _select('auto', probe)
    assert backend.name == 'numpy'
    assert line == f'backend: numpy ({why})'


@pytest.mark.parametrize('requested', ['auto', 'cupy'])
def test_a_usable_cupy_is_chosen_by_auto_and_cupy(requested):
    assert choose_backend(requested, GPUS) == ('cupy', 'CuPy 14.2.0, 4 CUDA devices visible')
    assert choose_backend(requested, CudaProbe('14.0.0rc1', 1, numpy_version='2.1.2')) == \
        ('cupy', 'CuPy 14.0.0rc1, 1 CUDA device visible')


@pytest.mark.parametrize('probe, message', [
    (NO_CUPY, "--backend cupy: CuPy is not installed (pip install -e '.[gpu]')"),
    (OLD_CUPY, "--backend cupy: CuPy 13.6.0 is too old: BF16 needs CuPy >= 14 "
               "(pip install -e '.[gpu]')"),
    (NO_DEVICE, "--backend cupy: no CUDA device is visible (CUDA_VISIBLE_DEVICES=''): "
                'cudaErrorNoDevice: no CUDA-capable device is detected'),
    # CuPy registers bfloat16 only with NumPy >= 2.1.2
    (OLD_NUMPY, "--backend cupy: NumPy 2.1.1 is too old for CuPy's bfloat16 (it needs "
                'NumPy >= 2.1.2): pip install "numpy>=2.1.2"'),
])
def test_cupy_without_a_usable_cupy_is_a_one_line_error(probe, message):
    with pytest.raises(ConfigError) as err:
        choose_backend('cupy', probe)
    assert str(err.value) == message and '\n' not in message
    assert err.value.exit_code == 2


def test_unknown_backend_is_a_usage_error():
    with pytest.raises(UsageError, match=r'^--backend gpu: choose one of auto, numpy, cupy$'):
        choose_backend('gpu', GPUS)


def test_the_probe_of_this_machine():
    """The real probe: CuPy importable or not as the import system says, and
    auto picks NumPy exactly when the probe finds no usable CUDA."""
    probe = probe_cuda()
    installed = importlib.util.find_spec('cupy') is not None
    assert (probe.cupy_version is not None) == installed
    if installed and probe.n_devices == 0:
        assert probe.error                      # the runtime's reason, for the log
    if not installed:
        assert probe.n_devices == 0 and probe.error == ''     # "not installed", no reason
    name, why = choose_backend('auto', probe)
    assert (name == 'numpy') == (cuda_problem(probe) is not None)


# ---------------------------------------------------------------- rank -> GPU

@pytest.mark.parametrize('n_devices', [1, 2, 4, 8])
def test_bind_device_is_local_rank_modulo_devices(n_devices):
    got = [bind_device(r, n_devices) for r in range(16)]
    assert got == [r % n_devices for r in range(16)]
    # every device gets ranks, and as evenly as the node allows
    counts = np.bincount(got, minlength=n_devices)
    assert counts.max() - counts.min() <= 1 and counts.min() >= 1


def test_bind_device_refuses_no_device_and_negative_ranks():
    with pytest.raises(ConfigError, match='no CUDA device'):
        bind_device(0, 0)
    with pytest.raises(ValueError):
        bind_device(-1, 4)


def test_bind_is_a_no_op_on_numpy():
    lines = []
    assert Backend('numpy').bind(3, LocalRank(1, 'MPI_LOCALRANKID'), lines.append) is None
    assert lines == [] and Backend('numpy').self_test() is None


# ---------------------------------------------------------------- --mpi-gpu

@pytest.mark.parametrize('requested, backend, aware, expected', [
    # the NumPy backend hands host arrays to MPI whatever is asked
    *[(r, 'numpy', a, None) for r in ('auto', 'device', 'host') for a in (True, False, None)],
    # auto: device only when the library says it takes device pointers
    ('auto', 'cupy', True, 'device'),
    ('auto', 'cupy', False, 'host'),
    ('auto', 'cupy', None, 'host'),
    ('host', 'cupy', True, 'host'),
    ('host', 'cupy', False, 'host'),
    ('host', 'cupy', None, 'host'),
    # device: the user's word (with a warning where the library says no)
    ('device', 'cupy', True, 'device'),
    ('device', 'cupy', None, 'device'),
    ('device', 'cupy', False, 'device'),
])
def test_mpi_gpu_mode_table(requested, backend, aware, expected):
    mode, warning = mpi_gpu_mode(requested, backend, aware)
    assert mode == expected
    assert (warning is not None) == (requested == 'device' and backend == 'cupy' and
                                     aware is False)


def test_mpi_gpu_device_over_a_library_that_says_no_is_a_warning():
    """Open MPI reports no CUDA support when CUDA comes through UCX: an
    explicit --mpi-gpu device overrides the answer, and says so."""
    assert mpi_gpu_mode('device', 'cupy', False)[1] == (
        '--mpi-gpu device: this MPI library reports no CUDA support (Open MPI does when CUDA '
        'comes through UCX); handing it device buffers as asked; if MPI fails or crashes, use '
        '--mpi-gpu host')
    with pytest.raises(UsageError, match='^--mpi-gpu gpu: choose one of auto, device, host$'):
        mpi_gpu_mode('gpu', 'cupy', True)


class _Mpi4pyWithQuery:
    """Stands for an mpi4py that has ``MPI.Query_cuda_support``."""

    def __init__(self, answer):
        self.answer = answer

    def Query_cuda_support(self):
        return self.answer


@pytest.mark.parametrize('answer', [0, 1])
def test_mpi_cuda_support_asks_mpi4py_first(answer):
    assert mpi_cuda_support(_Mpi4pyWithQuery(answer)) is bool(answer)


def test_mpi_cuda_support_of_this_mpi_library():
    """This machine's MPI, asked for real (MPIX_Query_cuda_support through the
    mpi4py extension's handle when mpi4py has no query of its own)."""
    from mpi4py import MPI
    answer = mpi_cuda_support(MPI)
    version = MPI.Get_library_version()
    if version.startswith('MPICH') and 'cuda' not in version.lower():
        # MPICH >= 4 has the query; this build names no CUDA in its features
        assert answer is False
    assert mpi_gpu_mode('auto', 'cupy', answer) == ('device' if answer else 'host', None)


# ---------------------------------------------------------------- buffers

@pytest.mark.parametrize('capacity, n, expected', [
    (0, 0, 0), (0, 5, 5), (5, 3, 5), (5, 5, 5), (5, 6, 7), (10, 11, 15), (7, 20, 20)])
def test_grown_capacity(capacity, n, expected):
    assert grown_capacity(capacity, n) == expected


def test_rows_reallocate_rarely_as_requests_grow():
    shapes = []

    def empty(shape, dtype):
        shapes.append(shape)
        return np.empty(shape, dtype)

    rows = Rows(3, empty)
    for n in range(1, 1001):
        view = rows.view(n)
        assert view.shape == (n, 3) and view.dtype == np.uint16
    # 1 + one per growth by 1.5: capacity 1 -> 1000 takes about log_1.5(1000) steps
    assert len(shapes) <= 2 + math.ceil(math.log(1000, 1.5))
    before = rows.buf
    assert rows.view(17).base is before and rows.buf is before     # shrinking keeps it


def test_host_staging_on_numpy_sizes_and_copies():
    rng = np.random.default_rng(0)
    staging = HostStaging(4, Backend('numpy'))
    assert staging.stream is None
    dev = rng.integers(0, 2 ** 16, (5, 4), dtype=np.uint16)
    host = staging.download(dev)
    assert np.array_equal(host, dev) and not np.shares_memory(host, dev)
    assert staging.out.buf.shape == (5, 4)
    buf = staging.out.buf
    assert np.array_equal(staging.download(dev[:3]), dev[:3]) and staging.out.buf is buf
    staging.download(rng.integers(0, 2 ** 16, (6, 4), dtype=np.uint16))
    assert staging.out.buf.shape == (7, 4)                            # grown x1.5
    # upload: MPI received into inp, the device rows get them
    staging.inp.view(9)[:] = rng.integers(0, 2 ** 16, (9, 4), dtype=np.uint16)
    target = np.zeros((9, 4), np.uint16)
    staging.upload(target)
    staging.wait()
    assert np.array_equal(target, staging.inp.view(9)) and target.any()


def test_array_module_and_to_numpy_on_host_arrays():
    a = np.arange(3)
    assert array_module(a) is np and array_module([1, 2]) is np
    assert to_numpy(a) is a and to_numpy([1, 2]).tolist() == [1, 2]


def test_numpy_weights_are_fp32_copies():
    w = {'up': np.ones((2, 3), DTYPES['bfloat16'])}
    got = Backend('numpy').weights(w)
    assert got['up'].dtype == np.float32 and np.array_equal(got['up'], np.ones((2, 3)))


# ---------------------------------------------------------------- model math on NumPy

def _expert(rng, kind, d, h):
    mats = ('gate', 'up', 'down') if kind == 'swiglu' else ('up', 'down')
    return {m: round16(rng.standard_normal((h, d) if m == 'down' else (d, h), np.float32)
                       / np.float32(math.sqrt(h if m == 'down' else d)), 'bfloat16')
            for m in mats}


@pytest.mark.parametrize('kind', ['mlp', 'swiglu'])
def test_numpy_expert_is_the_fp32_formula(kind):
    """FP32 weights take the FP32 contract, operation for operation."""
    rng = np.random.default_rng(1)
    w = _expert(rng, kind, 48, 80)
    x16 = round16(rng.standard_normal((30, 48), np.float32), 'bfloat16')
    if kind == 'swiglu':
        hidden = _silu(x16 @ w['gate']) * (x16 @ w['up'])
    else:
        hidden = _gelu(x16 @ w['up'])
    expected = round16(round16(hidden, 'bfloat16') @ w['down'], 'bfloat16')
    assert np.array_equal(expert_ffn(x16, w, kind, 'bfloat16'), expected)


def test_numpy_moe_local_is_route_then_experts_then_weighted_sum():
    """moe_local on NumPy, written out: each expert's rows (its tokens, in
    token order: one GEMM block, as run_experts makes it) through the FP32
    expert, then the weighted sum over each token's slots in slot order."""
    from mpimoe.model.config import model_config
    cfg = model_config('tiny')
    rng = np.random.default_rng(2)
    experts = [_expert(rng, cfg.expert_kind, cfg.d_model, cfg.d_expert)
               for _ in range(cfg.n_experts)]
    w_router = rng.standard_normal((cfg.d_model, cfg.n_experts), np.float32)
    h = rng.standard_normal((50, cfg.d_model), np.float32)
    out, counts = moe_local(h, w_router, experts, cfg)

    chosen, weights = route(h, w_router, cfg.top_k)
    h16 = round16(h, cfg.dtype)
    y = np.zeros((50, cfg.top_k, cfg.d_model), np.float32)
    for e, w in enumerate(experts):
        tok, slot = np.nonzero(chosen == e)
        y[tok, slot] = expert_ffn(h16[tok], w, cfg.expert_kind, cfg.dtype)
    expected = weights[:, 0, None] * y[:, 0]
    for j in range(1, cfg.top_k):
        expected += weights[:, j, None] * y[:, j]
    assert np.array_equal(out, expected)
    assert counts.tolist() == np.bincount(chosen.ravel(), minlength=cfg.n_experts).tolist()


@pytest.mark.parametrize('kind', ['mlp', 'swiglu'])
def test_16_bit_contract_on_numpy_within_the_argued_bound(kind):
    """16-bit weights take the GPU contract (mpimoe.model.layers.expert_ffn), here through
    ml_dtypes on the CPU: products rounded to bf16 before the activation.
    Against the FP32 contract the outputs differ, within tests/contract.py's
    bound for one rounding of the pre-activations; a wrong expert does not fit
    it."""
    rng = np.random.default_rng(3)
    d, h = 256, 512
    w = _expert(rng, kind, d, h)
    w16 = {m: a.astype(DTYPES['bfloat16']) for m, a in w.items()}
    x16 = round16(rng.standard_normal((40, d), np.float32), 'bfloat16')
    y32 = expert_ffn(x16, w, kind, 'bfloat16')
    y16 = expert_ffn(x16, w16, kind, 'bfloat16')
    assert y16.dtype == DTYPES['bfloat16']               # written in 16 bits, as cuBLAS does
    y16 = y16.astype(np.float32)
    bound = expert_bound(x16, w, kind, 'bfloat16', rounded_pre=1)
    assert np.all(np.abs(y16 - y32) <= bound)
    assert 0 < np.mean(y16 != y32) < 1                   # two contracts, not one
    rel = np.linalg.norm(y16 - y32) / np.linalg.norm(y32)
    assert rel < 2 * 2.0 ** -8                           # about one bf16 rounding (u)
    other = expert_ffn(x16, _expert(rng, kind, d, h), kind, 'bfloat16')
    assert not np.all(np.abs(other - y32) <= bound)


def test_activation_slopes_of_the_bound():
    """tests/contract.py's Lipschitz constants hold for the model's own
    activation formulas (float64 on a fine grid; the slopes peak near 1.5
    and 2.4 and tend to 0 or 1 outside [-30, 30])."""
    from contract import GELU_SLOPE, SILU_SLOPE
    x = np.linspace(-30, 30, 600001, dtype=np.float64)
    for f, slope in ((_gelu, GELU_SLOPE), (_silu, SILU_SLOPE)):
        y = f(x)
        assert np.abs(np.diff(y) / np.diff(x)).max() <= slope


# ---------------------------------------------------------------- mpimoe bench gpu

def test_gpu_bench_without_a_gpu_is_a_usage_error():
    problem = cuda_problem(probe_cuda())
    if problem is None:
        pytest.skip('this machine has a usable GPU: tests/test_gpu.py runs the bench')
    with pytest.raises(UsageError) as err:
        run_gpu_bench(GpuBenchOptions())
    assert str(err.value) == f'mpimoe bench gpu needs a CUDA GPU: {problem}'
    assert isinstance(err.value, MpimoeError) and '\n' not in str(err.value)


def test_gpu_bench_decode_figures_on_numpy():
    """The decode-step figures of ``mpimoe bench gpu`` run the same code on
    NumPy (timed by the host clock here, CUDA events on a GPU): one median
    per batch size, each from warm-up + repeats steps that fit the cache
    reserved for them (a step past it raises ValueError)."""
    import time
    from mpimoe.bench.gpu import decode_figures

    class HostClock:
        def median_s(self, fn, opts):
            times = []
            for i in range(opts.warmup + opts.repeats):
                t0 = time.perf_counter()
                fn()
                if i >= opts.warmup:
                    times.append(time.perf_counter() - t0)
            return float(np.median(times))

    got = decode_figures(Backend('numpy'), GpuBenchOptions(decode_batches=(2, 5), repeats=3,
                                                           warmup=1), HostClock())
    assert [b for b, _ in got] == [2, 5] and all(t > 0 for _, t in got)


def test_gpu_bench_torch_baseline_is_the_same_layer():
    """The PyTorch loop over experts of ``mpimoe bench gpu``, on the CPU, is
    the GPU contract's MoE layer: against moe_local with 16-bit experts
    (products rounded to bf16 before GELU, as torch's bf16 matmul and bf16
    GELU do) it differs only by FP32 sum orders and the order of the weighted
    sum (flips of single roundings: measured 0.02 u overall, 0.22 u in the
    worst row); against the FP32 contract by about u (model.expert_ffn)."""
    torch = pytest.importorskip('torch')
    from mpimoe.model.config import model_config
    from mpimoe.bench.gpu import _torch_moe
    cfg = model_config('tiny').replace(d_model=256, d_expert=512, expert_kind='mlp')
    rng = np.random.default_rng(7)
    experts = [_expert(rng, 'mlp', cfg.d_model, cfg.d_expert) for _ in range(cfg.n_experts)]
    w_router = rng.standard_normal((cfg.d_model, cfg.n_experts), np.float32) / np.float32(16)
    h = rng.standard_normal((300, cfg.d_model), np.float32)
    ours = moe_local(h, w_router, [{m: a.astype(DTYPES['bfloat16']) for m, a in w.items()}
                                   for w in experts], cfg)[0]
    t = torch.from_numpy
    theirs = _torch_moe(torch, t(h), t(w_router), [t(w['up']).bfloat16() for w in experts],
                        [t(w['down']).bfloat16() for w in experts], cfg.top_k).numpy()
    u = 2.0 ** -8
    rows = np.linalg.norm(ours - theirs, axis=1) / np.linalg.norm(theirs, axis=1)
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) <= u / 4 and rows.max() <= u


# ---------------------------------------------------------------- wiring: mpimoe run, bench gpu

RUN_TIMEOUT = 90


def _run_cli(weights, inputs, out_dir, extra):
    """``mpimoe run`` on 9 ranks (tiny: 1 front-end, 8 expert ranks);
    (CompletedProcess, outputs dict or None, run.json dict or None)."""
    from mpirun import mpiexec
    from mpimoe.io.outputs import read_outputs
    out, metrics = out_dir / 'out.h5', out_dir / 'run.json'
    proc = mpiexec(9, ['run', '--weights', weights, '--input', inputs, '--output', out,
                       '--max-new-tokens', 3, '--save-logits', '--metrics', metrics, *extra],
                   timeout=RUN_TIMEOUT)
    if proc.returncode:
        return proc, None, None
    return proc, read_outputs(out), json.loads(metrics.read_text())


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_run_backend_cupy_without_a_gpu_is_one_line(tiny_weights, tiny_inputs, tmp_path):
    problem = cuda_problem(probe_cuda())
    if problem is None:
        pytest.skip('this machine has a usable GPU: tests/test_gpu.py runs the engine on it')
    proc, _, _ = _run_cli(tiny_weights, tiny_inputs, tmp_path, ['--backend', 'cupy'])
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    # said once, by rank 0 (MPICH adds its own Abort lines)
    assert [x for x in proc.stderr.splitlines() if x.startswith('mpimoe')] == \
        [f'mpimoe: error: --backend cupy: {problem}'], proc.stderr
    assert not (tmp_path / 'out.h5').exists()


@pytest.mark.timeout(2 * RUN_TIMEOUT + 30)
def test_run_backend_numpy_is_the_auto_run_and_ignores_mpi_gpu(tiny_weights, tiny_inputs,
                                                                 tmp_path):
    """--backend numpy --mpi-gpu device is accepted, says the mode is ignored,
    and gives bit for bit the outputs of the default run (auto: NumPy here;
    the same arithmetic in the same order), which tests/test_engine.py
    compares to the reference; run.json records the backend."""
    if cuda_problem(probe_cuda()) is None:
        pytest.skip('auto picks CuPy on this machine: tests/test_gpu.py compares the backends')
    (tmp_path / 'auto').mkdir()
    (tmp_path / 'numpy').mkdir()
    auto_proc, auto, auto_report = _run_cli(tiny_weights, tiny_inputs, tmp_path / 'auto', [])
    assert auto_proc.returncode == 0, auto_proc.stderr
    proc, got, report = _run_cli(tiny_weights, tiny_inputs, tmp_path / 'numpy',
                                 ['--backend', 'numpy', '--mpi-gpu', 'device'])
    assert proc.returncode == 0, proc.stderr
    assert 'mpimoe[0]: --mpi-gpu device ignored: the numpy backend hands host arrays to MPI' \
        in proc.stderr.splitlines()
    assert auto_report['backend'] == report['backend'] == {'name': 'numpy', 'mpi_gpu': None}
    assert report['options']['backend'] == 'numpy' and report['options']['mpi_gpu'] == 'device'
    assert report['summary']['peak_source'] == 'FP32 GEMM timed on rank 0 (CPU backend)'
    assert got['ids'] == auto['ids']
    assert all(np.array_equal(a, b) for a, b in zip(got['generated'], auto['generated']))
    assert np.array_equal(got['last_logits'], auto['last_logits'])


def test_bench_gpu_without_a_gpu_is_one_line_from_the_cli():
    problem = cuda_problem(probe_cuda())
    if problem is None:
        pytest.skip('this machine has a usable GPU: tests/test_gpu.py runs the bench')
    proc = subprocess.run([sys.executable, '-m', 'mpimoe', 'bench', 'gpu'], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ''
    assert proc.stderr == f'mpimoe: error: mpimoe bench gpu needs a CUDA GPU: {problem}\n'


def test_slot_host_staging_on_numpy():
    """A slot in host mode hands MPI pinned copies of its rows (never the rows
    themselves) and gives received rows back in ``inp``; on NumPy the same
    code path runs with ordinary arrays."""
    from mpimoe.parallel.slots import Slot
    slot = Slot(4, None, 1.0, Backend('numpy'), 'host')
    rows = slot.out.view(3)
    rows[...] = np.arange(12, dtype=np.uint16).reshape(3, 4)
    sent = slot._send_view(3)
    assert np.array_equal(sent, rows) and not np.shares_memory(sent, rows)
    assert np.shares_memory(sent, slot.staging.out.buf)
    where = slot._recv_view(2)
    assert np.shares_memory(where, slot.staging.inp.buf) and where.shape == (2, 4)
    where[...] = 7
    got = slot.received(2)
    assert np.shares_memory(got, slot.inp.buf) and (got == 7).all()
    plain = Slot(4, None, 1.0)
    assert plain.staging is None
    assert np.shares_memory(plain._send_view(2), plain.out.buf)
    assert np.shares_memory(plain._recv_view(2), plain.inp.buf)


def _as_cublas_reads(x, layout):
    """What a column-major GEMM reads for operand x (a NumPy view, 2-D or a
    3-D batch) given operand_layout's (op, ld, batch stride): op(M) per
    matrix, M the (rows x cols) column-major matrix at x's first element
    with leading dimension ld (cuBLAS's documented addressing)."""
    from numpy.lib.stride_tricks import as_strided
    from mpimoe.backends.cublas import CUBLAS_OP_N
    op, ld, stride = layout
    *batch, r, c = x.shape
    rows, cols = (c, r) if op == CUBLAS_OP_N else (r, c)       # stored M
    assert ld >= max(rows, 1)                                   # cuBLAS's rule for ld
    isz = x.itemsize
    base = as_strided(x, shape=(batch[0] if batch else 1, rows, cols),
                      strides=(stride * isz, isz, ld * isz))
    read = base if op == CUBLAS_OP_N else base.transpose(0, 2, 1)
    return read if batch else read[0]


def test_cublas_operands_are_read_as_their_transposes():
    """gemm_f32's operand layouts (mpimoe.backends.cublas.operand_layout): for
    row-major matrices, transposed views, one head's columns of an MLA
    weight, single rows and columns and batches of them, the matrix a
    column-major GEMM reads at the given op / ld / batch stride is X^T
    (which makes C^T = B^T A^T the row-major C = A B); layouts no GEMM can
    read (a 2-D slice with a step in both axes) ask for a copy."""
    from mpimoe.backends.cublas import operand_layout
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 4 * 20)).astype(np.float32)         # wkv_b [r, H*(8+12)]
    heads = w.reshape(16, 4, 20).transpose(1, 0, 2)                   # [H, r, 20]
    q = rng.standard_normal((5, 4, 24)).astype(np.float32)            # [T, H, hd]
    views = {'matrix': w, 'transposed': w.T, 'rows': w[2:9], 'cols': w[:, 3:40],
             'row': w[3:4], 'column': w[:, 5:6], 'column-T': w[:, 5:6].T,
             'w_uk^T': heads[:, :, :8].transpose(0, 2, 1), 'w_uv': heads[:, :, 8:],
             'q_nope': q[:, :, :8].transpose(1, 0, 2), 'batch': rng.standard_normal((3, 4, 6)),
             'batch-T': rng.standard_normal((3, 6, 4)).transpose(0, 2, 1)}
    for name, x in views.items():
        layout = operand_layout(x.shape, x.strides, x.itemsize)
        assert layout is not None, name
        got = _as_cublas_reads(x, layout)
        want = x.transpose(0, 2, 1) if x.ndim == 3 else x.T
        assert np.array_equal(got, want), name
    assert operand_layout(w[::2, ::3].shape, w[::2, ::3].strides, 4) is None
    assert operand_layout(heads.shape, heads.strides, 4) is not None
