"""Runs that never lose or mix up work (llmpy/rundir.py and the trainer's set-up): one run per -o, run
identity and archiving, validation before anything in -o is written, non-finite values, SIGTERM/SIGINT
and kills mid-write, OS errors, and the end-of-run report.

The reference for every resume is an uninterrupted run of the same command: losses must match exactly.
Runs use test_train's tiny model (L=2, C=32) on its synthetic shards; most run in-process (cli.main),
the signal and kill tests in a subprocess, as a user or a scheduler would deliver them.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from llmpy import checkpoint as ck
from llmpy.cli import main
from llmpy.data import write_shard
from llmpy.rundir import OutputDir
from test_train import REPO, logged, shards, train_args, write_tiny_model  # noqa: F401  (shards: fixture)


@pytest.fixture
def tiny(tmp_path, shards, monkeypatch):   # noqa: F811
    """(model path, shards) with the working directory at tmp_path."""
    monkeypatch.chdir(tmp_path)
    return write_tiny_model(tmp_path / "tiny.bin"), shards


def run(args, capsys):
    """cli.main in-process: (exit code, stdout, stderr lines); argparse's own errors exit 2."""
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip().splitlines()


def train_losses(out):
    return [loss for _, loss in logged(out, "train")]


def listing(path):
    return sorted(os.listdir(path))


SLOW_STEPS = """
import sys, time
import llmpy.train as t
lr = t.learning_rate
t.learning_rate = lambda *a: (time.sleep(0.15), lr(*a))[1]   # slow steps, so a signal lands mid-run
from llmpy.cli import main
sys.exit(main(sys.argv[1:]))
"""

KILL_IN_STATE_WRITE = """
import os, signal, sys
import llmpy.data as d
fsync = os.fsync
def fsync_then_die(fd):   # the state file of step 4 is on disk as a temp file, not yet renamed
    if os.readlink(f"/proc/self/fd/{fd}").endswith("state_00000004_00000.bin.tmp" + str(os.getpid())):
        os.kill(os.getpid(), signal.SIGKILL)
    fsync(fd)
d.os.fsync = fsync_then_die
from llmpy.cli import main
sys.exit(main(sys.argv[1:]))
"""


def popen(code, args, cwd):
    """`python -c code train ...` with SIGINT at its default (a background shell may have it ignored)."""
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, "-u", "-c", code, *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


# -------------------------------------------------------------------------------------------------
# One run per output folder


def test_second_run_on_the_same_folder_is_refused_and_a_dead_holder_is_not(tiny, tmp_path, capsys):
    model, data = tiny
    out = tmp_path / "run"
    assert run(train_args(model, data, out, 2), capsys)[0] == 0
    before = (out / "main.log").read_bytes()
    holder = OutputDir(str(out))
    holder.lock()                                   # a live run holds the folder
    try:
        rc, _, err = run(train_args(model, data, out, 2), capsys)
    finally:
        holder.release()
    assert rc == 1 and len(err) == 1, err
    assert f"another run is using this folder (pid {os.getpid()} on " in err[0] and "-o" in err[0]
    assert (out / "main.log").read_bytes() == before and not (out / "previous").exists()

    # a holder killed with SIGKILL leaves run.lock behind, but its flock died with it
    code = f"from llmpy.rundir import OutputDir; OutputDir({str(out)!r}).lock(); import os; os.kill(os.getpid(), 9)"
    assert subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=REPO)).returncode == -9
    assert "pid" in (out / "run.lock").read_text()
    rc, stdout, err = run(train_args(model, data, out, 2), capsys)
    assert rc == 0, err


