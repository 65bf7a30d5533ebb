"""The CuPy path against the NumPy one; skipped without CuPy and a CUDA device.

Run where a GPU is lent: ``python -m pytest -q tests/test_gpu.py``.

Tolerances, from the arithmetic (u = 2^-8, bfloat16's unit roundoff):

- *Same contract, two devices* (CuPy's 16-bit GEMMs against NumPy running the
  same contract through ml_dtypes, 16-bit weights on both): only the order of
  the FP32 sums differs, ~sqrt(k) 2^-24 relative for a dot product of length
  k, against a 16-bit rounding interval of ~2^-8 relative: a rounding flips
  with probability ~1e-3.  Element-wise within tests/contract.py's bound
  (``rounded_pre=2``); at least 95% of one GEMM's outputs and 80% of an
  expert's bit-equal (expected: > 99.9% and ~96%: each output sums ~2048
  hidden values of which ~2 flipped, moving it by ~2^-8 / 45 relative, so its
  own rounding flips with a probability of a few percent).  A GEMM that
  accumulates in reduced precision leaves far fewer equal.
- *GPU contract against the CPU's FP32 one* (mpimoe.model.layers.expert_ffn): the
  pre-activations are rounded on the GPU only.  Element-wise within the bound
  with ``rounded_pre=1``; relative L2 about u (measured on the CPU with the
  same contract: 0.94-1.09 u overall, per row at most 1.25 u at d = 1024):
  at most 1.5 u overall and 2 u per row.
- Logits of the whole tiny model: as tests/test_model.py's LOGIT_RTOL (a few
  bf16 flips; a bug moves logits by O(1)).
"""

import math

import numpy as np
import pytest

cupy = pytest.importorskip('cupy')

from contract import (LOGIT_RTOL, expert_bound, gamma, rel_l2_rows, teacher_forced,  # noqa: E402
                      unit_roundoff)
from mpimoe.backends.backend import (CUBLAS_NO_REDUCED_PRECISION_REDUCTION, DTYPES,  # noqa: E402
                                    Backend, HostStaging, cuda_problem, probe_cuda, round16,
                                    choose_backend, to_numpy, to_words)
from mpimoe.backends.binding import LocalRank  # noqa: E402
from mpimoe.checkpoint.weights import WeightFile  # noqa: E402
from mpimoe.model.config import model_config  # noqa: E402
from mpimoe.io.inputs import read_inputs  # noqa: E402
from mpimoe.model.layers import activate16, expert_ffn, mm16, mm32  # noqa: E402
from mpimoe.moe.local import moe_local  # noqa: E402
from mpimoe.model.reference import ReferenceModel, load_reference  # noqa: E402
from mpimoe.moe.router import route  # noqa: E402
from test_tensor_parallel import VARIANTS  # noqa: E402

_PROBLEM = cuda_problem(probe_cuda())
if _PROBLEM is not None:
    pytest.skip(f'no usable GPU: {_PROBLEM}', allow_module_level=True)

U = unit_roundoff('bfloat16')
BF16 = DTYPES['bfloat16']


@pytest.fixture(scope='module')
def gpu():
    backend = Backend('cupy')
    backend.bind(0, LocalRank(0, 'test'), print)
    return backend


def _host_expert(rng, kind, d, h):
    """Random BF16-valued expert on the host: dict name -> float32 matrix."""
    mats = ('gate', 'up', 'down') if kind == 'swiglu' else ('up', 'down')
    return {m: round16(rng.standard_normal((h, d) if m == 'down' else (d, h), np.float32)
                       / np.float32(math.sqrt(h if m == 'down' else d)), 'bfloat16')
            for m in mats}


def _on_gpu(gpu, w):
    """Host FP32 (BF16-valued) matrices -> device BF16, as Backend.weights does."""
    return gpu.weights({m: a.astype(BF16) for m, a in w.items()})


def _mm16_f32(x, w):
    """mm16 (the product written in w's 16-bit dtype) widened to float32."""
    return mm16(x, w).astype(np.float32)


def _rel_rows(a, b):
    """Relative L2 difference per row and overall: ([n], scalar)."""
    return (np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1),
            np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------- selection and binding

def test_auto_takes_the_gpu():
    name, why = choose_backend('auto')
    assert name == 'cupy' and why.startswith('CuPy ')


