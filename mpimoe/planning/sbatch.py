"""Slurm job scripts for a plan (``mpimoe plan --emit-sbatch``): one task per
GPU, the run options that rebuild the same plan, and the requeue-on-time-limit
protocol (slurm/mpimoe.sbatch is one such script)."""

import os
import shlex

from mpimoe.errors import ConfigError, DataError
from mpimoe.planning.placement import positive_int

__all__ = ['sbatch_script', 'write_sbatch']


def sbatch_script(plan, model_args, micro_batches=2, kv_tokens=None, max_seqs=None, stats=None):
    """A Slurm job script that runs ``plan``: one task per GPU, ``plan.gpus_per_node``
    per node, ``srun -K1 python -m mpi4py -m mpimoe run ... --placement MODE
    --frontends F`` (and ``--tp T``).  ``model_args`` (e.g. ``'--preset paper-61l'``) completes the
    `mpimoe plan` command recorded in a comment.  A plan made with loads needs
    ``stats``, the run.json they came from: the job passes it (and the replica
    count) to `mpimoe run`, which computes the same plan.  kv_tokens, max_seqs:
    a front-end's KV pool and running sequences, as planned (None: the run's
    defaults)."""
    if (plan.loads is None) != (stats is None):
        raise ConfigError('sbatch_script: give stats exactly when the plan has loads')
    placement = [f'--placement {plan.mode}', f'--frontends {plan.n_frontend_groups}']
    if plan.tp > 1:
        placement.append(f'--tp {plan.tp}')
    if stats is not None:
        placement.append(f'--stats {shlex.quote(stats)}')
    if plan.n_replica_ranks:
        placement.append(f'--replicas {plan.n_replica_ranks}')
    run = placement + [f'--micro-batches {positive_int("micro_batches", micro_batches)}']
    if kv_tokens is not None:
        run.append(f'--kv-tokens {kv_tokens}')
    if max_seqs is not None:
        run.append(f'--max-seqs {max_seqs}')
    return _SBATCH.format(
        command=f'mpimoe plan {model_args} --gpus {plan.world_size} --gpus-per-node '
                f'{plan.gpus_per_node} {" ".join(placement)} --emit-sbatch FILE',
        summary=f'{plan.cfg.n_layers}-layer model, placement {plan.mode}: {plan.n_frontends} '
                f'front-ends{"" if plan.tp == 1 else f" in groups of {plan.tp}"} + '
                f'{plan.n_expert_ranks} expert ranks, plan hash {plan.plan_hash()}',
        nodes=plan.n_nodes, ntasks=plan.world_size, per_node=plan.gpus_per_node,
        run_options=' '.join(run))


#: The job script of :func:`sbatch_script` (slurm/mpimoe.sbatch is one).
_SBATCH = '''#!/bin/bash
# Written by: {command}
# {summary}
# (`mpimoe run` prints its plan hash: it must match this one.)
#
#   WEIGHTS=model.h5 INPUT=prompts.jsonl OUTPUT=out.h5 sbatch THIS_FILE
#
# How a long job survives its time limit:
#  - --signal=B:USR1@120 sends SIGUSR1 to this batch shell 120 s before the limit;
#  - the trap below forwards it to the job step (srun passes it to every task);
#  - mpimoe stops at the next step (forward pass), keeps the committed
#    rounds, writes this segment's run report and exits with 75;
#  - this script then requeues the job (--requeue), which reruns the same
#    command: it resumes after the last committed round; --open-mode=append
#    keeps one log across requeues.  A launcher that reports the clean stop
#    with another code is not trusted alone: the segment's report
#    ("outcome": "stopped") also requeues.
#  A job killed outright (node failure, scancel -9) resumes the same way when
#  resubmitted with the same OUTPUT: only the round in flight is lost.
#SBATCH --job-name=mpimoe
#SBATCH --nodes={nodes}
#SBATCH --ntasks={ntasks}
#SBATCH --ntasks-per-node={per_node}
#SBATCH --gpus-per-node={per_node}
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=mpimoe-%j.out

set -uo pipefail
WEIGHTS=${{WEIGHTS:?set WEIGHTS to the HDF5 weight file}}
INPUT=${{INPUT:?set INPUT to the token file (.jsonl or .h5)}}
OUTPUT=${{OUTPUT:-out.h5}}          # the same name on every requeue: that is what resumes
MAX_NEW_TOKENS=${{MAX_NEW_TOKENS:-64}}

# mpi4py must be built against the site MPI (README: "Install and test").
export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK
echo "mpimoe: job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NUM_NODES nodes"
# one run report per segment: a stale one never decides a requeue
METRICS="run-$SLURM_JOB_ID-${{SLURM_RESTART_COUNT:-0}}.json"

# -K1: end the whole step when one task fails; python -m mpi4py: an uncaught
# exception on any rank aborts all of them.
srun -K1 --cpu-bind=cores python -m mpi4py -m mpimoe run \\
    --weights "$WEIGHTS" --input "$INPUT" --output "$OUTPUT" \\
    {run_options} \\
    --max-new-tokens "$MAX_NEW_TOKENS" --metrics "$METRICS" \\
    --log-dir "logs-$SLURM_JOB_ID" &
step=$!
trap 'echo "mpimoe: time limit near, asking the job step to stop"; kill -USR1 "$step"' USR1
# `wait` returns early when the trap fires: wait again until the step has ended
while true; do
    wait "$step"; rc=$?
    kill -0 "$step" 2>/dev/null || break
done

if [ "$rc" -eq 75 ] || grep -q '"outcome": "stopped"' "$METRICS" 2>/dev/null; then
    echo "mpimoe: stopped cleanly; requeueing to resume"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
'''


def write_sbatch(path, text):
    """Write the job script ``text`` to ``path`` (atomically); an existing file
    is never replaced (DataError)."""
    from mpimoe.io.files import atomic_write, check_writable
    if os.path.exists(path):
        raise DataError(f'--emit-sbatch {path}: file exists; remove it or choose another '
                        f'name')
    check_writable(path, '--emit-sbatch', overwrite=False)
    with atomic_write(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
