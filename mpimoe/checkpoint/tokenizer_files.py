"""The tokenizer a weight file carries (weights/FORMAT.md): the group
``tokenizer/`` holds one dataset per file of TOKENIZER_FILES present, its raw
bytes as uint8 [n] with the attribute ``crc32``.  ``mpimoe convert`` copies
the files of the checkpoint, ``mpimoe init-weights --tokenizer`` those of a
directory; :meth:`mpimoe.checkpoint.weights.WeightFile.tokenizer_files` reads
them back, checked.

    with open_for_writing('w.h5', cfg) as f:
        write_tokenizer_files(f, files)             # files: {name: bytes}
"""

import os
import zlib

import numpy as np

from mpimoe.text.tokenizer import (MAX_FILE_BYTES, TOKENIZER_FILES, TextTokenizer,
                                   read_tokenizer_files)

__all__ = ['GROUP', 'write_tokenizer_files', 'dataset_problem',
           'text_tokenizer', 'load_tokenizer']

#: the group of the weight file that holds the tokenizer files
GROUP = 'tokenizer'


def write_tokenizer_files(f, files):
    """The group GROUP of the open h5py.File ``f``: one dataset uint8 [n] per
    item of ``files`` ({name: bytes}, names of TOKENIZER_FILES, tokenizer.json
    among them), attribute ``crc32`` = zlib.crc32 of the bytes."""
    unknown = sorted(set(files) - set(TOKENIZER_FILES))
    if unknown or TOKENIZER_FILES[0] not in files:
        raise ValueError(f'tokenizer files {sorted(files)}: need tokenizer.json and only '
                         f'names of {TOKENIZER_FILES}')
    group = f.create_group(GROUP)
    for name in TOKENIZER_FILES:
        if name in files:
            ds = group.create_dataset(name, data=np.frombuffer(files[name], np.uint8))
            ds.attrs['crc32'] = zlib.crc32(files[name])


def dataset_problem(name, ds):
    """What is wrong with dataset ``ds`` holding tokenizer file ``name``
    before its bytes are read (name, type, shape, size, crc32), or None."""
    if name not in TOKENIZER_FILES:
        return f'not a tokenizer file (only {", ".join(TOKENIZER_FILES)})'
    if ds.dtype != np.uint8 or ds.shape is None or len(ds.shape) != 1:
        return f'stored as {ds.dtype} of shape {ds.shape}, expected the bytes as uint8 (n,)'
    if ds.size > MAX_FILE_BYTES:
        return f'{ds.size:,} bytes, more than a tokenizer file has ({MAX_FILE_BYTES >> 20} MiB)'
    if not isinstance(ds.attrs.get('crc32'), (int, np.integer)):
        return 'crc32 attribute missing or not an integer'
    return None


def text_tokenizer(files, source, vocab_size):
    """TextTokenizer of ``files`` ({name: bytes}); DataError naming ``source``
    when they do not parse or the tokenizer has ids >= ``vocab_size`` (the
    model's)."""
    tokenizer = TextTokenizer(files, source)
    tokenizer.check_vocab(vocab_size)
    return tokenizer


def load_tokenizer(path, vocab_size):
    """``(files, TextTokenizer)`` of the tokenizer at ``path`` (tokenizer.json
    or the directory holding it, the others of TOKENIZER_FILES beside it),
    checked as :func:`text_tokenizer` does; DataError naming ``path``."""
    files = read_tokenizer_files(path)
    return files, text_tokenizer(files, os.fspath(path), vocab_size)
