"""`llmpy` command line: argv -> configs -> work. Also `python -m llmpy`.

    llmpy train [flags]          train GPT-2 (flags of llm.c's train_gpt2cu, plus readable long names)
    llmpy sample -e MODEL.bin    generate text from a model file
    llmpy import-hf / export-hf  convert between Hugging Face GPT-2 and llm.c .bin files
    llmpy eval-hellaswag         HellaSwag accuracy of a model file

The `train` flags are derived from `llmpy.train.TrainConfig`, so every default lives in one place. User
errors (bad files, bad flags) print one line naming the file or flag and exit non-zero, without a
traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from llmpy.errors import LlmpyError
from llmpy.rundir import Interrupted, os_error


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (no usage dump) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _train_parser(sub) -> argparse.ArgumentParser:
    from llmpy.train import TrainConfig
    p = sub.add_parser("train", help="train GPT-2", add_help=False, description="Train GPT-2 (llm.c flags).")
    p.add_argument("--help", action="help", help="show this help and exit")   # -h is llm.c's HellaSwag flag
    for f in dataclasses.fields(TrainConfig):
        long = "--" + f.name.replace("_", "-")
        names = [f.metadata["short"], long] if f.metadata["short"] else [long]
        kind = type(f.default)
        choices = f.metadata.get("choices")
        listed = f"choices: {', '.join(map(str, choices))}; " if choices else ""
        help_text = f"{f.metadata['help']} ({listed}default: {f.default!r})".replace("%", "%%")
        # SUPPRESS: only flags the user typed reach the namespace (the embedded preset fills the rest)
        p.add_argument(*names, dest=f.name, type=kind, default=argparse.SUPPRESS, help=help_text,
                       choices=choices, metavar=kind.__name__.upper())
    return p


def _hellaswag_flag_without_value(argv) -> bool:
    """`llmpy train -h` (or -h followed by another flag): the user wants help, not llm.c's -h 0|1."""
    if not argv or argv[0] != "train" or "-h" not in argv:
        return False
    i = argv.index("-h")
    return i + 1 == len(argv) or argv[i + 1] not in ("0", "1")


def _sample_parser(sub):
    p = sub.add_parser("sample", help="generate text from a model file")
    p.add_argument("-e", "--model", required=True, help="model .bin (llm.c v3 or v5)")
    p.add_argument("--prompt", default="", help="text to continue (default: start from <|endoftext|>)")
    p.add_argument("-n", "--num-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: all)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def _hf_parsers(sub):
    p = sub.add_parser("import-hf", help="Hugging Face GPT-2 directory -> llm.c .bin")
    p.add_argument("hf_dir", help="directory with config.json and model.safetensors")
    p.add_argument("out", help="output .bin")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p = sub.add_parser("export-hf", help="llm.c .bin -> Hugging Face GPT-2 directory")
    p.add_argument("model", help="model .bin (v3 or v5)")
    p.add_argument("out_dir", help="output directory (config.json + model.safetensors)")
    p = sub.add_parser("eval-hellaswag", help="HellaSwag accuracy of a model")
    p.add_argument("-e", "--model", required=True, help="model .bin")
    p.add_argument("--data", default="data/hellaswag/hellaswag_val.bin", help="llm.c eval file")
    p.add_argument("-b", "--batch-size", type=int, default=4, help="rows per forward (multiple of 4)")
    p.add_argument("-t", "--seq-len", type=int, default=1024, help="row length T")
    p.add_argument("--max-examples", type=int, default=-1, help="evaluate only the first N (-1: all)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmpy", description="GPT-2 training, llm.c-compatible, in Python.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _train_parser(sub)
    _sample_parser(sub)
    _hf_parsers(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if _hellaswag_flag_without_value(argv):
        print("llmpy train: -h is llm.c's HellaSwag flag and takes 0 or 1 (-h 1); for help use --help",
              file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "train":
            from llmpy.train import TrainConfig, train, with_embedded_defaults
            given = {k: v for k, v in vars(args).items() if k != "command"}
            train(with_embedded_defaults(TrainConfig(**given), set(given)))
        elif args.command == "sample":
            from llmpy.commands import sample_command
            sample_command(args)
        elif args.command == "import-hf":
            from llmpy.hf import import_hf
            import_hf(args.hf_dir, args.out, dtype=args.dtype)
        elif args.command == "export-hf":
            from llmpy.hf import export_hf
            export_hf(args.model, args.out_dir)
        elif args.command == "eval-hellaswag":
            from llmpy.commands import hellaswag_command
            hellaswag_command(args)
    except Interrupted as e:   # SIGTERM/SIGINT: the run saved its checkpoint and says where (rank 0)
        if not getattr(e, "quiet", False):
            print(f"llmpy {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except LlmpyError as e:
        if not getattr(e, "quiet", False):   # an error every rank of a multi-process run raised: rank 0 says it
            print(f"llmpy {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:       # one line naming the path (disk full, read-only, not a directory, ...)
        print(f"llmpy {args.command}: error: {os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"llmpy {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
