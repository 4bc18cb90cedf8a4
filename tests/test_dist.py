"""Data-parallel training (llmpy/dist): llm.c's multi-GPU design on the CPU over MPI, checked the way CI can.

References: NumPy for the collectives; a one-process run with the whole global batch for the
multi-process trainer (llm.c's data offsets make the rows identical, so losses agree to float
rounding); the uninterrupted run for kill-and-resume. Multi-process cases run `mpiexec -n N` (MPICH
from the `dist` extra) in a subprocess with a timeout, so a hang fails the test instead of the suite.
"""
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from llmpy.dist.comm import RankAgreedError, SingleProcess
from llmpy.dist.zero import DataParallel, shard_layout
from llmpy.errors import LlmpyError
from llmpy.model import GPTConfig, num_parameters, param_shapes
from llmpy.testing import requires_gpu

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
TINY = GPTConfig(max_seq_len=64, vocab_size=50257, padded_vocab_size=50304, num_layers=2, num_heads=2, channels=32)
TIMEOUT = 180      # seconds for one mpiexec job: far above the few seconds they take, far below CI's limit


def mpiexec():
    """The venv's mpiexec (the MPICH wheel of the `dist` extra), or skip."""
    pytest.importorskip("mpi4py")
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(exe):
        exe = shutil.which("mpiexec")
    if exe is None:
        pytest.skip("no mpiexec (install the dist extra: pip install -e .[dist])")
    return exe


def run(argv, cwd, n=None, timeout=TIMEOUT):
    """argv (after `python`) in a subprocess, under `mpiexec -n n` when n is given."""
    # MPIEXEC_TIMEOUT: MPICH's launcher ends every rank itself if the job outlives it (a hang)
    env = dict(os.environ, PYTHONPATH=REPO, HYDRA_LAUNCHER="fork", MPIR_CVAR_CH4_PROGRESS_THROTTLE="1",
               MPIEXEC_TIMEOUT=str(int(timeout)))
    for var in ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"):   # a launcher of our own
        env.pop(var, None)
    cmd = [sys.executable, *argv] if n is None else [mpiexec(), "-n", str(n), sys.executable, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


# -------------------------------------------------------------------------------------------------
# The shard layout (no processes)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_shards_cover_every_slice_once_in_llmc_order(world):
    shapes = param_shapes(TINY)
    layouts = [shard_layout(shapes, r, world) for r in range(world)]
    for r, layout in enumerate(layouts):
        assert [s.name for s in layout] == list(shapes)
        assert sum(s.layers * s.piece for s in layout) == num_parameters(TINY) // world
        offset = 0
        for s in layout:                      # tensor-major, then layer, then the rank's piece (llm.c)
            assert s.offset == offset and s.piece * world == s.size and s.lo == r * s.piece
            assert s.layers == (1 if s.name in ("wte", "wpe", "lnfw", "lnfb") else TINY.num_layers)
            offset += s.layers * s.piece
    for name in shapes:                       # the ranks' pieces tile each slice exactly
        pieces = sorted((layout[i].lo, layout[i].hi) for layout in layouts
                        for i in [list(shapes).index(name)])
        assert pieces[0][0] == 0 and all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
        assert pieces[-1][1] == layouts[0][list(shapes).index(name)].size


@pytest.mark.parametrize("world", [1, 2, 4])
def test_muon_shards_own_whole_layers_round_robin(world):
    """Tensors sharded by layer (Muon's): rank r holds layers r, r + N, ... whole, every layer on exactly
    one rank; the other tensors keep llm.c's piece of every layer; each rank's state is 1/N of the model."""
    from llmpy.nanochat import ADAMW_ONLY, MATRICES, NanoChatConfig
    from llmpy.nanochat import param_shapes as nanochat_shapes
    shapes = nanochat_shapes(NanoChatConfig(n_layer=4, n_head=2, n_kv_head=1, n_embd=64, vocab_size=128,
                                            sequence_len=32))
    layouts = [shard_layout(shapes, r, world, unstacked=ADAMW_ONLY, by_layer=MATRICES) for r in range(world)]
    total = sum(math.prod(s) for s in shapes.values())
    for r, layout in enumerate(layouts):
        by_name = {s.name: s for s in layout}
        assert sum(len(s.held) * s.piece for s in layout) == total // world
        for name in MATRICES:
            assert by_name[name].owned == tuple(range(r, 4, world)) and by_name[name].piece == by_name[name].size
        for name in ADAMW_ONLY:
            assert by_name[name].layers == 1 and not by_name[name].owned
    for name in MATRICES:
        assert sorted(l for layout in layouts for s in layout if s.name == name for l in s.held) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="tensor c_q: 4 layers of whole matrices .Muon. do not split over 3 ranks"):
        shard_layout({k: shapes[k] for k in MATRICES}, 0, 3, unstacked=ADAMW_ONLY, by_layer=MATRICES)


