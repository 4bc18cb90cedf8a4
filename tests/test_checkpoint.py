"""Model and state files against llm.c's layouts (llmc-facts.md §1-2: header slots, byte sizes, payload
order), bf16 rounding against ml_dtypes, checkpoint naming, DONE markers and retention (§2.1, §2.4)."""
import os
import struct

import numpy as np
import pytest

from llmpy import checkpoint as ck
from llmpy.data import DataLoader, write_shard
from llmpy.errors import LlmpyError
from llmpy.model import GPTConfig, num_parameters

SMALL = GPTConfig(max_seq_len=32, vocab_size=300, padded_vocab_size=384, num_layers=2, num_heads=4, channels=64)
N = num_parameters(SMALL)


def params(seed=0):
    return np.random.default_rng(seed).standard_normal(N).astype(np.float32)


# ---- bf16 ---------------------------------------------------------------------------------------


def test_bf16_rounding_matches_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, 3.4028235e38, -3.4028235e38, 1e-45, -1e-40,
                        1.00390625, 1.01171875,                 # exact ties: to even (down, up)
                        1.0039063, 65504.0, 2.0 ** -126], dtype=np.float32)
    bits = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([special, rng.standard_normal(100_000).astype(np.float32), bits.view(np.float32)])
    got = ck.f32_to_bf16_bits(x)
    with np.errstate(invalid="ignore"):
        ref = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], ref[~nan])
    assert np.isnan(ck.bf16_bits_to_f32(got[nan])).all() and nan.sum() > 0
    back = ck.bf16_bits_to_f32(got[~nan])
    np.testing.assert_array_equal(back, ref[~nan].view(ml_dtypes.bfloat16).astype(np.float32))


# ---- model files --------------------------------------------------------------------------------


def test_d12_sizes_follow_header_math():
    d12 = GPTConfig.from_descriptor("d12")
    assert num_parameters(d12) == 124_475_904
    assert ck.model_file_size(d12, "fp32") == 497_904_640
    assert ck.model_file_size(d12, "bf16") == 248_952_832


@pytest.mark.parametrize("dtype, version, itemsize", [("fp32", 3, 4), ("bf16", 5, 2)])
def test_model_round_trip_and_exact_header(tmp_path, dtype, version, itemsize):
    path = str(tmp_path / "model.bin")
    p = params()
    ck.save_model(path, SMALL, p, dtype=dtype)
    raw = open(path, "rb").read()
    assert len(raw) == 1024 + N * itemsize == ck.model_file_size(SMALL, dtype)
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:8].tolist() == [20240326, version, 32, 300, 2, 4, 64, 384] and not header[8:].any()
    assert ck.read_model_header(path) == (SMALL, version)
    cfg, loaded = ck.load_model(path)
    assert cfg == SMALL and loaded.dtype == np.float32 and loaded.shape == (N,)
    expected = p if dtype == "fp32" else ck.bf16_bits_to_f32(ck.f32_to_bf16_bits(p))
    np.testing.assert_array_equal(loaded, expected)
    if dtype == "bf16":
        np.testing.assert_array_equal(np.frombuffer(raw[1024:], dtype="<u2"), ck.f32_to_bf16_bits(p))
    assert os.listdir(tmp_path) == ["model.bin"]


def write_bad_model(tmp_path, kind):
    path = str(tmp_path / f"{kind}.bin")
    ck.save_model(path, SMALL, params())
    raw = bytearray(open(path, "rb").read())
    slot = lambda i, v: struct.pack_into("<i", raw, 4 * i, v)   # noqa: E731
    if kind == "magic":
        slot(0, 20240520)
    elif kind == "version":
        slot(1, 4)
    elif kind == "zero_layers":
        slot(4, 0)
    elif kind == "heads":
        slot(5, 5)                                             # 64 channels not divisible by 5
    elif kind == "truncated":
        raw = raw[:-4]
    elif kind == "header_only":
        raw = raw[:100]
    elif kind == "bf16_claim":
        slot(1, 5)                                             # fp32 payload, bf16 header: size mismatch
    open(path, "wb").write(bytes(raw))
    return path


@pytest.mark.parametrize("kind, words", [("magic", "bad magic"), ("version", "version 4"), ("zero_layers", "positive"),
                                         ("heads", "divisible"), ("truncated", "truncated"),
                                         ("header_only", "too small"), ("bf16_claim", "bf16 parameters")])
def test_bad_model_files(tmp_path, kind, words):
    path = write_bad_model(tmp_path, kind)
    with pytest.raises(LlmpyError, match=words) as e:
        ck.load_model(path)
    assert path in str(e.value) and "\n" not in str(e.value)


