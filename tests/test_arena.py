"""Tests for llmpy/gpu/arena.py.

Host (no GPU): the offset planner (alignment, no overlap, total) and the open/close logic against a
stand-in for CuPy's memory pool whose used bytes drop when the allocation is really released.
GPU: the real pool's used bytes return to the baseline after a normal exit and after an exception,
and the views are usable memory.
"""
import weakref

import numpy as np
import pytest

from llmpy.gpu.arena import Arena, ArenaPlan
from llmpy.testing import requires_gpu

SPECS = [("params", (124,), np.float32), ("grads", (3, 5), np.float16), ("ids", 7, np.int32),
         ("empty", (0, 4), np.float32), ("workspace", (1000,), np.uint8), ("last", (2, 2), np.float64)]


# -------------------------------------------------------------------------------------------------
# The planner


@pytest.mark.parametrize("alignment", [16, 256, 4096])
def test_plan_offsets_aligned_disjoint_and_total(alignment):
    plan = Arena.plan(SPECS, alignment=alignment)
    assert isinstance(plan, ArenaPlan) and [s.name for s in plan.slots] == [s[0] for s in SPECS]
    end = 0
    for slot, (_, shape, dtype) in zip(plan.slots, SPECS):
        assert slot.offset % alignment == 0
        assert slot.offset >= end  # in order, never overlapping the previous slot
        assert slot.nbytes == int(np.prod(shape)) * np.dtype(dtype).itemsize
        assert slot.offset - end < alignment  # no more padding than alignment needs
        end = slot.offset + slot.nbytes
    assert plan.nbytes % alignment == 0 and end <= plan.nbytes < end + alignment


def test_plan_exact_offsets():
    plan = Arena.plan([("a", (3,), np.float32), ("b", (100,), np.uint8), ("c", (1,), np.float64)])
    assert [(s.offset, s.nbytes) for s in plan.slots] == [(0, 12), (256, 100), (512, 8)]
    assert plan.nbytes == 768 and plan["b"].shape == (100,) and plan["c"].dtype == np.float64


def test_plan_bf16_dtype():
    import ml_dtypes
    plan = Arena.plan([("w", (8, 8), ml_dtypes.bfloat16)])
    assert plan["w"].nbytes == 128 and plan["w"].dtype.name == "bfloat16"


@pytest.mark.parametrize("specs,alignment,needle", [
    ([("a", (1,), np.float32), ("a", (2,), np.float32)], 256, "duplicate"),
    ([("", (1,), np.float32)], 256, "non-empty"),
    ([("a", (-1,), np.float32)], 256, "invalid shape"),
    ([("a", (1.5,), np.float32)], 256, "invalid shape"),
    ([("a", (1,), np.float32)], 100, "power of two"),
    ([("a", (1,), np.float32)], 8, ">= 16"),
])
def test_plan_rejects_bad_specs(specs, alignment, needle):
    with pytest.raises(ValueError, match=needle):
        Arena.plan(specs, alignment=alignment)


# -------------------------------------------------------------------------------------------------
# Open/close against a stand-in pool (CuPy arrays over made-up addresses; nothing is dereferenced)


class _Owner:
    """Owns one fake allocation: the pool's used bytes drop when the last view releases it."""


class FakePool:
    BASE = 0x7F0000000000

    def __init__(self):
        self.used, self.free_calls, self.mallocs = 4096, 0, []  # 4096: someone else's allocation

    def used_bytes(self):
        return self.used

    def malloc(self, nbytes):
        import cupy as cp
        owner = _Owner()
        self.used += nbytes
        weakref.finalize(owner, self._release, nbytes)
        self.mallocs.append(nbytes)
        return cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(self.BASE, nbytes, owner, 0), 0)

    def _release(self, nbytes):
        self.used -= nbytes

    def free_all_blocks(self, stream=None):
        self.free_calls += 1


@pytest.fixture
def pool(monkeypatch):
    cp = pytest.importorskip("cupy")
    fake = FakePool()
    monkeypatch.setattr(cp, "get_default_memory_pool", lambda: fake)
    return fake


def test_views_and_release(pool):
    arena = Arena(SPECS)
    with arena as a:
        assert a is arena and pool.mallocs == [arena.nbytes] and pool.used == 4096 + arena.nbytes
        for slot in arena.layout.slots:
            view = a[slot.name]
            assert view.shape == slot.shape and view.dtype == slot.dtype and view.flags.c_contiguous
            assert view.data.ptr == FakePool.BASE + slot.offset
        del view  # a view kept past the block would keep the memory (see the warning test)
    assert arena.views == {} and pool.used == 4096 and pool.free_calls == 1
    with pytest.raises(KeyError, match="closed"):
        arena["params"]


def test_release_after_exception(pool):
    arena = Arena(SPECS)
    with pytest.raises(ZeroDivisionError):
        with arena:
            arena["grads"]
            1 / 0
    assert arena.views == {} and pool.used == 4096 and pool.free_calls == 1
    with arena:  # reusable after close
        pass
    assert pool.used == 4096


def test_view_outliving_the_arena_warns(pool):
    arena = Arena(SPECS)
    with pytest.warns(RuntimeWarning, match="still in use"):
        with arena:
            kept = arena["params"]
    assert pool.used > 4096
    del kept
    assert pool.used == 4096


def test_double_open_is_an_error(pool):
    with Arena(SPECS) as arena:
        with pytest.raises(RuntimeError, match="already open"):
            arena.open()


# -------------------------------------------------------------------------------------------------
# GPU


@requires_gpu
def test_gpu_pool_returns_to_baseline():
    import cupy as cp
    pool = cp.get_default_memory_pool()
    cp.cuda.Device().synchronize()
    baseline = pool.used_bytes()
    specs = [("x", (1000, 37), np.float32), ("y", (513,), np.int32), ("ws", (32 << 20,), np.uint8)]
    arena = Arena(specs)
    with arena:
        assert pool.used_bytes() >= baseline + arena.nbytes
        x = arena["x"]
        x[...] = 3.0
        arena.zero("y")
        assert float(x.sum()) == 3.0 * x.size and int(arena["y"].sum()) == 0
        assert all(arena[name].data.ptr % 256 == 0 for name, _, _ in specs)
        del x
    assert pool.used_bytes() == baseline

    with pytest.raises(RuntimeError, match="boom"):
        with arena:
            arena.zero_all()
            raise RuntimeError("boom")
    assert pool.used_bytes() == baseline