def test_shards_refuse_an_uneven_split():
    with pytest.raises(ValueError, match="tensor wpe: a slice of 2048 elements does not split over 3 ranks"):
        shard_layout(param_shapes(TINY), 0, 3)


def test_one_process_stage_1_is_the_stage_0_step():
    """ZeRO-1's sharded AdamW on one rank (the full pieces) gives the model's own update bit for bit."""
    import llmpy.cpu as cpu
    from llmpy.model import GPT
    from llmpy.rng import init_params
    cfg = GPTConfig(max_seq_len=16, vocab_size=60, padded_vocab_size=64, num_layers=2, num_heads=2, channels=16)
    params = np.empty(num_parameters(cfg), dtype=np.float32)
    init_params(cfg, params)
    tokens = np.random.default_rng(0).integers(0, 60, size=(2, 17)).astype(np.int32)
    results = []
    for stage in (0, 1):
        model = GPT(cfg, cpu, params=params)
        dp = DataParallel(model, SingleProcess(), stage, log=lambda *a: None)
        for t in (1, 2):
            model.zero_grad()
            model.forward_backward(tokens[:, :-1], tokens[:, 1:], 1.0 / 32)
            dp.reduce_gradients()
            norm = dp.grad_norm()
            dp.update(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, t=t, grad_scale=0.5)
        results.append((norm, model.params.copy(), dp.optimizer_state()))
    (n0, p0, s0), (n1, p1, s1) = results
    assert n1 == pytest.approx(n0, rel=1e-6)
    np.testing.assert_array_equal(p1, p0)
    np.testing.assert_array_equal(s1["m"], s0["m"])
    np.testing.assert_array_equal(s1["v"], s0["v"])


def test_only_several_ranks_on_an_engine_that_reports_layers_get_a_comm_stream(monkeypatch):
    """One process (or the CPU model, or overlap=False) makes no stream and no events: today's step at no
    cost. Two ranks on an engine whose backward reports its layers get one stream and two events."""
    import llmpy.dist.overlap as overlap
    made = []

    class Cuda:
        Stream = staticmethod(lambda non_blocking=False: made.append("stream"))
        Event = staticmethod(lambda disable_timing=False: made.append("event"))

    class TwoRanks(SingleProcess):
        size = 2

    class Engine:
        reduces_in_backward, config = True, TINY

    monkeypatch.setattr(overlap, "cuda_module", lambda: Cuda)
    quiet = dict(log=lambda *a: None)
    assert DataParallel(Engine(), SingleProcess(), 0, **quiet).reducer is None
    assert DataParallel(Engine(), TwoRanks(), 0, overlap=False, **quiet).reducer is None
    assert DataParallel(type("CpuModel", (), {})(), TwoRanks(), 0, **quiet).reducer is None
    assert made == []
    assert DataParallel(Engine(), TwoRanks(), 0, **quiet).reducer is not None
    assert made == ["stream", "event", "event"]


# -------------------------------------------------------------------------------------------------
# Bootstrap: flags, and the id exchange of each init method


def test_process_flags_are_checked_before_anything_starts():
    from llmpy.dist.init import init_processes
    from llmpy.train import TrainConfig
    quiet = dict(log=lambda *a: None)
    assert isinstance(init_processes(TrainConfig(), "cpu", **quiet), SingleProcess)   # no launcher: no MPI
    with pytest.raises(LlmpyError, match=r"-pn 2 with -pi mpi: start the processes with `mpiexec -n 2"):
        init_processes(TrainConfig(num_processes=2), "cpu", **quiet)
    with pytest.raises(LlmpyError, match="-pi tcp needs -ps/--server-addr"):
        init_processes(TrainConfig(init_method="tcp", num_processes=2, process_rank=1), "cuda", **quiet)
    with pytest.raises(LlmpyError, match="-pr/--process-rank 2: need"):
        init_processes(TrainConfig(init_method="fs", num_processes=2, process_rank=2, fs_path="x"), "cpu", **quiet)
    with pytest.raises(RankAgreedError, match="the CPU backend's collectives run over MPI"):
        init_processes(TrainConfig(init_method="fs", num_processes=2, process_rank=1, fs_path="x"), "cpu", **quiet)


