"""HDF5 weight format (weights/FORMAT.md, version 1): layout, writer, loader.

:func:`tensor_specs` is THE definition of the layout: every tensor's name and
shape, in storage order.  :func:`write_synthetic` writes seeded synthetic
weights slab by slab (memory bounded whatever the model size);
:class:`WeightFile` reads one tensor, one expert or the non-expert part and
checks shape, dtype and checksum of what it reads; :func:`inspect_report` is
``mpimoe inspect``.

    >>> specs = tensor_specs(model_config('tiny'))
    >>> specs[0]
    ('embed', (256, 64))
"""

import contextlib
import hashlib
import os
import time
import zlib

import h5py
import numpy as np

from mpimoe import __version__
from mpimoe.backends.backend import from_words, storage_dtype, to_words
from mpimoe.errors import ConfigError, DataError, clip
from mpimoe.model.config import ModelConfig
from mpimoe.io.files import atomic_write
from mpimoe.io.paths import regular_file

__all__ = ['FORMAT', 'FORMAT_VERSION', 'tensor_specs', 'expert_tensor_names',
           'nonexpert_tensor_names', 'open_for_writing', 'write_tensor', 'write_synthetic',
           'WeightFile', 'inspect_report']

FORMAT = 'mpimoe-weights'
FORMAT_VERSION = 1

#: elements generated and written per slab: 4 Mi -> 16 MiB of FP32
_SLAB_ELEMS = 4 << 20
#: seconds between progress lines while writing
_LOG_EVERY_S = 5.0
_WORD = np.dtype('<u2')
_NORMS = ('attn_norm', 'ffn_norm', 'final_norm')
#: exponent bits of each 16-bit dtype: all ones is an Inf or a NaN
_EXPONENT = {'bfloat16': 0x7f80, 'float16': 0x7c00}
#: HDF5 layouts other than contiguous, as a problem says them
_LAYOUTS = {h5py.h5d.CHUNKED: 'chunked, maybe filtered', h5py.h5d.COMPACT: 'compact',
            h5py.h5d.VIRTUAL: 'a virtual dataset: its data lies in other files'}
#: problems inspect lists one by one before "and N more"
_SHOW_PROBLEMS = 50


# ---------------------------------------------------------------- layout

def _layer_specs(cfg, i):
    """(name, shape) of layer ``i``: attention, norms, then dense MLP or MoE."""
    d, q, kv = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    p = f'layers/{i}'
    specs = [(f'{p}/attn_norm', (d,)), (f'{p}/wq', (d, q)), (f'{p}/wk', (d, kv)),
             (f'{p}/wv', (d, kv)), (f'{p}/wo', (q, d)), (f'{p}/ffn_norm', (d,))]
    if i < cfg.n_dense_layers:
        return specs + _mlp_specs(cfg, f'{p}/mlp', cfg.d_dense)
    specs.append((f'{p}/router', (d, cfg.n_experts)))
    for e in range(cfg.n_experts):
        specs += _mlp_specs(cfg, f'{p}/experts/{e}', cfg.d_expert)
    return specs


def _mlp_specs(cfg, prefix, hidden):
    """(name, shape) of one MLP: gate/up [d, hidden], down [hidden, d]."""
    d = cfg.d_model
    return [(f'{prefix}/{m}', (hidden, d) if m == 'down' else (d, hidden))
            for m in cfg.expert_matrices]


def tensor_specs(cfg):
    """Every tensor of ``cfg`` as ``(name, shape)``, in storage order.

    Matrices are [in, out] (``y = x @ W``).  Names: ``embed`` [V, d], per layer
    ``layers/{i}/...``, then ``final_norm`` [d] and ``lm_head`` [d, V].
    """
    d, v = cfg.d_model, cfg.vocab_size
    specs = [('embed', (v, d))]
    for i in range(cfg.n_layers):
        specs += _layer_specs(cfg, i)
    return specs + [('final_norm', (d,)), ('lm_head', (d, v))]


