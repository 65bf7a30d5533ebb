"""Reading weight files (weights/FORMAT.md, version 1): :class:`WeightFile`
reads one tensor, one expert or the non-expert part and checks shape, dtype,
checksum and finiteness of what it reads, reads the tokenizer files it
carries (:mod:`mpimoe.checkpoint.tokenizer_files`), or validates the whole
file; :func:`inspect_report` is ``mpimoe inspect``.  The layout it checks
against is :func:`mpimoe.checkpoint.layout.tensor_specs`.

    with WeightFile('weights.h5') as wf:
        experts = wf.read_expert(layer=1, e=5)    # {'gate': [d, d_expert], ...}
"""

import hashlib
import os
import zlib

import h5py
import numpy as np

from mpimoe import __version__
from mpimoe.backends.backend import from_words
from mpimoe.checkpoint.layout import (FORMAT, READ_VERSIONS, SLAB_ELEMS,
                                      expert_tensor_names, is_expert, nonexpert_tensor_names,
                                      row_slabs, storage_of, tensor_dtype, tensor_specs)
from mpimoe.checkpoint.tokenizer_files import GROUP, dataset_problem, text_tokenizer
from mpimoe.errors import ConfigError, DataError, clip
from mpimoe.model.config import GROUPS, ModelConfig
from mpimoe.text.tokenizer import TOKENIZER_FILES
from mpimoe.io.paths import regular_file

__all__ = ['WeightFile', 'inspect_report']

#: exponent bits of each 16-bit dtype: all ones is an Inf or a NaN
_EXPONENT = {'bfloat16': 0x7f80, 'float16': 0x7c00}
#: HDF5 layouts other than contiguous, as a problem says them
_LAYOUTS = {h5py.h5d.CHUNKED: 'chunked, maybe filtered', h5py.h5d.COMPACT: 'compact',
            h5py.h5d.VIRTUAL: 'a virtual dataset: its data lies in other files'}
#: problems inspect lists one by one before "and N more"
_SHOW_PROBLEMS = 50


def _text_attr(attrs, key):
    """A string attribute (h5py gives str or bytes), or None when missing."""
    v = attrs.get(key)
    return v.decode('utf-8', 'replace') if isinstance(v, bytes) else v


