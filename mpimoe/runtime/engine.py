"""The distributed engine: ``mpimoe run`` on every rank.

Sets up what every rank needs (logging, backend, BLAS threads, the plan,
the MoE layers' communicators), has rank 0 check the input and output
before anyone loads weights, loads this rank's role -- a front-end
(mpimoe.runtime.frontend) or an expert rank (mpimoe.runtime.expert) -- and
runs it step by step under rank 0's control (mpimoe.runtime.role), then
gathers the run report (mpimoe.runtime.summary).  Any failure on any rank
ends the whole job (mpimoe.parallel.mpiutil.run_guarded).
"""

import contextlib
import logging
import os
import platform
import time

from mpimoe import __version__
from mpimoe.backends.backend import Backend, choose_backend
from mpimoe.backends.binding import sharing_problem
from mpimoe.errors import (ConfigError, DataError, Interrupted, IOFailure, MpimoeError, Stopped,
                           UsageError)
from mpimoe.model.frontend import FrontEnd
from mpimoe.model.tp_frontend import TPFrontEnd, read_shard
from mpimoe.parallel.mpiutil import MPI, local_rank, node_ids, run_guarded
from mpimoe.planning.text import rank_list as _ranks
from mpimoe.parallel.gpu_mpi import choose_mpi_gpu
from mpimoe.parallel.slots import LayerComms
from mpimoe.parallel.tp_group import TensorGroup
from mpimoe.runtime.expert import ExpertRank
from mpimoe.runtime.frontend import FrontEndRank
from mpimoe.runtime.metrics import Timers, write_trace
from mpimoe.runtime.role import collective
from mpimoe.runtime.signals import StopRequest
from mpimoe.runtime.summary import finish_report, timed_peak
from mpimoe.runtime.threads import apply_threads, rank_threads

__all__ = ['run_engine', 'layer_comms', 'select_backend']

log = logging.getLogger('mpimoe')


def run_engine(opts, comm=None):
    """``mpimoe run`` on every rank; any failure ends the whole job."""
    comm = comm or MPI.COMM_WORLD
    # every rank catches the signals from the start (Slurm and mpiexec send
    # them to all tasks); rank 0's decides, at the next round or step
    with StopRequest() as stop:
        return run_guarded(comm, _run_holding, opts, comm, stop)


def _run_holding(opts, world, stop):
    """_run, releasing what it holds (rank 0: the output's lock) on every way out."""
    with contextlib.ExitStack() as held:
        return _run(opts, world, stop, held)


def _setup_logging(opts, world):
    """Rank 0 logs to stderr at INFO, the others only warnings unless
    ``verbose``; with ``log_dir`` every rank also writes ``rank-NNNNN.log``.
    Collective: a log file that some rank cannot open (the directory is a
    file, or cannot be created or written) is one error for every rank."""
    rank = world.rank
    log.setLevel(logging.DEBUG)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    console = logging.StreamHandler()
    console.setLevel(logging.INFO if rank == 0 or opts.verbose else logging.WARNING)
    console.setFormatter(logging.Formatter(f'mpimoe[{rank}]: %(message)s'))
    log.addHandler(console)
    if not opts.log_dir:
        return
    problem = None
    try:
        os.makedirs(opts.log_dir, exist_ok=True)
        file = logging.FileHandler(os.path.join(opts.log_dir, f'rank-{rank:05d}.log'))
    except OSError as e:
        problem = f'--log-dir {opts.log_dir}: {e.strerror} (rank {rank}); choose a directory ' \
                  'every rank can create and write'
    problems = [p for p in world.allgather(problem) if p]
    if problems:
        if problem is None:
            file.close()
        raise collective(IOFailure(problems[0]))
    file.setFormatter(logging.Formatter('%(asctime)s %(message)s'))
    log.addHandler(file)


