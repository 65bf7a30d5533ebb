"""The cuBLAS calls CuPy does not make for us: GEMMs of 16-bit operands that
accumulate *and write* FP32 (``cublasGemmEx``, and ``cublasGemmStridedBatchedEx``
for a batch of them), for the front-end's products (mpimoe.model.layers.mm32).

CuPy's ``matmul`` of two 16-bit arrays writes a 16-bit product (one more
rounding, too coarse for logits and queries), and sends a batched (3-D) one
to an integer path that raises (cupy/cupy#10317); of FP32 arrays it reads
FP32 weights (twice the bytes of the stored 16-bit ones, and an FP32 copy of
every weight per call).  These GEMMs read the 16-bit weights as they are, on
tensor cores, with an FP32 compute type; the handle's math mode (set in
mpimoe.backends.backend.Backend.bind) keeps split-K sums in FP32 too.
"""

import numpy as np

__all__ = ['gemm_f32', 'operand_layout']

# cudaDataType_t (library_types.h), cublasComputeType_t, cublasGemmAlgo_t,
# cublasOperation_t and cublasPointerMode_t (cublas_api.h)
CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_POINTER_MODE_HOST = 0

#: 16-bit dtype name -> its cudaDataType_t
CUDA_TYPES = {'bfloat16': CUDA_R_16BF, 'float16': CUDA_R_16F}

# alpha = 1, beta = 0, read from the host when the GEMM is enqueued
_ONE, _ZERO = np.ones(1, np.float32), np.zeros(1, np.float32)


def gemm_f32(a, b):
    """a [n, k] @ b [k, m], or a batch: a [B, n, k] @ b [B, k, m]; CuPy
    arrays of one 16-bit dtype -> float32 [n, m] / [B, n, m] (a new C-order
    array), enqueued on the current stream: exact products, FP32
    accumulation, FP32 output.

    Operands are read where they are: each matrix may be row-major (unit
    stride along its last axis) or a transposed view of one (unit stride
    along the other), with any row and batch strides, such as one head's
    columns of a weight (MLA's ``wkv_b``); anything else is copied first.
    cuBLAS is column-major: the row-major product C = A B is, read
    column-major, C^T = B^T A^T, an (m x n) = (m x k)(k x n) GEMM over the
    same memory, where a row-major operand is already transposed (op N)
    and a transposed view is not (op T).
    """
    import cupy
    from cupy.cuda import cublas, device
    batched = a.ndim == 3
    (*batch, n, k), (*batch_b, k_b, m) = a.shape, b.shape
    if (a.ndim not in (2, 3) or b.ndim != a.ndim or batch != batch_b or k != k_b
            or a.dtype != b.dtype or a.dtype.name not in CUDA_TYPES):
        raise ValueError(f'gemm_f32: {a.dtype} {list(a.shape)} @ {b.dtype} {list(b.shape)}')
    c = cupy.empty((*batch, n, m), np.float32)
    if c.size == 0:
        return c
    if k == 0:
        c.fill(0)
        return c
    (op_b, ld_b, stride_b), b = _operand(b)
    (op_a, ld_a, stride_a), a = _operand(a)
    t = CUDA_TYPES[a.dtype.name]
    handle = device.get_cublas_handle()     # CuPy's wrappers set its stream: the current one
    mode = cublas.getPointerMode(handle)
    cublas.setPointerMode(handle, CUBLAS_POINTER_MODE_HOST)
    try:
        if batched:
            cublas.gemmStridedBatchedEx(
                handle, op_b, op_a, m, n, k, _ONE.ctypes.data, b.data.ptr, t, ld_b, stride_b,
                a.data.ptr, t, ld_a, stride_a, _ZERO.ctypes.data, c.data.ptr, CUDA_R_32F, m,
                n * m, batch[0], CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
        else:
            cublas.gemmEx(handle, op_b, op_a, m, n, k, _ONE.ctypes.data, b.data.ptr, t, ld_b,
                          a.data.ptr, t, ld_a, _ZERO.ctypes.data, c.data.ptr, CUDA_R_32F, m,
                          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
    finally:
        cublas.setPointerMode(handle, mode)
    return c


def _operand(x):
    """How cuBLAS reads the row-major matrices x [..., r, c] (2-D, or 3-D a
    batch) as the transposed operand of a column-major GEMM:
    ((op, leading dimension, batch stride), x or a C-order copy of it), in
    elements; see :func:`operand_layout`."""
    layout = operand_layout(x.shape, x.strides, x.itemsize)
    if layout is None:
        x = x.copy()                                # C order: always a layout
        layout = operand_layout(x.shape, x.strides, x.itemsize)
    return layout, x


def operand_layout(shape, strides, itemsize):
    """(op, leading dimension, batch stride) in elements that make a
    column-major GEMM read the matrix X [..., r, c] (these byte ``strides``)
    as X^T: with unit stride along c (row-major, row stride >= c) the memory
    read column-major with ld the row stride *is* X^T (op N); with unit
    stride along r (a transposed view, column stride >= r) it is X (op T,
    ld the column stride); a single row or column takes any stride.  None
    otherwise (copy it).  Batch stride 0 for a 2-D matrix."""
    *_, r, c = shape
    *batch, row, col = (s // itemsize if s % itemsize == 0 else -1 for s in strides)
    stride = batch[0] if batch else 0
    if stride < 0 or (batch and shape[0] > 1 and stride == 0):
        return None
    if col == 1 and row >= max(c, 1):
        return CUBLAS_OP_N, row, stride
    if (row == 1 or r == 1) and col >= max(r, 1):
        return CUBLAS_OP_T, col, stride
    if c == 1 and row >= 1:                         # one column: any row stride
        return CUBLAS_OP_N, row, stride
    return None
