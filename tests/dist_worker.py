"""Run by tests/test_dist.py as `mpiexec -n N python tests/dist_worker.py CASE [ARGS]`: one rank's half
of a multi-process test. Prints 'ok' (and JSON results) on success; any failure raises, which
ends the rank with a traceback and a non-zero status (MPICH then ends the job)."""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def collectives():
    """Every collective of MpiComm against NumPy on the inputs of all ranks (each rank can rebuild them)."""
    from llmpy.dist.mpi import MpiComm
    comm = MpiComm()
    r, n = comm.rank, comm.size
    inputs = [np.random.default_rng(100 + k).normal(size=6 * n).astype(np.float32) for k in range(n)]
    total = np.sum(inputs, axis=0, dtype=np.float32)
    for op, want in (("sum", total), ("avg", total * np.float32(1 / n))):
        buf = inputs[r].copy()
        comm.all_reduce(buf, op=op)
        np.testing.assert_allclose(buf, want, rtol=1e-6)
        buf = inputs[r].copy()
        comm.reduce_scatter(buf, op=op)            # NCCL's in-place layout: chunk r holds the result
        k = buf.size // n
        np.testing.assert_allclose(buf[r * k:(r + 1) * k], want[r * k:(r + 1) * k], rtol=1e-6)
        np.testing.assert_array_equal(np.delete(buf, np.s_[r * k:(r + 1) * k]),
                                      np.delete(inputs[r], np.s_[r * k:(r + 1) * k]))   # others untouched
    gathered = np.concatenate([inputs[k][k * 6:(k + 1) * 6] for k in range(n)])
    buf = inputs[r].copy()
    comm.all_gather(buf)
    np.testing.assert_array_equal(buf, gathered)
    assert comm.sum_host(r + 0.5) == sum(k + 0.5 for k in range(n))
    assert comm.mean_host(float(r)) == (n - 1) / 2
    assert comm.bcast_bytes(b"id-of-rank-0" if r == 0 else None) == b"id-of-rank-0"
    assert comm.local_rank == r                    # one host: local rank = rank
    comm.barrier()
    print(f"ok{r}", flush=True)


def bootstrap():
    """init_processes under mpiexec: -pi mpi gives an MpiComm of the launcher's size (CPU backend)."""
    from llmpy.dist.init import init_processes
    from llmpy.train import TrainConfig
    comm = init_processes(TrainConfig(), "cpu", log=lambda *a: None)
    seen = comm.world.gather({"name": comm.name, "rank": comm.rank, "size": comm.size, "local": comm.local_rank})
    if comm.rank == 0:                             # one line: the ranks' prints could interleave
        print(json.dumps(seen))


def fail_on_rank_1():
    """Rank 1 raises inside the trainer's error path while rank 0 waits in a collective: the job must end."""
    from llmpy.dist.mpi import MpiComm
    comm = MpiComm()
    try:
        if comm.rank == 1:
            from llmpy.errors import LlmpyError
            raise LlmpyError("state_00000004_00001.bin: truncated")
        comm.barrier()                             # would wait forever without the abort
    except BaseException as e:
        comm.fail(e)
        raise
    print("rank 0 passed the barrier: the failure did not end the job")




def emulated_gpu_train(library, *argv):
    """`llmpy train --device cuda ...` on the kernel emulator (library: its built .so), NCCL replaced by
    tests/emu_nccl.py. Under mpiexec the ranks meet over MPI and reduce over the stand-in; rank 0 writes
    the stand-in's call counts next to the run's log, and every rank a hash of its bf16 parameters after
    each update (params_rank<r>.json: the replicas must stay bit-identical)."""
    import hashlib

    import pytest

    import cuda_emu
    import emu_nccl
    import llmpy.dist.nccl
    from llmpy.cli import main
    from llmpy.dist.zero import DataParallel
    emu = cuda_emu.Emulator(library)
    hashes, update = [], DataParallel.update

    def update_and_hash(dp, **adamw):
        update(dp, **adamw)
        hashes.append(hashlib.sha1(emu.to_host(dp.model.params).tobytes()).hexdigest())

    with pytest.MonkeyPatch.context() as mp, emu.installed(mp):
        mp.setattr("llmpy.train.resolve_device", lambda requested: "cuda")
        mp.setattr(llmpy.dist.nccl, "cupy_nccl", lambda: emu_nccl)
        mp.setattr(llmpy.dist.nccl.NcclComm, "use_device", staticmethod(lambda index: None))
        mp.setattr(DataParallel, "update", update_and_hash)
        rc = main(["train", "--device", "cuda", *argv])
    out, rank = argv[argv.index("-o") + 1], os.environ.get("PMI_RANK", "0")
    if rc == 0:
        with open(os.path.join(out, f"params_rank{rank}.json"), "w") as f:
            json.dump(hashes, f)
    if rc == 0 and rank == "0":
        with open(os.path.join(out, "nccl_calls.json"), "w") as f:
            json.dump([[*k, v] for k, v in emu_nccl.calls.items()], f)
    sys.exit(rc)


if __name__ == "__main__":
    cases = {"collectives": collectives, "bootstrap": bootstrap, "fail_on_rank_1": fail_on_rank_1,
             "emulated_gpu_train": emulated_gpu_train}
    cases[sys.argv[1]](*sys.argv[2:])
