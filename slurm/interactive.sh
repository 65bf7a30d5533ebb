#!/bin/bash
# Interactive try-out inside an allocation, e.g. after
#   salloc --nodes=1 --ntasks-per-node=9 --gpus-per-node=8 --time=00:30:00
# 1 front-end + 8 expert ranks (tiny preset, per-layer placement).
#
# The files go to DIR (default: mpimoe-try/ in the current directory), not to
# /tmp: this shell may run on a login node, the srun tasks run on compute
# nodes, and those see the shared filesystem (home, project, scratch: run this
# from there) but not this node's /tmp.
set -euo pipefail
DIR=${DIR:-$PWD/mpimoe-try}
mkdir -p "$DIR"
mpimoe init-weights --preset tiny --out "$DIR/tiny.h5" --overwrite
mpimoe make-input --weights "$DIR/tiny.h5" --num-seqs 64 --min-len 8 --max-len 64 \
    --out "$DIR/in.jsonl" --overwrite
srun -K1 -n 9 python -m mpi4py -m mpimoe run --weights "$DIR/tiny.h5" \
    --input "$DIR/in.jsonl" --output "$DIR/out.h5" --max-new-tokens 8 \
    --metrics "$DIR/run.json" --overwrite