def expert_tensor_names(layer, e, cfg):
    """Names of expert ``e`` of MoE layer ``layer``, one per ``cfg.expert_matrices``."""
    if layer not in cfg.moe_layers or not 0 <= e < cfg.n_experts:
        raise ValueError(f'(layer {layer}, expert {e}) is not an expert of this model: '
                         f'MoE layers {cfg.n_dense_layers}..{cfg.n_layers - 1}, '
                         f'experts 0..{cfg.n_experts - 1}')
    return [f'layers/{layer}/experts/{e}/{m}' for m in cfg.expert_matrices]


def _is_expert(name):
    return '/experts/' in name


def nonexpert_tensor_names(cfg):
    """Names of every tensor outside the ``experts`` groups (a front-end's part)."""
    return [n for n, _ in tensor_specs(cfg) if not _is_expert(n)]


# ---------------------------------------------------------------- writer

def _init_std(name, shape, cfg):
    """Standard deviation of tensor ``name``; None means all ones (norms).

    N(0, 1/d_in) keeps activations O(1); output projections (wo, down) are
    further scaled by 1/sqrt(2 n_layers) so the residual stream stays O(1).
    """
    leaf = name.rsplit('/', 1)[-1]
    if leaf in _NORMS:
        return None
    if leaf == 'embed':
        return 1.0
    std = shape[0] ** -0.5
    return std / np.sqrt(2 * cfg.n_layers) if leaf in ('wo', 'down') else std


def _slabs(shape):
    """Row ranges ``(r0, r1)`` covering ``shape[0]`` with <= _SLAB_ELEMS per slab."""
    row = int(np.prod(shape[1:], dtype=np.int64))
    step = max(1, _SLAB_ELEMS // row)
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]


def _synthetic_slabs(name, shape, cfg, seed):
    """Tensor ``name`` generated from (seed, name): yields ``(r0, r1, words)``."""
    std = _init_std(name, shape, cfg)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    dt = storage_dtype(cfg.dtype)
    for r0, r1 in _slabs(shape):
        n = (r1 - r0,) + tuple(shape[1:])
        if std is None:
            x = np.ones(n, np.float32)
        else:
            x = rng.standard_normal(n, dtype=np.float32)
            x *= np.float32(std)
        yield r0, r1, to_words(x.astype(dt)).astype(_WORD, copy=False)


def write_tensor(f, name, shape, dtype, slabs):
    """Dataset ``name`` [shape] of 16-bit words in the open file ``f``, with the
    attributes ``dtype`` and ``crc32``; -> bytes written.

    slabs: iterable of ``(r0, r1, words)``, words uint16 [r1 - r0, *shape[1:]]
    (C order), covering the rows in increasing order.
    """
    ds = f.create_dataset(name, shape=shape, dtype=_WORD)
    crc = 0
    for r0, r1, words in slabs:
        ds[r0:r1] = words
        crc = zlib.crc32(words, crc)
    ds.attrs['dtype'] = dtype
    ds.attrs['crc32'] = crc
    return ds.size * _WORD.itemsize


def _check_output(path, overwrite):
    """Refuse an existing ``path`` (without overwrite) or a missing directory."""
    if os.path.exists(path) and not overwrite:
        raise DataError(f'{path}: exists; pass --overwrite (overwrite=True) to replace it')
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise DataError(f'{path}: directory {parent} does not exist; create it first')


@contextlib.contextmanager
def open_for_writing(path, cfg, overwrite=False):
    """A new weight file: yields an h5py.File on ``path + '.partial'`` with the
    root attributes of ``cfg`` written; synced and renamed to ``path`` when the
    block ends cleanly, removed on any error (:func:`mpimoe.io.files.atomic_write`).
    Refuses an existing ``path`` unless ``overwrite``."""
    _check_output(path, overwrite)
    with atomic_write(path) as partial, h5py.File(partial, 'w') as f:
        _write_root_attrs(f, cfg)
        yield f


