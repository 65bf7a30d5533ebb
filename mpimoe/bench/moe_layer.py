"""``mpimoe bench moe-layer``: one MoE layer over P ranks against its expert
GEMMs alone, timed in the same job.

The layer is the engine's own: rank 0, the one front-end, runs the
mpimoe.moe.layer.MoELayer with the MPI dispatcher (stages route, permute,
dispatch, combine, unpermute), the others mpimoe.runtime.expert.ExpertRank
(stage expert), on weights built in memory: a one-layer model whose experts
are random BF16 matrices, held as the engine holds them on the backend
(``--backend``: FP32 copies on NumPy, 16-bit on a GPU,
mpimoe.backends.backend.Backend.weights), and random activations [T, d].
Each repeat is one *step* of the engine's control protocol
(mpimoe.runtime.role):

1. baselines on rank 0 while the other ranks sleep (:func:`idle`): the bare
   GEMMs of every expert (``x @ up``, ``@ down``) on the rows the router sends
   it, one block per expert, and the expert stage
   :func:`mpimoe.moe.experts.run_experts` (GEMMs, activation, 16-bit rounding) on
   the same rows; on NumPy each with as many BLAS threads as rank 0 has
   cores, and with 1; on a GPU once, on the device;
2. the distributed layer, every rank at 1 BLAS thread: rank 0 dispatches
   every micro-batch, then combines each (as the layer loop,
   mpimoe.model.forward, does); the expert ranks serve the layer;
3. the same layer with experts that send their rows back unchanged (no
   GEMM): the transfers and every stage but the expert's (routing and
   packing on the front-end, unpacking and packing on the expert ranks).

From 2 and 3 and the slowest expert rank's compute stage in 2 comes the
*overlap efficiency* ``(T_comm + T_comp - T_layer) / min(T_comm, T_comp)``
(T_comm: 3; T_comp: the compute; T_layer: 2): 1 when the transfers hide
entirely behind the experts' GEMMs (or these behind them), 0 when the two
run one after the other.  Where ranks share cores (more ranks than cores)
they also compete for them, which this figure cannot tell from a lack of
overlap: run it with a core per rank (``mpiexec -n 2`` on 2 cores).  On a
GPU the compute stages' times are device time (CUDA events,
mpimoe.runtime.metrics.Timers), every other figure host time after
synchronising; ranks that share one GPU compete for it the same way.

The RATIO divides the layer time by the GEMMs with all cores' threads (on a
GPU: on rank 0's device): the P ranks share those same cores (or one GPU),
so the ratio is the price of routing, packing, MPI, the activation and
oversubscribing the cores; with a GPU per rank it compares P GPUs with one,
and may fall below 1.  One node only.
"""

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import numpy as np
from threadpoolctl import threadpool_limits

from mpimoe.backends.backend import DTYPES, MPI_GPU_MODES, round16, to_numpy
from mpimoe.errors import ConfigError, UsageError
from mpimoe.io.files import write_json
from mpimoe.model.config import ModelConfig
from mpimoe.moe.experts import permute, run_experts
from mpimoe.moe.layer import MoELayer
from mpimoe.moe.local import moe_local
from mpimoe.moe.router import route
from mpimoe.parallel.dispatcher import MPIDispatcher
from mpimoe.parallel.mpiutil import MPI, WaitTimeout, run_guarded, wait_all
from mpimoe.planning.placement import make_plan
from mpimoe.runtime.engine import layer_comms, select_backend
from mpimoe.runtime.expert import ExpertRank
from mpimoe.runtime.metrics import Timers
from mpimoe.runtime.options import RunOptions
from mpimoe.runtime.role import DONE, MORE, Role, collective
from mpimoe.runtime.threads import apply_threads

__all__ = ['BenchOptions', 'bench_moe_layer', 'idle']

