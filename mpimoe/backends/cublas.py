"""The one cuBLAS call CuPy does not make for us: a GEMM of 16-bit operands
that accumulates *and writes* FP32 (``cublasGemmEx``), for the front-end's
products (mpimoe.model.layers.mm32).

CuPy's ``matmul`` of two 16-bit arrays writes a 16-bit product (one more
rounding, too coarse for logits and queries); of FP32 arrays it reads FP32
weights (twice the bytes of the stored 16-bit ones, and an FP32 copy of
every weight per call).  This GEMM reads the 16-bit weights as they are, on
tensor cores, with an FP32 compute type; the handle's math mode (set in
mpimoe.backends.backend.Backend.bind) keeps split-K sums in FP32 too.
"""

import numpy as np

__all__ = ['gemm_f32']

# cudaDataType_t (library_types.h), cublasComputeType_t, cublasGemmAlgo_t,
# cublasOperation_t and cublasPointerMode_t (cublas_api.h)
CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_OP_N = 0
CUBLAS_POINTER_MODE_HOST = 0

#: 16-bit dtype name -> its cudaDataType_t
CUDA_TYPES = {'bfloat16': CUDA_R_16BF, 'float16': CUDA_R_16F}

# alpha = 1, beta = 0, read from the host when the GEMM is enqueued
_ONE, _ZERO = np.ones(1, np.float32), np.zeros(1, np.float32)


def gemm_f32(a, b):
    """a [n, k] @ b [k, m], CuPy arrays of one 16-bit dtype -> float32 [n, m]
    (a new array), enqueued on the current stream: exact products, FP32
    accumulation, FP32 output.

    cuBLAS is column-major: the row-major product C = A B is, read
    column-major, C^T = B^T A^T, an (m x n) = (m x k)(k x n) GEMM over the
    same memory with no transposes (leading dimensions m, k, m).
    """
    import cupy
    from cupy.cuda import cublas, device
    (n, k), (k_b, m) = a.shape, b.shape
    if k != k_b or a.dtype != b.dtype or a.dtype.name not in CUDA_TYPES:
        raise ValueError(f'gemm_f32: {a.dtype} [{n}, {k}] @ {b.dtype} [{k_b}, {m}]')
    c = cupy.empty((n, m), np.float32)
    if n == 0 or m == 0:
        return c
    if k == 0:
        c.fill(0)
        return c
    a, b = cupy.ascontiguousarray(a), cupy.ascontiguousarray(b)
    t = CUDA_TYPES[a.dtype.name]
    handle = device.get_cublas_handle()     # CuPy's gemmEx sets its stream: the current one
    mode = cublas.getPointerMode(handle)
    cublas.setPointerMode(handle, CUBLAS_POINTER_MODE_HOST)
    try:
        cublas.gemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, _ONE.ctypes.data,
                      b.data.ptr, t, m, a.data.ptr, t, k, _ZERO.ctypes.data,
                      c.data.ptr, CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
    finally:
        cublas.setPointerMode(handle, mode)
    return c
