"""Inputs: requests of token ids, text or chats, streamed as token sequences.

Inputs are streamed a batch at a time by :class:`InputStream` (or read whole
by :func:`read_inputs`) into :class:`Inputs` (flat tokens plus offsets, and
each sequence's generation settings); :func:`write_synthetic_inputs` writes
random ones (under a temporary name, renamed once complete).  The lines are
parsed by :mod:`mpimoe.io.jsonl`, the slabs by :mod:`mpimoe.io.hdf5`.

## Input formats

The format is chosen by the extension: `.jsonl`/`.json` or `.h5`/`.hdf5`.

- **JSONL**: one request per line, `{"id": "doc-1", "tokens": [5, 17, 3]}`,
  `{"id": "q", "prompt": "text"}` or `{"id": "c", "messages": [{"role":
  "user", "content": "Hi"}]}` (text and chats encoded by the tokenizer);
  blank lines are skipped; an integer id is read as its decimal string.  A
  line may also carry generation settings that replace the run's defaults
  for its sequence (:mod:`mpimoe.io.jsonl`): `max_tokens` (integer >= 0),
  `temperature` (number in [0, 100], 0: greedy), `top_k` (integer in
  [0, vocab_size], 0: off), `top_p` (number in (0, 1]), `seed` (integer in
  [0, 2^63)), `stop_token_ids` (at most 64 token ids), `ignore_eos` (true or
  false), `stop` (stop strings); any other key is refused.  Or, the whole
  file, OpenAI batch request lines (:mod:`mpimoe.io.openai_batch`).
- **HDF5**: `tokens` (int32 or int64 `[total]`, all sequences concatenated),
  `offsets` (int64 `[n+1]`, `offsets[0] = 0`, increasing, `offsets[n] = total`;
  sequence `i` is `tokens[offsets[i]:offsets[i+1]]`), `ids` (`[n]`
  variable-length UTF-8 strings, `h5py.string_dtype()`).  Every sequence has
  the run's default generation settings.

Ids are unique, at most 1024 bytes of UTF-8, without NUL; every sequence has
at least one token; every token id is in `[0, vocab_size)`.  A run also
requires each prompt + its `max_tokens` (the line's, else `--max-new-tokens`)
<= the model's `max_position_embeddings` and prompt <= `batch_tokens`.  All of
it is checked when the file is opened.
"""

import contextlib
import hashlib
import json
import os
from array import array
from dataclasses import dataclass

import h5py
import numpy as np
from mpimoe.errors import DataError, IOFailure, UsageError
from mpimoe.io.fields import NEEDS_TOKENIZER, id_text, check_defaults
from mpimoe.io.files import atomic_write, check_writable, file_digest, hdf5_image
from mpimoe.io.hdf5 import hdf5_sequences, hdf5_slabs
from mpimoe.io.jsonl import jsonl_lines, jsonl_sequences, parse_line
from mpimoe.io.paths import regular_file
from mpimoe.model.kvcache import BLOCK_TOKENS, blocks_for
from mpimoe.runtime.request import SamplingParams

_EXTENSIONS = {'.jsonl': 'jsonl', '.json': 'jsonl', '.h5': 'hdf5', '.hdf5': 'hdf5'}


@dataclass(frozen=True, eq=False)
class Inputs:
    """``n`` token sequences stored flat, with their generation settings.

    ids: list[str] [n]; tokens: int32 [total]; offsets: int64 [n+1];
    params: tuple of n SamplingParams; openai: None, or for OpenAI batch
    lines a tuple of n (endpoint 'completions' | 'chat', model str, '' when
    the body has none), for the output to echo
    """

    ids: list
    tokens: np.ndarray
    offsets: np.ndarray
    params: tuple
    openai: tuple = None

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


def read_inputs(path, vocab_size, tokenizer=None):
    """Read and validate all token sequences of ``path`` (.jsonl/.json or .h5/.hdf5),
    with the default generation settings (SamplingParams()) where a line sets none;
    tokenizer: a TextTokenizer for text and chat lines (None: refused).

    Any defect raises DataError naming the file and the line (JSONL) or the
    sequence index and id (HDF5).
    """
    return next(InputStream(path, vocab_size, tokenizer=tokenizer).batches(budget=None))[1]


