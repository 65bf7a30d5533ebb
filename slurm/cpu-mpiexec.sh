#!/bin/bash
# CPU only, on a workstation or laptop: the MPICH wheel (pip install -e ".[mpich]")
# provides mpiexec; ranks may outnumber cores (oversubscription is fine).
set -euo pipefail
N=${N:-9}
mpimoe init-weights --preset tiny --out /tmp/tiny.h5 --overwrite
mpimoe make-input --weights /tmp/tiny.h5 --num-seqs 64 --min-len 8 --max-len 64 \
    --out /tmp/in.jsonl --overwrite
OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 mpiexec -n "$N" python -m mpi4py -m mpimoe run \
    --weights /tmp/tiny.h5 --input /tmp/in.jsonl --output /tmp/out.h5 \
    --max-new-tokens 8 --metrics /tmp/run.json --overwrite
