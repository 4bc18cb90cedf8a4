"""Linear layer (matmul + bias) in NumPy: the reference for the cuBLASLt matmul in llmpy/gpu/matmul.py.

out = inp @ weight.T + bias, as torch.nn.functional.linear:
https://pytorch.org/docs/stable/generated/torch.nn.functional.linear.html.
Leading dimensions are flattened so each product is a 2-D BLAS call (np.matmul with out=).
"""
import numpy as np

# dweight is accumulated in blocks of output rows of about this many elements: NumPy's matmul has no
# beta = 1, and one weight-sized temporary for the (Vp, C) classifier is 154 MB of page faults.
DWEIGHT_BLOCK = 1 << 20


def _rows(a):
    """2-D view (rows, last dim) of a; raises instead of silently copying an output."""
    return a.reshape(-1, a.shape[-1], copy=False)


def matmul_forward(out, inp, weight, bias):
    """out = inp @ weight.T + bias.

    out (..., OC); inp (..., C); weight (OC, C); bias (OC,) or None. Overwrites out.
    """
    out2 = _rows(out)
    np.matmul(_rows(inp), weight.T, out=out2)   # weight.T is a transposed view: BLAS reads it as is
    if bias is not None:
        out2 += bias


def matmul_backward(dinp, dweight, dbias, dout, inp, weight):
    """Gradients of out = inp @ weight.T + bias.

    dinp (..., C); dweight (OC, C); dbias (OC,) or None; dout (..., OC); inp (..., C); weight (OC, C).
    dinp = dout @ weight is OVERWRITTEN; dweight += dout.T @ inp and dbias += sum of dout over rows
    ACCUMULATE.
    """
    dout2, inp2 = _rows(dout), _rows(inp)
    OC, C = weight.shape
    np.matmul(dout2, weight, out=_rows(dinp))
    step = max(1, DWEIGHT_BLOCK // C)
    block = np.empty((min(step, OC), C), dtype=dweight.dtype)
    for r0 in range(0, OC, step):
        r1 = min(r0 + step, OC)
        dweight[r0:r1] += np.matmul(dout2[:, r0:r1].T, inp2, out=block[:r1 - r0])
    if dbias is not None:
        dbias += dout2.sum(axis=0)
