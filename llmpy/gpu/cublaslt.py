"""A small Python face on cuBLASLt (through nvmath-python's pointer-level bindings): one handle per
device, its workspace, and a cache of prepared matmuls. Used by `llmpy/gpu/matmul.py`, which maps the
row-major products of the model onto the column-major `GemmPlan`s defined here.

Why cuBLASLt and not CuPy's cuBLAS: CuPy has no cuBLASLt (no fused bias/GELU epilogues) and its cuBLAS
wrappers refuse to run during CUDA-graph capture (cupy/cupy#6290). `nvmath.bindings.cublasLt` takes raw
integer pointers; once a matmul's descriptor, layouts and algorithm are cached (first call, outside
capture) every later call is a single capturable `cublasLtMatmul`.

The first half (plans, enum values, cache keys) is pure Python and imports without nvmath or a GPU.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np

WORKSPACE_BYTES = 32 * 1024 * 1024  # llm.c: 32 MiB, "only Hopper needs 32", enough everywhere
MAX_ALIGNMENT = 256                 # cuBLASLt's default assumed buffer alignment (MIN_ALIGNMENT_*_BYTES)
MIN_POINTER_ALIGNMENT = 16          # hard requirement, as in llm.c (vectorised 16-byte loads)

# Enum values from cublasLt.h / library_types.h (checked against nvmath's enums in the tests). Kept as
# plain ints so this half of the module imports without nvmath.
CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14
COMPUTE_32F, COMPUTE_32F_FAST_TF32 = 68, 77
OP_N, OP_T = 0, 1
EPILOGUE_DEFAULT, EPILOGUE_BIAS = 1, 4
EPILOGUE_GELU_AUX, EPILOGUE_GELU_AUX_BIAS, EPILOGUE_DGELU = 160, 164, 192
AUX_EPILOGUES = (EPILOGUE_GELU_AUX, EPILOGUE_GELU_AUX_BIAS, EPILOGUE_DGELU)  # these read/write aux
REDUCTION_SCHEME_INPLACE, REDUCTION_SCHEME_ALL = 1, 7   # cublasLtReductionScheme_t bits (NONE is 0)

# CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK: the split-K reductions the heuristic may choose. Algorithms
# without one (scheme NONE) always qualify; of the rest only INPLACE, which adds the parts up in the
# output buffer in the sequence its workspace counters enforce. The out-of-place schemes reduce in a
# separate step that nothing documented ties to one order, and a graph replay must give eager's bits
# (test_graph_replay_matches_eager_bitwise; review WRONG-2c). If a shape has no algorithm under the mask,
# the heuristic runs again without it and a warning names the shape.
REDUCTION_SCHEMES = REDUCTION_SCHEME_INPLACE

# dtype name -> (cudaDataType, bytes per element). bf16 is ml_dtypes.bfloat16 (its numpy name).
_DATA_TYPES = {"float32": (CUDA_R_32F, 4), "bfloat16": (CUDA_R_16BF, 2), "float16": (CUDA_R_16F, 2)}
_ITEMSIZE = dict(_DATA_TYPES.values())  # cudaDataType -> bytes per element

# -------------------------------------------------------------------------------------------------
# The column-major call description and its cache key (pure Python, no device)


@dataclass(frozen=True)
class GemmPlan:
    """One cuBLASLt call in column-major terms: D(m, n) = alpha * op(A) @ op(B) + beta * D, per batch.

    llmpy.gpu.matmul maps row-major products onto plans (its A is the row-major right factor).
    Strides are in elements between consecutive matrices of a batch (0 when batch == 1).
    """
    transa: bool
    transb: bool
    m: int
    n: int
    k: int
    lda: int
    ldb: int
    ldd: int
    batch: int = 1
    stride_a: int = 0
    stride_b: int = 0
    stride_d: int = 0

    @property
    def a_layout(self) -> tuple[int, int, int]:
        """(rows, cols, ld) of A as stored (before op)."""
        return (self.k, self.m, self.lda) if self.transa else (self.m, self.k, self.lda)

    @property
    def b_layout(self) -> tuple[int, int, int]:
        return (self.n, self.k, self.ldb) if self.transb else (self.k, self.n, self.ldb)

    @property
    def d_layout(self) -> tuple[int, int, int]:
        return (self.m, self.n, self.ldd)


@functools.lru_cache(maxsize=64)
def cuda_data_type(dtype, name: str = "array") -> int:
    """cudaDataType for a NumPy/CuPy dtype: float32 -> CUDA_R_32F, bfloat16 -> CUDA_R_16BF."""
    dtype_name = np.dtype(dtype).name
    if dtype_name not in _DATA_TYPES:
        raise ValueError(f"{name} has unsupported matmul dtype {dtype_name}; "
                         f"expected one of {sorted(_DATA_TYPES)}")
    return _DATA_TYPES[dtype_name][0]


def compute_type(data_type: int, *, tf32: bool) -> int:
    """fp32 accumulation always; fp32 inputs may use TF32 tensor cores (llm.c's -f flag)."""
    return COMPUTE_32F_FAST_TF32 if (tf32 and data_type == CUDA_R_32F) else COMPUTE_32F


def pointer_alignment(ptr: int, stride_bytes: int = 0) -> int:
    """Largest power of two <= MAX_ALIGNMENT dividing the pointer (and the batch stride, if any)."""
    value = ptr | stride_bytes | MAX_ALIGNMENT  # OR in the cap: the lowest set bit is then <= 256
    return value & -value


def gemm_cache_key(plan: GemmPlan, *, data_type: int, compute: int, epilogue: int, has_bias: bool,
                   alignments: tuple[int, int, int]) -> tuple:
    """Everything a cached descriptor/layout/algorithm depends on; pointers only through alignment."""
    return (plan, data_type, compute, epilogue, bool(has_bias), tuple(alignments))


# -------------------------------------------------------------------------------------------------
# Device part: handle, workspace, cached descriptors + heuristic algorithm


def _load_cublaslt():
    try:
        from nvmath.bindings import cublasLt
    except ImportError as e:  # the GPU extra; CPU-only installs never reach here
        raise ImportError("llmpy's GPU matmuls need nvmath-python (pip install nvmath-python); "
                          "cuBLASLt itself comes from the CUDA toolkit or the nvidia-cublas wheel") from e
    return cublasLt


def _current_stream():
    """CuPy's current stream (the one the ops enqueue on); a function so tests can stand in for it."""
    import cupy as cp
    return cp.cuda.get_current_stream()


def _set_attr(setter, dtype_of, obj: int, attr, value) -> None:
    """Set one cuBLASLt attribute from a one-element array of the attribute's own C type."""
    buf = np.array([value], dtype=dtype_of(attr))
    setter(obj, attr, buf.ctypes.data, buf.itemsize)


class _Entry:
    """Matmul descriptor, A/B/D layouts (C shares D's) and the chosen algorithm for one cache key."""

    def __init__(self, lt, plan: GemmPlan, data_type: int, compute: int, epilogue: int, has_bias: bool):
        self.lt, self.epilogue, self.has_bias = lt, epilogue, has_bias
        self.desc = 0
        self.layouts: list[int] = []
        self.heuristic = lt.MatmulHeuristicResult(1)  # algo sits at offset 0: .ptr is the algo pointer
        try:
            self.desc = lt.matmul_desc_create(compute, CUDA_R_32F)  # scale (alpha/beta) type: fp32
            desc_attr = lt.MatmulDescAttribute
            self._set_desc(desc_attr.TRANSA, OP_T if plan.transa else OP_N)
            self._set_desc(desc_attr.TRANSB, OP_T if plan.transb else OP_N)
            self._set_desc(desc_attr.EPILOGUE, epilogue)
            if has_bias:
                self._set_desc(desc_attr.BIAS_DATA_TYPE, data_type)
            if epilogue in AUX_EPILOGUES:
                self._set_desc(desc_attr.EPILOGUE_AUX_LD, plan.ldd)  # aux is shaped like D
            for (rows, cols, ld), stride in ((plan.a_layout, plan.stride_a), (plan.b_layout, plan.stride_b),
                                             (plan.d_layout, plan.stride_d)):
                layout = lt.matrix_layout_create(data_type, rows, cols, ld)
                self.layouts.append(layout)
                if plan.batch > 1:
                    lay_attr, set_lay = lt.MatrixLayoutAttribute, lt.matrix_layout_set_attribute
                    _set_attr(set_lay, lt.get_matrix_layout_attribute_dtype, layout,
                              lay_attr.BATCH_COUNT, plan.batch)
                    _set_attr(set_lay, lt.get_matrix_layout_attribute_dtype, layout,
                              lay_attr.STRIDED_BATCH_OFFSET, stride)
        except BaseException:
            self.destroy()
            raise
        self.a_layout, self.b_layout, self.d_layout = self.layouts

    def _set_desc(self, attr, value) -> None:
        _set_attr(self.lt.matmul_desc_set_attribute, self.lt.get_matmul_desc_attribute_dtype,
                  self.desc, attr, value)

    def set_pointers(self, bias: int, aux: int) -> None:
        """Bias and aux pointers live in the descriptor; they change per call (per layer)."""
        if self.has_bias:
            self._set_desc(self.lt.MatmulDescAttribute.BIAS_POINTER, bias)
        if self.epilogue in AUX_EPILOGUES:
            self._set_desc(self.lt.MatmulDescAttribute.EPILOGUE_AUX_POINTER, aux)

    def preference(self, workspace_bytes: int, alignments: tuple[int, int, int], reductions: int) -> int:
        """A new matmul preference (the caller destroys it): the workspace limit, the buffers' true
        alignments (cuBLASLt assumes 256 bytes otherwise) and the allowed split-K reduction schemes."""
        lt = self.lt
        pref = lt.matmul_preference_create()
        pattr, set_pref = lt.MatmulPreferenceAttribute, lt.matmul_preference_set_attribute
        dtype_of = lt.get_matmul_preference_attribute_dtype
        align_a, align_b, align_d = alignments
        for attr, value in ((pattr.MAX_WORKSPACE_BYTES, workspace_bytes), (pattr.REDUCTION_SCHEME_MASK, reductions),
                            (pattr.MIN_ALIGNMENT_A_BYTES, align_a), (pattr.MIN_ALIGNMENT_B_BYTES, align_b),
                            (pattr.MIN_ALIGNMENT_C_BYTES, align_d), (pattr.MIN_ALIGNMENT_D_BYTES, align_d)):
            _set_attr(set_pref, dtype_of, pref, attr, value)
        return pref

    def find_algorithm(self, handle: int, workspace_bytes: int, alignments: tuple[int, int, int],
                       reductions: int = REDUCTION_SCHEMES) -> bool:
        """Run the heuristic once and keep its first (best) algorithm, as llm.c does; False if none."""
        lt = self.lt
        pref = self.preference(workspace_bytes, alignments, reductions)
        try:
            count = np.zeros(1, dtype=np.int32)
            lt.matmul_algo_get_heuristic(handle, self.desc, self.a_layout, self.b_layout, self.d_layout,
                                         self.d_layout, pref, 1, self.heuristic.ptr, count.ctypes.data)
        finally:
            lt.matmul_preference_destroy(pref)
        return bool(count[0])

    def destroy(self) -> None:
        for layout in self.layouts:
            self.lt.matrix_layout_destroy(layout)
        self.layouts = []
        if self.desc:
            self.lt.matmul_desc_destroy(self.desc)
            self.desc = 0


_SCALARS = {0.0: np.zeros(1, np.float32), 1.0: np.ones(1, np.float32)}  # host alpha/beta, kept alive


def _host_scalar(value: float) -> np.ndarray:
    arr = _SCALARS.get(float(value))
    return arr if arr is not None else np.array([value], dtype=np.float32)


class CublasLt:
    """A cuBLASLt handle for the current device, its workspace and a cache of prepared matmuls.

    workspace: a device array (e.g. an arena view of WORKSPACE_BYTES bytes) or None to allocate
    WORKSPACE_BYTES from CuPy's pool on first use. tf32: fp32 matmuls on TF32 tensor cores.
    Descriptors, layouts and the heuristic's algorithm are built on the first call with a new key and
    reused; that first call must happen outside CUDA-graph capture (warm up, then capture).
    """

    def __init__(self, workspace=None, *, tf32: bool = False):
        self._lt = _load_cublaslt()
        self.tf32 = bool(tf32)
        self._cache: dict[tuple, _Entry] = {}
        self._workspace = None   # keeps the workspace memory alive
        self._ws_ptr, self._ws_bytes = 0, 0
        self.handle = self._lt.create()
        if workspace is not None:
            self.set_workspace(workspace)

    def set_workspace(self, workspace) -> None:
        """Use `workspace` (a device array) from now on; cached algorithms are re-chosen for its size."""
        ptr = int(workspace.data.ptr)
        if ptr % MIN_POINTER_ALIGNMENT:
            raise ValueError(f"workspace pointer 0x{ptr:x} is not {MIN_POINTER_ALIGNMENT}-byte aligned")
        self.clear_cache()
        self._workspace, self._ws_ptr, self._ws_bytes = workspace, ptr, int(workspace.nbytes)

    def clear_cache(self) -> None:
        for entry in self._cache.values():
            entry.destroy()
        self._cache.clear()

    def close(self) -> None:
        """Destroy cached descriptors and the handle (the workspace is the owner's to free)."""
        self.clear_cache()
        if self.handle:
            self._lt.destroy(self.handle)
            self.handle = 0
        self._workspace, self._ws_ptr, self._ws_bytes = None, 0, 0

    def _prepare(self, key: tuple, plan: GemmPlan, bias: int, aux: int) -> _Entry:
        import cupy as cp
        if _current_stream().is_capturing():
            raise RuntimeError(f"new matmul shape during CUDA-graph capture: {plan}; "
                               "run one warm-up step before capturing")
        if self._workspace is None:
            buf = cp.cuda.alloc(WORKSPACE_BYTES)
            self._workspace, self._ws_ptr, self._ws_bytes = buf, int(buf.ptr), WORKSPACE_BYTES
        _, data_type, compute, epilogue, has_bias, alignments = key
        entry = _Entry(self._lt, plan, data_type, compute, epilogue, has_bias)
        try:
            entry.set_pointers(bias, aux)
            found = entry.find_algorithm(self.handle, self._ws_bytes, alignments)
            if not found and REDUCTION_SCHEMES != REDUCTION_SCHEME_ALL:
                found = entry.find_algorithm(self.handle, self._ws_bytes, alignments, REDUCTION_SCHEME_ALL)
                if found:
                    warnings.warn(f"cuBLASLt: no algorithm for {plan} with split-K reductions limited to mask "
                                  f"{REDUCTION_SCHEMES}; using one with any reduction (its graph replay may "
                                  "not match eager bit for bit)", RuntimeWarning, stacklevel=3)
            if not found:
                raise RuntimeError(f"cuBLASLt found no algorithm for {plan}, cudaDataType {data_type}, "
                                   f"epilogue {epilogue}, alignments {alignments}")
        except BaseException:
            entry.destroy()
            raise
        self._cache[key] = entry
        return entry

    def matmul(self, plan: GemmPlan, data_type: int, a: int, b: int, d: int, *,
               epilogue: int = EPILOGUE_DEFAULT, bias: int = 0, aux: int = 0,
               alpha: float = 1.0, beta: float = 0.0, stream: int | None = None) -> None:
        """D = alpha * op(A) @ op(B) + beta * D (+ epilogue) on device pointers a, b, d (plan's A, B, D).

        bias: device pointer of an m-vector (0 = none); aux: GELU pre-activation, shaped like D.
        stream: a cudaStream_t as int; None = CuPy's current stream.
        """
        if stream is None:
            stream = _current_stream().ptr
        itemsize = _ITEMSIZE[data_type]
        alignments = (pointer_alignment(a, plan.stride_a * itemsize),
                      pointer_alignment(b, plan.stride_b * itemsize),
                      pointer_alignment(d, plan.stride_d * itemsize))
        key = gemm_cache_key(plan, data_type=data_type, compute=compute_type(data_type, tf32=self.tf32),
                             epilogue=epilogue, has_bias=bool(bias), alignments=alignments)
        entry = self._cache.get(key)
        if entry is None:
            entry = self._prepare(key, plan, bias, aux)
        else:
            entry.set_pointers(bias, aux)
        alpha_h, beta_h = _host_scalar(alpha), _host_scalar(beta)  # read when the call is enqueued
        self._lt.matmul(self.handle, entry.desc, alpha_h.ctypes.data, a, entry.a_layout, b, entry.b_layout,
                        beta_h.ctypes.data, d, entry.d_layout, d, entry.d_layout, entry.heuristic.ptr,
                        self._ws_ptr, self._ws_bytes, stream)


_DEFAULT_HANDLES: dict[int, CublasLt] = {}  # device id -> handle used when an op gets handle=None


def default_handle() -> CublasLt:
    """The module's handle for the current device, created on first use (workspace from the pool)."""
    import cupy as cp
    device = cp.cuda.runtime.getDevice()
    if device not in _DEFAULT_HANDLES:
        _DEFAULT_HANDLES[device] = CublasLt()
    return _DEFAULT_HANDLES[device]


def set_default_handle(handle: CublasLt) -> None:
    """Make `handle` (e.g. the engine's, with an arena workspace) the current device's default."""
    import cupy as cp
    _DEFAULT_HANDLES[cp.cuda.runtime.getDevice()] = handle


def set_tf32(enabled: bool) -> None:
    """llm.c's -f flag: let fp32 matmuls of the default handle use TF32 tensor cores."""
    default_handle().tf32 = bool(enabled)
