"""Token shards and the DataLoader against llm.c (llmc-facts.md §3.1-3.2: header, sizes, window
offsets, shuffling rules), on synthetic shards of consecutive integers like llm.c's dataloader test;
plus the default corpus (llmpy.corpus), offline."""
import os
import urllib.request

import numpy as np
import pytest

from llmpy import corpus
from llmpy.data import SHARD_MAGIC, DataLoader, load_tokens, read_shard_header, write_shard
from llmpy.errors import LlmpyError
from llmpy.rng import MT19937, shuffle_

# ---- shard files -------------------------------------------------------------------------------


def test_shard_round_trip_and_exact_bytes(tmp_path):
    path = str(tmp_path / "s.bin")
    toks = np.array([0, 1, 50256, 65535, 7], dtype=np.int64)
    write_shard(path, toks)
    raw = open(path, "rb").read()
    assert len(raw) == 1024 + 2 * 5
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 5] and not header[3:].any()
    assert np.frombuffer(raw[1024:], dtype="<u2").tolist() == toks.tolist()
    assert read_shard_header(path) == 5
    loaded = load_tokens(path)
    assert loaded.dtype == np.uint16 and loaded.tolist() == toks.tolist()
    assert not [p for p in os.listdir(tmp_path) if p != "s.bin"]     # no temp file left behind


def test_write_shard_rejects_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="65536"):
        write_shard(str(tmp_path / "x.bin"), [1, 65536])
    with pytest.raises(ValueError):
        write_shard(str(tmp_path / "x.bin"), [-1])


def corrupt(tmp_path, kind):
    path = str(tmp_path / f"{kind}.bin")
    write_shard(path, np.arange(100))
    raw = bytearray(open(path, "rb").read())
    if kind == "magic":
        raw[0:4] = np.int32(12345).tobytes()
    elif kind == "version":
        raw[4:8] = np.int32(7).tobytes()
    elif kind == "count":
        raw[8:12] = np.int32(101).tobytes()
    elif kind == "truncated_body":
        raw = raw[:-2]
    elif kind == "extra_bytes":
        raw += b"\0\0"
    elif kind == "truncated_header":
        raw = raw[:500]
    elif kind == "zero_count":
        raw = raw[:1024]
        raw[8:12] = np.int32(0).tobytes()
    open(path, "wb").write(bytes(raw))
    return path


@pytest.mark.parametrize("kind, words", [("magic", "bad magic"), ("version", "version"), ("count", "header says"),
                                         ("truncated_body", "header says"), ("extra_bytes", "header says"),
                                         ("truncated_header", "too small"), ("zero_count", "0 tokens")])
def test_malformed_shards_raise_with_path(tmp_path, kind, words):
    path = corrupt(tmp_path, kind)
    with pytest.raises(LlmpyError, match=words) as e:
        read_shard_header(path)
    assert path in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LlmpyError):
        DataLoader(path, 1, 4)


def test_missing_file_and_empty_glob(tmp_path):
    missing = str(tmp_path / "nope.bin")
    with pytest.raises(LlmpyError, match="cannot read") as e:
        read_shard_header(missing)
    assert missing in str(e.value)
    pattern = str(tmp_path / "train_*.bin")
    with pytest.raises(LlmpyError, match="no files match") as e:
        DataLoader(pattern, 2, 4)
    assert pattern in str(e.value)


# ---- DataLoader ------------------------------------------------------------------------------


def make_shards(tmp_path, sizes, stride=10_000):
    """Shards of consecutive integers; shard s starts at s*stride, so a token names its origin."""
    for s, n in enumerate(sizes):
        write_shard(str(tmp_path / f"shard_{s:03d}.bin"), (s * stride + np.arange(n)) % 65536)
    return str(tmp_path / "shard_*.bin")


