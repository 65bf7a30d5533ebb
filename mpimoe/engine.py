"""The distributed engine: front-end and expert-rank loops, micro-batch pipeline.

Front-ends (ranks [0, F)) run everything but the experts; expert ranks run
their experts on whatever rows arrive.  A front-end splits each forward pass
into M micro-batches and walks layer by layer; at an MoE layer it routes and
permutes micro-batch m, posts its dispatch and moves on to micro-batch m+1, so
the dispatch of m+1 travels while an expert computes m, and the combine of m
travels back while m+1 computes.  A micro-batch's combine is collected just
before its next attention block.

Work comes in *rounds*: in round r front-end f takes batch r*F + f of the
input (batches of at most ``batch_tokens`` prompt tokens), prefills it and
decodes ``max_new_tokens`` greedily; rank 0 writes the round's results in input
order.  Before each round rank 0 tells every rank whether one follows.
"""

import contextlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np

from mpimoe import __version__
from mpimoe.backend import from_words, round16, storage_dtype, to_words
from mpimoe.dispatch import LayerComms, Slot
from mpimoe.errors import ConfigError, UsageError
from mpimoe.generate import generate, token_batches
from mpimoe.metrics import Timers
from mpimoe.model import FrontEnd
from mpimoe.moe import permute, run_experts, unpermute
from mpimoe.mpiutil import MPI, local_rank, node_ids, run_guarded, wait_all
from mpimoe.router import expert_counts, route

__all__ = ['RunOptions', 'run_engine']

#: rows an expert computes between two polls of the transfers in flight
POLL_ROWS = 1024


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

    def validate(self):
        """ConfigError on options that cannot work."""
        if self.micro_batches < 1:
            raise ConfigError(f'--micro-batches {self.micro_batches}: must be >= 1')
        if self.max_new_tokens < 0:
            raise ConfigError(f'--max-new-tokens {self.max_new_tokens}: must be >= 0')
        if self.batch_tokens < 1:
            raise ConfigError(f'--batch-tokens {self.batch_tokens}: must be >= 1')
        if not self.deadline > 0:
            raise ConfigError(f'--deadline {self.deadline}: must be > 0')


def run_engine(opts, comm=None):
    """``mpimoe run`` on every rank; any failure ends the whole job."""
    comm = comm or MPI.COMM_WORLD
    return run_guarded(comm, _run, opts, comm)


def _collective(e):
    """Mark an error that every rank raises alike (printed once, by rank 0)."""
    e.collective = True
    return e


def _run(opts, world):
    from mpimoe.checkpoint import WeightFile
    from mpimoe.placement import make_plan
    timers = Timers()
    t_start = time.perf_counter()
    with WeightFile(opts.weights) as wf:
        cfg = wf.config
        try:
            opts.validate()
            plan = make_plan(cfg, world.size, opts.placement, opts.frontends)
        except UsageError as e:
            raise _collective(e)
        layers = _layer_comms(world, plan)
        with timers.span('load', 'load'):
            if plan.is_frontend(world.rank):
                role = _FrontEndRank(world, cfg, plan, opts, layers, wf, timers)
            else:
                role = _ExpertRank(world, cfg, plan, opts, layers, wf, timers)
    rowtype = role.rowtype
    world.Barrier()
    if world.rank == 0:
        print(f'mpimoe run: {plan.mode} placement, {world.size} ranks '
              f'({plan.n_frontends} front-ends, {plan.n_expert_ranks} expert ranks), '
              f'{opts.micro_batches} micro-batches, plan {plan.plan_hash()}', flush=True)
    role.run()
    report = role.report()
    reports = world.gather(report, root=0)
    if world.rank == 0:
        _finish_report(opts, cfg, plan, world, reports, time.perf_counter() - t_start)
    for lc in layers.values():
        lc.free()
    rowtype.Free()
    return 0


def _layer_comms(world, plan):
    """LayerComms of every MoE layer (layer index in the model -> LayerComms)."""
    out = {}
    for m, layer in enumerate(plan.cfg.moe_layers):
        ranks = np.asarray(plan.layer_ranks(m))
        owner = plan.owner[m]                                      # [E] world ranks
        # slot of each expert on its rank: its index among that rank's experts
        order = np.lexsort((np.arange(len(owner)), owner))
        first = np.searchsorted(owner[order], owner[order], side='left')
        slot = np.empty(len(owner), dtype=np.int64)
        slot[order] = np.arange(len(owner)) - first
        k = int(slot.max()) + 1
        key = np.searchsorted(ranks, owner) * k + slot
        out[layer] = LayerComms(world, ranks, key, k)
    return out


