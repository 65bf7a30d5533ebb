"""``mpimoe bench moe-layer``: one MoE layer over P ranks against its expert
GEMMs alone, timed in the same job.

The layer is the engine's own: rank 0, the one front-end, runs the
mpimoe.moe.layer.MoELayer with the MPI dispatcher (stages route, permute,
dispatch, combine, unpermute), the others mpimoe.runtime.expert.ExpertRank
(stage expert), on weights built in memory: a one-layer model whose experts
are random BF16-rounded FP32 matrices (as the engine holds them on CPU), and
random activations [T, d].  Each repeat is one *step* of the engine's
control protocol (mpimoe.runtime.role):

1. baselines on rank 0 while the other ranks sleep (:func:`idle`): the bare
   GEMMs of every expert (``x @ up``, ``@ down``) on the rows the router sends
   it, one block per expert, and the expert stage
   :func:`mpimoe.moe.experts.run_experts` (GEMMs, activation, 16-bit rounding) on
   the same rows; each with as many BLAS threads as rank 0 has cores, and
   with 1;
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
overlap: run it with a core per rank (``mpiexec -n 2`` on 2 cores).

The RATIO divides the layer time by the GEMMs with all cores' threads: the P
ranks share those same cores, so the ratio is the price of routing, packing,
MPI, the activation and oversubscribing the cores.  One node only.
"""

import os
import time
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from mpimoe.backends.backend import round16
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
from mpimoe.runtime.engine import layer_comms
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

    def validate(self):
        """ConfigError on options that cannot work."""
        for name, low in (('tokens', 1), ('repeats', 1), ('warmup', 0), ('seed', 0)):
            if getattr(self, name) < low:
                raise ConfigError(f'--{name} {getattr(self, name)}: must be >= {low}')

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
    layers = layer_comms(world, plan)
    layer = cfg.moe_layers[0]
    t0, cpu0, machine0 = time.perf_counter(), time.process_time(), _machine_cpu_s()
    role = _make_role(world, cfg, plan, run_opts, layers, opts.seed)
    if role.is_frontend:
        rounds, summary = _frontend_rounds(role, layer, opts, blas)
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

def _make_role(world, cfg, plan, run_opts, layers, seed):
    """Rank 0: a Role with the layer's MoELayer (``role.moe``) over the MPI
    dispatcher; the others: an ExpertRank, on weights built in memory."""
    layer = cfg.moe_layers[0]
    if plan.is_frontend(world.rank):
        role = Role(world, cfg, plan, run_opts, layers, Timers())
        keys = tuple(map(np.asarray, plan.dispatch_keys(0)[:2]))
        role.dispatcher = MPIDispatcher(cfg, role.slots, layers, {layer: keys}, world.rank,
                                        role.timers)
        router = _random((cfg.d_model, cfg.n_experts), seed, 1 << 20)
        role.moe = MoELayer(layer, router, cfg, role.dispatcher, role.timers)
        role.is_frontend = True
        return role
    hosted = [_expert(cfg, layer, e, seed) for _, e in plan.rank_experts(world.rank)]
    return ExpertRank(world, cfg, plan, run_opts, layers, Timers(), {layer: hosted})


def _random(shape, seed, *key):
    """Seeded N(0, 1/shape[0]) float32 values, BF16-rounded (never all zero)."""
    rng = np.random.default_rng([seed, *key])
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= np.float32(shape[0] ** -0.5)
    return round16(x, 'bfloat16')


def _expert(cfg, layer, e, seed):
    """Expert e of ``layer``: dict matrix name -> float32 [d, h] or [h, d]."""
    d, h = cfg.d_model, cfg.d_expert
    return {m: _random((h, d) if m == 'down' else (d, h), seed, layer, e, i)
            for i, m in enumerate(cfg.expert_matrices)}


# -------------------------------------------------------------- rounds

