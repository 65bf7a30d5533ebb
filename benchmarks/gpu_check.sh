#!/usr/bin/env bash
# Every GPU check of mpimoe in one go, for whoever has a CUDA GPU at hand:
#
#     bash benchmarks/gpu_check.sh            # from the repository root
#
# Steps, each with its own time limit (about 6 minutes in all on an H100/H200),
# each printed PASS or FAIL; the exit status is the number that failed:
#   probe    what this machine offers: GPU, CuPy, NumPy, MPI library, CUDA-aware MPI
#   unit     tests/test_gpu.py: 16-bit values, GEMMs (FP32 accumulation, split-K),
#            experts, an MoE layer and the whole tiny model on the device
#   engine   tests/test_gpu_engine.py: `mpimoe run --backend cupy` under mpiexec
#            against the CPU reference (host and device staging, empty
#            micro-batches, 2 front-ends on packed:4, bias balancing, float16, a
#            --tp 2 group)
#   bench    `mpimoe bench gpu` on 2 ranks: expert GEMM TFLOP/s next to a square
#            matmul, one MoE layer against a PyTorch loop, decode steps of small
#            at B = 8, 64, 256, MPI transfer rates
#   overlap  `mpimoe bench moe-layer --backend cupy` on 2 ranks sharing the GPU: a
#            Mixtral-sized layer (4096 -> 14336 SwiGLU, 8 experts, top-2, 4096 tokens)
#            over MPI, its overlap efficiency (goal >= 0.8) and the check
#            against the layer on one rank
#
# PYTHON (default python3) is the interpreter with mpimoe importable (an
# editable install, or PYTHONPATH=.); logs go to $OUT, or to ./gpu-check.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${OUT:-gpu-check}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
FAILED=0
declare -a SUMMARY

step() {            # step NAME SECONDS COMMAND...: run, keep the log, say PASS/FAIL
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$LOGS/$name.log"
    local verdict=PASS
    if [ "$rc" -ne 0 ]; then
        verdict=FAIL
        FAILED=$((FAILED + 1))
        [ "$rc" -eq 124 ] && verdict="FAIL (timed out)"
    fi
    SUMMARY+=("$name: $verdict (rc $rc, $((SECONDS - t0)) s)")
    echo "=== $name: $verdict"
}

step probe 60 "$PYTHON" - <<'EOF'
import numpy
from mpimoe.backends.backend import cuda_problem, mpi_cuda_support, probe_cuda
probe = probe_cuda()
print('CuPy', probe.cupy_version, '| devices', probe.n_devices, '| NumPy', numpy.__version__)
problem = cuda_problem(probe)
if problem is None:
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(0)
    print('GPU 0:', props['name'], '| CUDA runtime', cupy.cuda.runtime.runtimeGetVersion())
from mpi4py import MPI
print('mpi4py', __import__('mpi4py').__version__, '|', MPI.Get_library_version().splitlines()[0])
print('MPI reports CUDA support:', mpi_cuda_support(MPI))
raise SystemExit(f'no usable GPU: {problem}' if problem else 0)
EOF

step unit 150 "$PYTHON" -m pytest -q -rs tests/test_gpu.py
step engine 300 "$PYTHON" -m pytest -q -rs tests/test_gpu_engine.py
# python -c "$ON_2_RANKS" ARGS...: `mpimoe ARGS` on 2 ranks, under the mpiexec the tests use
ON_2_RANKS="
import subprocess, sys
sys.path.insert(0, 'tests')
from mpirun import mpiexec_path
sys.exit(subprocess.call([mpiexec_path(), '-n', '2', sys.executable, '-m', 'mpi4py', '-m',
                          'mpimoe', *sys.argv[1:]]))"
step bench 150 "$PYTHON" -c "$ON_2_RANKS" bench gpu --repeats 5
step overlap 180 "$PYTHON" -c "$ON_2_RANKS" bench moe-layer --backend cupy --placement packed:8 \
    --d-model 4096 --d-expert 14336 --kind swiglu --tokens 4096 --repeats 5

echo "=== summary"
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
