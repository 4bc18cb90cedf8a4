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




def agree():
    """Communicator.agree: a result on every rank when nothing fails; one RankAgreedError on every rank
    when any rank's step raises (quiet on ranks > 0), with rank 0 carrying its own or a pointer."""
    from llmpy.dist.comm import RankAgreedError
    from llmpy.dist.mpi import MpiComm
    from llmpy.errors import LlmpyError
    comm = MpiComm()
    r = comm.rank

    def step(failing):
        if r in failing:
            raise LlmpyError(f"-e model_{r}.bin: no such file")
        return 10 + r

    seen = {"none": comm.agree(step, ())}
    for case, failing in (("all", (0, 1)), ("rank1", (1,))):
        try:
            comm.agree(step, failing)
            seen[case] = "no error"
        except RankAgreedError as e:
            seen[case] = [str(e), e.quiet]
    comm.barrier()
    os.write(1, (json.dumps(seen) + "\n").encode())   # one write: the ranks' lines do not interleave


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
        mp.setattr(emu_nccl, "emulator", emu)
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


def nccl_runs(launches: list) -> list:
    """[collective, how many in a row] for each run of consecutive NCCL calls among the kernels."""
    runs, previous = [], None
    for name in launches:
        if name.startswith("nccl."):
            if previous is not None and previous.startswith("nccl."):
                runs[-1][1] += 1
            else:
                runs.append([name[5:], 1])
        previous = name
    return runs


def emulated_overlap(library, out):
    """The emulated GPU engine (bf16, master weights) stepped through DataParallel on this rank, for
    ZeRO 0 and 1, graphs off and on, each with the gradient reduction overlapped with the last backward
    and without: 3 steps of 2 micro-steps (eager, capture, replay). Writes, per configuration, the
    SHA-1 of the reduced gradients, the grad norm and the parameters after each step, and the runs of
    NCCL calls among the kernels of the last step's last micro-step and reduce_gradients."""
    import hashlib

    import pytest
    from mpi4py import MPI

    import cuda_emu
    import emu_nccl
    import llmpy.gpu
    from llmpy.dist.nccl import NcclComm
    from llmpy.dist.zero import DataParallel
    from llmpy.gpu.engine import GPUGPT
    from llmpy.model import GPTConfig, num_parameters
    from llmpy.rng import init_params
    emu, rank = cuda_emu.Emulator(library), MPI.COMM_WORLD.Get_rank()
    cfg = GPTConfig(max_seq_len=16, vocab_size=250, padded_vocab_size=256, num_layers=2, num_heads=2, channels=32)
    params = np.empty(num_parameters(cfg), dtype=np.float32)
    init_params(cfg, params)
    B, T, accum = 2, 16, 2
    data = np.random.default_rng(100 + rank).integers(0, 250, size=(3, accum, 2, B, T))
    sha = lambda a: hashlib.sha1(emu.to_host(a).tobytes()).hexdigest()   # noqa: E731
    results = {}
    with pytest.MonkeyPatch.context() as mp, emu.installed(mp):
        mp.setattr(emu_nccl, "emulator", emu)
        comm = NcclComm(bytes(128), rank, 2, nccl=emu_nccl)
        for zero in (0, 1):
            for graph in (False, True):
                for overlap in (False, True):
                    trace = []
                    with GPUGPT(cfg, llmpy.gpu, params=params, batch_size=B, seq_len=T, cuda_graph=graph,
                                optimizer_state=zero != 1, log=lambda *a: None) as model:
                        dp = DataParallel(model, comm, zero, overlap=overlap, log=lambda *a: None)
                        assert (dp.reducer is not None) == overlap
                        for step in range(3):
                            model.zero_grad()
                            for micro in range(accum):
                                if micro == accum - 1:
                                    emu.launches.clear()
                                inp, tgt = data[step, micro]
                                dp.forward_backward(inp, tgt, 1.0 / (B * T * accum), seed=7 * step + micro,
                                                    last=micro == accum - 1)
                            dp.reduce_gradients()
                            runs = nccl_runs(emu.launches)
                            norm = dp.grad_norm()
                            grads = sha(model.grads)
                            dp.update(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, t=step + 1,
                                      seeds=list(range(100 * step, 100 * step + 16)))
                            trace.append([grads, norm, sha(model.params)])
                        if graph:
                            g = model.reduce_graph if overlap else model.graph
                            trace.append([g.captures, g.replays, model.reduce_graph.disabled])
                    results[f"z{zero} graph{int(graph)} overlap{int(overlap)}"] = {"trace": trace, "runs": runs}
        comm.close()
    with open(os.path.join(out, f"overlap_rank{rank}.json"), "w") as f:
        json.dump(results, f)
    print("ok")


if __name__ == "__main__":
    cases = {"collectives": collectives, "bootstrap": bootstrap, "fail_on_rank_1": fail_on_rank_1,
             "agree": agree,             "emulated_gpu_train": emulated_gpu_train, "emulated_overlap": emulated_overlap}
    cases[sys.argv[1]](*sys.argv[2:])
