"""The output formats, committed in verified chunks.

The format follows the output's extension: `.h5`/`.hdf5` is the HDF5 file
below; `.jsonl` is one JSON line per sequence, in input order
(:mod:`mpimoe.io.result_lines`: mpimoe's line, or the OpenAI batch output
line for an OpenAI batch input).  Either way the run commits HDF5 chunk
files and assembles the output from them at the end.

One HDF5 file:

| dataset | dtype | shape | content |
|---|---|---|---|
| `ids` | UTF-8 string | `[n]` | sequence ids, in input order |
| `generated` | int32 | `[total_new]` | the new tokens of all sequences, concatenated in input order |
| `generated_offsets` | int64 | `[n+1]` | sequence `i` generated `generated[generated_offsets[i]:generated_offsets[i+1]]` |
| `last_logits` | float32 | `[n, vocab_size]` | optional (`--save-logits`): logits at the last prompt position |
| `finish_reason` | UTF-8 string | `[n]` | why sequence `i` ended: `stop` (at an end-of-sequence or stop token, kept in `generated`) or `length` (at its `max_tokens`) |
| `prompt_tokens` | int32 | `[n]` | tokens of sequence `i`'s prompt |
| `completion_tokens` | int32 | `[n]` | tokens sequence `i` generated (`generated_offsets[i+1] - generated_offsets[i]`) |
| `text` | UTF-8 string | `[n]` | when the run has a tokenizer: sequence `i`'s generated text, cut before a stop string |

`finish_reason`, `prompt_tokens` and `completion_tokens` are absent from files
written before they existed (:func:`read_outputs` returns None for them).
Root attributes: `format = "mpimoe-output"`, `format_version = 1`, and the run's
metadata (str, int or float values; e.g. `weights`, `max_new_tokens`,
`mpimoe_version`).  The file appears under its final name only once all `n`
sequences are written; until then the committed chunks are in `OUTPUT.chunks/`
with `manifest.json` (the run's identity; each chunk's range, size and sha256),
and `OUTPUT.lock` names the job writing them (:class:`~mpimoe.io.lock.OutputLock`).
"""

import json
import os
import re
import shutil
import time

import h5py
import numpy as np
from mpimoe.errors import DataError, UsageError
from mpimoe.io.files import (atomic_write, check_space, check_writable, file_digest, hdf5_image,
                             os_errors, write_json)
from mpimoe.io.lock import OutputLock
from mpimoe.io.result_lines import openai_line, read_result_lines, result_line
from mpimoe.runtime.request import FINISH_REASONS

OUTPUT_FORMAT = 'mpimoe-output'
OUTPUT_VERSION = 1

#: output format by extension
_FORMATS = {'.h5': 'hdf5', '.hdf5': 'hdf5', '.jsonl': 'jsonl'}
#: a chunk file: sequences START to STOP of the input
_CHUNK_NAME = re.compile(r'(\d{12})-(\d{12})\.h5')
#: the fields of a manifest's chunk entries, and of its "final" entry
_CHUNK_FIELDS = {'start': int, 'stop': int, 'file': str, 'bytes': int, 'sha256': str}
_FINAL_FIELDS = {'bytes': int, 'sha256': str}


#: what an identity key is made of, where its name alone does not say
#: (mpimoe.runtime.options.JobOptions.schedule)
_IDENTITY_NOTES = {'chunk_tokens': ' (--chunk-tokens, default 16 x --max-batch-tokens, '
                                   'x front-end groups)'}


