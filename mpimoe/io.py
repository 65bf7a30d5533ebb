"""Token-sequence inputs and the HDF5 output format.

Inputs are read whole by :func:`read_inputs` into :class:`Inputs` (flat tokens
plus offsets); :func:`write_synthetic_inputs` writes random ones.  Outputs are
written batch by batch by :class:`OutputWriter` and read back by
:func:`read_outputs`.  Every file is written to ``PATH.partial`` and renamed to
``PATH`` only when complete, so an existing ``PATH`` is never half-overwritten.

## Input formats

The format is chosen by the extension: `.jsonl`/`.json` or `.h5`/`.hdf5`.

- **JSONL**: one sequence per line, `{"id": "doc-1", "tokens": [5, 17, 3]}`;
  blank lines are skipped; an integer id is read as its decimal string.
- **HDF5**: `tokens` (int32 or int64 `[total]`, all sequences concatenated),
  `offsets` (int64 `[n+1]`, `offsets[0] = 0`, increasing, `offsets[n] = total`;
  sequence `i` is `tokens[offsets[i]:offsets[i+1]]`), `ids` (`[n]`
  variable-length UTF-8 strings, `h5py.string_dtype()`).

Ids are unique; every sequence has at least one token; every token id is in
`[0, vocab_size)`.

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
sequences are written; until then it is `OUTPUT.partial`.
"""

import json
import os
from dataclasses import dataclass

import h5py
import numpy as np

from mpimoe.errors import DataError, UsageError

__all__ = ['Inputs', 'read_inputs', 'write_synthetic_inputs',
           'OutputWriter', 'read_outputs']

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
    """Read and validate the token sequences of ``path`` (.jsonl/.json or .h5/.hdf5).

    Any defect raises DataError naming the file and the line (JSONL) or the
    sequence index and id (HDF5).
    """
    path = os.fspath(path)
    fmt = _format_of(path)
    _check_vocab(vocab_size)
    if not os.path.isfile(path):
        raise DataError(f'{path}: input file not found')
    return _read_jsonl(path, vocab_size) if fmt == 'jsonl' else _read_hdf5(path, vocab_size)


# --- JSONL ---------------------------------------------------------------

def _read_jsonl(path, vocab_size):
    ids, chunks, first_line = [], [], {}
    with open(path, 'rb') as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f'{path}:{lineno}'
            seq_id, tokens = _parse_line(where, raw, vocab_size)
            if seq_id in first_line:
                raise DataError(f'{where}: duplicate id {seq_id!r} (first on line '
                                f'{first_line[seq_id]})')
            first_line[seq_id] = lineno
            ids.append(seq_id)
            chunks.append(tokens)
    if not ids:
        raise DataError(f'{path}: no sequences (every line is blank)')
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in chunks], out=offsets[1:])
    return Inputs(ids, np.concatenate(chunks), offsets)


def _parse_line(where, raw, vocab_size):
    """One JSONL line -> (id: str, tokens: int32 [len]); ``where`` is 'FILE:LINE'."""
    try:
        obj = json.loads(raw.decode('utf-8'))
    except UnicodeDecodeError as e:
        raise DataError(f'{where}: not valid UTF-8 ({e.reason} at byte {e.start})') from None
    except json.JSONDecodeError as e:
        raise DataError(f'{where}: not valid JSON: {e.msg} at column {e.colno}') from None
    if not isinstance(obj, dict):
        raise DataError(f'{where}: expected an object {{"id": ..., "tokens": [...]}}, '
                        f'got {type(obj).__name__}')
    for key in ('id', 'tokens'):
        if key not in obj:
            raise DataError(f'{where}: missing key "{key}"')
    seq_id, tokens = obj['id'], obj['tokens']
    if type(seq_id) not in (str, int):
        raise DataError(f'{where}: "id" must be a string or an integer, got {seq_id!r}')
    seq_id = str(seq_id)
    if not isinstance(tokens, list):
        raise DataError(f'{where}: id {seq_id!r}: "tokens" must be a list of integers, '
                        f'got {type(tokens).__name__}')
    if not tokens:
        raise DataError(f'{where}: id {seq_id!r}: empty sequence ("tokens" is [])')
    for j, t in enumerate(tokens):
        if type(t) is not int:
            raise DataError(f'{where}: id {seq_id!r}: tokens[{j}] = {json.dumps(t)} '
                            'is not an integer')
    if min(tokens) < 0 or max(tokens) >= vocab_size:
        j, t = next((j, t) for j, t in enumerate(tokens) if not 0 <= t < vocab_size)
        raise DataError(f'{where}: id {seq_id!r}: token {t} at tokens[{j}] is not in '
                        f'[0, vocab_size={vocab_size})')
    return seq_id, np.array(tokens, dtype=np.int32)


