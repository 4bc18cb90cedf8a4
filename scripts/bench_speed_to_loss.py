"""Speed to loss on the CPU: nanochat's GPT (AdamW, Muon) against GPT-2 of about the same size.

    python scripts/bench_speed_to_loss.py --out scripts/results/cpu            # a few minutes, 1 thread
    python scripts/bench_speed_to_loss.py --quick --out out/stl                # seconds: a smoke test

Data: the embedded default corpus (llmpy/corpus.py prepare_default), GPT-2 tokens remapped to a small
vocabulary: the --vocab - 1 most frequent train tokens keep an id (by frequency), every other token
becomes one <unk> id. The same remapped shards feed every model, so all see the same tokens in the same
order; the small vocabulary keeps the classifier (50,257 columns otherwise) from dominating CPU time
and parameter count, so the blocks, where the architectures differ, carry the comparison.

Runs (each the real trainer, llmpy.train.train, same batches, same schedule: linear warmup, cosine to
10%, weight decay 0.1, clipping at 1.0):
  nanochat-adamw  nanochat's GPT (llmpy/nanochat.py) with nanochat's init, AdamW on every tensor
  nanochat-muon   the same model, Muon on the block matrices (--muon-lr), AdamW on wte and lm_head
  gpt2            GPT-2 (llmpy/model.py, llm.c's init) as wide as makes its parameter count closest to
                  the nanochat model's (the nanochat model's untied head counts in its total)
Reported: the val-loss curves (one PNG), the final val loss of each, the ms per step of each run's
steps (median, after the first), and a separate interleaved step-time measurement (ABAB... so machine
load affects each alike) of the nanochat model (AdamW and Muon steps) against the same-size GPT-2.
--sweep adds runs at other learning rates (AdamW lr / 3 and x 3.3 for nanochat-adamw and gpt2, Muon lr
/ 2 and x 2 for nanochat-muon): final val losses only, so that no model is judged at a bad lr. Writes
DIR/speed_to_loss.json and DIR/speed_to_loss.png. Timings are only comparable on an otherwise idle machine.
"""
from __future__ import annotations

import os
import sys

# BLAS reads its thread count once, when NumPy is imported: set it first (--threads, default 1). On a
# shared, oversubscribed machine OpenBLAS's threads spin against each other and small GEMMs (Muon's
# Newton-Schulz products above all) slow down tenfold; one thread per run keeps the comparison fair.
if __name__ == "__main__":
    _threads = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--threads"), "1")
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = _threads

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchutil as bu  # noqa: E402
import llmpy.cpu as ops  # noqa: E402
from llmpy import families  # noqa: E402
from llmpy.checkpoint import save_model  # noqa: E402
from llmpy.data import HEADER_BYTES, read_shard_header, write_shard  # noqa: E402
from llmpy.model import GPT, GPTConfig, num_parameters  # noqa: E402
from llmpy.nanochat import NanoChat, NanoChatConfig  # noqa: E402
from llmpy.nanochat import init_params as nanochat_init  # noqa: E402
from llmpy.rng import init_params as gpt_init  # noqa: E402
from llmpy.train import TrainConfig, train  # noqa: E402


def remap_corpus(train_path: str, val_path: str, vocab: int, out_dir: Path) -> tuple[str, str]:
    """Write train/val shards whose ids are frequency ranks (< vocab - 1) or vocab - 1 (<unk>)."""
    train_tok, val_tok = (np.fromfile(path, dtype="<u2", offset=HEADER_BYTES, count=read_shard_header(path))
                          for path in (train_path, val_path))
    counts = np.bincount(train_tok, minlength=65536)
    keep = np.argsort(-counts, kind="stable")[:vocab - 1]
    table = np.full(65536, vocab - 1, dtype=np.uint16)
    table[keep] = np.arange(vocab - 1, dtype=np.uint16)
    paths = []
    for name, tok in (("train", train_tok), ("val", val_tok)):
        path = str(out_dir / f"{name}.bin")
        write_shard(path, table[tok])
        paths.append(path)
    return paths[0], paths[1]


