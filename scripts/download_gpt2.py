"""Download OpenAI's GPT-2 weights from the Hugging Face Hub and convert them to llm.c model files.

    python scripts/download_gpt2.py gpt2 [gpt2-medium gpt2-large gpt2-xl] [--out .]

Needs internet and `pip install huggingface_hub`. For each model it fetches config.json and
model.safetensors of openai-community/<name> (into the Hub cache) and writes llm.c's files:
    wrote ./gpt2_124M.bin (fp32): L=12 NH=12 C=768 maxT=1024 V=50257 Vp=50304      497,904,640 bytes
    wrote ./gpt2_124M_bf16.bin (bf16): L=12 NH=12 C=768 maxT=1024 V=50257 Vp=50304 248,952,832 bytes
(gpt2-medium -> gpt2_350M, gpt2-large -> gpt2_774M, gpt2-xl -> gpt2_1558M), plus gpt2_tokenizer.bin
(built offline from the GPT-2 BPE). Then e.g. `llmpy sample -e gpt2_124M.bin --prompt "Hello"`.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))   # run from a checkout

from llmpy.checkpoint import save_model                                                # noqa: E402
from llmpy.hf import load_hf                                                           # noqa: E402

MODELS = {"gpt2": "124M", "gpt2-medium": "350M", "gpt2-large": "774M", "gpt2-xl": "1558M"}


def download(name: str) -> str:
    """Local directory with config.json and model.safetensors of openai-community/<name>."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SystemExit("download_gpt2.py needs huggingface_hub: pip install huggingface_hub") from None
    return snapshot_download(repo_id=f"openai-community/{name}", allow_patterns=["config.json", "model.safetensors"])


def convert(hf_dir: str, out_dir: str, size: str, log=print) -> list[str]:
    """Write gpt2_<size>.bin (fp32, v3) and gpt2_<size>_bf16.bin (bf16, v5) from one read of the weights."""
    cfg, flat = load_hf(hf_dir)
    paths = []
    for dtype, suffix in (("fp32", ""), ("bf16", "_bf16")):
        path = os.path.join(out_dir, f"gpt2_{size}{suffix}.bin")
        save_model(path, cfg, flat, dtype=dtype)
        log(f"wrote {path} ({dtype}): L={cfg.num_layers} NH={cfg.num_heads} C={cfg.channels} "
            f"maxT={cfg.max_seq_len} V={cfg.vocab_size} Vp={cfg.padded_vocab_size} {os.path.getsize(path):,} bytes")
        paths.append(path)
    return paths


def main(argv=None, log=print) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="*", help=f"Hub model names: {', '.join(MODELS)} (default: gpt2)")
    p.add_argument("--out", default=".", help="output directory for the .bin files")
    args = p.parse_args(argv)
    args.models = args.models or ["gpt2"]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    os.makedirs(args.out, exist_ok=True)
    paths = []
    for name in args.models:
        paths += convert(download(name), args.out, MODELS[name], log)
    from llmpy.tokenizer import gpt2_encoding, write_tokenizer_bin
    tok_path = os.path.join(args.out, "gpt2_tokenizer.bin")
    write_tokenizer_bin(tok_path, gpt2_encoding())
    log(f"wrote {tok_path}")
    return paths + [tok_path]


if __name__ == "__main__":
    main()
