"""TinyStories as llm.c token shards (the data of llm.c's dev/data/tinystories.py).

    python scripts/prepare_tinystories.py [--out data/tinystories]

Needs internet: TinyStories_all_data.tar.gz from the Hugging Face Hub (1.5 GB; the download resumes
from its .part file), unpacked into 50 JSON shards. Shard 0 is val, the other 49 train; each shard's
stories are shuffled with random.Random(1337 + its index within the split), stripped, and each is
EOT + GPT-2 tokens. Expected (llm.c's counts; not run here, no internet):
    wrote data/tinystories/TinyStories_val.bin: 19,043,638 tokens
    wrote data/tinystories/TinyStories_train.bin: 925,653,391 tokens
Unlike llm.c (which appends train shards as their workers finish), the train order is the sorted
shard order, so every run writes the same file.
"""
import argparse
import glob
import json
import multiprocessing as mp
import os
import random
import sys
import tarfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))   # run from a checkout

import numpy as np                                                                      # noqa: E402

from llmpy import datasets                                                             # noqa: E402
from llmpy.data import write_shard                                                     # noqa: E402

URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"


def download(out_dir: str) -> list[str]:
    """The sorted JSON shard paths, downloading and unpacking the archive when needed."""
    data_dir = os.path.join(out_dir, "TinyStories_all_data")
    shards = sorted(glob.glob(os.path.join(data_dir, "*.json")))
    if not shards:
        try:
            archive = datasets.download_file(URL, os.path.join(out_dir, "TinyStories_all_data.tar.gz"))
        except OSError as e:
            raise SystemExit(f"cannot download {URL} ({e}); TinyStories needs internet once") from None
        with tarfile.open(archive) as tar:
            try:
                tar.extractall(data_dir, filter="data")      # refuses paths outside data_dir
            except TypeError:                                 # Python without extraction filters
                tar.extractall(data_dir)
        shards = sorted(glob.glob(os.path.join(data_dir, "*.json")))
    return shards


def tokenize_shard(job) -> np.ndarray:
    """(index within split, JSON path) -> uint16 tokens of its stories, shuffled as llm.c does."""
    index, path = job
    with open(path, encoding="utf-8") as f:
        stories = json.load(f)
    random.Random(1337 + index).shuffle(stories)
    parts = [datasets.tokenize_document(s["story"].strip()) for s in stories]
    return np.concatenate(parts) if parts else np.empty(0, np.uint16)


def tokenize(shards: list[str], out_dir: str, *, workers: int = 1, log=print) -> dict:
    """Write TinyStories_val.bin (shard 0) and TinyStories_train.bin (the rest); returns token counts."""
    counts = {}
    with mp.Pool(workers) if workers > 1 else _Serial() as pool:
        for split, files in (("val", shards[:1]), ("train", shards[1:])):
            parts = list(pool.imap(tokenize_shard, enumerate(files)))
            path = os.path.join(out_dir, f"TinyStories_{split}.bin")
            if len(parts) == 1:
                write_shard(path, parts[0])
            else:
                datasets.write_shard_parts(path, parts)    # ~1.9 GB: no concatenated copy
            counts[split] = sum(p.size for p in parts)
            log(f"wrote {path}: {counts[split]:,} tokens")
    return counts


class _Serial:
    """mp.Pool's imap in this process (for --workers 1 and tests)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, items):
        return map(fn, items)


def main(argv=None, log=print) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/tinystories", help="output directory")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 2), help="tokenizer processes")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    return tokenize(download(args.out), args.out, workers=args.workers, log=log)


if __name__ == "__main__":
    main()
