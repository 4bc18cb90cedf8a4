"""Finds, compiles (cupy.RawModule + NVRTC), caches and launches the kernels in cuda/; grid math and
argument checks shared by every launcher in llmpy/gpu/.

This is the one module that knows about .cu files. Kernels are C++ templates on the storage type T
(float or __nv_bfloat16); NAME_EXPRESSIONS lists every instantiation per file, NVRTC compiles a file
once with all of them, and launchers fetch one by its name expression, e.g.
``kernel("gelu.cu", "gelu_forward_kernel<__nv_bfloat16>")``.

bf16 arrays are CuPy arrays of dtype ``ml_dtypes.bfloat16`` (CuPy 14 supports it; cupy-notes.md §4).
uint16 "bf16 bits" views are not accepted: a uint16 array could be anything, so a launcher would have
to guess. ``arr.view(ml_dtypes.bfloat16)`` turns such a view back into a bf16 array at no cost.

`compile_offline` runs NVRTC directly (cupy_backends.cuda.libs.nvrtc) with exactly the options a
RawModule would use, so CI without a GPU or driver checks that every kernel compiles
(tests/test_kernels_compile.py; cupy-notes.md §1.9).
"""
from __future__ import annotations

import functools
import hashlib
import pathlib

import cupy as cp
import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
FLOAT_DTYPES = (F32, BF16)                 # the storage types T every templated kernel supports
INT32_MAX = 2**31 - 1                      # kernels take element counts as int


def _find_cuda_dir() -> pathlib.Path:
    pkg = pathlib.Path(__file__).resolve().parent.parent          # .../llmpy
    for d in (pkg / "cuda", pkg.parent / "cuda"):                 # installed wheel, then repo checkout
        if (d / "common.cuh").is_file():
            return d
    raise FileNotFoundError(f"kernel sources (cuda/*.cu) not found next to {pkg}")


CUDA_DIR = _find_cuda_dir()

# -------------------------------------------------------------------------------------------------
# Template instantiations per file. A launcher can only ask for a name listed here, and the offline
# compile test checks that each of them lowers to a symbol in the cubin.

TEMPLATE_ARG = {F32: "float", BF16: "__nv_bfloat16"}


def _each_dtype(*templates: str) -> tuple[str, ...]:
    return tuple(f"{t}<{arg}>" for t in templates for arg in TEMPLATE_ARG.values())


NAME_EXPRESSIONS: dict[str, tuple[str, ...]] = {
    "encoder.cu": _each_dtype("encoder_forward_kernel", "encoder_backward_wpe_kernel",
                              "encoder_backward_wte_kernel"),
    "layernorm.cu": _each_dtype("layernorm_forward_kernel", "fused_residual_forward_kernel",
                                "layernorm_backward_kernel", "layernorm_backward_fold_kernel"),
    "gelu.cu": _each_dtype("gelu_forward_kernel", "gelu_backward_kernel"),
    "rmsnorm.cu": _each_dtype("rmsnorm_forward_kernel", "fused_residual_rmsnorm_forward_kernel",
                              "rmsnorm_backward_kernel"),
    "rope.cu": _each_dtype("rope_kernel"),
    "relu2.cu": _each_dtype("relu2_forward_kernel", "relu2_backward_kernel"),
    "muon.cu": _each_dtype("muon_momentum_kernel", "muon_apply_kernel") + ("muon_normalize_kernel",
                                                                           "muon_copy_kernel"),
    "residual.cu": _each_dtype("residual_forward_kernel"),
    "attention.cu": _each_dtype("permute_kernel", "unpermute_kernel", "softmax_forward_kernel",
                                "softmax_backward_kernel", "softmax_forward128_kernel",
                                "softmax_backward128_kernel", "unpermute_backward_kernel",
                                "permute_backward_kernel"),
    "flash_attention.cu": ("flash_attention_delta_kernel", "flash_attention_backward_dkdv_kernel",
                           "qkv_pack_kernel", "qkv_unpack_kernel") + tuple(
        f"flash_attention_{k}_kernel<{variant}>" for k in ("forward", "backward_dq")
        for variant in ("4, false, false", "8, true, false", "4, false, true", "8, true, true")),
    # <WARPS, EXP2, GQA>: llmpy/gpu/flash_attention.py's TILES, and grouped-query attention or not
    "classifier.cu": _each_dtype("fused_classifier_kernel", "softcap_forward_kernel"),
    "adamw.cu": _each_dtype("adamw_kernel", "init_from_master_kernel"),
    "global_norm.cu": _each_dtype("global_norm_squared_kernel") + ("global_norm_finish_kernel",),
    "bias.cu": _each_dtype("bias_backward_kernel", "bias_backward_fold_kernel"),
    "cast.cu": ("copy_and_cast_kernel<float, __nv_bfloat16>",
                "copy_and_cast_kernel<__nv_bfloat16, float>"),
}