_CATEGORIES = ('compute', 'wait', 'pack')
#: seconds an idle rank sleeps between two tests of the round barrier
_IDLE_NAP_S = 0.02
#: share of the cores used by other processes above which the figures are suspect
_BUSY_SHARE = 0.05


@dataclass(frozen=True)
class BenchOptions:
    """Options of ``mpimoe bench moe-layer`` (see its ``--help``)."""
    d_model: int = 1024
    experts: int = 8
    d_expert: int = 2048
    top_k: int = 2
    tokens: int = 4096
    micro_batches: int = 4
    repeats: int = 5
    warmup: int = 1
    kind: str = 'mlp'
    seed: int = 0
    placement: str = 'per-layer'
    deadline: float = 600.0
    calibration_out: str = None
    backend: str = 'numpy'
    mpi_gpu: str = 'auto'

    def validate(self):
        """ConfigError on values that cannot work, UsageError on an unknown choice."""
        for name, low in (('tokens', 1), ('repeats', 1), ('warmup', 0), ('seed', 0)):
            if getattr(self, name) < low:
                raise ConfigError(f'--{name} {getattr(self, name)}: must be >= {low}')
        for name, choices in (('backend', ('numpy', 'cupy')), ('mpi_gpu', MPI_GPU_MODES)):
            if getattr(self, name) not in choices:
                raise UsageError(f'--{name.replace("_", "-")} {getattr(self, name)}: choose '
                                 f'one of {", ".join(choices)}')

    def config(self):
        """The benchmarked model: one MoE layer (attention shrunk to one tiny head,
        which the benchmark never runs)."""
        return ModelConfig(n_layers=1, n_dense_layers=0, n_experts=self.experts,
                           top_k=self.top_k, d_model=self.d_model, n_heads=1,
                           n_kv_heads=1, head_dim=2, d_expert=self.d_expert, d_dense=1,
                           expert_kind=self.kind, vocab_size=2, dtype='bfloat16')


def bench_moe_layer(opts, comm=None):
    """``mpimoe bench moe-layer`` on every rank; rank 0 prints the table."""
    comm = comm or MPI.COMM_WORLD
    return run_guarded(comm, _bench, opts, comm)


def _bench(opts, world):
    try:
        opts.validate()
        cfg = opts.config()
        plan = make_plan(cfg, world.size, opts.placement, n_frontends=1)
        run_opts = RunOptions(weights='(in memory)', input='', output='',
                              placement=opts.placement, frontends=1,
                              micro_batches=opts.micro_batches, deadline=opts.deadline)
        run_opts.validate()
        blas = apply_threads(1)
        if not blas:
            raise ConfigError('mpimoe bench found no BLAS that threadpoolctl can size '
                              '(OpenBLAS, MKL, BLIS) behind NumPy')
    except UsageError as e:
        raise collective(e)
    backend, mode = select_backend(opts, world)
    layers = layer_comms(world, plan)
    layer = cfg.moe_layers[0]
    t0, cpu0, machine0 = time.perf_counter(), time.process_time(), _machine_cpu_s()
    role = _make_role(world, cfg, plan, run_opts, layers, opts.seed, backend, mode)
    if role.is_frontend:
        rounds, summary = _frontend_rounds(role, layer, opts, blas)
        summary['mode'] = mode
    else:
        rounds, summary = _expert_rounds(role, layer), None
    ours = world.reduce(time.process_time() - cpu0, root=0)
    rows = world.gather(_medians(rounds[opts.warmup:]), root=0)
    if world.rank == 0:
        summary['others'] = _others_share(machine0, ours, time.perf_counter() - t0,
                                          summary['cores'])
        _print_table(opts, cfg, plan, summary, rows)
        if opts.calibration_out:
            _write_calibration(opts.calibration_out, cfg, summary, rows[0])
    for lc in layers.values():
        lc.free()
    role.rowtype.Free()
    return 0


# -------------------------------------------------------------- weights

