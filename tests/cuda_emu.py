"""Runs the kernels in cuda/ on the CPU, driven by the real launchers in llmpy/gpu/, for machines
without a GPU (CI). The C++ side is tests/emu/ (emu.h says how a .cu becomes CPU code).

    emu = Emulator.build(tmp_dir)          # g++: one translation unit per cuda/*.cu, unchanged
    with emu.installed(monkeypatch):       # K.launch, cupy allocations, cuBLASLt -> emulator
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
- misaligned 128-bit loads and stores (Packed128's int4 accesses must be 16-byte aligned on a GPU);
- uninitialised memory: cupy.empty and dynamic shared memory come back filled with 0xff bytes (NaN
  in float32 and bf16), so a kernel that reads what nobody wrote produces NaNs;
- barriers: a divergent __syncthreads or a shuffle after lanes exited stops the launch with a message;
- races: set_reverse_order(True) runs blocks and threads last to first, so a kernel whose threads
  or blocks exchange data without a barrier gives different bits than in order;
- lifetimes: an array's memory is unmapped when the last CuPy reference to it goes, as the pool would
  reuse it, so a kernel reading freed memory faults; the pool stand-in's used_bytes() counts the
  live arrays, so "the engine gives every byte back" is testable.
Matmuls run through EmulatedCublasLt: matmul.py's real plans (column-major layouts, leading
dimensions, batch strides, bias/GELU epilogues) executed by llmpy.testing.colmajor_gemm, with every
operand bounds-checked.
CUDA graphs (EmulatedCuda, the `cupy.cuda` that StepGraph sees): while a stream captures, launches,
matmuls, memsets and device-to-device copies are recorded with their pointers and by-value
arguments frozen, and a replay runs the recording, so a per-step value passed by value instead of
through device memory shows up as a replay that differs from eager execution. What CUDA refuses
during capture is refused here too: host<->device copies, synchronisation, work on a stream that is
not part of the capture, and allocations once StepGraph has installed its refusing allocator. A second
stream joins a capture as in CUDA, by waiting for an event recorded on a capturing stream (a fork),
and must be joined back (the capturing stream waits for an event recorded after its last work)
before the capture ends; its work is recorded in issue order.
With the engine's few device calls stubbed too (arena pool, synchronize, device name, memory info),
the whole GPUGPT training step runs, graphs included (tests/test_gpu_engine.py).
Not modelled: concurrency between blocks, fast-math approximations, cuBLASLt's own descriptors and
algorithms (tests/test_cublaslt.py), asynchrony between streams, performance.
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
import weakref
from concurrent.futures import ThreadPoolExecutor

import cupy as cp
import ml_dtypes
import numpy as np

from llmpy.gpu import _kernels as K
from llmpy.gpu import cublaslt
from llmpy.testing import colmajor_gemm, colmajor_view

EMU_DIR = pathlib.Path(__file__).resolve().parent / "emu"
BF16 = np.dtype(ml_dtypes.bfloat16)
PAGE = mmap.PAGESIZE
CANARY = 0xA5
MEMORY_BYTES = 80 * 2**30     # the "device" size cupy.cuda.runtime.memGetInfo reports
CXXFLAGS = ("-std=c++17", "-O1", "-fPIC", "-fno-extern-tls-init", "-U_FORTIFY_SOURCE", "-Wall", "-Wno-unknown-pragmas",
            "-Wno-unused-function", "-Wno-unused-variable",
            "-Wno-class-memaccess")   # Packed128 memcpys its bytes into emu.h's (alignment-checking) int4

_POINTEE = {"f": np.dtype(np.float32), "b": BF16, "i": np.dtype(np.int32), "u": np.dtype(np.uint32)}
_VALUE = {("f", 4): np.dtype(np.float32), ("i", 4): np.dtype(np.int32), ("u", 4): np.dtype(np.uint32),
          ("q", 8): np.dtype(np.int64), ("Q", 8): np.dtype(np.uint64)}
_C_NAMES = {"f": "float", "b": "__nv_bfloat16", "i": "int", "u": "unsigned int", "q": "int64",
            "Q": "uint64", "v": "void"}

_NDARRAY = cp.ndarray        # the real class: installed() replaces cupy.ndarray by Emulator.Array
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class EmulatorError(RuntimeError):
    """A launch the emulator refused or that went wrong (bad arguments, fault, deadlock)."""


# -------------------------------------------------------------------------------------------------
# Building


# the emulator's own test kernels (not templates: each name is its own name expression)
SELFTEST = {"selftest.cu": tuple(re.findall(r"__global__\s+void\s+(\w+)", (EMU_DIR / "selftest.cu").read_text()))}


def translation_unit(path: pathlib.Path, name_expressions) -> str:
    """The C++ file that compiles a .cu for the emulator: the file #included unchanged inside its
    own namespace, the storage for its `extern __shared__` array (at most one per file), and one
    registration per name expression (for cuda/, those of llmpy/gpu/_kernels.py's NAME_EXPRESSIONS)."""
    source = path.read_text()
    dynamic = set(re.findall(r"extern\s+__shared__\s+(?:__align__\((\d+)\)\s+)?(\w+)\s+(\w+)\s*\[\s*\]", source))
    if len(dynamic) > 1:
        raise ValueError(f"{path.name}: the emulator supports one extern __shared__ array per file")
    ns = "emu_" + path.stem
    # headers with `#pragma once` go first, outside the namespace, so that the file's own #include of
    # them is a no-op there; sm80.h gives the tensor-core instructions of cuda/sm80.cuh
    lines = ['#include "emu.h"', '#include "sm80.h"', f"namespace {ns} {{", f'#include "{path.name}"']
    smem = "nullptr"
    if dynamic:
        align, ctype, name = dynamic.pop()
        lines += [f"alignas({align or 16}) thread_local {ctype} {name}"
                  f"[::emu::MAX_DYNAMIC_SHARED_BYTES / sizeof({ctype})];",
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


@dataclasses.dataclass(eq=False)
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


class Emulator:
    """One loaded emulator library and the "device" memory handed out through it."""

    def __init__(self, lib_path: pathlib.Path):
        self.lib = ctypes.CDLL(str(lib_path))
        self.lib.emu_launch.restype = ctypes.c_int
        self.lib.emu_launch.argtypes = (ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                                        ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                        ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p))
        self.kernels: dict[str, list[tuple[bool, str, int]]] = {}    # name -> (pointer, type code, size) per param
        name, params = ctypes.create_string_buffer(512), ctypes.create_string_buffer(512)
        for i in range(self.lib.emu_num_kernels()):
            self.lib.emu_kernel_info(i, name, 512, params, 512)
            parsed = []
            for p in params.value.decode().split(","):
                parsed.append((True, p[1], 8) if p[0] == "P" else (False, p[0], int(p[1:])))
            self.kernels[name.value.decode()] = parsed
        self._live: dict[int, weakref.ref] = {}    # data address -> the allocation, while referenced
        self.launches: list[str] = []
        self._capture: list | None = None           # the work recorded by the capturing stream
        self._capture_stream = None                 # that stream, while one captures
        self._capture_streams: set = set()          # it and the streams forked into the capture
        self._issued: dict = {}                     # forked stream -> work items it recorded
        self._joined: dict = {}                     # forked stream -> how many of them are joined back
        self.allocator = None                       # set by EmulatedCuda.using_allocator
        self.cuda = EmulatedCuda(self)
        emu = self

        class Array(_NDARRAY):
            """cupy.ndarray over emulator memory. The methods llmpy calls that would launch CuPy's own
            kernels or copies (get, set, fill, sum, copy) work on the host view instead: fill and copy
            are device work (recorded while capturing), get, set and sum synchronise with the host."""
            def get(self, stream=None, order="C", out=None, blocking=True):
                emu.host_sync("a device-to-host copy (get)")
                return emu.to_host(self).copy()

            def set(self, arr, stream=None):
                emu.host_sync("a host-to-device copy (set)")
                emu.to_host(self)[...] = np.asarray(arr).reshape(self.shape)

            def fill(self, value):
                host = emu.to_host(self)
                emu.enqueue(lambda: host.__setitem__(Ellipsis, value))

            def sum(self, axis=None, dtype=None, out=None, keepdims=False):
                emu.host_sync("a reduction read back by the host (sum)")
                return emu.to_host(self).sum(axis=axis, dtype=dtype, keepdims=keepdims)

            def copy(self, order="C"):
                out = emu.empty(self.shape, self.dtype)
                src, dst = emu.to_host(self), emu.to_host(out)
                emu.enqueue(lambda: dst.__setitem__(Ellipsis, src))
                return out

        self.Array = Array
        self.pool = _Pool(self)
        self.handle = None            # the default cuBLASLt handle, an EmulatedCublasLt

    @property
    def allocations(self) -> list[_Allocation]:
        """The live allocations (those some CuPy array still references)."""
        return [a for a in (ref() for ref in list(self._live.values())) if a is not None]

    def used_bytes(self) -> int:
        return sum(a.nbytes for a in self.allocations)

    # ---- streams and graphs: what runs now and what a capture records ----

    def enqueue(self, work) -> None:
        """Device work in stream order: run now, or record it while a stream captures (then it must
        be issued on the capturing stream, as CUDA's global capture mode requires)."""
        if self._capture is None:
            work()
            return
        stream = self.cuda.get_current_stream()
        if not stream.is_capturing():
            raise EmulatorError("work issued on a stream that is not capturing while a CUDA graph is "
                                "being captured (CUDA invalidates the capture)")
        if stream is not self._capture_stream:
            self._issued[stream] = self._issued.get(stream, 0) + 1
        self._capture.append(work)

    def host_sync(self, what: str) -> None:
        """Refuse what would make the host wait for (or copy to or from) the device during capture."""
        if self._capture is not None:
            raise EmulatorError(f"{what} during CUDA-graph capture: not capturable (CUDA invalidates "
                                "the capture)")

    def set_reverse_order(self, reverse: bool) -> None:
        """Run blocks, and threads within each block, last to first (True) or in order (False)."""
        self.lib.emu_set_reverse_order(int(bool(reverse)))

    @classmethod
    def build(cls, out_dir) -> Emulator:
        return cls(build(out_dir))

    # ---- memory ----

    def empty(self, shape, dtype=np.float32, *, fill: int = 0xFF, label: str = "") -> cp.ndarray:
        """A C-contiguous cupy.ndarray over fresh host memory, filled with `fill` bytes (0xff: NaN)."""
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self.allocator is not None:      # CuPy asks the installed allocator (StepGraph's refuses)
            self.allocator(nbytes)
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
        # the memory goes (unmapped with alloc.mm) when the last array over it does; NumPy views from
        # to_host keep the mapping itself alive
        self._live[start] = weakref.ref(alloc, lambda _, key=start, live=self._live: live.pop(key, None))
        memory = cp.cuda.UnownedMemory(start, max(nbytes, 1), alloc, 0)
        return self.Array(shape, dtype, memptr=cp.cuda.MemoryPointer(memory, 0))

    def zeros(self, shape, dtype=np.float32) -> cp.ndarray:
        return self.empty(shape, dtype, fill=0)

    def to_device(self, host, dtype=None, *, label: str = "") -> cp.ndarray:
        self.host_sync("a host-to-device copy")
        host = np.ascontiguousarray(host if dtype is None else np.asarray(host).astype(dtype))
        dev = self.empty(host.shape, host.dtype, label=label)
        self.to_host(dev)[...] = host
        return dev

    def _find(self, ptr: int) -> _Allocation | None:
        ref = self._live.get(ptr)                    # most pointers are an array's start
        alloc = ref() if ref is not None else None
        if alloc is not None:
            return alloc
        for a in self.allocations:
            if a.start <= ptr < a.start + max(a.nbytes, 1):
                return a
        return None

    def to_host(self, dev) -> np.ndarray:
        """A writable NumPy view of an emulator array (any view of one, with the same strides)."""
        return self._view(dev.data.ptr, dev.dtype, dev.shape, tuple(st // dev.itemsize for st in dev.strides),
                          "to_host")

    def _describe(self, address: int) -> str:
        for a in self.allocations:
            if a.base <= address < a.end_page + PAGE:
                if address >= a.start + a.nbytes:
                    return f"{address - (a.start + a.nbytes)} bytes past the end of {a.label}"
                return f"{a.start - address} bytes before the start of {a.label}"
        return "outside every emulator array"

    # ---- launches ----

    def _marshal(self, name: str, args: tuple):
        params = self.kernels.get(name)
        if params is None:
            raise EmulatorError(f"{name} is not registered in the emulator")
        if len(args) != len(params):
            raise EmulatorError(f"{name} takes {len(params)} arguments, the launcher passed {len(args)}")
        keep, argv = [], (ctypes.c_void_p * max(1, len(args)))()
        for i, (a, (pointer, code, size)) in enumerate(zip(args, params)):
            where = f"{name} argument {i}"
            if pointer:
                if a is None:   # CuPy would pass a pointer that is not NULL (cupy/cupy#9046)
                    raise EmulatorError(f"{where}: None is not a null pointer under CuPy; pass K.NULL")
                if isinstance(a, np.uint64) and a == K.NULL:
                    value = ctypes.c_void_p(None)
                elif isinstance(a, _NDARRAY):
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
        argv, keep = self._marshal(name, tuple(args))   # by-value arguments are frozen here
        g = (ctypes.c_uint * 3)(*(tuple(int(d) for d in grid) + (1, 1))[:3])
        b = (ctypes.c_uint * 3)(*(tuple(int(d) for d in block) + (1, 1))[:3])

        def execute():
            error, fault = ctypes.create_string_buffer(1024), ctypes.c_void_p()
            rc = self.lib.emu_launch(name.encode(), g, b, int(shared_mem), argv, len(args), error, 1024,
                                     ctypes.byref(fault))
            self.launches.append(name)
            if rc == 2:
                raise EmulatorError(f"{error.value.decode()}: {self._describe(fault.value or 0)}")
            if rc:
                raise EmulatorError(error.value.decode())
            for a in self.allocations:
                if not a.canaries_intact():
                    raise EmulatorError(f"{name} wrote outside {a.label} (canary bytes changed)")

        execute.keep = keep       # the argument buffers live as long as the (possibly recorded) launch
        self.enqueue(execute)

    # ---- CuPy and matmul stand-ins ----

    def _asarray(self, a, dtype=None):
        if isinstance(a, _NDARRAY) and (dtype is None or a.dtype == np.dtype(dtype)):
            return a
        return self.to_device(self.to_host(a) if isinstance(a, _NDARRAY) else a, dtype)

    def _copyto(self, dst, src, casting="same_kind"):
        out = self.to_host(dst)
        if isinstance(src, _NDARRAY):
            src = self.to_host(src)
            self.enqueue(lambda: out.__setitem__(Ellipsis, src))
        else:
            self.host_sync("a host-to-device copy (copyto)")
            out[...] = src

    def _memset(self, ptr: int, nbytes: int) -> None:
        if self._find(ptr) is None:
            raise EmulatorError(f"memset of 0x{ptr:x}: not emulator memory")
        self.enqueue(lambda: ctypes.memset(ptr, 0, nbytes))

    def _default_handle(self):
        if self.handle is None:
            self.handle = EmulatedCublasLt(self)
        return self.handle

    def _set_default_handle(self, handle) -> None:
        self.handle = handle

    def _view(self, ptr: int, dtype, shape: tuple, strides: tuple, what: str) -> np.ndarray:
        """A NumPy view of emulator memory at device pointer `ptr` (strides in elements), refusing
        any element outside the allocation (a cuBLASLt operand running off its array)."""
        alloc = self._find(ptr)
        if alloc is None:
            raise EmulatorError(f"{what}: pointer 0x{ptr:x} is not emulator memory")
        dtype = np.dtype(dtype)
        if 0 in shape:
            return np.ndarray(shape, dtype)
        if any(st < 0 for st in strides):
            raise EmulatorError(f"{what}: negative strides {strides} are not supported")
        last = ptr + sum((n - 1) * st for n, st in zip(shape, strides)) * dtype.itemsize
        if last + dtype.itemsize > alloc.start + alloc.nbytes:
            over = last + dtype.itemsize - alloc.start - alloc.nbytes
            raise EmulatorError(f"{what}: {shape} elements with strides {strides} run {over} bytes past "
                                f"the end of {alloc.label}")
        return np.ndarray(shape, dtype, buffer=alloc.mm, offset=ptr - alloc.base,
                          strides=tuple(st * dtype.itemsize for st in strides))

    @contextlib.contextmanager
    def installed(self, monkeypatch):
        """Route llmpy.gpu's launches, allocations and batched matmuls through the emulator, and
        the engine's device calls (arena pool, cuBLASLt handle, synchronize, device name)."""
        import llmpy.gpu.arena
        import llmpy.gpu.engine
        import llmpy.gpu.graph
        import llmpy.gpu.matmul
        monkeypatch.setattr(K, "launch", self.launch)
        monkeypatch.setattr(cp, "ndarray", self.Array)
        monkeypatch.setattr(cp, "ascontiguousarray", self._asarray)
        monkeypatch.setattr(cp, "get_default_memory_pool", lambda: self.pool)
        monkeypatch.setattr(llmpy.gpu.arena.Arena, "zero_all", lambda arena: arena._memory is not None and
                            self._memset(arena._memory.ptr, arena.layout.nbytes))
        monkeypatch.setattr(llmpy.gpu.arena.Arena, "zero", lambda arena, name: self._memset(
            arena[name].data.ptr, arena[name].nbytes))
        step_graph_init = llmpy.gpu.graph.StepGraph.__init__
        monkeypatch.setattr(llmpy.gpu.graph.StepGraph, "__init__", lambda graph, *, cuda=None, **kw:
                            step_graph_init(graph, cuda=cuda or self.cuda, **kw))
        monkeypatch.setattr(cp.cuda, "get_current_stream", self.cuda.get_current_stream)
        import llmpy.dist.overlap
        monkeypatch.setattr(llmpy.dist.overlap, "cuda_module", lambda: self.cuda)
        monkeypatch.setattr(cp.cuda.runtime, "memGetInfo", lambda: (MEMORY_BYTES - self.used_bytes(), MEMORY_BYTES))
        monkeypatch.setattr(cublaslt, "CublasLt", lambda workspace=None, *, tf32=False: EmulatedCublasLt(self, tf32))
        for module in (cublaslt, llmpy.gpu.matmul):     # matmul.py imported these by name
            monkeypatch.setattr(module, "default_handle", self._default_handle)
            monkeypatch.setattr(module, "set_default_handle", self._set_default_handle)
        monkeypatch.setattr(llmpy.gpu.engine, "device_description", lambda: ("CPU emulator", "sm_90"))
        monkeypatch.setattr(llmpy.gpu.engine.ArenaEngine, "synchronize", lambda model: None)
        monkeypatch.setattr(cp, "empty", lambda shape, dtype=np.float32, order="C": self.empty(shape, dtype))
        monkeypatch.setattr(cp, "zeros", lambda shape, dtype=np.float32, order="C": self.zeros(shape, dtype))
        monkeypatch.setattr(cp, "zeros_like", lambda a, dtype=None: self.zeros(a.shape, dtype or a.dtype))
        monkeypatch.setattr(cp, "full", lambda shape, value, dtype=np.float32: self.to_device(
            np.full(shape, value, dtype=dtype)))
        monkeypatch.setattr(cp, "asarray", self._asarray)
        monkeypatch.setattr(cp, "copyto", self._copyto)
        yield self


class _Pool:
    """Stands in for CuPy's default memory pool (the engine's arena allocates from it)."""

    def __init__(self, emu: Emulator):
        self.emu = emu

    def malloc(self, nbytes: int):
        return self.emu.empty((nbytes,), np.uint8).data

    def used_bytes(self) -> int:
        return self.emu.used_bytes()

    total_bytes = used_bytes    # nothing is cached: held = in use

    def free_all_blocks(self) -> None:
        pass


class EmulatedCublasLt:
    """Stands in for llmpy.gpu.cublaslt.CublasLt: executes each GemmPlan (column-major, device
    pointers, leading dimensions, batch strides, epilogues) with llmpy.testing.colmajor_gemm on
    emulator memory, in fp32 with one rounding into the storage type, so matmul.py's planning is
    exercised for real. Every operand must lie inside its array."""

    _DTYPES = {cublaslt.cuda_data_type(np.float32): np.dtype(np.float32), cublaslt.cuda_data_type(BF16): BF16}

    def __init__(self, emu: Emulator, tf32: bool = False):
        self.emu, self.tf32, self.calls = emu, tf32, []

    def set_workspace(self, workspace) -> None:
        pass

    def clear_cache(self) -> None:
        pass

    def close(self) -> None:
        pass

    def _flat(self, ptr, dtype, layout, stride, batch, what) -> np.ndarray:
        """The flat span of emulator memory a (rows, cols, ld) operand covers over all batches."""
        rows, cols, ld = layout
        return self.emu._view(ptr, dtype, ((batch - 1) * stride + (cols - 1) * ld + rows,), (1,), what)

    def matmul(self, plan, data_type, a, b, d, *, epilogue=cublaslt.EPILOGUE_DEFAULT, bias=0, aux=0,
               alpha=1.0, beta=0.0, stream=None):
        from llmpy.cpu.gelu import gelu_backward, gelu_forward
        dtype = self._DTYPES[data_type]
        self.calls.append((plan, epilogue))
        if plan.batch > 1 and 0 in (plan.stride_a, plan.stride_b, plan.stride_d):
            raise EmulatorError(f"batched plan with a zero stride: {plan}")
        if epilogue not in (cublaslt.EPILOGUE_DEFAULT, cublaslt.EPILOGUE_BIAS, *cublaslt.AUX_EPILOGUES):
            raise EmulatorError(f"unknown epilogue {epilogue}")
        A = self._flat(a, dtype, plan.a_layout, plan.stride_a, plan.batch, "cuBLASLt A")
        B = self._flat(b, dtype, plan.b_layout, plan.stride_b, plan.batch, "cuBLASLt B")
        D = self._flat(d, dtype, plan.d_layout, plan.stride_d, plan.batch, "cuBLASLt D")
        if epilogue in (cublaslt.EPILOGUE_BIAS, cublaslt.EPILOGUE_GELU_AUX_BIAS):
            bias_vec = self.emu._view(bias, dtype, (plan.m,), (1,), "bias")
        if epilogue in cublaslt.AUX_EPILOGUES:
            AUX = self._flat(aux, dtype, plan.d_layout, plan.stride_d, plan.batch, "GELU aux")

        def apply(acc, i):                           # on the fp32 accumulator, as cuBLASLt does
            if epilogue in (cublaslt.EPILOGUE_BIAS, cublaslt.EPILOGUE_GELU_AUX_BIAS):
                acc += bias_vec.astype(np.float32)[:, None]
            if epilogue in cublaslt.AUX_EPILOGUES:
                pre = colmajor_view(AUX, i * plan.stride_d, *plan.d_layout)
                if epilogue == cublaslt.EPILOGUE_DGELU:
                    gelu_backward(acc, np.ascontiguousarray(pre, dtype=np.float32), acc)
                else:
                    pre[...] = acc
                    out = np.empty_like(acc)
                    gelu_forward(out, acc)
                    acc = out
            return acc

        self.emu.enqueue(lambda: colmajor_gemm(plan, A, B, D, alpha=alpha, beta=beta, compute=np.float32,
                                               epilogue=apply))


# -------------------------------------------------------------------------------------------------
# Streams, events and graphs


class EmulatedCuda:
    """The part of `cupy.cuda` that llmpy/gpu/graph.py uses (Stream, Event, get_current_stream,
    using_allocator), over the emulator's single in-order queue: a stream's capture records the work
    issued while it is current (Emulator.enqueue), and the graph's launch replays the recording."""

    def __init__(self, emu: Emulator):
        self.emu = emu
        self.null = _Stream(self, "null")
        self._current = [self.null]

    def Stream(self, non_blocking=False):
        return _Stream(self, "side")

    def Event(self, disable_timing=False):
        return _Event(self)

    def get_current_stream(self):
        return self._current[-1]

    @contextlib.contextmanager
    def using_allocator(self, allocator=None):
        previous, self.emu.allocator = self.emu.allocator, allocator
        try:
            yield
        finally:
            self.emu.allocator = previous


class _Stream:
    def __init__(self, cuda: EmulatedCuda, name: str):
        self.cuda, self.name = cuda, name
        self.ptr = id(self)

    def __enter__(self):
        self.cuda._current.append(self)
        return self

    def __exit__(self, *exc):
        self.cuda._current.pop()

    def is_capturing(self) -> bool:
        return self in self.cuda.emu._capture_streams

    def begin_capture(self):
        emu = self.cuda.emu
        if self is self.cuda.null:
            raise EmulatorError("cannot capture the legacy null stream")
        if emu._capture_stream is not None:
            raise EmulatorError("a CUDA graph is already being captured")
        emu._capture, emu._capture_stream = [], self
        emu._capture_streams, emu._issued, emu._joined = {self}, {}, {}

    def end_capture(self) -> "_Graph":
        emu = self.cuda.emu
        if emu._capture_stream is not self:
            raise EmulatorError(f"end_capture on the {self.name} stream, which did not begin the capture")
        unjoined = [s.name for s, n in emu._issued.items() if n > emu._joined.get(s, 0)]
        work, emu._capture, emu._capture_stream = emu._capture, None, None
        emu._capture_streams, emu._issued, emu._joined = set(), {}, {}
        if unjoined:
            raise EmulatorError(f"capture ended with work on the forked {', '.join(unjoined)} stream not "
                                "joined back (CUDA: cudaErrorStreamCaptureUnjoined)")
        return _Graph(emu, work)

    def wait_event(self, event) -> None:
        """One in-order queue: already ordered. During a capture, waiting for an event recorded on a
        capturing stream forks this stream into the capture, or joins the recording stream's work."""
        emu = self.cuda.emu
        if emu._capture is None or event.stream is None or event.stream not in emu._capture_streams:
            return
        emu._capture_streams.add(self)
        emu._joined[event.stream] = max(emu._joined.get(event.stream, 0), event.work)   # work before the record

    def synchronize(self) -> None:
        self.cuda.emu.host_sync("stream synchronize")


class _Event:
    def __init__(self, cuda: EmulatedCuda):
        self.cuda, self.stream, self.work = cuda, None, 0

    def record(self, stream=None) -> None:
        emu = self.cuda.emu
        self.stream = stream if stream is not None else self.cuda.get_current_stream()
        self.work = emu._issued.get(self.stream, 0)
        if emu._capture is None:
            self.stream = None           # outside a capture an event orders nothing here


class _Graph:
    """A recorded capture: launch() runs the work again, with the arguments it was recorded with."""

    def __init__(self, emu: Emulator, work: list):
        self.emu, self.work = emu, work

    def launch(self, stream=None) -> None:
        def replay():
            for item in self.work:
                item()
        self.emu.enqueue(replay)
