"""The collective-communication interface of data-parallel training, and its one-process case.

Buffers are the backend's arrays (NumPy for MpiComm, CuPy for NcclComm), contiguous, and every
operation works in place with NCCL's in-place layout, so one shard layout serves every backend:

    all_reduce(buf, op)      every rank gets op over the ranks of buf ('sum' or 'avg')
    reduce_scatter(buf, op)  buf holds size chunks of buf.size // size elements; rank r gets the
                             reduction of chunk r, in place at buf[r*k:(r+1)*k] (other chunks: undefined)
    all_gather(buf)          the inverse: chunk r of rank r lands in chunk r of every rank
    sum_host(x)              a Python float summed over the ranks (llm.c's multi_gpu_cpu_float_sum)
    barrier()                every rank waits for the others
    group()                  a context that batches the collectives inside it (NCCL group calls)
    abort(message)           print one line naming the rank and end every process of the job

SingleProcess implements them as no-ops, so the training loop calls them unconditionally and a
one-process run pays nothing (llm.c: "Multi-GPU support is disabled" runs as rank 0 of 1).
"""
from __future__ import annotations

import contextlib
import os
import sys

from llmpy.errors import LlmpyError

OPS = ("sum", "avg")


class RankAgreedError(LlmpyError):
    """An error that every rank raises at the same point from the same inputs (a bad flag, a checkpoint
    written by another number of processes): rank 0 reports it, and every rank exits without aborting."""

    def __init__(self, message: str, *, rank: int = 0):
        super().__init__(message)
        self.quiet = rank != 0   # the CLI prints only rank 0's copy


class Communicator:
    """What every backend provides; see the module docstring for the semantics."""

    name = "single"
    rank, size, local_rank = 0, 1, 0

    def all_reduce(self, buf, *, op: str = "avg") -> None:
        raise NotImplementedError

    def reduce_scatter(self, buf, *, op: str = "avg") -> None:
        raise NotImplementedError

    def all_gather(self, buf) -> None:
        raise NotImplementedError

    def sum_host(self, x: float) -> float:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def group(self):
        return contextlib.nullcontext()

    def close(self) -> None:
        """Release the communicator (idempotent)."""

    def mean_host(self, x: float) -> float:
        """x averaged over the ranks (the loss, the validation loss)."""
        return self.sum_host(x) / self.size

    def describe(self) -> str:
        return f"{self.name}: rank {self.rank} of {self.size} (local rank {self.local_rank})"

    def agree(self, fn, *args):
        """fn(*args) on every rank, for a step with no collective inside (loading and checking the model):
        when it raises LlmpyError on any rank, every rank raises one RankAgreedError instead, so the job
        ends with rank 0's line and no abort (when only some ranks failed, each of them prints its own
        line first)."""
        try:
            result, problem = fn(*args), None
        except RankAgreedError:
            raise
        except LlmpyError as e:
            result, problem = None, str(e)
        failed = self.sum_host(1.0 if problem else 0.0)
        if failed > 0:
            if problem and self.rank > 0 and failed < self.size:   # not all alike: this rank says its own
                print(f"llmpy train: rank {self.rank}: {problem}", file=sys.stderr, flush=True)
            raise RankAgreedError(problem or "failed on another rank (its line is above)", rank=self.rank)
        return result

    def abort(self, message: str, code: int = 1):
        """Report `message` for this rank and end the whole job (a rank that fails must not leave the
        others waiting in a collective). The base version exits this process only."""
        print(message, file=sys.stderr, flush=True)
        os._exit(code)

    def fail(self, exc: BaseException) -> None:
        """Called by the trainer with the exception that is ending this rank. One process: nothing (the
        CLI reports it). Several: an error every rank agrees on is left to the CLI (rank 0 prints it);
        anything else ends every rank now, with one line naming this rank."""
        if self.size == 1 or isinstance(exc, RankAgreedError):
            return
        what = str(exc) if isinstance(exc, LlmpyError) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, (LlmpyError, KeyboardInterrupt)):
            import traceback
            traceback.print_exception(exc, file=sys.stderr)
        self.abort(f"llmpy train: error on rank {self.rank} of {self.size}: {what.splitlines()[0] if what else ''}"
                   f"; ending all {self.size} processes")

    def check_op(self, op: str) -> None:
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")

    def chunk(self, buf) -> int:
        """Elements per rank of a reduce-scatter / all-gather buffer."""
        if buf.size % self.size:
            raise ValueError(f"buffer of {buf.size} elements does not split into {self.size} equal chunks")
        return buf.size // self.size


class SingleProcess(Communicator):
    """World size 1: every collective is the identity, at no cost."""

    def all_reduce(self, buf, *, op: str = "avg") -> None:
        pass

    def reduce_scatter(self, buf, *, op: str = "avg") -> None:
        pass

    def all_gather(self, buf) -> None:
        pass

    def sum_host(self, x: float) -> float:
        return float(x)

    def barrier(self) -> None:
        pass
