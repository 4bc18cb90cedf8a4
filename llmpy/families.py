"""Model families: which model `-e` names, how it is built, and how its checkpoints are written.

Two families share the trainer (llmpy/train.py), the sampler and the state files:
  - GPT-2 (llmpy/model.py): `-e` an llm.c .bin file or a descriptor d6 | d12 | ... | gpt3:cN;
  - nanochat (llmpy/nanochat.py): `-e` a directory holding config.json and model.safetensors (nanochat's
    tensor names and shapes, below), or a descriptor `nanochat:dN[:kvK]`: depth N, n_embd = 64 N, head dim
    128 (n_head = ceil(n_embd / 128)), K key/value heads (default n_head), vocab 50257, sequence_len 1024;
    nanochat's init (llmpy/nanochat.py's docstring).
This module is the one place that tells them apart: `is_nanochat(spec)`, `load_checked(...)` (everything
checked before the trainer builds), `build(...)`, and the checkpoint writer `save_model_dir` that
llmpy/checkpoint.py calls for a NanoChatConfig.

nanochat checkpoint directory (also what `-o` writes per step, as model_%08d/, next to llmpy's state file):
  config.json        {"n_layer", "n_head", "n_kv_head", "n_embd", "vocab_size", "sequence_len"}
  model.safetensors  float32: transformer.wte.weight (V, C); transformer.h.{i}.attn.c_q.weight
                     (n_head D, C), .attn.c_k.weight / .attn.c_v.weight (n_kv_head D, C), .attn.c_proj.weight
                     (C, C), .mlp.c_fc.weight (4C, C), .mlp.c_proj.weight (C, 4C); lm_head.weight (V, C).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from llmpy.errors import LlmpyError
from llmpy.model import carve
from llmpy.nanochat import NanoChat, NanoChatConfig, init_params, num_parameters, param_shapes

PREFIX = "nanochat:"
CONFIG_KEYS = ("n_layer", "n_head", "n_kv_head", "n_embd", "vocab_size", "sequence_len")
# llmpy tensor -> nanochat name ({} is the layer) for the per-layer stacks
LAYER_NAMES = {"c_q": "attn.c_q.weight", "c_k": "attn.c_k.weight", "c_v": "attn.c_v.weight",
               "attn_proj": "attn.c_proj.weight", "c_fc": "mlp.c_fc.weight", "mlp_proj": "mlp.c_proj.weight"}
GLOBAL_NAMES = {"wte": "transformer.wte.weight", "lm_head": "lm_head.weight"}

# -------------------------------------------------------------------------------------------------
# Recognising and describing the model


def is_nanochat(spec: str) -> bool:
    """A `nanochat:` descriptor, or a directory with a config.json (GPT-2 models are .bin files)."""
    return spec.startswith(PREFIX) or os.path.isfile(os.path.join(spec, "config.json"))


def config_from_descriptor(desc: str) -> NanoChatConfig:
    """`nanochat:dN` or `nanochat:dN:kvK` -> config; ValueError with what is wrong."""
    parts = desc[len(PREFIX):].split(":")
    depth, kv = parts[0], parts[1] if len(parts) == 2 else "kv0"
    if len(parts) > 2 or not (depth[:1] == "d" and depth[1:].isdigit()) or not (kv[:2] == "kv" and kv[2:].isdigit()):
        raise ValueError("expected nanochat:dN or nanochat:dN:kvK (depth N, K key/value heads), "
                         f"got {desc!r}")
    return NanoChatConfig.from_depth(int(depth[1:]), n_kv_head=int(kv[2:]))


def config_to_dict(cfg: NanoChatConfig) -> dict:
    return {k: getattr(cfg, k) for k in CONFIG_KEYS}


def config_from_file(path: str) -> NanoChatConfig:
    """The config of a checkpoint's config.json; LlmpyError naming the file if it is unusable."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise LlmpyError(f"{path}: cannot read: {e}") from None
    missing = [k for k in CONFIG_KEYS if not isinstance(raw.get(k), int)]
    if missing:
        raise LlmpyError(f"{path}: not a nanochat config: missing or non-integer {', '.join(missing)}")
    try:
        return NanoChatConfig(**{k: raw[k] for k in CONFIG_KEYS})
    except ValueError as e:
        raise LlmpyError(f"{path}: {e}") from None


