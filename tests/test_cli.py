"""The ``mpimoe`` command line as a user meets it: every option explained, no
silent abbreviations, `mpimoe run` without a launcher told how to launch, and
the progress lines of a batch log (mpimoe/runtime/progress.py)."""

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpimoe.cli.main import _build_parser, main
from mpimoe.runtime.progress import Progress

REPO = Path(__file__).resolve().parents[1]


def _parsers(parser, name='mpimoe'):
    """(name, parser) of ``parser`` and of every subcommand below it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _parsers(p, f'{name} {sub}')


def test_every_option_and_subcommand_has_help():
    missing = []
    for name, parser in _parsers(_build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not (action.help or '').strip():
                missing.append(f'{name} {"/".join(action.option_strings) or action.dest}')
            if isinstance(action, argparse._SubParsersAction):
                missing += [f'{name} {c.dest}' for c in action._choices_actions
                            if not (c.help or '').strip()]
    assert missing == []


def test_every_parser_refuses_abbreviations():
    assert [n for n, p in _parsers(_build_parser()) if p.allow_abbrev] == []


@pytest.mark.parametrize('argv, unknown', [
    (['run', '--weights', 'w.h5', '--input', 'in.jsonl', '--output', 'o.h5',
      '--max-new', '5'], '--max-new 5'),
    (['plan', '--preset', 'tiny', '--gpus', '9', '--micro', '2'], '--micro 2'),
    (['bench', 'moe-layer', '--token', '64'], '--token 64'),
])
def test_abbreviated_option_is_a_usage_error(argv, unknown, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f'mpimoe: error: unrecognized arguments: {unknown}' in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_a_usage_error_under_mpiexec_is_printed_once():
    """Every rank parses the command line; only rank 0 says what is wrong."""
    from mpirun import mpiexec
    proc = mpiexec(3, ['run', '--weights', 'w.h5', '--input', 'in.jsonl', '--output', 'o.h5',
                       '--tp', '2.5'], timeout=50)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if 'error:' in line]
    assert errors == ["mpimoe run: error: argument --tp: '2.5': expected an integer"], \
        proc.stderr
    assert proc.stderr.count('usage: mpimoe run') == 1, proc.stderr


def test_a_usage_error_outside_mpi_subcommands_is_printed_whatever_the_rank(capsys,
                                                                           monkeypatch):
    """A single-process subcommand started as task 1 of srun (or under a rank's
    PMI_RANK) still says what is wrong: only `run` and `bench` keep quiet
    on ranks other than 0."""
    monkeypatch.setenv('PMI_RANK', '1')
    with pytest.raises(SystemExit) as exit_:
        main(['plan', '--preset', 'tiny', '--gpus', 'x'])
    assert exit_.value.code == 2
    assert "mpimoe plan: error: argument --gpus: invalid int value: 'x'" \
        in capsys.readouterr().err


def test_plan_refuses_micro_batches_that_run_would(capsys):
    assert main(['plan', '--preset', 'tiny', '--gpus', '9', '--micro-batches', '100']) == 2
    assert capsys.readouterr().err.strip() == \
        'mpimoe: error: --micro-batches 100: must be in 1..64'


def _mpimoe(*args, cwd):
    """``python -m mpimoe ARGS`` without any MPI launcher -> CompletedProcess."""
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
        [str(REPO), os.environ.get('PYTHONPATH', '')])}
    return subprocess.run([sys.executable, '-m', 'mpimoe', *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(90)
@pytest.mark.parametrize('extra, fits', [
    ([], 'for {w}: placement per-layer needs 8 expert ranks + F front-ends: world size '
     'must be >= 9 (got 1)'),
    (['--placement', 'packed:2', '--frontends', '2'], 'world size must be 6 or 14 (got 1)'),
])
def test_run_without_launcher_says_how_to_launch(tiny_weights, tiny_inputs, tmp_path,
                                                 extra, fits):
    r = _mpimoe('run', '--weights', tiny_weights, '--input', tiny_inputs, '--output', 'o.h5',
                *extra, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ''
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('mpimoe: error: `mpimoe run` is an MPI '
                                                   'program and has only 1 rank'), r.stderr
    for fragment in ('mpiexec -n P python -m mpi4py -m mpimoe run',
                     'srun -K1 -n P python -m mpi4py -m mpimoe run',
                     fits.format(w=tiny_weights), '`mpimoe plan --preset NAME --gpus P`'):
        assert fragment in lines[0], (fragment, lines[0])
    assert list(tmp_path.iterdir()) == []


# -- progress lines (what `mpimoe run` and `mpimoe reference` show) -----------

class _Clock:
    """A clock the test moves: ``clock.now += 7``."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_in_a_log_starts_at_once_then_a_line_per_chunk_at_most_every_s():
    log, clock = io.StringIO(), _Clock()
    p = Progress(total=10, stream=log, every=5.0, clock=clock)
    assert log.getvalue() == 'mpimoe: 0/10 sequences, starting\n'
    p.update(1, 100)                     # the first chunk: always, at once
    clock.now += 1
    p.update(1, 100)                     # 1 s after the last line: folded into the next
    clock.now += 2
    p.update(1, 100)                     # 3 s: still folded
    clock.now += 3
    p.update(1, 100)                     # 6 s since the last line: shown
    clock.now += 6
    p.update(2, 200)                     # a chunk slower than 5 s: its own line
    clock.now += 0.5
    p.update(4, 400)                     # the last chunk: always
    lines = log.getvalue().splitlines()
    assert [line.split(' (')[0] for line in lines] == [
        'mpimoe: 0/10 sequences, starting', 'mpimoe: 1/10 sequences',
        'mpimoe: 4/10 sequences', 'mpimoe: 6/10 sequences', 'mpimoe: 10/10 sequences']
    # 400 tokens in 6 s; 4 sequences in 6 s leave 6 for 9 s
    assert lines[2] == 'mpimoe: 4/10 sequences (40.0%), 67 tokens/s, ETA 00:00:09'
    assert lines[-1] == 'mpimoe: 10/10 sequences (100.0%), 80 tokens/s, ETA 00:00:00'