def test_fresh_run_moves_an_earlier_run_aside_and_resume_keeps_to_its_own_run(tiny, tmp_path, capsys):
    model, data = tiny
    out = tmp_path / "run"
    assert run(train_args(model, data, out, 4, "-n", "2"), capsys)[0] == 0
    first_id = json.loads((out / "run.json").read_text())["run_id"]
    first_files = {n: (out / n).read_bytes() for n in listing(out) if n not in ("run.lock",)}

    # a fresh run (no -y) into the same folder: the first run's files move, byte for byte, to previous/<id>/
    rc, stdout, _ = run(train_args(model, data, out, 3), capsys)
    assert rc == 0 and f"moved to {out / 'previous' / first_id}" in stdout
    archived = out / "previous" / first_id
    assert {n: (archived / n).read_bytes() for n in listing(archived)} == first_files
    assert [s for s, _ in logged(out, "train")] == [0, 1, 2]           # only the second run's lines
    assert ck.done_steps(str(out)) == []                               # the second run wrote no checkpoint

    # -y 1 resumes only this folder's run: it has no checkpoint, so it starts over (not from step 4)
    rc, stdout, _ = run(train_args(model, data, out, 3, "-y", "1"), capsys)
    assert rc == 0 and "no checkpoint in" in stdout and "resuming" not in stdout
    # ... and refuses other identity flags
    rc, _, err = run(train_args(model, data, out, 3, "-y", "1", "-b", "1"), capsys)
    assert rc == 1 and len(err) == 1 and "-b 2 there, 1 here" in err[0], err

    # llm.c's folders (checkpoints, no run.json) are adopted by -y 1
    llmc = tmp_path / "llmc"
    llmc.mkdir()
    for name in ("model_00000002.bin", "state_00000002_00000.bin"):
        (llmc / name).write_bytes((archived / name).read_bytes())
    (llmc / "DONE_00000002").write_bytes(b"")
    rc, stdout, _ = run(train_args(model, data, llmc, 4, "-y", "1"), capsys)
    assert rc == 0 and "adopting it" in stdout and "model_00000002.bin (step 2)" in stdout
    assert logged(llmc, "train") == [(s, loss) for s, loss in logged(archived, "train") if s >= 2]


def test_resume_falls_back_past_damaged_checkpoints(tiny, tmp_path, capsys):
    model, data = tiny
    out = tmp_path / "run"
    args = train_args(model, data, out, 6, "-n", "2")
    assert run(args, capsys)[0] == 0
    full = logged(out, "train")
    final = (out / "model_00000006.bin").read_bytes()
    with open(out / "model_00000006.bin", "r+b") as f:              # newest: truncated model
        f.truncate(5000)
    m = np.memmap(out / "state_00000004_00000.bin", dtype="<f4", mode="r+", offset=1024, shape=(10,))
    m[3] = np.nan                                                   # next: NaN in AdamW's m
    m.flush()
    del m
    rc, stdout, _ = run(args + ["-y", "1"], capsys)
    assert rc == 0
    assert "skipping the checkpoint of step 6" in stdout and "truncated" in stdout
    assert "skipping the checkpoint of step 4" in stdout and "non-finite" in stdout
    assert "model_00000002.bin (step 2)" in stdout
    assert logged(out, "train")[6:] == full[2:]
    assert (out / "model_00000006.bin").read_bytes() == final


# -------------------------------------------------------------------------------------------------
# Validation before anything in -o is written


@pytest.mark.parametrize("bad_id", [50300, 60000])   # inside the padded vocabulary (silent), and past it
def test_out_of_vocabulary_shard_is_refused_with_the_folder_untouched(tiny, tmp_path, capsys, bad_id):
    model, (train, val) = tiny
    out = tmp_path / "run"
    assert run(train_args(model, (train, val), out, 2), capsys)[0] == 0
    before = {n: (out / n).read_bytes() for n in listing(out)}
    tokens = np.fromfile(tmp_path / "val_00.bin", dtype="<u2", offset=1024)
    tokens[500] = bad_id
    write_shard(str(tmp_path / "bad_val.bin"), tokens)
    rc, stdout, err = run(train_args(model, (train, str(tmp_path / "bad_val.bin")), out, 2), capsys)
    assert rc == 1 and len(err) == 1, err
    assert "bad_val.bin: token id" in err[0] and f"{bad_id}" in err[0] and "vocabulary of 50257" in err[0]
    assert "model: L=" not in stdout                                     # reported before the model is built
    assert {n: (out / n).read_bytes() for n in listing(out)} == before    # main.log etc. byte for byte


