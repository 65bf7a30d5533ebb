"""Token-sequence inputs and the HDF5 output format.

Inputs are streamed a batch at a time by :class:`InputStream` (or read whole
by :func:`read_inputs`) into :class:`Inputs` (flat tokens plus offsets);
:func:`write_synthetic_inputs` writes random ones.  Outputs are committed batch
by batch by :class:`OutputWriter` (resumable) and read back by
:func:`read_outputs`.  No file appears under its final name before it is
complete, so an existing ``PATH`` is never half-overwritten.

## Input formats

The format is chosen by the extension: `.jsonl`/`.json` or `.h5`/`.hdf5`.

- **JSONL**: one sequence per line, `{"id": "doc-1", "tokens": [5, 17, 3]}`;
  blank lines are skipped; an integer id is read as its decimal string.
- **HDF5**: `tokens` (int32 or int64 `[total]`, all sequences concatenated),
  `offsets` (int64 `[n+1]`, `offsets[0] = 0`, increasing, `offsets[n] = total`;
  sequence `i` is `tokens[offsets[i]:offsets[i+1]]`), `ids` (`[n]`
  variable-length UTF-8 strings, `h5py.string_dtype()`).

Ids are unique, at most 1024 bytes of UTF-8, without NUL; every sequence has
at least one token; every token id is in `[0, vocab_size)`.  A run also
requires prompt + `max_new_tokens` <= the model's `max_position_embeddings`
and prompt <= `batch_tokens`.  All of it is checked when the file is opened.

## Output format (`mpimoe reference` and the engine write the same file)

One HDF5 file:

| dataset | dtype | shape | content |
|---|---|---|---|
| `ids` | UTF-8 string | `[n]` | sequence ids, in input order |
| `generated` | int32 | `[total_new]` | the new tokens of all sequences, concatenated in input order |
| `generated_offsets` | int64 | `[n+1]` | sequence `i` generated `generated[generated_offsets[i]:generated_offsets[i+1]]` |
| `last_logits` | float32 | `[n, vocab_size]` | optional (`--save-logits`): logits at the last prompt position |

Root attributes: `format = "mpimoe-output"`, `format_version = 1`, and the run's
metadata (str, int or float values; e.g. `weights`, `max_new_tokens`,
`mpimoe_version`).  The file appears under its final name only once all `n`
sequences are written; until then the committed batches are in `OUTPUT.chunks/`
with `manifest.json` (the run's identity; each chunk's range, size and sha256),
and `OUTPUT.lock` names the job writing them (:class:`OutputLock`).
"""

import contextlib
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from array import array
from dataclasses import dataclass

import h5py
import numpy as np

from mpimoe.errors import DataError, IOFailure, UsageError
from mpimoe.paths import regular_file

__all__ = ['Inputs', 'InputStream', 'read_inputs', 'file_digest', 'open_job', 'read_json', 'write_json', 'write_synthetic_inputs',
           'OutputWriter', 'OutputLock', 'read_outputs', 'atomic_write', 'check_writable',
           'os_errors']

log = logging.getLogger('mpimoe')

OUTPUT_FORMAT = 'mpimoe-output'
OUTPUT_VERSION = 1
_EXTENSIONS = {'.jsonl': 'jsonl', '.json': 'jsonl', '.h5': 'hdf5', '.hdf5': 'hdf5'}


@dataclass(frozen=True, eq=False)
class Inputs:
    """``n`` token sequences stored flat.

    ids: list[str] [n]; tokens: int32 [total]; offsets: int64 [n+1]
    """

    ids: list
    tokens: np.ndarray
    offsets: np.ndarray

    def __len__(self):
        return len(self.ids)

    def seq(self, i):
        """Sequence ``i``: int32 [lengths[i]], a view into ``tokens``."""
        if not 0 <= i < len(self):
            raise IndexError(f'sequence {i} out of range [0, {len(self)})')
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self):
        """int64 [n]: tokens per sequence."""
        return np.diff(self.offsets)


