"""Every script under benchmarks/ imports (what it uses of mpimoe still
exists) and answers --help; the figures themselves are never asserted."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / 'benchmarks').glob('*.py'))


@pytest.mark.parametrize('script', SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_benchmark_script_answers_help(script):
    proc = subprocess.run([sys.executable, str(script), '--help'], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert 'usage' in proc.stdout.lower(), proc.stdout
