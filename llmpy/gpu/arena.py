"""One device allocation holding every buffer a training step touches (parameters, gradients, AdamW
state, activations, the cuBLASLt workspace, scratch), handed out as named CuPy views, as llm.c does
with its single cudaMalloc per buffer group. Tests: `tests/test_arena.py`.

Why: a CUDA graph bakes buffer addresses in, so nothing may be allocated or freed during a captured
step (cupy-notes §3). Planning all buffers up front also gives one number for "does it fit".

    specs = [("params", (n_params,), bf16), ("grads", (n_params,), bf16), ("lt_workspace", (32 << 20,), np.uint8)]
    with Arena(specs) as arena:
        params = arena["params"]      # cupy.ndarray view at a 256-byte-aligned offset
        arena.zero("grads")           # memset on the current stream (capturable)
    # leaving the block drops the allocation and returns the pool's used bytes to where they were

`Arena.plan(specs)` is the pure offset planner (no device). The views keep the allocation alive, so a
view kept past the `with` block keeps its memory too; `close()` warns when that happens.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

DEFAULT_ALIGNMENT = 256  # every view starts on a 256-byte boundary: enough for x128 loads and cuBLASLt


@dataclass(frozen=True)
class ArenaSlot:
    """One named view: `nbytes` bytes at byte `offset` from the arena base."""
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ArenaPlan:
    """Where every view lives, and the total bytes to allocate (a multiple of the alignment)."""
    slots: tuple[ArenaSlot, ...]
    nbytes: int
    alignment: int

    def __getitem__(self, name: str) -> ArenaSlot:
        for slot in self.slots:
            if slot.name == name:
                return slot
        raise KeyError(f"no arena slot named {name!r}")


def _align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


class Arena:
    """A planned device allocation; a context manager that allocates on entry and frees on exit.

    specs: ordered (name, shape, dtype) triples; views are laid out in that order.
    """

    def __init__(self, specs, *, alignment: int = DEFAULT_ALIGNMENT):
        self.layout = Arena.plan(specs, alignment=alignment)
        self.views: dict = {}          # name -> cupy.ndarray, filled while open
        self._memory = None            # the one cupy.cuda.MemoryPointer from the pool
        self._baseline: int | None = None

    @staticmethod
    def plan(specs, *, alignment: int = DEFAULT_ALIGNMENT) -> ArenaPlan:
        """Offsets for `specs` in order, each rounded up to `alignment` bytes (pure; no device)."""
        if alignment < 16 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two >= 16, got {alignment}")
        slots, offset, seen = [], 0, set()
        for name, shape, dtype in specs:
            if not isinstance(name, str) or not name:
                raise ValueError(f"arena slot names must be non-empty strings, got {name!r}")
            if name in seen:
                raise ValueError(f"duplicate arena slot name {name!r}")
            seen.add(name)
            shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
            if any(int(s) != s or s < 0 for s in shape):
                raise ValueError(f"arena slot {name!r} has an invalid shape {shape}")
            shape = tuple(int(s) for s in shape)
            dtype = np.dtype(dtype)
            offset = _align_up(offset, alignment)
            nbytes = math.prod(shape) * dtype.itemsize
            slots.append(ArenaSlot(name, shape, dtype, offset, nbytes))
            offset += nbytes
        return ArenaPlan(tuple(slots), _align_up(offset, alignment), alignment)

    # ---------------------------------------------------------------------------------------------
    # Device part

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def open(self) -> "Arena":
        """Allocate the whole arena from CuPy's default pool and create the views."""
        import cupy as cp
        if self._baseline is not None:
            raise RuntimeError("arena is already open")
        pool = cp.get_default_memory_pool()
        self._baseline = pool.used_bytes()
        try:
            if self.layout.nbytes:
                self._memory = pool.malloc(self.layout.nbytes)
            for slot in self.layout.slots:
                memptr = None if self._memory is None else self._memory + slot.offset
                self.views[slot.name] = cp.ndarray(slot.shape, slot.dtype, memptr=memptr)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Drop the views and the allocation, and give the pool's cached blocks back to the driver."""
        import cupy as cp
        if self._baseline is None:
            return
        self.views = {}
        self._memory = None
        pool = cp.get_default_memory_pool()
        pool.free_all_blocks()
        leaked = pool.used_bytes() - self._baseline
        self._baseline = None
        if leaked > 0:
            warnings.warn(f"{leaked} bytes of the CuPy pool are still in use after closing the arena: a view "
                          "(or another allocation made meanwhile) outlived it", RuntimeWarning, stacklevel=2)

    def __enter__(self) -> "Arena":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __getitem__(self, name: str):
        if name not in self.views:
            state = "open" if self._baseline is not None else "closed"
            raise KeyError(f"no view named {name!r} (arena is {state})")
        return self.views[name]

    def zero(self, name: str) -> None:
        """Zero one view with an async memset on the current stream (allowed during graph capture)."""
        view = self[name]
        if view.nbytes:
            view.data.memset_async(0, view.nbytes)

    def zero_all(self) -> None:
        """Zero the whole allocation (llm.c zeroes its activations once at creation)."""
        if self._memory is not None:
            self._memory.memset_async(0, self.layout.nbytes)
