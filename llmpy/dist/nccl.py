"""NcclComm: the Communicator over NCCL on CuPy device buffers, for the GPU engine.

The binding is CuPy's own `cupy.cuda.nccl` (raw device pointers and a stream pointer, the style of
llmpy's kernel launchers; NCCL itself comes from the nvidia-nccl-cu12/-cu13 wheel of the cuda extras).
Every collective is in place with NCCL's documented in-place layout (reduce-scatter:
recv = send + rank * count; all-gather: send = recv + rank * count), on the current CuPy stream, so it
is ordered after the kernels (and graph replays) that produced the buffer. bf16 and fp32 buffers are
reduced in their own type with ncclSum or ncclAvg, as llm.c does (ncclFloatX). Host scalars go through
a one-float device buffer (llm.c's multi_gpu_cpu_float_sum, with a count of 1, not sizeof(float):
multi-gpu-facts.md §A6).

`nccl` (the module) can be replaced: tests/emu_nccl.py supplies one whose NcclCommunicator runs over
MPI on the kernel emulator's host memory, so CI runs this file's exact calls on two ranks.
"""
from __future__ import annotations

import contextlib

import numpy as np

from llmpy.dist.comm import Communicator

NCCL_SUM, NCCL_AVG = 0, 4                  # ncclRedOp_t
NCCL_FLOAT32, NCCL_BFLOAT16 = 7, 9         # ncclDataType_t


def cupy_nccl():
    from cupy.cuda import nccl
    return nccl


def nccl_dtype(dtype) -> int:
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return NCCL_FLOAT32
    if dtype.name == "bfloat16":
        return NCCL_BFLOAT16
    raise ValueError(f"NCCL collectives here take float32 or bfloat16 buffers, got {dtype}")


class NcclComm(Communicator):
    """NCCL collectives of `size` ranks on device buffers; `host` (an MpiComm) is kept to abort the job
    when the ranks were started by mpiexec."""

    name = "nccl"

    def __init__(self, uid: bytes, rank: int, size: int, *, local_rank: int = 0, host=None, nccl=None):
        import cupy as cp
        self.cp, self.nccl = cp, nccl if nccl is not None else cupy_nccl()
        self.rank, self.size, self.local_rank, self.host = rank, size, local_rank, host
        self.comm = self.nccl.NcclCommunicator(size, uid, rank)
        self.scalar = cp.zeros(1, dtype=np.float32)

    @staticmethod
    def use_device(index: int) -> None:
        """Make GPU `index` current (before NCCL's init, as llm.c's cudaSetDevice)."""
        import cupy as cp
        cp.cuda.Device(index).use()

    @staticmethod
    def unique_id() -> bytes:
        uid = cupy_nccl().get_unique_id()
        return bytes(uid) if isinstance(uid, (bytes, bytearray)) else bytes(b & 0xFF for b in uid)  # CuPy < 14: tuple

    def _stream(self) -> int:
        return self.cp.cuda.get_current_stream().ptr

    def _op(self, op: str) -> int:
        self.check_op(op)
        return NCCL_AVG if op == "avg" else NCCL_SUM

    def all_reduce(self, buf, *, op: str = "avg") -> None:
        ptr = buf.data.ptr
        self.comm.allReduce(ptr, ptr, buf.size, nccl_dtype(buf.dtype), self._op(op), self._stream())

    def reduce_scatter(self, buf, *, op: str = "avg") -> None:
        k, ptr = self.chunk(buf), buf.data.ptr
        self.comm.reduceScatter(ptr, ptr + self.rank * k * buf.itemsize, k, nccl_dtype(buf.dtype), self._op(op),
                                self._stream())

    def all_gather(self, buf) -> None:
        k, ptr = self.chunk(buf), buf.data.ptr
        self.comm.allGather(ptr + self.rank * k * buf.itemsize, ptr, k, nccl_dtype(buf.dtype), self._stream())

    def sum_host(self, x: float) -> float:
        self.scalar.fill(np.float32(x))
        self.all_reduce(self.scalar, op="sum")
        return float(self.scalar.get()[0])

    def barrier(self) -> None:
        self.sum_host(0.0)          # an all-reduce every rank must join, then read back (synchronises)

    @contextlib.contextmanager
    def group(self):
        self.nccl.groupStart()
        try:
            yield
        finally:
            self.nccl.groupEnd()

    def abort(self, message: str, code: int = 1):
        with contextlib.suppress(Exception):
            self.comm.abort()
        if self.host is not None:
            self.host.abort(message, code)
        super().abort(message, code)

    def close(self) -> None:
        if self.comm is not None:
            with contextlib.suppress(Exception):
                self.comm.destroy()
            self.comm = None