def test_sequential_order_matches_llmc(tmp_path):
    B, T = 2, 4
    sizes = [41, 33, 50]                        # samples: floor((n-1)/8) = 5, 4, 6
    loader = DataLoader(make_shards(tmp_path, sizes), B, T)
    assert loader.num_tokens == sum(sizes)
    expected = [(s, k) for s, n in enumerate(sizes) for k in range((n - 1) // (B * T))]
    for epoch in range(2):                      # past the last shard: back to shard 0
        for s, k in expected:
            x, y = loader.next_batch()
            assert x.dtype == np.int32 and x.shape == (B, T) and y.shape == (B, T)
            start = s * 10_000 + k * B * T
            np.testing.assert_array_equal(x.ravel(), start + np.arange(B * T))
            np.testing.assert_array_equal(y.ravel(), start + 1 + np.arange(B * T))


def test_multi_process_windows(tmp_path):
    B, T, P = 2, 3, 3
    pattern = make_shards(tmp_path, [100, 60])  # samples: floor(99/18)=5, floor(59/18)=3
    loaders = [DataLoader(pattern, B, T, process_rank=r, num_processes=P) for r in range(P)]
    for s, n in enumerate([100, 60]):
        for k in range((n - 1) // (P * B * T)):
            for r, loader in enumerate(loaders):
                x, y = loader.next_batch()
                start = s * 10_000 + k * P * B * T + r * B * T
                np.testing.assert_array_equal(x.ravel(), start + np.arange(B * T))
                np.testing.assert_array_equal(y.ravel(), start + 1 + np.arange(B * T))


def test_shard_too_small(tmp_path):
    pattern = make_shards(tmp_path, [40, 16])
    with pytest.raises(LlmpyError, match="fewer than the 17") as e:
        DataLoader(pattern, 2, 4, num_processes=2)
    assert "shard_001.bin" in str(e.value)
    DataLoader(pattern, 1, 15)                  # 16 tokens = B*T+1: just enough


def origin(x, B, T, P=1, r=0, stride=10_000):
    """(shard, sample) a batch came from, decoded from its first token."""
    first = int(x.ravel()[0])
    shard, offset = divmod(first, stride)
    return shard, (offset - r * B * T) // (P * B * T)


def test_shuffled_epochs_cover_every_sample_once(tmp_path):
    B, T = 2, 4
    sizes = [41, 33, 50, 81]
    loader = DataLoader(make_shards(tmp_path, sizes), B, T, shuffle=True)
    all_samples = sorted((s, k) for s, n in enumerate(sizes) for k in range((n - 1) // (B * T)))
    epochs = [[origin(loader.next_batch()[0], B, T) for _ in all_samples] for _ in range(3)]
    for ep in epochs:
        assert sorted(ep) == all_samples
        shards_in_order = [s for i, (s, _) in enumerate(ep) if i == 0 or ep[i - 1][0] != s]
        assert sorted(shards_in_order) == list(range(len(sizes)))     # one shard at a time
    assert epochs[0] != epochs[1] != epochs[2]


def test_shuffle_follows_llmc_rng_order(tmp_path):
    """Shard order: cumulative Fisher-Yates each epoch; samples: fresh from identity per shard."""
    B, T, rank, P = 1, 4, 1, 2
    sizes = [41, 33, 50]
    loader = DataLoader(make_shards(tmp_path, sizes), B, T, process_rank=rank, num_processes=P, shuffle=True)
    gen, shard_perm, expected = MT19937(42 + rank), np.arange(3, dtype=np.int32), []
    for _ in range(2):
        shuffle_(shard_perm, gen)
        for f in shard_perm:
            n = (sizes[f] - 1) // (P * B * T)
            expected += [(int(f), int(k)) for k in shuffle_(np.arange(n, dtype=np.int32), gen)]
    got = [origin(loader.next_batch()[0], B, T, P, rank) for _ in expected]
    assert got == expected


@pytest.mark.parametrize("shuffle", [False, True])
def test_state_round_trip_across_shard_and_epoch_boundaries(tmp_path, shuffle):
    B, T = 2, 4
    pattern = make_shards(tmp_path, [41, 17, 50, 33])      # 5 + 2 + 6 + 4 = 17 samples per epoch
    loader = DataLoader(pattern, B, T, shuffle=shuffle)
    for _ in range(45):                                     # every position of 2+ epochs
        state = loader.state_dict()
        clone = DataLoader(pattern, B, T, shuffle=shuffle)
        clone.next_batch()                                  # disturb it first
        clone.load_state_dict(state)
        for _ in range(20):
            a, b = loader.next_batch(), clone.next_batch()
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
        loader.load_state_dict(state)                       # rewind, then step once
        loader.next_batch()


def test_load_state_dict_rejects_mismatch(tmp_path):
    pattern = make_shards(tmp_path, [41, 33])
    plain = DataLoader(pattern, 2, 4).state_dict()
    with pytest.raises(LlmpyError, match="shuffle"):
        DataLoader(pattern, 2, 4, shuffle=True).load_state_dict(plain)
    with pytest.raises(LlmpyError, match="shard index"):
        DataLoader(pattern, 2, 4).load_state_dict(dict(plain, current_shard_idx=5))
    with pytest.raises(LlmpyError, match="sample index"):
        DataLoader(pattern, 2, 4).load_state_dict(dict(plain, current_sample_idx=99))


def test_reset_restarts(tmp_path):
    loader = DataLoader(make_shards(tmp_path, [41, 33]), 2, 4)
    first = loader.next_batch()[0]
    loader.next_batch()
    loader.reset()
    np.testing.assert_array_equal(loader.next_batch()[0], first)


# ---- default corpus (no network) -------------------------------------------------------------


class FakeEnc:
    """Byte-level stand-in for tiktoken: one token per UTF-8 byte, EOT 50256."""
    eot_token = 50256

    def encode_ordinary_batch(self, docs):
        return [list(d.encode()) for d in docs]


def test_shakespeare_rule():
    text = "First Citizen:\nHi.\n\nSecond:\nHo.\n\nEnd."
    assert corpus.shakespeare_sections(text) == ["First Citizen:\nHi.\n\n", "Second:\nHo.\n\n", "End."]
    toks = corpus.tokenize_documents(corpus.shakespeare_sections(text), FakeEnc())
    assert toks.dtype == np.uint16
    assert toks[0] == 50256 and (toks == 50256).sum() == 3
    assert bytes(toks[toks != 50256].astype(np.uint8)).decode() == text
    train, val = corpus.split_train_val(np.arange(100), 30)
    assert val.tolist() == list(range(30)) and train.tolist() == list(range(30, 100))


def test_tokenize_documents_real_bpe():
    from llmpy.tokenizer import gpt2_encoding
    toks = corpus.tokenize_documents(["First Citizen:\nBefore we proceed", "Hello world"], gpt2_encoding())
    assert toks.tolist() == [50256, 5962, 22307, 25, 198, 8421, 356, 5120, 50256, 15496, 995]


def test_prepare_default_offline_fallback_and_reuse(tmp_path):
    logs = []
    data_dir = str(tmp_path / "default")
    train, val = corpus.prepare_default(data_dir, log=logs.append, url=None)
    assert "pydoc_data" in logs[-1]
    n_train, n_val = read_shard_header(train), read_shard_header(val)
    assert n_val == min(32768, (n_train + n_val) // 4) and n_train > 50_000
    v = load_tokens(val)
    assert v[0] == 50256
    from llmpy.tokenizer import gpt2_encoding
    assert "assert" in gpt2_encoding().decode(v[:50].tolist())     # sorted topics: 'assert' first
    logs.clear()
    assert corpus.prepare_default(data_dir, log=logs.append, url=None) == (train, val)
    assert logs and "reusing" in logs[0] and "pydoc_data" in logs[0]


def test_prepare_default_uses_cached_tinyshakespeare(tmp_path):
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    text = "\n\n".join(f"Citizen {i}:\nWe are accounted poor citizens." for i in range(400))
    (data_dir / "tinyshakespeare.txt").write_text(text)
    logs = []
    train, val = corpus.prepare_default(str(data_dir), log=logs.append, url="http://unused.invalid/")
    assert "tinyshakespeare" in logs[-1]
    tokens = np.concatenate([load_tokens(val), load_tokens(train)])
    from llmpy.tokenizer import gpt2_encoding
    expected = corpus.tokenize_documents(corpus.shakespeare_sections(text), gpt2_encoding())
    np.testing.assert_array_equal(tokens, expected)


def test_prepare_default_download_failure_falls_back(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("network is off in tests")
    monkeypatch.setattr(urllib.request, "urlopen", boom)
    logs = []
    corpus.prepare_default(str(tmp_path / "d"), log=logs.append, registry=False)
    assert any("download failed" in line for line in logs) and "pydoc_data" in logs[-1]


def test_prepare_default_rebuilds_corrupt_shards(tmp_path):
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    (data_dir / "train.bin").write_bytes(b"junk")
    (data_dir / "val.bin").write_bytes(b"junk")
    logs = []
    train, _ = corpus.prepare_default(str(data_dir), log=logs.append, url=None)
    assert "rebuilding" in logs[0]
    assert read_shard_header(train) > 0
    assert SHARD_MAGIC == np.fromfile(train, dtype="<i4", count=1)[0]
