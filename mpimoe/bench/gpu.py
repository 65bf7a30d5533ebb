"""``mpimoe bench gpu``: figures of the GPU path, one table printed by rank 0.

1. **expert GEMMs**: the two 2-D BF16 GEMMs of one paper-61l expert
   (7168 -> 2048 -> 7168) at 128 .. 8192 tokens, in TFLOP/s, beside the
   expert stage as the engine runs it (mpimoe.model.layers.expert_ffn: GEMMs, GELU,
   16-bit rounding), 8 experts' up GEMMs as a loop of 2-D GEMMs (no batched
   3-D BF16 matmul: CuPy 14 sends it to an integer path that raises,
   cupy/cupy#10317), and a large square BF16 matmul (the device's practical
   peak);
2. **MoE layer**: one paper-61l MoE layer (64 experts, top-2) on one GPU,
   mpimoe.moe.experts.moe_local on CuPy against a PyTorch loop over the experts (the
   eager implementation most MoE code starts from), on the same weights and
   tokens: milliseconds, tokens/s, and the relative difference of the outputs;
3. **decode step**: one decode step of the ``small`` preset (synthetic
   weights, the whole model on one GPU: mpimoe.model.reference.ReferenceModel)
   at batch sizes 8, 64, 256 after prompts of 16..64 tokens: ms per step and
   per sequence, tokens/s (:func:`decode_figures`);
4. **MPI transfer** (under ``mpiexec -n 2``): rows of 1 .. 64 MB between the
   two ranks' GPUs, staged through pinned host buffers
   (mpimoe.backends.backend.HostStaging) and, where the MPI library reports CUDA
   support, handed over as device buffers; GB/s one way (half a round trip).

Device work is timed with CUDA events, MPI transfers with the host clock
after synchronising; every figure is the median of ``repeats`` runs after
``warmup`` untimed ones, on random data (never zeros).
"""

import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from mpimoe.backends.backend import (DTYPES, MPI_GPU_MODES, Backend, HostStaging, cuda_problem,
                                    probe_cuda)
from mpimoe.backends.binding import bind_early
from mpimoe.checkpoint.weights import WeightFile
from mpimoe.checkpoint.writer import write_synthetic
from mpimoe.model.reference import load_reference
from mpimoe.model.config import model_config
from mpimoe.errors import ConfigError, UsageError
from mpimoe.model.layers import expert_ffn
from mpimoe.moe.local import moe_local

__all__ = ['GpuBenchOptions', 'run_gpu_bench', 'decode_figures', 'prefilled']

#: experts and tokens per expert of the several-experts line
_BATCH = (8, 1024)


@dataclass(frozen=True)
class GpuBenchOptions:
    """Options of ``mpimoe bench gpu`` (see its ``--help``)."""
    gemm_tokens: tuple = (128, 256, 512, 1024, 2048, 4096, 8192)
    decode_batches: tuple = (8, 64, 256)
    square: int = 8192
    moe_tokens: int = 4096
    sizes_mb: tuple = (1, 2, 4, 8, 16, 32, 64)
    repeats: int = 20
    warmup: int = 3
    seed: int = 0
    torch: bool = True
    mpi_gpu: str = 'auto'
    deadline: float = 600.0

    def validate(self):
        """ConfigError on options that cannot work."""
        for name, low in (('square', 1), ('moe_tokens', 1), ('repeats', 1), ('warmup', 0),
                          ('seed', 0)):
            if getattr(self, name) < low:
                raise ConfigError(f'--{name.replace("_", "-")} {getattr(self, name)}: '
                                  f'must be >= {low}')
        if not self.gemm_tokens or min(self.gemm_tokens) < 1:
            raise ConfigError('--gemm-tokens: a list of token counts >= 1')
        if not self.decode_batches or min(self.decode_batches) < 1:
            raise ConfigError('--decode-batches: a list of batch sizes >= 1')
        if not self.sizes_mb or min(self.sizes_mb) <= 0:
            raise ConfigError('--sizes-mb: a list of message sizes > 0')
        if self.mpi_gpu not in MPI_GPU_MODES:
            raise UsageError(f'--mpi-gpu {self.mpi_gpu}: choose one of '
                             f'{", ".join(MPI_GPU_MODES)}')