def _run(opts, world, stop, held):
    from mpimoe.checkpoint.weights import WeightFile
    from mpimoe.io.job import job_tokenizer
    from mpimoe.planning.placement import make_plan
    from mpimoe.planning.stats import load_stats
    _setup_logging(opts, world)
    backend, mode = select_backend(opts, world)
    threads = _size_threads(opts, world)
    timers = Timers(trace=bool(opts.trace), cuda=backend.cuda)
    t_start = time.perf_counter()
    with WeightFile(opts.weights) as wf:
        cfg = wf.config
        try:
            opts.validate()
            loads = load_stats(opts.stats, cfg) if opts.stats else None
            plan = make_plan(cfg, world.size, opts.placement, opts.frontends, loads=loads,
                             nodes=node_ids(world), replicas=opts.replicas, tp=opts.tp)
        except (UsageError, DataError) as e:
            raise collective(e)
        group = _tp_group(world, plan, backend, mode, opts, timers)
        # rank 0 checks input and output before anyone spends time loading
        with timers.span('open', 'io'):
            # every front-end detokenizes its sequences (text, stop strings)
            tokenizer = job_tokenizer(opts, wf) if plan.is_frontend(world.rank) else None
            io = _open_io(opts, plan, wf, held, tokenizer) if world.rank == 0 else None
        layers = layer_comms(world, plan)
        with timers.span('load', 'load'):
            role = _load_role(world, cfg, plan, opts, layers, wf, timers, backend, mode, io,
                              tokenizer, group)
    log.debug('rank %d on %s (node-local rank %d): %s', world.rank, platform.node(),
              local_rank(world).index, 'front-end' if plan.is_frontend(world.rank) else
              f'experts {plan.rank_experts(world.rank)}')
    rowtype = role.rowtype
    world.Barrier()
    timers.origin = time.perf_counter()
    groups = '' if plan.tp == 1 else f' in {plan.n_frontend_groups} groups of {plan.tp}'
    log.info(f'{plan.mode} placement, {world.size} ranks ({plan.n_frontends} front-ends'
             f'{groups}, {plan.n_expert_ranks} expert ranks), {opts.micro_batches} micro-batches, '
             f'plan {plan.plan_hash()}')
    stopped = None
    try:
        role.run(stop)
    except (Stopped, Interrupted) as e:       # every rank, at the same step: report first
        stopped = e
    finally:
        if opts.trace:
            _write_trace(opts, world, role)
    report = role.report()
    peak = timed_peak(opts, world, backend)
    reports = world.gather(report, root=0)
    if world.rank == 0:
        finish_report(opts, cfg, plan, world, reports, time.perf_counter() - t_start, peak,
                       _backend_report(backend, mode), threads, role.segment(stopped))
    for lc in layers.values():
        lc.free()
    rowtype.Free()
    if stopped is not None:
        raise stopped
    return 0


def _size_threads(opts, world):
    """Size and apply this rank's BLAS threads (mpimoe.runtime.threads), before the
    first GEMM; rank 0 logs the choice.  -> run.json's ``threads`` (rank 0),
    None elsewhere."""
    n, why = rank_threads(world, opts.threads)
    libraries = apply_threads(n)
    log.debug(f'rank {world.rank}: {n} BLAS threads ({why}; {", ".join(libraries) or "no BLAS"})')
    chosen = world.gather((n, why), root=0)                   # per rank: (threads, reason)
    if world.rank != 0:
        return None
    counts = sorted({c for c, _ in chosen})
    where = ' on node 0' if 'cores' in why else ''
    if len(counts) == 1:
        log.info(f'BLAS threads per rank: {n} ({why}{where})')
    else:
        log.info(f'BLAS threads per rank: {counts[0]} to {counts[-1]} (rank 0: {why}{where})')
    return {'per_rank': [c for c, _ in chosen], 'reasons': sorted({w for _, w in chosen}),
            'libraries': libraries}


