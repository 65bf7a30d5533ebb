"""`mpimoe bench moe-layer` in its smallest form: it runs the engine's own
stages, so an engine change that breaks it must fail here (no speed asserted)."""

import re

import pytest

from mpirun import mpiexec
from mpimoe.planning.costmodel import load_calibration


@pytest.mark.timeout(150)
def test_moe_layer_bench_runs_and_matches_the_local_layer(tmp_path):
    cal = tmp_path / 'cal.json'
    proc = mpiexec(5, ['bench', 'moe-layer', '--d-model', 64, '--experts', 4, '--d-expert', 128,
                       '--tokens', 256, '--repeats', 1, '--warmup', 0,
                       '--calibration-out', cal], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r'RATIO layer / GEMMs only \(\d threads\)\s+\d', proc.stdout), proc.stdout
    assert 'check: max |layer - single-process moe_local| = 0' in proc.stdout, proc.stdout
    m = re.search(r'overlap efficiency (-?[\d.]+) = \(T_comm ([\d.]+) \+ T_comp ([\d.]+) - '
                  r'T_layer ([\d.]+)\)', proc.stdout)
    assert m, proc.stdout
    eff, comm, comp, layer = map(float, m.groups())
    assert comm > 0 and comp > 0 and layer > 0
    # the measured rate is what `mpimoe plan --calibration` reads
    constants = load_calibration(cal)
    assert constants['gemm_tflops'] > 0 and constants['gemm_efficiency'] == 1.0


@pytest.mark.timeout(90)
def test_moe_layer_bench_on_cupy_without_a_gpu_says_so_once():
    """--backend cupy where CuPy or a GPU is missing: one line from rank 0, a
    non-zero exit, before any weights are built (the GPU run is in
    tests/test_gpu_engine.py)."""
    from mpimoe.backends.backend import cuda_problem, probe_cuda
    if cuda_problem(probe_cuda()) is None:
        pytest.skip('a GPU is usable here: tests/test_gpu_engine.py runs this bench on it')
    proc = mpiexec(2, ['bench', 'moe-layer', '--placement', 'packed:8', '--backend', 'cupy'],
                   timeout=60)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if 'error' in line]
    assert len(errors) == 1 and errors[0].startswith('mpimoe: error: --backend cupy: '), \
        proc.stderr