def run_gpu_bench(opts, comm=None):
    """``mpimoe bench gpu`` on each of 1 or 2 ranks; rank 0 prints the table.

    Raises UsageError before MPI is used when CuPy or a GPU is missing.
    """
    opts.validate()
    problem = cuda_problem(probe_cuda())
    if problem is not None:
        raise UsageError(f'mpimoe bench gpu needs a CUDA GPU: {problem}')
    bind_early('cupy')              # the GPU current before MPI_Init creates a context
    from mpimoe.parallel.mpiutil import MPI, run_guarded
    comm = comm or MPI.COMM_WORLD
    if comm.size > 2:
        raise UsageError(f'mpimoe bench gpu runs on 1 rank, or 2 for the transfer figures, '
                         f'not {comm.size}')
    return run_guarded(comm, _bench, opts, comm)


def _bench(opts, world):
    from mpimoe.bench.moe_layer import idle
    from mpimoe.runtime.role import collective
    from mpimoe.parallel.gpu_mpi import choose_mpi_gpu
    from mpimoe.parallel.mpiutil import local_rank
    backend = Backend('cupy')
    lines = []
    backend.bind(world.rank, local_rank(world), lines.append)
    problem = backend.self_test()
    if problem:
        raise ConfigError(f'rank {world.rank}: {problem}')
    try:
        mode, why, warnings = choose_mpi_gpu(world, backend, opts.mpi_gpu, opts.deadline)
    except (ConfigError, UsageError) as e:          # every rank alike
        raise collective(e)
    modes = ['host', 'device'] if mode == 'device' else ['host']
    lines = world.gather(lines[0], root=0)          # per rank: its binding
    if world.rank == 0:
        lines += [f'--mpi-gpu {opts.mpi_gpu}: {mode} ({why})', *warnings]
    cfg = model_config('paper-61l')
    clock = _Clock(backend.xp.cuda.Event, backend.xp.cuda.get_elapsed_time)
    gemm = moe = decode = None
    if world.rank == 0:
        gemm = _gemm_figures(backend.xp, cfg, opts, clock)
        moe = _moe_figures(backend, cfg, opts, clock)
        decode = decode_figures(backend, opts, clock)
    idle(world, opts.deadline)
    transfer = _transfer_figures(world, backend, cfg, opts, modes) if world.size == 2 else None
    if world.rank == 0:
        _print_table(backend, cfg, opts, lines, gemm, moe, decode, transfer, modes)
    return 0


class _Clock:
    """Median seconds of a region between two CUDA events of one library."""

    def __init__(self, new_event, elapsed_ms):
        self.new_event, self.elapsed_ms = new_event, elapsed_ms

    def median_s(self, fn, opts):
        """fn() ``opts.warmup`` times untimed, then the median of ``opts.repeats``."""
        for _ in range(opts.warmup):
            fn()
        times = []
        for _ in range(opts.repeats):
            start, stop = self.new_event(), self.new_event()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(self.elapsed_ms(start, stop) / 1e3)
        return float(np.median(times))


def _randn(rng, shape, scale):
    """Device BF16 N(0, scale^2) values: [*shape]."""
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(
        DTYPES['bfloat16'])


def _expert(rng, cfg):
    """One random expert (``mlp``): dict up [d, h], down [h, d], device BF16."""
    d, h = cfg.d_model, cfg.d_expert
    return {'up': _randn(rng, (d, h), d ** -0.5), 'down': _randn(rng, (h, d), h ** -0.5)}


# -------------------------------------------------------------- expert GEMMs

