"""`mpimoe report`: summary text and plots from the run.json of a real run."""

import subprocess
import sys

import pytest

from mpirun import mpiexec
from mpimoe.cli.report import load_report, summarize


@pytest.fixture(scope='module')
def run_json(tiny_weights, tiny_inputs, tmp_path_factory):
    """run.json of a real 1 + 8 rank run of tiny (3 new tokens per sequence)."""
    d = tmp_path_factory.mktemp('report')
    proc = mpiexec(9, ['run', '--weights', tiny_weights, '--input', tiny_inputs,
                       '--output', d / 'out.h5', '--max-new-tokens', 3,
                       '--metrics', d / 'run.json'], timeout=120)
    assert proc.returncode == 0, proc.stderr
    return str(d / 'run.json')


@pytest.mark.timeout(150)
def test_summary_names_layers_and_ranks(run_json):
    text = summarize(load_report(run_json))
    assert 'placement per-layer on 9 ranks' in text
    for layer in (1, 2, 3):
        assert f'layer   {layer}:' in text
    assert 'front-ends (1)' in text and 'experts (8)' in text


@pytest.mark.timeout(150)
def test_cli_writes_pngs(run_json, tmp_path):
    pytest.importorskip('matplotlib')
    proc = subprocess.run([sys.executable, '-m', 'mpimoe', 'report', run_json,
                           '--png', str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in ('expert_loads.png', 'rank_times.png'):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 1000


def test_not_a_report_is_one_line_error(tmp_path):
    bad = tmp_path / 'x.json'
    bad.write_text('{"a": 1}')
    proc = subprocess.run([sys.executable, '-m', 'mpimoe', 'report', str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 65
    assert proc.stderr.startswith('mpimoe: error:') and proc.stderr.count('\n') == 1