class OutputWriter:
    """Write the output file (format in the module docstring) in input order,
    in committed chunks, so that a killed job resumes where it stopped.

        with OutputWriter(out, n, vocab, save_logits, meta, identity, text=True) as w:
            for batch in ...:                 # starting at sequence w.written
                w.write(index, ids, generated, logits, finish_reasons=reasons,
                        prompt_tokens=lengths, texts=texts)

    ``text``: each sequence has its generated text; ``openai``: the input is
    OpenAI batch lines, each sequence has its (endpoint, model), and a
    `.jsonl` output has the OpenAI batch output shape.

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
                 overwrite=False, *, text=False, openai=False):
        self.path = os.fspath(path)
        if n_seqs < 1:
            raise ValueError(f'n_seqs={n_seqs}: must be >= 1')
        self.format = output_format(self.path, save_logits)
        check_writable(self.path, '', overwrite=True)     # existence: below, under the lock
        self.n_seqs, self.vocab_size, self.save_logits = n_seqs, vocab_size, save_logits
        self.text, self.openai = bool(text), bool(openai)
        self.meta = _checked_meta(meta)
        self.identity = {'n_seqs': n_seqs, 'vocab_size': vocab_size,
                         'save_logits': int(save_logits), 'text': int(self.text),
                         'openai': int(self.openai), **_checked_meta(identity)}
        # when the run first started: the OpenAI lines' "created"
        self.created = int(time.time())
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
            if before is not None and isinstance(before.get('created'), int):
                self.created = before['created']
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
        diff = [f'{k}{_IDENTITY_NOTES.get(k, "")} {before["identity"].get(k)!r} then, {v!r} now'
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
        write_json(self.manifest, {'identity': self.identity, 'created': self.created,
                                   'chunks': self.chunks, 'final': final})

    def write(self, index, ids, generated, logits=None, *, finish_reasons, prompt_tokens,
              texts=None, openai=None):
        """Commit the next ``b`` sequences as one chunk.

        index: int [b], must be ``written, written+1, ...``; ids: list[str] [b];
        generated: list of b int arrays [new_i]; logits: float32 [b, vocab]
        (required exactly when ``save_logits``); finish_reasons: list of b
        FINISH_REASONS; prompt_tokens: int [b], each prompt's length (>= 1);
        texts: list[str] [b] (exactly when ``text``); openai: list of b
        (endpoint 'completions' | 'chat', model str) (exactly when ``openai``).
        """
        start, b = self.written, len(index)
        self._check_batch(index, ids, generated, logits)
        _check_given('texts', texts, self.text, b, lambda t: isinstance(t, str))
        _check_given('openai', openai, self.openai, b, lambda r: len(r) == 2 and r[0] in (
            'completions', 'chat') and isinstance(r[1], str))
        reasons, prompts = _checked_ends(b, finish_reasons, prompt_tokens)
        new = np.concatenate([np.asarray(g, dtype=np.int64).ravel() for g in generated])
        if new.size and (new.min() < 0 or new.max() >= self.vocab_size):
            raise ValueError(f'generated token outside [0, vocab_size={self.vocab_size})')
        completion = np.array([np.size(g) for g in generated], dtype=np.int64)
        offsets = np.zeros(b + 1, dtype=np.int64)
        np.cumsum(completion, out=offsets[1:])
        name = _chunk_name(start, start + b)
        path = os.path.join(self.dir, name)
        with atomic_write(path) as tmp, hdf5_image(tmp) as f:
            f.create_dataset('ids', data=list(ids), dtype=h5py.string_dtype())
            f.create_dataset('generated', data=new.astype(np.int32))
            f.create_dataset('generated_offsets', data=offsets)
            f.create_dataset('finish_reason', data=reasons, dtype=h5py.string_dtype())
            f.create_dataset('prompt_tokens', data=prompts)
            f.create_dataset('completion_tokens', data=completion.astype(np.int32))
            if self.save_logits:
                f.create_dataset('last_logits', data=np.asarray(logits, dtype=np.float32))
            if self.text:
                _put_texts(f, 'text', texts)
            if self.openai:
                f.create_dataset('endpoint', data=[r[0] for r in openai],
                                 dtype=h5py.string_dtype())
                _put_texts(f, 'model', [r[1] for r in openai])
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
            check_space(self.path, sum(c['bytes'] for c in self.chunks) + (1 << 20))
            with atomic_write(self.path) as tmp:
                if self.format == 'hdf5':
                    self._assemble(tmp)
                else:
                    self._assemble_lines(tmp)
                # before the rename: a rerun killed after it knows OUT is complete
                self._write_manifest({'bytes': os.path.getsize(tmp),
                                      'sha256': file_digest(tmp)})
        with os_errors(self.dir):
            shutil.rmtree(self.dir)

    def _chunk_rows(self):
        """Yield, chunk by chunk (verified), in input order, per sequence:
        (id, tokens int32 [n], finish reason, prompt tokens, text or None,
        (endpoint, model) or None)."""
        for c in self.chunks:
            self._check_chunk(c)
            with h5py.File(os.path.join(self.dir, c['file']), 'r') as f:
                ids = f['ids'].asstr()[()].tolist()
                gen = np.split(f['generated'][()], f['generated_offsets'][1:-1])
                reasons = f['finish_reason'].asstr()[()].tolist()
                prompts = f['prompt_tokens'][()].tolist()
                texts = _get_texts(f, 'text') if self.text else [None] * len(ids)
                requests = list(zip(f['endpoint'].asstr()[()].tolist(),
                                    _get_texts(f, 'model'))) if self.openai \
                    else [None] * len(ids)
            yield from zip(ids, gen, reasons, prompts, texts, requests)

    def _assemble_lines(self, tmp):
        """Write the JSONL output ``tmp`` from the chunks, streamed."""
        key = json.dumps(self.identity, sort_keys=True)
        with open(tmp, 'w', encoding='utf-8') as out:
            for i, (seq_id, tokens, why, prompt, text, request) in enumerate(self._chunk_rows()):
                if self.openai:
                    line = openai_line(seq_id, text, why, prompt, tokens.size, request,
                                       self.created, f'{key}/{i}')
                else:
                    line = result_line(seq_id, text, tokens, why, prompt)
                out.write(line + '\n')

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
            per_seq = {'finish_reason': out.create_dataset('finish_reason', shape=(n,),
                                                           dtype=h5py.string_dtype()),
                       'prompt_tokens': out.create_dataset('prompt_tokens', shape=(n,),
                                                           dtype=np.int32),
                       'completion_tokens': out.create_dataset('completion_tokens', shape=(n,),
                                                               dtype=np.int32)}
            text = out.create_dataset('text', shape=(n,), dtype=h5py.string_dtype()) \
                if self.text else None
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
                    for key, ds in per_seq.items():
                        ds[start:stop] = f[key][()]
                    if text is not None:    # an HDF5 string ends at a NUL: U+FFFD for it
                        text[start:stop] = [t.replace('\0', '\ufffd')
                                            for t in _get_texts(f, 'text')]
                    if logits is not None:
                        logits[start:stop] = f['last_logits'][()]


def _put_texts(f, name, texts):
    """Strings ``texts`` [b] into chunk ``f`` as UTF-8 bytes ``NAME_bytes``
    uint8 [total] and ``NAME_offsets`` int64 [b+1]: any text, a NUL included
    (an HDF5 string ends at one)."""
    data = [t.encode('utf-8') for t in texts]
    offsets = np.zeros(len(data) + 1, np.int64)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    f.create_dataset(f'{name}_bytes', data=np.frombuffer(b''.join(data), np.uint8))
    f.create_dataset(f'{name}_offsets', data=offsets)


def _get_texts(f, name):
    """The strings :func:`_put_texts` wrote: list[str] [b]."""
    data, offsets = f[f'{name}_bytes'][()].tobytes(), f[f'{name}_offsets'][()]
    return [data[a:b].decode('utf-8') for a, b in zip(offsets[:-1], offsets[1:])]


def output_format(path, save_logits=False):
    """'hdf5' or 'jsonl' from the extension of the output ``path``; UsageError
    for another, or for a .jsonl output with ``save_logits``."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FORMATS:
        raise UsageError(f'{path}: unknown output extension {ext or "(none)"!r}; use .h5 '
                         '(HDF5) or .jsonl (one JSON line per sequence)')
    if _FORMATS[ext] == 'jsonl' and save_logits:
        raise UsageError(f'{path}: --save-logits needs an .h5 output (a .jsonl output holds '
                         'no logits)')
    return _FORMATS[ext]