def test_bind_takes_local_rank_modulo_devices():
    n = cupy.cuda.runtime.getDeviceCount()
    lines = []
    backend = Backend('cupy')
    assert backend.bind(7, LocalRank(5, 'MPI_LOCALRANKID'), lines.append) == 5 % n
    assert cupy.cuda.Device().id == 5 % n
    assert lines[0].startswith(f'rank 7: node-local rank 5 (MPI_LOCALRANKID) -> GPU {5 % n} '
                               f'of {n} visible')
    handle = cupy.cuda.Device(5 % n).cublas_handle
    assert cupy.cuda.cublas.getMathMode(handle) & CUBLAS_NO_REDUCED_PRECISION_REDUCTION
    assert backend.self_test() is None
    cupy.cuda.Device(0).use()


def test_split_k_gemm_sums_in_fp32(gpu):
    """A long, thin BF16 GEMM (k = 65536 for a 64 x 128 output: cuBLAS
    splits k there) against the exact product rounded once to BF16.  With
    FP32 partial sums an output differs from it only where the FP32 error
    (~sqrt(k) 2^-24 relative, 1.5e-5) carries it across a rounding midpoint:
    a fraction ~1.5e-5 / 2^-8 ~ 0.4% of outputs.  Partial sums rounded to
    BF16 (the reduction the math mode forbids) move each by ~2^-8 and leave
    most outputs off by an ulp."""
    rng = np.random.default_rng(11)
    k = 65536
    x = rng.standard_normal((64, k)).astype(BF16)
    w = rng.standard_normal((k, 128)).astype(BF16)
    got = to_numpy(_mm16_f32(cupy.asarray(x), gpu.weights({'w': w})['w']))
    exact = round16((x.astype(np.float64) @ w.astype(np.float64)).astype(np.float32),
                    'bfloat16')
    assert np.mean(got == exact) >= 0.95


# ---------------------------------------------------------------- 16-bit values on the device

def test_round16_on_device_is_numpys_bit_for_bit(gpu):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(100000, np.float32) * np.float32(10.0) ** rng.integers(-6, 6, 100000)
    # exact ties: halfway between two bf16 values, round to the even one
    ties = np.float32(1 + 2.0 ** -8) * np.float32(2.0) ** np.arange(-20, 20, dtype=np.float32)
    x = np.concatenate([x, ties, -ties, [0, -0.0, np.inf, -np.inf, 3.4e38]]).astype(np.float32)
    got = to_numpy(to_words(round16(cupy.asarray(x), 'bfloat16').astype(BF16)))
    assert np.array_equal(got, to_words(round16(x, 'bfloat16').astype(BF16)))


def test_weights_reach_the_device_as_16_bit_words(gpu):
    w = {'a': np.random.default_rng(1).standard_normal((64, 32)).astype(BF16)}
    dev = gpu.weights(w)['a']
    assert isinstance(dev, cupy.ndarray) and dev.dtype == BF16
    assert np.array_equal(to_numpy(dev.view(np.uint16)), to_words(w['a']))


# ---------------------------------------------------------------- GEMMs and experts

@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_16_bit_gemm_accumulates_in_fp32(gpu, dtype):
    """paper-61l and paper-16l are bfloat16, paper-4l float16: both GEMMs on
    the device against the host's FP32 sums rounded to the 16-bit type
    (ml_dtypes for bfloat16, NumPy's own half matmul for float16)."""
    rng = np.random.default_rng(2)
    d, h = 1024, 2048
    x = rng.standard_normal((300, d)).astype(DTYPES[dtype])
    w = (rng.standard_normal((d, h)) / math.sqrt(d)).astype(DTYPES[dtype])
    got = to_numpy(_mm16_f32(cupy.asarray(x), gpu.weights({'w': w})['w']))
    want = _mm16_f32(x, w)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    bound = 2 * gamma(d) * (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64))) \
        + 2 * unit_roundoff(dtype) * np.abs(exact)
    assert got.dtype == np.float32 and np.array_equal(round16(got, dtype), got)
    assert np.all(np.abs(got - want) <= bound)
    assert np.mean(got == want) >= 0.95


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_front_end_gemm_writes_fp32(gpu, dtype):
    """mm32 with 16-bit weights on the device (cublasGemmEx, FP32 out)
    against its NumPy model (the input rounded once, FP32 sums): only the
    order of the FP32 sums differs, so within 2 gamma_k sum|x w| of each
    other, and the output is FP32, not rounded to 16 bits.  Shapes of an
    LM head slice and of a decode step (n = 1), odd sizes included."""
    rng = np.random.default_rng(4)
    for n, k, m in ((300, 1024, 2048), (1, 1024, 4096), (7, 96, 33)):
        x = rng.standard_normal((n, k), np.float32)
        w = (rng.standard_normal((k, m)) / math.sqrt(k)).astype(DTYPES[dtype])
        got = to_numpy(mm32(cupy.asarray(x), gpu.weights({'w': w})['w']))
        want = mm32(x, w)
        x16 = x.astype(DTYPES[dtype]).astype(np.float64)
        bound = 2 * gamma(k) * (np.abs(x16) @ np.abs(w.astype(np.float64)))
        assert got.dtype == np.float32 and got.shape == (n, m)
        assert np.all(np.abs(got - want) <= bound)
        assert not np.array_equal(round16(got, dtype), got)      # FP32 out: not 16-bit values
    empty = mm32(cupy.zeros((0, 96), np.float32), gpu.weights({'w': w})['w'])
    assert empty.shape == (0, 33) and empty.dtype == np.float32


