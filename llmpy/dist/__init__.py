"""Data-parallel training over several processes: llm.c's multi-GPU design, in small modules.

    comm.py      the Communicator interface every backend implements, and SingleProcess (no-ops)
    mpi.py       MpiComm: collectives on NumPy buffers over MPI (mpi4py), for the CPU backend
    nccl.py      NcclComm: collectives on CuPy device buffers over NCCL (cupy.cuda.nccl), for the GPU
    init.py      the bootstrap: llm.c's -pn -pr -pg -pi -ps -pf flags, the NCCL id exchange (mpi, tcp, fs)
    zero.py      ZeRO stages 0 and 1: llm.c's per-tensor, per-layer shard layout, the sharded AdamW,
                 and DataParallel, the one object the training loop calls around the model
    overlap.py   the GPU engine's per-layer gradient reduction on a comm stream during the last backward

The training loop (llmpy/train.py) calls the same DataParallel methods whatever the world size; with
one process every collective is a no-op and the step is the single-process step.
"""