def test_missing_model_file(tmp_path):
    path = str(tmp_path / "absent.bin")
    with pytest.raises(LlmpyError, match="cannot read") as e:
        ck.read_model_header(path)
    assert path in str(e.value)


def test_save_model_checks_size(tmp_path):
    with pytest.raises(ValueError):
        ck.save_model(str(tmp_path / "m.bin"), SMALL, np.zeros(N - 1, np.float32))
    with pytest.raises(ValueError):
        ck.save_model(str(tmp_path / "m.bin"), SMALL, params(), dtype="fp16")


# ---- state files ------------------------------------------------------------------------------


@pytest.fixture
def shuffled_loader(tmp_path):
    for s, n in enumerate([41, 33, 50]):
        write_shard(str(tmp_path / f"tr_{s}.bin"), s * 1000 + np.arange(n))
    loader = DataLoader(str(tmp_path / "tr_*.bin"), 2, 4, shuffle=True)
    for _ in range(7):                                         # into the second shard
        loader.next_batch()
    return loader


def state_kwargs(master=True, loader_state=None, n=N):
    rng = np.random.default_rng(1)
    return dict(step=1234, m=rng.standard_normal(n).astype(np.float32), v=rng.random(n).astype(np.float32),
                master=rng.standard_normal(n).astype(np.float32) if master else None,
                rng_state=2 ** 64 - 5, rng_state_last_update=13371337, loader_state=loader_state)


def test_state_round_trip_exact_layout(tmp_path, shuffled_loader):
    path = str(tmp_path / "state.bin")
    kw = state_kwargs(loader_state=shuffled_loader.state_dict())
    ck.save_state(path, **kw, num_processes=1, rank=0)
    raw = open(path, "rb").read()
    ls = kw["loader_state"]
    n_shards, n_samples = len(ls["shard_perm"]), len(ls["intra_perm"])
    assert len(raw) == 1024 + 3 * 4 * N + 8 + 4 * n_shards + 8 + 4 * n_samples + 2520
    h = np.frombuffer(raw[:1024], dtype="<i4")
    assert h[:6].tolist() == [20240527, 1, 1, 0, 1, 1] and h[10] == 1234
    u64 = lambda slot: struct.unpack_from("<Q", raw, 4 * slot)[0]   # noqa: E731
    assert (u64(20), u64(22), u64(30), u64(32)) == (2 ** 64 - 5, 13371337, 1, ls["current_sample_idx"])
    used = {0, 1, 2, 3, 4, 5, 10, 20, 21, 22, 23, 30, 31, 32, 33}
    assert not any(h[i] for i in range(256) if i not in used)
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4", N, 1024), kw["m"])
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4", N, 1024 + 8 * N), kw["master"])
    assert raw[-2520:] == ls["rng"]

    st = ck.load_state(path, num_parameters=N, num_processes=1, rank=0)
    assert st["step"] == 1234 and st["rng_state"] == 2 ** 64 - 5 and st["rng_state_last_update"] == 13371337
    for key in ("m", "v", "master"):
        np.testing.assert_array_equal(st[key], kw[key])
    got = st["loader_state"]
    assert got["shuffle"] and got["rng"] == ls["rng"]
    assert (got["current_shard_idx"], got["current_sample_idx"]) == (ls["current_shard_idx"], ls["current_sample_idx"])
    np.testing.assert_array_equal(got["shard_perm"], ls["shard_perm"])
    np.testing.assert_array_equal(got["intra_perm"], ls["intra_perm"])


def test_state_without_master_or_shuffle(tmp_path):
    path = str(tmp_path / "state.bin")
    ck.save_state(path, **state_kwargs(master=False, loader_state={"current_shard_idx": 3, "current_sample_idx": 9,
                                                                  "shuffle": False}), num_processes=4, rank=2)
    assert os.path.getsize(path) == 1024 + 2 * 4 * N
    st = ck.load_state(path, num_parameters=N)
    assert st["master"] is None and (st["num_processes"], st["rank"]) == (4, 2)
    assert st["loader_state"]["current_shard_idx"] == 3 and st["loader_state"]["current_sample_idx"] == 9
    assert not st["loader_state"]["shuffle"]
    with pytest.raises(LlmpyError, match="rank=2"):
        ck.load_state(path, num_parameters=N, rank=0)
    with pytest.raises(LlmpyError, match="num_processes=4"):
        ck.load_state(path, num_parameters=N, num_processes=1)


