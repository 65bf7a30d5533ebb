"""Array backends (NumPy on CPU, CuPy on GPU), 16-bit dtypes, device binding
and host staging of MPI buffers.

Weights are stored and sent over MPI as raw 16-bit words (``uint16``); the
dtype name (``bfloat16`` or ``float16``) says how to read them.  Arithmetic is
FP32: :func:`round16` models where an activation is narrowed to 16 bits (on the
wire to an expert, and between expert GEMMs), so that every path rounds at the
same places.

The model code is written once for both array modules: :func:`array_module`
gives the module of an array, and NumPy's dispatch (``__array_function__``,
``__array_ufunc__``) sends ``np.*`` calls on CuPy arrays to CuPy.

The choices made at start-up are pure functions of their inputs, so that every
branch is tested on a CPU: :func:`choose_backend` (``--backend``) from a
:class:`CudaProbe`, :func:`bind_device` (rank -> GPU), :func:`mpi_gpu_mode`
(``--mpi-gpu``) from what the MPI library says of CUDA
(:func:`mpi_cuda_support`).
"""

import ctypes
import importlib
import os
import sys
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from mpimoe.errors import ConfigError, UsageError

__all__ = ['DTYPES', 'BACKENDS', 'MPI_GPU_MODES', 'storage_dtype', 'to_words', 'from_words',
           'round16', 'array_module', 'to_numpy', 'CudaProbe', 'probe_cuda', 'cuda_problem',
           'choose_backend', 'Backend', 'bind_device', 'mpi_cuda_support',
           'mpi_gpu_mode', 'grown_capacity', 'Rows', 'HostStaging']

#: dtype name -> NumPy dtype of the 16-bit storage type
DTYPES = {'bfloat16': np.dtype(ml_dtypes.bfloat16), 'float16': np.dtype(np.float16)}

#: values of ``--backend``
BACKENDS = ('auto', 'numpy', 'cupy')

#: values of ``--mpi-gpu``
MPI_GPU_MODES = ('auto', 'device', 'host')

#: the first CuPy major version that takes ``ml_dtypes.bfloat16`` arrays
CUPY_MIN_MAJOR = 14

_INSTALL_HINT = "pip install -e '.[gpu]'"


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


# -------------------------------------------------------------- array modules

def array_module(a):
    """``cupy`` for a CuPy array, else ``numpy``.

    Never imports CuPy: if nothing imported it, no array can be a CuPy array.
    """
    cupy = sys.modules.get('cupy')
    return cupy if cupy is not None and isinstance(a, cupy.ndarray) else np


def to_numpy(a):
    """A host NumPy array of ``a`` (a copy from the device for a CuPy array);
    for small arrays the host needs: counts, logits."""
    return a.get() if array_module(a) is not np else np.asarray(a)


# -------------------------------------------------------------- --backend

@dataclass(frozen=True)
class CudaProbe:
    """What this process sees of CuPy and CUDA: the input of :func:`choose_backend`."""
    cupy_version: str = None
    """CuPy's version; None when CuPy cannot be imported."""
    n_devices: int = 0
    """CUDA devices visible to this process."""
    error: str = ''
    """Why CuPy could not be imported (empty when it is not installed), or why
    there are no devices: the CUDA runtime's message."""
    visible: str = None
    """CUDA_VISIBLE_DEVICES as set; None when unset."""


def probe_cuda():
    """Import CuPy and count the CUDA devices, without failing when CuPy, the
    driver or a device is missing (that is what the probe reports)."""
    visible = os.environ.get('CUDA_VISIBLE_DEVICES')
    try:
        import cupy
    except ImportError as e:
        missing = isinstance(e, ModuleNotFoundError) and e.name == 'cupy'
        return CudaProbe(error='' if missing else str(e), visible=visible)
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as e:
        return CudaProbe(cupy.__version__, 0, str(e), visible)
    return CudaProbe(cupy.__version__, n, '', visible)


def cuda_problem(probe):
    """Why CuPy cannot be used (one line), or None when it can."""
    if probe.cupy_version is None:
        if probe.error:
            return f'CuPy cannot be imported ({probe.error})'
        return f'CuPy is not installed ({_INSTALL_HINT})'
    major = probe.cupy_version.split('.')[0]
    if not (major.isdigit() and int(major) >= CUPY_MIN_MAJOR):
        return (f'CuPy {probe.cupy_version} is too old: BF16 needs CuPy >= {CUPY_MIN_MAJOR} '
                f'({_INSTALL_HINT})')
    if probe.n_devices < 1:
        visible = 'unset' if probe.visible is None else repr(probe.visible)
        why = f': {probe.error}' if probe.error else ''
        return f'no CUDA device is visible (CUDA_VISIBLE_DEVICES={visible}){why}'
    return None


