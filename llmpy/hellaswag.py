"""HellaSwag in llm.c's eval-file format: write it, read it, and score a model on it.

File (`hellaswag_val.bin`, llmc-facts.md §3.4): a header of 256 int32 (magic 20240522, version 1,
number of examples, byte size of the longest example), then one uint16 stream; each example is
    65535, total bytes of the example, index, label, 4 (completions), n_ctx, ctx tokens...,
    then for each completion: n_i, its tokens...

Scoring (§3.5, "acc_norm" as llm.c's EvalLoader): each completion becomes one row of context tokens
followed by the completion tokens; the row's score is the mean cross-entropy of the completion tokens
given everything before them, and the prediction is the completion with the lowest mean loss (the
first wins a tie). Rows are packed B // 4 examples per (B, T) forward, as in llm.c. Examples longer
than T lose context tokens from the left (llm.c would stop; we log how many were cut).

`python scripts/prepare_hellaswag.py` writes data/hellaswag/hellaswag_val.bin;
`llmpy eval-hellaswag -e model.bin` and `llmpy train -h 1` read it.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np

from llmpy.errors import LlmpyError

EVAL_MAGIC = 20240522
EVAL_VERSION = 1
HEADER_INTS = 256
NUM_COMPLETIONS = 4          # llm.c's ASSUMED_NUM_COMPLETIONS
DELIMITER = 65535            # start of an example in the uint16 stream (so tokens must be < 65535)
DEFAULT_PATH = "data/hellaswag/hellaswag_val.bin"


@dataclass(frozen=True)
class Example:
    """One multiple-choice example: token ids of the context and of each completion, and the answer."""
    index: int
    label: int
    context: tuple[int, ...]
    completions: tuple[tuple[int, ...], ...]

    @staticmethod
    def make(index: int, label: int, context, completions) -> "Example":
        return Example(int(index), int(label), tuple(int(t) for t in context),
                       tuple(tuple(int(t) for t in c) for c in completions))

    def num_tokens(self) -> int:
        """Length of the longest rendered row (context + one completion)."""
        return len(self.context) + max(len(c) for c in self.completions)


# -------------------------------------------------------------------------------------------------
# The file format


def _encode_example(ex: Example) -> np.ndarray:
    """The example's uint16 record, delimiter and byte count included."""
    fields = [ex.index, ex.label, len(ex.completions), len(ex.context), *ex.context]
    for c in ex.completions:
        fields += [len(c), *c]
    record = [DELIMITER, 2 * (len(fields) + 2), *fields]
    arr = np.asarray(record, dtype=np.int64)
    if (arr[1:] >= DELIMITER).any() or (arr < 0).any():
        raise ValueError(f"example {ex.index}: every field and token must be in [0, 65535), "
                         f"and the example under 65,536 bytes")
    return arr.astype(np.uint16)


