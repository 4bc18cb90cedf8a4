"""Token + position embedding on the GPU: launchers for cuda/encoder.cu. Reference: llmpy/cpu/encoder.py.

The dwte backward is deterministic: each distinct token's rows are summed by one block in a fixed
order. Which rows belong to which token is worked out on the host (`wte_buckets`, a stable argsort of
the B*T token ids, microseconds for GPT-2 batches), as llm.c does; the trainer already holds the
tokens on the host, so it passes them as `inp_host` and no device-to-host copy is needed.
"""
import cupy as cp
import numpy as np

from llmpy.gpu import _kernels as K

BLOCK_SIZE = 256   # forward and dwpe threads per block (llm.c's choice)
WTE_WARPS = 8      # dwte: warps per block splitting a bucket's rows (at most 8, the kernel's limit)
WTE_MAX_WARPS = 8  # = WTE_MAX_WARPS in cuda/encoder.cu


def _check_sizes(dtype, C: int):
    K.check_multiple("C", C, K.x128_elems(dtype), f"16-byte loads of {dtype}")


def _check_args(inp, act, table, pos):
    """Shared checks of the forward and backward: inp (B, T) int32, act (B, T, C), table (rows, C) and
    pos (maxT, C) of one float dtype with T <= maxT, or pos None (no position embedding). Each is a
    (name, array) pair. Returns B, T, C, dtype."""
    K.check("inp", inp, dtype=np.int32, ndim=2)
    B, T = inp.shape
    dtype = K.check_floats(**dict((act, table) if pos[1] is None else (act, table, pos)))
    C = table[1].shape[-1]
    K.check(act[0], act[1], shape=(B, T, C))
    K.check(table[0], table[1], shape=(None, C))
    if pos[1] is None:
        _check_sizes(dtype, C)
        return B, T, C, dtype
    K.check(pos[0], pos[1], shape=(None, C))
    if T > pos[1].shape[0]:
        raise ValueError(f"inp: T = {T} exceeds {pos[0]}'s {pos[1].shape[0]} positions")
    _check_sizes(dtype, C)
    return B, T, C, dtype


def encoder_forward(out, inp, wte, wpe, *, block_size=BLOCK_SIZE):
    """out[b, t] = wte[inp[b, t]] + wpe[t].

    out (B, T, C); inp (B, T) int32 token ids in [0, Vp) (not checked: that would need a device sync);
    wte (Vp, C); wpe (maxT, C) with T <= maxT, or None (no position embedding: nanochat's rotary
    model). One float dtype, C a multiple of 8 (bf16) / 4 (float32). Overwrites out.
    """
    B, T, C, dtype = _check_args(inp, ("out", out), ("wte", wte), ("wpe", wpe))
    block_size = K.check_block_size(block_size)
    K.launch("encoder.cu", K.template_name("encoder_forward_kernel", dtype),
             K.elementwise_grid(B * T * C, dtype, block_size), (block_size,),
             (out, inp, wte, K.nullable(wpe), K.i32(B * T), K.i32(T), K.i32(C)))


def wte_buckets(tokens: np.ndarray, vocab_rows: int) -> tuple[np.ndarray, int]:
    """Host work list for encoder_backward_wte_kernel: one bucket per distinct token, largest first
    (the long sums start early), positions ascending inside a bucket. Returns (buckets, num_buckets)
    with buckets = int32 [token of each bucket | nb+1 prefix offsets | flat positions b*T+t]."""
    flat = np.asarray(tokens).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_rows):
        raise ValueError(f"inp: token ids must lie in [0, {vocab_rows}), got [{flat.min()}, {flat.max()}]")
    order = np.argsort(flat, kind="stable")                        # positions grouped by token
    distinct, first, counts = np.unique(flat[order], return_index=True, return_counts=True)
    by_size = np.argsort(-counts, kind="stable")                   # bucket order: largest first
    sizes = counts[by_size]
    starts = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=starts[1:])
    # output slot j of bucket i reads order[first[i] + (j - starts[i])]
    src = np.repeat(first[by_size] - starts[:-1], sizes) + np.arange(flat.size)
    buckets = np.concatenate([distinct[by_size], starts, order[src]]).astype(np.int32)
    return buckets, len(sizes)


def workspace_size(B: int, T: int) -> int:
    """int32 elements of the largest bucket list wte_buckets can return for B*T tokens: nb tokens +
    nb + 1 offsets + B*T positions, nb <= B*T distinct tokens (all different: 3*B*T + 1)."""
    return 3 * B * T + 1


def _upload(buckets: np.ndarray, workspace):
    """Copy the bucket list to the device: into workspace[:len] when given, else a new array."""
    if workspace is None:
        return cp.asarray(buckets)
    K.check("workspace", workspace, dtype=np.int32, ndim=1)
    if workspace.size < buckets.size:
        raise ValueError(f"workspace: {workspace.size} elements, need {buckets.size} "
                         f"(workspace_size(B, T) is always enough)")
    dev = workspace[:buckets.size]
    dev.set(buckets)
    return dev


def wte_grid(num_buckets: int, C: int, dtype) -> tuple[int, int]:
    """dwte grid: (bucket, group of 32 chunks of channels)."""
    return (num_buckets, K.ceil_div(C, 32 * K.x128_elems(dtype)))


def encoder_backward(dwte, dwpe, dout, inp, *, seed=0, inp_host=None, workspace=None,
                     block_size=BLOCK_SIZE, wte_warps=WTE_WARPS):
    """Scatter dout back into the embedding gradients.

    dwte (Vp, C); dwpe (maxT, C) or None; dout (B, T, C); inp (B, T) int32. ACCUMULATES: dwte[inp[b, t]] +=
    dout[b, t] and dwpe[t] += sum_b dout[b, t], in fixed orders (bit-reproducible). bf16 results are
    rounded stochastically with `seed` (one uint32 per backward, llm.c's per-micro-step draw).
    inp_host: the tokens as a NumPy array, if the caller has them (else inp is copied to the host,
    which synchronizes). workspace: int32 device array of >= workspace_size(B, T) elements for the bucket list
    (else one is allocated: pass it when capturing a CUDA graph -- though the host step itself
    cannot be captured, so this op stays outside captured regions, as in llm.c).
    """
    B, T, C, dtype = _check_args(inp, ("dout", dout), ("dwte", dwte), ("dwpe", dwpe))
    block_size = K.check_block_size(block_size)
    if not 1 <= wte_warps <= WTE_MAX_WARPS:
        raise ValueError(f"wte_warps must be in [1, {WTE_MAX_WARPS}], got {wte_warps}")
    if B * T == 0:
        return
    tokens = inp.get() if inp_host is None else np.asarray(inp_host)
    if tokens.shape != (B, T):
        raise ValueError(f"inp_host: shape {tokens.shape}, expected {(B, T)} like inp")
    buckets, num_buckets = wte_buckets(tokens, dwte.shape[0])
    dev_buckets = _upload(buckets, workspace)

    seed = K.u32(seed)
    if dwpe is not None:
        K.launch("encoder.cu", K.template_name("encoder_backward_wpe_kernel", dtype),
                 K.elementwise_grid(T * C, dtype, block_size), (block_size,),
                 (dwpe, dout, K.i32(B), K.i32(T), K.i32(C), seed))
    K.launch("encoder.cu", K.template_name("encoder_backward_wte_kernel", dtype),
             wte_grid(num_buckets, C, dtype), (32, wte_warps),
             (dwte, dout, dev_buckets, K.i32(num_buckets), K.i32(C), seed))