def test_large_shard_sets_check_token_ids_as_each_shard_opens(tmp_path, monkeypatch):
    """Beyond DataLoader.UPFRONT_CHECK_TOKENS the ids of a shard are checked when it is first mapped."""
    from llmpy.data import DataLoader
    from llmpy.errors import LlmpyError
    write_shard(str(tmp_path / "s_0.bin"), np.arange(100) % 50)
    write_shard(str(tmp_path / "s_1.bin"), np.r_[np.arange(99) % 50, 70])
    with pytest.raises(LlmpyError, match="s_1.bin: token id 70 .first bad id at token 99. .* vocabulary of 64"):
        DataLoader(str(tmp_path / "s_*.bin"), 2, 8, vocab_size=64)
    monkeypatch.setattr(DataLoader, "UPFRONT_CHECK_TOKENS", 0)
    loader = DataLoader(str(tmp_path / "s_*.bin"), 2, 8, vocab_size=64)   # s_0 opened and checked
    for _ in range(6):                                                   # the 6 samples of s_0
        loader.next_batch()
    with pytest.raises(LlmpyError, match="s_1.bin: token id 70"):
        loader.next_batch()


def test_wrong_train_pattern_is_reported_before_the_model_is_built(tiny, tmp_path, capsys):
    model, data = tiny
    rc, stdout, err = run(train_args(model, ("nothing_*.bin", data[1]), tmp_path / "run", 2), capsys)
    assert rc == 1 and "nothing_*.bin" in err[0] and "model: L=" not in stdout
    assert not (tmp_path / "run").exists()


BAD_FLAGS = [
    ("-b", "0"), ("-b", "-2"), ("-t", "0"), ("-g", "0"), ("-l", "0"), ("-l", "-0.0003"), ("-l", "nan"), ("-l", "inf"),
    ("-c", "-0.1"), ("-c", "nan"), ("-q", "1.5"), ("-q", "-0.1"), ("-q", "nan"), ("-u", "-1"), ("-n", "-1"),
    ("-nk", "-1"), ("-nm", "-1"), ("-v", "-1"), ("-sl", "-1"), ("-sl", "nan"), ("-sg", "inf"), ("-x", "0"),
    ("-x", "-2"), ("-m", "0"), ("-m", "-3"), ("-d", "0"), ("-d", "-5"), ("-d", "100"), ("-lg", "0"),
    ("-y", "2"), ("-a", "2"), ("-f", "2"), ("-w", "-1"), ("-r", "3"), ("-ge", "3"), ("-z", "4"),
    ("--cuda-graph", "2"), ("--flash-attention", "5"), ("--seed", "0"), ("--seed", "-1"),
    ("--seed", str(2 ** 64)), ("-k", "step"), ("--device", "tpu"), ("--dtype", "fp16"), ("-x", "1.5"),
    ("-pn", "0"), ("-pr", "-1"), ("-pg", "0"), ("-pi", "ssh"),
]


@pytest.mark.parametrize("flag,value", BAD_FLAGS)
def test_every_numeric_flag_refuses_bad_values(tiny, tmp_path, capsys, flag, value):
    model, data = tiny
    args = train_args(model, data, tmp_path / "run", 2)
    args = [a for i, a in enumerate(args) if a != flag and (i == 0 or args[i - 1] != flag)] + [flag, value]
    rc, stdout, err = run(args, capsys)
    assert rc in (1, 2) and len(err) == 1, err
    assert flag in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "run").exists() and "model: L=" not in stdout


