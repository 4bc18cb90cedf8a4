"""`llmpy sample` and `llmpy eval-hellaswag`: load a model file, run it, print the result.

    llmpy sample -e gpt2_124M.bin --prompt "The meaning of life" -n 64 --top-k 40 --seed 1337
    llmpy eval-hellaswag -e gpt2_124M.bin -b 16

Both build the same GPT as training does (llmpy.model.GPT on the CPU or GPU backend). Information
lines go to stderr, so `llmpy sample ... > out.txt` captures only the generated text.
"""
from __future__ import annotations

import codecs
import sys

from llmpy.errors import LlmpyError


def load_gpt(path: str, device: str, *, batch_size: int, seq_len: int, log):
    """A GPT for an llm.c model file on 'auto' | 'cpu' | 'cuda'; call .close() when done. On the GPU
    the engine is planned for (batch_size, seq_len), without master weights or a CUDA graph.
    No optimizer state is allocated. A nanochat directory (llmpy/families.py) gives that family's model."""
    from llmpy.checkpoint import load_model
    from llmpy.families import is_nanochat, load_for_inference
    from llmpy.train import inference_config, model_factory, resolve_device
    device = resolve_device(device)
    if is_nanochat(path):
        return load_for_inference(path, device, batch_size=batch_size, seq_len=seq_len, log=log)
    cfg, params = load_model(path)
    log(f"model: {path} (L={cfg.num_layers} NH={cfg.num_heads} C={cfg.channels} maxT={cfg.max_seq_len} "
        f"V={cfg.vocab_size}), device: {device}")
    tcfg = inference_config(device, batch_size, min(seq_len, cfg.max_seq_len))
    return model_factory(tcfg, device, log=log, inference=True)(cfg, params)


def _info(msg: str):
    print(msg, file=sys.stderr)


def sample_command(args, *, out=None) -> list[int]:
    """Generate args.num_tokens tokens after args.prompt (empty: after <|endoftext|>) and print the text.
    The same model, prompt, seed, temperature and top-k always give the same text. Returns all tokens."""
    from llmpy.rng import XorShiftStar
    from llmpy.sample import generate
    from llmpy.tokenizer import Tokenizer
    out = out or sys.stdout
    if args.num_tokens < 0:
        raise LlmpyError(f"-n/--num-tokens must be >= 0, got {args.num_tokens}")
    if not args.temperature > 0:
        raise LlmpyError(f"--temperature must be positive, got {args.temperature}")
    if args.top_k < 0:
        raise LlmpyError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 <= args.seed < 2 ** 64:
        raise LlmpyError(f"--seed must fit in 64 bits, got {args.seed}")
    model = load_gpt(args.model, args.device, batch_size=1, seq_len=64, log=_info)
    cfg = model.config
    tok = Tokenizer.gpt2()
    prompt = tok.encode(args.prompt) if args.prompt else [min(tok.eot_token, cfg.vocab_size - 1)]
    if max(prompt) >= cfg.vocab_size:
        raise LlmpyError(f"--prompt: token id {max(prompt)} is outside the model's vocabulary ({cfg.vocab_size})")
    if len(prompt) >= cfg.max_seq_len:
        raise LlmpyError(f"--prompt is {len(prompt)} tokens; the model's context is {cfg.max_seq_len}")
    room = cfg.max_seq_len - len(prompt)
    if args.num_tokens > room:
        _info(f"note: generating {room} tokens, not {args.num_tokens}: the context holds {cfg.max_seq_len}")
    _info(f"sampling: seed {args.seed}, temperature {args.temperature}, top-k {args.top_k or 'off'}")

    # stream the text as it comes; the incremental decoder holds back partial UTF-8 characters
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out.write(args.prompt)

    def show(t: int):
        out.write(utf8.decode(tok.backend.decode_bytes([t]) if t < tok.n_vocab else f"<{t}>".encode()))
        out.flush()

    try:
        tokens = generate(model, prompt, args.num_tokens, XorShiftStar(args.seed),
                          temperature=args.temperature, top_k=args.top_k, on_token=show)
    finally:
        model.close()
    out.write(utf8.decode(b"", final=True) + "\n")
    out.flush()
    return tokens


def hellaswag_command(args) -> float:
    """HellaSwag acc_norm of args.model on args.data, printed to stdout. Returns the accuracy."""
    from llmpy.hellaswag import evaluate_examples, read_eval_file
    examples = read_eval_file(args.data)           # validate the data before loading a large model
    if args.max_examples >= 0:
        examples = examples[:args.max_examples]
    if args.batch_size < 4 or args.batch_size % 4:
        raise LlmpyError(f"-b/--batch-size must be a positive multiple of 4, got {args.batch_size}")
    # rows only need to hold the longest example; causal attention makes the result independent of T
    longest = max((ex.num_tokens() for ex in examples), default=1)
    T = min(args.seq_len, -(-longest // 64) * 64)
    model = load_gpt(args.model, args.device, batch_size=args.batch_size, seq_len=T, log=_info)
    try:
        T = min(T, model.config.max_seq_len)
        _info(f"hellaswag: {len(examples)} examples from {args.data}, rows of T={T} (longest example "
              f"{longest} tokens), B={args.batch_size}")
        return evaluate_examples(model, examples, args.batch_size, T, log=print)
    finally:
        model.close()
