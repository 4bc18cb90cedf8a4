"""Hugging Face GPT-2 <-> llm.c model files.

    llmpy import-hf DIR out.bin [--dtype bf16]    DIR: config.json + model.safetensors (a GPT2LMHeadModel
                                                  save_pretrained directory or a Hub snapshot)
    llmpy export-hf model.bin DIR                 DIR loads with transformers.GPT2LMHeadModel.from_pretrained

The mapping (ecosystem-facts.md §3): Hub checkpoints name tensors `h.0.attn.c_attn.weight`, ...,
save_pretrained of GPT2LMHeadModel prefixes them with `transformer.`; both are accepted. HF's Conv1D
stores (in, out), llm.c's matmuls want nn.Linear's (out, in), so the four projection matrices are
transposed. llm.c pads wte to Vp (a multiple of 128) with zero rows; the LM head is tied to wte.
The causal-mask buffers `attn.bias` / `attn.masked_bias` of old checkpoints are ignored.

Tensors are read with the `safetensors` package when it is installed, else with a small NumPy reader
of the format (8-byte header length, JSON header, raw little-endian data).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from llmpy.checkpoint import bf16_bits_to_f32, load_model, save_model
from llmpy.errors import LlmpyError
from llmpy.model import GPTConfig, carve, param_shapes

# llm.c name -> HF name inside block i ({} is the layer), and whether it is a Conv1D matrix (transposed)
LAYER_TENSORS = {
    "ln1w": ("ln_1.weight", False), "ln1b": ("ln_1.bias", False),
    "qkvw": ("attn.c_attn.weight", True), "qkvb": ("attn.c_attn.bias", False),
    "attprojw": ("attn.c_proj.weight", True), "attprojb": ("attn.c_proj.bias", False),
    "ln2w": ("ln_2.weight", False), "ln2b": ("ln_2.bias", False),
    "fcw": ("mlp.c_fc.weight", True), "fcb": ("mlp.c_fc.bias", False),
    "fcprojw": ("mlp.c_proj.weight", True), "fcprojb": ("mlp.c_proj.bias", False),
}
GLOBAL_TENSORS = {"wte": "wte.weight", "wpe": "wpe.weight", "lnfw": "ln_f.weight", "lnfb": "ln_f.bias"}
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
VOCAB_ALIGN = 128          # llm.c pads the vocabulary so the classifier matmul tiles evenly

# -------------------------------------------------------------------------------------------------
# safetensors


_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
              "U8": "u1", "BOOL": "?"}


def _read_safetensors_numpy(path: str) -> dict[str, np.ndarray]:
    """Minimal reader: u64 header size N, N bytes of JSON {name: {dtype, shape, data_offsets}}, data."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise LlmpyError(f"{path}: not a safetensors file ({e})") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise LlmpyError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n + begin, shape=(end - begin,)) \
            if end > begin else np.zeros(0, np.uint8)
        arr = raw.view(_ST_DTYPES[info["dtype"]]).reshape(shape)
        out[name] = bf16_bits_to_f32(arr).reshape(shape) if info["dtype"] == "BF16" else arr
    return out


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """name -> NumPy array (bf16 widened to float32) of one .safetensors file."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        return _read_safetensors_numpy(path)
    try:
        with safe_open(path, framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except TypeError:      # numpy has no bfloat16: fall back to our reader, which widens it
        return _read_safetensors_numpy(path)
    except SafetensorError as e:   # truncated or not a safetensors file: one line, not a traceback
        raise LlmpyError(f"{path}: not a readable safetensors file ({e})") from None


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Write float32 tensors as a .safetensors file (metadata format=pt, as save_pretrained writes)."""
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    try:
        from safetensors.numpy import save_file
    except ImportError:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for k, v in tensors.items():
            header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + v.nbytes]}
            offset += v.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)                  # the data starts 8-byte aligned
        with open(path, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for v in tensors.values():
                f.write(v.tobytes())
        return
    save_file(tensors, path, metadata={"format": "pt"})


def _load_weights(hf_dir: str) -> dict[str, np.ndarray]:
    """Every tensor of the directory's model.safetensors (or its shards, via the index file)."""
    single = os.path.join(hf_dir, "model.safetensors")
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        return read_safetensors(single)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for name in files:
            tensors.update(read_safetensors(os.path.join(hf_dir, name)))
        return tensors
    raise LlmpyError(f"{hf_dir}: no model.safetensors (or model.safetensors.index.json); "
                     f"convert pytorch_model.bin with transformers' save_pretrained(safe_serialization=True)")


# -------------------------------------------------------------------------------------------------
# import


def config_from_hf(hf_config: dict, where: str = "config.json") -> GPTConfig:
    """GPTConfig from a GPT-2 config.json, refusing variants llm.c's model cannot represent."""
    try:
        C, L, NH = hf_config["n_embd"], hf_config["n_layer"], hf_config["n_head"]
        V, maxT = hf_config["vocab_size"], hf_config.get("n_positions", hf_config.get("n_ctx"))
    except KeyError as e:
        raise LlmpyError(f"{where}: missing GPT-2 field {e}") from None
    problems = []
    if hf_config.get("model_type", "gpt2") != "gpt2":
        problems.append(f"model_type {hf_config['model_type']!r} (need 'gpt2')")
    if hf_config.get("n_inner") not in (None, 4 * C):
        problems.append(f"n_inner {hf_config['n_inner']} (llm.c's MLP is 4*n_embd = {4 * C})")
    if hf_config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function {hf_config['activation_function']!r} (llm.c uses tanh GELU)")
    if abs(hf_config.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        problems.append(f"layer_norm_epsilon {hf_config['layer_norm_epsilon']} (llm.c uses 1e-5)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if hf_config.get(flag):
            problems.append(f"{flag}=true")
    if hf_config.get("scale_attn_weights", True) is False:
        problems.append("scale_attn_weights=false")
    if problems:
        raise LlmpyError(f"{where}: not representable as an llm.c GPT-2: " + "; ".join(problems))
    Vp = math.ceil(V / VOCAB_ALIGN) * VOCAB_ALIGN
    try:
        return GPTConfig(max_seq_len=maxT, vocab_size=V, padded_vocab_size=Vp, num_layers=L,
                         num_heads=NH, channels=C)
    except ValueError as e:
        raise LlmpyError(f"{where}: {e}") from None


def hf_to_flat(cfg: GPTConfig, tensors: dict[str, np.ndarray], where: str = "model.safetensors") -> np.ndarray:
    """llm.c's flat float32 parameter buffer from HF GPT-2 tensors (keys with or without 'transformer.')."""
    sd = {}
    for k, v in tensors.items():
        k = k.removeprefix("transformer.")
        if not k.endswith(IGNORED_SUFFIXES):
            sd[k] = v
    lm_head = sd.pop("lm_head.weight", None)

    def take(name: str, shape: tuple) -> np.ndarray:
        if name not in sd:
            raise LlmpyError(f"{where}: tensor {name} is missing")
        t = sd.pop(name)
        if tuple(t.shape) != shape:
            raise LlmpyError(f"{where}: {name} has shape {tuple(t.shape)}, expected {shape}")
        return np.asarray(t, dtype=np.float32)

    shapes = param_shapes(cfg)
    flat = np.zeros(sum(math.prod(s) for s in shapes.values()), dtype=np.float32)
    p = carve(flat, shapes)
    V, C = cfg.vocab_size, cfg.channels
    p["wte"][:V] = take("wte.weight", (V, C))                      # rows V..Vp-1 stay zero
    p["wpe"][...] = take("wpe.weight", shapes["wpe"])
    p["lnfw"][...] = take("ln_f.weight", (C,))
    p["lnfb"][...] = take("ln_f.bias", (C,))
    for name, (hf_name, conv1d) in LAYER_TENSORS.items():
        for i in range(cfg.num_layers):
            want = shapes[name][1:]
            t = take(f"h.{i}.{hf_name}", want[::-1] if conv1d else want)
            p[name][i] = t.T if conv1d else t
    if lm_head is not None and not np.array_equal(np.asarray(lm_head, dtype=np.float32), p["wte"][:V]):
        raise LlmpyError(f"{where}: lm_head.weight differs from wte.weight; llm.c ties the two")
    if sd:
        raise LlmpyError(f"{where}: unexpected tensors {sorted(sd)[:5]}")
    return flat


def load_hf(hf_dir: str) -> tuple[GPTConfig, np.ndarray]:
    """(config, llm.c flat float32 parameters) of a Hugging Face GPT-2 directory."""
    if not os.path.isdir(hf_dir):
        raise LlmpyError(f"{hf_dir}: not a directory (expected config.json + model.safetensors)")
    cfg_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise LlmpyError(f"{cfg_path}: not found")
    with open(cfg_path) as f:
        cfg = config_from_hf(json.load(f), cfg_path)
    return cfg, hf_to_flat(cfg, _load_weights(hf_dir), os.path.join(hf_dir, "model.safetensors"))


def import_hf(hf_dir: str, out_bin: str, *, dtype: str = "fp32", log=print) -> GPTConfig:
    """Convert a Hugging Face GPT-2 directory (config.json + model.safetensors) to an llm.c model file
    (dtype "fp32": version 3, "bf16": version 5, rounded to nearest even)."""
    cfg, flat = load_hf(hf_dir)
    os.makedirs(os.path.dirname(os.path.abspath(out_bin)), exist_ok=True)
    save_model(out_bin, cfg, flat, dtype=dtype)
    log(f"wrote {out_bin} ({dtype}): L={cfg.num_layers} NH={cfg.num_heads} C={cfg.channels} "
        f"maxT={cfg.max_seq_len} V={cfg.vocab_size} Vp={cfg.padded_vocab_size}")
    return cfg


# -------------------------------------------------------------------------------------------------
# export


def hf_config(cfg: GPTConfig) -> dict:
    """A GPT2Config dict equivalent to llm.c's model: tanh GELU, no dropout, tied LM head."""
    eot = min(50256, cfg.vocab_size - 1)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len,
        "n_embd": cfg.channels, "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eot, "eos_token_id": eot, "torch_dtype": "float32",
    }


def flat_to_hf(cfg: GPTConfig, flat: np.ndarray) -> dict[str, np.ndarray]:
    """HF GPT2LMHeadModel tensors ('transformer.' keys, Conv1D layout, unpadded wte) from llm.c's buffer."""
    p = carve(np.asarray(flat, dtype=np.float32), param_shapes(cfg))
    out = {"transformer." + hf: p[name] for name, hf in GLOBAL_TENSORS.items()}
    out["transformer.wte.weight"] = p["wte"][:cfg.vocab_size]
    for name, (hf_name, conv1d) in LAYER_TENSORS.items():
        for i in range(cfg.num_layers):
            out[f"transformer.h.{i}.{hf_name}"] = p[name][i].T if conv1d else p[name][i]
    return out


def export_hf(model_bin: str, out_dir: str, *, log=print) -> str:
    """Write out_dir/config.json and out_dir/model.safetensors (float32) for an llm.c model file."""
    if not os.path.isfile(model_bin):
        raise LlmpyError(f"{model_bin}: model file not found")
    cfg, flat = load_model(model_bin)
    pad = carve(flat, param_shapes(cfg))["wte"][cfg.vocab_size:]
    if pad.size and np.any(pad):
        log(f"note: {model_bin}: padded wte rows V..Vp-1 are not zero; they are dropped (HF has V rows)")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(cfg), f, indent=2)
        f.write("\n")
    write_safetensors(os.path.join(out_dir, "model.safetensors"), flat_to_hf(cfg, flat))
    log(f"wrote {out_dir}/config.json and model.safetensors (L={cfg.num_layers} NH={cfg.num_heads} "
        f"C={cfg.channels} V={cfg.vocab_size})")
    return out_dir