EXCHANGE = """
import sys
from llmpy.dist import init
method, rank, n, where = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
uid = bytes(range(7, 135)) if rank == 0 else None          # rank 0's 128-byte id
if method == "tcp":
    got = init.exchange_tcp(uid, rank, n, where, timeout=60)
else:
    got = init.exchange_fs(uid, rank, n, where, "run42", timeout=60)
print(got.hex())
"""


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", ["tcp", "fs"])
def test_id_exchange_reaches_every_rank(method, tmp_path):
    """Three plain processes (as a scheduler starts them, no MPI); clients first, so they must wait.
    fs: a stale id file of another run key is never read, and the run leaves no files behind."""
    n = 3
    where = f"127.0.0.1:{_free_port()}" if method == "tcp" else str(tmp_path / "ids")
    if method == "fs":
        os.makedirs(where)
        (tmp_path / "ids" / "llmpy_nccl_id.run41.sync").write_bytes(bytes(128))   # an old run's id
    env = dict(os.environ, PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, "-c", EXCHANGE, method, str(r), str(n), where], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (2, 1, 0)]
    outs = [p.communicate(timeout=90) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert [out.strip() for out, _ in outs] == [bytes(range(7, 135)).hex()] * n
    if method == "fs":
        assert sorted(os.listdir(where)) == ["llmpy_nccl_id.run41.sync"]


def test_tcp_exchange_gives_up_with_a_message():
    from llmpy.dist.init import exchange_tcp
    with pytest.raises(LlmpyError, match=r"-pi tcp: ranks \[1\] did not connect to 127.0.0.1:\d+ within 1 s"):
        exchange_tcp(bytes(128), 0, 2, f"127.0.0.1:{_free_port()}", timeout=1)
    with pytest.raises(LlmpyError, match=r"-pi tcp: rank 1 could not reach rank 0"):
        exchange_tcp(None, 1, 2, f"127.0.0.1:{_free_port()}", timeout=0.5)


def test_mpi_collectives_and_bootstrap_on_two_ranks(tmp_path):
    r = run([os.path.join(TESTS, "dist_worker.py"), "collectives"], tmp_path, n=2)
    assert r.returncode == 0 and "ok0" in r.stdout and "ok1" in r.stdout, r.stderr
    r = run([os.path.join(TESTS, "dist_worker.py"), "bootstrap"], tmp_path, n=2)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"name": "mpi", "rank": k, "size": 2, "local": k} for k in (0, 1)]


def test_a_failing_rank_ends_the_job(tmp_path):
    r = run([os.path.join(TESTS, "dist_worker.py"), "fail_on_rank_1"], tmp_path, n=2, timeout=60)
    assert r.returncode != 0 and "passed the barrier" not in r.stdout
    assert ("llmpy train: error on rank 1 of 2: state_00000004_00001.bin: truncated; ending all 2 processes"
            in r.stderr), r.stderr


def test_a_step_that_fails_on_any_rank_fails_on_every_rank_with_one_line(tmp_path):
    """Communicator.agree (the model load and its flag checks): all ranks failing alike leave rank 0's
    line only; one rank failing says its own line and every rank ends, none hangs or aborts."""
    r = run([os.path.join(TESTS, "dist_worker.py"), "agree"], tmp_path, n=2, timeout=60)
    assert r.returncode == 0, r.stderr
    seen = [json.loads(line) for line in r.stdout.splitlines()]
    by_rank = {s["none"] - 10: s for s in seen}
    assert sorted(by_rank) == [0, 1]
    assert by_rank[0]["all"] == ["-e model_0.bin: no such file", False]
    assert by_rank[1]["all"] == ["-e model_1.bin: no such file", True]
    assert by_rank[0]["rank1"] == ["failed on another rank (its line is above)", False]
    assert by_rank[1]["rank1"] == ["-e model_1.bin: no such file", True]
    assert r.stderr.count("llmpy train: rank 1: -e model_1.bin: no such file") == 1, r.stderr


# -------------------------------------------------------------------------------------------------
# The trainer on two processes: `mpiexec -n 2 python -m llmpy train --device cpu ...`


@pytest.fixture
def data(tmp_path):
    """test_train.py's tiny model file and token shards (three train shards, shuffled by the trainer)."""
    import test_train
    train, val = test_train.shards.__wrapped__(tmp_path)
    return test_train.write_tiny_model(tmp_path / "tiny.bin"), train, val


def train_flags(data, out, B, steps, *extra):
    model, train, val = data
    return ["-e", model, "-i", train, "-j", val, "-b", str(B), "-t", "32", "-x", str(steps), "-v", "3", "-m", "2",
            "-s", "0", "-l", "3e-3", "-u", "2", "-q", "0.1", "-c", "0.1", "-o", str(out), *extra]


def train_args(data, out, B, steps, *extra):
    """python's argv for `python -m llmpy train --device cpu` with train_flags."""
    return ["-m", "llmpy", "train", "--device", "cpu", *train_flags(data, out, B, steps, *extra)]


def logged(out, split="train"):
    import test_train
    return test_train.logged(out, split)


