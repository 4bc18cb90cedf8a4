"""GPT-2: configuration, the parameter and activation tables, and forward/backward on a backend.

The model is written once and runs on any backend module that exports the op functions of
`llmpy.cpu` (NumPy). `forward()` reads like llm.c's `gpt2_forward`, one op call per line, and
`backward()` walks the same calls in reverse.

Gradient write semantics (the same in every backend, and in every op's docstring):
  - parameter gradients ACCUMULATE (+=), so gradient accumulation over micro-steps is a loop;
  - activation gradients are OVERWRITTEN (=), except on the residual stream, where the branches
    meet: layernorm_backward adds its dinp into the residual gradient.

Parameters live in one flat buffer in llm.c's tensor order (`param_shapes`), which makes the
checkpoint a single write and AdamW a loop over 16 named views.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

# -------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class GPTConfig:
    max_seq_len: int = 1024         # maxT, rows of wpe
    vocab_size: int = 50257         # V, real GPT-2 vocabulary
    padded_vocab_size: int = 50304  # Vp, V rounded up to a multiple of 128 (tiles matmuls evenly)
    num_layers: int = 12            # L
    num_heads: int = 12             # NH
    channels: int = 768             # C

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"GPTConfig.{f.name} must be positive, got {getattr(self, f.name)}")
        if self.channels % self.num_heads:
            raise ValueError(f"channels {self.channels} not divisible by num_heads {self.num_heads}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size {self.padded_vocab_size} < vocab_size {self.vocab_size}")

    @property
    def head_size(self) -> int:
        return self.channels // self.num_heads

    @staticmethod
    def from_descriptor(desc: str) -> "GPTConfig":
        """llm.c's model descriptors: 'd12' or 'gpt2:d12' (GPT-2 depth), 'gpt3:c768' (GPT-3 width)."""
        name = desc.split(":", 1)[1] if desc.startswith(("gpt2:", "gpt3:")) else desc
        if desc.startswith("gpt3:"):
            if not name.startswith("c") or not name[1:].isdigit() or int(name[1:]) not in GPT3_SHAPES:
                raise ValueError(f"unknown GPT-3 descriptor {desc!r}; known: "
                                 + ", ".join(f"gpt3:c{c}" for c in GPT3_SHAPES))
            c = int(name[1:])
            layers, head_size = GPT3_SHAPES[c]
            return GPTConfig(2048, 50257, 50304, layers, c // head_size, c)
        if not name.startswith("d") or not name[1:].isdigit() or int(name[1:]) not in GPT2_SHAPES:
            raise ValueError(f"unknown model descriptor {desc!r}; use a .bin file or one of "
                             + ", ".join(f"d{d}" for d in GPT2_SHAPES))
        depth = int(name[1:])
        channels, heads = GPT2_SHAPES[depth]
        return GPTConfig(1024, 50257, 50304, depth, heads, channels)


GPT2_SHAPES = {6: (384, 6), 12: (768, 12), 24: (1024, 16), 36: (1280, 20), 48: (1600, 25),
               60: (1920, 30), 72: (2880, 30), 84: (3456, 36)}          # depth -> (C, NH)
GPT3_SHAPES = {384: (6, 64), 768: (12, 64), 1024: (24, 64), 1536: (24, 96), 2048: (24, 128),
               2560: (32, 80), 4096: (32, 128), 12288: (96, 128)}         # C -> (L, head size)

# -------------------------------------------------------------------------------------------------
# Parameter and activation tables

# the tensors that get weight decay: the 2-D matrices (both embeddings included), never biases or LN
DECAYED = ("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw")


def param_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter tensor, in llm.c's checkpoint order (tensor-major over layers)."""
    Vp, maxT, L, C = cfg.padded_vocab_size, cfg.max_seq_len, cfg.num_layers, cfg.channels
    return {
        "wte": (Vp, C), "wpe": (maxT, C),
        "ln1w": (L, C), "ln1b": (L, C),
        "qkvw": (L, 3 * C, C), "qkvb": (L, 3 * C),
        "attprojw": (L, C, C), "attprojb": (L, C),
        "ln2w": (L, C), "ln2b": (L, C),
        "fcw": (L, 4 * C, C), "fcb": (L, 4 * C),
        "fcprojw": (L, C, 4 * C), "fcprojb": (L, C),
        "lnfw": (C,), "lnfb": (C,),
    }


def num_parameters(cfg: GPTConfig) -> int:
    """Total parameter count including the padded vocabulary rows (124,475,904 for d12)."""
    return sum(math.prod(s) for s in param_shapes(cfg).values())


def carve(flat, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Named views into one flat NumPy or CuPy buffer, laid out back to back in table order."""
    views, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        views[name] = flat[offset:offset + n].reshape(shape)
        offset += n
    if offset != flat.size:
        raise ValueError(f"buffer has {flat.size} elements, tables need {offset}")
    return views