# --- HDF5 ----------------------------------------------------------------

def _read_hdf5(path, vocab_size):
    try:
        f = h5py.File(path, 'r')
    except OSError as e:
        raise DataError(f'{path}: not a readable HDF5 file ({e})') from None
    with f:
        missing = [k for k in ('tokens', 'offsets', 'ids')
                   if not isinstance(f.get(k), h5py.Dataset)]
        if missing:
            raise DataError(f'{path}: missing dataset(s) {", ".join(missing)}; an input file '
                            'has tokens [total], offsets [n+1] and ids [n]')
        ids = _read_ids(path, f['ids'])
        offsets = _read_int_1d(path, f['offsets'])
        tokens = _read_int_1d(path, f['tokens'])
    _check_offsets(path, offsets, len(tokens), ids)
    _check_unique(path, ids)
    _check_token_range(path, tokens, offsets, ids, vocab_size)
    return Inputs(ids, tokens.astype(np.int32, copy=False), offsets.astype(np.int64, copy=False))


def _read_ids(path, ds):
    """ids dataset -> list[str] [n]."""
    if ds.ndim != 1 or h5py.check_string_dtype(ds.dtype) is None:
        raise DataError(f'{path}: dataset ids must be a 1-D array of strings '
                        f'(h5py.string_dtype()), got {ds.dtype} {ds.shape}')
    try:
        return ds.asstr()[()].tolist()
    except UnicodeDecodeError as e:
        raise DataError(f'{path}: dataset ids is not valid UTF-8 ({e.reason})') from None


def _read_int_1d(path, ds):
    """A 1-D integer dataset, read once, in its stored dtype."""
    if ds.ndim != 1 or ds.dtype.kind not in 'iu':
        raise DataError(f'{path}: dataset {ds.name.lstrip("/")} must be a 1-D integer array, '
                        f'got {ds.dtype} {ds.shape}')
    return ds[()]


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
        raise DataError(f'{path}: sequence {i} (id {ids[i]!r}) {problem}: offsets[{i}] = '
                        f'{offsets[i]}, offsets[{i + 1}] = {offsets[i + 1]}')


def _check_unique(path, ids):
    first = {}
    for i, seq_id in enumerate(ids):
        if seq_id in first:
            raise DataError(f'{path}: sequence {i} has id {seq_id!r}, already used by '
                            f'sequence {first[seq_id]}')
        first[seq_id] = i


def _check_token_range(path, tokens, offsets, ids, vocab_size):
    """tokens: int [total]; every value in [0, vocab_size)."""
    bad = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
    if bad.size:
        p = int(bad[0])
        i = int(np.searchsorted(offsets, p, side='right')) - 1
        raise DataError(f'{path}: sequence {i} (id {ids[i]!r}): token {tokens[p]} at position '
                        f'{p - offsets[i]} is not in [0, vocab_size={vocab_size})')


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
    _refuse_existing(path, overwrite)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len, size=num_seqs, endpoint=True)
    offsets = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    inputs = Inputs([f'seq-{i:06d}' for i in range(num_seqs)],
                    rng.integers(0, vocab_size, size=offsets[-1], dtype=np.int32), offsets)
    write = _write_jsonl if fmt == 'jsonl' else _write_hdf5
    tmp = path + '.partial'
    try:
        write(tmp, inputs)
    except BaseException:
        _remove_if_present(tmp)
        raise
    os.replace(tmp, path)