def _frontend_rounds(role, layer, opts, blas):
    """Rank 0: per step, baselines then the distributed layer (blas: the
    BLAS libraries, for the table).

    Returns (per-step dicts of seconds, summary dict for the table).
    """
    cfg = role.cfg
    experts = [_expert(cfg, layer, e, opts.seed) for e in range(cfg.n_experts)]
    h = np.random.default_rng([opts.seed, 2]).standard_normal(
        (opts.tokens, cfg.d_model), dtype=np.float32)                   # [T, d]
    chosen, _ = route(h, role.moe.router, cfg.top_k)              # [T, k]
    rows, _, counts = permute(round16(h, cfg.dtype), chosen, cfg.n_experts)
    hs = np.array_split(h, opts.micro_batches)
    cores = len(os.sched_getaffinity(0))
    rounds = []
    for _ in range(opts.warmup + opts.repeats):
        r = {}
        # all cores first: OpenBLAS's extra thread spins a while after a call
        for n in (cores, 1):
            with threadpool_limits(limits=n, user_api='blas'):
                _timed(r, f'gemm_{n}', _gemms, rows, counts, experts)
                _timed(r, f'stage_{n}', run_experts, rows, counts, experts, cfg.expert_kind,
                       cfg.dtype)
        idle(role.world, opts.deadline)
        role.next_step(MORE)
        _ready(role.world, opts.deadline)
        before = _snapshot(role.timers)
        y = _timed(r, 'layer', _layer_pass, role, layer, hs)
        r.update(_since(role.timers, before))
        _timed(r, 'echo', _layer_pass, role, layer, hs)
        rounds.append(r)
    # at this rank's BLAS threads, which the expert ranks have too: OpenBLAS
    # sums in another order on another number of threads
    error = float(np.abs(y - (h + moe_local(h, role.moe.router, experts, cfg)[0])).max())
    idle(role.world, opts.deadline)
    role.next_step(DONE)
    return rounds, {'counts': counts, 'cores': cores, 'error': error,
                    'blas': ', '.join(blas)}


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
            raise WaitTimeout(f'no progress for {deadline_s:.0f} s waiting for the other '
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
    return np.concatenate([role.moe.combine(handle, h) for h, handle in zip(hs, handles)])


def _gemms(rows, counts, experts):
    """The bare matrix products of run_experts: each expert's rows through its
    matrices (hidden = x @ first, out = hidden @ down), no activation."""
    start = 0
    for w, c in zip(experts, counts.tolist()):
        x = rows[start:start + c]
        hidden = [x @ a for m, a in w.items() if m != 'down']
        _ = hidden[0] @ w['down']
        start += c


def _timed(r, key, fn, *args):
    """fn(*args), its wall seconds in r[key]; returns fn's result."""
    t0 = time.perf_counter()
    out = fn(*args)
    r[key] = time.perf_counter() - t0
    return out


def _snapshot(timers):
    return dict(timers.by_category), dict(timers.by_stage), time.process_time()


def _since(timers, before):
    """Seconds per timer category, per stage (keys 'stage NAME') and of
    CPU ('cpu') since the :func:`_snapshot` ``before``."""
    cats, stages, cpu = before
    out = {c: timers.by_category.get(c, 0.0) - cats.get(c, 0.0) for c in _CATEGORIES}
    out['cpu'] = time.process_time() - cpu
    out.update({f'stage {k}': v - stages.get(k, 0.0) for k, v in timers.by_stage.items()})
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
    print(f'  {plan.world_size} ranks: 1 front-end + {plan.n_expert_ranks} expert ranks '
          f'({plan.mode}), 1 BLAS thread per rank, {c} cores ({s["blas"]}); '
          f'{opts.repeats} repeats after {opts.warmup} warm-up')
    print(f'  rows per expert: min {s["counts"].min()}, max {s["counts"].max()} '
          f'({n_rows} in all); {mb:.1f} MB over MPI per layer (dispatch + combine)')
    ideal = tuple(t / c for t in f['gemm_1'])
    lines = [('distributed layer [s]', f['layer'], 4),
             ('tokens/s (min column: at the min time)',
              tuple(opts.tokens / t for t in f['layer']), 0),
             ('baselines, rank 0 alone, same rows per expert:', None, 0),
             (f'  GEMMs only, {c} threads [s]', f[f'gemm_{c}'], 4),
             ('  GEMMs only, 1 thread [s]', f['gemm_1'], 4),
             (f'  expert stage, {c} threads [s]', f[f'stage_{c}'], 4),
             ('  expert stage, 1 thread [s]', f['stage_1'], 4),
             (f'RATIO layer / GEMMs only ({c} threads)', _ratio(f['layer'], f[f'gemm_{c}']), 3),
             (f'ratio layer / expert stage ({c} threads)',
              _ratio(f['layer'], f[f'stage_{c}']), 3),
             (f'ratio layer / (GEMMs only, 1 thread / {c})', _ratio(f['layer'], ideal), 3)]
    print(f'  {"":46s}{"median":>10s}{"min":>10s}')
    for label, pair, digits in lines:
        print(f'  {label:46s}' + ('' if pair is None else
                                  ''.join(f'{v:10.{digits}f}' for v in pair)))
    print(f'  check: max |layer - single-process moe_local| = {s["error"]:.3g}')
    comm = f['echo'][0]
    comp = max(row.get('stage expert', (0.0,))[0] for row in rows[1:])
    overlap = (comm + comp - f['layer'][0]) / min(comm, comp) if min(comm, comp) > 0 else 0.0
    print(f'  overlap efficiency {overlap:.2f} = (T_comm {comm:.4f} + T_comp {comp:.4f} - '
          f'T_layer {f["layer"][0]:.4f}) / min(T_comm, T_comp), medians; T_comm: the layer '
          'with experts that echo their rows, T_comp: the slowest expert rank\'s expert stage'
          + ('' if plan.world_size <= c else
             f' ({plan.world_size} ranks on {c} cores compete for them: a lower bound)'))
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
    print(f'  The RATIO divides by the GEMMs on all {c} cores, the cores the {plan.world_size} '
          'ranks share; expert stage = moe.run_experts (GEMMs, activation, 16-bit rounding).')


def _write_calibration(path, cfg, s, f):
    """Rank 0: the measured GEMM rate as a `mpimoe plan --calibration` file:
    the expert GEMMs' FLOPs over their median time on all cores (achieved, so
    efficiency 1)."""
    flops = 2 * int(s['counts'].sum()) * cfg.expert_params
    rate = flops / f[f'gemm_{s["cores"]}'][0] / 1e12
    write_json(path, {'gemm_tflops': rate, 'gemm_efficiency': 1.0})
    print(f'  wrote {path}: gemm_tflops {rate:.4g} (expert GEMMs on {s["cores"]} cores), '
          'gemm_efficiency 1')


def _ratio(a, b):
    """(ratio of the medians, ratio of the mins) of two (median, min) pairs."""
    return a[0] / b[0], a[1] / b[1]