def _format_of(path):
    """'jsonl' or 'hdf5' from the extension of ``path``; UsageError otherwise."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
        raise UsageError(f'{path}: unknown extension {ext or "(none)"!r}; use .jsonl/.json '
                         '(JSON lines) or .h5/.hdf5 (HDF5)')
    return _EXTENSIONS[ext]


def _check_vocab(vocab_size):
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) \
            or vocab_size < 1:
        raise UsageError(f'vocab_size={vocab_size!r}: must be an integer >= 1')


def read_inputs(path, vocab_size):
    """Read and validate all token sequences of ``path`` (.jsonl/.json or .h5/.hdf5).

    Any defect raises DataError naming the file and the line (JSONL) or the
    sequence index and id (HDF5).
    """
    return next(InputStream(path, vocab_size).batches(budget=None))[1]


class InputStream:
    """The sequences of an input file, read in order, a batch at a time, so an
    input larger than memory never is in memory whole.

        stream = InputStream(path, vocab_size, max_new_tokens=16, context=4096,
                             batch_tokens=4096)
        len(stream)                                   # sequences in the file
        for first, batch in stream.batches(budget=4096):
            ...                                       # batch: Inputs; first: its index

    Opening validates the whole file, so that every defect is found before
    any compute (a JSONL file in the one read that also takes its digest,
    ``sha256``): every line or slab parses, keys, types, ids
    (:func:`_check_id`) and token ids are right, the ids are unique, and every
    prompt fits: prompt + ``max_new_tokens`` <= ``context`` (the model's
    max_position_embeddings) and prompt <= ``batch_tokens`` (the budget of a
    batch, which bounds its memory); None: no limit.  Memory: one line or slab
    at a time and the hash of every id (8 bytes per sequence; twice that while
    they are sorted).
    """

    def __init__(self, path, vocab_size, max_new_tokens=0, context=None, batch_tokens=None):
        self.path = os.fspath(path)
        self.format = _format_of(self.path)
        _check_vocab(vocab_size)
        self.vocab_size, self.max_new_tokens = vocab_size, max_new_tokens
        self.context, self.batch_tokens = context, batch_tokens
        if context is not None and max_new_tokens >= context:
            raise UsageError(f'--max-new-tokens {max_new_tokens}: leaves no room for a prompt '
                             f'in the context length of the model (max_position_embeddings = '
                             f'{context}); lower it')
        # the longest prompt that fits both limits
        self.max_prompt = min(np.inf if context is None else context - max_new_tokens,
                              np.inf if batch_tokens is None else batch_tokens)
        if not os.path.isfile(self.path):
            raise DataError(f'{self.path}: input file not found')
        with _reading(self.path):
            if self.format == 'jsonl':
                hashes, self.sha256 = self._validate_jsonl()
            else:
                hashes, self.sha256 = self._validate_hdf5(), file_digest(self.path)
        self.n = len(hashes)
        if self.n == 0:
            raise DataError(f'{self.path}: no sequences')
        self._check_unique(np.frombuffer(hashes, dtype=np.int64))

    def __len__(self):
        return self.n

    def batches(self, budget, start=0):
        """Yield (first index, Inputs) for consecutive batches of at most
        ``budget`` prompt tokens (a longer sequence is a batch of its own,
        which a stream opened with ``batch_tokens=budget`` refused; None: one
        batch of everything), formed from the first sequence on, so the
        batches are the same whatever ``start``; those ending at or before
        sequence ``start`` are skipped (they were done before a restart)."""
        first, ids, chunks, used = 0, [], [], 0
        for i, (_, seq_id, tokens) in enumerate(self._sequences()):
            if ids and budget is not None and used + len(tokens) > budget:
                if first + len(ids) > start:
                    yield first, _pack(ids, chunks)
                first, ids, chunks, used = i, [], [], 0
            ids.append(seq_id)
            chunks.append(tokens)
            used += len(tokens)
        if ids and first + len(ids) > start:
            yield first, _pack(ids, chunks)

    def _validate_jsonl(self):
        """Parse and check every line, hashing the file on the way: (id
        hashes array('q') [n], sha256 hex)."""
        digest, hashes = hashlib.sha256(), array('q')
        for lineno, raw in _jsonl_lines(self.path, digest):
            where = f'{self.path}:{lineno}'
            seq_id, tokens = _parse_line(where, raw, self.vocab_size)
            if len(tokens) > self.max_prompt:
                raise DataError(f'{where}: id {_id_text(seq_id)}: '
                                f'{self._too_long(len(tokens))}')
            hashes.append(hash(seq_id))
        return hashes, digest.hexdigest()

    def _validate_hdf5(self):
        """Check every slab: id hashes array('q') [n]."""
        hashes = array('q')
        for a, ids, _, offsets in _hdf5_slabs(self.path, self.vocab_size):
            lengths = np.diff(offsets)
            bad = np.flatnonzero(lengths > self.max_prompt)
            if bad.size:
                j = int(bad[0])
                raise DataError(f'{self.path}: sequence {a + j} (id {_id_text(ids[j])}): '
                                f'{self._too_long(int(lengths[j]))}')
            hashes.extend(map(hash, ids))
        return hashes

    def _too_long(self, n):
        """Why a prompt of ``n`` > max_prompt tokens cannot run, and what to do."""
        total = n + self.max_new_tokens
        if self.context is not None and total > self.context:
            return (f'{n} prompt tokens + {self.max_new_tokens} new (--max-new-tokens) = '
                    f'{total} exceed the context length of the model (max_position_embeddings'
                    f' = {self.context}); shorten the prompt or lower --max-new-tokens')
        return (f'{n} prompt tokens exceed --batch-tokens {self.batch_tokens}, the budget of '
                f'one batch (which bounds its memory); raise --batch-tokens to {n} or shorten '
                'the prompt')

    def _check_unique(self, hashes):
        """DataError naming the first sequence whose id an earlier one has.

        hashes: int64 [n], the ids' hashes; the sequences that share a hash
        (nearly always none) are re-read to compare their ids, as different
        ids may have equal hashes, though rarely.
        """
        ordered = np.sort(hashes)
        shared = ordered[1:][ordered[1:] == ordered[:-1]]
        if not shared.size:
            return
        suspects = set(np.flatnonzero(np.isin(hashes, shared)).tolist())
        first = {}
        for k, (pos, seq_id, _) in enumerate(self._sequences()):
            if k not in suspects:
                continue
            if seq_id in first:
                raise self._duplicate(first[seq_id], pos, seq_id)
            first[seq_id] = pos

    def _duplicate(self, first_pos, pos, seq_id):
        if self.format == 'jsonl':
            return DataError(f'{self.path}:{pos}: duplicate id {_id_text(seq_id)} (first on '
                             f'line {first_pos})')
        return DataError(f'{self.path}: sequence {pos} has id {_id_text(seq_id)}, already '
                         f'used by sequence {first_pos}')

    def _sequences(self):
        """Yield (position, id, tokens int32 [len]) in file order;
        position: line number (JSONL) or sequence index (HDF5)."""
        with _reading(self.path):
            if self.format == 'jsonl':
                yield from _jsonl_sequences(self.path, self.vocab_size)
            else:
                yield from _hdf5_sequences(self.path, self.vocab_size)


@contextlib.contextmanager
def _reading(path):
    """Turn an OSError (no permission, a failing disk, HDF5 data that fails to
    decode) into an IOFailure naming the input ``path``."""
    try:
        yield
    except OSError as e:
        raise IOFailure(f'{path}: cannot read the input: {e.strerror or e}') from None


def _pack(ids, chunks):
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in chunks], out=offsets[1:])
    return Inputs(ids, np.concatenate(chunks), offsets)


def open_job(input_path, output, wf, save_logits, meta, overwrite, *, max_new_tokens,
             batch_tokens, **options):
    """The input stream (validated for ``max_new_tokens`` new tokens in
    batches of ``batch_tokens``) and the (maybe resumed) output writer of a run
    over ``input_path`` with the weights ``wf`` (WeightFile): (InputStream, OutputWriter).

    What must not change for a rerun to resume: the input's bytes, the weights
    (:meth:`WeightFile.identity`) and the ``options`` that change results
    (str/int/float values; batch composition included, so that a resumed
    output is bit for bit an uninterrupted one).  The writer holds the
    output's lock: enter it, or :meth:`~OutputWriter.close` it.
    """
    check_writable(output, '--output', overwrite=True,
                   reads=[('--input', input_path), ('--weights', wf.name)])
    cfg = wf.config
    stream = InputStream(input_path, cfg.vocab_size, max_new_tokens,
                         cfg.max_position_embeddings, batch_tokens)
    identity = {'input_sha256': stream.sha256, 'weights_sha256': wf.identity(),
                'max_new_tokens': max_new_tokens, 'batch_tokens': batch_tokens, **options}
    writer = OutputWriter(output, len(stream), cfg.vocab_size, save_logits, meta,
                          identity, overwrite=overwrite)
    return stream, writer


def read_json(path, what):
    """A JSON document from ``path``; DataError naming ``what`` (e.g. '--stats')
    when the file cannot be read or parsed."""
    regular_file(path, what)
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except OSError as e:
        raise DataError(f'{what} {path}: cannot read: {e.strerror}') from None
    except (ValueError, RecursionError) as e:
        raise DataError(f'{what} {path}: not valid JSON: {e}') from None


def file_digest(path, block=1 << 22):
    """sha256 hex digest of a file, read in blocks (the input's identity)."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


# --- JSONL ---------------------------------------------------------------

#: longest JSONL line, newline included: a longer one is refused, never read whole
MAX_LINE_BYTES = 64 << 20

#: longest id, in bytes of UTF-8
MAX_ID_BYTES = 1024


def _jsonl_lines(path, digest=None):
    """Yield (line number, bytes) of the non-blank lines of ``path``, each read
    with a cap of MAX_LINE_BYTES; ``digest`` (a hashlib object) gets every byte."""
    with open(path, 'rb') as f:
        for lineno in itertools.count(1):
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f'{path}:{lineno}: line longer than {MAX_LINE_BYTES >> 20} MiB '
                                '(a missing newline?); put one sequence per line')
            if digest is not None:
                digest.update(raw)
            if raw.strip():
                yield lineno, raw


