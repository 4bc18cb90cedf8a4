"""Starting the ranks: llm.c's process flags, and the exchange of NCCL's unique id.

llm.c's flags (TrainConfig fields, llmc-facts.md §10.2):
    -pi mpi|tcp|fs   how the ranks find each other (default mpi)
    -pn N  -pr R     number of processes and this one's rank (tcp and fs; MPI knows them itself)
    -pg G            GPUs per node: local GPU = rank % G (tcp and fs; MPI counts the ranks per host)
    -ps HOST[:PORT]  rank 0's address (tcp)           -pf DIR   a folder every rank sees (fs)

mpi: started by `mpiexec -n N` (MPICH, Open MPI, Slurm's srun with PMI); rank and size come from MPI.
Without a launcher (or with one process) the run is SingleProcess and MPI is not even imported.
tcp and fs only bootstrap NCCL, so they are for the GPU engine; the CPU backend's collectives are MPI.

What llm.c does that we do not (multi-gpu-facts.md §A6):
  - its TCP port is fixed (12345): here -ps takes HOST:PORT (12345 when omitted), and the server
    waits for every rank (each sends its rank; duplicates and strangers are refused) with a time limit
    instead of the clients' five tries;
  - its fs file `ncclUniqueId.sync` is never deleted, so the next run can read a stale id: here the
    file name carries a run key (SLURM_JOB_ID, or LLMPY_RUN_ID), is written atomically (no half-read
    id), and rank 0 deletes it once every rank has acknowledged it (and a leftover of its own key on
    start);
  - both wait forever: here a rank gives up after `timeout` seconds with a message naming the flag.
"""
from __future__ import annotations

import os
import socket
import struct
import time

from llmpy.dist.comm import Communicator, RankAgreedError, SingleProcess
from llmpy.errors import LlmpyError

ID_BYTES = 128                 # ncclUniqueId
DEFAULT_PORT = 12345           # llm.c's port, used when -ps gives none
EXCHANGE_TIMEOUT = 300.0       # seconds a rank waits for the others during the bootstrap
INIT_METHODS = ("mpi", "tcp", "fs")
# environment variables that say "started by an MPI launcher", with the world size
_LAUNCHER_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def launched_world_size() -> int:
    """The world size an MPI launcher announced in the environment (1 when there is none)."""
    for name in _LAUNCHER_SIZE:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def launched_rank() -> int:
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def check_flags(cfg) -> None:
    """The process flags on their own (before any rank talks to another)."""
    if cfg.init_method not in INIT_METHODS:
        raise LlmpyError(f"-pi/--init-method must be one of {', '.join(INIT_METHODS)}, got {cfg.init_method!r}")
    if cfg.num_processes < 1 or not 0 <= cfg.process_rank < cfg.num_processes:
        raise LlmpyError(f"-pn/--num-processes {cfg.num_processes} and -pr/--process-rank {cfg.process_rank}: "
                         "need N >= 1 and 0 <= rank < N")
    if cfg.gpus_per_node < 1:
        raise LlmpyError(f"-pg/--gpus-per-node must be >= 1, got {cfg.gpus_per_node}")
    if cfg.init_method == "tcp" and cfg.num_processes > 1 and not cfg.server_addr:
        raise LlmpyError("-pi tcp needs -ps/--server-addr HOST[:PORT], the address of rank 0")
    if cfg.init_method == "fs" and cfg.num_processes > 1 and not cfg.fs_path:
        raise LlmpyError("-pi fs needs -pf/--fs-path, a folder every rank can read and write")


def init_processes(cfg, device: str, *, log=print) -> Communicator:
    """The Communicator of this process for a TrainConfig's process flags on `device` ('cpu'/'cuda')."""
    check_flags(cfg)
    if cfg.init_method == "mpi":
        if cfg.num_processes > 1 and launched_world_size() == 1:
            raise LlmpyError(f"-pn {cfg.num_processes} with -pi mpi: start the processes with "
                             f"`mpiexec -n {cfg.num_processes} ...` (MPI sets the count), or use -pi tcp/fs")
        if launched_world_size() == 1:
            return SingleProcess()
        from llmpy.dist.mpi import MpiComm
        comm = MpiComm()
        if device == "cuda":
            from llmpy.dist.nccl import NcclComm
            NcclComm.use_device(comm.local_rank)
            uid = comm.bcast_bytes(NcclComm.unique_id() if comm.rank == 0 else None)
            comm = NcclComm(uid, comm.rank, comm.size, local_rank=comm.local_rank, host=comm)
        return comm
    # tcp / fs: the scheduler started the processes and told each its rank
    if cfg.num_processes == 1:
        return SingleProcess()
    if device != "cuda":
        raise RankAgreedError(f"-pi {cfg.init_method} bootstraps NCCL for the GPU engine; the CPU backend's "
                              "collectives run over MPI: launch with `mpiexec -n N` and -pi mpi",
                              rank=cfg.process_rank)
    from llmpy.dist.nccl import NcclComm
    rank, n = cfg.process_rank, cfg.num_processes
    local = rank % cfg.gpus_per_node
    NcclComm.use_device(local)
    uid = NcclComm.unique_id() if rank == 0 else None
    if cfg.init_method == "tcp":
        uid = exchange_tcp(uid, rank, n, cfg.server_addr)
    else:
        uid = exchange_fs(uid, rank, n, cfg.fs_path, run_key())
    log(f"nccl id exchanged over {cfg.init_method}")
    return NcclComm(uid, rank, n, local_rank=local)


