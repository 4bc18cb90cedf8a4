"""MpiComm: the Communicator over MPI (mpi4py) on host NumPy buffers: the CPU backend's collectives.

Launch with `mpiexec -n N python -m llmpy train --device cpu ...`; the MPI comes from the `dist` extra
(mpi4py + the MPICH wheel), so no system MPI is needed. Averages are sums times 1/N in the buffer's
dtype, so with two ranks (a + b) / 2 is exact and independent of the order of the ranks.
Host scalars (losses, squared norms) are summed as Python floats in rank order.
"""
from __future__ import annotations

import numpy as np

from llmpy.dist.comm import Communicator
from llmpy.errors import LlmpyError


def import_mpi():
    """mpi4py's MPI module (initialising MPI), or a clear error naming the extra that provides it."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise LlmpyError(f"-pi mpi needs mpi4py and an MPI library ({e}); install them with "
                         "`pip install -e .[dist]` (mpi4py + the MPICH wheel)") from None
    return MPI


class MpiComm(Communicator):
    """Collectives of MPI_COMM_WORLD (or `comm`) on NumPy arrays; see llmpy/dist/comm.py."""

    name = "mpi"

    def __init__(self, comm=None, *, local_rank: int | None = None):
        MPI = import_mpi()
        self.MPI = MPI
        self.world = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.world.Get_rank(), self.world.Get_size()
        self.local_rank = local_rank_by_host(self.world) if local_rank is None else local_rank

    def all_reduce(self, buf, *, op: str = "avg") -> None:
        self.check_op(op)
        self.world.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        if op == "avg":
            buf *= buf.dtype.type(1.0 / self.size)

    def reduce_scatter(self, buf, *, op: str = "avg") -> None:
        # MPI's in-place reduce-scatter puts the result at the start of the buffer; NCCL's layout (and
        # the shard layout) wants it at chunk `rank`, so receive into a temporary and copy it there
        self.check_op(op)
        k = self.chunk(buf)
        mine = np.empty(k, dtype=buf.dtype)
        self.world.Reduce_scatter_block(buf, mine, op=self.MPI.SUM)
        if op == "avg":
            mine *= mine.dtype.type(1.0 / self.size)
        buf.reshape(-1)[self.rank * k:(self.rank + 1) * k] = mine

    def all_gather(self, buf) -> None:
        self.chunk(buf)
        self.world.Allgather(self.MPI.IN_PLACE, buf)

    def sum_host(self, x: float) -> float:
        return float(sum(self.world.allgather(float(x))))   # rank order: the same bits on every rank

    def barrier(self) -> None:
        self.world.Barrier()

    def bcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's bytes on every rank (the NCCL unique id under -pi mpi)."""
        return self.world.bcast(data, root=0)

    def abort(self, message: str, code: int = 1):
        import sys
        print(message, file=sys.stderr, flush=True)
        self.world.Abort(code)


def local_rank_by_host(world) -> int:
    """This rank's index among the ranks on the same machine (llm.c hashes host names and counts the
    lower ranks with the same hash; comparing the names themselves cannot collide)."""
    import socket
    host = socket.gethostname().split(".")[0]
    hosts = world.allgather(host)
    return sum(1 for h in hosts[:world.Get_rank()] if h == host)
