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
"""

import contextlib
import hashlib
import itertools
import json
import os
import sys
from array import array
from dataclasses import dataclass

import h5py
import numpy as np
from mpimoe.errors import DataError, IOFailure, UsageError
from mpimoe.io.files import atomic_write, check_writable, hdf5_image
from mpimoe.io.paths import regular_file



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
    with hdf5_image(path) as f:
        f.create_dataset('tokens', data=inputs.tokens)
        f.create_dataset('offsets', data=inputs.offsets)
        f.create_dataset('ids', data=inputs.ids, dtype=h5py.string_dtype())