def _make_role(world, cfg, plan, run_opts, layers, seed, backend, mode):
    """Rank 0: a Role with the layer's MoELayer (``role.moe``) over the MPI
    dispatcher; the others: an ExpertRank, on weights built in memory and
    held on ``backend`` (MPI buffers for ``mode``, as mpimoe.runtime.role.Role)."""
    layer = cfg.moe_layers[0]
    timers = Timers(cuda=backend.cuda)
    if plan.is_frontend(world.rank):
        role = Role(world, cfg, plan, run_opts, layers, timers, backend, mode)
        keys = tuple(map(backend.asarray, plan.dispatch_keys(0)[:2]))
        role.dispatcher = MPIDispatcher(cfg, role.slots, layers, {layer: keys}, world.rank,
                                        role.timers)
        router = _random((cfg.d_model, cfg.n_experts), seed, 1 << 20).astype(np.float32)
        role.moe = MoELayer(layer, backend.asarray(router), cfg, role.dispatcher, role.timers)
        role.is_frontend = True
        return role
    hosted = [backend.weights(_expert(cfg, layer, e, seed))
              for _, e in plan.rank_experts(world.rank)]
    return ExpertRank(world, cfg, plan, run_opts, layers, timers, {layer: hosted}, backend,
                      mode)


def _random(shape, seed, *key):
    """Seeded N(0, 1/shape[0]) values as BF16 (never all zero)."""
    rng = np.random.default_rng([seed, *key])
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= np.float32(shape[0] ** -0.5)
    return x.astype(DTYPES['bfloat16'])


def _expert(cfg, layer, e, seed):
    """Expert e of ``layer``: dict matrix name -> BF16 [d, h] or [h, d]
    (mpimoe.backends.backend.Backend.weights takes it)."""
    d, h = cfg.d_model, cfg.d_expert
    return {m: _random((h, d) if m == 'down' else (d, h), seed, layer, e, i)
            for i, m in enumerate(cfg.expert_matrices)}


# -------------------------------------------------------------- rounds

def _frontend_rounds(role, layer, opts, blas):
    """Rank 0: per step, baselines then the distributed layer (blas: the
    BLAS libraries, for the table).

    Returns (per-step dicts of seconds, summary dict for the table).
    """
    cfg, backend = role.cfg, role.backend
    experts = [backend.weights(_expert(cfg, layer, e, opts.seed)) for e in range(cfg.n_experts)]
    h = backend.asarray(np.random.default_rng([opts.seed, 2]).standard_normal(
        (opts.tokens, cfg.d_model), dtype=np.float32))                  # [T, d]
    chosen, _ = route(h, role.moe.router, cfg.top_k)              # [T, k]
    # the rows as an expert rank takes them (16-bit values; on a GPU the 16-bit dtype)
    x16 = h.astype(DTYPES[cfg.dtype]) if backend.is_gpu else round16(h, cfg.dtype)
    rows, _, counts = permute(x16, chosen, cfg.n_experts)
    counts = to_numpy(counts)
    hs = backend.xp.array_split(h, opts.micro_batches)
    cores = len(os.sched_getaffinity(0))
    variants = _baselines(backend, cores)
    rounds = []
    for _ in range(opts.warmup + opts.repeats):
        r = {}
        for name, limits in variants:
            with limits():
                _timed(r, f'gemm_{name}', backend, _gemms, rows, counts, experts)
                _timed(r, f'stage_{name}', backend, run_experts, rows, counts, experts,
                       cfg.expert_kind, cfg.dtype)
        idle(role.world, opts.deadline)
        role.next_step(MORE)
        _ready(role.world, opts.deadline)
        before = _snapshot(role.timers)
        y = _timed(r, 'layer', backend, _layer_pass, role, layer, hs)
        r.update(_since(role.timers, before))
        _timed(r, 'echo', backend, _layer_pass, role, layer, hs)
        rounds.append(r)
    # at this rank's BLAS threads, which the expert ranks have too: OpenBLAS
    # sums in another order on another number of threads
    moe = moe_local(h, role.moe.router, experts, cfg)[0]
    error = float(abs(y - (h + moe)).max())
    idle(role.world, opts.deadline)
    role.next_step(DONE)
    return rounds, {'counts': counts, 'cores': cores, 'error': error,
                    'scale': float(abs(moe).max()), 'baselines': [n for n, _ in variants],
                    'blas': ', '.join(blas), 'gpu': backend.device_name,
                    'gpus': backend.gpus_used}