@pytest.mark.parametrize('kind', ['mlp', 'swiglu'])
def test_activation_kernel_against_numpy(gpu, kind):
    """The fused activation kernel against activate16 on NumPy: both widen
    the same 16-bit values and round once; their exp/tanh differ by a few
    FP32 ulps, so a result flips by one 16-bit ulp only at a rounding
    midpoint: at least 99% equal, the rest within one ulp (2u relative)."""
    rng = np.random.default_rng(6)
    pre = [(rng.standard_normal((500, 700), np.float32) * 3).astype(BF16)
           for _ in range(2 if kind == 'swiglu' else 1)]
    got = to_numpy(activate16(kind, *(cupy.asarray(p) for p in pre)))
    want = activate16(kind, *pre)
    assert got.dtype == BF16
    got, want = got.astype(np.float32), want.astype(np.float32)
    assert np.mean(got == want) >= 0.99
    assert np.all(np.abs(got - want) <= 2 * U * np.abs(want))


@pytest.mark.parametrize('kind', ['mlp', 'swiglu'])
def test_expert_against_both_cpu_contracts(gpu, kind):
    """One GPU expert against the same (16-bit GEMM) contract on the host,
    mostly bit-equal, and against the CPU's FP32 contract, within about u."""
    rng = np.random.default_rng(3)
    w = _host_expert(rng, kind, 1024, 2048)
    x16 = round16(rng.standard_normal((200, 1024), np.float32), 'bfloat16')
    got = to_numpy(expert_ffn(cupy.asarray(x16), _on_gpu(gpu, w), kind, 'bfloat16'))
    same = expert_ffn(x16, {m: a.astype(BF16) for m, a in w.items()}, kind, 'bfloat16')
    assert got.dtype == same.dtype == BF16              # the product written in 16 bits
    got, same = got.astype(np.float32), same.astype(np.float32)
    assert np.all(np.abs(got - same) <= expert_bound(x16, w, kind, 'bfloat16', rounded_pre=2))
    assert np.mean(got == same) >= 0.8
    fp32 = expert_ffn(x16, w, kind, 'bfloat16')
    assert np.all(np.abs(got - fp32) <= expert_bound(x16, w, kind, 'bfloat16', rounded_pre=1))
    rows, overall = _rel_rows(got, fp32)
    assert overall <= 1.5 * U and rows.max() <= 2 * U


@pytest.mark.parametrize('kind', ['mlp', 'swiglu'])
def test_moe_layer_on_the_gpu_against_numpy(gpu, kind):
    """Route, permute, experts, unpermute on the device against NumPy's FP32
    layer: the same choices (FP32 router arithmetic in both; a near-tie at
    ~1e-6 is improbable for 300 random tokens), weights to FP32 rounding, and
    outputs that differ by the expert contract, about u."""
    cfg = model_config('tiny').replace(d_model=1024, d_expert=512, expert_kind=kind)
    rng = np.random.default_rng(5)
    experts = [_host_expert(rng, kind, cfg.d_model, cfg.d_expert) for _ in range(cfg.n_experts)]
    w_router = rng.standard_normal((cfg.d_model, cfg.n_experts), np.float32) / np.float32(32)
    h = rng.standard_normal((300, cfg.d_model), np.float32)
    h_dev, r_dev = cupy.asarray(h), cupy.asarray(w_router)
    chosen, weights = route(h, w_router, cfg.top_k)
    chosen_dev, weights_dev = route(h_dev, r_dev, cfg.top_k)
    assert np.array_equal(to_numpy(chosen_dev), chosen)
    np.testing.assert_allclose(to_numpy(weights_dev), weights, rtol=1e-5)
    want, counts = moe_local(h, w_router, experts, cfg)
    got, counts_dev = moe_local(h_dev, r_dev, [_on_gpu(gpu, w) for w in experts], cfg)
    assert isinstance(got, cupy.ndarray)
    assert to_numpy(counts_dev).tolist() == counts.tolist()
    rows, overall = _rel_rows(to_numpy(got), want)
    assert overall <= 1.5 * U and rows.max() <= 2 * U


