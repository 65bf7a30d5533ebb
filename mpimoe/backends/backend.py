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
:class:`CudaProbe`, mpimoe.backends.binding (rank -> GPU), :func:`mpi_gpu_mode`
(``--mpi-gpu``) from what the MPI library says of CUDA
(:func:`mpi_cuda_support`).  What only a GPU can answer is asked once, at
start-up, and a failure is one line: :meth:`Backend.self_test` (BF16
kernels compile and a BF16 GEMM is right), and for device buffers handed
to MPI mpimoe.parallel.mpiutil.device_exchange_problem.
"""

import ctypes
import importlib
import os
import re
import sys
import time
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from mpimoe.backends.binding import bind_device
from mpimoe.errors import ConfigError, UsageError

__all__ = ['DTYPES', 'BACKENDS', 'MPI_GPU_MODES', 'storage_dtype', 'to_words', 'from_words',
           'round16', 'array_module', 'to_numpy', 'CudaProbe', 'probe_cuda', 'cuda_problem',
           'choose_backend', 'Backend', 'mpi_cuda_support',
           'mpi_gpu_mode', 'grown_capacity', 'Rows', 'HostStaging', 'poll_until']

#: dtype name -> NumPy dtype of the 16-bit storage type
DTYPES = {'bfloat16': np.dtype(ml_dtypes.bfloat16), 'float16': np.dtype(np.float16)}

#: values of ``--backend``
BACKENDS = ('auto', 'numpy', 'cupy')

#: values of ``--mpi-gpu``
MPI_GPU_MODES = ('auto', 'device', 'host')

#: the first CuPy major version that takes ``ml_dtypes.bfloat16`` arrays
CUPY_MIN_MAJOR = 14

#: the first NumPy release whose dtypes CuPy registers bfloat16 with
NUMPY_MIN_FOR_BF16 = (2, 1, 2)

#: cuBLAS's CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION flag (cublas_api.h):
#: split-K partial sums of a 16-bit GEMM stay in the FP32 compute type
CUBLAS_NO_REDUCED_PRECISION_REDUCTION = 16

_INSTALL_HINT = "pip install -e '.[gpu]'"

#: seconds slept between two polls of MPI while the GPU computes: 0 yields the
#: core without a timer (a nap of any length takes Linux's timer slack, ~50-100
#: us, against kernels of ~100 us); a GPU rank has its core to itself
_POLL_NAP_S = 0


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
    numpy_version: str = np.__version__


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
    if _release(probe.numpy_version) < NUMPY_MIN_FOR_BF16:
        need = '.'.join(map(str, NUMPY_MIN_FOR_BF16))
        return (f'NumPy {probe.numpy_version} is too old for CuPy\'s bfloat16 (it needs '
                f'NumPy >= {need}): pip install "numpy>={need}"')
    if probe.n_devices < 1:
        visible = 'unset' if probe.visible is None else repr(probe.visible)
        why = f': {probe.error}' if probe.error else ''
        return f'no CUDA device is visible (CUDA_VISIBLE_DEVICES={visible}){why}'
    return None


def _release(version):
    """(major, minor, micro) of a version string such as '2.1.2' or '2.2.0rc1'."""
    m = re.match(r'(\d+)(?:\.(\d+))?(?:\.(\d+))?', version)
    return tuple(int(g or 0) for g in m.groups()) if m else (0, 0, 0)


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
    index (after :meth:`bind`), None on NumPy; ``gpus_used``: on rank 0 of a
    GPU job, the distinct GPUs of all ranks (set by the engine).
    """

    def __init__(self, name):
        self.name = name
        self.xp = np if name == 'numpy' else importlib.import_module('cupy')
        self.device = None
        self.gpus_used = None

    @property
    def is_gpu(self):
        return self.name == 'cupy'

    @property
    def cuda(self):
        """``cupy.cuda`` (streams, events), or None on NumPy."""
        return self.xp.cuda if self.is_gpu else None

    @property
    def device_name(self):
        """The bound GPU's name (e.g. 'NVIDIA H200'), or None on NumPy."""
        if not self.is_gpu:
            return None
        name = self.cuda.runtime.getDeviceProperties(self.device)['name']
        return name.decode() if isinstance(name, bytes) else name

    def asarray(self, a):
        """An array of this backend's module (no copy when it already is one)."""
        return self.xp.asarray(a)

    def synchronize(self):
        """Wait until the work queued on the current stream is done (no-op on NumPy)."""
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()

    def wait_polling(self, poll=None):
        """Block until the work queued so far on the current stream is done,
        calling ``poll()`` meanwhile (no-op on NumPy, where it is done): the
        host keeps MPI's transfers of other micro-batches moving while the GPU
        computes, which is where their overlap comes from.  Without ``poll``
        a plain synchronisation."""
        if self.is_gpu:
            poll_until(self.xp.cuda.get_current_stream().record(), poll)

    def to_host(self, a, poll=None):
        """A host copy of a small device array (row counts), ``poll()`` called
        while it is computed and copied (:meth:`wait_polling`); NumPy: ``a``."""
        if not self.is_gpu:
            return a
        host = self.empty_pinned(a.shape, a.dtype)
        a.get(out=host, blocking=False)
        self.wait_polling(poll)
        return host

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

    def bind(self, rank, local, log):
        """Make GPU ``bind_device(local.index, n)`` current for this process,
        keep its cuBLAS from reducing in 16 bits, and log the mapping; returns
        its index (None on NumPy).

        local: a mpimoe.backends.binding.LocalRank.  The cuBLAS flag
        (:data:`CUBLAS_NO_REDUCED_PRECISION_REDUCTION`) makes a split-K GEMM
        add its partial sums in FP32, as the numerics contract says.
        """
        if not self.is_gpu:
            return None
        cuda = self.xp.cuda
        n = cuda.runtime.getDeviceCount()
        self.device = bind_device(local.index, n)
        device = cuda.Device(self.device)
        device.use()
        handle = device.cublas_handle
        cuda.cublas.setMathMode(handle, cuda.cublas.getMathMode(handle)
                                | CUBLAS_NO_REDUCED_PRECISION_REDUCTION)
        log(f'rank {rank}: node-local rank {local.index} ({local.source}) -> GPU '
            f'{self.device} of {n} visible ({device.pci_bus_id}; '
            f'CUDA_VISIBLE_DEVICES={os.environ.get("CUDA_VISIBLE_DEVICES", "unset")})')
        return self.device

    def self_test(self):
        """Why this GPU cannot compute in BF16 (one line), or None (always None
        on NumPy): a BF16 element-wise kernel compiles (CuPy needs the CUDA
        headers for it), a 2x2 BF16 GEMM gives [[19, 22], [43, 50]] and the
        experts' activation kernels agree with NumPy.  Run
        once after :meth:`bind`, so that a broken install stops the job at
        start-up rather than mid-run."""
        if not self.is_gpu:
            return None
        bf16 = DTYPES['bfloat16']
        try:
            a = self.xp.asarray(np.float32([[1, 2], [3, 4]])).astype(bf16)
            b = self.xp.asarray(np.float32([[5, 6], [7, 8]])).astype(bf16)
            got = to_numpy((a @ b).astype(np.float32)).tolist()
        except Exception as e:  # noqa: B902 -- whatever CuPy raises, one line
            first = (str(e).strip().splitlines() or [''])[0][:200]
            return (f'CuPy cannot compute in BF16 on GPU {self.device} ({type(e).__name__}: '
                    f'{first}); BF16 kernels need the CUDA headers and NumPy >= 2.1.2: '
                    f"pip install 'cupy-cuda12x[ctk]>=14' 'numpy>=2.1.2' (or {_INSTALL_HINT})")
        if got != [[19, 22], [43, 50]]:
            return f'a 2x2 BF16 GEMM on GPU {self.device} gave {got}, not [[19, 22], [43, 50]]'
        return self._activation_problem(a, b)

    def _activation_problem(self, a, b):
        """Why the experts' fused activation kernels (mpimoe.model.layers.activate16)
        fail on BF16 arrays a, b [2, 2] or disagree with NumPy's (by more than
        one BF16 ulp), or None."""
        from mpimoe.model.layers import activate16
        for kind, args in (('swiglu', (a, b)), ('mlp', (a,))):
            try:
                got = to_numpy(activate16(kind, *args).astype(np.float32))
            except Exception as e:  # noqa: B902 -- whatever CuPy raises, one line
                first = (str(e).strip().splitlines() or [''])[0][:200]
                return (f'the {kind} activation kernel does not compile or run on GPU '
                        f'{self.device} ({type(e).__name__}: {first})')
            want = activate16(kind, *(to_numpy(x) for x in args)).astype(np.float32)
            if not np.allclose(got, want, rtol=2.0 ** -7, atol=0):
                return (f'the {kind} activation kernel on GPU {self.device} gave '
                        f'{got.tolist()}, NumPy {want.tolist()}')
        return None

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
    """How MPI gets device rows for ``--mpi-gpu requested``: (mode, warning).

    mode: 'device' (CuPy arrays handed to MPI), 'host' (staged through
    pinned host buffers), or None on the NumPy backend (host arrays
    already); warning: a line to log, or None.  backend: 'numpy' or 'cupy';
    mpi_cuda_aware: :func:`mpi_cuda_support`'s answer (True, False, None:
    unknown).  ``auto`` picks 'device' only when the library says True (a
    device pointer handed to an MPI that cannot take it crashes), and the
    engine then tries one exchange of device rows before trusting it
    (mpimoe.parallel.gpu_mpi).  ``device`` is the user's word: where the
    library says False it is taken with a warning, because Open MPI says so
    when its CUDA support comes through UCX.
    """
    if requested not in MPI_GPU_MODES:
        raise UsageError(f'--mpi-gpu {requested}: choose one of {", ".join(MPI_GPU_MODES)}')
    if backend == 'numpy':
        return None, None
    if requested == 'auto':
        return ('device' if mpi_cuda_aware is True else 'host'), None
    if requested == 'device' and mpi_cuda_aware is False:
        return 'device', ('--mpi-gpu device: this MPI library reports no CUDA support (Open '
                          'MPI does when CUDA comes through UCX); handing it device buffers '
                          'as asked; if MPI fails or crashes, use --mpi-gpu host')
    return requested, None


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

    def wait(self, poll=None):
        """Block until the last copy is done, calling ``poll()`` meanwhile if
        given; then its host buffer may be reused."""
        if self._done is not None:
            poll_until(self._done, poll)
            self._done = None


def poll_until(event, poll=None):
    """Block until CUDA ``event`` is done, calling ``poll()`` (and yielding the
    core, :data:`_POLL_NAP_S`) while it is not; without ``poll`` a plain wait."""
    if poll is not None:
        while not event.done:
            poll()
            time.sleep(_POLL_NAP_S)
    event.synchronize()