def _baselines(backend, cores):
    """The baselines' variants: (name, context manager factory) pairs.  On
    NumPy with all of this rank's cores' BLAS threads, then with 1 (all
    cores first: OpenBLAS's extra threads spin a while after a call); on a
    GPU once."""
    if backend.is_gpu:
        return [('gpu', nullcontext)]
    return [(str(n), partial(threadpool_limits, limits=n, user_api='blas')) for n in (cores, 1)]


def _expert_rounds(role, layer):
    """An expert rank: its stages of the layer, once per step; per-step dicts."""
    rounds = []
    while True:
        idle(role.world, role.opts.deadline)
        if role.next_step() != MORE:
            break
        _ready(role.world, role.opts.deadline)
        before = _snapshot(role.timers)
        role.serve_layer(layer)
        rounds.append(_since(role.timers, before))
        compute, role.compute = role.compute, _echo
        role.serve_layer(layer)
        role.compute = compute
    for s in role.slots:
        s.wait()
    return rounds


def _echo(rows, *args, **kwargs):
    """An expert stage that computes nothing: the rows go back unchanged."""
    return rows


def idle(world, deadline_s):
    """Every rank waits here while rank 0 times its baselines: an Ibarrier
    tested every _IDLE_NAP_S seconds, so that idle ranks take almost no CPU
    from rank 0 (wait_all naps at most 1 ms: right for a pipeline, not here)."""
    req = world.Ibarrier()
    t0 = time.perf_counter()
    while not req.Test():
        if time.perf_counter() - t0 > deadline_s:
            raise WaitTimeout(f'no progress for {deadline_s:g} s waiting for the other '
                              'ranks between repeats; a peer rank is hung or dead')
        time.sleep(_IDLE_NAP_S)


def _ready(world, deadline_s):
    """A barrier through wait_all: every rank is awake and polling, as between
    two layers of a model, when rank 0 starts its clock."""
    wait_all([world.Ibarrier()], deadline_s, lambda: 'the other ranks before a repeat')


def _layer_pass(role, layer, hs):
    """The MoE layer on rank 0 as the layer loop runs it: dispatch every
    micro-batch, then combine each.  hs: list of float32 [T_m, d] (also the
    residual) -> float32 [T, d]."""
    handles = []
    for m, h in enumerate(hs):
        handles.append(role.moe.dispatch(h, m))
        role.dispatcher.poll()
    return role.backend.xp.concatenate([role.moe.combine(handle, h)
                                        for h, handle in zip(hs, handles)])


def _gemms(rows, counts, experts):
    """The bare matrix products of run_experts: each expert's rows through its
    matrices (hidden = x @ first, out = hidden @ down), no activation."""
    start = 0
    for w, c in zip(experts, counts.tolist()):
        x = rows[start:start + c]
        hidden = [x @ a for m, a in w.items() if m != 'down']
        _ = hidden[0] @ w['down']
        start += c


def _timed(r, key, backend, fn, *args):
    """fn(*args), its wall seconds until ``backend`` has done the work in
    r[key]; returns fn's result."""
    t0 = time.perf_counter()
    out = fn(*args)
    backend.synchronize()
    r[key] = time.perf_counter() - t0
    return out


def _snapshot(timers):
    s = timers.summary()            # device-timed spans included, once done
    return s['category_s'], s['stage_s'], time.process_time()


