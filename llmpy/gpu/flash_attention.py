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

Grouped-query attention (nanochat): with n_kv_head = NKV < NH the packed rows are [q | k | v] with
NH query heads and NKV key/value heads each, (B, T, (NH + 2 NKV) 64); query head h reads kv head
h // (NH / NKV) in place (no copy per query head), and a dk/dv block sums its kv head's whole group.
gqa_flash_attention_forward/backward take llmpy.cpu's separate q, k, v arrays and pack them (one copy
each, in a workspace) for the same kernels.

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


def launch_shape(part: str, tile: int = TILE, gqa: bool = False) -> tuple[str, int, int]:
    """(kernel name, threads per block, dynamic shared memory in bytes) of the tiled kernel `part`
    ("forward", "dkdv" or "dq") at `tile` query rows per block, for grouped-query attention (fewer kv
    heads than query heads) or not. Shared memory is carved in this order
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
    flags = ", ".join("true" if f else "false" for f in (exp2, gqa))
    return f"{name}<{warps}, {flags}>", 32 * warps, own + 4 * _TILE_BYTES


def supports(dtype, head_size: int) -> bool:
    """Whether the fused kernels handle this storage dtype and head size (bf16 and 64)."""
    return np.dtype(dtype) == K.BF16 and head_size == HEAD_SIZE


def grid(B: int, T: int, NH: int, tile: int = TILE) -> tuple[int, int]:
    """One block per `tile`-row tile of one (b, h) (h a kv head for dk/dv)."""
    return (K.ceil_div(T, tile), B * NH)


def _check(inp, lse, n_kv_head=None):
    """(B, T, NH, NKV, C) from inp (B, T, C + 2 NKV 64) bf16 and lse (B, NH, T) fp32, C = NH * 64;
    NKV = n_kv_head, or NH when None."""
    K.check("inp", inp, dtype=K.BF16, ndim=3, aligned=True)
    B, T, width = inp.shape
    K.check("lse", lse, dtype=K.F32, ndim=3)
    NH = lse.shape[1]
    NKV = NH if n_kv_head is None else int(n_kv_head)
    if NKV < 1 or NH % NKV:
        raise ValueError(f"n_kv_head = {NKV} must divide the {NH} heads of lse {lse.shape}")
    if width != (NH + 2 * NKV) * HEAD_SIZE:
        raise ValueError(f"inp: shape {inp.shape} with {NH} heads (lse {lse.shape}) and {NKV} kv heads: flash "
                         f"attention needs (NH + 2 NKV) * {HEAD_SIZE} channels (head size {HEAD_SIZE})")
    K.check("lse", lse, shape=(B, NH, T))
    return B, T, NH, NKV, NH * HEAD_SIZE


def _check_bf16(name, a, shape):
    K.check(name, a, dtype=K.BF16, shape=shape, aligned=True)


def flash_attention_forward(out, lse, inp, *, tile=TILE, n_kv_head=None):
    """Causal self-attention from packed q|k|v, fused.

    inp (B, T, 3C) bf16: q, k, v side by side, each C = NH heads of 64; read only (the backward reads it).
    With n_kv_head = NKV: (B, T, C + 2 NKV 64), k and v with NKV heads each (grouped-query attention).
    out (B, T, C) bf16: overwritten with the heads' outputs, concatenated.
    lse (B, NH, T) fp32: overwritten with log sum_j exp(q_t.k_j / 8) over j <= t, saved for the backward.
    tile: query rows per block, 64 or 128 (module docstring).
    """
    B, T, NH, NKV, C = _check(inp, lse, n_kv_head)
    _check_bf16("out", out, (B, T, C))
    name, threads, smem = launch_shape("forward", tile, NKV != NH)
    K.launch(FILE, name, grid(B, T, NH, tile), (threads,),
             (out, lse, inp, K.i32(B), K.i32(T), K.i32(NH), K.i32(NKV), K.f32(1.0 / math.sqrt(HEAD_SIZE))),
             shared_mem=smem)


def flash_attention_backward(dinp, delta, dout, inp, out, lse, *, tile=TILE, n_kv_head=None,
                             delta_block_size=DELTA_BLOCK_SIZE):
    """Gradient of flash_attention_forward with respect to inp.

    dinp (B, T, 3C) bf16 (inp's shape): OVERWRITTEN with d(q|k|v), dk and dv summed over each kv head's
    query group. dout (B, T, C) bf16; inp, out and lse as the forward left them. delta (B, NH, T) fp32:
    scratch, overwritten with rowsum(dout * out). tile: query rows per dq block, 64 or 128 (either
    forward's lse works); n_kv_head as the forward's.
    """
    B, T, NH, NKV, C = _check(inp, lse, n_kv_head)
    _check_bf16("dinp", dinp, inp.shape)
    _check_bf16("dout", dout, (B, T, C))
    _check_bf16("out", out, (B, T, C))
    K.check("delta", delta, dtype=K.F32, shape=(B, NH, T))
    block = K.check_block_size(delta_block_size)
    scale = K.f32(1.0 / math.sqrt(HEAD_SIZE))
    sizes = (K.i32(B), K.i32(T), K.i32(NH))
    K.launch_1d(FILE, "flash_attention_delta_kernel", B * T * NH, block, (delta, dout, out, *sizes))
    for part, rows, heads in (("dkdv", TILE, NKV), ("dq", tile, NH)):   # one dk/dv block per 64 keys of a kv head
        name, threads, smem = launch_shape(part, tile, NKV != NH)
        K.launch(FILE, name, grid(B, T, heads, rows), (threads,),
                 (dinp, dout, inp, lse, delta, *sizes, K.i32(NKV), scale), shared_mem=smem)


# -------------------------------------------------------------------------------------------------
# llmpy.cpu's grouped-query contract: separate q (B, T, NH, 64), k and v (B, T, NKV, 64)

PACK_BLOCK_SIZE = 256


def _check_gqa(q, k, v):
    """(B, T, NH, NKV) of bf16 q (B, T, NH, 64) and k, v (B, T, NKV, 64), NKV dividing NH."""
    K.check("q", q, dtype=K.BF16, ndim=4, aligned=True)
    B, T, NH, HS = q.shape
    if HS != HEAD_SIZE:
        raise ValueError(f"q: shape {q.shape}: flash attention needs head size {HEAD_SIZE}")
    K.check("k", k, dtype=K.BF16, ndim=4, aligned=True)
    NKV = k.shape[2]
    K.check("k", k, shape=(B, T, NKV, HS))
    K.check("v", v, dtype=K.BF16, shape=(B, T, NKV, HS), aligned=True)
    if NKV < 1 or NH % NKV:
        raise ValueError(f"k: {NKV} kv heads must divide the {NH} query heads of q")
    return B, T, NH, NKV


def _packed(workspace, B, T, NH, NKV, count=1):
    """`count` packed (B, T, (NH + 2 NKV) 64) bf16 buffers from workspace (allocated when None)."""
    import cupy as cp
    n = B * T * (NH + 2 * NKV) * HEAD_SIZE
    if workspace is None:
        workspace = cp.empty(count * n, dtype=K.BF16)
    K.check("workspace", workspace, dtype=K.BF16, aligned=True)
    if workspace.size < count * n:
        raise ValueError(f"workspace: {workspace.size} bf16 elements, need {count * n}")
    return [workspace[i * n:(i + 1) * n].reshape(B, T, -1) for i in range(count)]


def _pack(name, qkv, q, k, v, block_size=PACK_BLOCK_SIZE):
    B, T, NH = q.shape[:3]
    K.launch(FILE, name, K.elementwise_grid(qkv.size, K.BF16, block_size), (block_size,),
             (*((qkv, q, k, v) if name == "qkv_pack_kernel" else (q, k, v, qkv)),
              K.i32(B * T), K.i32(NH * HEAD_SIZE), K.i32(k.shape[2] * HEAD_SIZE)))


def gqa_flash_attention_forward(out, lse, q, k, v, *, tile=TILE, workspace=None):
    """Fused causal grouped-query attention (as llmpy.cpu.gqa_flash_attention_forward): q (B, T, NH, 64),
    k, v (B, T, NKV, 64) bf16, read only; out (B, T, NH, 64) bf16 and lse (B, NH, T) fp32 overwritten.
    workspace: bf16, >= B T (NH + 2 NKV) 64 elements (q, k, v packed for the kernels); None allocates."""
    B, T, NH, NKV = _check_gqa(q, k, v)
    _check_bf16("out", out, q.shape)
    (qkv,) = _packed(workspace, B, T, NH, NKV)
    _pack("qkv_pack_kernel", qkv, q, k, v)
    flash_attention_forward(out.reshape(B, T, -1), lse, qkv, tile=tile, n_kv_head=NKV)


def gqa_flash_attention_backward(dq, dk, dv, delta, dout, q, k, v, out, lse, *, tile=TILE, workspace=None):
    """Gradient of gqa_flash_attention_forward: dq, dk, dv OVERWRITTEN (dk, dv summed over each kv head's
    group); delta (B, NH, T) fp32 overwritten with rowsum(dout * out). workspace: bf16, >= 2 B T
    (NH + 2 NKV) 64 elements; None allocates."""
    B, T, NH, NKV = _check_gqa(q, k, v)
    for name, a, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v), ("dout", dout, q), ("out", out, q)):
        _check_bf16(name, a, like.shape)
    qkv, dqkv = _packed(workspace, B, T, NH, NKV, count=2)
    _pack("qkv_pack_kernel", qkv, q, k, v)
    flash_attention_backward(dqkv, delta, dout.reshape(B, T, -1), qkv, out.reshape(B, T, -1), lse, tile=tile,
                             n_kv_head=NKV)
    _pack("qkv_unpack_kernel", dqkv, dq, dk, dv)
