"""Causal self-attention on the GPU: llm.c's non-cuDNN path (llmc-facts.md §6.8).
Launchers for cuda/attention.cu plus the batched products through cuBLASLt
(`llmpy.gpu.matmul.batched_matmul`). Reference: llmpy/cpu/attention.py.

Per (b, h), with q, k, v (T, HS) and scale = 1/sqrt(HS):

    att = softmax(scale * q k^T, causal)      the T x T probabilities, upper triangle exactly 0
          [[p00  0   0 ]
           [p10 p11  0 ]
           [p20 p21 p22]]
    y   = att v                               (T, HS), then heads concatenated into out (T, C)
"""
import math

import cupy as cp
import numpy as np

from llmpy.gpu import _kernels as K

BLOCK_SIZE = 256           # permute kernels: one thread per element (llm.c's choice)
SOFTMAX_BLOCK_SIZE = 256   # softmax kernels: one warp per row, 8 rows per block


def _check_qkvr(qkvr, att):
    """qkvr (3, B, NH, T, HS) and att (B, NH, T, T); returns (B, T, NH, HS)."""
    K.check("qkvr", qkvr, ndim=5)
    three, B, NH, T, HS = qkvr.shape
    if three != 3:
        raise ValueError(f"qkvr: shape {qkvr.shape}, expected (3, B, NH, T, HS)")
    K.check("att", att, shape=(B, NH, T, T))
    return B, T, NH, HS


def _heads3(a):
    """(..., rows, cols) contiguous -> (batch, rows, cols) view for batched_matmul."""
    return a.reshape(-1, a.shape[-2], a.shape[-1])


def _launch_permute(name, dst, src, dtype, B, T, NH, HS, block_size):
    K.launch_1d("attention.cu", K.template_name(name, dtype), B * T * NH * HS, block_size,
                (dst, src, K.i32(B), K.i32(T), K.i32(NH), K.i32(HS)))


