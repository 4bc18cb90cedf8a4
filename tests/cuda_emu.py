"""Runs the kernels in cuda/ on the CPU, driven by the real launchers in llmpy/gpu/, for machines
without a GPU (CI). The C++ side is tests/emu/ (emu.h says how a .cu becomes CPU code).

    emu = Emulator.build(tmp_dir)          # g++: one translation unit per cuda/*.cu, unchanged
    with emu.installed(monkeypatch):       # K.launch, cupy.empty/zeros/asarray/copyto -> emulator
        x = emu.to_device(np_array)        # a cupy.ndarray whose "device" pointer is host memory
        llmpy.gpu.gelu_forward(y, x)       # launcher -> emu.launch -> emu_launch (C++) -> kernel
        emu.to_host(y)                     # a NumPy view of the result

What it checks beyond the arithmetic:
- every launch's arguments against the kernel's C++ parameters (pointer or value, element type,
  size): a Python int, a float64 scalar or a bf16 array handed to a float* is an error here, where a
  GPU would silently read garbage;
- memory safety: each array ends exactly at a PROT_NONE guard page (reads or writes past the end
  fault, and the fault is reported with the array it hit), and the bytes around it are a canary,
  checked after every launch (writes into the 16-byte padding or before the start);
- uninitialised memory: cupy.empty and dynamic shared memory come back filled with 0xff bytes (NaN
  in float32 and bf16), so a kernel that reads what nobody wrote produces NaNs;
- barriers: a divergent __syncthreads or a shuffle after lanes exited stops the launch with a message.
Not modelled: concurrency between blocks, fast-math approximations, performance.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import mmap
import os
import pathlib
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import cupy as cp
import ml_dtypes
import numpy as np

from llmpy.gpu import _kernels as K

EMU_DIR = pathlib.Path(__file__).resolve().parent / "emu"
BF16 = np.dtype(ml_dtypes.bfloat16)
PAGE = mmap.PAGESIZE
CANARY = 0xA5
CXXFLAGS = ("-std=c++17", "-O1", "-fPIC", "-fno-extern-tls-init", "-U_FORTIFY_SOURCE", "-Wall", "-Wno-unknown-pragmas",
            "-Wno-unused-function", "-Wno-unused-variable")

_POINTEE = {"f": np.dtype(np.float32), "b": BF16, "i": np.dtype(np.int32), "u": np.dtype(np.uint32)}
_VALUE = {("f", 4): np.dtype(np.float32), ("i", 4): np.dtype(np.int32), ("u", 4): np.dtype(np.uint32),
          ("q", 8): np.dtype(np.int64), ("Q", 8): np.dtype(np.uint64)}
_C_NAMES = {"f": "float", "b": "__nv_bfloat16", "i": "int", "u": "unsigned int", "q": "int64",
            "Q": "uint64", "v": "void"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class EmulatorError(RuntimeError):
    """A launch the emulator refused or that went wrong (bad arguments, fault, deadlock)."""


# -------------------------------------------------------------------------------------------------
# Building


SELFTEST = {"selftest.cu": ("block_sum_kernel", "fill_kernel", "sum_kernel", "divergent_sync_kernel",
                            "half_warp_shuffle_kernel", "shuffle_after_exit_kernel", "uninitialized_shared_kernel")}


def translation_unit(path: pathlib.Path, name_expressions) -> str:
    """The C++ file that compiles a .cu for the emulator: the file #included unchanged inside its
    own namespace, the storage for its `extern __shared__` array (at most one per file), and one
    registration per name expression (for cuda/, those of llmpy/gpu/_kernels.py's NAME_EXPRESSIONS)."""
    source = path.read_text()
    dynamic = set(re.findall(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]", source))
    if len(dynamic) > 1:
        raise ValueError(f"{path.name}: the emulator supports one extern __shared__ array per file")
    ns = "emu_" + path.stem
    lines = ['#include "emu.h"', f"namespace {ns} {{", f'#include "{path.name}"']
    smem = "nullptr"
    if dynamic:
        ctype, name = dynamic.pop()
        lines += [f"alignas(16) thread_local {ctype} {name}[::emu::MAX_DYNAMIC_SHARED_BYTES / sizeof({ctype})];",
                  f"float* emu_dynamic_shared() {{ return reinterpret_cast<float*>({name}); }}"]
        smem = "&emu_dynamic_shared"
    lines += [f"EMU_REGISTER({smem}, {expr});" for expr in name_expressions]
    lines.append(f"}}  // namespace {ns}")
    return "\n".join(lines) + "\n"


def _sources_key() -> str:
    h = hashlib.sha1(" ".join(CXXFLAGS).encode())
    for p in sorted([*K.CUDA_DIR.glob("*.cu*"), *EMU_DIR.glob("*")], key=lambda p: p.name):
        h.update(p.name.encode() + p.read_bytes())
    h.update(repr(sorted(K.NAME_EXPRESSIONS.items())).encode())
    return h.hexdigest()[:16]


def build(out_dir: pathlib.Path) -> pathlib.Path:
    """Compile the emulator library into out_dir (reused when the sources have not changed)."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise EmulatorError("no C++ compiler (g++) on PATH")
    out_dir = pathlib.Path(out_dir)
    lib = out_dir / f"libcudaemu-{_sources_key()}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{EMU_DIR}", f"-I{K.CUDA_DIR}"]
    units = [EMU_DIR / "runtime.cpp"]
    sources = [(K.CUDA_DIR / f, exprs) for f, exprs in K.NAME_EXPRESSIONS.items()]
    sources += [(EMU_DIR / f, exprs) for f, exprs in SELFTEST.items()]
    for path, exprs in sources:
        unit = out_dir / f"emu_{path.stem}.cpp"
        unit.write_text(translation_unit(path, exprs))
        units.append(unit)

    def compile_one(unit: pathlib.Path) -> pathlib.Path:
        obj = out_dir / (unit.stem + ".o")
        r = subprocess.run([cxx, *CXXFLAGS, *includes, "-c", str(unit), "-o", str(obj)],
                           capture_output=True, text=True)
        if r.returncode:
            raise EmulatorError(f"compiling {unit.name} for the emulator failed:\n{r.stderr}")
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        objects = list(pool.map(compile_one, units))
    tmp = lib.with_suffix(f".tmp{os.getpid()}")
    r = subprocess.run([cxx, "-shared", "-o", str(tmp), *map(str, objects)], capture_output=True, text=True)
    if r.returncode:
        raise EmulatorError(f"linking the emulator failed:\n{r.stderr}")
    os.replace(tmp, lib)
    return lib


# -------------------------------------------------------------------------------------------------
# Memory: each array ends at a guard page, with canary bytes around it


@dataclasses.dataclass
class _Allocation:
    mm: mmap.mmap
    base: int          # address of the mapping: guard page, padding, data, padding, guard page
    start: int         # data
    nbytes: int
    end_page: int      # address of the trailing guard page
    label: str

    def canaries_intact(self) -> bool:
        view = memoryview(self.mm)
        before = np.frombuffer(view[PAGE:self.start - self.base], dtype=np.uint8)
        after = np.frombuffer(view[self.start - self.base + self.nbytes:self.end_page - self.base], np.uint8)
        return bool(np.all(before == CANARY) and np.all(after == CANARY))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclasses.dataclass
class _Kernel:
    name: str
    params: list[tuple[bool, str, int]]       # (pointer, type code, size)


class Emulator:
    """One loaded emulator library and the "device" memory handed out through it."""

    def __init__(self, lib_path: pathlib.Path):
        self.lib = ctypes.CDLL(str(lib_path))
        self.lib.emu_launch.restype = ctypes.c_int
        self.lib.emu_launch.argtypes = (ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                                        ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                        ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p))
        self.kernels: dict[str, _Kernel] = {}
        name, params = ctypes.create_string_buffer(512), ctypes.create_string_buffer(512)
        for i in range(self.lib.emu_num_kernels()):
            self.lib.emu_kernel_info(i, name, 512, params, 512)
            parsed = []
            for p in params.value.decode().split(","):
                parsed.append((True, p[1], 8) if p[0] == "P" else (False, p[0], int(p[1:])))
            self.kernels[name.value.decode()] = _Kernel(name.value.decode(), parsed)
        self.allocations: list[_Allocation] = []
        self.launches: list[str] = []
        emu = self

        class Array(cp.ndarray):
            """cupy.ndarray over emulator memory; get() and set() copy through the host view."""
            def get(self, stream=None, order="C", out=None, blocking=True):
                return emu.to_host(self).copy()

            def set(self, arr, stream=None):
                emu.to_host(self)[...] = np.asarray(arr).reshape(self.shape)

        self.Array = Array

    @classmethod
    def build(cls, out_dir) -> Emulator:
        return cls(build(out_dir))

    # ---- memory ----

    def empty(self, shape, dtype=np.float32, *, fill: int = 0xFF, label: str = "") -> cp.ndarray:
        """A C-contiguous cupy.ndarray over fresh host memory, filled with `fill` bytes (0xff: NaN)."""
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        body = _round_up(max(nbytes, 1), 16)
        data_pages = _round_up(body, PAGE) // PAGE
        mm = mmap.mmap(-1, (data_pages + 2) * PAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        end_page = base + (data_pages + 1) * PAGE
        start = end_page - body
        ctypes.memset(base + PAGE, CANARY, data_pages * PAGE)
        ctypes.memset(start, fill, nbytes)
        for page in (base, end_page):
            if _libc.mprotect(page, PAGE, 0) != 0:
                raise OSError(ctypes.get_errno(), "mprotect failed")
        alloc = _Allocation(mm, base, start, nbytes, end_page, label or f"{dtype}{list(shape)}")
        self.allocations.append(alloc)
        memory = cp.cuda.UnownedMemory(start, max(nbytes, 1), alloc, 0)
        return self.Array(shape, dtype, memptr=cp.cuda.MemoryPointer(memory, 0))

    def zeros(self, shape, dtype=np.float32) -> cp.ndarray:
        return self.empty(shape, dtype, fill=0)

    def to_device(self, host, dtype=None, *, label: str = "") -> cp.ndarray:
        host = np.ascontiguousarray(host if dtype is None else np.asarray(host).astype(dtype))
        dev = self.empty(host.shape, host.dtype, label=label)
        self.to_host(dev)[...] = host
        return dev

    def _find(self, ptr: int) -> _Allocation | None:
        for a in self.allocations:
            if a.start <= ptr < a.start + max(a.nbytes, 1):
                return a
        return None

    def to_host(self, dev: cp.ndarray) -> np.ndarray:
        """A writable NumPy view of an emulator array (any C-contiguous view of one)."""
        if not dev.flags.c_contiguous:
            raise ValueError("to_host needs a C-contiguous array")
        alloc = self._find(dev.data.ptr)
        if alloc is None:
            raise ValueError("not an emulator array")
        offset = dev.data.ptr - alloc.base
        n = dev.size
        return np.frombuffer(alloc.mm, dtype=dev.dtype, count=n, offset=offset).reshape(dev.shape)

    def _describe(self, address: int) -> str:
        for a in self.allocations:
            if a.base <= address < a.end_page + PAGE:
                if address >= a.start + a.nbytes:
                    return f"{address - (a.start + a.nbytes)} bytes past the end of {a.label}"
                return f"{a.start - address} bytes before the start of {a.label}"
        return "outside every emulator array"

    # ---- launches ----

    def _marshal(self, name: str, args: tuple):
        kernel = self.kernels.get(name)
        if kernel is None:
            raise EmulatorError(f"{name} is not registered in the emulator")
        if len(args) != len(kernel.params):
            raise EmulatorError(f"{name} takes {len(kernel.params)} arguments, the launcher passed {len(args)}")
        keep, argv = [], (ctypes.c_void_p * max(1, len(args)))()
        for i, (a, (pointer, code, size)) in enumerate(zip(args, kernel.params)):
            where = f"{name} argument {i}"
            if pointer:
                if a is None:
                    value = ctypes.c_void_p(None)
                elif isinstance(a, cp.ndarray):
                    want = _POINTEE.get(code)
                    if want is not None and a.dtype != want:
                        raise EmulatorError(f"{where}: the kernel takes {_C_NAMES[code]}*, got a {a.dtype} array")
                    if self._find(a.data.ptr) is None:
                        raise EmulatorError(f"{where}: pointer is not emulator memory")
                    value = ctypes.c_void_p(a.data.ptr)
                else:
                    raise EmulatorError(f"{where}: the kernel takes a pointer, got {type(a).__name__} {a!r}")
            else:
                want = _VALUE.get((code, size))
                if not isinstance(a, np.generic) or want is None or a.dtype != want:
                    got = f"{a.dtype}" if isinstance(a, np.generic) else f"Python {type(a).__name__}"
                    raise EmulatorError(f"{where}: the kernel takes {_C_NAMES.get(code, code)} ({size} bytes), "
                                        f"got {got} {a!r}")
                value = ctypes.create_string_buffer(a.tobytes(), size)
            keep.append(value)
            argv[i] = ctypes.addressof(value)
        return argv, keep

    def launch(self, filename: str, name: str, grid: tuple, block: tuple, args: tuple, *, shared_mem: int = 0):
        """Drop-in for llmpy.gpu._kernels.launch."""
        if name not in K.NAME_EXPRESSIONS.get(filename, ()):
            raise EmulatorError(f"{name} is not listed for {filename} in NAME_EXPRESSIONS")
        self.run(name, grid, block, args, shared_mem=shared_mem)

    def run(self, name: str, grid: tuple, block: tuple, args: tuple, *, shared_mem: int = 0):
        """Launch the registered kernel `name` (any of them, tests/emu/selftest.cu's too)."""
        for dims, what in ((grid, "grid"), (block, "block")):
            if not (1 <= len(dims) <= 3 and all(isinstance(d, (int, np.integer)) for d in dims)):
                raise EmulatorError(f"{name}: {what} must be 1 to 3 ints, got {dims!r}")
        argv, keep = self._marshal(name, tuple(args))
        g = (ctypes.c_uint * 3)(*(tuple(int(d) for d in grid) + (1, 1))[:3])
        b = (ctypes.c_uint * 3)(*(tuple(int(d) for d in block) + (1, 1))[:3])
        error, fault = ctypes.create_string_buffer(1024), ctypes.c_void_p()
        rc = self.lib.emu_launch(name.encode(), g, b, int(shared_mem), argv, len(args), error, 1024,
                                 ctypes.byref(fault))
        del keep
        self.launches.append(name)
        if rc == 2:
            raise EmulatorError(f"{error.value.decode()}: {self._describe(fault.value or 0)}")
        if rc:
            raise EmulatorError(error.value.decode())
        for a in self.allocations:
            if not a.canaries_intact():
                raise EmulatorError(f"{name} wrote outside {a.label} (canary bytes changed)")

    # ---- CuPy and matmul stand-ins ----

    def _asarray(self, a, dtype=None):
        if isinstance(a, cp.ndarray) and (dtype is None or a.dtype == np.dtype(dtype)):
            return a
        return self.to_device(self.to_host(a) if isinstance(a, cp.ndarray) else a, dtype)

    def _copyto(self, dst, src):
        self.to_host(dst)[...] = self.to_host(src)

    def batched_matmul(self, out, a, b, *, transa: bool, transb: bool, alpha: float = 1.0, beta: float = 0.0,
                       handle=None):
        """NumPy stand-in for llmpy.gpu.matmul.batched_matmul (cuBLASLt): fp32 products, rounded once
        into out's dtype, as cuBLASLt does with fp32 accumulation."""
        ha, hb, ho = (self.to_host(x).astype(np.float32) for x in (a, b, out))
        if transa:
            ha = np.swapaxes(ha, -1, -2)
        if transb:
            hb = np.swapaxes(hb, -1, -2)
        res = np.float32(alpha) * np.matmul(ha, hb)
        if beta:
            res += np.float32(beta) * ho
        self.to_host(out)[...] = res.astype(out.dtype)

    @contextlib.contextmanager
    def installed(self, monkeypatch):
        """Route llmpy.gpu's launches, allocations and batched matmuls through the emulator."""
        import llmpy.gpu.matmul
        monkeypatch.setattr(K, "launch", self.launch)
        monkeypatch.setattr(cp, "empty", lambda shape, dtype=np.float32, order="C": self.empty(shape, dtype))
        monkeypatch.setattr(cp, "zeros", lambda shape, dtype=np.float32, order="C": self.zeros(shape, dtype))
        monkeypatch.setattr(cp, "zeros_like", lambda a, dtype=None: self.zeros(a.shape, dtype or a.dtype))
        monkeypatch.setattr(cp, "full", lambda shape, value, dtype=np.float32: self.to_device(
            np.full(shape, value, dtype=dtype)))
        monkeypatch.setattr(cp, "asarray", self._asarray)
        monkeypatch.setattr(cp, "copyto", self._copyto)
        monkeypatch.setattr(llmpy.gpu.matmul, "batched_matmul", self.batched_matmul)
        yield self
