"""HellaSwag as llm.c's eval file (the data of llm.c's dev/data/hellaswag.py), for `llmpy eval-hellaswag`
and `llmpy train -h 1`.

    python scripts/prepare_hellaswag.py [--split val] [--out data/hellaswag]

Output (needs internet: raw.githubusercontent.com/rowanz/hellaswag; expected from llm.c's file, since
this machine had no internet to run it):
    wrote data/hellaswag/hellaswag_val.bin: 10,042 examples, 3.6 MB (longest example N tokens)
Each example: the context `ctx` tokenized as is and each ending tokenized with a leading space (GPT-2
BPE), the label, 4 endings (format in llmpy/hellaswag.py, llmc-facts.md §3.4). The JSONL download is
resumable (.part file) and kept in --out.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))   # run from a checkout

from llmpy import datasets                                                             # noqa: E402
from llmpy.hellaswag import Example, write_eval_file                                  # noqa: E402

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"


def download(out_dir: str, split: str, timeout: float = 30.0) -> str:
    """Path of hellaswag_{split}.jsonl in out_dir, downloaded (resumably) when missing."""
    path = os.path.join(out_dir, f"hellaswag_{split}.jsonl")
    try:
        return datasets.download_file(URL.format(split=split), path, timeout=timeout)
    except OSError as e:
        raise SystemExit(f"cannot download {URL.format(split=split)} ({e}); HellaSwag needs internet once") from None


def render(row: dict, index: int, encode) -> Example:
    """One JSONL row -> Example: context tokens, ' ' + ending tokens for each of the 4 endings, label."""
    if len(row["endings"]) != 4:
        raise ValueError(f"row {index}: {len(row['endings'])} endings, expected 4")
    return Example.make(index, row["label"], encode(row["ctx"]), [encode(" " + e) for e in row["endings"]])


def tokenize(jsonl_path: str, encode=None) -> list[Example]:
    """All rows of a HellaSwag JSONL file as Examples, in file order."""
    if encode is None:
        from llmpy.tokenizer import gpt2_encoding
        encode = gpt2_encoding().encode_ordinary
    with open(jsonl_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [render(row, i, encode) for i, row in enumerate(rows)]


def main(argv=None, log=print) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--split", default="val", choices=("val", "train"), help="HellaSwag split (test has no labels)")
    p.add_argument("--out", default="data/hellaswag", help="output directory")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    examples = tokenize(download(args.out, args.split))
    path = os.path.join(args.out, f"hellaswag_{args.split}.bin")
    size = write_eval_file(path, examples)
    longest = max(e.num_tokens() for e in examples)
    log(f"wrote {path}: {len(examples):,} examples, {size / 1e6:.1f} MB (longest example {longest} tokens)")
    return path


if __name__ == "__main__":
    main()
