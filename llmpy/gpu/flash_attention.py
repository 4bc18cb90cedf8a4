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
"""
import math

import numpy as np

from llmpy.gpu import _kernels as K

FILE = "flash_attention.cu"
HEAD_SIZE = 64           # FA_HS: the kernels are written for it
TILE = 64                # FA_TILE: query/key rows per block and per step
THREADS = 128            # FA_THREADS: 4 warps of 16 rows each
DELTA_BLOCK_SIZE = 256

# dynamic shared memory, carved by the kernels in this order (bytes; see flash_attention.cu)
_LD = HEAD_SIZE + 8                                         # FA_LD: shared tile row stride (bf16)
_TILE_BYTES = TILE * _LD * 2                                # a 64 x 64 bf16 tile
FORWARD_SMEM = 5 * _TILE_BYTES                              # Q | K K | V V (the loop's tiles double buffered)
DKDV_SMEM = 6 * _TILE_BYTES + 4 * TILE * 4                  # K | V | Q Q | dO dO | lse lse | delta delta
DQ_SMEM = 6 * _TILE_BYTES                                   # Q | dO | K K | V V


def supports(dtype, head_size: int) -> bool:
    """Whether the fused kernels handle this storage dtype and head size (bf16 and 64)."""
    return np.dtype(dtype) == K.BF16 and head_size == HEAD_SIZE


def grid(B: int, T: int, NH: int) -> tuple[int, int]:
    """One block per 64-row tile of one (b, h)."""
    return (K.ceil_div(T, TILE), B * NH)


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


def flash_attention_forward(out, lse, inp):
    """Causal self-attention from packed q|k|v, fused.

    inp (B, T, 3C) bf16: q, k, v side by side, each C = NH heads of 64; read only (the backward reads it).
    out (B, T, C) bf16: overwritten with the heads' outputs, concatenated.
    lse (B, NH, T) fp32: overwritten with log sum_j exp(q_t.k_j / 8) over j <= t, saved for the backward.
    """
    B, T, NH, C = _check(inp, lse)
    _check_bf16("out", out, (B, T, C))
    K.launch(FILE, "flash_attention_forward_kernel", grid(B, T, NH), (THREADS,),
             (out, lse, inp, K.i32(B), K.i32(T), K.i32(NH), K.f32(1.0 / math.sqrt(HEAD_SIZE))),
             shared_mem=FORWARD_SMEM)


def flash_attention_backward(dinp, delta, dout, inp, out, lse, *, delta_block_size=DELTA_BLOCK_SIZE):
    """Gradient of flash_attention_forward with respect to inp.

    dinp (B, T, 3C) bf16: OVERWRITTEN with d(q|k|v). dout (B, T, C) bf16; inp, out and lse as the
    forward left them. delta (B, NH, T) fp32: scratch, overwritten with rowsum(dout * out).
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
    K.launch(FILE, "flash_attention_backward_dkdv_kernel", grid(B, T, NH), (THREADS,),
             (dinp, dout, inp, lse, delta, *sizes, scale), shared_mem=DKDV_SMEM)
    K.launch(FILE, "flash_attention_backward_dq_kernel", grid(B, T, NH), (THREADS,),
             (dinp, dout, inp, lse, delta, *sizes, scale), shared_mem=DQ_SMEM)
