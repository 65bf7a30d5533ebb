"""What front-ends and expert ranks share: micro-batch slots, the per-step
control message, timers, the fault hook.

Control: before each step (forward pass) rank 0 tells every rank, by one
small Ibcast on ``control``, what follows: another step (MORE), the end
(DONE), or a stop (STOP, with the number of the signal that asked for it).
On STOP every rank raises at that same step boundary: the chunk in flight is
abandoned, every committed chunk stays, and the job exits 75
(SIGTERM/SIGUSR1) or 130 (SIGINT).
"""

import os
import platform
import time

import numpy as np

from mpimoe.backends.backend import Backend
from mpimoe.errors import Interrupted
from mpimoe.parallel.mpiutil import MPI, local_rank, wait_all
from mpimoe.parallel.slots import Slot
from mpimoe.runtime.signals import stop_error

__all__ = ['Role', 'DONE', 'MORE', 'STOP', 'collective', 'fault_of']

#: what rank 0 says on ``control`` before each step
DONE, MORE, STOP = 0, 1, 2


def collective(e):
    """Mark an error that every rank raises alike (printed once, by rank 0)."""
    e.collective = True
    return e


def fault_of(rank):
    """Test hook: MPIMOE_FAULT=STAGE:RANK -> STAGE ('attention', 'expert',
    'hang') on that rank, None elsewhere.  A role installs it once, at load
    (:meth:`Role.faulty`), never as a test in the per-layer path."""
    stage, _, r = (os.environ.get('MPIMOE_FAULT') or '').partition(':')
    return stage if stage and r.isdigit() and int(r) == rank else None


class Role:
    """Slots, control and timers of one rank (a front-end or an expert rank)."""

    is_frontend = False

    def __init__(self, world, cfg, plan, opts, layers, timers, backend=None, mode=None):
        """backend: mpimoe.backends.backend.Backend (default NumPy); mode: the
        --mpi-gpu mode (None on NumPy)."""
        self.world, self.cfg, self.plan, self.opts = world, cfg, plan, opts
        self.layers, self.timers = layers, timers
        self.backend = backend or Backend('numpy')
        self.rowtype = MPI.UINT16_T.Create_contiguous(cfg.d_model).Commit()
        self.slots = [Slot(cfg.d_model, self.rowtype, opts.deadline, backend, mode)
                      for _ in range(opts.micro_batches)]
        self.control = world.Dup()
        # the front-ends' own communicator (collective over the world)
        self.front_comm = world.Split(0 if plan.is_frontend(world.rank) else MPI.UNDEFINED,
                                      world.rank)
        self.stop = None            # the StopRequest of run(); rank 0's decides
        self.steps = 0

    def faulty(self, stage, fn):
        """``fn``, or where MPIMOE_FAULT names ``stage`` on this rank, a
        function that raises instead (or, for 'hang', hangs the expert stage)."""
        fault = fault_of(self.world.rank)
        if fault == 'hang' and stage == 'expert':
            def hang(*args, **kwargs):
                while True:
                    time.sleep(60)
            return hang
        if fault == stage:
            def fail(*args, **kwargs):
                raise RuntimeError(f'injected fault (MPIMOE_FAULT) in stage {stage}')
            return fail
        return fn

    def next_step(self, what=MORE):
        """Before each step rank 0 says ``what`` (MORE or DONE), or STOP once a
        stop was requested there; every rank learns it (returned) and, on
        STOP, raises Stopped (exit 75) or Interrupted (SIGINT, 130), said once
        by rank 0 with what is committed."""
        signum = (self.stop.signum if self.stop and self.world.rank == 0 else None) or 0
        message = np.array([STOP if signum and what == MORE else what, signum], dtype=np.int64)
        req = self.control.Ibcast(message, root=0)
        with self.timers.span('control', 'wait'):
            wait_all([req], self.opts.deadline, lambda: 'the next step from rank 0')
        if message[0] == STOP:
            raise collective(stop_error(int(message[1]), self.stop_detail()))
        self.steps += message[0] == MORE
        return int(message[0])

    def stop_detail(self):
        """What a stopped job keeps, for the stop message (rank 0 says it)."""
        return 'the committed chunks stay; rerun the same command to resume'

    def segment(self, stopped):
        """run.json's ``segment`` (rank 0): how this run, one segment of a job
        that reruns to resume, ended (``stopped``: the Stopped/Interrupted
        raised, or None)."""
        return {'outcome': 'complete' if stopped is None else
                'interrupted' if isinstance(stopped, Interrupted) else 'stopped',
                'signal': self.stop.name if self.stop else None}

    def drain(self):
        """Complete every transfer in flight."""
        for s in self.slots:
            s.wait()

    def report(self):
        return {'rank': self.world.rank, 'host': platform.node(),
                'local_rank': local_rank(self.world).index, 'steps': int(self.steps),
                **self.timers.summary()}