# -------------------------------------------------------------------------------------------------
# The id exchanges (any bytes; tested with plain processes in tests/test_dist.py)


def parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":") if ":" in addr else (addr, "", "")
    if port and not port.isdigit():
        raise LlmpyError(f"-ps/--server-addr {addr!r}: expected HOST or HOST:PORT")
    return host, int(port) if port else DEFAULT_PORT


def _recv_exact(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise ConnectionError("peer closed the connection")
        data += part
    return data


def exchange_tcp(uid: bytes | None, rank: int, n: int, addr: str, *, timeout: float = EXCHANGE_TIMEOUT) -> bytes:
    """Rank 0 serves `uid` at addr to the n - 1 other ranks; they connect (retrying until `timeout`),
    send their rank, and receive it. Returns the id on every rank."""
    host, port = parse_addr(addr)
    deadline = time.monotonic() + timeout
    if rank == 0:
        if uid is None or len(uid) != ID_BYTES:
            raise ValueError("rank 0 needs the 128-byte id to serve")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                server.bind((host, port))
            except OSError as e:
                raise LlmpyError(f"-ps/--server-addr {addr}: rank 0 cannot listen there ({e.strerror or e}); "
                                 "pick another HOST:PORT") from None
            server.listen(n)
            waiting = set(range(1, n))
            while waiting:
                server.settimeout(max(deadline - time.monotonic(), 0.01))
                try:
                    conn, _ = server.accept()
                except socket.timeout:
                    raise LlmpyError(f"-pi tcp: ranks {sorted(waiting)} did not connect to {host}:{port} "
                                     f"within {timeout:.0f} s") from None
                with conn:
                    conn.settimeout(10.0)
                    try:
                        (peer,) = struct.unpack("<i", _recv_exact(conn, 4))
                    except (OSError, ConnectionError, struct.error):
                        continue                   # a stranger (a port scan, say): ignore it
                    if peer not in waiting:
                        continue                   # a duplicate or out-of-range rank is not served
                    conn.sendall(uid)
                    waiting.discard(peer)
        return uid
    while True:
        try:
            with socket.create_connection((host, port), timeout=10.0) as conn:
                conn.sendall(struct.pack("<i", rank))
                return _recv_exact(conn, ID_BYTES)
        except (OSError, ConnectionError):
            if time.monotonic() > deadline:
                raise LlmpyError(f"-pi tcp: rank {rank} could not reach rank 0 at {host}:{port} within "
                                 f"{timeout:.0f} s") from None
            time.sleep(0.2)


def run_key() -> str:
    """What names this run's id file: the Slurm job (and step), LLMPY_RUN_ID, or 'default'."""
    if os.environ.get("LLMPY_RUN_ID"):
        return os.environ["LLMPY_RUN_ID"]
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '0')}"
    return "default"


def exchange_fs(uid: bytes | None, rank: int, n: int, folder: str, key: str, *,
                timeout: float = EXCHANGE_TIMEOUT, poll: float = 0.05) -> bytes:
    """Rank 0 writes `uid` to <folder>/llmpy_nccl_id.<key>.sync atomically; the others wait for it,
    read it and leave an acknowledgement; rank 0 deletes the id and the acknowledgements once all n - 1
    have arrived. Returns the id on every rank."""
    from llmpy.data import atomic_write
    path = os.path.join(folder, f"llmpy_nccl_id.{key}.sync")
    ack = lambda r: f"{path}.ack{r}"  # noqa: E731
    deadline = time.monotonic() + timeout
    if rank == 0:
        if uid is None or len(uid) != ID_BYTES:
            raise ValueError("rank 0 needs the 128-byte id to write")
        try:
            os.makedirs(folder, exist_ok=True)
            for stale in [path] + [ack(r) for r in range(1, n)]:   # a crashed run of the same key
                if os.path.exists(stale):
                    os.remove(stale)
            atomic_write(path, [uid])
        except OSError as e:
            raise LlmpyError(f"-pf/--fs-path {folder}: cannot write the id file ({e.strerror or e})") from None
        while not all(os.path.exists(ack(r)) for r in range(1, n)):
            if time.monotonic() > deadline:
                missing = [r for r in range(1, n) if not os.path.exists(ack(r))]
                raise LlmpyError(f"-pi fs: ranks {missing} did not read {path} within {timeout:.0f} s")
            time.sleep(poll)
        for p in [path] + [ack(r) for r in range(1, n)]:
            os.remove(p)
        return uid
    while True:
        try:
            with open(path, "rb") as f:
                got = f.read()
            if len(got) == ID_BYTES:
                break
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise LlmpyError(f"-pi fs: rank {rank} found no id file {path} within {timeout:.0f} s "
                             "(is -pf a folder every rank shares?)")
        time.sleep(poll)
    atomic_write(ack(rank), [b""])
    return got