def gpt2_matching(target: int, vocab: int, n_layer: int, n_head: int, T: int) -> GPTConfig:
    """The GPT-2 (n_layer layers, n_head heads) whose parameter count is closest to target."""
    best = None
    for C in range(n_head * 8, 2048, n_head * 8):   # head size a multiple of 8
        cfg = GPTConfig(T, vocab, -(-vocab // 128) * 128, n_layer, n_head, C)
        if best is None or abs(num_parameters(cfg) - target) < abs(num_parameters(best) - target):
            best = cfg
    return best


def run(name: str, model_spec: str, data: tuple[str, str], args, out_root: Path, **extra) -> dict:
    """One training run through the real trainer; returns its val curve and step times."""
    out_dir = out_root / name
    cfg = TrainConfig(train_data=data[0], val_data=data[1], model=model_spec, output_dir=str(out_dir),
                      batch_size=args.batch, seq_len=args.seq, max_steps=args.steps, learning_rate=args.lr,
                      warmup_steps=args.warmup, final_lr_frac=0.1, weight_decay=0.1, val_every=args.val_every,
                      val_max_steps=args.val_batches, sample_every=0, device="cpu", **extra)
    lines = []
    t0 = time.perf_counter()
    train(cfg, log=lines.append)
    wall = time.perf_counter() - t0
    with open(out_dir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    ms = [r["ms"] for r in rows if r["split"] == "train"]
    val = [(r["step"], r["loss"]) for r in rows if r["split"] == "val"]
    print(f"{name:16s} val {val[-1][1]:.4f} after {val[-1][0]} steps, {bu.median(ms[1:]):.0f} ms/step, "
          f"{wall:.0f} s", flush=True)
    return {"val": val, "train": [r["loss"] for r in rows if r["split"] == "train"],
            "ms_per_step_median": bu.median(ms[1:]), "wall_s": wall}


def interleaved_step_times(models: dict, args, reps: int) -> dict:
    """Median ms of one training step (zero_grad, forward_backward, grad_norm, update) per model, the
    models taking turns so that changing machine load hits each alike."""
    rng = np.random.default_rng(0)
    vocab = args.vocab
    inp = rng.integers(0, vocab, (args.batch, args.seq)).astype(np.int32)
    tgt = rng.integers(0, vocab, (args.batch, args.seq)).astype(np.int32)
    times = {k: [] for k in models}
    for rep in range(reps + 1):                       # rep 0 warms up (allocations)
        for name, model in models.items():
            t0 = time.perf_counter()
            model.zero_grad()
            model.forward_backward(inp, tgt, 1.0 / inp.size)
            model.grad_norm()
            model.update(lr=args.lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, t=rep + 1)
            if rep:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"ms_median": bu.median(t), "ms_all": t} for name, t in times.items()}


def plot(results: dict, meta: dict, path: Path):
    plt = bu.pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in results.items():
        steps, losses = zip(*r["val"])
        ax.plot([s * meta["tokens_per_step"] for s in steps], losses, marker="o", ms=3,
                label=f"{name} ({meta['params'][name] / 1e6:.2f}M params)")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("val loss")
    ax.set_title(f"speed to loss on the CPU: embedded corpus, vocab {meta['vocab']}, B={meta['batch']} T={meta['seq']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="scripts/results/cpu", help="where the JSON and PNG go")
    p.add_argument("--quick", action="store_true", help="a few steps of a tiny model (smoke test)")
    p.add_argument("--depth", type=int, default=4, help="nanochat layers (n_embd = 32 depth here, see --width)")
    p.add_argument("--width", type=int, default=128, help="nanochat n_embd")
    p.add_argument("--heads", type=int, default=4, help="nanochat n_head (= n_kv_head) and GPT-2's heads")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak lr (every run)")
    p.add_argument("--muon-lr", type=float, default=0.02)
    p.add_argument("--val-every", type=int, default=25)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--timing-reps", type=int, default=10)
    p.add_argument("--threads", default="1", help="BLAS threads (read before NumPy loads)")
    p.add_argument("--sweep", action="store_true", help="also runs at other learning rates (final val only)")
    args = p.parse_args(argv)
    if args.quick:
        args.depth, args.width, args.heads, args.vocab, args.steps, args.val_every = 1, 32, 2, 512, 6, 3
        args.warmup, args.timing_reps, args.val_batches = 2, 2, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from llmpy.corpus import prepare_default
    with tempfile.TemporaryDirectory(prefix="llmpy-stl-") as tmp:
        tmp = Path(tmp)
        data = remap_corpus(*prepare_default(log=lambda *a: None), args.vocab, tmp)
        nc = NanoChatConfig(args.depth, args.heads, args.heads, args.width, args.vocab, args.seq)
        nc_dir = str(tmp / "nanochat_init")
        families.save_model_dir(nc_dir, nc, nanochat_init(nc))
        n_nc = sum(math.prod(s) for s in families.param_shapes(nc).values())
        g2 = gpt2_matching(n_nc, args.vocab, args.depth, args.heads, args.seq)
        g2_path = str(tmp / "gpt2_init.bin")
        save_model(g2_path, g2, gpt_init(g2))
        params = {"nanochat-adamw": n_nc, "nanochat-muon": n_nc, "gpt2": num_parameters(g2)}
        print(f"nanochat: L={nc.n_layer} C={nc.n_embd} heads={nc.n_head} D={nc.head_dim}, {n_nc:,} params; "
              f"gpt2: L={g2.num_layers} C={g2.channels} heads={g2.num_heads}, {num_parameters(g2):,} params; "
              f"vocab {args.vocab}, {args.steps} steps of {args.batch * args.seq} tokens", flush=True)
        results = {
            "nanochat-adamw": run("nanochat-adamw", nc_dir, data, args, tmp),
            "nanochat-muon": run("nanochat-muon", nc_dir, data, args, tmp, optimizer="muon", muon_lr=args.muon_lr),
            "gpt2": run("gpt2", g2_path, data, args, tmp),
        }
        sweep = {}
        if args.sweep:
            base_lr, base_muon = args.lr, args.muon_lr
            for scale in (1 / 3, 10 / 3):
                args.lr = base_lr * scale
                for name, spec in (("nanochat-adamw", nc_dir), ("gpt2", g2_path)):
                    sweep[f"{name} lr={args.lr:.2g}"] = run(f"{name}-lr{args.lr:.2g}", spec, data, args, tmp)["val"][-1][1]
            args.lr = base_lr
            for muon_lr in (base_muon / 2, base_muon * 2):
                sweep[f"nanochat-muon muon_lr={muon_lr:.2g}"] = run(f"nanochat-muon-{muon_lr:.2g}", nc_dir, data, args,
                                                                   tmp, optimizer="muon", muon_lr=muon_lr)["val"][-1][1]
        models = {"nanochat": NanoChat(nc, ops, params=nanochat_init(nc)),
                  "nanochat-muon": NanoChat(nc, ops, params=nanochat_init(nc), optimizer="muon",
                                            muon_lr=args.muon_lr, peak_lr=args.lr),
                  "gpt2": GPT(g2, ops, params=gpt_init(g2))}
        timing = interleaved_step_times(models, args, args.timing_reps)
    meta = {"vocab": args.vocab, "batch": args.batch, "seq": args.seq, "tokens_per_step": args.batch * args.seq,
            "steps": args.steps, "lr": args.lr, "muon_lr": args.muon_lr, "warmup": args.warmup,
            "params": params, "nanochat_config": families.config_to_dict(nc),
            "gpt2_config": {"num_layers": g2.num_layers, "num_heads": g2.num_heads, "channels": g2.channels,
                            "max_seq_len": g2.max_seq_len, "padded_vocab_size": g2.padded_vocab_size}}
    for name, t in timing.items():
        print(f"step time (interleaved, median of {args.timing_reps}): {name} {t['ms_median']:.1f} ms")
    report = {"meta": meta, "runs": results, "step_time_interleaved": timing, "lr_sweep_final_val": sweep,
              **bu.run_metadata("cpu", argv)}
    bu.write_json(out / "speed_to_loss.json", report)
    plot(results, meta, out / "speed_to_loss.png")
    print(f"wrote {out / 'speed_to_loss.json'} and {out / 'speed_to_loss.png'}")
    return report


if __name__ == "__main__":
    main()