def write_eval_file(path: str, examples) -> int:
    """Write Examples (index = position, 4 completions each) as an llm.c eval file. Returns its size."""
    records = []
    for i, ex in enumerate(examples):
        if ex.index != i:
            raise ValueError(f"example at position {i} has index {ex.index}; indices must be 0, 1, 2, ...")
        if len(ex.completions) != NUM_COMPLETIONS or not 0 <= ex.label < NUM_COMPLETIONS:
            raise ValueError(f"example {i}: needs {NUM_COMPLETIONS} completions and a label in 0..3")
        records.append(_encode_example(ex))
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:4] = [EVAL_MAGIC, EVAL_VERSION, len(records), max((2 * r.size for r in records), default=0)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        for r in records:
            f.write(r.tobytes())
    os.replace(tmp, path)
    return os.path.getsize(path)


def read_eval_file(path: str) -> list[Example]:
    """Parse and validate an llm.c eval file; every problem is an LlmpyError naming the file and example."""
    if not os.path.isfile(path):
        raise LlmpyError(f"{path}: eval file not found (run `python scripts/prepare_hellaswag.py`)")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size < 4 * HEADER_INTS:
        raise LlmpyError(f"{path}: {raw.size} bytes is too small for the {4 * HEADER_INTS}-byte header")
    header = raw[:4 * HEADER_INTS].view(np.int32)
    if header[0] != EVAL_MAGIC:
        hint = " (this is a token shard, not an eval file)" if header[0] == 20240520 else ""
        raise LlmpyError(f"{path}: bad magic {header[0]}, expected {EVAL_MAGIC}{hint}")
    if header[1] != EVAL_VERSION:
        raise LlmpyError(f"{path}: unsupported eval file version {header[1]}, expected {EVAL_VERSION}")
    n, longest = int(header[2]), int(header[3])
    body = raw[4 * HEADER_INTS:]
    if body.size % 2:
        raise LlmpyError(f"{path}: body has an odd number of bytes ({body.size}); truncated?")
    s = body.view(np.uint16)
    examples, pos = [], 0
    for i in range(n):
        where = f"{path}: example {i}"
        if pos + 2 > s.size:
            raise LlmpyError(f"{where}: file ends early (header says {n} examples)")
        if s[pos] != DELIMITER:
            raise LlmpyError(f"{where}: expected the start marker 65535 at uint16 offset {pos}, got {s[pos]}")
        nwords = int(s[pos + 1]) // 2
        if int(s[pos + 1]) % 2 or nwords < 7 or pos + nwords > s.size:
            raise LlmpyError(f"{where}: bad byte count {s[pos + 1]}")
        if 2 * nwords > longest:
            raise LlmpyError(f"{where}: {2 * nwords} bytes exceeds the header's longest example ({longest})")
        rec = s[pos:pos + nwords].astype(np.int64)
        index, label, ncomp, nctx = (int(x) for x in rec[2:6])
        if index != i:
            raise LlmpyError(f"{where}: stored index {index} does not match its position")
        if ncomp != NUM_COMPLETIONS:
            raise LlmpyError(f"{where}: {ncomp} completions; llm.c's format has {NUM_COMPLETIONS}")
        if not 0 <= label < ncomp:
            raise LlmpyError(f"{where}: label {label} out of range 0..{ncomp - 1}")
        if nctx == 0:
            raise LlmpyError(f"{where}: empty context (the first completion token needs one before it)")
        p = 6 + nctx
        context, completions = rec[6:p], []
        for c in range(ncomp):
            if p >= nwords:
                raise LlmpyError(f"{where}: record ends inside completion {c}")
            m = int(rec[p])
            if m == 0 or p + 1 + m > nwords:
                raise LlmpyError(f"{where}: completion {c} has bad length {m}")
            completions.append(rec[p + 1:p + 1 + m])
            p += 1 + m
        if p != nwords:
            raise LlmpyError(f"{where}: byte count {2 * nwords} does not match its contents ({2 * p})")
        examples.append(Example.make(index, label, context, completions))
        pos += nwords
    if pos != s.size:
        raise LlmpyError(f"{path}: {2 * (s.size - pos)} unexpected bytes after the {n} examples")
    return examples


# -------------------------------------------------------------------------------------------------
# Rendering and scoring


def render_example(ex: Example, T: int):
    """The example's 4 rows, llm.c's EvalLoader layout: tokens (4, T) int32 with context then completion,
    targets (4, T) int32 and mask (4, T) bool, true exactly where the target is a completion token
    (position n_ctx + i - 1 predicts completion token i). Returns (tokens, targets, mask, truncated)."""
    tokens = np.zeros((NUM_COMPLETIONS, T), dtype=np.int32)
    targets = np.zeros((NUM_COMPLETIONS, T), dtype=np.int32)
    mask = np.zeros((NUM_COMPLETIONS, T), dtype=bool)
    truncated = False
    for c, comp in enumerate(ex.completions):
        ctx = ex.context
        if len(ctx) + len(comp) > T:        # keep the end of the context and, if possible, all of comp
            truncated = True
            keep_ctx = max(T - len(comp), 1)
            ctx, comp = ctx[len(ctx) - keep_ctx:], comp[:T - keep_ctx]
        n_ctx, n_c = len(ctx), len(comp)
        tokens[c, :n_ctx] = ctx
        tokens[c, n_ctx:n_ctx + n_c] = comp
        targets[c, n_ctx - 1:n_ctx + n_c - 1] = comp
        mask[c, n_ctx - 1:n_ctx + n_c - 1] = True
    return tokens, targets, mask, truncated


def _host(x) -> np.ndarray:
    """A float32 host copy of a NumPy or CuPy array."""
    return np.asarray(x.get() if hasattr(x, "get") else x, dtype=np.float32)


def completion_losses(model, examples, B: int, T: int, *, progress=None):
    """Mean completion loss of every (example, completion): float64 (N, 4). Also returns the number of
    truncated examples. model: a GPT (any backend) whose forward(inp (B, T)) returns logits (B, T, Vp)."""
    if B < NUM_COMPLETIONS:
        raise LlmpyError(f"HellaSwag needs a batch size of at least {NUM_COMPLETIONS} (one example is "
                         f"{NUM_COMPLETIONS} rows), got B={B}")
    if T < 2:
        raise LlmpyError(f"HellaSwag needs T >= 2, got T={T}")
    V, xp = model.config.vocab_size, model.xp
    per_batch = B // NUM_COMPLETIONS
    out = np.zeros((len(examples), NUM_COMPLETIONS), dtype=np.float64)
    n_truncated = 0
    for start in range(0, len(examples), per_batch):
        chunk = examples[start:start + per_batch]
        inp = np.zeros((B, T), dtype=np.int32)
        tgt = np.zeros((B, T), dtype=np.int32)
        mask = np.zeros((B, T), dtype=bool)
        for e, ex in enumerate(chunk):
            rows = slice(NUM_COMPLETIONS * e, NUM_COMPLETIONS * (e + 1))
            inp[rows], tgt[rows], mask[rows], cut = render_example(ex, T)
            n_truncated += cut
        if int(max(inp.max(), tgt.max())) >= V:
            raise LlmpyError(f"eval example {start}..{start + len(chunk) - 1}: token id >= the model's "
                             f"vocab_size {V}")
        logits = model.forward(xp.asarray(inp))
        for r in range(NUM_COMPLETIONS * len(chunk)):
            pos = np.flatnonzero(mask[r])                       # contiguous: a plain slice of the logits
            # whole Vp-wide rows (one contiguous block: a plain device-to-host copy), then the V real columns
            z = _host(logits[r, pos[0]:pos[-1] + 1])[:, :V].astype(np.float64)      # (n_c, V)
            zmax = z.max(axis=1)
            lse = zmax + np.log(np.exp(z - zmax[:, None]).sum(axis=1))       # log-sum-exp per position
            out[start + r // NUM_COMPLETIONS, r % NUM_COMPLETIONS] = np.mean(lse - z[np.arange(pos.size),
                                                                                     tgt[r, pos]])
        if progress is not None:
            progress(min(start + per_batch, len(examples)), len(examples))
    return out, n_truncated


