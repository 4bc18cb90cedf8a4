"""run_on_modal.py: imports offline, maps its CLI, runs the remote body locally; never contacts Modal."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("modal")
from modal import FilePatternMatcher  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_modal_token(monkeypatch, tmp_path):
    """A temp HOME (no ~/.modal.toml) and no token env vars, so no real credentials can be used."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_CONFIG_PATH", "MODAL_PROFILE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def m(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    return importlib.import_module("run_on_modal")


def test_module_constants(m):
    assert m.GPU == "L4" and m.VOLUME_NAME == "llmpy-data"
    assert m.DATA_DIR == "/data" and m.REPO_DIR == "/root/llmpy"
    assert 3600 <= m.TIMEOUT <= 24 * 3600
    assert m.app.name == "llmpy" and m.LOCAL_REPO == REPO


@pytest.mark.parametrize("path, ignored", [
    ("cuda/gelu.cu", False), ("cuda/common.cuh", False), ("llmpy/gpu/gelu.py", False),
    ("llmpy/data.py", False), ("scripts/prepare_tinyshakespeare.py", False), ("pyproject.toml", False),
    (".git/HEAD", True), (".venv/bin/python", True), ("data/x.bin", True), ("data/ts/a.txt", True),
    ("log124M/main.log", True), ("llmpy/__pycache__/model.cpython-311.pyc", True), ("gpt2_124M.bin", True),
])
def test_image_ignore_rules(m, path, ignored):
    assert FilePatternMatcher(*m.IGNORE)(Path(path)) is ignored


def test_every_kernel_source_in_the_repo_is_uploaded(m):
    matcher = FilePatternMatcher(*m.IGNORE)
    for f in list((REPO / "cuda").glob("*.cu")) + list((REPO / "cuda").glob("*.cuh")):
        assert not matcher(f.relative_to(REPO)), f


def test_modal_run_help_lists_options(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env["HOME"] = str(tmp_path)
    p = subprocess.run([sys.executable, "-m", "modal", "run", "run_on_modal.py", "--help"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "--command" in p.stdout and "--gpu" in p.stdout


def test_build_argv(m):
    assert m.build_argv('llmpy train -i "data/a b/*.bin" -o log') == [
        sys.executable, "-m", "llmpy", "train", "-i", "data/a b/*.bin", "-o", "log"]
    assert m.build_argv("python scripts/prepare_tinyshakespeare.py --out data/ts", repo_dir="/r") == [
        sys.executable, "/r/scripts/prepare_tinyshakespeare.py", "--out", "data/ts"]
    assert m.build_argv("bash scripts/run_gpt2_124M.sh")[1] == "/root/llmpy/scripts/run_gpt2_124M.sh"
    assert m.build_argv("nvidia-smi -L") == ["nvidia-smi", "-L"]
    assert m.build_argv("llmpy train -o scripts/x")[-1] == "scripts/x"      # only program/first argument map
    # several GPUs (--gpu H100:8): the launcher's options stay, the program after them is mapped
    mpi = m.build_argv("mpiexec -n 8 llmpy train -z 1 -o log", repo_dir="/r")
    assert mpi[0].endswith("mpiexec") and mpi[1:] == ["-n", "8", sys.executable, "-m", "llmpy", "train", "-z", "1",
                                                      "-o", "log"]
    assert m.build_argv("mpirun -n 2 python scripts/bench_dist.py", repo_dir="/r")[3:] == [
        sys.executable, "/r/scripts/bench_dist.py"]
    for bad in ("", "   ", 'llmpy train -i "unclosed'):
        with pytest.raises(ValueError):
            m.build_argv(bad)


@pytest.mark.parametrize("s, want", [("L4", "L4"), ("h100", "H100"), ("H100:8", "H100:8"),
                                     ("A100-80GB", "A100-80GB"), ("h100!", "H100!"), (" H200 ", "H200")])
def test_parse_gpu_accepts(m, s, want):
    assert m.parse_gpu(s) == want


@pytest.mark.parametrize("s", ["H100:0", "", "foo bar", "H100:9", "H100:", ":2", "H100:x", "A100,H100"])
def test_parse_gpu_rejects(m, s):
    with pytest.raises(ValueError, match="--gpu"):
        m.parse_gpu(s)


def test_run_command_streams_output_and_returns_rc(m, tmp_path, capfd):
    cmd = """python -c "print('hi from', __import__('os').getcwd()); import sys; sys.exit(3)" """
    rc = m.run_command(cmd, str(tmp_path))
    assert rc == 3
    out = capfd.readouterr().out
    assert f"hi from {tmp_path}" in out and "[run_on_modal]" in out


def test_run_command_missing_program(m, tmp_path):
    assert m.run_command("no-such-program-xyz --flag", str(tmp_path)) == 127


def test_run_command_signal_exit_code(m, tmp_path):
    assert m.run_command("""python -c "import os, signal; os.kill(os.getpid(), signal.SIGTERM)" """,
                         str(tmp_path)) == 128 + 15


def _write_shard(path, tokens):
    """llm.c token shard: 256 int32 header (magic 20240520, version 1, count), then uint16 tokens."""
    header = np.zeros(256, np.int32)
    header[:3] = (20240520, 1, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes() + np.asarray(tokens, np.uint16).tobytes())


def _cli_importable() -> bool:
    try:
        importlib.import_module("llmpy.cli")
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _cli_importable(), reason="llmpy.cli is not importable yet")
def test_run_command_llmpy_train_on_cpu(m, tmp_path, monkeypatch):
    """The remote body, run locally in a stand-in for /data: a 2-step CPU run on a tiny shard."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    (tmp_path / "data").mkdir()
    toks = np.random.default_rng(0).integers(0, 50257, 4096)
    _write_shard(tmp_path / "data" / "tiny_train.bin", toks)
    _write_shard(tmp_path / "data" / "tiny_val.bin", toks[:1024])
    rc = m.run_command("llmpy train --device cpu -e d6 -i 'data/tiny_*train.bin' -j data/tiny_val.bin "
                       "-b 2 -t 32 -x 2 -v 0 -s 0 -o log_tiny", str(tmp_path))
    assert rc == 0


def test_entrypoint_propagates_nonzero_rc(m, monkeypatch):
    calls = []

    class FakeFunction:
        def with_options(self, **kw):
            calls.append(kw)
            return self

        def remote(self, command):
            calls.append(command)
            return self.rc

    fake = FakeFunction()
    monkeypatch.setattr(m, "run", fake)
    entry = m.main.info.raw_f
    fake.rc = 3
    with pytest.raises(SystemExit) as e:
        entry(command="llmpy train -x 1", gpu="h100:2")
    assert e.value.code == 3 and calls == [{"gpu": "H100:2"}, "llmpy train -x 1"]
    fake.rc = 0
    entry(command="nvidia-smi")                         # rc 0: returns normally, default GPU
    assert calls[-2:] == [{"gpu": "L4"}, "nvidia-smi"]


def test_entrypoint_rejects_bad_input_before_calling_modal(m, monkeypatch):
    monkeypatch.setattr(m, "run", None)                 # any remote call would raise AttributeError
    for kw in ({"command": "llmpy train", "gpu": "H100:0"}, {"command": "", "gpu": "L4"}):
        with pytest.raises(SystemExit) as e:
            m.main.info.raw_f(**kw)
        assert "run_on_modal:" in str(e.value.code)