def select_backend(opts, world):
    """The :class:`Backend` of ``--backend`` (the same on every rank, bound to
    this rank's GPU) and the ``--mpi-gpu`` mode (None on NumPy).

    Every rank probes; an error on any rank, or ranks that would pick
    different backends, is a collective ConfigError (one line from rank 0).
    """
    try:
        name, why = choose_backend(opts.backend)
        mine = ('', name)
    except MpimoeError as e:
        mine = (str(e), None)
    answers = world.allgather(mine)                        # per rank: (error, name)
    failed = [r for r, (error, _) in enumerate(answers) if error]
    if failed:
        where = '' if len(failed) == world.size else f' (on ranks {_ranks(failed)})'
        raise collective(ConfigError(answers[failed[0]][0] + where))
    names = sorted({n for _, n in answers})
    if len(names) > 1:
        by_name = '; '.join(
            f'{n} on ranks {_ranks([r for r, (_, a) in enumerate(answers) if a == n])}'
            for n in names)
        raise collective(ConfigError(
            f'--backend {opts.backend}: the ranks do not agree ({by_name}); make CuPy and a '
            'GPU visible to every rank, or pass --backend numpy'))
    log.info(f'backend: {name} ({why})')
    backend = Backend(name)
    _bind(backend, world)
    try:
        mode, why, warnings = choose_mpi_gpu(world, backend, opts.mpi_gpu, opts.deadline)
    except (ConfigError, UsageError) as e:          # every rank alike
        raise collective(e)
    if world.rank == 0:
        for warning in warnings:
            log.warning(warning)
        if mode is None and opts.mpi_gpu != 'auto':
            log.info(f'--mpi-gpu {opts.mpi_gpu} ignored: {why}')
        elif mode is not None:
            log.info(f'MPI gets {"device rows" if mode == "device" else "pinned host copies"} '
                     f'(--mpi-gpu {opts.mpi_gpu}; {why})')
    return backend, mode


def _bind(backend, world):
    """Bind every rank's GPU (the one mpimoe.backends.binding.bind_early made
    current, where the launcher named the node-local rank), check that it
    computes in BF16, and have rank 0 log the mapping and warn when ranks of
    a node share a GPU while others idle.  A failed check on any rank is a
    collective ConfigError naming the ranks."""
    local = local_rank(world)
    device = backend.bind(world.rank, local, log.debug)
    problem = backend.self_test()
    problems = world.allgather(problem)
    failed = [r for r, p in enumerate(problems) if p]
    if failed:
        raise collective(ConfigError(f'{problems[failed[0]]} (on ranks {_ranks(failed)})'))
    if not backend.is_gpu:
        return
    n = backend.xp.cuda.runtime.getDeviceCount()
    ranks = world.gather((platform.node(), local, device, n), root=0)
    if world.rank == 0:
        sources = ', '.join(sorted({lr.source for _, lr, _, _ in ranks}))
        log.info(f'GPU of each rank: {_ranks([d for _, _, d, _ in ranks])} '
                 f'(node-local ranks from {sources})')
        warning = sharing_problem(ranks)
        if warning:
            log.warning(warning)
        backend.gpus_used = len({(host, d) for host, _, d, _ in ranks})


def _backend_report(backend, mode):
    """run.json's ``backend``: name, --mpi-gpu mode and, on a GPU, CuPy's
    version, rank 0's device and the distinct GPUs the ranks use."""
    out = {'name': backend.name, 'mpi_gpu': mode}
    if backend.is_gpu:
        out.update(cupy=backend.xp.__version__, device=backend.device_name,
                   gpus_used=backend.gpus_used)
    return out


def _open_io(opts, plan, wf, held, tokenizer):
    """Rank 0: check the files the run writes, then open the input stream and
    the (maybe resumed) output writer, whose lock ``held`` (an ExitStack) releases."""
    from mpimoe.io.job import open_job
    _check_report_paths(opts)
    meta = {'producer': 'mpimoe run', 'mpimoe_version': __version__,
            'weights': str(opts.weights), 'input': str(opts.input),
            'max_new_tokens': opts.max_new_tokens, 'placement': plan.mode,
            'plan_hash': plan.plan_hash()}
    # the options that change results (bias balancing changes the routing)
    balance = 'off' if opts.balance == 'off' else \
        f'bias every {opts.balance_every} step {opts.balance_step} clip {opts.balance_clip}'
    stream, writer = open_job(opts, wf, meta, plan.n_frontend_groups, tokenizer=tokenizer,
                              balance=balance)
    held.callback(writer.close)
    if writer.written:
        log.info(f'resuming {opts.output}: {writer.written} of {len(stream)} sequences '
                 'already committed')
    return stream, writer