def final_params(out, step):
    from llmpy.checkpoint import load_model, model_path
    return load_model(model_path(str(out), step))[1]


@pytest.mark.parametrize("stage,B,extra", [(0, 2, []), (1, 2, []), (1, 1, ["-d", "128"])],
                         ids=["z0", "z1", "z1-accum2"])
def test_two_processes_match_one_process_with_the_whole_batch(stage, B, extra, data, tmp_path):
    """2 ranks x B rows read the rows of 1 rank x 2B (llm.c's offsets, one shuffle seed), also with two
    micro-steps per step: the same losses step for step (validation included) and the same final
    parameters, up to float rounding."""
    from llmpy.cli import main
    assert main(train_args(data, tmp_path / "one", 2 * B, 6, "-n", "6", *extra)[2:]) == 0
    r = run(train_args(data, tmp_path / "two", B, 6, "-n", "6", "-z", str(stage), *extra), tmp_path, n=2)
    assert r.returncode == 0, r.stderr
    assert f"data parallel: 2 processes (mpi), ZeRO stage {stage}" in r.stdout
    assert r.stdout.count("step    1/6") == 1, "rank 1 must not log"
    for split in ("train", "val"):
        one, two = logged(tmp_path / "one", split), logged(tmp_path / "two", split)
        assert [s for s, _ in two] == [s for s, _ in one] and len(one) == (6 if split == "train" else 3)
        np.testing.assert_allclose([x for _, x in two], [x for _, x in one], atol=1e-5, rtol=0)
    np.testing.assert_allclose(final_params(tmp_path / "two", 6), final_params(tmp_path / "one", 6), atol=1e-5, rtol=0)
    assert sorted(p for p in os.listdir(tmp_path / "two") if p.startswith("state_")) == \
        ["state_00000006_00000.bin", "state_00000006_00001.bin"]


@pytest.mark.parametrize("optimizer,stage", [("muon", 0), ("muon", 1), ("adamw", 1)])
def test_nanochat_on_two_processes_matches_one_process(optimizer, stage, data, tmp_path):
    """The second model family through the same communicator: a nanochat model on 2 ranks x B=2 logs the
    losses of 1 rank x B=4 and ends on the same weights. Under -z 1 AdamW's tensors shard a piece of
    every layer per rank, Muon's block matrices whole layers per rank (layer l on rank l % 2: two runs
    of two layers), and each rank's state file holds half of m and v. The state header records -z and
    --optimizer, and -y 1 with the other optimizer is one line."""
    from llmpy import checkpoint, families
    from llmpy.cli import main
    from llmpy.nanochat import NanoChatConfig, init_params, num_parameters
    cfg = NanoChatConfig(n_layer=4, n_head=2, n_kv_head=1, n_embd=32, vocab_size=2048, sequence_len=64)
    start = str(tmp_path / "start")
    families.save_model_dir(start, cfg, init_params(cfg))
    model_data = (start,) + data[1:]
    flags = ("--optimizer", optimizer, "--muon-lr", "0.05", "-n", "6")
    assert main(train_args(model_data, tmp_path / "one", 4, 6, *flags)[2:]) == 0
    r = run(train_args(model_data, tmp_path / "two", 2, 6, *flags, "-z", str(stage)), tmp_path, n=2)
    assert r.returncode == 0, r.stderr
    assert f"data parallel: 2 processes (mpi), ZeRO stage {stage}" in r.stdout
    for split in ("train", "val"):
        one, two = logged(tmp_path / "one", split), logged(tmp_path / "two", split)
        assert [s for s, _ in two] == [s for s, _ in one] and len(one) == (6 if split == "train" else 3)
        np.testing.assert_allclose([x for _, x in two], [x for _, x in one], atol=1e-5, rtol=0)
    weights = [families.load_model_dir(str(tmp_path / d / "model_00000006"))[1] for d in ("one", "two")]
    np.testing.assert_allclose(weights[1], weights[0], atol=1e-5, rtol=0)
    assert not np.array_equal(weights[0], init_params(cfg))
    n = num_parameters(cfg) // (2 if stage == 1 else 1)
    for rank in (0, 1):
        path = checkpoint.state_path(str(tmp_path / "two"), 6, rank)
        state = checkpoint.load_state(path, num_parameters=n)
        assert state["m"].size == n and np.abs(state["m"]).max() > 0
        header = np.fromfile(path, dtype="<i4", count=256)      # llmpy's slots: stage + 1, optimizer + 1
        assert (header[6], header[7]) == (stage + 1, checkpoint.OPTIMIZERS.index(optimizer) + 1)
    other = "adamw" if optimizer == "muon" else "muon"              # -y 1 with the other optimizer: one line
    r = run(train_args(model_data, tmp_path / "two", 2, 6, *flags, "-z", str(stage), "--optimizer", other, "-y", "1"),
            tmp_path, n=2)
    assert r.returncode != 0 and r.stderr.strip() == (
        f"llmpy train: error: --optimizer {other}: the checkpoint's optimizer state was written by {optimizer}; "
        f"resume with --optimizer {optimizer}"), r.stderr
    if (optimizer, stage) == ("muon", 1):   # 3 layers do not go whole to 2 ranks: one line, -o untouched
        odd, three = str(tmp_path / "odd"), dataclasses.replace(cfg, n_layer=3)
        families.save_model_dir(odd, three, init_params(three))
        r = run(train_args((odd,) + data[1:], tmp_path / "three", 2, 6, *flags, "-z", "1"), tmp_path, n=2)
        assert r.returncode != 0 and r.stderr.strip() == (
            "llmpy train: error: -z 1 over 2 processes: tensor c_q: 3 layers of whole matrices (Muon) do not split "
            "over 2 ranks; use -z 0 or another process count"), r.stderr
        assert not (tmp_path / "three").exists()


