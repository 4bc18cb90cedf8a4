"""FineWeb / FineWeb-Edu samples as llm.c token shards (the data of llm.c's dev/data/fineweb.py).

    python scripts/prepare_fineweb.py -t classic -v 10B     # -> data/fineweb10B/fineweb_{val,train}_*.bin
    python scripts/prepare_fineweb.py -t edu -v 10B         # -> data/edu_fineweb10B/edu_fineweb_*.bin

Needs internet and `pip install datasets` (the Hub dataset HuggingFaceFW/fineweb[-edu], config
sample-10BT or sample-100BT, ~30 GB of parquet for 10B). Every document becomes EOT + GPT-2 tokens,
tokenized in a process pool; the stream is cut into shards of exactly --shard-size tokens (documents
straddle the cuts, the last shard holds the remainder); shard 000000 is val, the rest train:
    wrote data/fineweb10B/fineweb_val_000000.bin (100,000,000 tokens)
    wrote data/fineweb10B/fineweb_train_000001.bin (100,000,000 tokens)
    ... (about 103 train shards for classic 10B, 99 for edu; llm.c's counts, not run here)
Then: llmpy train -i 'data/fineweb10B/fineweb_train_*.bin' -j 'data/fineweb10B/fineweb_val_*.bin' ...
"""
import argparse
import multiprocessing as mp
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))   # run from a checkout

from llmpy.datasets import ShardWriter, tokenize_document                             # noqa: E402

HUB = {"classic": "HuggingFaceFW/fineweb", "edu": "HuggingFaceFW/fineweb-edu"}
REMOTE = {"10B": "sample-10BT", "100B": "sample-100BT"}
PREFIX = {"classic": "fineweb", "edu": "edu_fineweb"}


def download(kind: str, version: str):
    """The Hub dataset (downloaded and cached by `datasets`); an iterable of {"text": ...} rows."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise SystemExit("prepare_fineweb.py needs Hugging Face datasets: pip install datasets") from None
    return load_dataset(HUB[kind], name=REMOTE[version], split="train")


def tokenize(docs, out_dir: str, name: str, shard_size: int, *, workers: int = 1, log=print) -> list[str]:
    """Tokenize docs (str or {"text": str}) with `workers` processes and write the shards; returns paths."""
    writer = ShardWriter(out_dir, name, shard_size, log=log)
    if workers <= 1:
        for doc in docs:
            writer.add(tokenize_document(doc))
    else:
        with mp.Pool(workers) as pool:                     # imap keeps the document order
            for tokens in pool.imap(tokenize_document, docs, chunksize=16):
                writer.add(tokens)
    paths = writer.close()
    log(f"{len(paths)} shards, {writer.total_tokens:,} tokens in {out_dir}")
    return paths


def main(argv=None, log=print) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-t", "--type", default="classic", choices=tuple(HUB), help="FineWeb or FineWeb-Edu")
    p.add_argument("-v", "--version", default="10B", choices=tuple(REMOTE), help="sample size in tokens")
    p.add_argument("-s", "--shard-size", type=int, default=10**8, help="tokens per shard")
    p.add_argument("--out", default=None, help="output directory (default data/{fineweb|edu_fineweb}{10B|100B})")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 2), help="tokenizer processes")
    args = p.parse_args(argv)
    out = args.out or os.path.join("data", f"{PREFIX[args.type]}{args.version}")
    return tokenize(download(args.type, args.version), out, PREFIX[args.type], args.shard_size,
                    workers=args.workers, log=log)


if __name__ == "__main__":
    main()