def test_progress_of_a_resumed_run_says_so_and_counts_only_new_work():
    log, clock = io.StringIO(), _Clock()
    p = Progress(total=10, done=4, stream=log, every=5.0, clock=clock)
    clock.now += 2
    p.update(2, 300)
    assert log.getvalue().splitlines() == [
        'mpimoe: 4/10 sequences, resuming after 4 committed',
        'mpimoe: 6/10 sequences (60.0%), 150 tokens/s, ETA 00:00:04']


def test_progress_on_a_terminal_is_a_bar_redrawn_at_every_chunk():
    term, clock = _Terminal(), _Clock()
    p = Progress(total=4, stream=term, every=5.0, clock=clock)
    for _ in range(4):
        clock.now += 0.1
        p.update(1, 10)
    draws = term.getvalue().split('\r')[1:]
    assert len(draws) == 5 and draws[0].startswith('[' + '.' * 30 + '] 0/4 sequences')
    assert draws[2].startswith('[' + '#' * 15 + '.' * 15 + '] 2/4 sequences')
    assert draws[-1].startswith('[' + '#' * 30 + '] 4/4 sequences') and draws[-1].endswith('\n')
    assert term.getvalue().count('\n') == 1


def test_installed_console_script_runs():
    """The README's commands start with ``mpimoe``: the entry point setup.py
    installs must import (it once named a module that a reorganisation moved)."""
    script = Path(sys.executable).parent / 'mpimoe'
    if not script.exists():
        pytest.skip('mpimoe is not installed as a console script beside this Python')
    done = subprocess.run([str(script), '--version'], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith('mpimoe ')
