"""Streaming inputs and the resumable (chunked) output writer, in one process."""

import io

import numpy as np
import pytest

from mpimoe.errors import DataError
from mpimoe.io.inputs import InputStream, read_inputs, write_synthetic_inputs
from mpimoe.io.outputs import OutputWriter, read_outputs
from mpimoe.runtime.progress import Progress

VOCAB = 64


@pytest.fixture(params=['in.jsonl', 'in.h5'])
def inputs(tmp_path, request):
    path = tmp_path / request.param
    write_synthetic_inputs(path, VOCAB, num_seqs=40, min_len=1, max_len=30, seed=3)
    return path


def test_stream_batches_cover_the_file_within_budget(inputs):
    whole = read_inputs(inputs, VOCAB)
    stream = InputStream(inputs, VOCAB)
    assert len(stream) == len(whole) == 40
    got, expect = [], 0
    for first, batch in stream.batches(budget=50):
        assert first == expect
        assert len(batch) == 1 or batch.lengths.sum() <= 50
        got += [batch.seq(i) for i in range(len(batch))]
        expect += len(batch)
    assert expect == 40
    assert all(np.array_equal(g, whole.seq(i)) for i, g in enumerate(got))


def test_stream_batches_do_not_depend_on_the_restart_point(inputs):
    stream = InputStream(inputs, VOCAB)
    full = [(first, len(b)) for first, b in stream.batches(budget=50)]
    cut = full[2][0]
    resumed = [(first, len(b)) for first, b in stream.batches(budget=50, start=cut)]
    assert resumed == full[2:]


def test_stream_duplicate_id_found_across_batches(tmp_path):
    path = tmp_path / 'dup.jsonl'
    path.write_text('{"id": "a", "tokens": [1, 2]}\n{"id": "b", "tokens": [3]}\n'
                    '{"id": "a", "tokens": [4]}\n')
    with pytest.raises(DataError, match="dup.jsonl:3: duplicate id 'a' \\(first on line 1\\)"):
        list(InputStream(path, VOCAB).batches(budget=1))


def _results(n, vocab=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = [f's{i}' for i in range(n)]
    gen = [rng.integers(0, vocab, size=3).astype(np.int32) for _ in range(n)]
    return ids, gen, rng.standard_normal((n, vocab)).astype(np.float32)


IDENT = {'input_sha256': 'abc', 'max_new_tokens': 3}


def _write(writer, ids, gen, logits, lo, hi):
    writer.write(np.arange(lo, hi), ids[lo:hi], gen[lo:hi], logits[lo:hi],
                 finish_reasons=['length'] * (hi - lo), prompt_tokens=np.full(hi - lo, 2))


def test_resume_after_a_failure_equals_an_uninterrupted_run(tmp_path):
    ids, gen, logits = _results(6)
    whole = tmp_path / 'whole.h5'
    with OutputWriter(whole, 6, 16, True, {}, IDENT) as w:
        for lo, hi in ((0, 2), (2, 4), (4, 6)):
            _write(w, ids, gen, logits, lo, hi)
    out = tmp_path / 'out.h5'
    with pytest.raises(KeyboardInterrupt):
        with OutputWriter(out, 6, 16, True, {}, IDENT) as w:
            _write(w, ids, gen, logits, 0, 2)
            _write(w, ids, gen, logits, 2, 4)
            raise KeyboardInterrupt     # killed before the third chunk
    assert not out.exists()
    # a chunk being written at the moment of the kill is not committed
    (tmp_path / 'out.h5.chunks' / '000000000004-000000000006.h5.tmp').write_bytes(b'torn')
    w = OutputWriter(out, 6, 16, True, {}, IDENT)
    assert w.written == 4
    with w:
        _write(w, ids, gen, logits, 4, 6)
    a, b = read_outputs(whole), read_outputs(out)
    assert a['ids'] == b['ids'] == ids
    assert all(np.array_equal(x, y) for x, y in zip(a['generated'], b['generated']))
    assert np.array_equal(a['last_logits'], b['last_logits'])
    assert not (tmp_path / 'out.h5.chunks').exists()


def test_resume_with_other_identity_is_refused_and_touches_nothing(tmp_path):
    ids, gen, logits = _results(4)
    out = tmp_path / 'out.h5'
    with pytest.raises(RuntimeError, match='only 2 of 4 sequences'):
        with OutputWriter(out, 4, 16, True, {}, IDENT) as w:
            _write(w, ids, gen, logits, 0, 2)
    chunks = sorted(p.name for p in (tmp_path / 'out.h5.chunks').iterdir())
    with pytest.raises(DataError, match="max_new_tokens 3 then, 5 now.*--overwrite"):
        OutputWriter(out, 4, 16, True, {}, {**IDENT, 'max_new_tokens': 5})
    with pytest.raises(DataError, match="save_logits 1 then, 0 now"):
        OutputWriter(out, 4, 16, False, {}, IDENT)
    assert sorted(p.name for p in (tmp_path / 'out.h5.chunks').iterdir()) == chunks
    fresh = OutputWriter(out, 4, 16, True, {}, {**IDENT, 'max_new_tokens': 5}, overwrite=True)
    assert fresh.written == 0


def test_progress_lines_for_a_log_file():
    stream = io.StringIO()
    p = Progress(total=10, done=2, stream=stream, every=0.0)
    p.update(3, 300)
    p.update(5, 500)
    lines = stream.getvalue().splitlines()
    assert lines[0] == 'mpimoe: 2/10 sequences, resuming after 2 committed'
    assert lines[1].startswith('mpimoe: 5/10 sequences (50.0%)')
    assert lines[-1].startswith('mpimoe: 10/10 sequences (100.0%)') and 'ETA 00:00:00' in lines[-1]