def _jsonl_sequences(path, vocab_size):
    for lineno, raw in _jsonl_lines(path):
        seq_id, tokens = _parse_line(f'{path}:{lineno}', raw, vocab_size)
        yield lineno, seq_id, np.array(tokens, dtype=np.int32)


def _parse_line(where, raw, vocab_size):
    """One JSONL line -> (id: str, tokens: list of int), checked; ``where`` is
    'FILE:LINE'."""
    try:
        obj = json.loads(raw.decode('utf-8'))
    except UnicodeDecodeError as e:
        raise DataError(f'{where}: not valid UTF-8 ({e.reason} at byte {e.start})') from None
    except json.JSONDecodeError as e:
        raise DataError(f'{where}: not valid JSON: {e.msg} at column {e.colno}') from None
    except ValueError:          # int('9' * 5000): the int conversion's digit limit
        raise DataError(f'{where}: a number with more than {sys.get_int_max_str_digits()} '
                        'digits, too long for an id or a token id') from None
    except RecursionError:
        raise DataError(f'{where}: JSON nested too deeply; expected '
                        '{"id": ..., "tokens": [...]}') from None
    if not isinstance(obj, dict):
        raise DataError(f'{where}: expected an object {{"id": ..., "tokens": [...]}}, '
                        f'got {type(obj).__name__}')
    for key in ('id', 'tokens'):
        if key not in obj:
            raise DataError(f'{where}: missing key "{key}"')
    seq_id, tokens = obj['id'], obj['tokens']
    if type(seq_id) not in (str, int):
        raise DataError(f'{where}: "id" must be a string or an integer, got '
                        f'{_json_text(seq_id)}')
    seq_id = str(seq_id)
    _check_id(where, seq_id)
    if not isinstance(tokens, list):
        raise DataError(f'{where}: id {_id_text(seq_id)}: "tokens" must be a list of '
                        f'integers, got {type(tokens).__name__}')
    if not tokens:
        raise DataError(f'{where}: id {_id_text(seq_id)}: empty sequence ("tokens" is [])')
    if set(map(type, tokens)) != {int}:
        j, t = next((j, t) for j, t in enumerate(tokens) if type(t) is not int)
        raise DataError(f'{where}: id {_id_text(seq_id)}: tokens[{j}] = {_json_text(t)} '
                        'is not an integer')
    if min(tokens) < 0 or max(tokens) >= vocab_size:
        j, t = next((j, t) for j, t in enumerate(tokens) if not 0 <= t < vocab_size)
        raise DataError(f'{where}: id {_id_text(seq_id)}: token {_json_text(t)} at '
                        f'tokens[{j}] is not in [0, vocab_size={vocab_size})')
    return seq_id, tokens


def _check_id(where, seq_id):
    """DataError unless ``seq_id`` is Unicode text (no lone surrogate: it has no
    UTF-8) without NUL (an HDF5 string ends there) of at most MAX_ID_BYTES bytes."""
    try:
        size = len(seq_id.encode('utf-8'))
    except UnicodeEncodeError as e:
        raise DataError(f'{where}: id {_id_text(seq_id)} has a lone surrogate '
                        f'{seq_id[e.start]!r} at character {e.start} (half of a UTF-16 pair, '
                        'not a character); fix the id') from None
    if '\0' in seq_id:
        raise DataError(f'{where}: id {_id_text(seq_id)} contains NUL at character '
                        f'{seq_id.index(chr(0))}; ids are text without NUL')
    if size > MAX_ID_BYTES:
        raise DataError(f'{where}: id {_id_text(seq_id)} has {size} bytes of UTF-8; ids have '
                        f'at most {MAX_ID_BYTES}')


def _id_text(seq_id, limit=48):
    """repr of an id for a message, cut short if long."""
    if len(seq_id) <= limit:
        return repr(seq_id)
    return f'{seq_id[:limit - 8]!r}... ({len(seq_id)} characters)'


def _json_text(value, limit=40):
    """A JSON value for a message, short: a list or object as [...] or {...}."""
    if isinstance(value, (list, dict)):
        return '[...]' if isinstance(value, list) else '{...}'
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + '...'


# --- HDF5 ----------------------------------------------------------------

#: sequences read from an HDF5 input at a time
_HDF5_SLAB = 4096


def _open_hdf5(path):
    try:
        f = h5py.File(path, 'r')
    except OSError as e:
        raise DataError(f'{path}: not a readable HDF5 file ({e})') from None
    missing = [k for k in ('tokens', 'offsets', 'ids') if not isinstance(f.get(k), h5py.Dataset)]
    if missing:
        f.close()
        raise DataError(f'{path}: missing dataset(s) {", ".join(missing)}; an input file '
                        'has tokens [total], offsets [n+1] and ids [n]')
    return f


