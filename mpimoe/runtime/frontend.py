"""A front-end rank: the non-expert layers of the model over its running
sequences, continuously batched; rank 0 also reads the input and writes the
output (mpimoe.runtime.feeder).

Each step:

1. every front-end sends rank 0 (a barrier under the deadline, then a gather
   on ``front_comm``) the results of the sequences that ended in its last
   step, how many requests it has room for and its expert loads;
2. rank 0 commits what is complete, adds up the loads (and, with
   ``--balance bias``, moves the gate bias), and says MORE or DONE (or STOP)
   to every rank on ``control`` (mpimoe.runtime.role);
3. rank 0 hands each front-end its new requests and the new bias (scatter);
4. each front-end's scheduler (mpimoe.runtime.scheduler) packs one token of
   every running sequence and the prompts of those joining into one pass,
   the layer loop (mpimoe.model.forward) runs it, micro-batched, with the
   experts reached through mpimoe.parallel.dispatcher; a front-end with
   nothing to run passes over no tokens, posting the empty collectives the
   expert ranks expect.

With ``--tp T`` a front-end is a group of T ranks (mpimoe.model.tp_frontend):
its leader (the group's rank 0) reports results and room to rank 0 and
broadcasts what it is handed to the group, whose every rank then schedules
the same steps (the same requests, the same gathered logits); the others
report only their share of the expert loads.
"""

import contextlib
import logging
import time
import zlib

import numpy as np

from mpimoe.model.forward import forward, micro_batches
from mpimoe.parallel.dispatcher import MPIDispatcher
from mpimoe.parallel.mpiutil import MPI, wait_all
from mpimoe.planning.balance import update_bias
from mpimoe.planning.costmodel import pass_flops
from mpimoe.runtime.feeder import Feeder
from mpimoe.runtime.loads import LoadHistory
from mpimoe.runtime.progress import Progress
from mpimoe.runtime.role import DONE, MORE, Role
from mpimoe.runtime.scheduler import job_scheduler

__all__ = ['FrontEndRank', 'MIN_EXPERT_ROWS']

#: fewest rows per expert (on average) worth a micro-batch of their own: each
#: micro-batch costs every layer its per-call overheads and every expert GEMM
#: one more pass over its weights (BLAS packs them per call), which a few rows
#: do not repay: small decode steps fill fewer micro-batches
MIN_EXPERT_ROWS = 8

log = logging.getLogger('mpimoe')


