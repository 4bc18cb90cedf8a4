"""Fused softmax + cross-entropy + logit gradient on the GPU: launcher for cuda/classifier.cu.
Reference: llmpy/cpu/classifier.py."""
import numpy as np

from llmpy.gpu import _kernels as K

BLOCK_SIZE = 1024   # one block per row; llm.c's choice (the Vp ~ 50k row is long)
SOFTCAP_BLOCK_SIZE = 256


def fused_classifier(dlogits, losses, logits, targets, dloss, V, *, softcap=0.0, block_size=BLOCK_SIZE):
    """Per-token cross-entropy over the first V of Vp columns, and its gradient, fused.

    logits (B, T, Vp) float32 or bf16, Vp a multiple of 8 (bf16) / 4 (float32); targets (B, T) int32
    in [0, V) (not checked: that would need a device sync); dloss: float, each token's loss weight.
    losses (B, T) float32 ACCUMULATES += -log softmax(logits)[target].
    dlogits (B, T, Vp) is OVERWRITTEN with (softmax - onehot) * dloss in columns < V; the padded
    columns are left untouched (0 in training, since those logits are 0 when the padded wte rows
    are). dlogits may be logits itself (in place) or None (losses only).
    softcap > 0 (nanochat: 15) applies z = softcap * tanh(logits / softcap) first, and dlogits is the
    gradient with respect to the uncapped logits; 0 turns it off (GPT-2).
    """
    # B*T*Vp may pass 2^31 (64 x 1024 x 50304): the kernel offsets rows with size_t
    dtype = K.check("logits", logits, dtype=K.FLOAT_DTYPES, aligned=True, int32_size=False).dtype
    if logits.ndim < 2:
        raise ValueError(f"logits: shape {logits.shape}, expected (B, T, Vp)")
    Vp = logits.shape[-1]
    if dlogits is not None:
        K.check("dlogits", dlogits, dtype=dtype, shape=logits.shape, aligned=True, int32_size=False)
    K.check("losses", losses, dtype=np.float32, shape=logits.shape[:-1])
    K.check("targets", targets, dtype=np.int32, shape=logits.shape[:-1])
    if not 1 <= int(V) <= Vp:
        raise ValueError(f"V = {V} must be in [1, Vp = {Vp}]")
    K.check_multiple("Vp", Vp, K.x128_elems(dtype), f"16-byte loads of {dtype}")
    if not softcap >= 0.0:
        raise ValueError(f"softcap = {softcap} must be >= 0 (0 turns it off)")
    block_size = K.check_block_size(block_size)
    rows = losses.size
    if rows == 0:
        return
    K.launch("classifier.cu", K.template_name("fused_classifier_kernel", dtype), (rows,), (block_size,),
             (K.nullable(dlogits), losses, logits, targets, K.f32(dloss), K.i32(rows), K.i32(V), K.i32(Vp),
              K.f32(softcap)))


def softcap_forward(out, inp, softcap, *, block_size=SOFTCAP_BLOCK_SIZE):
    """out = softcap * tanh(inp / softcap), elementwise (softcap > 0); out may be inp. Overwrites out."""
    if not softcap > 0.0:
        raise ValueError(f"softcap = {softcap} must be > 0")
    dtype = K.check_floats(inp=inp, out=out)
    K.check_same_shape(inp=inp, out=out)
    block_size = K.check_block_size(block_size)
    K.launch("classifier.cu", K.template_name("softcap_forward_kernel", dtype),
             K.elementwise_grid(inp.size, dtype, block_size), (block_size,),
             (out, inp, K.i32(inp.size), K.f32(softcap)))
