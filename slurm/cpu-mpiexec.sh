#!/bin/bash
# CPU only, on a workstation or laptop: the MPICH wheel (pip install -e ".[mpich]")
# provides mpiexec; ranks may outnumber cores (oversubscription is fine).
# Every rank runs on this machine, so its temporary directory is fine for the
# files (DIR, default $TMPDIR/mpimoe-try or /tmp/mpimoe-try).
set -euo pipefail
N=${N:-9}
DIR=${DIR:-${TMPDIR:-/tmp}/mpimoe-try}
mkdir -p "$DIR"
mpimoe init-weights --preset tiny --out "$DIR/tiny.h5" --overwrite
mpimoe make-input --weights "$DIR/tiny.h5" --num-seqs 64 --min-len 8 --max-len 64 \
    --out "$DIR/in.jsonl" --overwrite
OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 mpiexec -n "$N" python -m mpi4py -m mpimoe run \
    --weights "$DIR/tiny.h5" --input "$DIR/in.jsonl" --output "$DIR/out.h5" \
    --max-new-tokens 8 --metrics "$DIR/run.json" --overwrite