def test_two_processes_resume_exactly_after_a_kill(data, tmp_path):
    """ZeRO-1 on 2 ranks, a checkpoint every 4 steps: the job is killed after step 4's checkpoint, `-y 1`
    replays steps 4..7 with the uninterrupted run's losses and writes the same model. Then `-y 1` on 3
    processes, or with -z 0, is one line naming both counts (both stages), and when one rank's newest state
    file is bad every rank falls back to the previous checkpoint (the rank names its file) and the run ends
    on the same model."""
    import signal
    import time
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    r = run(train_args(data, whole, 2, 8, "-n", "4", "-z", "1"), tmp_path, n=2)
    assert r.returncode == 0, r.stderr
    expected = logged(whole)

    env = dict(os.environ, PYTHONPATH=REPO, HYDRA_LAUNCHER="fork")
    argv = train_args(data, killed, 2, 8, "-n", "4", "-z", "1")
    job = subprocess.Popen([mpiexec(), "-n", "2", sys.executable, *argv], cwd=tmp_path, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    while not (killed / "DONE_00000004").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    for name in ("DONE_00000008", "model_00000008.bin"):   # had the job been faster than the kill
        if (killed / name).exists():
            (killed / name).unlink()
    assert {"state_00000004_00000.bin", "state_00000004_00001.bin", "model_00000004.bin"} <= set(os.listdir(killed))

    r = run(train_args(data, killed, 2, 8, "-n", "4", "-z", "1", "-y", "1"), tmp_path, n=2)
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout and "model_00000004.bin" in r.stdout
    rows = logged(killed)
    resumed = rows[max(i for i, (s, _) in enumerate(rows) if s == 4):]
    assert resumed == expected[4:], f"{resumed} != {expected[4:]}"
    assert (killed / "model_00000008.bin").read_bytes() == (whole / "model_00000008.bin").read_bytes()

    r = run(train_args(data, whole, 2, 8, "-n", "4", "-z", "1", "-y", "1"), tmp_path, n=3)
    assert r.returncode != 0
    assert r.stderr.strip() == (f"llmpy train: error: -y 1: the checkpoint at step 8 in {whole} was written by 2 "
                                "processes, this run has 3; resume with 2 (mpiexec -n 2 or -pn 2)")
    r = run(train_args(data, whole, 2, 8, "-n", "4", "-z", "0", "-y", "1"), tmp_path, n=2)
    assert r.returncode != 0                                # ZeRO-1's half-size state files under -z 0
    assert r.stderr.strip() == (f"llmpy train: error: -y 1: the checkpoint at step 8 in {whole} was written with "
                                "-z 1, this run has -z 0; resume with -z 1 (-z/--zero-stage)")

    state = killed / "state_00000008_00001.bin"
    state.write_bytes(state.read_bytes()[:-4])              # rank 1's file is cut short
    r = run(train_args(data, killed, 2, 8, "-n", "4", "-z", "1", "-y", "1"), tmp_path, n=2, timeout=60)
    assert r.returncode == 0, r.stderr                      # both ranks fall back to step 4 (issue 19)
    line = next(x for x in r.stderr.splitlines() if x.startswith("llmpy train:"))
    assert line.startswith(f"llmpy train: rank 1: -y 1: skipping the checkpoint of step 8: {state}: ") and \
        line.endswith("truncated or corrupt"), r.stderr
    assert "skipping the checkpoint of step 8: damaged on another rank" in r.stdout
    assert "model_00000004.bin (step 4)" in r.stdout
    assert (killed / "model_00000008.bin").read_bytes() == (whole / "model_00000008.bin").read_bytes()


# -------------------------------------------------------------------------------------------------
# The GPU engine on two ranks: the kernel emulator with NCCL replaced by tests/emu_nccl.py


@pytest.fixture
def small_vocab_data(tmp_path):
    """A d2-sized model with a 250-token vocabulary (the emulator's classifier stays cheap) and shards."""
    from llmpy.checkpoint import save_model
    from llmpy.data import write_shard
    from llmpy.rng import init_params
    cfg = GPTConfig(max_seq_len=64, vocab_size=250, padded_vocab_size=256, num_layers=2, num_heads=2, channels=32)
    flat = np.empty(num_parameters(cfg), dtype=np.float32)
    init_params(cfg, flat)
    save_model(str(tmp_path / "small.bin"), cfg, flat)
    pattern = np.random.default_rng(0).integers(0, 250, size=97)
    for i, n in enumerate((1500, 1200)):
        write_shard(str(tmp_path / f"train_{i:02d}.bin"), np.resize(np.roll(pattern, 5 * i), n).astype(np.uint16))
    write_shard(str(tmp_path / "val_00.bin"), np.resize(pattern, 800).astype(np.uint16))
    return str(tmp_path / "small.bin"), str(tmp_path / "train_*.bin"), str(tmp_path / "val_00.bin")


@pytest.mark.slow
def test_emulated_gpu_engine_on_two_ranks_with_zero_1(emulator_library, small_vocab_data, tmp_path):
    """`llmpy train --device cuda` (bf16, master weights, CUDA graphs on) with -z 1 on 2 ranks x B=2 against
    the 1-rank engine with B=4. The 2-rank run reduces bf16 gradients twice and rounds other pieces with
    other noise, so it is held to the bf16 error budget: its distance from the 1-rank run is at most
    twice the 1-rank bf16 run's own distance from the fp32 CPU trainer (losses, val losses, parameters).
    After every update both ranks hold the same bf16 parameters, bit for bit."""
    worker = [os.path.join(TESTS, "dist_worker.py"), "emulated_gpu_train", str(emulator_library)]
    for out, n, B, extra in (("one", None, 4, []), ("two", 2, 2, ["-z", "1", "-lg", "4"])):
        flags = train_flags(small_vocab_data, tmp_path / out, B, 4, "-n", "4", "-v", "2", *extra)
        r = run(worker + flags, tmp_path, n=n, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "data parallel: 2 processes (nccl), ZeRO stage 1; optimizer state" in r.stdout
    assert "; ZeRO-1 optimizer state 0.2 MiB on this rank (saves 0.2 MiB)" in r.stdout    # memory_report
    assert "adam_m" not in r.stdout and "master" not in r.stdout.split("memory: arena")[1].split(";")[0]
    calls = {(c, dt, op): k for c, dt, op, k in json.load(open(tmp_path / "two" / "nccl_calls.json"))}
    per_step = 2 * 12 + 4                  # 12 per-layer tensors x 2 layers + wte, wpe, lnfw, lnfb
    assert calls == {("reduceScatter", "bfloat16", 4): 4 * per_step, ("allGather", "bfloat16", None): 4 * per_step,
                     ("allReduce", "float32", 0): 18}, calls   # host sums: 4 x (loss, norm), 3 val, 1 barrier,
    # at each of the 5 step boundaries the ranks agree whether a signal asks them to stop (llmpy.rundir),
    # and once whether every rank loaded the model (Communicator.agree)
    replicas = [json.load(open(tmp_path / "two" / f"params_rank{r}.json")) for r in (0, 1)]
    assert len(replicas[0]) == 4 and replicas[0] == replicas[1], "the ranks' bf16 parameters differ"
    from llmpy.cli import main
    assert main(train_args(small_vocab_data, tmp_path / "cpu", 4, 4, "-n", "4", "-v", "2")[2:]) == 0
    for split in ("train", "val"):
        cpu, one, two = (np.array([x for _, x in logged(tmp_path / d, split)]) for d in ("cpu", "one", "two"))
        assert len(two) == len(one) == len(cpu) > 0
        assert np.abs(two - one).max() <= 2 * np.abs(one - cpu).max() + 1e-6, (split, one, two, cpu)
    cpu, one, two = (final_params(tmp_path / d, 4) for d in ("cpu", "one", "two"))
    assert np.abs(two - one).max() <= 2 * np.abs(one - cpu).max()


@pytest.mark.slow
def test_emulated_nanochat_engine_on_two_ranks_with_zero_1_and_muon(emulator_library, small_vocab_data, tmp_path):
    """The nanochat GPU engine (bf16, master weights, Muon) on 2 emulated ranks with ZeRO-1: no m, v or
    master in the arena, Muon's block matrices updated whole on the rank owning their layer (one
    reduce-scatter and one all-gather per tensor for the 2 layers), the replicas bit-identical after
    every update, and the run within the bf16 budget of the 1-rank engine (as the GPT-2 twin above)."""
    from llmpy import families
    from llmpy.cli import main
    from llmpy.nanochat import NanoChatConfig, init_params
    cfg = NanoChatConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, vocab_size=250, sequence_len=64)
    start = str(tmp_path / "start")
    families.save_model_dir(start, cfg, init_params(cfg))
    model_data = (start,) + small_vocab_data[1:]
    muon = ("--optimizer", "muon", "--muon-lr", "0.05", "-n", "4", "-v", "2")
    worker = [os.path.join(TESTS, "dist_worker.py"), "emulated_gpu_train", str(emulator_library)]
    for out, n, B, extra in (("one", None, 4, []), ("two", 2, 2, ["-z", "1", "-lg", "4"])):
        r = run(worker + train_flags(model_data, tmp_path / out, B, 4, *muon, *extra), tmp_path, n=n, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "data parallel: 2 processes (nccl), ZeRO stage 1; optimizer state" in r.stdout
    assert "adam_m" not in r.stdout and "master" not in r.stdout.split("memory: arena")[1].split(";")[0]
    calls = {(c, dt, op): k for c, dt, op, k in json.load(open(tmp_path / "two" / "nccl_calls.json"))}
    per_step = 2 + 6     # wte and lm_head: one slice each; the 6 Muon stacks: one run of 2 layers each
    assert calls[("reduceScatter", "bfloat16", 4)] == calls[("allGather", "bfloat16", None)] == 4 * per_step, calls
    replicas = [json.load(open(tmp_path / "two" / f"params_rank{r}.json")) for r in (0, 1)]
    assert len(replicas[0]) == 4 and replicas[0] == replicas[1], "the ranks' bf16 parameters differ"
    assert main(train_args(model_data, tmp_path / "cpu", 4, 4, *muon)[2:]) == 0
    # budget: twice the 1-rank engine's distance from fp32, or 1e-4 relative (bf16's unit roundoff is 4e-3):
    # the per-layer Muon launches of ZeRO-1 round stochastically with other slice indices than one batched launch
    for split in ("train", "val"):
        cpu, one, two = (np.array([x for _, x in logged(tmp_path / d, split)]) for d in ("cpu", "one", "two"))
        assert len(two) == len(one) == len(cpu) > 0
        budget = max(2 * np.abs(one - cpu).max(), 1e-4 * np.abs(one).max())
        assert np.abs(two - one).max() <= budget, (split, one, two, cpu)
    cpu, one, two = (families.load_model_dir(str(tmp_path / d / "model_00000004"))[1] for d in ("cpu", "one", "two"))
    assert np.abs(two - one).max() <= 2 * np.abs(one - cpu).max()


@pytest.mark.slow
def test_emulated_overlap_reduces_each_layer_during_backward_bit_identically(emulator_library, tmp_path):
    """llmpy/dist/overlap.py on the emulated engine, 2 ranks, 3 steps of 2 micro-steps: with ZeRO 0 and 1,
    CUDA graphs off and on (the last micro-step then a graph of its own, forking the comm stream into the
    capture), the overlapped reduction gives the same reduced gradients, grad norms and parameters, bit
    for bit, as the reduction after the whole backward, and the ranks agree. The NCCL calls of the last
    micro-step come in L + 1 runs between the kernels: 12 per layer, top layer first, as soon as the
    layer's backward is done, then wte, wpe, lnfw, lnfb after the encoder backward (without overlap: one
    run after the backward)."""
    worker = [os.path.join(TESTS, "dist_worker.py"), "emulated_overlap", str(emulator_library), str(tmp_path)]
    r = run(worker, tmp_path, n=2, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"overlap_rank{rank}.json")) for rank in (0, 1)]
    res = ranks[0]
    for name, other in ranks[1].items():   # ZeRO-1 leaves the other ranks' chunks of the gradients unreduced
        same = (lambda t: t) if name.startswith("z0") else (lambda t: t[1:])   # noqa: E731
        assert [same(t) for t in other["trace"]] == [same(t) for t in res[name]["trace"]], name
        assert other["runs"] == res[name]["runs"], name
    for zero, collective, whole in ((0, "allReduce", 1), (1, "reduceScatter", 2 * 12 + 4)):
        for graph in (0, 1):
            plain, overlapped = res[f"z{zero} graph{graph} overlap0"], res[f"z{zero} graph{graph} overlap1"]
            assert plain["runs"] == [[collective, whole]], plain["runs"]
            assert overlapped["runs"] == [[collective, 12], [collective, 12], [collective, 4]], overlapped["runs"]
            steps = [t for t in overlapped["trace"] if isinstance(t[0], str)]
            assert len(steps) == 3 and overlapped["trace"][:3] == plain["trace"][:3], (zero, graph)
            assert len({p for _, _, p in steps}) == 3            # the parameters did move
            if graph:   # the last micro-step: eager (warm-up), captured, replayed; the graph stayed on
                assert overlapped["trace"][3] == [1, 2, None] and plain["trace"][3] == [1, 5, None]


