"""The distributed engine: front-end and expert-rank loops, micro-batch pipeline.

Front-ends (ranks [0, F)) run everything but the experts; expert ranks run
their experts on whatever rows arrive.  A front-end splits each forward pass
into M micro-batches and walks layer by layer; at an MoE layer it routes and
permutes micro-batch m, posts its dispatch and moves on to micro-batch m+1, so
the dispatch of m+1 travels while an expert computes m, and the combine of m
travels back while m+1 computes.  A micro-batch's combine is collected just
before its next attention block.

Work comes in *rounds*: rank 0 streams the input in batches of at most
``batch_tokens`` prompt tokens and, each round, hands one batch to each
front-end, which prefills it and decodes ``max_new_tokens`` greedily; rank 0
gathers the round's results and commits them as one chunk of the output.
A round is ``max(1, max_new_tokens)`` forward passes (*steps*) on every rank.

Control: before each round and before each step rank 0 tells every rank, by
one small Ibcast on ``control``, what follows: another round or step (MORE),
the end (DONE, before a round), or a stop (STOP, with the number of the
signal that asked for it).  On a stop every rank leaves at that boundary: the
round in flight is abandoned, every committed round stays, and the job exits
75 (SIGTERM/SIGUSR1) or 130 (SIGINT); a rerun resumes after the last
committed round.
"""

import contextlib
import itertools
import json
import logging
import os
import platform
import time
import zlib
from dataclasses import asdict, dataclass

import numpy as np

from mpimoe import __version__
from mpimoe.backends.backend import (DTYPES, Backend, choose_backend, from_words, mpi_cuda_support,
                            mpi_gpu_mode, storage_dtype, to_numpy, to_words)
from mpimoe.planning.balance import BIAS_RULE, max_over_mean, update_bias
from mpimoe.parallel.slots import LayerComms, Slot
from mpimoe.planning.costmodel import pass_flops
from mpimoe.errors import ConfigError, DataError, Interrupted, MpimoeError, Stopped, UsageError
from mpimoe.model.generate import generate
from mpimoe.io.files import write_json
from mpimoe.runtime.metrics import Timers, write_trace
from mpimoe.model.frontend import FrontEnd
from mpimoe.moe.experts import permute, run_experts, unpermute
from mpimoe.parallel.mpiutil import MPI, local_rank, node_ids, run_guarded, wait_all
from mpimoe.parallel.mpiutil import rank_list as _ranks
from mpimoe.runtime.progress import EVERY_S, Progress
from mpimoe.moe.router import expert_counts, route, spread_copies
from mpimoe.runtime.signals import StopRequest, stop_error
from mpimoe.runtime.threads import apply_threads, rank_threads

__all__ = ['RunOptions', 'run_engine']

#: rows an expert computes between two polls of the transfers in flight
POLL_ROWS = 1024

#: fewest rows per expert (on average) worth a micro-batch of their own: each
#: micro-batch costs every layer its per-call overheads and every expert GEMM
#: one more pass over its weights (BLAS packs them per call), which a few rows
#: do not repay: small decode passes fill fewer micro-batches
MIN_EXPERT_ROWS = 8

#: what rank 0 says on ``control`` before each round and each step
DONE, MORE, STOP = 0, 1, 2

log = logging.getLogger('mpimoe')


@dataclass(frozen=True)
class RunOptions:
    """Options of ``mpimoe run`` (see ``mpimoe run --help``)."""
    weights: str
    input: str
    output: str
    placement: str = 'per-layer'
    frontends: int = None
    micro_batches: int = 2
    max_new_tokens: int = 0
    save_logits: bool = False
    metrics: str = None
    overwrite: bool = False
    batch_tokens: int = 4096
    deadline: float = 600.0
    trace: str = None
    log_dir: str = None
    verbose: bool = False
    progress_every: float = EVERY_S
    stats: str = None
    replicas: int = 0
    balance: str = 'off'
    balance_every: int = 1
    balance_step: float = 0.01
    balance_clip: float = 0.5
    backend: str = 'auto'
    mpi_gpu: str = 'auto'
    threads: int = None

    def validate(self):
        """ConfigError on options that cannot work."""
        if self.balance not in ('off', 'bias'):
            raise ConfigError(f'--balance {self.balance}: choose off or bias')
        if self.balance_every < 1:
            raise ConfigError(f'--balance-every {self.balance_every}: must be >= 1')
        if not (self.balance_step > 0 and self.balance_clip > 0):
            raise ConfigError(f'--balance-step {self.balance_step}, --balance-clip '
                              f'{self.balance_clip}: both must be > 0')
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f'--threads {self.threads}: must be >= 1')
        if self.micro_batches < 1:
            raise ConfigError(f'--micro-batches {self.micro_batches}: must be >= 1')
        if self.max_new_tokens < 0:
            raise ConfigError(f'--max-new-tokens {self.max_new_tokens}: must be >= 0')
        if self.batch_tokens < 1:
            raise ConfigError(f'--batch-tokens {self.batch_tokens}: must be >= 1')
        if not self.deadline > 0:
            raise ConfigError(f'--deadline {self.deadline}: must be > 0')
        if not self.progress_every > 0:
            raise ConfigError(f'--progress-every {self.progress_every}: must be > 0')


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


