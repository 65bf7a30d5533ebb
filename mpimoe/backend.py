"""Array backends and 16-bit dtypes.

Weights are stored and sent over MPI as raw 16-bit words (``uint16``); the
dtype name (``bfloat16`` or ``float16``) says how to read them.  Arithmetic is
FP32: :func:`round16` models where an activation is narrowed to 16 bits (on the
wire to an expert, and between expert GEMMs), so that every path rounds at the
same places.
"""

import ml_dtypes
import numpy as np

__all__ = ['DTYPES', 'storage_dtype', 'to_words', 'from_words', 'round16']

#: dtype name -> NumPy dtype of the 16-bit storage type
DTYPES = {'bfloat16': np.dtype(ml_dtypes.bfloat16), 'float16': np.dtype(np.float16)}


def storage_dtype(name):
    """NumPy dtype for a dtype name of :data:`DTYPES`."""
    return DTYPES[name]


def to_words(a):
    """A 16-bit array (bfloat16 or float16) viewed as ``uint16`` words."""
    assert a.dtype.itemsize == 2, a.dtype
    return a.view(np.uint16)


def from_words(words, name):
    """``uint16`` words viewed as the 16-bit dtype ``name`` (no copy)."""
    return words.view(DTYPES[name])


def round16(x, name):
    """Round FP32 ``x`` to the 16-bit dtype ``name`` (nearest-even), back as FP32.

    x: [...] float32 -> [...] float32 whose values are exactly representable.
    """
    return x.astype(DTYPES[name]).astype(np.float32)