class InputStream:
    """The sequences of an input file, read in order, a batch at a time, so an
    input larger than memory never is in memory whole.

        stream = InputStream(path, vocab_size, context=4096, batch_tokens=4096,
                             defaults=SamplingParams(max_tokens=16, temperature=0.7))
        len(stream)                                   # sequences in the file
        for first, batch in stream.batches(budget=4096):
            ...                                       # batch: Inputs; first: its index

    ``defaults`` (SamplingParams; default ``SamplingParams()``) are the run's
    generation settings; a sequence's are
    them with its line's settings replaced (HDF5: the defaults).  Opening
    checks the defaults (UsageError naming the option,
    :data:`mpimoe.io.fields.OPTIONS`) and validates the whole file, so that
    every defect is found before any compute (a JSONL file in the one read
    that also takes its digest, ``sha256``): every line or slab parses, keys,
    types, ids (:func:`mpimoe.io.fields.check_id`), settings and token ids
    are right, the ids are unique, and every prompt fits: prompt + its
    max_tokens <= ``context`` (the model's max_position_embeddings) and prompt
    <= ``batch_tokens`` (the tokens of one step, which bound its memory) and
    prompt + its max_tokens fits ``kv_tokens`` (a front-end's KV cache, in
    whole blocks); None: no limit.  Memory: one line or slab at a time and the hash of every
    id (8 bytes per sequence; twice that while they are sorted); settings only
    for the batch being read.

    ``tokenizer`` (a TextTokenizer, its ids checked against ``vocab_size``)
    encodes the text and chat lines, once when the file is validated (their
    lengths are checked as token ids), again as their batch is read; None:
    such lines, and stop strings, are refused.  A file is either all mpimoe
    lines or all OpenAI batch lines (``openai``: True), whose batches carry
    each request's (endpoint, model).
    """

    def __init__(self, path, vocab_size, context=None, batch_tokens=None, *,
                 defaults=SamplingParams(), kv_tokens=None, tokenizer=None):
        self.path = os.fspath(path)
        self.format = _format_of(self.path)
        _check_vocab(vocab_size)
        check_defaults(defaults, vocab_size)
        if defaults.stop and tokenizer is None:
            raise UsageError(f'--stop needs a tokenizer (stop strings are looked for in the '
                             f'generated text): {NEEDS_TOKENIZER}')
        if tokenizer is not None:
            tokenizer.check_vocab(vocab_size)
        self.vocab_size, self.defaults, self.tokenizer = vocab_size, defaults, tokenizer
        self.openai = False
        self.context, self.batch_tokens = context, batch_tokens
        # what a sequence may reserve of a front-end's KV cache: whole blocks
        self.kv_tokens = kv_tokens
        self.kv_room = None if kv_tokens is None else BLOCK_TOKENS * int(blocks_for(kv_tokens))
        if context is not None and defaults.max_tokens >= context:
            raise UsageError(f'--max-new-tokens {defaults.max_tokens}: leaves no room for a '
                             f'prompt in the context length of the model '
                             f'(max_position_embeddings = {context}); lower it')
        regular_file(self.path, '--input')
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
        first, ids, chunks, params, openai, used = 0, [], [], [], [], 0
        for i, (_, seq_id, tokens, p, o) in enumerate(self._sequences()):
            if ids and budget is not None and used + len(tokens) > budget:
                if first + len(ids) > start:
                    yield first, _pack(ids, chunks, params, openai)
                first, ids, chunks, params, openai, used = i, [], [], [], [], 0
            ids.append(seq_id)
            chunks.append(tokens)
            params.append(p)
            openai.append(o)
            used += len(tokens)
        if ids and first + len(ids) > start:
            yield first, _pack(ids, chunks, params, openai)

    def _validate_jsonl(self):
        """Parse, encode and check every line, hashing the file on the way:
        (id hashes array('q') [n], sha256 hex); sets ``openai`` from the first
        line, and refuses a later line of the other kind."""
        digest, hashes, first = hashlib.sha256(), array('q'), None
        for lineno, raw in jsonl_lines(self.path, digest):
            where = f'{self.path}:{lineno}'
            seq_id, tokens, settings, openai = parse_line(where, raw, self.vocab_size,
                                                          self.tokenizer)
            if first is None:
                self.openai, first = openai is not None, lineno
            elif (openai is not None) != self.openai:
                if openai is not None:
                    mixed = f'an OpenAI batch line in a file of mpimoe lines ({{"id": ...}}, ' \
                            f'as line {first})'
                else:
                    mixed = f'an mpimoe line ({{"id": ...}}) in a file of OpenAI batch lines ' \
                            f'(as line {first})'
                raise DataError(f'{where}: {mixed}; a file holds one kind of line')
            problem = self._too_long(len(tokens), settings.get('max_tokens'))
            if problem:
                raise DataError(f'{where}: id {id_text(seq_id)}: {problem}')
            hashes.append(hash(seq_id))
        return hashes, digest.hexdigest()

    def _validate_hdf5(self):
        """Check every slab: id hashes array('q') [n]."""
        hashes = array('q')
        new = self.defaults.max_tokens
        limits = [n for n in (self.batch_tokens,
                              None if self.context is None else self.context - new,
                              None if self.kv_room is None else self.kv_room - new)
                  if n is not None]
        for a, ids, _, offsets in hdf5_slabs(self.path, self.vocab_size):
            lengths = np.diff(offsets)
            bad = np.flatnonzero(lengths > min(limits, default=np.inf))
            if bad.size:
                j = int(bad[0])
                raise DataError(f'{self.path}: sequence {a + j} (id {id_text(ids[j])}): '
                                f'{self._too_long(int(lengths[j]))}')
            hashes.extend(map(hash, ids))
        return hashes

    def _too_long(self, n, own_max=None):
        """Why a prompt of ``n`` tokens cannot run and what to do, or '' when
        it can; own_max: the max_tokens its line sets (None: the default's)."""
        new = self.defaults.max_tokens if own_max is None else own_max
        total = n + new
        key = '--max-new-tokens' if own_max is None else '"max_tokens" of the line'
        if self.context is not None and total > self.context:
            return (f'{n} prompt tokens + {new} new ({key}) = {total} exceed the context '
                    f'length of the model (max_position_embeddings = {self.context}); shorten '
                    f'the prompt or lower {key}')
        if self.kv_room is not None and total > self.kv_room:
            return (f'{n} prompt tokens + {new} new ({key}) = {total} exceed the KV cache of a '
                    f'front-end (--kv-tokens {self.kv_tokens}); raise --kv-tokens or lower {key}')
        if self.batch_tokens is not None and n > self.batch_tokens:
            return (f'{n} prompt tokens exceed --max-batch-tokens {self.batch_tokens}, the '
                    f'tokens of one step (which bound its memory); raise --max-batch-tokens to '
                    f'{n} or shorten the prompt')
        return ''

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
        for k, (pos, seq_id, *_) in enumerate(self._sequences()):
            if k not in suspects:
                continue
            if seq_id in first:
                raise self._duplicate(first[seq_id], pos, seq_id)
            first[seq_id] = pos

    def _duplicate(self, first_pos, pos, seq_id):
        if self.format == 'jsonl':
            return DataError(f'{self.path}:{pos}: duplicate id {id_text(seq_id)} (first on '
                             f'line {first_pos})')
        return DataError(f'{self.path}: sequence {pos} has id {id_text(seq_id)}, already '
                         f'used by sequence {first_pos}')

    def _sequences(self):
        """Yield (position, id, tokens int32 [len], SamplingParams, openai: None
        or (endpoint, model)) in file order; position: line number (JSONL) or
        sequence index (HDF5)."""
        with _reading(self.path):
            if self.format == 'jsonl':
                yield from jsonl_sequences(self.path, self.vocab_size, self.defaults,
                                           self.tokenizer)
            else:
                for pos, seq_id, tokens in hdf5_sequences(self.path, self.vocab_size):
                    yield pos, seq_id, tokens, self.defaults, None