def _hdf5_slabs(path, vocab_size):
    """Yield (first, ids list[str] [k], tokens int32 [t], offsets int64 [k+1]
    relative to the slab) for slabs of ``_HDF5_SLAB`` sequences, checked: the
    offsets are read whole (8 bytes per sequence) and checked first, tokens
    and ids a slab at a time."""
    with _open_hdf5(path) as f:
        ids_ds, tokens_ds = f['ids'], f['tokens']
        if ids_ds.ndim != 1 or h5py.check_string_dtype(ids_ds.dtype) is None:
            raise DataError(f'{path}: dataset ids must be a 1-D array of strings '
                            f'(h5py.string_dtype()), got {ids_ds.dtype} {ids_ds.shape}')
        _check_int_1d(path, f['offsets'])
        _check_int_1d(path, tokens_ds)
        offsets = f['offsets'][()]
        _check_offsets(path, offsets, tokens_ds.shape[0], ids_ds)
        for a in range(0, len(ids_ds), _HDF5_SLAB):
            b = min(a + _HDF5_SLAB, len(ids_ds))
            ids = _read_ids(path, ids_ds, a, b)
            for j, seq_id in enumerate(ids):
                _check_id(f'{path}: sequence {a + j}', seq_id)
            base = (offsets[a:b + 1] - offsets[a]).astype(np.int64)
            tokens = tokens_ds[offsets[a]:offsets[b]]
            _check_token_range(path, tokens, base, ids, vocab_size, a)
            yield a, ids, tokens.astype(np.int32, copy=False), base


def _hdf5_sequences(path, vocab_size):
    for a, ids, tokens, offsets in _hdf5_slabs(path, vocab_size):
        for j, seq_id in enumerate(ids):
            yield a + j, seq_id, tokens[offsets[j]:offsets[j + 1]]


def _read_ids(path, ds, a, b):
    """ids[a:b] -> list[str]."""
    try:
        return ds.asstr()[a:b].tolist()
    except UnicodeDecodeError as e:
        raise DataError(f'{path}: dataset ids is not valid UTF-8 ({e.reason}) in sequences '
                        f'{a} to {b - 1}') from None


def _check_int_1d(path, ds):
    """DataError unless ``ds`` is a 1-D integer dataset."""
    if ds.ndim != 1 or ds.dtype.kind not in 'iu':
        raise DataError(f'{path}: dataset {ds.name.lstrip("/")} must be a 1-D integer array, '
                        f'got {ds.dtype} {ds.shape}')


def _check_offsets(path, offsets, total, ids):
    """offsets: int [n+1] must run from 0 to ``total``, each sequence non-empty."""
    n = len(ids)
    if n == 0:
        raise DataError(f'{path}: no sequences (ids is empty)')
    if len(offsets) != n + 1:
        raise DataError(f'{path}: offsets has {len(offsets)} entries; expected '
                        f'len(ids) + 1 = {n + 1}')
    if offsets[0] != 0 or offsets[-1] != total:
        raise DataError(f'{path}: offsets run from {offsets[0]} to {offsets[-1]}; expected '
                        f'0 to len(tokens) = {total}')
    # compare, not np.diff: a difference of unsigned offsets wraps around
    bad = np.flatnonzero(offsets[1:] <= offsets[:-1])
    if bad.size:
        i = int(bad[0])
        problem = 'is empty' if offsets[i + 1] == offsets[i] else 'has a negative length'
        raise DataError(f'{path}: sequence {i} (id {_read_ids(path, ids, i, i + 1)[0]!r}) '
                        f'{problem}: offsets[{i}] = {offsets[i]}, offsets[{i + 1}] = '
                        f'{offsets[i + 1]}')


def _check_token_range(path, tokens, offsets, ids, vocab_size, first=0):
    """tokens: int [total] of sequences first, first+1, ... (offsets relative to
    the slab); every value in [0, vocab_size)."""
    bad = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
    if bad.size:
        p = int(bad[0])
        i = int(np.searchsorted(offsets, p, side='right')) - 1
        raise DataError(f'{path}: sequence {first + i} (id {ids[i]!r}): token {tokens[p]} at '
                        f'position {p - offsets[i]} is not in [0, vocab_size={vocab_size})')


# --- synthetic inputs ----------------------------------------------------

def write_synthetic_inputs(path, vocab_size, num_seqs, min_len, max_len, seed=0,
                           overwrite=False):
    """Write ``num_seqs`` random sequences, ids ``seq-000000``..., lengths uniform
    in ``[min_len, max_len]``, tokens uniform in ``[0, vocab_size)``."""
    path = os.fspath(path)
    _check_vocab(vocab_size)
    for name, value in (('num_seqs', num_seqs), ('min_len', min_len)):
        if value < 1:
            raise UsageError(f'{name}={value}: must be >= 1')
    if max_len < min_len:
        raise UsageError(f'max_len={max_len}: must be >= min_len={min_len}')
    fmt = _format_of(path)
    check_writable(path, '', overwrite)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len, size=num_seqs, endpoint=True)
    offsets = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    inputs = Inputs([f'seq-{i:06d}' for i in range(num_seqs)],
                    rng.integers(0, vocab_size, size=offsets[-1], dtype=np.int32), offsets)
    write = _write_jsonl if fmt == 'jsonl' else _write_hdf5
    with atomic_write(path) as tmp:
        write(tmp, inputs)


def _write_jsonl(path, inputs):
    with open(path, 'w', encoding='utf-8') as f:
        for i, seq_id in enumerate(inputs.ids):
            f.write(json.dumps({'id': seq_id, 'tokens': inputs.seq(i).tolist()},
                               separators=(',', ':')) + '\n')


def _write_hdf5(path, inputs):
    with _hdf5_image(path) as f:
        f.create_dataset('tokens', data=inputs.tokens)
        f.create_dataset('offsets', data=inputs.offsets)
        f.create_dataset('ids', data=inputs.ids, dtype=h5py.string_dtype())


# --- writing files: path checks, the atomic helper, OS errors --------------