def _model(weights, inputs_path):
    """(cfg, NumPy FP32 reference, prompts, the file's 16-bit tensors)."""
    with WeightFile(weights) as wf:
        ref = load_reference(wf)
        cfg = wf.config
        nonexpert = wf.read_nonexpert()
        experts = {i: [wf.read_expert(i, e) for e in range(cfg.n_experts)]
                   for i in cfg.moe_layers}
    inputs = read_inputs(inputs_path, cfg.vocab_size)
    return cfg, ref, [inputs.seq(i) for i in range(len(inputs))], nonexpert, experts


@pytest.fixture(scope='module')
def tiny(tiny_weights, tiny_inputs):
    return _model(tiny_weights, tiny_inputs)


#: tiny with multi-head latent attention
MLA = tuple(VARIANTS['mla-direct-q'][1])


def test_whole_model_on_the_gpu(gpu, tiny):
    """The reference model with every weight on the device (16-bit: the GPU
    contract of mpimoe.model.layers): prefill and cached greedy decode
    against NumPy running the same contract (the same 16-bit weights through
    ml_dtypes) and against the FP32 reference.

    The greedy tokens must equal the same-contract ones: on these inputs the
    closest top-two logits of any step are 1.7e-3 of their row's norm apart
    (reference run on a CPU), while same-contract rows differ only by FP32
    summation order and the 16-bit roundings it flips, well under u relative
    in L2 (~2e-5 of the norm per element over 256 logits).
    """
    cfg, ref, prompts, nonexpert, experts = tiny
    dev = ReferenceModel(cfg, gpu.weights(nonexpert),
                         {i: [gpu.weights(w) for w in ws] for i, ws in experts.items()})
    same = ReferenceModel(cfg, nonexpert, experts)

    # the layer loop hands back host logits; the scheduler samples on the host
    gen_dev, logits_dev = dev.generate(prompts, 4)
    gen_same, logits_same = same.generate(prompts, 4)
    _, logits_ref = ref.generate(prompts, 0)
    # same contract: summation order only, u allowed; FP32 reference: LOGIT_RTOL
    assert _rel_rows(logits_dev, logits_same)[0].max() <= unit_roundoff('bfloat16')
    assert _rel_rows(logits_dev, logits_ref)[0].max() <= LOGIT_RTOL
    assert all(np.array_equal(a, b) for a, b in zip(gen_dev, gen_same, strict=True))


def test_mla_model_on_the_gpu(gpu, make_weights, tiny_inputs):
    """MLA on the device: the absorbed products read each head's columns of
    the 16-bit wkv_b in place through cublasGemmStridedBatchedEx (FP32 out).
    Teacher-forced on the reference's greedy tokens (prefill, then 3 cached
    decode steps), every step's logits against NumPy running the same
    contract (summation order only: u) and against the FP32 reference
    (LOGIT_RTOL).  Greedy tokens are not compared: on these inputs this
    variant's top two logits come within 4e-5 of their row's norm."""
    cfg, ref, prompts, nonexpert, experts = _model(make_weights('tiny', MLA), tiny_inputs)
    assert cfg.attention.mla
    dev = ReferenceModel(cfg, gpu.weights(nonexpert),
                         {i: [gpu.weights(w) for w in ws] for i, ws in experts.items()})
    same = ReferenceModel(cfg, nonexpert, experts)
    tokens = np.stack(ref.generate(prompts, 4)[0])                          # [B, 4]
    got, want, exact = (teacher_forced(m, prompts, tokens) for m in (dev, same, ref))
    assert rel_l2_rows(got, want).max() <= unit_roundoff('bfloat16')       # [steps, B]
    assert rel_l2_rows(got, exact).max() <= LOGIT_RTOL


# ---------------------------------------------------------------- host staging