class _Role:
    """What front-ends and expert ranks share: slots, control, timers."""

    def __init__(self, world, cfg, plan, opts, layers, timers):
        self.world, self.cfg, self.plan, self.opts = world, cfg, plan, opts
        self.layers, self.timers = layers, timers
        self.rowtype = MPI.UINT16_T.Create_contiguous(cfg.d_model).Commit()
        self.slots = [Slot(cfg.d_model, self.rowtype, opts.deadline)
                      for _ in range(opts.micro_batches)]
        self.control = world.Dup()
        self.fault = _parse_fault(os.environ.get('MPIMOE_FAULT'), world.rank)

    def maybe_fail(self, stage):
        """Test hook: MPIMOE_FAULT=STAGE:RANK raises here on that rank."""
        if self.fault == stage:
            raise RuntimeError(f'injected fault (MPIMOE_FAULT) in stage {stage}')

    def next_round(self, more=False):
        """Rank 0 says whether another round follows (``more``); every rank
        learns it."""
        flag = np.array([int(more)], dtype=np.int64)
        req = self.control.Ibcast(flag, root=0)
        with self.timers.span('control', 'wait'):
            wait_all([req], self.opts.deadline, lambda: 'the next round from rank 0')
        return bool(flag[0])

    def report(self):
        return {'rank': self.world.rank, 'host': platform.node(),
                'local_rank': local_rank(self.world), **self.timers.summary()}