def test_help_lists_choices_and_dash_h_points_to_it(capsys):
    rc, _, err = run(["train", "-h"], capsys)
    assert rc == 2 and len(err) == 1 and "--help" in err[0] and "HellaSwag" in err[0]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "choices: cosine, linear, constant, wsd" in text and "choices: 0, 1;" in text
    assert "choices: auto, fp32, bf16" in text and "choices: 0, 1, 2, 3" in text


def test_val_split_is_found_beside_train_data_or_validation_is_said_off(tiny, tmp_path, capsys):
    model, (train, _) = tiny
    args = train_args(model, (train, ""), tmp_path / "a", 3)
    args.remove("-j")
    args.remove("")
    rc, stdout, _ = run(args, capsys)                                     # train_*.bin -> val_*.bin
    assert rc == 0 and f"val data: {tmp_path / 'val_*.bin'}" in stdout
    assert [s for s, _ in logged(tmp_path / "a", "val")] == [0, 3]
    os.rename(tmp_path / "val_00.bin", tmp_path / "elsewhere.bin")
    args[args.index("-o") + 1] = str(tmp_path / "b")
    rc, stdout, _ = run(args, capsys)
    assert rc == 0 and "validation off: no -j given and nothing matches" in stdout
    assert logged(tmp_path / "b", "val") == []


def test_z_scores_appear_only_once_they_exist(tiny, tmp_path, capsys):
    from llmpy.train import _z
    model, data = tiny
    rc, stdout, _ = run(train_args(model, data, tmp_path / "run", 3), capsys)
    steps = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert rc == 0 and len(steps) == 3 and not any("z)" in line or "nan" in line for line in steps)
    assert steps[0].startswith("step    1/3 | loss ") and "| norm " in steps[0]
    assert _z(1.234) == " (+1.23z)" and _z(float("nan")) == " "


# -------------------------------------------------------------------------------------------------
# Non-finite values


def test_nan_model_file_is_refused_by_train_and_sample(tiny, tmp_path, capsys):
    model, data = tiny
    raw = bytearray(open(model, "rb").read())
    raw[1024 + 4 * 77:1024 + 4 * 78] = np.float32(np.inf).tobytes()
    raw[1024 + 4 * 99:1024 + 4 * 100] = np.float32(np.nan).tobytes()
    bad = tmp_path / "nan.bin"
    bad.write_bytes(bytes(raw))
    rc, _, err = run(train_args(str(bad), data, tmp_path / "run", 2), capsys)
    assert rc == 1 and len(err) == 1 and str(bad) in err[0] and "2 non-finite values" in err[0], err
    assert not (tmp_path / "run").exists()
    rc, _, err = run(["sample", "-e", str(bad), "-n", "2", "--device", "cpu"], capsys)
    assert rc == 1 and str(bad) in err[-1] and "non-finite" in err[-1]


def test_diverging_run_stops_before_a_nan_is_checkpointed(tiny, tmp_path, capsys):
    model, data = tiny
    out = tmp_path / "run"
    rc, stdout, err = run(train_args(model, data, out, 8, "-n", "1", "-l", "1e30", "-u", "0"), capsys)
    assert rc == 1 and len(err) == 1 and "stopped before updating the model" in err[0], err
    assert ("loss is nan" in err[0] or "loss is inf" in err[0] or "gradient norm is" in err[0])
    for step in ck.done_steps(str(out)):                                 # whatever was written is finite
        ck.load_model(ck.model_path(str(out), step))
        ck.load_state(ck.state_path(str(out), step), num_parameters=ck.num_parameters(ck.read_model_header(
            ck.model_path(str(out), step))[0]))


