"""Fused causal self-attention (FlashAttention-2 on tensor cores: ldmatrix and mma.sync): launchers for
cuda/flash_attention.cu. Reference: llmpy/cpu/attention.py (flash_attention_forward/backward).

The alternative to llm.c's non-cuDNN path (llmpy/gpu/attention.py) for bf16 with head size 64 (every
GPT-2 size), the part llm.c gives to cuDNN. It reads q, k, v straight from the QKV matmul's output
(no permutes, nothing clobbered) and saves, instead of the (B, NH, T, T) probabilities, one fp32
log-sum-exp per row: for 124M at B=64, T=1024 that is 3 MiB per layer instead of 1.5 GiB, and the
T x T traffic that dominates the materialised path's memory time goes away.

    forward:  out (B, T, C) = softmax(q k^T / sqrt(64), causal) v,  lse (B, NH, T)
    backward: delta = rowsum(dout * out), then dk|dv (one block per key tile) and dq (one per query
              tile) into dinp (B, T, 3C): deterministic, no atomics

tile=64 (the default) runs the original kernels: 4 warps, a block owns 64 query rows. tile=128 runs the
forward and dq kernels with 8 warps on 128-row query tiles, which halves the shared-memory reads of K
and V per product, and exp2 with the scale folded with log2(e) (review SLOW-2); dk/dv is the same
kernel in both (flash_attention.cu says why). The first GPU run times both (bench_train --variants).
"""
import math

import numpy as np

from llmpy.gpu import _kernels as K

FILE = "flash_attention.cu"
HEAD_SIZE = 64           # FA_HS: the kernels are written for it
TILE = 64                # FA_TILE: rows of the tiles a block's loop walks over (64 x 64)
TILES = {64: (4, False), 128: (8, True)}   # a block's own rows -> the kernels' <WARPS, EXP2>
DELTA_BLOCK_SIZE = 256

_LD = HEAD_SIZE + 8                                         # FA_LD: shared tile row stride (bf16)
_TILE_BYTES = TILE * _LD * 2                                # a 64 x 64 bf16 tile


def launch_shape(part: str, tile: int = TILE) -> tuple[str, int, int]:
    """(kernel name, threads per block, dynamic shared memory in bytes) of the tiled kernel `part`
    ("forward", "dkdv" or "dq") at `tile` query rows per block. Shared memory is carved in this order
    (flash_attention.cu):
      forward  Q (the block's rows) | K K | V V (the loop's tiles double buffered); 46080 B at tile 64
      dkdv     K | V | Q Q | dO dO | lse lse | delta delta: 64 keys and 4 warps at either tile; 56320 B
      dq       Q | dO (the block's rows) | K K | V V; 55296 B at tile 64"""
    if tile not in TILES:
        raise ValueError(f"tile: {tile}, expected one of {sorted(TILES)} (query rows per block)")
    if part == "dkdv":
        return "flash_attention_backward_dkdv_kernel", 128, 6 * _TILE_BYTES + 4 * TILE * 4
    warps, exp2 = TILES[tile]
    own = (1 if part == "forward" else 2) * tile * _LD * 2
    name = "flash_attention_forward_kernel" if part == "forward" else "flash_attention_backward_dq_kernel"
    return f"{name}<{warps}, {'true' if exp2 else 'false'}>", 32 * warps, own + 4 * _TILE_BYTES


def supports(dtype, head_size: int) -> bool:
    """Whether the fused kernels handle this storage dtype and head size (bf16 and 64)."""
    return np.dtype(dtype) == K.BF16 and head_size == HEAD_SIZE


def grid(B: int, T: int, NH: int, tile: int = TILE) -> tuple[int, int]:
    """One block per `tile`-row tile of one (b, h)."""
    return (K.ceil_div(T, tile), B * NH)


def _check(inp, lse):
    """(B, T, NH, C) from inp (B, T, 3C) bf16 and lse (B, NH, T) fp32, with C = NH * 64."""
    K.check("inp", inp, dtype=K.BF16, ndim=3, aligned=True)
    B, T, C3 = inp.shape
    K.check("lse", lse, dtype=K.F32, ndim=3)
    NH = lse.shape[1]
    if C3 != 3 * NH * HEAD_SIZE:
        raise ValueError(f"inp: shape {inp.shape} with {NH} heads (lse {lse.shape}): flash attention needs "
                         f"3 * NH * {HEAD_SIZE} channels (head size {HEAD_SIZE})")
    K.check("lse", lse, shape=(B, NH, T))
    return B, T, NH, C3 // 3


def _check_bf16(name, a, shape):
    K.check(name, a, dtype=K.BF16, shape=shape, aligned=True)


def flash_attention_forward(out, lse, inp, *, tile=TILE):
    """Causal self-attention from packed q|k|v, fused.

    inp (B, T, 3C) bf16: q, k, v side by side, each C = NH heads of 64; read only (the backward reads it).
    out (B, T, C) bf16: overwritten with the heads' outputs, concatenated.
    lse (B, NH, T) fp32: overwritten with log sum_j exp(q_t.k_j / 8) over j <= t, saved for the backward.
    tile: query rows per block, 64 or 128 (module docstring).
    """
    B, T, NH, C = _check(inp, lse)
    _check_bf16("out", out, (B, T, C))
    name, threads, smem = launch_shape("forward", tile)
    K.launch(FILE, name, grid(B, T, NH, tile), (threads,),
             (out, lse, inp, K.i32(B), K.i32(T), K.i32(NH), K.f32(1.0 / math.sqrt(HEAD_SIZE))), shared_mem=smem)


def flash_attention_backward(dinp, delta, dout, inp, out, lse, *, tile=TILE, delta_block_size=DELTA_BLOCK_SIZE):
    """Gradient of flash_attention_forward with respect to inp.

    dinp (B, T, 3C) bf16: OVERWRITTEN with d(q|k|v). dout (B, T, C) bf16; inp, out and lse as the
    forward left them. delta (B, NH, T) fp32: scratch, overwritten with rowsum(dout * out).
    tile: query rows per dq block, 64 or 128 (either forward's lse works).
    """
    B, T, NH, C = _check(inp, lse)
    _check_bf16("dinp", dinp, (B, T, 3 * C))
    _check_bf16("dout", dout, (B, T, C))
    _check_bf16("out", out, (B, T, C))
    K.check("delta", delta, dtype=K.F32, shape=(B, NH, T))
    block = K.check_block_size(delta_block_size)
    scale = K.f32(1.0 / math.sqrt(HEAD_SIZE))
    sizes = (K.i32(B), K.i32(T), K.i32(NH))
    K.launch_1d(FILE, "flash_attention_delta_kernel", B * T * NH, block, (delta, dout, out, *sizes))
    for part, rows in (("dkdv", TILE), ("dq", tile)):       # one dk/dv block per 64 keys at either tile
        name, threads, smem = launch_shape(part, tile)
        K.launch(FILE, name, grid(B, T, NH, rows), (threads,), (dinp, dout, inp, lse, delta, *sizes, scale),
                 shared_mem=smem)