class _FrontEndRank(_Role):
    """A front-end: reads inputs, runs all non-expert layers, writes outputs."""

    def __init__(self, world, cfg, plan, opts, layers, wf, timers):
        super().__init__(world, cfg, plan, opts, layers, timers)
        from mpimoe.io import OutputWriter, read_inputs
        self.front_comm = world.Split(0, world.rank)
        self.writer = None
        if world.rank == 0:
            meta = {'producer': 'mpimoe run', 'mpimoe_version': __version__,
                    'weights': str(opts.weights), 'input': str(opts.input),
                    'max_new_tokens': opts.max_new_tokens, 'placement': plan.mode,
                    'plan_hash': plan.plan_hash()}
            self.inputs = read_inputs(opts.input, cfg.vocab_size)
            self.writer = OutputWriter(opts.output, len(self.inputs), cfg.vocab_size,
                                       opts.save_logits, meta, overwrite=opts.overwrite)
        else:
            self.inputs = read_inputs(opts.input, cfg.vocab_size)
        self.front = FrontEnd(cfg, {k: v.astype(np.float32)
                                    for k, v in wf.read_nonexpert().items()})
        self.counts = np.zeros((cfg.n_moe_layers, cfg.n_experts), dtype=np.int64)
        self.step_counts = []           # rank 0: per pass, [n_moe_layers, E]
        self.bytes_sent = np.zeros(cfg.n_moe_layers, dtype=np.int64)
        self.passes = {'prefill': [], 'decode': []}   # (seconds, tokens) per pass

    # -- the pipelined forward pass -----------------------------------------

    def forward(self, tokens, cache, seqs, ntok):
        """One pass of the model over a packed batch, micro-batched.

        tokens: int [T]; seqs, ntok: int [B] -> logits float32 [B, vocab].
        """
        fe, cfg = self.front, self.cfg
        t0 = time.perf_counter()
        mbs = _micro_batches(ntok, len(self.slots))
        bounds = np.concatenate([[0], np.cumsum(ntok)])
        xs = [fe.embed(tokens[bounds[a]:bounds[b]]) for a, b in mbs]
        pending = [None] * len(mbs)
        for i in range(cfg.n_layers):
            for m, (a, b) in enumerate(mbs):
                if pending[m] is not None:
                    xs[m] = self._collect(m, xs[m], pending[m])
                    pending[m] = None
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
        x = np.concatenate(xs) if xs else np.zeros((0, cfg.d_model), np.float32)
        with self.timers.span('head', 'compute'):
            logits = fe.logits(x[np.cumsum(ntok) - 1])
        self._record_pass(time.perf_counter() - t0, ntok)
        return logits

    def _dispatch(self, i, m, h):
        """Stages route, permute, dispatch of layer i, micro-batch m.

        h: float32 [T, d] -> pending state (order, weights, rows) for _collect.
        """
        cfg, lc, slot = self.cfg, self.layers[i], self.slots[m]
        with self.timers.span('route', 'compute', layer=i, mb=m):
            chosen, weights = route(h, self.front.router[i], cfg.top_k)     # [T, k]
            self.counts[i - cfg.n_dense_layers] += expert_counts(chosen, cfg.n_experts)
        with self.timers.span('permute', 'pack', layer=i, mb=m):
            words = to_words(h.astype(storage_dtype(cfg.dtype)))             # [T, d] uint16
            n = chosen.size
            slot.wait()
            _, order, counts = permute(words, lc.key_of_expert[chosen], lc.size * lc.k,
                                       out=slot.out.view(n))
        with self.timers.span('dispatch', 'pack', layer=i, mb=m):
            slot.frontend_start(lc, counts.reshape(lc.size, lc.k).astype(np.int32), n)
        self.bytes_sent[i - cfg.n_dense_layers] += 2 * n * cfg.d_model * cfg.itemsize
        return order, weights, n

    def _collect(self, m, x, pending):
        """Stages combine (wait) and unpermute: x + the MoE output of micro-batch m."""
        order, weights, n = pending
        slot = self.slots[m]
        with self.timers.span('combine', 'wait', mb=m):
            slot.wait(self._poll)
        with self.timers.span('unpermute', 'pack', mb=m):
            y = from_words(slot.inp.view(n), self.cfg.dtype).astype(np.float32)
            return x + unpermute(y, order, weights)

    def _poll(self):
        for s in self.slots:
            s.test()

    def _record_pass(self, seconds, ntok):
        self.passes[self._pass_kind].append((seconds, int(np.sum(ntok))))
        total = np.zeros_like(self.counts) if self.world.rank == 0 else None
        self.front_comm.Reduce(self.counts, total, op=MPI.SUM, root=0)
        if self.world.rank == 0:
            self.step_counts.append(total)
        self.counts[:] = 0

    # -- rounds ----------------------------------------------------------------

    def run(self):
        opts, F = self.opts, self.plan.n_frontends
        f = self.front_comm.rank
        batches = token_batches(self.inputs.lengths, opts.batch_tokens)
        rounds = -(-len(batches) // F)
        passes = max(1, opts.max_new_tokens)
        with self.writer or contextlib.nullcontext():
            for r in range(rounds):
                self.next_round(True)
                j = r * F + f
                mine = batches[j] if j < len(batches) else (0, 0)
                gen, logits = self._run_batch(mine, passes)
                self._write_round(r, mine, gen, logits)
            self.next_round(False)

    def _run_batch(self, span, passes):
        """Generate for sequences [start, stop) (maybe none: empty passes)."""
        start, stop = span
        self._pass_kind = 'prefill'
        if stop == start:
            empty = np.zeros(0, dtype=np.int64)
            cache = self.front.new_cache(empty)
            for _ in range(passes):
                self.forward(empty, cache, empty, empty)
                self._pass_kind = 'decode'
            return np.zeros((0, self.opts.max_new_tokens), np.int32), None

        def forward(tokens, cache, seqs, ntok):
            logits = self.forward(tokens, cache, seqs, ntok)
            self._pass_kind = 'decode'
            return logits

        prompts = [self.inputs.seq(i) for i in range(start, stop)]
        return generate(forward, self.front.new_cache, prompts, self.opts.max_new_tokens)

    def _write_round(self, r, span, gen, logits):
        """Rank 0 gathers the round's results and writes them in input order."""
        part = (span, gen, logits if self.opts.save_logits else None)
        parts = self.front_comm.gather(part, root=0)
        if self.writer is None:
            return
        with self.timers.span('write', 'io', round=r):
            for (start, stop), g, lg in parts:
                if stop > start:
                    self.writer.write(np.arange(start, stop), self.inputs.ids[start:stop],
                                      list(g), lg)

    def report(self):
        out = super().report()
        out['role'] = 'front-end'
        bytes_total = np.zeros_like(self.bytes_sent) if self.world.rank == 0 else None
        self.front_comm.Reduce(self.bytes_sent, bytes_total, op=MPI.SUM, root=0)
        if self.world.rank == 0:
            out.update(passes=self.passes, step_counts=self.step_counts,
                       bytes_per_layer=bytes_total.tolist())
        return out


class _ExpertRank(_Role):
    """An expert rank: holds its experts, computes whatever rows arrive."""

    def __init__(self, world, cfg, plan, opts, layers, wf, timers):
        super().__init__(world, cfg, plan, opts, layers, timers)
        self.front_comm = world.Split(MPI.UNDEFINED, world.rank)
        # moe layer index in the model -> expert weight dicts in slot order
        self.hosted = {}
        for layer, e in sorted(plan.rank_experts(world.rank)):
            self.hosted.setdefault(layer, []).append(
                {m: a.astype(np.float32) for m, a in wf.read_expert(layer, e).items()})

    def run(self):
        passes = max(1, self.opts.max_new_tokens)
        while self.next_round():
            for _ in range(passes):
                for layer in self.hosted:
                    self._layer(layer)
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
            with self.timers.span('unpack', 'pack', layer=layer, mb=m):
                # rows arrive grouped by (front-end, expert); regroup by expert
                labels = np.repeat(np.tile(np.arange(lc.k), lc.size), counts.ravel())
                regroup = np.argsort(labels, kind='stable')
                x16 = from_words(words, cfg.dtype)[regroup].astype(np.float32)
            with self.timers.span('expert', 'compute', layer=layer, mb=m):
                self.maybe_fail('expert')
                y = run_experts(x16, counts.sum(axis=0), experts, cfg.expert_kind, cfg.dtype,
                                poll=self._poll, chunk=POLL_ROWS)
            with self.timers.span('combine', 'pack', layer=layer, mb=m):
                out = slot.out.view(len(words))
                out[regroup] = to_words(y.astype(storage_dtype(cfg.dtype)))
                slot.expert_send(len(words))

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
        return out


def _micro_batches(ntok, m):
    """Split B sequences into at most m consecutive groups of about equal tokens.

    ntok: int [B] -> list of exactly m (a, b) ranges (some may be empty), so
    every front-end posts the same number of collectives per layer.
    """
    cum = np.concatenate([[0], np.cumsum(ntok)])
    targets = cum[-1] * np.arange(1, m) / m
    cuts = np.searchsorted(cum, targets, side='left').clip(0, len(ntok))
    edges = np.concatenate([[0], cuts, [len(ntok)]]).astype(int)
    edges = np.maximum.accumulate(edges)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _parse_fault(spec, rank):
    """'expert:3' -> 'expert' on rank 3, None elsewhere (test hook)."""
    if not spec:
        return None
    stage, _, r = spec.partition(':')
    return stage if r.isdigit() and int(r) == rank else None


def _finish_report(opts, cfg, plan, world, reports, seconds):
    """Rank 0: print the summary and write run.json."""
    r0 = reports[0]
    pre = np.array(r0['passes']['prefill'] or [(0.0, 0)], dtype=np.float64)
    dec = np.array(r0['passes']['decode'] or [(0.0, 0)], dtype=np.float64)
    loads = np.sum(r0['step_counts'], axis=0) if r0['step_counts'] else \
        np.zeros((cfg.n_moe_layers, cfg.n_experts))
    mean = loads.mean(axis=1)
    imbalance = np.where(mean > 0, loads.max(axis=1) / np.maximum(mean, 1e-12), 0.0)
    summary = {
        'prefill_tokens_per_s': float(pre[:, 1].sum() / max(pre[:, 0].sum(), 1e-12)),
        'decode_tokens_per_s': float(dec[:, 1].sum() / max(dec[:, 0].sum(), 1e-12)),
        'time_per_output_token_ms': float(1e3 * np.median(dec[:, 0])) if len(dec) else None,
        'wall_s': seconds,
    }
    report = {
        'mpimoe_version': __version__,
        'versions': {'mpi': MPI.Get_library_version().splitlines()[0].strip(),
                     'mpi4py': __import__('mpi4py').__version__, 'numpy': np.__version__,
                     'python': platform.python_version()},
        'config': json.loads(cfg.to_json()),
        'options': asdict(opts),
        'placement': {'mode': plan.mode, 'world_size': world.size,
                      'frontends': plan.n_frontends, 'expert_ranks': plan.n_expert_ranks,
                      'experts_per_rank': plan.experts_per_rank, 'hash': plan.plan_hash()},
        'summary': summary,
        'expert_loads': {'layers': cfg.moe_layers, 'counts': loads.astype(int).tolist(),
                         'max_over_mean': imbalance.tolist()},
        'bytes_per_layer': r0['bytes_per_layer'],
        'ranks': [{k: v for k, v in r.items() if k not in ('passes', 'step_counts',
                                                            'bytes_per_layer')}
                  for r in reports],
    }
    print(f'mpimoe run: prefill {summary["prefill_tokens_per_s"]:.0f} tokens/s, decode '
          f'{summary["decode_tokens_per_s"]:.0f} tokens/s, wall {seconds:.2f} s -> {opts.output}',
          flush=True)
    if opts.metrics:
        tmp = f'{opts.metrics}.partial'
        with open(tmp, 'w') as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, opts.metrics)
