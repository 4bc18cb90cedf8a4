"""llm.c token shards: the file format (writer and reader together) and the distributed DataLoader.

A shard is a 1024-byte header of 256 int32 (magic 20240520, version 1, token count) followed by the
tokens as uint16; every document is preceded by EOT (llmc-facts.md §3.1). `DataLoader` serves
(B, T) int32 inputs and targets exactly in llm.c's order, shuffled or not, and its position can be
saved into and restored from a state file (§3.2, §2.2).
"""
from __future__ import annotations

import contextlib
import glob as globlib
import os

import numpy as np

from llmpy.errors import LlmpyError
from llmpy.rng import MT19937, shuffle_

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4     # 1024
TOKEN_DTYPE = np.uint16            # GPT-2 vocabulary fits (50257 < 65536)

# -------------------------------------------------------------------------------------------------
# Shard files


TMP_SUFFIX = ".tmp"                # atomic_write's temporary files are <path>.tmp<pid>


def atomic_write(path: str, chunks) -> None:
    """Write the byte-like chunks to `path` all or nothing, also across a power loss: into `<path>.tmp<pid>`,
    fsync, os.replace, then fsync the directory (so the rename itself is on disk). A kill can leave the
    temporary file behind; the trainer removes those at its next start (llmpy.rundir). An OSError (disk
    full, read-only file system) becomes an LlmpyError naming `path`."""
    tmp = f"{path}{TMP_SUFFIX}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path) or ".")
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise LlmpyError(f"{path}: cannot write ({e.strerror or e})") from None
        raise


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(path: str, tokens) -> None:
    """Write `tokens` (integers in [0, 65536)) as an llm.c GPT-2 token shard, atomically."""
    toks = np.asarray(tokens)
    if toks.size and (toks.min() < 0 or toks.max() >= 2 ** 16):
        raise ValueError(f"{path}: tokens must be in [0, 65536) to be stored as uint16")
    if toks.size >= 2 ** 31:
        raise ValueError(f"{path}: {toks.size} tokens; a shard holds fewer than 2**31")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, toks.size
    atomic_write(path, [header.tobytes(), toks.astype("<u2").tobytes()])


