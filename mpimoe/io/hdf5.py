"""HDF5 inputs: ``tokens``, ``offsets`` and ``ids`` (format in
:mod:`mpimoe.io.inputs`), read and checked a slab of sequences at a time."""

import h5py
import numpy as np
from mpimoe.errors import DataError
from mpimoe.io.fields import check_id

__all__ = ['hdf5_slabs', 'hdf5_sequences']

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


def hdf5_slabs(path, vocab_size):
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
                check_id(f'{path}: sequence {a + j}', seq_id)
            base = (offsets[a:b + 1] - offsets[a]).astype(np.int64)
            tokens = tokens_ds[offsets[a]:offsets[b]]
            _check_token_range(path, tokens, base, ids, vocab_size, a)
            yield a, ids, tokens.astype(np.int32, copy=False), base


def hdf5_sequences(path, vocab_size):
    for a, ids, tokens, offsets in hdf5_slabs(path, vocab_size):
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