class FrontEndRank(Role):
    """front: the mpimoe.model.frontend.FrontEnd (weights on the backend; a
    TPFrontEnd with ``group``); io (rank 0 only): (InputStream, OutputWriter);
    tokenizer: the run's TextTokenizer or None (mpimoe.io.job.job_tokenizer);
    group: the TP group's mpimoe.parallel.tp_group.TensorGroup, or None."""

    is_frontend = True

    def __init__(self, world, cfg, plan, opts, layers, timers, front, io=None, backend=None,
                 mode=None, tokenizer=None, group=None):
        super().__init__(world, cfg, plan, opts, layers, timers, backend, mode)
        backend = self.backend
        self.front, self.group = front, group
        self.leader = group is None or group.rank == 0
        front.attention_out = self.faulty('attention', front.attention_out)
        self.stream, self.writer = io or (None, None)
        # layer -> (permute keys int64 [E, copies], copies int64 [E]) (replicas), on the backend
        copy_keys = {layer: tuple(map(backend.asarray, plan.dispatch_keys(m)[:2]))
                     for m, layer in enumerate(cfg.moe_layers)}
        self.dispatcher = MPIDispatcher(cfg, self.slots, layers, copy_keys, world.rank, timers)
        # between stages: progress the MoE transfers and the group's posted sums
        self.poll = self.dispatcher.poll if group is None else \
            (lambda: (self.dispatcher.poll(), group.poll()))
        self.moe = front.moe_layers(self.dispatcher, timers)
        self.scheduler = job_scheduler(front, opts, tokenizer)
        self.loads = LoadHistory(opts.balance_every)        # rank 0's
        self._window = None         # rank 0: loads since the last bias update, [Lm, E]
        # gate bias [n_moe_layers, E] (--balance bias), the same on every front-end;
        # updated on the host, routed with on the backend (the same array on NumPy)
        self.bias = np.zeros((cfg.n_moe_layers, cfg.n_experts), np.float32) \
            if opts.balance == 'bias' else None
        self._set_bias()
        # per step: (seconds, prompt tokens, generated tokens, FLOPs)
        self.passes = []

    # -- steps -------------------------------------------------------------------

    def run(self, stop):
        """Steps until rank 0 says DONE; once ``stop`` (a StopRequest) is set on
        rank 0, Stopped or Interrupted is raised at the next step."""
        self.stop = stop
        rank0 = self.world.rank == 0
        feeder = None
        if rank0:
            progress = Progress(len(self.stream), self.writer.written,
                                every=self.opts.progress_every)
        finished = []
        with self.writer or contextlib.nullcontext():
            if rank0:
                feeder = Feeder(self.stream, self.writer,
                                self.opts.chunk_budget(self.plan.n_frontend_groups), progress)
            while True:
                # a TP group's results and room are its leader's (the others' the same)
                reports = self._gather((finished, self.scheduler.room(), self._counts())
                                       if self.leader else ([], 0, self._counts()))
                assign = None
                if rank0:
                    with self.timers.span('write', 'io'):
                        feeder.collect(r for done, _, _ in reports for r in done)
                    # no step follows the last: its bias would reach no front-end
                    bias = self._loads([c for _, _, c in reports], not feeder.done)
                    assign = [(reqs, bias) for reqs in
                              feeder.hand_out([room for _, room, _ in reports])]
                if self.next_step(DONE if rank0 and feeder.done else MORE) == DONE:
                    break
                with self.timers.span('scatter', 'io'):
                    requests, bias = self.front_comm.scatter(assign, root=0)
                    if self.group is not None:
                        requests, bias = self.group.bcast((requests, bias))
                self.scheduler.add(requests)
                if bias is not None:
                    self.bias[:] = bias
                    self._set_bias()
                step = self.scheduler.schedule()
                # an overflow ends in NaN/Inf logits, which the front-end refuses in
                # one message (FrontEnd.logits); NumPy's warnings would only add lines
                with np.errstate(over='ignore', invalid='ignore'):
                    logits = self.forward(step)
                finished = self.scheduler.finish(step, logits)
            if rank0 and stop:
                log.info(f'{stop.name} arrived at the end of the run: output complete')
        self.drain()

    def forward(self, step):
        """One pass over ``step`` (mpimoe.runtime.scheduler.Step), micro-batched,
        kept in ``passes``: logits float32 [B, V] (host)."""
        cfg, cache = self.cfg, self.scheduler.cache
        t0 = time.perf_counter()
        # causal query-key pairs of this pass (for the FLOP count)
        ntok, before = step.ntok, cache.length[step.seqs]
        pairs = int(np.sum(ntok * before + ntok * (ntok + 1) // 2))
        # at least MIN_EXPERT_ROWS rows per expert in each micro-batch
        mbs = micro_batches(ntok, len(self.slots), MIN_EXPERT_ROWS * cfg.n_experts / cfg.top_k)
        logits = forward(self.front, self.moe, step.tokens, cache, step.seqs, ntok, mbs,
                         self.timers, self.poll)
        tokens = int(np.sum(ntok))
        flops = pass_flops(cfg, tokens, pairs, tokens * cfg.top_k * cfg.n_moe_layers, len(ntok))
        sampled = sum(1 for r in step.running if r.req.params.max_tokens > 0)
        # a TP group's tokens and FLOPs are counted once, by its leader
        keep = 1 if self.leader else 0
        self.passes.append((time.perf_counter() - t0, keep * step.prefill_tokens, keep * sampled,
                            keep * flops))
        return logits

    def _gather(self, report):
        """Rank 0 gathers every front-end's report of the last step (a list per
        front-end, None elsewhere), once all have reached this point: a
        barrier under the deadline first, so a front-end that never comes
        ends the job instead of hanging it."""
        with self.timers.span('gather', 'wait'):
            wait_all([self.front_comm.Ibarrier()], self.opts.deadline,
                     lambda: 'the other front-ends at the next step')
            return self.front_comm.gather(report, root=0)

    def _counts(self):
        """The expert loads of this front-end's last step, int64 [Lm, E] (None
        before the first), cleared for the next."""
        if not self.passes:
            return None
        return np.stack([self.moe[i].take_counts() for i in self.cfg.moe_layers])

    def _loads(self, counts, more):
        """Rank 0: add up the front-ends' loads of the last step (``counts``:
        one [Lm, E] or None each) and, when another step follows (``more``),
        with --balance bias every balance_every steps, move the gate bias by the loads of those steps
        (mpimoe.planning.balance.update_bias).  Returns the new bias for
        every front-end to route with from the next step on, else None."""
        if counts[0] is None:
            return None
        step = np.sum(counts, axis=0)                                       # [Lm, E]
        self.loads.add(step)
        if self.bias is None:
            return None
        self._window = step if self._window is None else self._window + step
        if not more or self.loads.steps % self.opts.balance_every:
            return None
        self.bias[:] = update_bias(self.bias, self._window, self.opts.balance_step,
                                   self.opts.balance_clip)
        self._window = None
        return self.bias

    def _set_bias(self):
        if self.bias is not None:
            device = self.backend.asarray(self.bias)
            for m, i in enumerate(self.cfg.moe_layers):
                self.moe[i].bias = device[m]

    # -- what rank 0 reports -------------------------------------------------------

    def stop_detail(self):
        if self.writer is None:
            return super().stop_detail()
        return (f'{self.writer.written} of {len(self.stream)} sequences committed to '
                f'{self.writer.dir}; rerun the same command to resume')

    def segment(self, stopped):
        out = super().segment(stopped)
        out.update(committed=self.writer.written, sequences=len(self.stream))
        return out

    def report(self):
        out = super().report()
        out.update(role='front-end', passes=self.passes)
        if self.bias is not None:           # every front-end's must be rank 0's
            out['bias_crc32'] = zlib.crc32(self.bias.tobytes())
        sent = self.dispatcher.bytes_sent
        bytes_total = np.zeros_like(sent) if self.world.rank == 0 else None
        self.front_comm.Reduce(sent, bytes_total, op=MPI.SUM, root=0)
        if self.world.rank == 0:
            out.update(loads=self.loads, bytes_per_layer=bytes_total.tolist(),
                       bias=None if self.bias is None else self.bias.tolist())
        return out