def softmax_grid(rows: int, block_size: int) -> tuple[int]:
    """One warp per row."""
    return K.grid_1d(rows, block_size // 32)


def softmax_kernel_name(base: str, dtype, T: int) -> str:
    """The 128-bit variant of softmax_{forward,backward}_kernel when rows of T elements keep every
    16-byte chunk aligned (T a multiple of 8 bf16 or 4 float; check_floats checked the pointers)."""
    if T % K.x128_elems(dtype) == 0:
        base = base.replace("_kernel", "128_kernel")
    return K.template_name(base, dtype)


def attention_forward(out, qkvr, att, inp, *, scratch=None, preatt=None, block_size=BLOCK_SIZE,
                      softmax_block_size=SOFTMAX_BLOCK_SIZE):
    """Causal self-attention from packed q|k|v.

    inp (B, T, 3C): q, k, v side by side, each C = NH heads of HS channels.
    qkvr (3, B, NH, T, HS): overwritten with the permuted q, k, v (saved for the backward).
    att (B, NH, T, T): overwritten with the softmax probabilities, upper triangle 0 (att v and the
    backward's att^T dy read whole rows, so the zeros must be there).
    out (B, T, C): overwritten with the heads' outputs, concatenated. One float dtype throughout.
    scratch: (B, NH, T, HS) buffer for the heads' outputs before they are interleaved into out.
    When None, the first B*T*C elements of inp are used, as llm.c does: inp is CLOBBERED
    (nothing reads the QKV matmul's output after this op; qkvr keeps q, k, v).
    preatt: None, or a (B, NH, T, T) scratch for q k^T (the engine lends the backward's datt). None:
    q k^T lands in att and the softmax runs in place, writing the zeros too. Given: the softmax
    writes only att's causal part (to the end of the 16-byte chunk holding the diagonal), which
    saves a third of its writes at T = 1024 (review SLOW-3), and att's upper triangle must ALREADY
    be zero: the engine's arena is zeroed once and nothing else writes there.
    """
    from llmpy.gpu.matmul import batched_matmul                  # cuBLASLt, imported on first use
    dtype = K.check_floats(out=out, qkvr=qkvr, att=att, inp=inp)
    B, T, NH, HS = _check_qkvr(qkvr, att)
    C = NH * HS
    K.check("inp", inp, shape=(B, T, 3 * C))
    K.check("out", out, shape=(B, T, C))
    if scratch is None:
        y = inp.reshape(-1)[:B * T * C].reshape(B, NH, T, HS)
    else:
        K.check_floats(scratch=scratch, inp=inp)
        y = K.check("scratch", scratch, shape=(B, NH, T, HS))
    block_size = K.check_block_size(block_size)
    softmax_block_size = K.check_block_size(softmax_block_size)
    if preatt is None:
        preatt = att                                              # in place
    else:
        K.check_floats(preatt=preatt, att=att)
        K.check("preatt", preatt, shape=att.shape)
    q, k, v = (_heads3(p) for p in qkvr)                          # (B*NH, T, HS) each
    att3 = _heads3(att)                                           # (B*NH, T, T)

    _launch_permute("permute_kernel", qkvr, inp, dtype, B, T, NH, HS, block_size)
    batched_matmul(_heads3(preatt), q, k, transa=False, transb=True)   # preatt = q k^T (unscaled)
    K.launch("attention.cu", softmax_kernel_name("softmax_forward_kernel", dtype, T),
             softmax_grid(B * NH * T, softmax_block_size), (softmax_block_size,),
             (att, preatt, K.f32(1.0 / math.sqrt(HS)), K.i32(B * NH * T), K.i32(T),
              K.i32(preatt is att)))
    batched_matmul(_heads3(y), att3, v, transa=False, transb=False)   # y = att v
    _launch_permute("unpermute_kernel", out, y, dtype, B, T, NH, HS, block_size)


def attention_backward(dinp, dqkvr, datt, scratch, dout, qkvr, att, *, block_size=BLOCK_SIZE,
                       softmax_block_size=SOFTMAX_BLOCK_SIZE):
    """Gradient of attention_forward with respect to its packed input.

    dinp (B, T, 3C): OVERWRITTEN with d(q|k|v). dout (B, T, C); qkvr and att as saved by the forward.
    dqkvr (3, B, NH, T, HS), datt (B, NH, T, T) and scratch (B, NH, T, HS) are scratch, overwritten.
    """
    from llmpy.gpu.matmul import batched_matmul
    dtype = K.check_floats(dinp=dinp, dqkvr=dqkvr, datt=datt, scratch=scratch, dout=dout,
                           qkvr=qkvr, att=att)
    B, T, NH, HS = _check_qkvr(qkvr, att)
    C = NH * HS
    K.check("dinp", dinp, shape=(B, T, 3 * C))
    K.check("dout", dout, shape=(B, T, C))
    K.check("dqkvr", dqkvr, shape=qkvr.shape)
    K.check("datt", datt, shape=att.shape)
    K.check("scratch", scratch, shape=(B, NH, T, HS))
    block_size = K.check_block_size(block_size)
    softmax_block_size = K.check_block_size(softmax_block_size)
    q, k, v = (_heads3(p) for p in qkvr)
    dq, dk, dv = (_heads3(p) for p in dqkvr)
    att3, datt3, dy = _heads3(att), _heads3(datt), _heads3(scratch)

    _launch_permute("unpermute_backward_kernel", scratch, dout, dtype, B, T, NH, HS, block_size)
    batched_matmul(datt3, dy, v, transa=False, transb=True)       # datt = dy v^T
    batched_matmul(dv, att3, dy, transa=True, transb=False)       # dv = att^T dy
    K.launch("attention.cu", softmax_kernel_name("softmax_backward_kernel", dtype, T),
             softmax_grid(B * NH * T, softmax_block_size), (softmax_block_size,),
             (datt, datt, att, K.f32(1.0 / math.sqrt(HS)), K.i32(B * NH * T), K.i32(T)))
    batched_matmul(dq, datt3, k, transa=False, transb=False)      # dq = dpreatt k
    batched_matmul(dk, datt3, q, transa=True, transb=False)       # dk = dpreatt^T q
    _launch_permute("permute_backward_kernel", dinp, dqkvr, dtype, B, T, NH, HS, block_size)


# -------------------------------------------------------------------------------------------------
# Grouped-query attention (nanochat): q (B, T, NH, HS), k and v (B, T, NKV, HS), query head h reading
# kv head h // G, G = NH / NKV. The same kernels: the permutes bring q to (B, NH, T, HS), which is
# (B, NKV, G*T, HS) with the G query heads of a group stacked along the rows, and k, v to
# (B, NKV, T, HS); every product then runs once per (b, kv head) over the group's G*T rows (batch
# B*NKV), so k and v are never copied per query head, and dk, dv's sum over the group is the GEMM's
# own contraction over rows. att (B, NH, T, T) is the same array as (B, NKV, G*T, T).


def _check_gqa(q, k, v, att=None):
    """q (B, T, NH, HS), k, v (B, T, NKV, HS) with NKV dividing NH; returns (B, T, NH, NKV, HS)."""
    K.check("q", q, ndim=4)
    B, T, NH, HS = q.shape
    K.check("k", k, ndim=4)
    NKV = k.shape[2]
    K.check("k", k, shape=(B, T, NKV, HS))
    K.check("v", v, shape=(B, T, NKV, HS))
    if NKV < 1 or NH % NKV:
        raise ValueError(f"k: {NKV} kv heads must divide the {NH} query heads of q")
    if att is not None:
        K.check("att", att, shape=(B, NH, T, T))
    return B, T, NH, NKV, HS


def _gqa_buffers(workspace, dtype, sizes: dict) -> dict:
    """Carve named (shape) buffers out of one flat workspace (allocated when None), each starting
    16 bytes after a multiple of 16 bytes, for 128-bit accesses and cuBLASLt."""
    align = K.x128_elems(dtype)
    counts = {name: K.ceil_div(int(np.prod(shape)), align) * align for name, shape in sizes.items()}
    need = sum(counts.values())
    if workspace is None:
        workspace = cp.empty(need, dtype=dtype)
    K.check("workspace", workspace, dtype=dtype, aligned=True)
    if workspace.size < need:
        raise ValueError(f"workspace: {workspace.size} elements, need {need}")
    out, start = {}, 0
    for name, shape in sizes.items():
        out[name] = workspace[start:start + int(np.prod(shape))].reshape(shape)
        start += counts[name]
    return out


def gqa_workspace_size(B, T, NH, NKV, HS, dtype, *, backward=False) -> int:
    """Elements of `workspace` gqa_attention_forward (backward=False) or _backward needs."""
    align = K.x128_elems(dtype)
    n_q, n_kv = (K.ceil_div(B * H * T * HS, align) * align for H in (NH, NKV))
    return 3 * n_q + 4 * n_kv if backward else 2 * n_q + 2 * n_kv


def _group(x, B, NKV):
    """(B, H, T, HS) head-major -> (B*NKV, rows, HS): a group's G heads are consecutive rows."""
    return x.reshape(B * NKV, -1, x.shape[-1])


def gqa_attention_forward(out, att, q, k, v, *, workspace=None, block_size=BLOCK_SIZE,
                          softmax_block_size=SOFTMAX_BLOCK_SIZE):
    """Causal grouped-query attention, scale 1 / sqrt(HS) (as llmpy.cpu.gqa_attention_forward).

    q (B, T, NH, HS); k, v (B, T, NKV, HS), NKV dividing NH; all contiguous, read only.
    att (B, NH, T, T): overwritten with the probabilities (upper triangle 0). out (B, T, NH, HS):
    overwritten. workspace: flat, >= gqa_workspace_size(...) elements of the dtype (the permuted
    q, k, v and the heads' outputs); allocated when None.
    """
    from llmpy.gpu.matmul import batched_matmul
    dtype = K.check_floats(out=out, att=att, q=q, k=k, v=v)
    B, T, NH, NKV, HS = _check_gqa(q, k, v, att)
    K.check("out", out, shape=q.shape)
    block_size = K.check_block_size(block_size)
    softmax_block_size = K.check_block_size(softmax_block_size)
    w = _gqa_buffers(workspace, dtype, {"q": (B, NH, T, HS), "k": (B, NKV, T, HS), "v": (B, NKV, T, HS),
                                         "y": (B, NH, T, HS)})
    for name, src, H in (("q", q, NH), ("k", k, NKV), ("v", v, NKV)):   # (B, T, H, HS) -> (B, H, T, HS)
        _launch_permute("unpermute_backward_kernel", w[name], src, dtype, B, T, H, HS, block_size)
    att_g = _group(att, B, NKV)                                            # (B*NKV, G*T, T)
    batched_matmul(att_g, _group(w["q"], B, NKV), _group(w["k"], B, NKV), transa=False, transb=True)
    K.launch("attention.cu", softmax_kernel_name("softmax_forward_kernel", dtype, T),
             softmax_grid(B * NH * T, softmax_block_size), (softmax_block_size,),
             (att, att, K.f32(1.0 / math.sqrt(HS)), K.i32(B * NH * T), K.i32(T), K.i32(1)))
    batched_matmul(_group(w["y"], B, NKV), att_g, _group(w["v"], B, NKV), transa=False, transb=False)
    _launch_permute("unpermute_kernel", out, w["y"], dtype, B, T, NH, HS, block_size)


def gqa_attention_backward(dq, dk, dv, datt, dout, q, k, v, att, *, workspace=None, block_size=BLOCK_SIZE,
                           softmax_block_size=SOFTMAX_BLOCK_SIZE):
    """Gradient of gqa_attention_forward: dq (B, T, NH, HS), dk, dv (B, T, NKV, HS) OVERWRITTEN (dk, dv
    summed over each kv head's query group); dout (B, T, NH, HS); att as saved by the forward;
    datt (B, NH, T, T) scratch. workspace: >= gqa_workspace_size(..., backward=True); None allocates."""
    from llmpy.gpu.matmul import batched_matmul
    dtype = K.check_floats(dq=dq, dk=dk, dv=dv, datt=datt, dout=dout, q=q, k=k, v=v, att=att)
    B, T, NH, NKV, HS = _check_gqa(q, k, v, att)
    K.check("datt", datt, shape=att.shape)
    for name, a, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v), ("dout", dout, q)):
        K.check(name, a, shape=like.shape)
    block_size = K.check_block_size(block_size)
    softmax_block_size = K.check_block_size(softmax_block_size)
    qs, kvs = (B, NH, T, HS), (B, NKV, T, HS)
    w = _gqa_buffers(workspace, dtype, {"q": qs, "k": kvs, "v": kvs, "dy": qs, "dq": qs, "dk": kvs, "dv": kvs})
    for name, src, H in (("q", q, NH), ("k", k, NKV), ("v", v, NKV), ("dy", dout, NH)):
        _launch_permute("unpermute_backward_kernel", w[name], src, dtype, B, T, H, HS, block_size)
    g = {name: _group(w[name], B, NKV) for name in w}
    att_g, datt_g = _group(att, B, NKV), _group(datt, B, NKV)
    batched_matmul(datt_g, g["dy"], g["v"], transa=False, transb=True)      # datt = dy v^T
    batched_matmul(g["dv"], att_g, g["dy"], transa=True, transb=False)      # dv = att^T dy (sums the group)
    K.launch("attention.cu", softmax_kernel_name("softmax_backward_kernel", dtype, T),
             softmax_grid(B * NH * T, softmax_block_size), (softmax_block_size,),
             (datt, datt, att, K.f32(1.0 / math.sqrt(HS)), K.i32(B * NH * T), K.i32(T)))
    batched_matmul(g["dq"], datt_g, g["k"], transa=False, transb=False)     # dq = dpreatt k
    batched_matmul(g["dk"], datt_g, g["q"], transa=True, transb=False)      # dk = dpreatt^T q
    for dst, name, H in ((dq, "dq", NH), (dk, "dk", NKV), (dv, "dv", NKV)):
        _launch_permute("unpermute_kernel", dst, w[name], dtype, B, T, H, HS, block_size)