def write_synthetic(cfg, path, seed=0, overwrite=False, log=None):
    """Write seeded synthetic weights of ``cfg`` to ``path`` (HDF5, FORMAT.md).

    Each tensor depends only on (seed, name).  Written to ``path + '.partial'``
    and renamed at the end, so ``path`` is never left half-written.  Memory
    stays at a few slabs of _SLAB_ELEMS whatever the model size.
    Returns ``{'path', 'tensors', 'bytes', 'seconds'}``.
    """
    if seed < 0:
        raise ConfigError(f'seed={seed}: must be >= 0')
    log = log or (lambda line: None)
    specs = tensor_specs(cfg)
    total = sum(int(np.prod(s)) for _, s in specs) * _WORD.itemsize
    t0 = last = time.monotonic()
    done = 0
    with open_for_writing(path, cfg, overwrite) as f:
        log(f'writing {path}: {len(specs)} tensors, {total / 1e9:.3f} GB, seed {seed}')
        for name, shape in specs:
            done += write_tensor(f, name, shape, cfg.dtype,
                                 _synthetic_slabs(name, shape, cfg, seed))
            if time.monotonic() - last >= _LOG_EVERY_S:
                last = time.monotonic()
                log(f'  {done / total:6.1%}  {done / 1e9:.3f} GB  {last - t0:.0f} s  {name}')
    secs = time.monotonic() - t0
    log(f'wrote {path}: {len(specs)} tensors, {total / 1e9:.3f} GB in {secs:.1f} s')
    return {'path': path, 'tensors': len(specs), 'bytes': total, 'seconds': secs}


def _write_root_attrs(f, cfg):
    f.attrs['format'] = FORMAT
    f.attrs['format_version'] = FORMAT_VERSION
    f.attrs['config'] = cfg.to_json()
    f.attrs['mpimoe_version'] = __version__