def test_host_staging_buffers_are_pinned_and_ordered(gpu):
    staging = HostStaging(4096, gpu)
    n = 8192                                                # 64 MB of words: copies take ms
    rows = cupy.arange(n * 4096, dtype=cupy.uint32).reshape(n, 4096)
    rows = ((rows * 2654435761) >> 16).astype(cupy.uint16)  # written on the current stream
    host = staging.download(rows)
    staging.wait()
    assert np.array_equal(host, to_numpy(rows))
    attrs = cupy.cuda.runtime.pointerGetAttributes(staging.out.buf.ctypes.data)
    assert attrs.type == cupy.cuda.runtime.memoryTypeHost  # page-locked
    # MPI received into inp; kernels queued after upload see the rows, with no host wait
    staging.inp.view(n)[:] = np.random.default_rng(6).integers(0, 2 ** 16, (n, 4096),
                                                               dtype=np.uint16)
    target = cupy.zeros((n, 4096), cupy.uint16)
    staging.upload(target)
    total = int(target.astype(cupy.int64).sum())
    assert total == int(staging.inp.view(n).astype(np.int64).sum())
    staging.wait()


# ---------------------------------------------------------------- mpimoe bench gpu

def test_counts_come_back_while_the_host_polls(gpu):
    """Backend.to_host (the row counts of a dispatch) waits for the kernels
    queued before it, calling poll() meanwhile (MPI progress), and returns
    the values in page-locked memory; wait_polling likewise."""
    a = cupy.random.default_rng(8).standard_normal((4096, 4096), dtype=np.float32)
    calls = []
    [a @ a for _ in range(5)]                                     # some ms of work queued
    counts = cupy.arange(7, dtype=cupy.int64) * 3
    host = gpu.to_host(counts, lambda: calls.append(1))
    assert host.tolist() == [0, 3, 6, 9, 12, 15, 18] and len(calls) > 0
    assert cupy.cuda.runtime.pointerGetAttributes(host.ctypes.data).type == \
        cupy.cuda.runtime.memoryTypeHost
    calls.clear()
    [a @ a for _ in range(5)]
    gpu.wait_polling(lambda: calls.append(1))
    assert len(calls) > 0 and cupy.cuda.get_current_stream().done


def test_regroup_order_on_the_device_is_numpys(gpu):
    """The expert rank's regroup, built on the GPU from the host's row counts,
    is NumPy's order, element for element (empty blocks, 3904 peers)."""
    from mpimoe.runtime.expert import regroup_order
    rng = np.random.default_rng(14)
    for size, k in ((3, 2), (5, 3), (3904, 2)):
        counts = rng.integers(0, 4, (size, k)) * rng.integers(0, 2, (size, k))
        got = regroup_order(counts, cupy)
        assert isinstance(got, cupy.ndarray) and got.dtype == np.int64
        assert got.get().tolist() == regroup_order(counts).tolist()


def test_compute_spans_count_device_time(gpu):
    """On a GPU a compute span counts the time its kernels ran, not the time
    the host took to queue them: ten FP32 4096^3 matmuls queued in a
    'compute' span count what CUDA events around the same queued work
    measure (within a factor of 2: the same kernels, another run), while a
    'pack' span (host time) around queueing them again returns long before
    they ran.  Read at summary, after the spans closed."""
    from mpimoe.runtime.metrics import Timers
    a = cupy.random.default_rng(7).standard_normal((4096, 4096), dtype=np.float32)
    work = lambda: [a @ a for _ in range(10)]  # noqa: E731
    work()
    cupy.cuda.get_current_stream().synchronize()
    timers = Timers(cuda=cupy.cuda)
    with timers.span('expert', 'compute'):
        work()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    work()
    stop.record()
    stop.synchronize()
    events_s = cupy.cuda.get_elapsed_time(start, stop) / 1e3
    with timers.span('permute', 'pack'):
        work()
    got = timers.summary()['stage_s']
    cupy.cuda.get_current_stream().synchronize()
    assert events_s / 2 <= got['expert'] <= 2 * events_s
    assert got['permute'] < events_s / 2


def test_gpu_bench_prints_its_table(capsys):
    from mpimoe.bench.gpu import GpuBenchOptions, run_gpu_bench
    opts = GpuBenchOptions(gemm_tokens=(128, 1024), decode_batches=(8, 64), square=2048,
                           moe_tokens=512, repeats=2, warmup=1)
    assert run_gpu_bench(opts) == 0
    out = capsys.readouterr().out
    for text in ('expert GEMMs', 'square BF16 matmul', 'mpimoe moe_local (CuPy)',
                 'decode step: small preset', 'MPI transfer: needs 2 ranks'):
        assert text in out