def test_hellaswag_split_over_two_ranks_counts_every_example_once(data, tmp_path):
    """-h 1: 9 examples over 2 ranks (5 + 4): the same correct count as one process with the whole batch."""
    from llmpy.hellaswag import Example, write_eval_file
    rng = np.random.default_rng(3)
    examples = [Example.make(i, int(rng.integers(4)), rng.integers(0, 2000, size=int(rng.integers(3, 12))),
                             [rng.integers(0, 2000, size=int(rng.integers(1, 6))) for _ in range(4)])
                for i in range(9)]
    write_eval_file(str(tmp_path / "data" / "hellaswag" / "hellaswag_val.bin"), examples)
    r1 = run(train_args(data, tmp_path / "one", 8, 1, "-h", "1"), tmp_path)
    r2 = run(train_args(data, tmp_path / "two", 4, 1, "-h", "1"), tmp_path, n=2)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    one = [line for line in r1.stdout.splitlines() if line.startswith("HellaSwag:")]
    two = [line for line in r2.stdout.splitlines() if line.startswith("HellaSwag:")]
    assert len(one) == len(two) == 1 and two[0] == one[0] + " (2 ranks)" and "/9 = " in one[0]


# -------------------------------------------------------------------------------------------------
# Real NCCL, one rank (the GPU machines available to tests have one GPU each)