def test_loader_resumes_through_state_file(tmp_path, shuffled_loader):
    path = str(tmp_path / "state.bin")
    ck.save_state(path, **state_kwargs(loader_state=shuffled_loader.state_dict(), n=16))
    fresh = DataLoader(shuffled_loader.pattern, 2, 4, shuffle=True)
    fresh.load_state_dict(ck.load_state(path, num_parameters=16)["loader_state"])
    for _ in range(40):                                        # across shards and epochs
        np.testing.assert_array_equal(fresh.next_batch()[0], shuffled_loader.next_batch()[0])


@pytest.mark.parametrize("kind, words", [("magic", "bad magic"), ("version", "version"), ("short", "truncated"),
                                         ("long", "expected"), ("shuffle_cut", "shuffle section"),
                                         ("tiny", "too small")])
def test_bad_state_files(tmp_path, shuffled_loader, kind, words):
    path = str(tmp_path / "state.bin")
    ck.save_state(path, **state_kwargs(loader_state=shuffled_loader.state_dict() if "shuffle" in kind else None))
    raw = bytearray(open(path, "rb").read())
    if kind == "magic":
        struct.pack_into("<i", raw, 0, 20240326)
    elif kind == "version":
        struct.pack_into("<i", raw, 4, 2)
    elif kind == "short":
        raw = raw[:-8]
    elif kind == "long":
        raw += b"\0" * 4
    elif kind == "shuffle_cut":
        raw = raw[:-100]
    elif kind == "tiny":
        raw = raw[:10]
    open(path, "wb").write(bytes(raw))
    with pytest.raises(LlmpyError, match=words) as e:
        ck.load_state(path, num_parameters=N)
    assert path in str(e.value) and "\n" not in str(e.value)


def test_state_for_wrong_model_size(tmp_path):
    path = str(tmp_path / "state.bin")
    ck.save_state(path, **state_kwargs(master=False))
    with pytest.raises(LlmpyError, match=str(N + 1)):
        ck.load_state(path, num_parameters=N + 1)


# ---- checkpoint directory -----------------------------------------------------------------------


def ckpt_state(**kw):
    """The state keyword arguments of write_checkpoint (it supplies `step` itself)."""
    kw = state_kwargs(**kw)
    del kw["step"]
    return kw


def test_names():
    assert ck.model_path("out", 5000) == os.path.join("out", "model_00005000.bin")
    assert ck.state_path("out", 5000, 3) == os.path.join("out", "state_00005000_00003.bin")
    assert ck.done_path("out", 7) == os.path.join("out", "DONE_00000007")


def test_write_checkpoint_and_latest_done(tmp_path):
    out = str(tmp_path / "run")
    assert ck.latest_done_step(out) is None
    for step in (10, 20):
        ck.write_checkpoint(out, step, SMALL, params(step), dtype="bf16", **ckpt_state(master=False))
    assert sorted(os.listdir(out)) == ["DONE_00000010", "DONE_00000020", "model_00000010.bin", "model_00000020.bin",
                                       "state_00000010_00000.bin", "state_00000020_00000.bin"]
    assert os.path.getsize(ck.done_path(out, 20)) == 0
    assert ck.read_model_header(ck.model_path(out, 20))[1] == 5
    open(os.path.join(out, "DONE_junk"), "w").close()
    assert ck.latest_done_step(out) == 20
    ck.write_checkpoint(out, 30, SMALL, params(), rank=0, num_processes=2, done=False, **ckpt_state(master=False))
    assert ck.latest_done_step(out) == 20                     # no DONE until all ranks are on disk
    ck.mark_done(out, 30)
    assert ck.latest_done_step(out) == 30
    ck.write_checkpoint(out, 30, SMALL, None, rank=1, num_processes=2, done=False, **ckpt_state(master=False))
    assert ck.load_state(ck.state_path(out, 30, 1), num_parameters=N, rank=1)["rank"] == 1


def test_prune_checkpoints(tmp_path):
    out = str(tmp_path)
    every, keep, major = 10, 2, 40
    deleted = []
    for step in range(10, 101, 10):
        ck.write_checkpoint(out, step, SMALL, params(), **ckpt_state(master=False, n=8))
        deleted.append(ck.prune_checkpoints(out, step, every, keep, major))
    assert deleted == [None, None, 10, 20, 30, None, 50, 60, 70, None]   # step - 20; 40, 80 are major
    remaining = sorted(int(n[5:]) for n in os.listdir(out) if n.startswith("DONE_"))
    assert remaining == [40, 80, 90, 100]                      # 40 and 80 are major; last `keep` kept
    for step in (10, 20, 30, 50, 60, 70):
        assert not os.path.exists(ck.model_path(out, step)) and not os.path.exists(ck.state_path(out, step))
    assert ck.prune_checkpoints(out, 100, every, 0, 0) is None  # keep=0: keep everything