# ---------------------------------------------------------------- loader

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
        self._file = self._open(source)
        try:
            self.config = self._check_root()
        except DataError:
            self._file.close()
            raise
        self._specs = dict(tensor_specs(self.config))

    def _open(self, source):
        """h5py.File read-only; OSError -> DataError saying what to do."""
        try:
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
        if not isinstance(version, (int, np.integer)) or version != FORMAT_VERSION:
            shown = version.tolist() if isinstance(version, np.generic) else version
            raise DataError(f'{self.name}: format_version {clip(repr(shown))} is not supported '
                            f'(this mpimoe {__version__} reads version {FORMAT_VERSION}); '
                            f'rewrite the file with this version')
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
        if ds.dtype != _WORD:
            return f'stored as {ds.dtype}, expected little-endian uint16 words'
        dtype = _text_attr(ds.attrs, 'dtype')
        if dtype != self.config.dtype:
            return f'dtype attribute {clip(repr(dtype))}, expected {self.config.dtype!r}'
        layout = ds.id.get_create_plist().get_layout()
        if layout != h5py.h5d.CONTIGUOUS:
            return f'not contiguous in this file ({_LAYOUTS.get(layout, layout)})'
        if ds.external:
            return 'not contiguous in this file (external storage: its data lies in other files)'
        if not isinstance(ds.attrs.get('crc32'), (int, np.integer)):
            return 'crc32 attribute missing or not an integer'
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
        """Raw little-endian words of ``ds`` (rows ``sel`` when given)."""
        shape = ds.shape if sel is None else (sel.stop - sel.start,) + ds.shape[1:]
        out = np.empty(shape, _WORD)
        try:
            ds.read_direct(out, source_sel=sel)
        except OSError as e:
            raise self._error(name, f'read failed: {" ".join(str(e).split())}') from None
        return out

    def _crc_ok(self, ds, crc):
        return int(ds.attrs['crc32']) == crc

    def _nonfinite(self, words, shape, r0=0):
        """Where the first NaN or Inf of ``words`` (uint16 [r1 - r0, *shape[1:]],
        rows ``r0..`` of a tensor of ``shape``) is, as a problem string, or None."""
        mask = _WORD.type(_EXPONENT[self.config.dtype])
        flat = words.reshape(-1)
        for a in range(0, flat.size, _SLAB_ELEMS):
            bad = np.flatnonzero((flat[a:a + _SLAB_ELEMS] & mask) == mask)
            if bad.size:
                at = np.unravel_index(r0 * int(np.prod(shape[1:])) + a + int(bad[0]), shape)
                return f'value at {list(map(int, at))} is NaN or Inf (not a usable model)'
        return None

    def read(self, name, verify=True):
        """Tensor ``name`` as an array of the 16-bit dtype, shape from tensor_specs.

        With ``verify`` the crc32 of the bytes read is checked; NaN and Inf
        values are refused either way.
        """
        ds = self._checked(name)
        words = self._read_words(name, ds)
        if verify and not self._crc_ok(ds, zlib.crc32(words)):
            raise self._error(name, 'checksum mismatch (file corrupted?); rewrite it')
        problem = self._nonfinite(words, ds.shape)
        if problem:
            raise self._error(name, f'{problem}; rewrite or reconvert the file')
        return from_words(words, self.config.dtype)

    def read_expert(self, layer, e, verify=True):
        """Expert ``e`` of MoE layer ``layer``: ``{'gate': [d, d_expert],
        'up': [d, d_expert], 'down': [d_expert, d]}`` (no gate for ``mlp``)."""
        names = expert_tensor_names(layer, e, self.config)
        return {n.rsplit('/', 1)[-1]: self.read(n, verify) for n in names}

    def read_nonexpert(self, verify=True):
        """Every tensor outside the experts groups: ``{name: array}``."""
        return {n: self.read(n, verify) for n in nonexpert_tensor_names(self.config)}

    def identity(self):
        """sha256 hex of the config and every tensor's crc32 attribute: equal for
        files with the same weights, wherever they lie (reads attributes only)."""
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
        for r0, r1 in _slabs(ds.shape):
            words = self._read_words(name, ds, np.s_[r0:r1])
            crc = zlib.crc32(words, crc)
            nonfinite = nonfinite or self._nonfinite(words, ds.shape, r0)
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
        tensor, read in bounded slabs.
        """
        found = set()
        self._walk(self._file, '', found)
        problems = [f'{n}: extra object (not in the layout)'
                    for n in sorted(found - set(self._specs))]
        for name in self._specs:
            ds, problem = self._locate(name)
            if problem is None and checksums:
                problem = self._value_problem(name, ds)
            if problem:
                problems.append(f'{name}: {problem}')
        return problems


# ---------------------------------------------------------------- inspect

def _size(nbytes):
    return f'{nbytes:,} bytes ({nbytes / 1e6:,.2f} MB)'


def inspect_report(path, checksums=True):
    """``mpimoe inspect``: -> (text, ok).  The text lists the config, tensor count,
    sizes (total, non-expert, per expert, per MoE layer of experts) and the
    validation result; ``ok`` is False when validation found problems."""
    with WeightFile(path) as wf:
        cfg = wf.config
        writer = wf.written_by
        problems = wf.validate(checksums)
    specs = tensor_specs(cfg)
    nbytes = {n: int(np.prod(s)) * cfg.itemsize for n, s in specs}
    expert = sum(nbytes[n] for n in expert_tensor_names(cfg.moe_layers[0], 0, cfg))
    lines = [f'file: {path} ({_size(os.path.getsize(path))} on disk)',
             f'format: {FORMAT} version {FORMAT_VERSION}, written by mpimoe {clip(writer)}',
             'config:']
    lines += [f'  {k} = {v}' for k, v in sorted(vars(cfg).items())]
    lines += [f'tensors: {len(specs)}',
              f'total: {_size(sum(nbytes.values()))}',
              f'non-expert: {_size(sum(b for n, b in nbytes.items() if not _is_expert(n)))}',
              f'per expert: {_size(expert)} ({"+".join(cfg.expert_matrices)})',
              f'experts per MoE layer: {_size(expert * cfg.n_experts)} '
              f'({cfg.n_experts} experts x {cfg.n_moe_layers} MoE layers)',
              'checksums: ' + ('checked (crc32, no NaN or Inf)' if checksums
                                else 'not checked (--no-checksums)')]
    if problems:
        lines += [f'validation: {len(problems)} problem(s)']
        lines += [f'  {p}' for p in problems[:_SHOW_PROBLEMS]]
        if len(problems) > _SHOW_PROBLEMS:
            lines.append(f'  ... and {len(problems) - _SHOW_PROBLEMS} more')
    else:
        lines.append('validation: valid')
    return '\n'.join(lines), not problems