def choose_backend(requested, probe=None):
    """The backend for ``--backend requested``: (name, why) with name
    'numpy' or 'cupy' and why a few words for the log.

    probe: a :class:`CudaProbe`, by default :func:`probe_cuda` (never run for
    'numpy').  ``auto`` takes CuPy
    when it is usable, else NumPy; ``cupy`` without a usable CuPy is a
    ConfigError saying what is missing.
    """
    if requested not in BACKENDS:
        raise UsageError(f'--backend {requested}: choose one of {", ".join(BACKENDS)}')
    if requested == 'numpy':
        return 'numpy', 'as requested'
    probe = probe or probe_cuda()
    problem = cuda_problem(probe)
    if problem is None:
        plural = 's' if probe.n_devices > 1 else ''
        return 'cupy', f'CuPy {probe.cupy_version}, {probe.n_devices} CUDA device{plural} visible'
    if requested == 'cupy':
        raise ConfigError(f'--backend cupy: {problem}')
    return 'numpy', f'auto: {problem}'


class Backend:
    """The array module the math runs on and the moves between host and device.

    ``name``: 'numpy' or 'cupy'; ``xp``: the module; ``device``: the bound GPU
    index (after :meth:`bind`), None on NumPy.
    """

    def __init__(self, name):
        self.name = name
        self.xp = np if name == 'numpy' else importlib.import_module('cupy')
        self.device = None

    @property
    def is_gpu(self):
        return self.name == 'cupy'

    def asarray(self, a):
        """An array of this backend's module (no copy when it already is one)."""
        return self.xp.asarray(a)

    def synchronize(self):
        """Wait until the work queued on the current stream is done (no-op on NumPy)."""
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()

    def weights(self, tensors):
        """Weight arrays as the math takes them: dict name -> 16-bit host array
        (from mpimoe.checkpoint.weights) -> dict name -> array.

        NumPy: FP32 copies (the CPU contract, mpimoe.model.layers.expert_ffn).  CuPy:
        the 16-bit words copied to the device and viewed as the 16-bit dtype,
        no FP32 copy on the device (the few FP32 tensors, a router's score
        bias, as they are).
        """
        if not self.is_gpu:
            return {k: v.astype(np.float32) for k, v in tensors.items()}
        return {k: self.xp.asarray(v) if v.dtype == np.float32 else
                self.xp.asarray(to_words(v)).view(v.dtype) for k, v in tensors.items()}

    def bind(self, rank, local_rank, log):
        """Make GPU ``bind_device(local_rank, n)`` current for this process and
        log the mapping; returns its index (None on NumPy)."""
        if not self.is_gpu:
            return None
        cuda = self.xp.cuda
        n = cuda.runtime.getDeviceCount()
        self.device = bind_device(local_rank, n)
        cuda.Device(self.device).use()
        bus = cuda.Device(self.device).pci_bus_id
        log(f'rank {rank}: node-local rank {local_rank} -> GPU {self.device} of {n} visible '
            f'({bus}; CUDA_VISIBLE_DEVICES={os.environ.get("CUDA_VISIBLE_DEVICES", "unset")})')
        return self.device

    def empty_pinned(self, shape, dtype):
        """An uninitialised host array; page-locked on CuPy (for async copies)."""
        if not self.is_gpu:
            return np.empty(shape, dtype)
        import cupyx
        return cupyx.empty_pinned(shape, dtype)

    def new_stream(self):
        """A CUDA stream that does not synchronise with the default stream (None on NumPy)."""
        return self.xp.cuda.Stream(non_blocking=True) if self.is_gpu else None

    def copy(self, src, dst, stream):
        """Copy ``src`` into ``dst`` (same shape and dtype; one on the host, one
        on the device) on ``stream``, after the work already queued on the
        current stream; work queued later on the current stream that reads a
        device ``dst`` waits for the copy.  Returns the copy's completion
        event (None on NumPy, where the copy is done on return)."""
        if not self.is_gpu:
            dst[...] = src
            return None
        current = self.xp.cuda.get_current_stream()
        stream.wait_event(current.record())
        if isinstance(src, self.xp.ndarray):
            src.get(stream=stream, out=dst, blocking=False)
            return stream.record()
        dst.set(src, stream=stream)
        done = stream.record()
        current.wait_event(done)
        return done


# -------------------------------------------------------------- GPUs and MPI

def bind_device(local_rank, n_devices):
    """The GPU of a rank: its node-local rank modulo the visible devices
    (ranks beyond the device count share GPUs round-robin)."""
    if n_devices < 1:
        raise ConfigError('no CUDA device is visible to bind this rank to')
    if local_rank < 0:
        raise ValueError(f'node-local rank {local_rank} < 0')
    return local_rank % n_devices