def template_name(base: str, *dtypes) -> str:
    """Name expression of `base` instantiated on the given dtypes: ("gelu_forward_kernel", bf16) ->
    "gelu_forward_kernel<__nv_bfloat16>". Raises ValueError for a dtype no kernel is built for."""
    args = []
    for d in dtypes:
        d = np.dtype(d)
        if d not in TEMPLATE_ARG:
            raise ValueError(f"{base}: no kernel for dtype {d}; use float32 or ml_dtypes.bfloat16")
        args.append(TEMPLATE_ARG[d])
    return f"{base}<{', '.join(args)}>"


# -------------------------------------------------------------------------------------------------
# Compilation

def source_hash(cuda_dir: pathlib.Path | str = CUDA_DIR) -> str:
    """First 16 hex digits of sha1 over the names and bytes of every *.cu/*.cuh, sorted by name.
    It goes into the options because CuPy's cache keys ignore #included files (cupy-notes.md §0.3)."""
    h = hashlib.sha1()
    for p in sorted(pathlib.Path(cuda_dir).glob("*.cu*"), key=lambda p: p.name):
        if p.suffix in (".cu", ".cuh"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


@functools.cache
def options() -> tuple[str, ...]:
    """The user options every RawModule gets (RawModule wants a tuple)."""
    return (f"-I{CUDA_DIR}", f"-DLLMPY_SRC_HASH=0x{source_hash()}", "--use_fast_math",
            "-lineinfo", "--std=c++17")


@functools.cache
def module(filename: str, name_expressions: tuple[str, ...] | None = None) -> cp.RawModule:
    """cupy.RawModule for cuda/<filename> with all its instantiations; compiled lazily on first use,
    once per process (and per device), and then from CuPy's on-disk cache."""
    exprs = NAME_EXPRESSIONS[filename] if name_expressions is None else tuple(name_expressions)
    code = (CUDA_DIR / filename).read_text()
    return cp.RawModule(code=code, options=options(), name_expressions=list(exprs))


@functools.cache
def kernel(filename: str, name: str) -> cp.RawKernel:
    """The kernel `name` (a name expression listed in NAME_EXPRESSIONS[filename])."""
    if name not in NAME_EXPRESSIONS.get(filename, ()):
        raise KeyError(f"{name!r} is not listed for {filename} in NAME_EXPRESSIONS")
    return module(filename).get_function(name)


MAX_DEFAULT_SHARED_MEM = 48 * 1024         # bytes; above this a kernel must opt in


def launch(filename: str, name: str, grid: tuple, block: tuple, args: tuple, *, shared_mem: int = 0):
    """Launch one kernel on the current stream. Every launcher goes through here (tests replace it to
    record launches without a device). Dynamic shared memory above 48 KiB is opted into first."""
    if any(a is None for a in args):
        raise ValueError(f"{name}: None among the kernel arguments; CuPy does not pass it as a null "
                         "pointer (cupy/cupy#9046), pass K.NULL (K.nullable(a))")
    fn = kernel(filename, name)
    if shared_mem > MAX_DEFAULT_SHARED_MEM and fn.max_dynamic_shared_size_bytes < shared_mem:
        fn.max_dynamic_shared_size_bytes = shared_mem
    fn(grid, block, args, shared_mem=shared_mem)


def nvrtc_options(arch: int | str) -> tuple[str, ...]:
    """The exact NVRTC option list RawModule uses for `options()` on an sm_<arch> device:
    CuPy's assembly (bundled CCCL and CUDA headers, cupy-notes.md §1.2) + what its compiler adds."""
    from cupy._core.core import assemble_cupy_compiler_options       # private, stable since v13
    return tuple(assemble_cupy_compiler_options(options())) + (
        "-ftz=true", f"-arch=sm_{arch}", "--device-as-default-execution-space")


def compile_offline_with_names(filename: str, arch: int | str, name_expressions: tuple[str, ...] | None = None,
                               *, extra_options: tuple[str, ...] = (), log: list | None = None) -> tuple[bytes, dict]:
    """Compile cuda/<filename> for sm_<arch> without a GPU or driver. Returns (cubin, lowered) where
    lowered maps each name expression to its mangled symbol. Raises RuntimeError with NVRTC's log;
    `log`, a list, gets the log of a compile that succeeded (ptxas' report with --ptxas-options=-v)."""
    from cupy_backends.cuda.libs import nvrtc
    exprs = NAME_EXPRESSIONS[filename] if name_expressions is None else tuple(name_expressions)
    path = CUDA_DIR / filename
    prog = nvrtc.createProgram(path.read_text(), str(path), (), ())
    try:
        for e in exprs:
            nvrtc.addNameExpression(prog, e)
        try:
            nvrtc.compileProgram(prog, list(nvrtc_options(arch)) + list(extra_options))
        except nvrtc.NVRTCError as err:
            raise RuntimeError(f"NVRTC failed on {filename} (sm_{arch}):\n"
                               f"{nvrtc.getProgramLog(prog)}") from err
        if log is not None:
            log.append(nvrtc.getProgramLog(prog))
        lowered = {e: nvrtc.getLoweredName(prog, e) for e in exprs}
        return nvrtc.getCUBIN(prog), lowered
    finally:
        nvrtc.destroyProgram(prog)


def resource_usage(filename: str, arch: int | str) -> dict[str, dict[str, int]]:
    """{name expression (or kernel name): registers, stack, spill_stores, spill_loads} of every kernel in
    cuda/<filename> for sm_<arch>, from ptxas' report through NVRTC (no GPU needed). Kernels that are
    not templates are compiled whether listed or not, and appear under their own names."""
    import re
    log: list[str] = []
    _, lowered = compile_offline_with_names(filename, arch, extra_options=("--ptxas-options=-v",), log=log)
    by_symbol = {symbol: expr for expr, symbol in lowered.items()}
    usage = {}
    for m in re.finditer(r"Function properties for (\w+)\n.*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads\n.*?Used (\d+) registers", log[0], re.S):
        name = by_symbol.get(m[1]) or re.sub(r"^_Z\d+", "", m[1]).split("P", 1)[0]
        usage[name] = {"registers": int(m[5]), "stack": int(m[2]), "spill_stores": int(m[3]),
                       "spill_loads": int(m[4])}
    return usage


def compile_offline(filename: str, arch: int | str) -> bytes:
    """cubin bytes of cuda/<filename> for sm_<arch>, with all its name expressions; needs no GPU."""
    return compile_offline_with_names(filename, arch)[0]


# -------------------------------------------------------------------------------------------------
# Launch math. Pure functions of sizes, so tests check them without a device.

def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def x128_elems(dtype) -> int:
    """Elements of `dtype` in one 16-byte Packed128 (8 for bf16, 4 for float32)."""
    return 16 // np.dtype(dtype).itemsize


def check_block_size(block_size: int, *, max_threads: int = 1024) -> int:
    if not (isinstance(block_size, (int, np.integer)) and 32 <= block_size <= max_threads
            and block_size % 32 == 0):
        raise ValueError(f"block_size must be a multiple of 32 in [32, {max_threads}], got {block_size!r}")
    return int(block_size)


def grid_1d(num_threads: int, block_size: int) -> tuple[int]:
    """One-dimensional grid covering num_threads threads (at least one block)."""
    return (max(1, ceil_div(num_threads, block_size)),)


def elementwise_grid(n: int, dtype, block_size: int) -> tuple[int]:
    """Grid for the x128 elementwise kernels: one thread per 16-byte chunk of n elements."""
    return grid_1d(ceil_div(n, x128_elems(dtype)), block_size)


def launch_1d(filename: str, name: str, num_threads: int, block_size: int, args: tuple):
    """One-dimensional launch of num_threads threads (args already include the sizes)."""
    launch(filename, name, grid_1d(num_threads, block_size), (block_size,), args)


def launch_elementwise(filename: str, base: str, block_size: int, **arrays) -> None:
    """An x128 elementwise kernel base<T>(arrays..., int n) over same-shape float arrays, given in the
    kernel's argument order: checks every array (errors name it), one thread per 16-byte chunk."""
    dtype = check_floats(**arrays)
    check_same_shape(**arrays)
    block_size = check_block_size(block_size)
    n = next(iter(arrays.values())).size
    launch(filename, template_name(base, dtype), elementwise_grid(n, dtype, block_size), (block_size,),
           (*arrays.values(), i32(n)))


# -------------------------------------------------------------------------------------------------
# Argument checks. RawKernel validates nothing: it passes a view's base pointer and ignores strides,
# and a Python float arrives as a double (cupy-notes.md §0.8). Launchers check every array first.

def check(name: str, a, *, dtype=None, shape=None, ndim=None, aligned: bool = False,
          int32_size: bool = True):
    """Raise ValueError naming `name` unless `a` is a C-contiguous CuPy array of the given dtype
    (one dtype or a tuple of them), shape (None entries match anything) and ndim, with a 16-byte
    aligned data pointer when `aligned` (x128 kernels), and (when `int32_size`) fewer than 2^31
    elements, because the kernel indexes it with int. Returns `a`."""
    if not isinstance(a, cp.ndarray):
        raise ValueError(f"{name}: expected a cupy.ndarray, got {type(a).__name__}")
    if dtype is not None:
        allowed = tuple(np.dtype(d) for d in (dtype if isinstance(dtype, tuple) else (dtype,)))
        if a.dtype not in allowed:
            raise ValueError(f"{name}: dtype {a.dtype}, expected {' or '.join(map(str, allowed))}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {a.shape}")
    if shape is not None:
        shape = tuple(shape)
        if len(shape) != a.ndim or any(s is not None and s != d for s, d in zip(shape, a.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name}: shape {a.shape}, expected {want}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous (kernels ignore strides), got strides {a.strides}")
    if aligned and a.data.ptr % 16:
        raise ValueError(f"{name}: data pointer must be 16-byte aligned for 128-bit loads")
    if int32_size and a.size > INT32_MAX:
        raise ValueError(f"{name}: {a.size} elements exceed the kernel's int32 indexing")
    return a


def check_floats(*, aligned: bool = True, **arrays) -> np.dtype:
    """Check each keyword array as a contiguous float32 or bf16 CuPy array and that all share one
    dtype, which is returned: the storage type T of the kernel. Errors name the argument."""
    for name, a in arrays.items():
        check(name, a, dtype=FLOAT_DTYPES, aligned=aligned)
    names = list(arrays)
    first = arrays[names[0]].dtype
    for name in names[1:]:
        if arrays[name].dtype != first:
            raise ValueError(f"{name}: dtype {arrays[name].dtype} differs from {names[0]}'s {first}")
    return first


def check_same_shape(**arrays):
    """All keyword arrays have the first one's shape."""
    names = list(arrays)
    ref = arrays[names[0]].shape
    for name in names[1:]:
        if arrays[name].shape != ref:
            raise ValueError(f"{name}: shape {arrays[name].shape} differs from {names[0]}'s {ref}")


def check_multiple(name: str, value: int, multiple: int, why: str):
    if value % multiple:
        raise ValueError(f"{name} = {value} must be a multiple of {multiple} ({why})")


# A null pointer argument: 8 zero bytes. CuPy's RawKernel turns None into a pointer that is not NULL
# (cupy/cupy#9046: it hands cuLaunchKernel a null *address* for the argument's value), so launchers
# never pass None.
NULL = np.uint64(0)


def nullable(a):
    """An optional array argument: the array, or NULL for None."""
    return NULL if a is None else a


def i32(x) -> np.int32:
    """Python int -> np.int32 kernel argument, refusing values that would wrap."""
    if not -2**31 <= int(x) <= INT32_MAX:
        raise ValueError(f"{x} does not fit an int32 kernel argument")
    return np.int32(x)


def u32(x) -> np.uint32:
    return np.uint32(int(x) & 0xFFFFFFFF)


def f32(x) -> np.float32:
    return np.float32(x)