def _since(timers, before):
    """Seconds per timer category, per stage (keys 'stage NAME') and of
    CPU ('cpu') since the :func:`_snapshot` ``before``."""
    cats, stages, cpu = before
    now_cats, now_stages, now_cpu = _snapshot(timers)
    out = {c: now_cats.get(c, 0.0) - cats.get(c, 0.0) for c in _CATEGORIES}
    out['cpu'] = now_cpu - cpu
    out.update({f'stage {k}': v - stages.get(k, 0.0) for k, v in now_stages.items()})
    return out


def _medians(rounds):
    """{key: (median, min)} over the timed rounds."""
    return {k: (float(np.median([r[k] for r in rounds])), float(np.min([r[k] for r in rounds])))
            for k in rounds[0]}


# -------------------------------------------------------------- other load

def _machine_cpu_s():
    """CPU seconds every process of this machine has used so far, stolen time
    included (Linux /proc/stat); None elsewhere."""
    try:
        with open('/proc/stat') as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _, _, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf('SC_CLK_TCK')


def _others_share(machine0, ours, seconds, cores):
    """Share of the cores that other processes used since ``machine0`` (a
    :func:`_machine_cpu_s`), given our ranks' CPU seconds; None if unknown."""
    if machine0 is None:
        return None
    return max(0.0, _machine_cpu_s() - machine0 - ours) / (cores * seconds)


# -------------------------------------------------------------- report