def mpi_cuda_support(mpi):
    """Whether the MPI library says it takes CUDA device buffers: True,
    False, or None when it has no way to say.

    mpi: the ``mpi4py.MPI`` module.  Asks ``MPI.Query_cuda_support`` where
    mpi4py has it, else the library's ``MPIX_Query_cuda_support`` (MPICH >= 4,
    Open MPI with its CUDA extension).
    """
    query = getattr(mpi, 'Query_cuda_support', None)
    if query is not None:
        return bool(query())
    try:
        # a handle's symbol lookup also searches the libraries it depends on (libmpi)
        fn = ctypes.CDLL(mpi.__file__).MPIX_Query_cuda_support
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_int, []
    return bool(fn())


def mpi_gpu_mode(requested, backend, mpi_cuda_aware):
    """How MPI gets device rows for ``--mpi-gpu requested``: 'device' (CuPy
    arrays handed to MPI), 'host' (staged through pinned host buffers), or
    None on the NumPy backend (host arrays already).

    backend: 'numpy' or 'cupy'; mpi_cuda_aware: :func:`mpi_cuda_support`'s
    answer (True, False, None: unknown).  ``auto`` picks 'device' only when
    the library says True: a device pointer handed to an MPI that cannot take
    it crashes.  ``device`` is refused when the library says False, and
    trusted when it cannot say.
    """
    if requested not in MPI_GPU_MODES:
        raise UsageError(f'--mpi-gpu {requested}: choose one of {", ".join(MPI_GPU_MODES)}')
    if backend == 'numpy':
        return None
    if requested == 'auto':
        return 'device' if mpi_cuda_aware is True else 'host'
    if requested == 'device' and mpi_cuda_aware is False:
        raise ConfigError('--mpi-gpu device: this MPI library reports no CUDA support; '
                          'use --mpi-gpu host (or auto), or a CUDA-aware MPI')
    return requested


# -------------------------------------------------------------- row buffers

def grown_capacity(capacity, n):
    """Rows to allocate for a request of ``n`` rows when ``capacity`` are held:
    ``capacity`` if enough, else at least x1.5 (few reallocations as batches grow)."""
    return capacity if n <= capacity else max(n, capacity * 3 // 2)


class Rows:
    """A growable buffer of rows of ``d`` uint16 words.

    empty: allocator ``empty(shape, dtype)`` (``np.empty``, a backend's
    ``empty_pinned``, ``cupy.empty``).  Growing drops the old contents.
    """

    def __init__(self, d, empty=np.empty):
        self.d = d
        self._empty = empty
        self.buf = empty((0, d), np.uint16)

    def view(self, n):
        """uint16 [n, d], reallocating only when n exceeds the capacity."""
        capacity = grown_capacity(len(self.buf), n)
        if capacity != len(self.buf):
            self.buf = self._empty((capacity, self.d), np.uint16)
        return self.buf[:n]


class HostStaging:
    """Pinned host buffers between a slot's device rows and an MPI library
    without CUDA support (``--mpi-gpu host``), and the stream their copies run on.

    ``out`` is the host side of the rows this rank sends, ``inp`` of the rows
    it receives (uint16 [n, d] each, grown like the slot's buffers).  Copies
    run on a stream of their own, so they overlap the GEMMs queued on the
    compute stream (another micro-batch's).  One object per slot: its copies
    are issued and waited for in order.  On the NumPy backend the buffers are
    ordinary arrays and a copy is done on return.
    """

    def __init__(self, d, backend):
        self.backend = backend
        self.out = Rows(d, backend.empty_pinned)
        self.inp = Rows(d, backend.empty_pinned)
        self.stream = backend.new_stream()
        self._done = None

    def download(self, rows):
        """Queue the copy of device rows uint16 [n, d] into ``out[:n]`` (after the
        work queued so far on the current stream, which wrote them); returns the
        host view, to hand to MPI once :meth:`ready`.  Leave ``rows`` unchanged
        until then."""
        self.wait()
        host = self.out.view(len(rows))
        self._done = self.backend.copy(rows, host, self.stream)
        return host

    def upload(self, rows):
        """Queue the copy of ``inp[:n]`` (MPI received into it) into device rows
        uint16 [n, d]; kernels queued afterwards on the current stream see the
        rows, without the host waiting."""
        self.wait()
        self._done = self.backend.copy(self.inp.view(len(rows)), rows, self.stream)

    def wait(self):
        """Block until the last copy is done; then its host buffer may be reused."""
        if self._done is not None:
            self._done.synchronize()
            self._done = None