def _check_given(name, values, wanted, b, valid):
    """ValueError unless ``values`` is given exactly when ``wanted``, as b
    items each ``valid``."""
    if (values is not None) != wanted:
        raise ValueError(f'{name} must be given exactly when the writer has {name} '
                         f'({wanted})')
    if values is not None and (len(values) != b or not all(map(valid, values))):
        raise ValueError(f'{name}: expected {b} valid items, got {list(values)[:4]}...')


def _checked_ends(b, finish_reasons, prompt_tokens):
    """(finish reasons list[str] [b], prompt lengths int32 [b]), checked:
    each reason one of FINISH_REASONS, each length an integer >= 1."""
    reasons, prompts = list(finish_reasons), np.asarray(prompt_tokens)
    if len(reasons) != b or prompts.shape != (b,):
        raise ValueError(f'batch of {b} sequences with {len(reasons)} finish reasons and '
                         f'prompt_tokens of shape {prompts.shape}')
    bad = [r for r in reasons if r not in FINISH_REASONS]
    if bad:
        raise ValueError(f'finish reason {bad[0]!r}: must be one of {FINISH_REASONS}')
    if prompts.dtype.kind not in 'iu' or (prompts < 1).any() or (prompts > 2 ** 31 - 1).any():
        raise ValueError(f'prompt_tokens {prompts.tolist()[:4]}...: must be integers >= 1')
    return reasons, prompts.astype(np.int32)


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