def _print_table(opts, cfg, plan, s, rows):
    """Rank 0: the summary table; rows: per-rank {key: (median, min)}."""
    f, c = rows[0], s['cores']
    n_rows = int(s['counts'].sum())
    mb = 2 * n_rows * cfg.d_model * cfg.itemsize / 1e6
    print(f'mpimoe bench moe-layer: d_model {cfg.d_model}, {cfg.n_experts} experts x hidden '
          f'{cfg.d_expert} ({cfg.expert_kind}), top-{cfg.top_k}, {opts.tokens} tokens, '
          f'{opts.micro_batches} micro-batches, BF16 rows')
    where = (f'on {s["gpu"]} (CuPy; MPI gets {s["mode"]} rows)' if s['gpu'] else
             f'1 BLAS thread per rank, {c} cores ({s["blas"]})')
    print(f'  {plan.world_size} ranks: 1 front-end + {plan.n_expert_ranks} expert ranks '
          f'({plan.mode}), {where}; {opts.repeats} repeats after {opts.warmup} warm-up')
    print(f'  rows per expert: min {s["counts"].min()}, max {s["counts"].max()} '
          f'({n_rows} in all); {mb:.1f} MB over MPI per layer (dispatch + combine)')
    top = s['baselines'][0]
    on = 'on the GPU' if s['gpu'] else f'{c} threads'
    lines = [('distributed layer [s]', f['layer'], 4),
             ('tokens/s (min column: at the min time)',
              tuple(opts.tokens / t for t in f['layer']), 0),
             ('baselines, rank 0 alone, same rows per expert:', None, 0)]
    for name in s['baselines']:
        at = on if name == top else '1 thread'
        lines += [(f'  GEMMs only, {at} [s]', f[f'gemm_{name}'], 4),
                  (f'  expert stage, {at} [s]', f[f'stage_{name}'], 4)]
    lines += [(f'RATIO layer / GEMMs only ({on})', _ratio(f['layer'], f[f'gemm_{top}']), 3),
              (f'ratio layer / expert stage ({on})', _ratio(f['layer'], f[f'stage_{top}']), 3)]
    if 'gemm_1' in f:
        ideal = tuple(t / c for t in f['gemm_1'])
        lines.append((f'ratio layer / (GEMMs only, 1 thread / {c})', _ratio(f['layer'], ideal),
                      3))
    print(f'  {"":46s}{"median":>10s}{"min":>10s}')
    for label, pair, digits in lines:
        print(f'  {label:46s}' + ('' if pair is None else
                                  ''.join(f'{v:10.{digits}f}' for v in pair)))
    print(f'  check: max |layer - single-process moe_local| = {s["error"]:.3g}' +
          ('' if not s['gpu'] else f' (largest |MoE output| {s["scale"]:.3g}; cuBLAS may '
           'sum in another order for another number of rows)'))
    comm = f['echo'][0]
    comp = max(row.get('stage expert', (0.0,))[0] for row in rows[1:])
    overlap = (comm + comp - f['layer'][0]) / min(comm, comp) if min(comm, comp) > 0 else 0.0
    print(f'  overlap efficiency {overlap:.2f} = (T_comm {comm:.4f} + T_comp {comp:.4f} - '
          f'T_layer {f["layer"][0]:.4f}) / min(T_comm, T_comp), medians; T_comm: the layer '
          'with experts that echo their rows, T_comp: the slowest expert rank\'s expert stage'
          + _sharing(plan.world_size, s['gpus'] or c, 'GPUs' if s['gpus'] else 'cores'))
    print('  per rank, median seconds per layer (engine timers; cpu: this process)')
    print(f'  {"rank":>6s}  {"role":12s}' + ''.join(f'{k:>10s}' for k in _CATEGORIES + ('cpu',)))
    for r, row in enumerate(rows):
        role = 'front-end' if plan.is_frontend(r) else \
            'expert ' + ','.join(str(e) for _, e in plan.rank_experts(r))
        print(f'  {r:6d}  {role:12s}' +
              ''.join(f'{row[k][0]:10.4f}' for k in _CATEGORIES + ('cpu',)))
    for what, rs in (('front-end', rows[:1]), ('expert ranks (median)', rows[1:])):
        stages = sorted(k for k in rs[0] if k.startswith('stage ') and rs[0][k][0] > 0)
        print(f'  {what} stages [s]: ' + ', '.join(
            f'{k[6:]} {np.median([r[k][0] for r in rs]):.4f}' for k in stages))
    cpu = sum(row['cpu'][0] for row in rows)
    print(f'  CPU seconds of the layer, all ranks: {cpu:.4f} = {cpu / (c * f["layer"][0]):.0%} '
          f'of {c} cores x the median layer time')
    if s['others'] is not None:
        print(f'  other processes on this machine used {s["others"]:.0%} of its cores during '
              'the run' + ('' if s['others'] < _BUSY_SHARE else
                           ': WARNING, they bias the RATIO low (they take more from one '
                           'process than from P); rerun on an idle node'))
    print(f'  The RATIO divides by the GEMMs {"on the GPU" if s["gpu"] else f"on all {c} cores"}'
          f', which the {plan.world_size} ranks share; expert stage = moe.run_experts (GEMMs, '
          'activation, 16-bit rounding).')


def _sharing(ranks, units, what):
    """The overlap line's note when ranks share cores or GPUs, else ''."""
    if ranks <= units:
        return ''
    return f' ({ranks} ranks on {units} {what[:-1] if units == 1 else what} compete for them: ' \
        'a lower bound)'


def _write_calibration(path, cfg, s, f):
    """Rank 0: the measured GEMM rate as a `mpimoe plan --calibration` file:
    the expert GEMMs' FLOPs over their median time on all cores (achieved, so
    efficiency 1)."""
    flops = 2 * int(s['counts'].sum()) * cfg.expert_params
    rate = flops / f[f'gemm_{s["baselines"][0]}'][0] / 1e12
    write_json(path, {'gemm_tflops': rate, 'gemm_efficiency': 1.0})
    on = s['gpu'] or f'{s["cores"]} cores'
    print(f'  wrote {path}: gemm_tflops {rate:.4g} (expert GEMMs on {on}), gemm_efficiency 1')


def _ratio(a, b):
    """(ratio of the medians, ratio of the mins) of two (median, min) pairs."""
    return a[0] / b[0], a[1] / b[1]
