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