def _write_jsonl(path, inputs):
    with open(path, 'w', encoding='utf-8') as f:
        for i, seq_id in enumerate(inputs.ids):
            f.write(json.dumps({'id': seq_id, 'tokens': inputs.seq(i).tolist()},
                               separators=(',', ':')) + '\n')


def _write_hdf5(path, inputs):
    with h5py.File(path, 'w') as f:
        f.create_dataset('tokens', data=inputs.tokens)
        f.create_dataset('offsets', data=inputs.offsets)
        f.create_dataset('ids', data=inputs.ids, dtype=h5py.string_dtype())


def _refuse_existing(path, overwrite):
    if os.path.exists(path) and not overwrite:
        raise DataError(f'{path} exists; pass --overwrite to replace it')


def _remove_if_present(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# --- outputs -------------------------------------------------------------

class OutputWriter:
    """Write the output file (format in the module docstring) in input order.

        with OutputWriter(out, n, vocab, save_logits, meta) as w:
            for batch in ...:
                w.write(index, ids, generated, logits)

    Writes go to ``out.partial``; a clean exit with all ``n_seqs`` written
    renames it to ``out``.  On an exception the partial file is removed and
    ``out`` (possibly a previous result) is left untouched.
    """

    def __init__(self, path, n_seqs, vocab_size, save_logits, meta, overwrite=False):
        self.path = os.fspath(path)
        _refuse_existing(self.path, overwrite)
        if n_seqs < 1:
            raise ValueError(f'n_seqs={n_seqs}: must be >= 1')
        self.n_seqs, self.vocab_size, self.save_logits = n_seqs, vocab_size, save_logits
        self.meta = _checked_meta(meta)
        self.written = 0        # sequences [0, written) are in the file
        self._tmp = self.path + '.partial'
        self._file = None

    def __enter__(self):
        f = self._file = h5py.File(self._tmp, 'w')
        f.attrs.update({'format': OUTPUT_FORMAT, 'format_version': OUTPUT_VERSION, **self.meta})
        n = self.n_seqs
        f.create_dataset('ids', shape=(n,), dtype=h5py.string_dtype())
        f.create_dataset('generated', shape=(0,), maxshape=(None,), chunks=(1 << 14,),
                         dtype=np.int32)
        f.create_dataset('generated_offsets', data=np.zeros(n + 1, dtype=np.int64))
        if self.save_logits:
            f.create_dataset('last_logits', shape=(n, self.vocab_size), dtype=np.float32)
        return self

    def write(self, index, ids, generated, logits=None):
        """Append the next ``b`` sequences.

        index: int [b], must be ``written, written+1, ...``; ids: list[str] [b];
        generated: list of b int arrays [new_i]; logits: float32 [b, vocab]
        (required exactly when ``save_logits``).
        """
        start, b = self.written, len(index)
        self._check_batch(index, ids, generated, logits)
        new = np.concatenate([np.asarray(g, dtype=np.int64).ravel() for g in generated])
        if new.size and (new.min() < 0 or new.max() >= self.vocab_size):
            raise ValueError(f'generated token outside [0, vocab_size={self.vocab_size})')
        f = self._file
        f['ids'][start:start + b] = ids
        gen, offs = f['generated'], f['generated_offsets']
        end = gen.shape[0]
        gen.resize((end + new.size,))
        gen[end:] = new.astype(np.int32)
        offs[start + 1:start + b + 1] = end + np.cumsum([np.size(g) for g in generated])
        if self.save_logits:
            f['last_logits'][start:start + b] = logits
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
        self._file.flush()
        self._file.close()
        if exc_type is None and self.written != self.n_seqs:
            _remove_if_present(self._tmp)
            raise RuntimeError(f'{self.path}: only {self.written} of {self.n_seqs} sequences '
                               'were written; output not saved')
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            _remove_if_present(self._tmp)


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