def check_writable(path, what, overwrite, reads=()):
    """Refuse, before any work, a file that cannot or must not be written: one
    of ``reads`` ((option, path) pairs: the run's inputs and other outputs,
    refused even with ``overwrite``), a directory, one whose directory is
    missing or not writable, or an existing file unless ``overwrite``.
    ``what`` names the option in the messages ('--metrics'; '' for none)."""
    path = os.fspath(path)
    label = f'{what} {path}' if what else path
    for option, other in reads:
        if other is not None and _same_file(path, other):
            raise UsageError(f'{label} is also the {option} of this run and would be '
                             'destroyed; choose another file')
    if os.path.isdir(path):
        raise DataError(f'{label} is a directory; give a file name')
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise DataError(f'{label}: directory {parent} does not exist; create it first')
    if not os.access(parent, os.W_OK | os.X_OK):
        raise IOFailure(f'{label}: directory {parent} is not writable')
    if os.path.exists(path) and not overwrite:
        raise DataError(f'{label} exists; pass --overwrite to replace it')


def _same_file(a, b):
    """Whether paths ``a`` and ``b`` name one file (symbolic and hard links too)."""
    try:
        return os.path.samefile(a, b)
    except OSError:                 # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


@contextlib.contextmanager
def os_errors(path, *also):
    """Turn an OSError about ``path`` (or one of ``also``, or about no named
    file, as h5py's are) into an IOFailure: one line naming ``path`` (exit 74).

    A write that fails while h5py drops an object is reported only from its
    destructor (otherwise lost, or printed as an 'Exception ignored' traceback
    per object): such errors fail the block too, once.
    """
    lost, hook = [], sys.unraisablehook

    def collect(unraisable):
        if 'h5py' in str(unraisable.object):
            lost.append(unraisable.exc_value)
        else:
            hook(unraisable)
    sys.unraisablehook = collect
    try:
        yield
    except OSError as e:
        if e.filename not in (None, path, *also):
            raise
        raise _io_failure(path, e) from None
    except RuntimeError as e:       # h5py's, when closing after a failed write
        if 'write failed' not in str(e):
            raise
        raise _io_failure(path, e) from None
    finally:
        sys.unraisablehook = hook
    if lost:
        raise _io_failure(path, lost[0])


def _io_failure(path, e):
    """IOFailure naming ``path`` for the OSError (or h5py error) ``e``."""
    h5_reason = re.search(r"error message = '([^']*)'", str(e))
    reason = os.strerror(e.errno) if getattr(e, 'errno', None) else \
        h5_reason[1] if h5_reason else str(e).splitlines()[0]
    return IOFailure(f'cannot write {path}: {reason}; fix the cause (disk space, quota, '
                     'permissions) and rerun')


@contextlib.contextmanager
def atomic_write(path):
    """Yield the temporary name ``path + '.partial'`` to write ``path`` through.

    When the block ends cleanly the file is synced, renamed to ``path`` and
    its directory synced: a reader sees the old file or the whole new one, and
    the new one survives a crash.  On any error the temporary file is removed
    and ``path`` is untouched; an OSError of the writing (disk full, quota,
    permission, I/O) becomes an IOFailure naming ``path``.  Every file mpimoe
    replaces goes through here.
    """
    path = os.fspath(path)
    tmp = path + '.partial'
    with os_errors(path, tmp):
        try:
            yield tmp
            _fsync(tmp)
            os.replace(tmp, path)
        except BaseException:
            _remove_if_present(tmp)
            raise
        _fsync(os.path.dirname(path) or '.')


@contextlib.contextmanager
def _hdf5_image(path):
    """Yield an h5py.File built in memory; when the block ends its bytes are
    written to ``path`` by plain file I/O.  (h5py copes badly with a disk that
    fills under it: errors from destructors, a crash at exit; a plain write
    fails with one OSError.)  For files that fit in memory: chunks, inputs."""
    image = io.BytesIO()
    with h5py.File(image, 'w') as f:
        yield f
    with open(path, 'wb') as out:
        out.write(image.getbuffer())