def evaluate_examples(model, examples, B: int, T: int, *, log=print, return_predictions: bool = False):
    """acc_norm of `model` on a list of Examples, logged as 'HellaSwag: correct/N = acc'.
    With return_predictions=True returns (accuracy, predictions int (N,), labels int (N,))."""
    if not examples:
        raise LlmpyError("HellaSwag: no examples to evaluate")
    show = sys.stderr.isatty() and len(examples) > 100

    def progress(done, total):
        if show:
            print(f"\rhellaswag {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    losses, n_truncated = completion_losses(model, examples, B, T, progress=progress)
    preds = np.argmin(losses, axis=1)                        # first index wins ties, as llm.c
    labels = np.array([ex.label for ex in examples])
    correct = int((preds == labels).sum())
    acc = correct / len(examples)
    note = f" ({n_truncated} examples longer than T={T} lost context from the left)" if n_truncated else ""
    log(f"HellaSwag: {correct}/{len(examples)} = {acc:.4f} acc_norm{note}")
    return (acc, preds, labels) if return_predictions else acc


def evaluate_hellaswag(model, B: int, T: int, *, path: str = DEFAULT_PATH, log=print,
                       max_examples: int = -1, return_predictions: bool = False):
    """acc_norm of `model` on the eval file at `path` (its first max_examples, or all when -1), with
    (B, T) forwards (the training shapes when called from the train loop)."""
    examples = read_eval_file(path)
    if max_examples >= 0:
        examples = examples[:max_examples]
    return evaluate_examples(model, examples, B, T, log=log, return_predictions=return_predictions)