@contextlib.contextmanager
def _reading(path):
    """Turn an OSError (no permission, a failing disk, HDF5 data that fails to
    decode) into an IOFailure naming the input ``path``."""
    try:
        yield
    except OSError as e:
        raise IOFailure(f'{path}: cannot read the input: {e.strerror or e}') from None


def _pack(ids, chunks, params, openai):
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in chunks], out=offsets[1:])
    return Inputs(ids, np.concatenate(chunks), offsets, tuple(params),
                  None if openai[0] is None else tuple(openai))


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
    ids = [f'seq-{i:06d}' for i in range(num_seqs)]
    tokens = rng.integers(0, vocab_size, size=offsets[-1], dtype=np.int32)
    write = _write_jsonl if fmt == 'jsonl' else _write_hdf5
    with atomic_write(path) as tmp:
        write(tmp, ids, tokens, offsets)


def _write_jsonl(path, ids, tokens, offsets):
    with open(path, 'w', encoding='utf-8') as f:
        for i, seq_id in enumerate(ids):
            f.write(json.dumps({'id': seq_id, 'tokens': tokens[offsets[i]:offsets[i + 1]]
                                .tolist()}, separators=(',', ':')) + '\n')


def _write_hdf5(path, ids, tokens, offsets):
    with hdf5_image(path) as f:
        f.create_dataset('tokens', data=tokens)
        f.create_dataset('offsets', data=offsets)
        f.create_dataset('ids', data=ids, dtype=h5py.string_dtype())
