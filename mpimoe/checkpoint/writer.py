"""Writing weight files (weights/FORMAT.md): a new file written atomically with
its root attributes, one tensor at a time in slabs with its checksum, and the
seeded synthetic weights of ``mpimoe init-weights`` (memory bounded whatever the
model size), with the tokenizer files when given
(:mod:`mpimoe.checkpoint.tokenizer_files`)."""

import contextlib
import os
import time
import zlib

import h5py
import numpy as np

from mpimoe import __version__
from mpimoe.backends.backend import storage_dtype, to_words
from mpimoe.checkpoint.layout import (FORMAT, FORMAT_VERSION, WORD, row_slabs, storage_of,
                                      tensor_dtype, tensor_specs)
from mpimoe.checkpoint.tokenizer_files import write_tokenizer_files
from mpimoe.errors import ConfigError, DataError
from mpimoe.io.files import atomic_write

__all__ = ['LOG_EVERY_S', 'open_for_writing', 'write_tensor', 'write_synthetic']

#: seconds between progress lines while writing
LOG_EVERY_S = 5.0
_BIASES = ('bq', 'bk', 'bv', 'router_bias')


def _init_std(name, shape, cfg):
    """Standard deviation of tensor ``name``; None means all ones (norms).

    N(0, 1/d_in) keeps activations O(1); output projections (wo, down) are
    further scaled by 1/sqrt(2 n_layers) so the residual stream stays O(1);
    biases are N(0, 0.1^2).
    """
    leaf = name.rsplit('/', 1)[-1]
    if leaf.endswith('norm'):
        return None
    if leaf == 'embed':
        return 1.0
    if leaf in _BIASES:
        return 0.1
    std = shape[0] ** -0.5
    return std / np.sqrt(2 * cfg.n_layers) if leaf in ('wo', 'down') else std


def _synthetic_slabs(name, shape, cfg, seed):
    """Tensor ``name`` generated from (seed, name): yields ``(r0, r1, words)``."""
    std = _init_std(name, shape, cfg)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    fp32 = tensor_dtype(name, cfg) == 'float32'
    dt = None if fp32 else storage_dtype(cfg.dtype)
    for r0, r1 in row_slabs(shape):
        n = (r1 - r0,) + tuple(shape[1:])
        if std is None:
            x = np.ones(n, np.float32)
        else:
            x = rng.standard_normal(n, dtype=np.float32)
            x *= np.float32(std)
        yield r0, r1, x.astype(storage_of('float32')) if fp32 else \
            to_words(x.astype(dt)).astype(WORD, copy=False)


def write_tensor(f, name, shape, dtype, slabs):
    """Dataset ``name`` [shape] of 16-bit words in the open file ``f``, with the
    attributes ``dtype`` and ``crc32``; -> bytes written.

    slabs: iterable of ``(r0, r1, words)``, words uint16 [r1 - r0, *shape[1:]]
    (C order; float32 values for a ``float32`` tensor), covering the rows in
    increasing order.
    """
    ds = f.create_dataset(name, shape=shape, dtype=storage_of(dtype))
    crc = 0
    for r0, r1, words in slabs:
        ds[r0:r1] = words
        crc = zlib.crc32(words, crc)
    ds.attrs['dtype'] = dtype
    ds.attrs['crc32'] = crc
    return ds.size * ds.dtype.itemsize


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


def write_synthetic(cfg, path, seed=0, overwrite=False, log=None, tokenizer_files=None):
    """Write seeded synthetic weights of ``cfg`` to ``path`` (HDF5, FORMAT.md),
    with the tokenizer files ``tokenizer_files`` ({name: bytes}) when given
    (the caller checks that they fit ``cfg``: tokenizer_files.load_tokenizer).

    Each tensor depends only on (seed, name).  Written to ``path + '.partial'``
    and renamed at the end, so ``path`` is never left half-written.  Memory
    stays at a few slabs of SLAB_ELEMS whatever the model size.
    Returns ``{'path', 'tensors', 'bytes', 'seconds'}``.
    """
    if seed < 0:
        raise ConfigError(f'seed={seed}: must be >= 0')
    log = log or (lambda line: None)
    specs = tensor_specs(cfg)
    total = sum(int(np.prod(s)) * storage_of(tensor_dtype(n, cfg)).itemsize for n, s in specs)
    t0 = last = time.monotonic()
    done = 0
    with open_for_writing(path, cfg, overwrite) as f:
        log(f'writing {path}: {len(specs)} tensors, {total / 1e9:.3f} GB, seed {seed}')
        if tokenizer_files is not None:
            write_tokenizer_files(f, tokenizer_files)
        for name, shape in specs:
            done += write_tensor(f, name, shape, tensor_dtype(name, cfg),
                                 _synthetic_slabs(name, shape, cfg, seed))
            if time.monotonic() - last >= LOG_EVERY_S:
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