class WeightFile:
    """A weight file opened read-only; reads and checks tensors on demand.

        with WeightFile('weights.h5') as wf:
            experts = wf.read_expert(layer=1, e=5)    # {'gate': [d, d_expert], ...}

    ``source`` is a path or a binary file-like object (anything h5py accepts).
    Attributes: ``name`` (for messages), ``config`` (ModelConfig), ``written_by``
    (mpimoe version that wrote the file).  Every problem with the file raises
    DataError naming the file (and tensor).
    """

    def __init__(self, source):
        is_path = isinstance(source, (str, os.PathLike))
        self.name = os.fspath(source) if is_path else getattr(source, 'name', repr(source))
        if is_path:
            regular_file(self.name, 'weights')
        self._file = self._open(self.name if is_path else source)
        try:
            self.config = self._check_root()
        except DataError:
            self._file.close()
            raise
        self._specs = dict(tensor_specs(self.config))

    def _open(self, source):
        """h5py.File read-only; OSError -> DataError saying what to do.

        A path is opened without HDF5's data sieve buffer: through it, a
        block of columns of a contiguous tensor (a TP rank's part,
        mpimoe.model.tp_frontend.read_shard) narrower than 64 KiB a row
        costs a 64 KiB window per row (the whole tensor where rows are
        shorter than that); without it each row's piece is read as such.
        Whole tensors and row ranges are one contiguous read either way."""
        try:
            if isinstance(source, str):
                fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
                fapl.set_sieve_buf_size(0)
                return h5py.File(h5py.h5f.open(os.fsencode(source), h5py.h5f.ACC_RDONLY, fapl))
            return h5py.File(source, 'r')
        except FileNotFoundError:
            raise DataError(f'{self.name}: no such file; check the path or write one '
                            f'with `mpimoe init-weights`') from None
        except OSError as e:
            raise DataError(f'{self.name}: not a readable HDF5 file (truncated, or not '
                            f'HDF5?): {" ".join(str(e).split())}; rewrite it') from None

    def _check_root(self):
        """Check format, version and config attributes; -> ModelConfig."""
        attrs = self._file.attrs
        fmt = _text_attr(attrs, 'format')
        if fmt != FORMAT:
            raise DataError(f'{self.name}: not an mpimoe weight file (format attribute '
                            f'{clip(repr(fmt))}, expected {FORMAT!r}); write one with '
                            f'`mpimoe init-weights` or `mpimoe convert`')
        version = attrs.get('format_version')
        if not isinstance(version, (int, np.integer)) or version not in READ_VERSIONS:
            shown = version.tolist() if isinstance(version, np.generic) else version
            raise DataError(f'{self.name}: format_version {clip(repr(shown))} is not supported '
                            f'(this mpimoe {__version__} reads versions '
                            f'{", ".join(map(str, READ_VERSIONS))}); rewrite the file with '
                            f'this version')
        self.format_version = int(version)
        self.written_by = _text_attr(attrs, 'mpimoe_version')
        try:
            return ModelConfig.from_json(_text_attr(attrs, 'config'))
        except ConfigError as e:
            raise DataError(f'{self.name}: bad config attribute: {e}; rewrite the file') \
                from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._file.close()

    def _error(self, name, problem):
        return DataError(f'{self.name}: tensor {name}: {problem}')

    def _dataset(self, name):
        """The dataset ``name`` reached through hard links only, or a problem string."""
        node, path = self._file, ''
        for part in name.split('/'):
            if not isinstance(node, h5py.Group):
                return f'{path} is a dataset, not a group'
            path = f'{path}/{part}' if path else part
            link = node.get(part, getlink=True)
            if link is None:
                return 'missing'
            if not isinstance(link, h5py.HardLink):
                where = '' if path == name else f' at {path}'
                return f'{type(link).__name__}{where} not allowed (plain groups and datasets only)'
            node = node[part]
        return node if isinstance(node, h5py.Dataset) else 'is a group, not a dataset'

    def _problem(self, name, ds):
        """What is wrong with dataset ``ds`` apart from its checksum, or None."""
        shape = self._specs[name]
        if ds.shape != shape:
            return f'shape {ds.shape}, expected {shape}'
        want = tensor_dtype(name, self.config)
        if ds.dtype != storage_of(want):
            return f'stored as {ds.dtype}, expected ' + \
                ('little-endian float32' if want == 'float32' else 'little-endian uint16 words')
        dtype = _text_attr(ds.attrs, 'dtype')
        if dtype != want:
            return f'dtype attribute {clip(repr(dtype))}, expected {want!r}'
        problem = self._storage_problem(ds)
        if problem is None and not isinstance(ds.attrs.get('crc32'), (int, np.integer)):
            return 'crc32 attribute missing or not an integer'
        return problem

    def _storage_problem(self, ds):
        """Whether ``ds`` is one byte range of this file, as a problem string, or None."""
        layout = ds.id.get_create_plist().get_layout()
        if layout != h5py.h5d.CONTIGUOUS:
            return f'not contiguous in this file ({_LAYOUTS.get(layout, layout)})'
        if ds.external:
            return 'not contiguous in this file (external storage: its data lies in other files)'
        return None

    def _locate(self, name):
        """``(dataset, None)`` when ``name`` passes the structural checks,
        else ``(None or dataset, problem)``."""
        if name not in self._specs:
            return None, 'not a tensor of this model config'
        ds = self._dataset(name)
        if isinstance(ds, str):
            return None, ds
        return ds, self._problem(name, ds)

    def _checked(self, name):
        """Dataset ``name`` after the structural checks; DataError otherwise."""
        ds, problem = self._locate(name)
        if problem:
            raise self._error(name, problem)
        return ds

    def _read_words(self, name, ds, sel=None):
        """Raw little-endian words of ``ds`` (the block ``sel``, a tuple of
        slices with start and stop over its leading dimensions, when given):
        uint16, or float32 for an FP32 tensor."""
        sel = sel or ()
        shape = tuple(s.stop - s.start for s in sel) + ds.shape[len(sel):]
        out = np.empty(shape, ds.dtype)
        try:
            ds.read_direct(out, source_sel=sel or None)
        except OSError as e:
            raise self._error(name, f'read failed: {" ".join(str(e).split())}') from None
        return out

    def _crc_ok(self, ds, crc):
        return int(ds.attrs['crc32']) == crc

    def _nonfinite(self, words, sel=()):
        """Where the first NaN or Inf of ``words`` (uint16, or float32 values:
        the block ``sel`` of a tensor, as :meth:`_read_words`) is in the
        tensor, as a problem string, or None."""
        flat = words.reshape(-1)
        mask = None if words.dtype.kind == 'f' else words.dtype.type(_EXPONENT[self.config.dtype])
        for a in range(0, flat.size, SLAB_ELEMS):
            part = flat[a:a + SLAB_ELEMS]
            bad = np.flatnonzero(~np.isfinite(part) if mask is None else (part & mask) == mask)
            if bad.size:
                at = np.unravel_index(a + int(bad[0]), words.shape)
                at = [int(i) + (sel[k].start if k < len(sel) else 0) for k, i in enumerate(at)]
                return f'value at {at} is NaN or Inf (not a usable model)'
        return None

    def read(self, name, verify=True, part=None):
        """Tensor ``name`` as an array of the 16-bit dtype (float32 for an FP32
        tensor: layout.tensor_dtype), shape from tensor_specs; with ``part``
        (a tuple of slices with start and stop over its leading dimensions)
        only that block, read from the file as such (an HDF5 hyperslab).

        With ``verify`` the crc32 of the bytes read is checked, for a whole
        tensor only (a checksum covers the whole); NaN and Inf values are
        refused either way.
        """
        ds = self._checked(name)
        words = self._read_words(name, ds, part)
        if verify and part is None and not self._crc_ok(ds, zlib.crc32(words)):
            raise self._error(name, 'checksum mismatch (file corrupted?); rewrite it')
        problem = self._nonfinite(words, part or ())
        if problem:
            raise self._error(name, f'{problem}; rewrite or reconvert the file')
        return words if words.dtype.kind == 'f' else from_words(words, self.config.dtype)

    def read_expert(self, layer, e, verify=True):
        """Expert ``e`` of MoE layer ``layer``: ``{'gate': [d, d_expert],
        'up': [d, d_expert], 'down': [d_expert, d]}`` (no gate for ``mlp``)."""
        names = expert_tensor_names(layer, e, self.config)
        return {n.rsplit('/', 1)[-1]: self.read(n, verify) for n in names}

    def read_nonexpert(self, verify=True):
        """Every tensor outside the experts groups: ``{name: array}``."""
        return {n: self.read(n, verify) for n in nonexpert_tensor_names(self.config)}

    def _tokenizer_group(self):
        """The group GROUP read and checked: ``(files, problems)``; files is
        None when the file has no such group, else {name: bytes} in the order
        of TOKENIZER_FILES of the datasets that passed; problems are strings
        ``'tokenizer/NAME: problem'``."""
        link = self._file.get(GROUP, getlink=True)
        if link is None:
            return None, []
        if not isinstance(link, h5py.HardLink):
            return None, [f'{GROUP}: {type(link).__name__} not allowed (plain groups and '
                          f'datasets only)']
        group = self._file[GROUP]
        if not isinstance(group, h5py.Group):
            return None, [f'{GROUP}: is a dataset, not a group']
        files, problems = {}, []
        for name in group:
            ds = self._dataset(f'{GROUP}/{name}')
            problem = ds if isinstance(ds, str) else \
                dataset_problem(name, ds) or self._storage_problem(ds)
            if problem is None:
                data = self._read_bytes(ds)
                if int(ds.attrs['crc32']) == zlib.crc32(data):
                    files[name] = data
                else:
                    problem = 'checksum mismatch (file corrupted?)'
            if problem:
                problems.append(f'{GROUP}/{name}: {problem}')
        if group.get(TOKENIZER_FILES[0], getlink=True) is None:
            problems.append(f'{GROUP}: no {TOKENIZER_FILES[0]} dataset')
        return {n: files[n] for n in TOKENIZER_FILES if n in files}, problems

    def _read_bytes(self, ds):
        """The bytes of uint8 dataset ``ds`` [n]; DataError when the read fails."""
        out = np.empty(ds.shape, np.uint8)
        try:
            if ds.size:
                ds.read_direct(out)
        except OSError as e:
            raise DataError(f'{self.name}: {ds.name[1:]}: read failed: '
                            f'{" ".join(str(e).split())}') from None
        return out.tobytes()

    def tokenizer_files(self):
        """The tokenizer files the weight file carries, ``{name: bytes}`` in the
        order of TOKENIZER_FILES (tokenizer.json first), or None when it carries
        none; DataError naming the file and the dataset when one is not stored
        as weights/FORMAT.md says or fails its crc32."""
        files, problems = self._tokenizer_group()
        if problems:
            raise DataError(f'{self.name}: {problems[0]}; rewrite the file (`mpimoe convert`, '
                            f'or `mpimoe init-weights --tokenizer`)')
        return files

    def tokenizer(self):
        """TextTokenizer of :meth:`tokenizer_files`, or None when the file
        carries none; DataError when they do not parse or the tokenizer has ids
        beyond the model's vocab_size."""
        files = self.tokenizer_files()
        return None if files is None else \
            text_tokenizer(files, f'{self.name} ({GROUP})', self.config.vocab_size)

    def identity(self):
        """sha256 hex of the config and every tensor's crc32 attribute: equal for
        files with the same weights, wherever they lie (reads attributes only;
        the tokenizer files are not part of it)."""
        h = hashlib.sha256(self.config.to_json().encode())
        for name, _ in tensor_specs(self.config):
            ds = self._dataset(name)
            crc = ds.attrs.get('crc32') if isinstance(ds, h5py.Dataset) else None
            h.update(f'{name}={crc};'.encode())
        return h.hexdigest()

    def _value_problem(self, name, ds):
        """A checksum mismatch or a NaN/Inf of ``ds``, read slab by slab
        (bounded memory), as a problem string, or None."""
        crc, nonfinite = 0, None
        for r0, r1 in row_slabs(ds.shape):
            slab = (slice(r0, r1),)
            words = self._read_words(name, ds, slab)
            crc = zlib.crc32(words, crc)
            nonfinite = nonfinite or self._nonfinite(words, slab)
        if not self._crc_ok(ds, crc):
            return 'checksum mismatch (file corrupted?)'
        return nonfinite

    def _walk(self, group, prefix, found):
        """Collect the names of datasets and links under ``group`` into ``found``."""
        for key in group:
            path = f'{prefix}{key}'
            link = group.get(key, getlink=True)
            if isinstance(link, h5py.HardLink) and isinstance(group[key], h5py.Group):
                self._walk(group[key], f'{path}/', found)
            else:
                found.add(path)

    def validate(self, checksums=True):
        """Problems with the file as one string each; ``[]`` means valid.

        Missing and extra tensors, links, shapes, dtypes, layouts and (when
        ``checksums``) the crc32 and the finiteness (no NaN or Inf) of every
        tensor, read in bounded slabs; then the tokenizer group, when there is
        one, always in full (storage, crc32, that it parses and fits the
        vocabulary): its problems start with ``tokenizer``.
        """
        found = set()
        self._walk(self._file, '', found)
        problems = [f'{n}: extra object (not in the layout)'
                    for n in sorted(found - set(self._specs))
                    if n != GROUP and not n.startswith(f'{GROUP}/')]
        for name in self._specs:
            ds, problem = self._locate(name)
            if problem is None and checksums:
                problem = self._value_problem(name, ds)
            if problem:
                problems.append(f'{name}: {problem}')
        return problems + self._tokenizer_problems()

    def _tokenizer_problems(self):
        """Problems of the tokenizer group (none when absent): [str]."""
        files, problems = self._tokenizer_group()
        if files is None or problems:
            return problems
        try:
            text_tokenizer(files, GROUP, self.config.vocab_size)
        except DataError as e:
            return [str(e)]
        return []