def _gemm_figures(xp, cfg, opts, clock):
    """TFLOP/s of the expert's GEMMs and stage per token count, of several
    experts' 2-D GEMMs in a loop, and of the square matmul."""
    rng = xp.random.default_rng(opts.seed)
    d, h = cfg.d_model, cfg.d_expert
    w = _expert(rng, cfg)
    rows = []
    for n in opts.gemm_tokens:
        x = _randn(rng, (n, d), 1.0)                                   # [n, d]
        flops = 4 * n * d * h
        gemms = clock.median_s(lambda: (x @ w['up']) @ w['down'], opts)
        stage = clock.median_s(lambda: expert_ffn(x, w, 'mlp', cfg.dtype), opts)
        rows.append((n, flops / gemms / 1e12, flops / stage / 1e12))
    e, n = _BATCH
    xs = _randn(rng, (e, n, d), 1.0)                                   # [E, n, d]
    ups = _randn(rng, (e, d, h), d ** -0.5)                            # [E, d, h]
    flops = 2 * e * n * d * h
    loop = clock.median_s(lambda: [xs[i] @ ups[i] for i in range(e)], opts)
    a, b = (_randn(rng, (opts.square, opts.square), opts.square ** -0.5) for _ in range(2))
    square = clock.median_s(lambda: a @ b, opts)
    return {'rows': rows, 'loop': flops / loop / 1e12,
            'square': 2 * opts.square ** 3 / square / 1e12}


# -------------------------------------------------------------- MoE layer

def _moe_figures(backend, cfg, opts, clock):
    """Seconds of one MoE layer, ours and (if available) PyTorch's, and the
    relative L2 difference of their outputs."""
    xp = backend.xp
    rng = xp.random.default_rng(opts.seed + 1)
    experts = [_expert(rng, cfg) for _ in range(cfg.n_experts)]
    w_router = rng.standard_normal((cfg.d_model, cfg.n_experts), dtype=np.float32)  # [d, E]
    h = rng.standard_normal((opts.moe_tokens, cfg.d_model), dtype=np.float32)        # [T, d]
    out = {'ours': clock.median_s(lambda: moe_local(h, w_router, experts, cfg), opts)}
    torch = _import_torch() if opts.torch else None
    if torch is None:
        return out
    shared = {k: torch.from_dlpack(v) for k, v in (('h', h), ('w_router', w_router))}
    ups = [_to_torch(torch, w['up']) for w in experts]
    downs = [_to_torch(torch, w['down']) for w in experts]
    tclock = _Clock(lambda: torch.cuda.Event(enable_timing=True), lambda a, b: a.elapsed_time(b))
    out['torch'] = tclock.median_s(lambda: _torch_moe(torch, shared['h'], shared['w_router'],
                                                      ups, downs, cfg.top_k), opts)
    ours = moe_local(h, w_router, experts, cfg)[0]
    theirs = xp.from_dlpack(_torch_moe(torch, shared['h'], shared['w_router'], ups, downs,
                                       cfg.top_k))
    out['rel_diff'] = float(xp.linalg.norm(ours - theirs) / xp.linalg.norm(theirs))
    out['torch_version'] = torch.__version__
    return out


