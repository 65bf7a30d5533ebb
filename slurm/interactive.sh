#!/bin/bash
# Interactive try-out inside an allocation, e.g. after
#   salloc --nodes=1 --ntasks-per-node=9 --gpus-per-node=8 --time=00:30:00
# 1 front-end + 8 expert ranks (tiny preset, per-layer placement).
set -euo pipefail
mpimoe init-weights --preset tiny --out /tmp/tiny.h5 --overwrite
mpimoe make-input --weights /tmp/tiny.h5 --num-seqs 64 --min-len 8 --max-len 64 \
    --out /tmp/in.jsonl --overwrite
srun -K1 -n 9 python -m mpi4py -m mpimoe run --weights /tmp/tiny.h5 \
    --input /tmp/in.jsonl --output /tmp/out.h5 --max-new-tokens 8 --overwrite