def read_header(path: str, what: str) -> tuple[np.ndarray, int]:
    """The 256 int32 header slots of an llm.c file (shard, model, state) and the file's size;
    LlmpyError naming the file if it is missing, unreadable or too short."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise LlmpyError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if len(raw) < HEADER_BYTES:
        raise LlmpyError(f"{path}: {size} bytes, too small for the {HEADER_BYTES}-byte {what} header")
    return np.frombuffer(raw, dtype="<i4").copy(), size


def read_shard_header(path: str) -> int:
    """Validate a token shard (exists, magic, version, size == 1024 + 2*count) and return its count."""
    header, size = read_header(path, "token shard")
    magic, version, ntok = header[:3].tolist()
    if magic != SHARD_MAGIC:
        raise LlmpyError(f"{path}: bad magic {magic} (expected {SHARD_MAGIC}); not an llm.c GPT-2 token shard")
    if version != SHARD_VERSION:
        raise LlmpyError(f"{path}: token-shard version {version} is not supported (expected {SHARD_VERSION})")
    if ntok <= 0:
        raise LlmpyError(f"{path}: header says {ntok} tokens; a shard needs at least one")
    expected = HEADER_BYTES + 2 * ntok
    if size != expected:
        raise LlmpyError(f"{path}: file is {size} bytes but its header says {ntok} tokens "
                         f"({expected} bytes); truncated or corrupt")
    return ntok


def check_token_ids(path: str, tokens: np.ndarray, vocab_size: int) -> None:
    """LlmpyError naming the shard when a token id is >= vocab_size (the model has no embedding row for it:
    the CPU path would fail in its first forward, the GPU kernels would read past the table)."""
    top = int(tokens.max())
    if top >= vocab_size:
        where = int(np.argmax(tokens >= vocab_size))
        raise LlmpyError(f"{path}: token id {top} (first bad id at token {where}) is outside the model's "
                         f"vocabulary of {vocab_size}; were these shards tokenized for another model?")


def load_tokens(path: str) -> np.ndarray:
    """The tokens of a validated shard as a read-only uint16 memory map."""
    ntok = read_shard_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(ntok,))


# -------------------------------------------------------------------------------------------------
# Distributed data loader


class DataLoader:
    """llm.c's DataLoader: (B, T) batches from a glob of shards, one slice per process.

    A *sample* is one global batch of P*B*T tokens; process r reads the B*T+1 tokens at offset
    sample*P*B*T + r*B*T of the current shard (inputs = first B*T, targets = shifted by one).
    A shard of n tokens holds floor((n-1) / (P*B*T)) samples. With shuffle=True, an MT19937 seeded
    42 + rank permutes the shard order at every epoch (cumulatively) and the samples inside each
    shard when it is opened (from the identity each time); every reset is a new epoch. shuffle_seed
    replaces 42 + rank (the trainer gives every rank 42: its P*B-row global batches are then those of
    one process with P*B rows).
    With vocab_size, every token id is checked against it: up front when the shards hold at most
    UPFRONT_CHECK_TOKENS tokens (one pass over a memory map), else each shard when it is first opened.
    """
    UPFRONT_CHECK_TOKENS = 1 << 30      # 2 GiB of uint16 ids: a second or two from the page cache

    def __init__(self, pattern: str, B: int, T: int, *, process_rank: int = 0,
                 num_processes: int = 1, shuffle: bool = False, shuffle_seed: int | None = None,
                 vocab_size: int | None = None):
        if B <= 0 or T <= 0 or num_processes <= 0 or not 0 <= process_rank < num_processes:
            raise ValueError(f"bad loader geometry B={B} T={T} rank={process_rank}/{num_processes}")
        self.pattern, self.B, self.T = pattern, B, T
        self.process_rank, self.num_processes, self.shuffle = process_rank, num_processes, shuffle
        self.files = sorted(globlib.glob(pattern))
        if not self.files:
            raise LlmpyError(f"{pattern}: no files match this token-shard pattern")
        need = num_processes * B * T + 1
        self.num_tokens = 0
        for path in self.files:                            # validate everything up front
            ntok = read_shard_header(path)
            if ntok < need:
                raise LlmpyError(f"{path}: {ntok} tokens, fewer than the {need} one batch needs "
                                 f"(P*B*T+1 with P={num_processes}, B={B}, T={T})")
            self.num_tokens += ntok
        self.vocab_size, self._ids_checked = vocab_size, set()
        if vocab_size is not None and self.num_tokens <= self.UPFRONT_CHECK_TOKENS:
            for path in self.files:
                check_token_ids(path, load_tokens(path), vocab_size)
            self._ids_checked = set(range(len(self.files)))
        self.shard_perm = np.arange(len(self.files), dtype=np.int32)
        self.intra_perm: np.ndarray | None = None
        self.rng = MT19937(42 + process_rank if shuffle_seed is None else shuffle_seed) if shuffle else None
        self.reset()

    # ---- position -------------------------------------------------------------------------------

    def _open_shard(self, shard_idx: int) -> None:
        """Map the shard at position shard_idx of the (possibly permuted) order."""
        file_idx = int(self.shard_perm[shard_idx]) if self.shuffle else shard_idx
        self.tokens = load_tokens(self.files[file_idx])
        if self.vocab_size is not None and file_idx not in self._ids_checked:
            check_token_ids(self.files[file_idx], self.tokens, self.vocab_size)
            self._ids_checked.add(file_idx)
        self.shard_num_samples = (len(self.tokens) - 1) // (self.num_processes * self.B * self.T)

    def _new_intra_perm(self) -> None:
        self.intra_perm = shuffle_(np.arange(self.shard_num_samples, dtype=np.int32), self.rng)

    def reset(self) -> None:
        """Back to the first sample of the first shard; when shuffling, this starts a new epoch."""
        self.current_shard_idx, self.current_sample_idx = 0, 0
        if self.shuffle:
            shuffle_(self.shard_perm, self.rng)
        self._open_shard(0)
        if self.shuffle:
            self._new_intra_perm()

    def _advance(self) -> None:
        if self.current_shard_idx == len(self.files) - 1:
            self.reset()
            return
        self.current_shard_idx += 1
        self.current_sample_idx = 0
        self._open_shard(self.current_shard_idx)
        if self.shuffle:
            self._new_intra_perm()

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The next (inputs, targets), both int32 (B, T)."""
        if self.current_sample_idx >= self.shard_num_samples:
            self._advance()
        idx = self.current_sample_idx
        sample = int(self.intra_perm[idx]) if self.shuffle else idx
        BT = self.B * self.T
        start = sample * self.num_processes * BT + self.process_rank * BT
        inputs = self.tokens[start:start + BT].astype(np.int32).reshape(self.B, self.T)
        targets = self.tokens[start + 1:start + BT + 1].astype(np.int32).reshape(self.B, self.T)
        self.current_sample_idx += 1
        return inputs, targets

    # ---- state (what state files store, llmc-facts.md §2.2) -------------------------------------

    def state_dict(self) -> dict:
        """Position, and when shuffling the permutations and the shuffle generator (copies)."""
        d = {"current_shard_idx": self.current_shard_idx, "current_sample_idx": self.current_sample_idx,
             "shuffle": self.shuffle, "shard_perm": None, "intra_perm": None, "rng": None}
        if self.shuffle:
            d.update(shard_perm=self.shard_perm.copy(), intra_perm=self.intra_perm.copy(),
                     rng=self.rng.to_bytes())
        return d

    def load_state_dict(self, d: dict) -> None:
        """Resume where `d` was taken: the next batch is the one the saved loader would have served."""
        if bool(d["shuffle"]) != self.shuffle:
            raise LlmpyError(f"{self.pattern}: saved loader state has shuffle={bool(d['shuffle'])}, "
                             f"this loader has shuffle={self.shuffle}")
        shard_idx, sample_idx = int(d["current_shard_idx"]), int(d["current_sample_idx"])
        if not 0 <= shard_idx < len(self.files):
            raise LlmpyError(f"{self.pattern}: saved shard index {shard_idx} but only "
                             f"{len(self.files)} shards match; the data changed since the checkpoint")
        if self.shuffle:
            shard_perm = np.asarray(d["shard_perm"], dtype=np.int32)
            if sorted(shard_perm.tolist()) != list(range(len(self.files))):
                raise LlmpyError(f"{self.pattern}: saved shard permutation does not cover the "
                                 f"{len(self.files)} matching shards")
            self.shard_perm = shard_perm.copy()
            self.rng = MT19937.from_bytes(d["rng"])
        self.current_shard_idx = shard_idx
        self._open_shard(shard_idx)
        if self.shuffle:
            intra = np.asarray(d["intra_perm"], dtype=np.int32)
            if len(intra) != self.shard_num_samples:
                raise LlmpyError(f"{self.pattern}: saved intra-shard permutation has {len(intra)} "
                                 f"samples, the shard has {self.shard_num_samples}")
            self.intra_perm = intra.copy()
        if not 0 <= sample_idx <= self.shard_num_samples:
            raise LlmpyError(f"{self.pattern}: saved sample index {sample_idx} is past the "
                             f"{self.shard_num_samples} samples of its shard")
        self.current_sample_idx = sample_idx


def find_val_split(train_pat: str, log) -> str:
    """The val shards beside -i when -j is not given: 'train' -> 'val' in the file-name part of the pattern
    (llm.c's fineweb_train_*.bin / fineweb_val_*.bin, tiny_shakespeare_train.bin / ..._val.bin)."""
    head, tail = os.path.split(train_pat)
    guess = os.path.join(head, tail.replace("train", "val")) if "train" in tail else ""
    if guess and globlib.glob(guess):
        log(f"val data: {guess} (found beside -i; give -j to choose other shards)")
        return guess
    log("validation off: no -j given" + (f" and nothing matches {guess}" if guess else
                                         " and -i's file names have no 'train' to find a val split by"))
    return ""