# -------------------------------------------------------------------------------------------------
# Checkpoint directories


def to_tensors(cfg: NanoChatConfig, flat) -> dict[str, np.ndarray]:
    """nanochat's named tensors (unpadded vocabulary rows) from llmpy's flat float32 buffer."""
    p = carve(np.asarray(flat, dtype=np.float32), param_shapes(cfg))
    out = {GLOBAL_NAMES["wte"]: p["wte"][:cfg.vocab_size]}
    for i in range(cfg.n_layer):
        for name, hf in LAYER_NAMES.items():
            out[f"transformer.h.{i}.{hf}"] = p[name][i]
    out[GLOBAL_NAMES["lm_head"]] = p["lm_head"][:cfg.vocab_size]
    return out


def from_tensors(cfg: NanoChatConfig, tensors: dict, where: str) -> np.ndarray:
    """llmpy's flat buffer from nanochat's named tensors; LlmpyError naming `where` and the tensor if one
    is missing or misshaped."""
    flat = np.zeros(num_parameters(cfg), dtype=np.float32)
    p = carve(flat, param_shapes(cfg))
    V = cfg.vocab_size
    wanted = {GLOBAL_NAMES["wte"]: p["wte"][:V], GLOBAL_NAMES["lm_head"]: p["lm_head"][:V]}
    for i in range(cfg.n_layer):
        for name, hf in LAYER_NAMES.items():
            wanted[f"transformer.h.{i}.{hf}"] = p[name][i]
    for key, dst in wanted.items():
        if key not in tensors:
            raise LlmpyError(f"{where}: tensor {key} is missing")
        src = tensors[key]
        if tuple(src.shape) != dst.shape:
            raise LlmpyError(f"{where}: tensor {key} has shape {tuple(src.shape)}, config.json needs {dst.shape}")
        dst[...] = src
    return flat


def save_model_dir(path: str, cfg: NanoChatConfig, flat) -> None:
    """Write path/config.json and path/model.safetensors, atomically (a temporary directory renamed)."""
    from llmpy.hf import write_safetensors
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config_to_dict(cfg), f, indent=2)
    write_safetensors(os.path.join(tmp, "model.safetensors"), to_tensors(cfg, flat))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def load_model_dir(path: str) -> tuple[NanoChatConfig, np.ndarray]:
    """(config, flat float32 parameters) of a checkpoint directory."""
    from llmpy.hf import read_safetensors
    cfg = config_from_file(os.path.join(path, "config.json"))
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        raise LlmpyError(f"{weights}: no such file")
    try:
        tensors = read_safetensors(weights)
    except (OSError, ValueError, KeyError) as e:
        raise LlmpyError(f"{weights}: cannot read: {e}") from None
    flat = from_tensors(cfg, tensors, weights)
    from llmpy.checkpoint import require_finite
    require_finite(f"{weights}: refusing a damaged model", parameters=flat)   # training and sampling alike
    return cfg, flat


# -------------------------------------------------------------------------------------------------
# Building the model the trainer runs


def load_nanochat(spec: str, *, flag: str = "-e") -> tuple[NanoChatConfig, np.ndarray]:
    """(config, params) from a descriptor (nanochat's init) or a checkpoint directory."""
    if spec.startswith(PREFIX):
        try:
            cfg = config_from_descriptor(spec)
        except ValueError as e:
            raise LlmpyError(f"{flag} {spec}: {e}") from None
        return cfg, init_params(cfg)
    return load_model_dir(spec)