def open_output(path):
    """The HDF5 output ``path`` open for reading (h5py.File), its format,
    version and datasets checked; DataError saying what is wrong."""
    try:
        f = h5py.File(path, 'r')
    except OSError as e:
        raise DataError(f'{path}: not a readable HDF5 file ({e})') from None
    problem = None
    if f.attrs.get('format') != OUTPUT_FORMAT:
        problem = f'not an mpimoe output file (no format="{OUTPUT_FORMAT}" attribute)'
    elif f.attrs.get('format_version') != OUTPUT_VERSION:
        problem = (f'output format_version {f.attrs.get("format_version")}; this mpimoe reads '
                   f'version {OUTPUT_VERSION}')
    else:
        missing = [k for k in ('ids', 'generated', 'generated_offsets')
                   if not isinstance(f.get(k), h5py.Dataset)]
        problem = missing and f'missing dataset(s) {", ".join(missing)}'
    if problem:
        f.close()
        raise DataError(f'{path}: {problem}')
    return f


def read_outputs(path):
    """Read an output file -> dict: ids list[str] [n], generated list of int32
    [new_i], last_logits float32 [n, vocab] or None, finish_reason list[str]
    [n], prompt_tokens int32 [n], completion_tokens int32 [n] (each None in a
    file written before it existed), text list[str] [n] or None (no
    tokenizer), meta dict of the caller's attributes.  A .jsonl output
    (:func:`mpimoe.io.result_lines.read_result_lines`): meta {}, no logits,
    generated None for the OpenAI shape."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f'{path}: output file not found')
    if output_format(path) == 'jsonl':
        return read_result_lines(path)
    with open_output(path) as f:
        offsets = f['generated_offsets'][()]
        generated = f['generated'][()]
        return {
            'ids': f['ids'].asstr()[()].tolist(),
            'generated': np.split(generated, offsets[1:-1]),
            'last_logits': f['last_logits'][()] if 'last_logits' in f else None,
            **{k: f[k].asstr()[()].tolist() if k in f else None
               for k in ('finish_reason', 'text')},
            **{k: f[k][()] if k in f else None for k in ('prompt_tokens', 'completion_tokens')},
            'meta': {k: _python_scalar(v) for k, v in f.attrs.items()
                     if k not in ('format', 'format_version')},
        }


def _python_scalar(value):
    return value.item() if isinstance(value, np.generic) else value
