"""An NCCL stand-in for the kernel emulator (tests/cuda_emu.py): the part of `cupy.cuda.nccl` that
llmpy/dist/nccl.py calls, run over MPI on the emulator's "device" memory, which is host memory.

With it, `mpiexec -n 2` runs the GPU engine's own NCCL call sequence on two CPU ranks in CI: NcclComm's
pointer arithmetic (NCCL's in-place reduce-scatter and all-gather offsets), its dtypes and ops, and
the order in which the engine issues them. Reductions are done in fp32 in rank order and rounded once
into the buffer's type (bf16 or fp32); avg multiplies the sum by 1/N. Group calls only bracket: every
collective runs when it is called, which gives the same result as NCCL's grouped launch. With
`emulator` set (a tests/cuda_emu.Emulator), each collective is device work in the emulator's queue: it
runs when issued, or is recorded while a CUDA graph captures (on the capturing stream or one forked
into the capture) and runs at every replay, as NCCL inside a graph does; each run appends
"nccl.<collective>" to the emulator's `launches`, between the kernels it ran after and before.
`calls` counts runs. Not modelled: concurrency between streams (the emulator runs work in issue
order), NCCL's own reduction order and bf16 arithmetic, timing.
"""
import collections
import ctypes

import ml_dtypes
import numpy as np

from llmpy.dist import nccl as real

DTYPES = {real.NCCL_FLOAT32: np.dtype(np.float32), real.NCCL_BFLOAT16: np.dtype(ml_dtypes.bfloat16)}
calls = collections.Counter()          # (collective, dtype name, op) -> count, for the tests
groups = 0
emulator = None                        # a cuda_emu.Emulator: collectives become device work in its queue


def get_unique_id() -> bytes:
    return bytes(128)


def groupStart():
    global groups
    groups += 1


def groupEnd():
    pass


def _host(ptr: int, count: int, dtype: np.dtype) -> np.ndarray:
    """The `count` elements at emulator address `ptr` as a writable NumPy array."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * (count * dtype.itemsize)).from_address(ptr)).view(dtype)


class NcclCommunicator:
    def __init__(self, ndev: int, uid: bytes, rank: int):
        from mpi4py import MPI
        self.world = MPI.COMM_WORLD
        if (self.world.Get_size(), self.world.Get_rank()) != (ndev, rank) or len(uid) != 128:
            raise RuntimeError(f"stand-in NCCL: rank {rank} of {ndev} under an MPI world of "
                               f"{self.world.Get_size()} (rank {self.world.Get_rank()})")
        self.n = ndev

    def _reduce(self, parts: np.ndarray, dtype: np.dtype, op: int) -> np.ndarray:
        total = parts.astype(np.float32).sum(axis=0, dtype=np.float32)
        if op == real.NCCL_AVG:
            total *= np.float32(1.0 / self.n)
        elif op != real.NCCL_SUM:
            raise ValueError(f"stand-in NCCL: op {op} not supported")
        return total.astype(dtype)

    def _exchange(self, mine: np.ndarray, rows: int, alltoall: bool) -> np.ndarray:
        out = np.empty((self.n, rows), dtype=mine.dtype)
        send, recv = np.ascontiguousarray(mine).view(np.uint8), out.view(np.uint8)
        (self.world.Alltoall if alltoall else self.world.Allgather)(send, recv)
        return out

    def _issue(self, key, work):
        def run():
            calls[key] += 1
            if emulator is not None:
                emulator.launches.append(f"nccl.{key[0]}")
            work()
        if emulator is None:
            run()
        else:
            emulator.enqueue(run)

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        dt = DTYPES[datatype]

        def work():
            parts = self._exchange(_host(sendbuf, count, dt).copy(), count, alltoall=False)
            _host(recvbuf, count, dt)[...] = self._reduce(parts, dt, op)
        self._issue(("allReduce", dt.name, op), work)

    def reduceScatter(self, sendbuf, recvbuf, recvcount, datatype, op, stream):
        dt = DTYPES[datatype]

        def work():
            parts = self._exchange(_host(sendbuf, recvcount * self.n, dt).copy(), recvcount, alltoall=True)
            _host(recvbuf, recvcount, dt)[...] = self._reduce(parts, dt, op)
        self._issue(("reduceScatter", dt.name, op), work)

    def allGather(self, sendbuf, recvbuf, sendcount, datatype, stream):
        dt = DTYPES[datatype]

        def work():
            parts = self._exchange(_host(sendbuf, sendcount, dt).copy(), sendcount, alltoall=False)
            _host(recvbuf, sendcount * self.n, dt)[...] = parts.reshape(-1)
        self._issue(("allGather", dt.name, None), work)

    def abort(self):
        pass

    def destroy(self):
        pass