def _import_torch():
    """PyTorch with CUDA, or None (the baseline is then left out of the table)."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _to_torch(torch, a16):
    """A device BF16 CuPy array as a torch BF16 tensor on the same memory (the
    words cross DLPack as int16, a type both libraries agree on)."""
    return torch.from_dlpack(a16.view(np.int16)).view(torch.bfloat16)


def _torch_moe(torch, h, w_router, ups, downs, top_k):
    """The eager MoE layer of most PyTorch code: softmax router, top-k, then
    for each expert its tokens (nonzero: a host synchronisation per expert),
    two BF16 GEMMs with GELU between, and a weighted index_add.

    h: float32 [T, d]; w_router: float32 [d, E]; ups, downs: E BF16 [d, h],
    [h, d] -> float32 [T, d].
    """
    probs = torch.softmax(h @ w_router, dim=1)                       # [T, E]
    weights, chosen = torch.topk(probs, top_k, dim=1)                 # [T, k]
    weights = weights / weights.sum(dim=1, keepdim=True)
    x16 = h.to(torch.bfloat16)
    out = torch.zeros_like(h)
    for e in range(len(ups)):
        tok, slot = torch.nonzero(chosen == e, as_tuple=True)
        y = torch.nn.functional.gelu(x16[tok] @ ups[e], approximate='tanh') @ downs[e]
        out.index_add_(0, tok, y.float() * weights[tok, slot, None])
    return out


# -------------------------------------------------------------- decode step

#: the model and prompt lengths (min, max) of the decode-step figures
DECODE_PRESET, DECODE_PROMPT = 'small', (16, 64)


def decode_figures(backend, opts, clock):
    """Median seconds of one decode step of :data:`DECODE_PRESET` per batch
    size of ``opts.decode_batches``: list of (B, seconds).

    The preset's synthetic weights (seed ``opts.seed``) go to ``backend``
    (16-bit on a GPU: its numerics contract); each batch is prefilled with
    random prompts of DECODE_PROMPT tokens, then every step, warm-up
    included, feeds one token per sequence and advances the cache (the
    logits come back to the host, as the scheduler needs them).  clock: an
    object whose ``median_s(fn, opts)`` times fn (CUDA events on a GPU).
    """
    cfg = model_config(DECODE_PRESET)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f'{DECODE_PRESET}.h5')
        write_synthetic(cfg, path, seed=opts.seed)
        with WeightFile(path) as wf:
            model = load_reference(wf, backend.weights)
    rng = np.random.default_rng(opts.seed)
    out = []
    for B in opts.decode_batches:
        cache, seqs = prefilled(model, B, DECODE_PROMPT, opts.warmup + opts.repeats, rng)
        tokens, ones = rng.integers(0, cfg.vocab_size, B), np.ones(B, np.int64)
        out.append((B, clock.median_s(lambda: model.forward(tokens, cache, seqs, ones), opts)))
    return out


def prefilled(model, B, prompt, room, rng):
    """B sequences of random prompts of ``prompt`` = (min, max) tokens
    prefilled in a ReferenceModel, with room for ``room`` more tokens each:
    (cache, handles int [B])."""
    lengths = rng.integers(prompt[0], prompt[-1] + 1, B)
    cache, seqs = model.front.cache_for(lengths + room)
    model.forward(rng.integers(0, model.cfg.vocab_size, int(lengths.sum())), cache, seqs,
                  lengths)
    return cache, seqs


# -------------------------------------------------------------- MPI transfer

def _transfer_figures(world, backend, cfg, opts, modes):
    """Per size: (MB, {mode: GB/s one way}), rows of paper-61l width between
    ranks 0 and 1; each round trip checks that the rows came back unchanged."""
    xp = backend.xp
    d = cfg.d_model
    staging = HostStaging(d, backend)
    rng = xp.random.default_rng(opts.seed + 2)
    out = []
    for mb in opts.sizes_mb:
        n = max(1, round(mb * 1e6 / (2 * d)))
        send = rng.integers(0, 2 ** 16, (n, d), dtype=np.int32).astype(np.uint16)  # [n, d]
        back = xp.empty_like(send)
        rates = {}
        for mode in modes:
            seconds = []
            for _ in range(opts.warmup + opts.repeats):
                back.fill(0)
                t0 = time.perf_counter()
                _round_trip(world, backend, staging, mode, send, back)
                seconds.append(time.perf_counter() - t0)
            if world.rank == 0 and not bool(xp.array_equal(send, back)):
                raise RuntimeError(f'{mode} transfer of {mb} MB: the rows came back changed')
            rates[mode] = 2 * send.nbytes / float(np.median(seconds[opts.warmup:])) / 1e9
        out.append((send.nbytes / 1e6, rates))
    return out


def _round_trip(world, backend, staging, mode, send, back):
    """Rank 0 sends ``send`` to rank 1, which returns it; rank 0 gets it in
    ``back`` (device uint16 [n, d]), ready on the device when this returns."""
    if world.rank == 0:
        _send(world, backend, staging, mode, send, 1)
        _recv(world, backend, staging, mode, back, 1)
    else:
        _recv(world, backend, staging, mode, back, 0)
        _send(world, backend, staging, mode, back, 0)


def _send(world, backend, staging, mode, rows, peer):
    if mode == 'device':
        backend.synchronize()               # the stream that wrote the rows
        world.Send(rows, dest=peer)
        return
    host = staging.download(rows)
    staging.wait()
    world.Send(host, dest=peer)


def _recv(world, backend, staging, mode, rows, peer):
    if mode == 'device':
        world.Recv(rows, source=peer)
        return
    world.Recv(staging.inp.view(len(rows)), source=peer)
    staging.upload(rows)
    backend.synchronize()


# -------------------------------------------------------------- report

def _print_table(backend, cfg, opts, lines, gemm, moe, decode, transfer, modes):
    xp = backend.xp
    print(f'mpimoe bench gpu: {backend.device_name}, CuPy {xp.__version__}, CUDA runtime '
          f'{xp.cuda.runtime.runtimeGetVersion()}; medians of {opts.repeats} after '
          f'{opts.warmup} warm-up, random data')
    for line in lines:
        print(f'  {line}')
    d, h = cfg.d_model, cfg.d_expert
    print(f'expert GEMMs: paper-61l expert {d} -> {h} -> {d}, 2-D BF16 GEMMs (FP32 '
          'accumulation); expert stage = GEMMs + GELU + 16-bit rounding (expert_ffn)')
    print(f'  {"tokens":>8s}{"GEMMs TFLOP/s":>16s}{"stage TFLOP/s":>16s}')
    for n, g, s in gemm['rows']:
        print(f'  {n:8d}{g:16.1f}{s:16.1f}')
    e, n = _BATCH
    print(f'  {e} experts x {n} tokens, up GEMMs as {e} 2-D GEMMs in a loop: '
          f'{gemm["loop"]:.1f} TFLOP/s')
    print(f'  square BF16 matmul {opts.square}^3: {gemm["square"]:.1f} TFLOP/s')
    T = opts.moe_tokens
    print(f'MoE layer: paper-61l, {cfg.n_experts} experts (mlp) top-{cfg.top_k}, {T} tokens, '
          'one GPU')
    print(f'  {"":34s}{"ms":>10s}{"tokens/s":>12s}')
    print(f'  {"mpimoe moe_local (CuPy)":34s}{1e3 * moe["ours"]:10.2f}{T / moe["ours"]:12.0f}')
    if 'torch' in moe:
        print(f'  {"PyTorch loop over experts":34s}{1e3 * moe["torch"]:10.2f}'
              f'{T / moe["torch"]:12.0f}')
        print(f'  speed-up {moe["torch"] / moe["ours"]:.2f}x (torch {moe["torch_version"]}); '
              f'outputs differ by relative L2 {moe["rel_diff"]:.2g} (one bf16 rounding: 3.9e-3)')
    else:
        print('  PyTorch baseline left out (--no-torch, or no PyTorch with CUDA here)')
    print(f'decode step: {DECODE_PRESET} preset, whole model on one GPU, prompts of '
          f'{DECODE_PROMPT[0]}..{DECODE_PROMPT[1]} tokens')
    print(f'  {"B":>6s}{"ms/step":>10s}{"ms/seq":>10s}{"tokens/s":>12s}')
    for B, t in decode:
        print(f'  {B:6d}{1e3 * t:10.2f}{1e3 * t / B:10.3f}{B / t:12.0f}')
    if transfer is None:
        print('MPI transfer: needs 2 ranks (mpiexec -n 2 python -m mpi4py -m mpimoe bench gpu)')
        return
    print('MPI transfer between 2 ranks, one way (half a round trip), rows of '
          f'{cfg.d_model} words' + ('' if 'device' in modes else
                                    '; device buffers left out: the MPI library does not '
                                    'report CUDA support (--mpi-gpu)'))
    print(f'  {"MB":>8s}' + ''.join(f'{m + " GB/s":>14s}' for m in modes))
    for mb, rates in transfer:
        print(f'  {mb:8.2f}' + ''.join(f'{rates[m]:14.2f}' for m in modes))