def test_checkpoint_writer_refuses_non_finite_values(tmp_path):
    from test_checkpoint import SMALL, ckpt_state, params
    p = params()
    p[5] = np.nan
    with pytest.raises(Exception, match="1 non-finite values"):
        ck.write_checkpoint(str(tmp_path / "o"), 3, SMALL, p, **ckpt_state(master=False))
    kw = ckpt_state(master=False)
    kw["v"][0] = np.inf
    with pytest.raises(Exception, match="in v"):
        ck.write_checkpoint(str(tmp_path / "o"), 3, SMALL, params(), **kw)
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------------------------------------------
# Signals and kills


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_checkpoints_and_resumes_exactly(tiny, tmp_path, sig):
    model, data = tiny
    ref = tmp_path / "ref"
    args = train_args(model, data, ref, 12, "-n", "5")
    r = subprocess.run([sys.executable, "-c", SLOW_STEPS.replace("0.15", "0"), *args], cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "run"
    args[args.index("-o") + 1] = str(out)
    p = popen(SLOW_STEPS, args, tmp_path)
    for line in p.stdout:                       # wait for the third step, then signal
        if line.startswith("step    3/12"):
            p.send_signal(sig)
            break
    t0 = time.time()
    stdout, stderr = p.communicate(timeout=60)
    assert time.time() - t0 < 30
    assert p.returncode == 128 + sig, stderr
    err = stderr.strip().splitlines()
    name = signal.Signals(sig).name
    assert len(err) == 1 and f"stopped by {name} at step" in err[0] and "-y 1" in err[0], stderr
    step = int(err[0].split(" at step ")[1].split(";")[0])
    assert 3 <= step < 12 and ck.done_steps(str(out))[0] == step
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    r = subprocess.run([sys.executable, "-c", SLOW_STEPS.replace("0.15", "0"), *args, "-y", "1"], cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert logged(out, "train") == logged(ref, "train")   # no step lost or repeated, every loss exact
    assert (out / "model_00000012.bin").read_bytes() == (ref / "model_00000012.bin").read_bytes()


def test_sigterm_during_a_checkpoint_write_finishes_it_then_stops(tiny, tmp_path, capsys, monkeypatch):
    model, data = tiny
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert run(train_args(model, data, ref, 6, "-n", "4"), capsys)[0] == 0
    save_state = ck.save_state

    def save_state_signalled(path, **kw):      # SIGTERM arrives between the model and the state file
        if kw["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return save_state(path, **kw)
    monkeypatch.setattr(ck, "save_state", save_state_signalled)
    rc, stdout, err = run(train_args(model, data, out, 6, "-n", "2"), capsys)
    assert rc == 143 and len(err) == 1 and "stopped by SIGTERM at step 2" in err[0], err
    assert ck.done_steps(str(out)) == [2] and not [n for n in os.listdir(out) if ".tmp" in n]
    monkeypatch.setattr(ck, "save_state", save_state)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL      # handlers are restored
    rc, _, err = run(train_args(model, data, out, 6, "-n", "4", "-y", "1"), capsys)
    assert rc == 0, err
    assert train_losses(out) == train_losses(ref)


def test_kill_during_a_state_write_leaves_a_temp_file_that_the_resume_removes(tiny, tmp_path, capsys):
    model, data = tiny
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert run(train_args(model, data, ref, 6, "-n", "2"), capsys)[0] == 0
    args = train_args(model, data, out, 6, "-n", "2")
    p = popen(KILL_IN_STATE_WRITE, args, tmp_path)
    p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL
    leftovers = [n for n in os.listdir(out) if ".tmp" in n]
    assert len(leftovers) == 1 and leftovers[0].startswith("state_00000004_00000.bin.tmp")
    assert ck.done_steps(str(out)) == [2]
    rc, stdout, _ = run(args + ["-y", "1"], capsys)
    assert rc == 0 and "removed 1 unfinished file(s)" in stdout and leftovers[0] in stdout
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    assert logged(out, "train")[4:] == logged(ref, "train")[2:]           # replayed exactly from step 2
    assert (out / "model_00000006.bin").read_bytes() == (ref / "model_00000006.bin").read_bytes()


# -------------------------------------------------------------------------------------------------
# OS errors: one line naming the path


def test_disk_full_during_a_checkpoint_is_one_line_and_leaves_no_temp_file(tiny, tmp_path, capsys, monkeypatch):
    import llmpy.data
    model, data = tiny
    out = tmp_path / "run"
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, b):
            self.written += len(memoryview(b).cast("B"))
            if self.written > 100_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def open_full(path, *a, **kw):
        f = real_open(path, *a, **kw)
        return Full(f) if "state_00000004" in str(path) else f
    monkeypatch.setattr(llmpy.data, "open", open_full, raising=False)
    rc, _, err = run(train_args(model, data, out, 6, "-n", "2"), capsys)
    assert rc == 1 and len(err) == 1, err
    assert f"{out / 'state_00000004_00000.bin'}: cannot write (No space left on device)" in err[0]
    assert ck.done_steps(str(out)) == [2] and not [n for n in os.listdir(out) if ".tmp" in n]


def test_log_on_a_full_device_is_one_line(tiny, tmp_path, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    model, data = tiny
    out = tmp_path / "run"
    out.mkdir()
    os.symlink("/dev/full", out / "main.log")          # the kernel's own ENOSPC on every write
    rc, _, err = run(train_args(model, data, out, 2, "-y", "1"), capsys)
    assert rc == 1 and len(err) == 1 and f"{out / 'main.log'}: No space left on device" in err[0], err


def test_output_folder_that_is_a_file_or_read_only(tiny, tmp_path, capsys, monkeypatch):
    model, data = tiny
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    rc, _, err = run(train_args(model, data, afile, 2), capsys)
    assert rc == 1 and len(err) == 1 and f"-o {afile}: exists and is not a directory" in err[0]
    rc, _, err = run(train_args(model, data, afile / "sub", 2), capsys)
    assert rc == 1 and len(err) == 1 and f"{afile} is a file" in err[0]
    assert afile.read_text() == "keep me"

    real = os.open
    def read_only(path, flags, *a, **kw):              # root ignores chmod, so EROFS is simulated
        if str(path).endswith("run.lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real(path, flags, *a, **kw)
    monkeypatch.setattr(os, "open", read_only)
    rc, _, err = run(train_args(model, data, tmp_path / "ro", 2), capsys)
    assert rc == 1 and len(err) == 1 and "ro/run.lock: Read-only file system; choose a writable -o" in err[0], err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_for_real(tiny, tmp_path, capsys):
    model, data = tiny
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, _, err = run(train_args(model, data, ro, 2), capsys)
    finally:
        ro.chmod(0o755)
    assert rc == 1 and len(err) == 1 and f"{ro / 'run.lock'}: Permission denied" in err[0], err


# -------------------------------------------------------------------------------------------------
# What a run leaves


def test_a_run_keeps_model_logs_and_loss_curve_and_says_what_next(tiny, tmp_path, capsys):
    model, data = tiny
    out = tmp_path / "run"
    rc, stdout, _ = run(train_args(model, data, out, 4, "-n", "4"), capsys)
    assert rc == 0
    assert f"run kept in {out}: model_00000004.bin, main.log, metrics.jsonl, loss.png" in stdout
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"llmpy sample -e {out / 'model_00000004.bin'}" in stdout and "-y 1" in stdout
    assert "plot_log.py" in stdout
    rc, _, _ = run(["sample", "-e", str(out / "model_00000004.bin"), "-n", "3", "--device", "cpu"], capsys)
    assert rc == 0


def test_embedded_preset_writes_into_a_new_runs_folder(tmp_path, monkeypatch):
    from llmpy.train import TrainConfig, with_embedded_defaults
    monkeypatch.chdir(tmp_path)
    cfg = with_embedded_defaults(TrainConfig(device="cpu"), {"device"}, log=lambda *_: None)
    assert cfg.output_dir.startswith(os.path.join("runs", "")) and cfg.checkpoint_every > 0
    os.makedirs(cfg.output_dir)
    again = with_embedded_defaults(TrainConfig(device="cpu"), {"device"}, log=lambda *_: None)
    assert again.output_dir != cfg.output_dir                           # never an earlier run's folder
    mine = with_embedded_defaults(TrainConfig(device="cpu", output_dir="x"), {"device", "output_dir"},
                                  log=lambda *_: None)
    assert mine.output_dir == "x"


def test_plots_without_matplotlib_say_what_to_install(tmp_path):
    (tmp_path / "main.log").write_text("s:0 trl:5.0\ns:1 trl:4.0\n")
    code = ("import sys; sys.modules['matplotlib'] = None; sys.path.insert(0, 'scripts'); import plot_log; "
            f"sys.exit(plot_log.main([{str(tmp_path)!r}, '--out', {str(tmp_path / 'x.png')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "plot_log: matplotlib is not installed: pip install matplotlib (or pip install -e '.[plot]')"]


def test_sigterm_stops_every_rank_of_a_two_process_run_at_one_step(tiny, tmp_path):
    """mpiexec -n 2, ZeRO-1: SIGTERM to the job; the ranks agree on the step, both state files and DONE_
    are written, rank 0 says so, and -y 1 on 2 ranks logs the uninterrupted run's losses."""
    from test_dist import mpiexec
    model, data = tiny
    env = dict(os.environ, PYTHONPATH=REPO, HYDRA_LAUNCHER="fork", MPIEXEC_TIMEOUT="300")
    for var in ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"):
        env.pop(var, None)
    fast = SLOW_STEPS.replace("0.15", "0")

    def job(code, out, *extra):
        return [mpiexec(), "-n", "2", sys.executable, "-u", "-c", code,
                *train_args(model, data, out, 12, "-n", "5", "-z", "1"), *extra]
    r = subprocess.run(job(fast, tmp_path / "ref"), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "run"
    p = subprocess.Popen(job(SLOW_STEPS, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    for line in p.stdout:
        if line.startswith("step    3/12"):
            os.killpg(p.pid, signal.SIGTERM)     # as a scheduler does: every process of the job
            break
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 143, stderr
    err = stderr.strip().splitlines()
    assert len(err) == 1 and "stopped by SIGTERM at step" in err[0], stderr
    step = ck.done_steps(str(out))[0]
    assert {f"state_{step:08d}_00000.bin", f"state_{step:08d}_00001.bin"} <= set(os.listdir(out))
    r = subprocess.run(job(fast, out, "-y", "1"), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert logged(out, "train") == logged(tmp_path / "ref", "train")


def test_nanochat_checkpoint_directories_fall_back_and_move_aside(tiny, tmp_path, capsys):
    """The nanochat family writes model_%08d/ directories: -y 1 skips a damaged one, and a fresh run moves
    them, with the rest of the earlier run, into previous/<id>/."""
    from llmpy import families
    from llmpy.nanochat import NanoChatConfig, init_params
    _, data = tiny
    cfg = NanoChatConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, vocab_size=2048, sequence_len=64)
    start = str(tmp_path / "start")
    families.save_model_dir(start, cfg, init_params(cfg))
    out = tmp_path / "run"
    args = train_args(start, data, out, 4, "-n", "2")
    assert run(args, capsys)[0] == 0
    full = logged(out, "train")
    weights = out / "model_00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    rc, stdout, _ = run(args + ["-y", "1"], capsys)
    assert rc == 0 and "skipping the checkpoint of step 4" in stdout and "model_00000002 (step 2)" in stdout
    assert logged(out, "train")[4:] == full[2:]
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    rc, stdout, _ = run(train_args(start, data, out, 2), capsys)
    assert rc == 0 and (out / "previous" / run_id / "model_00000004" / "model.safetensors").is_file()
    assert not (out / "model_00000002").exists()