def _size(nbytes):
    return f'{nbytes:,} bytes ({nbytes / 1e6:,.2f} MB)'


def _tokenizer_line(wf):
    """inspect's line about the tokenizer ``wf`` carries (its problems are
    validate's)."""
    try:
        files = wf.tokenizer_files()
        if files is None:
            return 'tokenizer: none'
        tokenizer = text_tokenizer(files, GROUP, wf.config.vocab_size)
    except DataError:
        return 'tokenizer: not usable (see validation)'
    return (f'tokenizer: {tokenizer.vocab_size} tokens, chat template: '
            f'{"yes" if tokenizer.has_chat_template else "no"}, files: {", ".join(files)}')


def inspect_report(path, checksums=True):
    """``mpimoe inspect``: -> (text, ok).  The text lists the config, tensor count,
    sizes (total, non-expert, per expert, per MoE layer of experts), the
    tokenizer carried and the validation result; ``ok`` is False when
    validation found problems."""
    with WeightFile(path) as wf:
        cfg = wf.config
        writer, version = wf.written_by, wf.format_version
        problems = wf.validate(checksums)
        tokenizer = _tokenizer_line(wf)
    specs = tensor_specs(cfg)
    nbytes = {n: int(np.prod(s)) * storage_of(tensor_dtype(n, cfg)).itemsize for n, s in specs}
    expert = sum(nbytes[n] for n in expert_tensor_names(cfg.moe_layers[0], 0, cfg))
    lines = [f'file: {path} ({_size(os.path.getsize(path))} on disk)',
             f'format: {FORMAT} version {version}, written by mpimoe {clip(writer)}',
             'config:']
    lines += [f'  {k} = {v}' for k, v in sorted(vars(cfg).items()) if k not in GROUPS]
    lines += [f'  {g}.{k} = {v}' for g in GROUPS for k, v in vars(getattr(cfg, g)).items()]
    lines += [f'tensors: {len(specs)}',
              f'total: {_size(sum(nbytes.values()))}',
              f'non-expert: {_size(sum(b for n, b in nbytes.items() if not is_expert(n)))}',
              f'per expert: {_size(expert)} ({"+".join(cfg.expert_matrices)})',
              f'experts per MoE layer: {_size(expert * cfg.n_experts)} '
              f'({cfg.n_experts} experts x {cfg.n_moe_layers} MoE layers)',
              'checksums: ' + ('checked (crc32, no NaN or Inf)' if checksums
                                else 'not checked (--no-checksums)'), tokenizer]
    if problems:
        lines += [f'validation: {len(problems)} problem(s)']
        lines += [f'  {p}' for p in problems[:_SHOW_PROBLEMS]]
        if len(problems) > _SHOW_PROBLEMS:
            lines.append(f'  ... and {len(problems) - _SHOW_PROBLEMS} more')
    else:
        lines.append('validation: valid')
    return '\n'.join(lines), not problems