@requires_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nccl_one_rank_collectives(dtype):
    import cupy as cp
    import ml_dtypes

    from llmpy.dist.nccl import NcclComm
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    comm = NcclComm(NcclComm.unique_id(), 0, 1)
    try:
        host = np.random.default_rng(0).normal(size=1000).astype(dt)
        for op in ("all_reduce", "reduce_scatter", "all_gather"):
            buf = cp.empty(host.shape, dtype=dt)
            buf.view(np.uint8).set(host.view(np.uint8))          # raw bytes: CuPy's bf16 support is partial
            if op == "all_gather":
                comm.all_gather(buf)
            else:
                getattr(comm, op)(buf, op="avg")
            cp.cuda.Device().synchronize()
            assert buf.view(np.uint8).get().tobytes() == host.tobytes(), op   # one rank: the identity
        assert comm.sum_host(2.5) == 2.5
        comm.barrier()
    finally:
        comm.close()


@requires_gpu
def test_nccl_one_rank_trainer_matches_the_single_process_engine(small_vocab_data, tmp_path, monkeypatch):
    """`llmpy train --device cuda` through a 1-rank NcclComm: -z 0 gives the single-process run's losses
    exactly (NCCL's average over one rank is the identity), -z 1 (sharded update, NCCL reduce-scatter and
    all-gather) stays within bf16 rounding of it."""
    import llmpy.dist.init
    from llmpy.cli import main
    from llmpy.dist.nccl import NcclComm
    assert main(["train", "--device", "cuda", *train_flags(small_vocab_data, tmp_path / "single", 4, 4)]) == 0
    monkeypatch.setattr(llmpy.dist.init, "init_processes",
                        lambda cfg, device, log=print: NcclComm(NcclComm.unique_id(), 0, 1))
    for stage in (0, 1):
        flags = train_flags(small_vocab_data, tmp_path / f"nccl{stage}", 4, 4, "-z", str(stage))
        assert main(["train", "--device", "cuda", *flags]) == 0
    single, z0, z1 = (logged(tmp_path / d) for d in ("single", "nccl0", "nccl1"))
    assert z0 == single
    np.testing.assert_allclose([x for _, x in z1], [x for _, x in single], atol=0.05)


def test_bench_dist_quick_times_one_and_two_ranks(tmp_path):
    mpiexec()
    bench = os.path.join(REPO, "scripts", "bench_dist.py")
    r = run([bench, "--quick", "--zero", "1", "--out", str(tmp_path)], tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "bench_dist_cpu.json").read_text())
    assert [(row["ranks"], row["zero"]) for row in rows] == [(1, 1), (2, 1)]
    one, two = rows
    assert one["comm_ms"] < 0.1 * one["ms"] and 0 < two["comm_ms"] < two["ms"] and one["speedup"] == 1.0
    assert two["tok_per_s"] == pytest.approx(2 * 2 * 32 / (two["ms"] / 1e3))   # 2 ranks x B=2 x T=32 per step