def _collective(e):
    """Mark an error that every rank raises alike (printed once, by rank 0)."""
    e.collective = True
    return e


def _setup_logging(opts, rank):
    """Rank 0 logs to stderr at INFO, the others only warnings unless
    ``verbose``; with ``log_dir`` every rank also writes ``rank-NNNNN.log``."""
    log.setLevel(logging.DEBUG)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    console = logging.StreamHandler()
    console.setLevel(logging.INFO if rank == 0 or opts.verbose else logging.WARNING)
    console.setFormatter(logging.Formatter(f'mpimoe[{rank}]: %(message)s'))
    log.addHandler(console)
    if opts.log_dir:
        os.makedirs(opts.log_dir, exist_ok=True)
        file = logging.FileHandler(os.path.join(opts.log_dir, f'rank-{rank:05d}.log'))
        file.setFormatter(logging.Formatter('%(asctime)s %(message)s'))
        log.addHandler(file)


def _run(opts, world, stop, held):
    from mpimoe.checkpoint.weights import WeightFile
    from mpimoe.planning.placement import make_plan
    from mpimoe.planning.stats import load_stats
    _setup_logging(opts, world.rank)
    backend, mode = _select_backend(opts, world)
    threads = _size_threads(opts, world)
    timers = Timers(trace=bool(opts.trace))
    t_start = time.perf_counter()
    with WeightFile(opts.weights) as wf:
        cfg = wf.config
        try:
            opts.validate()
            loads = load_stats(opts.stats, cfg) if opts.stats else None
            plan = make_plan(cfg, world.size, opts.placement, opts.frontends, loads=loads,
                             nodes=node_ids(world), replicas=opts.replicas)
        except (UsageError, DataError) as e:
            raise _collective(e)
        # rank 0 checks input and output before anyone spends time loading
        with timers.span('open', 'io'):
            io = _open_io(opts, plan, wf, held) if world.rank == 0 else None
        layers = _layer_comms(world, plan)
        with timers.span('load', 'load'):
            role = _load_role(world, cfg, plan, opts, layers, wf, timers, backend, mode, io)
    log.debug('rank %d on %s (node-local rank %d): %s', world.rank, platform.node(),
              local_rank(world), 'front-end' if plan.is_frontend(world.rank) else
              f'experts {plan.rank_experts(world.rank)}')
    rowtype = role.rowtype
    world.Barrier()
    timers.origin = time.perf_counter()
    log.info(f'{plan.mode} placement, {world.size} ranks ({plan.n_frontends} front-ends, '
             f'{plan.n_expert_ranks} expert ranks), {opts.micro_batches} micro-batches, '
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
    peak = _timed_peak(opts, world, backend)
    reports = world.gather(report, root=0)
    if world.rank == 0:
        _finish_report(opts, cfg, plan, world, reports, time.perf_counter() - t_start, peak,
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


def _select_backend(opts, world):
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
        raise _collective(ConfigError(answers[failed[0]][0] + where))
    names = sorted({n for _, n in answers})
    if len(names) > 1:
        by_name = '; '.join(
            f'{n} on ranks {_ranks([r for r, (_, a) in enumerate(answers) if a == n])}'
            for n in names)
        raise _collective(ConfigError(
            f'--backend {opts.backend}: the ranks do not agree ({by_name}); make CuPy and a '
            'GPU visible to every rank, or pass --backend numpy'))
    log.info(f'backend: {name} ({why})')
    backend = Backend(name)
    device = backend.bind(world.rank, local_rank(world), log.debug)
    devices = world.gather(device, root=0)
    if backend.is_gpu and world.rank == 0:
        log.info(f'GPU of each rank (node-local): {devices}')
    try:
        mode = mpi_gpu_mode(opts.mpi_gpu, name, mpi_cuda_support(MPI))
    except UsageError as e:
        raise _collective(e)
    if mode is None and opts.mpi_gpu != 'auto':
        log.info(f'--mpi-gpu {opts.mpi_gpu} ignored: the numpy backend hands host arrays to MPI')
    elif mode is not None:
        log.info(f'MPI gets {"device rows" if mode == "device" else "pinned host copies"} '
                 f'(--mpi-gpu {opts.mpi_gpu})')
    return backend, mode


def _backend_report(backend, mode):
    """run.json's ``backend``: name, --mpi-gpu mode and, on a GPU, CuPy's
    version and rank 0's device."""
    out = {'name': backend.name, 'mpi_gpu': mode}
    if backend.is_gpu:
        props = backend.xp.cuda.runtime.getDeviceProperties(backend.device)
        name = props['name']
        out.update(cupy=backend.xp.__version__,
                   device=name.decode() if isinstance(name, bytes) else name)
    return out


def _open_io(opts, plan, wf, held):
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
    stream, writer = open_job(opts.input, opts.output, wf, opts.save_logits, meta,
                              opts.overwrite, max_new_tokens=opts.max_new_tokens,
                              batch_tokens=opts.batch_tokens, balance=balance)
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


def _layer_comms(world, plan):
    """LayerComms of every MoE layer (layer index in the model -> LayerComms)."""
    out = {}
    for m, layer in enumerate(plan.cfg.moe_layers):
        out[layer] = LayerComms(world, plan.layer_ranks(m), plan.dispatch_keys(m)[2])
    return out


def _load_role(world, cfg, plan, opts, layers, wf, timers, backend, mode, io=None):
    """This rank's role, its weights read from ``wf`` (WeightFile) onto
    ``backend`` (mpimoe.backends.backend.Backend.weights), its MPI buffers for ``mode``
    (--mpi-gpu); ``io`` (rank 0): the input stream and output writer."""
    args = (world, cfg, plan, opts, layers, timers)
    if plan.is_frontend(world.rank):
        front = FrontEnd(cfg, backend.weights(wf.read_nonexpert()))
        return _FrontEndRank(*args, front, io, backend=backend, mode=mode)
    hosted = {}   # layer index in the model -> expert weight dicts in slot order
    for layer, e in sorted(plan.rank_experts(world.rank)):
        hosted.setdefault(layer, []).append(backend.weights(wf.read_expert(layer, e)))
    return _ExpertRank(*args, hosted, backend=backend, mode=mode)


class _Role:
    """What front-ends and expert ranks share: slots, control, timers."""

    def __init__(self, world, cfg, plan, opts, layers, timers, backend=None, mode=None):
        """backend: mpimoe.backends.backend.Backend (default NumPy); mode: the --mpi-gpu
        mode (None on NumPy)."""
        self.world, self.cfg, self.plan, self.opts = world, cfg, plan, opts
        self.layers, self.timers = layers, timers
        self.backend = backend or Backend('numpy')
        self.rowtype = MPI.UINT16_T.Create_contiguous(cfg.d_model).Commit()
        self.slots = [Slot(cfg.d_model, self.rowtype, opts.deadline, backend, mode)
                      for _ in range(opts.micro_batches)]
        self.control = world.Dup()
        self.stop = None            # the StopRequest of run(); rank 0's decides
        self.fault = _parse_fault(os.environ.get('MPIMOE_FAULT'), world.rank)

    def maybe_fail(self, stage):
        """Test hook: MPIMOE_FAULT=STAGE:RANK raises here on that rank;
        MPIMOE_FAULT=hang:RANK hangs that rank in its first expert stage."""
        while self.fault == 'hang' and stage == 'expert':
            time.sleep(60)
        if self.fault == stage:
            raise RuntimeError(f'injected fault (MPIMOE_FAULT) in stage {stage}')

    def next_round(self, what=DONE):
        """Rank 0 says whether a round follows (``what``: MORE or DONE); every
        rank learns it (returned).  A stop requested on rank 0 turns MORE into
        STOP: then every rank raises (see :meth:`_control`)."""
        return self._control(what, 'the next round')

    def next_step(self):
        """Before each forward pass: rank 0 says MORE, or STOP once a stop was
        requested there; every rank then raises at this same step."""
        return self._control(MORE, 'the next step')

    def _control(self, what, awaited):
        """Broadcast rank 0's [what, signal number] on ``control``; ``what`` (DONE
        or MORE) on every rank.  On STOP every rank raises Stopped (exit 75) or
        Interrupted (SIGINT, 130), said once by rank 0 with what is committed."""
        signum = (self.stop.signum if self.stop and self.world.rank == 0 else None) or 0
        message = np.array([STOP if signum and what == MORE else what, signum], dtype=np.int64)
        req = self.control.Ibcast(message, root=0)
        with self.timers.span('control', 'wait'):
            wait_all([req], self.opts.deadline, lambda: f'{awaited} from rank 0')
        if message[0] == STOP:
            raise _collective(stop_error(int(message[1]), self.stop_detail()))
        return int(message[0])

    def stop_detail(self):
        """What a stopped job keeps, for the stop message (rank 0 says it)."""
        return 'the committed rounds stay; rerun the same command to resume'

    def segment(self, stopped):
        """run.json's ``segment`` (rank 0): how this run, one segment of a job
        that reruns to resume, ended (``stopped``: the Stopped/Interrupted
        raised, or None) and how much of the output is committed."""
        return {'outcome': 'complete' if stopped is None else
                'interrupted' if isinstance(stopped, Interrupted) else 'stopped',
                'signal': self.stop.name if self.stop else None}

    def report(self):
        return {'rank': self.world.rank, 'host': platform.node(),
                'local_rank': local_rank(self.world), **self.timers.summary()}


class _FrontEndRank(_Role):
    """A front-end: runs all non-expert layers on the batches rank 0 hands it;
    rank 0 also reads the input and writes the output."""

    is_frontend = True

    def __init__(self, world, cfg, plan, opts, layers, timers, front, io=None, backend=None,
                 mode=None):
        """front: the :class:`~mpimoe.model.layers.FrontEnd` (weights on the backend);
        io (rank 0 only): (InputStream, OutputWriter)."""
        super().__init__(world, cfg, plan, opts, layers, timers, backend, mode)
        backend = self.backend
        self.front_comm = world.Split(0, world.rank)
        self.front = front
        self.stream, self.writer = io or (None, None)
        self.counts = np.zeros((cfg.n_moe_layers, cfg.n_experts), dtype=np.int64)
        self.step_counts = []           # rank 0: per pass, [n_moe_layers, E]
        # layer -> (permute keys int64 [E, copies], copies int64 [E]) (replicas), on the backend
        self.copy_keys = {layer: tuple(map(backend.asarray, plan.dispatch_keys(m)[:2]))
                          for m, layer in enumerate(cfg.moe_layers)}
        # gate bias [n_moe_layers, E] (--balance bias), the same on every front-end;
        # updated on the host, routed with on the backend (the same array on NumPy)
        self.bias = np.zeros((cfg.n_moe_layers, cfg.n_experts), np.float32) \
            if opts.balance == 'bias' else None
        self.device_bias = None if self.bias is None else backend.asarray(self.bias)
        self.bytes_sent = np.zeros(cfg.n_moe_layers, dtype=np.int64)
        # per pass: (seconds, new tokens, FLOPs)
        self.passes = {'prefill': [], 'decode': []}

    # -- the pipelined forward pass -----------------------------------------

    def forward(self, tokens, cache, seqs, ntok):
        """One pass of the model over a packed batch, micro-batched.

        tokens: int [T]; seqs, ntok: int [B] (host) -> logits float32 [B, vocab]
        (host).
        """
        fe, cfg = self.front, self.cfg
        t0 = time.perf_counter()
        # causal query-key pairs of this pass (for the FLOP count)
        pairs = int(np.sum(ntok * cache.length[seqs] + ntok * (ntok + 1) // 2))
        # at least MIN_EXPERT_ROWS rows per expert in each micro-batch
        mbs = _micro_batches(ntok, len(self.slots), MIN_EXPERT_ROWS * cfg.n_experts / cfg.top_k)
        bounds = np.concatenate([[0], np.cumsum(ntok)])
        xs = [fe.embed(tokens[bounds[a]:bounds[b]]) for a, b in mbs]
        pending = [None] * len(mbs)
        for i in range(cfg.n_layers):
            for m, (a, b) in enumerate(mbs):
                if pending[m] is not None:
                    xs[m] = self._collect(m, xs[m], pending[m])
                    pending[m] = None
                if a == b:            # an empty micro-batch only posts its collectives
                    if i >= cfg.n_dense_layers:
                        pending[m] = self._dispatch_empty(i, m)
                    continue
                with self.timers.span('attention', 'compute', layer=i, mb=m):
                    self.maybe_fail('attention')
                    xs[m] = fe.attention_block(i, xs[m], cache, seqs[a:b], ntok[a:b])
                    h = fe.ffn_input(i, xs[m])
                if i < cfg.n_dense_layers:
                    with self.timers.span('dense', 'compute', layer=i, mb=m):
                        xs[m] = xs[m] + fe.dense_ffn(i, h)
                else:
                    pending[m] = self._dispatch(i, m, h)
                self._poll()
        for m in range(len(mbs)):
            if pending[m] is not None:
                xs[m] = self._collect(m, xs[m], pending[m])
        cache.advance(seqs, ntok)
        xp = self.backend.xp
        x = xp.concatenate(xs) if xs else xp.zeros((0, cfg.d_model), np.float32)
        with self.timers.span('head', 'compute'):
            logits = to_numpy(fe.logits(x[xp.asarray(np.cumsum(ntok) - 1)]))
        tokens = int(np.sum(ntok))
        flops = pass_flops(cfg, tokens, pairs, tokens * cfg.top_k * cfg.n_moe_layers, len(ntok))
        self._record_pass(time.perf_counter() - t0, tokens, flops)
        return logits

    def _dispatch(self, i, m, h):
        """Stages route, permute, dispatch of layer i, micro-batch m.

        h: float32 [T, d] (backend) -> pending state (layer, order, weights,
        rows) for _collect.
        """
        cfg, lc, slot = self.cfg, self.layers[i], self.slots[m]
        with self.timers.span('route', 'compute', layer=i, mb=m):
            bias = None if self.bias is None else self.device_bias[i - cfg.n_dense_layers]
            chosen, weights = route(h, self.front.router[i], cfg.top_k, bias)  # [T, k]
            self.counts[i - cfg.n_dense_layers] += to_numpy(expert_counts(chosen, cfg.n_experts))
            keys, copies = self.copy_keys[i]
            dest = keys[chosen, spread_copies(chosen, copies, self.world.rank)]  # [T, k]
        with self.timers.span('permute', 'pack', layer=i, mb=m):
            words = to_words(h.astype(storage_dtype(cfg.dtype)))             # [T, d] uint16
            n = chosen.size
            slot.wait()
            _, order, counts = permute(words, dest, lc.size * lc.k, out=slot.out.view(n))
        with self.timers.span('dispatch', 'pack', layer=i, mb=m):
            slot.frontend_start(lc, to_numpy(counts).reshape(lc.size, lc.k).astype(np.int32), n)
        self.bytes_sent[i - cfg.n_dense_layers] += 2 * n * cfg.d_model * cfg.itemsize
        return i, order, weights, n

    def _dispatch_empty(self, i, m):
        """Stage dispatch of layer i for an empty micro-batch m: the collectives
        every rank of the layer expects, with no rows."""
        lc, slot = self.layers[i], self.slots[m]
        slot.wait()
        slot.frontend_start(lc, np.zeros((lc.size, lc.k), np.int32), 0)
        return i, None, None, 0

    def _collect(self, m, x, pending):
        """Stages combine (wait) and unpermute: x + the MoE output of micro-batch m."""
        i, order, weights, n = pending
        slot = self.slots[m]
        with self.timers.span('combine', 'wait', layer=i, mb=m):
            slot.wait(self._poll)
        if not n:
            return x
        with self.timers.span('unpermute', 'pack', layer=i, mb=m):
            out = unpermute(from_words(slot.received(n), self.cfg.dtype), order, weights)
            out += x
            return out

    def _poll(self):
        for s in self.slots:
            s.test()

    def _record_pass(self, seconds, tokens, flops):
        """Keep the pass's time, tokens and FLOPs; rank 0 sums the expert counts."""
        self.passes[self._pass_kind].append((seconds, tokens, flops))
        total = np.zeros_like(self.counts) if self.world.rank == 0 else None
        self.front_comm.Reduce(self.counts, total, op=MPI.SUM, root=0)
        if self.world.rank == 0:
            self.step_counts.append(total)
        self.counts[:] = 0
        self._update_bias()

    def _update_bias(self):
        """With --balance bias, every balance_every passes: rank 0 moves the gate
        bias by the loads of those passes (mpimoe.planning.balance.update_bias) and every
        front-end receives it, so all route alike from the next pass on."""
        every = self.opts.balance_every
        if self.bias is None or sum(map(len, self.passes.values())) % every:
            return
        if self.world.rank == 0:
            window = np.sum(self.step_counts[-every:], axis=0)              # [Lm, E]
            self.bias[:] = update_bias(self.bias, window, self.opts.balance_step,
                                       self.opts.balance_clip)
        with self.timers.span('balance', 'wait'):
            self.front_comm.Bcast(self.bias, root=0)
        self.device_bias = self.backend.asarray(self.bias)

    # -- rounds ----------------------------------------------------------------

    def run(self, stop):
        """Rounds until rank 0 says DONE; once ``stop`` (a StopRequest) is set on
        rank 0, Stopped or Interrupted is raised at the next round or step."""
        F, passes = self.plan.n_frontends, max(1, self.opts.max_new_tokens)
        rank0 = self.world.rank == 0
        self.stop = stop
        if rank0:
            batches = self.stream.batches(self.opts.batch_tokens, start=self.writer.written)
            progress = Progress(len(self.stream), self.writer.written,
                                every=self.opts.progress_every)
        with self.writer or contextlib.nullcontext():
            for r in itertools.count():
                todo = list(itertools.islice(batches, F)) if rank0 else None
                if self.next_round(MORE if todo else DONE) == DONE:
                    break
                with self.timers.span('scatter', 'io', round=r):
                    mine = self.front_comm.scatter(
                        todo + [None] * (F - len(todo)) if rank0 else None, root=0)
                gen, logits = self._run_batch(mine, passes)
                self._write_round(r, todo, gen, logits)
                if rank0:
                    progress.update(sum(len(b) for _, b in todo),
                                    sum(int(b.lengths.sum()) for _, b in todo))
            if rank0 and stop:
                log.info(f'{stop.name} arrived at the end of the run: output complete')

    def stop_detail(self):
        if self.writer is None:
            return super().stop_detail()
        return (f'{self.writer.written} of {len(self.stream)} sequences committed to '
                f'{self.writer.dir}; rerun the same command to resume')

    def segment(self, stopped):
        out = super().segment(stopped)
        out.update(committed=self.writer.written, sequences=len(self.stream))
        return out

    def _run_batch(self, mine, passes):
        """Generate for this front-end's batch ``mine`` = (first, Inputs), or run
        ``passes`` empty passes when it has none this round.

        Returns (generated int32 [B, N], last_logits float32 [B, V] or None).
        Every pass is a step: a stop raises before it (see :meth:`next_step`).
        """
        self._pass_kind = 'prefill'

        def forward(tokens, cache, seqs, ntok):
            self.next_step()
            logits = self.forward(tokens, cache, seqs, ntok)
            self._pass_kind = 'decode'
            return logits

        if mine is None:
            empty = np.zeros(0, dtype=np.int64)
            cache = self.front.new_cache(0, 0)
            for _ in range(passes):
                forward(empty, cache, empty, empty)
            return np.zeros((0, self.opts.max_new_tokens), np.int32), None
        batch = mine[1]
        prompts = [batch.seq(i) for i in range(len(batch))]
        return generate(forward, self.front.new_cache, prompts, self.opts.max_new_tokens)

    def _write_round(self, r, todo, gen, logits):
        """Rank 0 gathers the round's results and commits them as one chunk, in
        input order (todo: the round's (first, Inputs) batches, rank 0 only)."""
        parts = self.front_comm.gather((gen, logits if self.opts.save_logits else None),
                                       root=0)
        if self.writer is None:
            return
        with self.timers.span('write', 'io', round=r):
            first = todo[0][0]
            n = sum(len(b) for _, b in todo)
            gens = np.concatenate([g for g, _ in parts[:len(todo)]])
            logits = np.concatenate([lg for _, lg in parts[:len(todo)]]) \
                if self.opts.save_logits else None
            ids = [i for _, b in todo for i in b.ids]
            self.writer.write(np.arange(first, first + n), ids, list(gens), logits)

    def report(self):
        out = super().report()
        out.update(role='front-end', passes=self.passes)
        if self.bias is not None:           # every front-end's must be rank 0's
            out['bias_crc32'] = zlib.crc32(self.bias.tobytes())
        bytes_total = np.zeros_like(self.bytes_sent) if self.world.rank == 0 else None
        self.front_comm.Reduce(self.bytes_sent, bytes_total, op=MPI.SUM, root=0)
        if self.world.rank == 0:
            out.update(step_counts=self.step_counts, bytes_per_layer=bytes_total.tolist(),
                       bias=None if self.bias is None else self.bias.tolist())
        return out


class _ExpertRank(_Role):
    """An expert rank: holds its experts, computes whatever rows arrive."""

    is_frontend = False

    def __init__(self, world, cfg, plan, opts, layers, timers, hosted, backend=None, mode=None):
        """hosted: layer index in the model -> this rank's expert weight dicts
        ([d, h] / [h, d], mpimoe.backends.backend.Backend.weights) in slot order."""
        super().__init__(world, cfg, plan, opts, layers, timers, backend, mode)
        self.front_comm = world.Split(MPI.UNDEFINED, world.rank)
        self.hosted = hosted
        # rows computed per hosted expert: layer -> int64 [experts of the layer here]
        self.rows = {layer: np.zeros(len(ws), dtype=np.int64) for layer, ws in hosted.items()}

    def run(self, stop):
        """Serve rounds and their steps until rank 0 says DONE, or raise where
        it says STOP (``stop`` is rank 0's business)."""
        self.stop = stop
        passes = max(1, self.opts.max_new_tokens)
        while self.next_round() == MORE:
            for _ in range(passes):
                # the last pass's results have reached the front-ends: nothing
                # is in flight when a stop ends the job here
                self._drain()
                self.next_step()
                for layer in self.hosted:
                    self._layer(layer)
        self._drain()

    def _drain(self):
        for s in self.slots:
            s.wait()

    def _layer(self, layer):
        """Stages dispatch (receive), expert, combine (send) of one layer, all micro-batches."""
        lc, cfg, experts = self.layers[layer], self.cfg, self.hosted[layer]
        for s in self.slots:
            with self.timers.span('combine', 'wait', layer=layer):
                s.wait()
            s.expert_post_counts(lc)
        for m, slot in enumerate(self.slots):
            with self.timers.span('dispatch', 'wait', layer=layer, mb=m):
                words, counts = slot.expert_received(self._poll)
            if not len(words):    # an empty micro-batch only answers its collectives
                slot.expert_send(0)
                continue
            with self.timers.span('unpack', 'pack', layer=layer, mb=m):
                regroup = self._regroup(counts)
                x16 = from_words(words, cfg.dtype)
                if regroup is not None:
                    x16 = x16[regroup]
                if not self.backend.is_gpu:     # the FP32 contract (mpimoe.model.layers.expert_ffn)
                    x16 = x16.astype(np.float32)
            with self.timers.span('expert', 'compute', layer=layer, mb=m):
                self.maybe_fail('expert')
                per_expert = counts.sum(axis=0)[:len(experts)]                # [experts here]
                self.rows[layer] += per_expert
                y = run_experts(x16, per_expert, experts, cfg.expert_kind, cfg.dtype,
                                poll=self._poll, chunk=POLL_ROWS)
            with self.timers.span('combine', 'pack', layer=layer, mb=m):
                out = slot.out.view(len(words))
                out[slice(None) if regroup is None else regroup] = \
                    to_words(y.astype(storage_dtype(cfg.dtype)))
                slot.expert_send(len(words))

    def _regroup(self, counts):
        """Rows arrive grouped by (sending peer, local expert); the order that
        groups them by expert: int [n] on the backend, or None when they already
        are (one expert here, or one peer sent rows).  counts: int [size, K]."""
        size, k = counts.shape
        if k == 1 or np.count_nonzero(counts.sum(axis=1)) <= 1:
            return None
        labels = np.repeat(np.tile(np.arange(k), size), counts.ravel())
        return self.backend.asarray(np.argsort(labels, kind='stable'))

    def _poll(self):
        """Post row receives whose counts arrived (in micro-batch order), test sends."""
        for s in self.slots:
            if not s.expert_post_rows():
                break
        for s in self.slots:
            s.test()

    def report(self):
        out = super().report()
        out['role'] = 'expert'
        out['experts'] = [list(p) for p in self.plan.rank_experts(self.world.rank)]
        out['rows'] = [int(v) for layer in sorted(self.rows) for v in self.rows[layer]]
        return out


def _micro_batches(ntok, m, min_tokens=1):
    """Split B sequences into consecutive groups of about equal tokens: m, or
    fewer when the pass has under ``min_tokens`` tokens per group (at least one).

    ntok: int [B] -> list of exactly m (a, b) ranges, the unused ones empty at
    the end, so every front-end posts the same number of collectives per layer.
    """
    cum = np.concatenate([[0], np.cumsum(ntok)])
    k = int(max(1, min(m, cum[-1] // min_tokens)))
    targets = cum[-1] * np.arange(1, k) / k
    cuts = np.searchsorted(cum, targets, side='left').clip(0, len(ntok))
    edges = np.concatenate([[0], cuts, [len(ntok)] * (m - k + 1)]).astype(int)
    edges = np.maximum.accumulate(edges)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _parse_fault(spec, rank):
    """'expert:3' -> 'expert' on rank 3, None elsewhere (test hook)."""
    if not spec:
        return None
    stage, _, r = spec.partition(':')
    return stage if r.isdigit() and int(r) == rank else None


def _timed_peak(opts, world, backend):
    """Rank 0's GEMM rate (run.json's MFU: with --metrics only), timed while
    the others sleep; None on the other ranks and without --metrics."""
    if not opts.metrics:
        return None
    idle = world.Ibarrier()
    peak = _peak_tflops(backend) if world.rank == 0 else None
    wait_all([idle], opts.deadline, lambda: 'rank 0 to finish its report')
    return peak


def _peak_tflops(backend, repeats=3):
    """This rank's GEMM rate, TFLOP/s (best of ``repeats`` n x n products):
    FP32, n = 512 on the CPU (as fast per FLOP as 1024 with OpenBLAS, an
    eighth of the time); BF16, n = 8192 on a GPU (its practical peak)."""
    n, dtype = (8192, DTYPES['bfloat16']) if backend.is_gpu else (512, np.float32)
    rng = backend.xp.random.default_rng(0)
    a = (rng.standard_normal((n, n), dtype=np.float32) * np.float32(n ** -0.5)).astype(dtype)
    best = float('inf')
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        a @ a
        backend.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


def _pass_summary(fronts):
    """Throughput and latency from every front-end's passes.

    fronts: per front-end, {'prefill': [(s, tokens, flops)], 'decode': [...]}.
    Front-ends run side by side: tokens add up, time is the slowest one's.
    """
    out = {}
    for kind in ('prefill', 'decode'):
        per = [np.array(f[kind] or np.zeros((0, 3)), dtype=np.float64).reshape(-1, 3)
               for f in fronts]
        tokens = sum(p[:, 1].sum() for p in per)
        seconds = max(p[:, 0].sum() for p in per)
        out[f'{kind}_tokens'] = int(tokens)
        out[f'{kind}_s'] = float(seconds)
        out[f'{kind}_tokens_per_s'] = float(tokens / seconds) if seconds > 0 else None
        out[f'{kind}_flops'] = float(sum(p[:, 2].sum() for p in per))
    steps = np.concatenate([np.array(f['decode'], dtype=np.float64).reshape(-1, 3)
                            for f in fronts])
    steps = 1e3 * steps[steps[:, 1] > 0, 0]            # ms per decode step with tokens
    for q in (50, 90, 99):
        out[f'tpot_p{q}_ms'] = float(np.percentile(steps, q)) if len(steps) else None
    out['time_per_output_token_ms'] = out['tpot_p50_ms']
    return out


def _balance_report(opts, steps, bias):
    """run.json's ``balance``: the policy, the final gate bias (None when off) and,
    per window of ``balance_every`` passes (the last may be shorter), the max/mean
    expert load of every MoE layer.  steps: int [passes, Lm, E] copies per pass."""
    starts = np.arange(0, len(steps), opts.balance_every)
    windows = np.add.reduceat(steps, starts, axis=0) if len(steps) else steps  # [W, Lm, E]
    return {'mode': opts.balance, 'every': opts.balance_every, 'step': opts.balance_step,
            'clip': opts.balance_clip, 'rule': BIAS_RULE, 'bias': bias,
            'max_over_mean_history': max_over_mean(windows).tolist()}


def _finish_report(opts, cfg, plan, world, reports, seconds, peak_tflops, backend, threads,
                   segment):
    """Rank 0: print the summary and write run.json (backend: _backend_report,
    threads: _size_threads; peak_tflops None without --metrics; segment:
    _Role.segment, how this run ended)."""
    r0 = reports[0]
    summary = _pass_summary([r['passes'] for r in reports if r['role'] == 'front-end'])
    busy = summary['prefill_s'] + summary['decode_s']
    flops = summary['prefill_flops'] + summary['decode_flops']
    summary.update(wall_s=seconds, achieved_tflops=flops / busy / 1e12 if busy else None,
                   peak_tflops_per_rank=peak_tflops,
                   peak_source='BF16 GEMM timed on rank 0 (GPU)' if backend['name'] == 'cupy'
                   else 'FP32 GEMM timed on rank 0 (CPU backend)')
    summary['mfu'] = summary['achieved_tflops'] / (peak_tflops * world.size) \
        if busy and peak_tflops else None
    steps = np.array(r0['step_counts'], dtype=np.int64).reshape(
        -1, cfg.n_moe_layers, cfg.n_experts)                               # [passes, Lm, E]
    loads = steps.sum(axis=0)
    report = {
        'mpimoe_version': __version__,
        'versions': {'mpi': MPI.Get_library_version().splitlines()[0].strip(),
                     'mpi4py': __import__('mpi4py').__version__, 'numpy': np.__version__,
                     'python': platform.python_version()},
        'config': json.loads(cfg.to_json()),
        'options': asdict(opts),
        'backend': backend,
        'segment': segment,
        'threads': threads,
        'placement': {'mode': plan.mode, 'world_size': world.size,
                      'frontends': plan.n_frontends, 'expert_ranks': plan.n_expert_ranks,
                      'experts_per_rank': plan.experts_per_rank, 'hash': plan.plan_hash(),
                      'stats': opts.stats, 'replica_ranks': plan.n_replica_ranks,
                      'replicas': [[layer, e, ranks] for (layer, e), ranks in
                                   plan.replica_table()]},
        'summary': summary,
        'expert_loads': {'layers': cfg.moe_layers, 'counts': loads.tolist(),
                         'max_over_mean': max_over_mean(loads).tolist()},
        'balance': _balance_report(opts, steps, r0['bias']),
        'bytes_per_layer': r0['bytes_per_layer'],
        'bytes_per_s_per_layer': [b / busy if busy else None for b in r0['bytes_per_layer']],
        'ranks': [{k: v for k, v in r.items() if k not in ('passes', 'step_counts',
                                                            'bytes_per_layer', 'bias')}
                  for r in reports],
    }
    rate = lambda v: 'n/a' if v is None else f'{v:.0f}'  # noqa: E731
    log.info(f'prefill {rate(summary["prefill_tokens_per_s"])} tokens/s, decode '
             f'{rate(summary["decode_tokens_per_s"])} tokens/s, wall {seconds:.2f} s'
             + (f' -> {opts.output}' if segment['outcome'] == 'complete' else ''))
    if opts.metrics:
        write_json(opts.metrics, report)