def _check_space(path, nbytes):
    """IOFailure before writing ``nbytes`` to ``path`` where its filesystem has
    less free space (h5py, which writes the large files, fails badly on a full
    disk; a quota is not seen here)."""
    st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    free = st.f_bavail * st.f_frsize
    if free < nbytes:
        raise IOFailure(f'cannot write {path}: it needs about {nbytes:,} bytes, its '
                        f'filesystem has {free:,} free; free some space and rerun')


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_if_present(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def write_json(path, obj, indent=1):
    """Write ``obj`` as JSON to ``path`` atomically (:func:`atomic_write`)."""
    with atomic_write(path) as tmp, open(tmp, 'w') as f:
        json.dump(obj, f, indent=indent, sort_keys=True)


# --- the lock on an output --------------------------------------------------

#: attempts, and seconds between them, to take a lock being written or taken over
_LOCK_TRIES, _LOCK_NAP_S = 40, 0.05


class OutputLock:
    """An exclusive lock on the output ``path`` for a whole job: the file
    ``path + '.lock'``, created with O_EXCL (unlike flock this works on NFS and
    Lustre), holding the holder's host, pid and start time.

        lock = OutputLock(out)        # DataError naming the holder if it is taken
        ...
        lock.release()                # idempotent

    A lock left by a dead job (SIGKILL, a lost node) is taken over when the job
    is known to be gone: same host and its pid is gone (or is now another
    process), or an earlier run of this same requeued Slurm job.  The takeover
    happens while holding ``path + '.lock.break'`` (O_EXCL as well), so two jobs
    cannot both take one stale lock.  A lock of another host is never broken:
    its message says to remove it by hand once that job is known to be dead.
    """

    def __init__(self, path):
        self.output = os.fspath(path)
        self.path = self.output + '.lock'
        self.info = _lock_info()
        self.held = False
        with os_errors(self.path, self.path + '.break', self.path + '.partial'):
            self._acquire()

    def _acquire(self):
        why = f'{self.path}: other jobs keep taking and releasing it; rerun'
        for _ in range(_LOCK_TRIES):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder, unreadable = _read_lock(self.path)
                why = unreadable or why
                if holder is not None:
                    stale = _stale(holder, self.info)
                    if not stale:
                        raise DataError(self._held_message(holder)) from None
                    if self._take_over(holder, stale):
                        return
                    why = (f'{self.path}.break exists: another job is taking over the stale '
                           f'lock, or was killed doing so; if no other job is starting, '
                           f'remove {self.path}.break and rerun')
                if holder is not None or unreadable:
                    time.sleep(_LOCK_NAP_S)
                continue
            with os.fdopen(fd, 'w') as f:
                json.dump(self.info, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return
        raise DataError(why)

    def _take_over(self, stale, reason):
        """Replace the lock of the dead holder ``stale`` by this one; False when
        another job is doing so (or has done so) at the same moment."""
        guard = self.path + '.break'
        try:
            os.close(os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            return False
        try:
            if _read_lock(self.path)[0] != stale:
                return False
            write_json(self.path, self.info, indent=None)
            self.held = True
        finally:
            os.remove(guard)
        log.warning(f'{self.path}: took over the lock of a dead job (pid {stale["pid"]} on '
                    f'{stale["host"]}: {reason})')
        return True

    def _held_message(self, holder):
        who = f'pid {holder["pid"]} on host {holder["host"]}, since {holder.get("started")}'
        if holder['host'] == self.info['host']:
            return (f'{self.output} is being written by another job ({who}); wait for it to '
                    'end or choose another --output')
        return (f'{self.output} is being written by another job ({who}; lock {self.path}); '
                f'wait for it to end or choose another --output; if that job is dead (its '
                f'node failed), remove {self.path} and rerun')

    def release(self):
        """Remove the lock file if this lock holds it (and no other job took it over)."""
        if self.held:
            self.held = False
            if _read_lock(self.path)[0] == self.info:
                _remove_if_present(self.path)


def _lock_info():
    """What a lock file says about its holder (this process)."""
    return {'host': socket.gethostname(), 'pid': os.getpid(),
            'proc_start': _process_start(os.getpid()),
            'started': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
            'slurm_job': os.environ.get('SLURM_JOB_ID'),
            'slurm_restart': int(os.environ.get('SLURM_RESTART_COUNT') or 0)}


def _read_lock(path):
    """(holder dict, '') from a lock file; (None, '') when it is gone; (None,
    why) when it cannot be read (maybe still being written)."""
    try:
        with open(path, encoding='utf-8') as f:
            holder = json.load(f)
    except FileNotFoundError:
        return None, ''
    except (OSError, ValueError) as e:
        holder = e
    if isinstance(holder, dict) and type(holder.get('host')) is str \
            and type(holder.get('pid')) is int:
        return holder, ''
    return None, (f'{path}: unreadable lock file ({holder}); if no job is writing the output, '
                  'remove it and rerun')


def _stale(holder, me):
    """Why the job that wrote the lock ``holder`` is known to be gone ('' when
    it may be alive); ``me``: this process's lock info."""
    if holder.get('slurm_job') and holder['slurm_job'] == me['slurm_job'] \
            and (holder.get('slurm_restart') or 0) < me['slurm_restart']:
        return 'an earlier run of this requeued Slurm job'
    if holder['host'] != me['host']:
        return ''
    start = _process_start(holder['pid'])
    if start is None:
        return 'the process is gone'
    if start and holder.get('proc_start') and start != holder['proc_start']:
        return 'its pid now belongs to a newer process'
    return ''


def _process_start(pid):
    """The start time of process ``pid`` in clock ticks since boot (Linux
    /proc); 0 where /proc cannot tell but the process exists; None when there
    is no such process (or only its zombie)."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:
            fields = f.read().rsplit(b')', 1)[1].split()
        return None if fields[0] == b'Z' else int(fields[19])
    except FileNotFoundError:
        if os.path.isdir('/proc/self'):
            return None
    except (OSError, IndexError, ValueError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:         # another user's process
        pass
    return 0


# --- outputs -------------------------------------------------------------

#: a chunk file: sequences START to STOP of the input
_CHUNK_NAME = re.compile(r'(\d{12})-(\d{12})\.h5')
#: the fields of a manifest's chunk entries, and of its "final" entry
_CHUNK_FIELDS = {'start': int, 'stop': int, 'file': str, 'bytes': int, 'sha256': str}
_FINAL_FIELDS = {'bytes': int, 'sha256': str}


class OutputWriter:
    """Write the output file (format in the module docstring) in input order,
    in committed chunks, so that a killed job resumes where it stopped.

        with OutputWriter(out, n, vocab, save_logits, meta, identity) as w:
            for batch in ...:                 # starting at sequence w.written
                w.write(index, ids, generated, logits)

    The writer holds :class:`OutputLock` on ``OUT`` from its creation to the end
    of the ``with`` block, whatever way it ends (:meth:`close` releases it for a
    writer never entered).  Each :meth:`write` commits one chunk file
    ``OUT.chunks/START-STOP.h5`` (:func:`atomic_write`) and then records its
    size and sha256 in ``OUT.chunks/manifest.json`` (also atomic): a chunk
    counts once the manifest lists it.  A clean exit with all ``n_seqs``
    written verifies every chunk, assembles them into ``OUT`` (atomic; the
    manifest records the final file's checksum before the rename) and removes
    the directory.  After a failure the chunks stay; a new writer with the same
    ``identity`` (input digest, weights, options that change results) verifies
    them and resumes after them (``written`` > 0); one with another identity
    refuses to touch them and says what differs.  A run killed between the
    final rename and the removal of the directory is finished by its rerun; a
    directory with neither manifest nor chunks (killed as it was created) is
    started afresh.
    """

    def __init__(self, path, n_seqs, vocab_size, save_logits, meta, identity=None,
                 overwrite=False):
        self.path = os.fspath(path)
        if n_seqs < 1:
            raise ValueError(f'n_seqs={n_seqs}: must be >= 1')
        check_writable(self.path, '', overwrite=True)     # existence: below, under the lock
        self.n_seqs, self.vocab_size, self.save_logits = n_seqs, vocab_size, save_logits
        self.meta = _checked_meta(meta)
        self.identity = {'n_seqs': n_seqs, 'vocab_size': vocab_size,
                         'save_logits': int(save_logits), **_checked_meta(identity)}
        self.dir = self.path + '.chunks'
        self.manifest = os.path.join(self.dir, 'manifest.json')
        self._lock = OutputLock(self.path)
        try:
            self._assembled = not overwrite and os.path.exists(self.path) and self._finished()
            if os.path.exists(self.path) and not (overwrite or self._assembled):
                raise DataError(f'{self.path} exists; pass --overwrite to replace it')
            before = None if overwrite or self._assembled else self._read_manifest()
            self._fresh = before is None and not self._assembled
            self.chunks = [] if before is None else self._committed_chunks(before)
        except BaseException:
            self._lock.release()
            raise
        # sequences [0, written) are committed
        self.written = n_seqs if self._assembled else \
            self.chunks[-1]['stop'] if self.chunks else 0

    def _read_manifest(self):
        """The manifest of ``OUT.chunks/``, its structure checked; None when the
        directory holds neither a manifest nor chunks (or does not exist)."""
        if not os.path.isdir(self.dir):
            return None
        hint = f'pass --overwrite to start over (or remove {self.dir})'
        if not os.path.exists(self.manifest):
            if any(n.endswith('.h5') for n in os.listdir(self.dir)):
                raise DataError(f'{self.manifest}: missing, but {self.dir} holds chunks; {hint}')
            return None                 # killed between creating the directory and the manifest
        try:
            with open(self.manifest, encoding='utf-8') as f:
                before = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f'{self.manifest}: unreadable resume manifest ({e}); {hint}') from None
        problem = _manifest_problem(before)
        if problem:
            raise DataError(f'{self.manifest}: malformed resume manifest ({problem}); {hint}')
        return before

    def _finished(self):
        """Whether ``OUT`` is the file this run's manifest says it assembled (a
        run killed after the final rename, before removing the directory)."""
        try:
            before = self._read_manifest()
        except DataError:
            return False
        final = before and before.get('final')
        return bool(final) and before['identity'] == self.identity \
            and os.path.getsize(self.path) == final['bytes'] \
            and file_digest(self.path) == final['sha256']

    def _committed_chunks(self, before):
        """The chunks (manifest entries) a previous run committed, checked: same
        identity, consecutive ranges, no stray chunk files, sizes and checksums."""
        diff = [f'{k} {before["identity"].get(k)!r} then, {v!r} now'
                for k, v in self.identity.items() if before['identity'].get(k) != v]
        if diff:
            raise DataError(f'{self.dir} holds a partial run that differs ({"; ".join(diff)}); '
                            'rerun with the original input, weights and options, or pass '
                            '--overwrite to start over')
        chunks, expect = before['chunks'], 0
        for c in chunks:
            if c['start'] != expect or not c['start'] < c['stop'] <= self.n_seqs \
                    or c['file'] != _chunk_name(c['start'], c['stop']):
                raise DataError(f'{self.manifest}: chunk {c["file"]!r} (sequences {c["start"]}'
                                f'-{c["stop"]}) does not follow sequence {expect}; pass '
                                '--overwrite to start over')
            expect = c['stop']
        listed = {c['file'] for c in chunks}
        for name in sorted(os.listdir(self.dir)):
            match = _CHUNK_NAME.fullmatch(name)
            if not name.endswith('.h5') or name in listed:
                continue
            if match and int(match[1]) == expect:
                # renamed, but killed before the manifest listed it: redone
                os.remove(os.path.join(self.dir, name))
                continue
            raise DataError(f'{os.path.join(self.dir, name)}: not a chunk of this run (chunks '
                            'are the START-STOP.h5 files listed in manifest.json); remove it, '
                            'or pass --overwrite to start over')
        for c in chunks:
            self._check_chunk(c)
        return chunks

    def _check_chunk(self, c):
        """DataError unless the chunk of manifest entry ``c`` is the file that was
        committed: the same size and sha256."""
        path = os.path.join(self.dir, c['file'])
        what = f'{path} (sequences {c["start"]}-{c["stop"]})'
        hint = 'restore it, or pass --overwrite to start over'
        try:
            size = os.path.getsize(path)
        except OSError:
            raise DataError(f'{what}: committed chunk is missing; {hint}') from None
        if size != c['bytes']:
            raise DataError(f'{what}: {size} bytes, {c["bytes"]} when it was committed '
                            f'(truncated or replaced); {hint}')
        if file_digest(path) != c['sha256']:
            raise DataError(f'{what}: contents differ from the sha256 recorded when it was '
                            f'committed (corrupted or replaced); {hint}')

    def __enter__(self):
        if self._fresh:
            with os_errors(self.dir):
                if os.path.isdir(self.dir):
                    shutil.rmtree(self.dir)
                os.mkdir(self.dir)
            self._write_manifest()
        return self

    def _write_manifest(self, final=None):
        write_json(self.manifest, {'identity': self.identity, 'chunks': self.chunks,
                                   'final': final})

    def write(self, index, ids, generated, logits=None):
        """Commit the next ``b`` sequences as one chunk.

        index: int [b], must be ``written, written+1, ...``; ids: list[str] [b];
        generated: list of b int arrays [new_i]; logits: float32 [b, vocab]
        (required exactly when ``save_logits``).
        """
        start, b = self.written, len(index)
        self._check_batch(index, ids, generated, logits)
        new = np.concatenate([np.asarray(g, dtype=np.int64).ravel() for g in generated])
        if new.size and (new.min() < 0 or new.max() >= self.vocab_size):
            raise ValueError(f'generated token outside [0, vocab_size={self.vocab_size})')
        offsets = np.zeros(b + 1, dtype=np.int64)
        np.cumsum([np.size(g) for g in generated], out=offsets[1:])
        name = _chunk_name(start, start + b)
        path = os.path.join(self.dir, name)
        with atomic_write(path) as tmp, _hdf5_image(tmp) as f:
            f.create_dataset('ids', data=list(ids), dtype=h5py.string_dtype())
            f.create_dataset('generated', data=new.astype(np.int32))
            f.create_dataset('generated_offsets', data=offsets)
            if self.save_logits:
                f.create_dataset('last_logits', data=np.asarray(logits, dtype=np.float32))
        self.chunks.append({'start': start, 'stop': start + b, 'file': name,
                            'bytes': os.path.getsize(path), 'sha256': file_digest(path)})
        self._write_manifest()
        self.written += b

    def _check_batch(self, index, ids, generated, logits):
        b, start = len(index), self.written
        if not np.array_equal(index, np.arange(start, start + b)) or start + b > self.n_seqs:
            raise ValueError(f'index must continue the input order: expected {start}, '
                             f'{start + 1}, ... (< {self.n_seqs}), got {list(index)[:4]}...')
        if b == 0 or len(ids) != b or len(generated) != b:
            raise ValueError(f'batch of {b} sequences with {len(ids)} ids and '
                             f'{len(generated)} generated arrays')
        if self.save_logits != (logits is not None):
            raise ValueError(f'logits must be given exactly when save_logits '
                             f'(save_logits={self.save_logits})')
        if logits is not None and np.shape(logits) != (b, self.vocab_size):
            raise ValueError(f'logits shape {np.shape(logits)}; expected {(b, self.vocab_size)}')

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:        # else the committed chunks stay for a rerun
                self._finish()
        finally:
            self._lock.release()

    def close(self):
        """Release the lock of a writer that is not entered (or not any more)."""
        self._lock.release()

    def _finish(self):
        """Assemble ``OUT`` (unless a killed run did) and remove the directory."""
        if self.written != self.n_seqs:
            raise RuntimeError(f'{self.path}: only {self.written} of {self.n_seqs} sequences '
                               'were written; output not saved')
        if not self._assembled:
            # the chunks' bytes, plus room for the file's own metadata
            _check_space(self.path, sum(c['bytes'] for c in self.chunks) + (1 << 20))
            with atomic_write(self.path) as tmp:
                self._assemble(tmp)
                # before the rename: a rerun killed after it knows OUT is complete
                self._write_manifest({'bytes': os.path.getsize(tmp),
                                      'sha256': file_digest(tmp)})
        with os_errors(self.dir):
            shutil.rmtree(self.dir)

    def _assemble(self, tmp):
        """Copy the chunks, verified, in order, into one output file ``tmp``."""
        n = self.n_seqs
        with h5py.File(tmp, 'w') as out:
            out.attrs.update({'format': OUTPUT_FORMAT, 'format_version': OUTPUT_VERSION,
                              **self.meta})
            ids = out.create_dataset('ids', shape=(n,), dtype=h5py.string_dtype())
            gen = out.create_dataset('generated', shape=(0,), maxshape=(None,),
                                     chunks=(1 << 14,), dtype=np.int32)
            offs = out.create_dataset('generated_offsets', data=np.zeros(n + 1, np.int64))
            logits = out.create_dataset('last_logits', shape=(n, self.vocab_size),
                                        dtype=np.float32) if self.save_logits else None
            for c in self.chunks:
                self._check_chunk(c)
                start, stop = c['start'], c['stop']
                with h5py.File(os.path.join(self.dir, c['file']), 'r') as f:
                    ids[start:stop] = f['ids'].asstr()[()]
                    end = gen.shape[0]
                    new = f['generated'][()]
                    gen.resize((end + new.size,))
                    gen[end:] = new
                    offs[start + 1:stop + 1] = end + f['generated_offsets'][1:]
                    if logits is not None:
                        logits[start:stop] = f['last_logits'][()]


def _chunk_name(start, stop):
    return f'{start:012d}-{stop:012d}.h5'


def _manifest_problem(m):
    """What is wrong with the structure of a resume manifest ('' if nothing):
    {"identity": {...}, "chunks": [{start, stop, file, bytes, sha256}, ...],
    "final": null or {bytes, sha256}}."""
    if not isinstance(m, dict):
        return f'a JSON {type(m).__name__}, not an object'
    if not isinstance(m.get('identity'), dict):
        return '"identity" is not an object'
    if not isinstance(m.get('chunks'), list):
        return '"chunks" is not a list'
    for i, c in enumerate(m['chunks']):
        if not _has_fields(c, _CHUNK_FIELDS):
            return f'chunks[{i}] is not an object of {_fields_text(_CHUNK_FIELDS)}'
    if m.get('final') is not None and not _has_fields(m['final'], _FINAL_FIELDS):
        return f'"final" is neither null nor an object of {_fields_text(_FINAL_FIELDS)}'
    return ''


def _has_fields(obj, fields):
    return isinstance(obj, dict) and all(type(obj.get(k)) is t for k, t in fields.items())


def _fields_text(fields):
    return ', '.join(f'{k} ({t.__name__})' for k, t in fields.items())


def _checked_meta(meta):
    """meta: dict str -> str/int/float, without the reserved format keys."""
    meta = dict(meta or {})
    for key, value in meta.items():
        if not isinstance(key, str) or key in ('format', 'format_version'):
            raise ValueError(f'meta key {key!r}: must be a str other than format, format_version')
        if isinstance(value, (bool, np.bool_)) or not isinstance(
                value, (str, int, float, np.integer, np.floating)):
            raise ValueError(f'meta[{key!r}] = {value!r}: must be a str, int or float')
    return meta


def read_outputs(path):
    """Read an output file -> dict: ids list[str] [n], generated list of int32
    [new_i], last_logits float32 [n, vocab] or None, meta dict of the caller's
    attributes."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f'{path}: output file not found')
    try:
        f = h5py.File(path, 'r')
    except OSError as e:
        raise DataError(f'{path}: not a readable HDF5 file ({e})') from None
    with f:
        if f.attrs.get('format') != OUTPUT_FORMAT:
            raise DataError(f'{path}: not an mpimoe output file (no format="{OUTPUT_FORMAT}" '
                            'attribute)')
        if f.attrs.get('format_version') != OUTPUT_VERSION:
            raise DataError(f'{path}: output format_version {f.attrs.get("format_version")}; '
                            f'this mpimoe reads version {OUTPUT_VERSION}')
        missing = [k for k in ('ids', 'generated', 'generated_offsets')
                   if not isinstance(f.get(k), h5py.Dataset)]
        if missing:
            raise DataError(f'{path}: missing dataset(s) {", ".join(missing)}')
        offsets = f['generated_offsets'][()]
        generated = f['generated'][()]
        return {
            'ids': f['ids'].asstr()[()].tolist(),
            'generated': np.split(generated, offsets[1:-1]),
            'last_logits': f['last_logits'][()] if 'last_logits' in f else None,
            'meta': {k: _python_scalar(v) for k, v in f.attrs.items()
                     if k not in ('format', 'format_version')},
        }


def _python_scalar(value):
    return value.item() if isinstance(value, np.generic) else value