def load_checked(spec: str, tcfg, device: str, load_gpt) -> tuple:
    """(config, host float32 params) of the model `-e spec` names, checked against the TrainConfig tcfg and
    the device before anything is built or written (llmpy/train.py); load_gpt reads a GPT-2 spec."""
    if not is_nanochat(spec):
        if tcfg.optimizer != "adamw":
            raise LlmpyError(f"--optimizer {tcfg.optimizer} trains nanochat models (-e nanochat:dN or a "
                             "nanochat directory); GPT-2 trains with adamw")
        return load_gpt(spec)
    cfg, params = load_nanochat(spec)   # a directory's weights are checked finite as they load
    if tcfg.seq_len > cfg.sequence_len:
        raise LlmpyError(f"-t/--seq-len {tcfg.seq_len} exceeds the model's sequence_len {cfg.sequence_len}")
    return cfg, params


def zero_layout(cfg, optimizer: str) -> tuple:
    """(shapes, unstacked, by_layer) of the model ZeRO-1 will shard (llmpy/dist/zero.py), from its config:
    the tensors of one slice each, and those sharded by whole layers (Muon's block matrices)."""
    from llmpy.model import GPT
    from llmpy.model import param_shapes as gpt_shapes
    family, shapes = (NanoChat, param_shapes(cfg)) if isinstance(cfg, NanoChatConfig) else (GPT, gpt_shapes(cfg))
    return shapes, family.unstacked, family.whole_matrix_tensors(optimizer)


def build(cfg, params, tcfg, make_gpt, *, device: str = "cpu", log=print):
    """The model for load_checked's (config, params): a NanoChat (on `device`: the CPU model, or the GPU
    engine llmpy/gpu/nanochat_engine.py for 'cuda'), or the GPT-2 that make_gpt (llmpy.train.model_factory's
    function) builds."""
    if not isinstance(cfg, NanoChatConfig):
        return make_gpt(cfg, params)
    log(f"nanochat: n_layer={cfg.n_layer} n_head={cfg.n_head} n_kv_head={cfg.n_kv_head} n_embd={cfg.n_embd} "
        f"head_dim={cfg.head_dim}; optimizer {tcfg.optimizer}"
        + (f" (Muon lr {tcfg.muon_lr} on the block matrices, AdamW on wte and lm_head)"
           if tcfg.optimizer == "muon" else ""))
    if device != "cpu":   # the GPU engine (bf16, master weights, CUDA graphs); imports cupy, so only here
        from llmpy.gpu.nanochat_engine import build_engine
        return build_engine(cfg, params, tcfg, log=log)
    import llmpy.cpu as ops
    return NanoChat(cfg, ops, params=params, optimizer=tcfg.optimizer, muon_lr=tcfg.muon_lr,
                    peak_lr=tcfg.learning_rate)


def load_for_inference(path: str, device: str, *, batch_size: int = 1, seq_len: int = 64, log=print):
    """The nanochat model of a checkpoint directory (or descriptor), for sampling and evaluation: the CPU
    model (NumPy, with a KV cache for sampling), or on 'cuda' the GPU engine planned for
    (batch_size, seq_len) as GPT-2's is (llmpy/commands.py): no master weights, no CUDA graph."""
    cfg, params = load_nanochat(path)
    log(f"model: {path} (nanochat n_layer={cfg.n_layer} n_head={cfg.n_head} n_kv_head={cfg.n_kv_head} "
        f"n_embd={cfg.n_embd} sequence_len={cfg.sequence_len} V={cfg.vocab_size}), device: {device}")
    if device != "cpu":
        from llmpy.gpu.nanochat_engine import build_engine
        from llmpy.train import inference_config
        return build_engine(cfg, params, inference_config(device, batch_size, min(seq_len, cfg.sequence_len)),
                            log=log, inference=True)
    import llmpy.cpu as ops
    return NanoChat(cfg, ops, params=params)
