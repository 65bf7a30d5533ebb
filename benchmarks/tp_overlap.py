"""How much of a tensor-parallel group's Allreduce time the next micro-batch
hides (mpimoe.model.forward): one prefill pass of a TP group, the sums of
its dense MLPs and shared experts posted and waited for after the next
micro-batch's work, as the engine runs it, against waited for in place, in
the same run (the attention's sums are waited for in place in both).

    mpiexec -n T python -m mpi4py benchmarks/tp_overlap.py [--preset small] \\
        [--set KEY=VALUE ...] [--tokens 2048] [--seqs 16] [--micro-batches 2] \\
        [--repeats 7] [--threads 1]

The T ranks are one TP group (NumPy, ``--threads`` BLAS threads each):
rank 0 writes the preset's synthetic weights (``--set`` as ``mpimoe
init-weights --set``; ``small`` has one dense layer and no shared experts,
``--set shared.n_experts=1 --set shared.d_expert=1024`` gives each MoE
layer Qwen2-MoE-like ones) into a temporary directory, every rank reads its
shard of the non-expert tensors (mpimoe.model.tp_frontend.read_shard) and
every expert, so that the MoE layers run in-process (mpimoe.moe.local) on
each rank's share of the rows, with the group's gathers as in the engine.
``--repeats`` rounds, each of one pass waited in place and one overlapped
(alternating, so that other work on the machine slows both alike), each
from a fresh KV cache.  Prints
the medians over rounds of the pass time of the slowest rank and of the
group's wait (stage ``tp``, mean over ranks), the ratio of the two pass
times, and whether the two passes' logits are bit-identical (the same
arithmetic in another order of micro-batches).  Printed, not asserted.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpimoe.parallel.mpiutil import MPI  # noqa: E402
from mpimoe.backends.backend import Backend  # noqa: E402
from mpimoe.checkpoint.weights import WeightFile  # noqa: E402
from mpimoe.checkpoint.writer import write_synthetic  # noqa: E402
from mpimoe.errors import ConfigError  # noqa: E402
from mpimoe.model.config import model_config  # noqa: E402
from mpimoe.model.forward import forward, micro_batches  # noqa: E402
from mpimoe.model.tp_frontend import TPFrontEnd, read_shard  # noqa: E402
from mpimoe.moe.local import LocalDispatcher  # noqa: E402
from mpimoe.parallel.tp_group import TensorGroup  # noqa: E402
from mpimoe.runtime.metrics import Timers  # noqa: E402
from mpimoe.runtime.threads import apply_threads  # noqa: E402


def load(comm, cfg, timers):
    """This rank's front-end of the group and its MoE layers, both ways:
    {overlap (bool): (TPFrontEnd, moe)}, the same tensors."""
    backend = Backend('numpy')
    with tempfile.TemporaryDirectory() as tmp:
        path = comm.bcast(os.path.join(tmp, 'weights.h5') if comm.rank == 0 else None)
        if comm.rank == 0:
            write_synthetic(cfg, path, seed=0)
        comm.Barrier()
        with WeightFile(path) as wf:
            cfg = wf.config
            group = TensorGroup(comm, backend, None, 600.0, timers)
            tensors = backend.weights(read_shard(wf, comm.rank, comm.size))
            experts = {i: [backend.weights(wf.read_expert(i, e)) for e in range(cfg.n_experts)]
                       for i in cfg.moe_layers}
        comm.Barrier()              # every rank has read before rank 0 removes the file
    fronts = {mode: TPFrontEnd(cfg, tensors, group, overlap=mode) for mode in (False, True)}
    return {mode: (front, front.moe_layers(LocalDispatcher(cfg, experts)))
            for mode, front in fronts.items()}


def timed_pass(comm, front, moe, prompts, mbs, timers):
    """One prefill pass of ``prompts`` (list of int arrays) from a fresh cache:
    (seconds of the slowest rank, this rank's tp wait seconds, logits [B, V])."""
    lengths = np.array([len(p) for p in prompts])
    cache, seqs = front.cache_for(lengths)
    wait0 = timers.by_stage['tp']
    comm.Barrier()
    t0 = time.perf_counter()
    logits = forward(front, moe, np.concatenate(prompts), cache, seqs, lengths, mbs, timers,
                     front.group.poll)
    dt = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    return dt, timers.by_stage['tp'] - wait0, logits


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--preset', default='small')
    ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                    help='override a field of the preset, as `mpimoe init-weights --set`')
    ap.add_argument('--tokens', type=int, default=2048, help='prompt tokens in the pass')
    ap.add_argument('--seqs', type=int, default=16, help='sequences they are cut into')
    ap.add_argument('--micro-batches', type=int, default=2)
    ap.add_argument('--repeats', type=int, default=7, help='rounds (>= 5)')
    ap.add_argument('--threads', type=int, default=1, help='BLAS threads per rank')
    args = ap.parse_args(argv)
    comm = MPI.COMM_WORLD
    if args.repeats < 5 or comm.size < 2 or args.micro_batches < 2:
        ap.error('needs --repeats >= 5, --micro-batches >= 2 and at least 2 ranks')
    apply_threads(args.threads)
    timers = Timers()
    try:
        cfg = model_config(args.preset, args.set)
    except ConfigError as e:
        if comm.rank == 0:
            ap.error(str(e))
        sys.exit(2)
    models = load(comm, cfg, timers)
    rng = np.random.default_rng(0)
    per = args.tokens // args.seqs
    prompts = [rng.integers(0, cfg.vocab_size, per) for _ in range(args.seqs)]
    mbs = micro_batches(np.full(args.seqs, per), args.micro_batches)
    runs = {False: [], True: []}
    same = True
    with np.errstate(over='ignore', invalid='ignore'):
        timed_pass(comm, *models[True], prompts, mbs, timers)          # warm-up
        for _ in range(args.repeats):
            got = {mode: timed_pass(comm, *models[mode], prompts, mbs, timers)
                   for mode in (False, True)}
            for mode, (dt, wait, _) in got.items():
                runs[mode].append((dt, comm.allreduce(wait) / comm.size))
            same &= bool(np.array_equal(got[False][2], got[True][2]))
    if comm.rank:
        return
    model = ' '.join([args.preset] + [f'--set {o}' for o in args.set])
    print(f'{model}: TP group of {comm.size} ranks, {args.threads} BLAS thread(s) each; '
          f'{args.seqs} x {per} prompt tokens in {len(mbs)} micro-batches; median of '
          f'{args.repeats} rounds')
    print(f'{"sums":>10s} {"pass s":>8s} {"tp wait s":>10s}')
    med = {mode: [statistics.median(v) for v in zip(*r)] for mode, r in runs.items()}
    for mode, label in ((False, 'in place'), (True, 'overlapped')):
        print(f'{label:>10s} {med[mode][0]:8.3f} {med[mode][1]:10.3f}')
    print(f'in place / overlapped pass time: {med[False][0] / med[True][0]:.3f}; '
          f'logits bit-identical: {"yes" if same else "NO"}')


if __name__ == '__main__':
    main()