def _check_report_paths(opts):
    """Before anything is computed: ``--metrics`` and ``--trace DIR``'s
    trace.json can be written, exist only with ``--overwrite``, and are none of
    the run's inputs and outputs (not even with ``--overwrite``)."""
    from mpimoe.io.files import check_writable
    files = [('--weights', opts.weights), ('--input', opts.input), ('--output', opts.output)]
    if opts.metrics:
        check_writable(opts.metrics, '--metrics', opts.overwrite, files)
        files.append(('--metrics', opts.metrics))
    if opts.trace:
        if os.path.exists(opts.trace) and not os.path.isdir(opts.trace):
            raise DataError(f'--trace {opts.trace}: not a directory (trace.json is written '
                            'into it); choose a directory')
        trace = os.path.join(opts.trace, 'trace.json')
        # a directory that does not exist yet is created: check that it can be
        check_writable(trace if os.path.isdir(opts.trace) else opts.trace, '--trace',
                       opts.overwrite, files)


def _write_trace(opts, world, role):
    """Gather every rank's spans; rank 0 writes ``TRACE_DIR/trace.json``."""
    label = f'rank {world.rank} ({"front-end" if role.is_frontend else "expert"})'
    events = world.gather(role.timers.chrome_events(world.rank, label), root=0)
    if world.rank == 0:
        os.makedirs(opts.trace, exist_ok=True)
        path = os.path.join(opts.trace, 'trace.json')
        write_trace(path, [e for part in events for e in part])
        log.info(f'trace: {path} (open in https://ui.perfetto.dev)')


def layer_comms(world, plan):
    """LayerComms of every MoE layer (layer index in the model -> LayerComms)."""
    out = {}
    for m, layer in enumerate(plan.cfg.moe_layers):
        out[layer] = LayerComms(world, plan.layer_ranks(m), plan.dispatch_keys(m)[2])
    return out


def _tp_group(world, plan, backend, mode, opts, timers):
    """The TensorGroup of this front-end rank's TP group (collective over the
    world; None without --tp and on expert ranks)."""
    if plan.tp == 1:
        return None
    mine = plan.is_frontend(world.rank)
    comm = world.Split(world.rank // plan.tp if mine else MPI.UNDEFINED, world.rank)
    return TensorGroup(comm, backend, mode, opts.deadline, timers) if mine else None


def _load_role(world, cfg, plan, opts, layers, wf, timers, backend, mode, io=None,
               tokenizer=None, group=None):
    """This rank's role, its weights read from ``wf`` (WeightFile) onto
    ``backend`` (mpimoe.backends.backend.Backend.weights), its MPI buffers for ``mode``
    (--mpi-gpu); ``io`` (rank 0): the input stream and output writer;
    ``tokenizer``: a front-end's TextTokenizer or None; ``group``: its TP
    group (mpimoe.parallel.tp_group.TensorGroup) or None."""
    args = (world, cfg, plan, opts, layers, timers)
    if plan.is_frontend(world.rank):
        if group is None:
            front = FrontEnd(cfg, backend.weights(wf.read_nonexpert()))
        else:
            front = TPFrontEnd(cfg, backend.weights(read_shard(wf, group.rank, group.size)),
                               group)
        return FrontEndRank(*args, front, io, backend=backend, mode=mode, tokenizer=tokenizer,
                            group=group)
    hosted = {}   # layer index in the model -> expert weight dicts in slot order
    for layer, e in sorted(plan.rank_experts(world.rank)):
        hosted.setdefault(layer, []).append(backend.weights(wf.read_expert(layer, e)))
    return ExpertRank(*args, hosted, backend=backend, mode=mode)
