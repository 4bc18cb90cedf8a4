"""The op registry of scripts/bench_kernels.py: one entry (a `Case`) per op and direction, at GPT-2
124M shapes, each with the bytes or FLOPs the op must move or do and a plain baseline.

A Case names the function (same name in llmpy.cpu and llmpy.gpu), builds host float32/int32 inputs
(saved tensors such as layernorm's mean/rstd or attention's probabilities come from a reference
forward, so a backward sees consistent inputs), lists the call's positional arguments by array name,
and gives the baseline as `baseline(xp, arrays) -> {output: expected}`, written once for NumPy and
CuPy alike. Outputs that accumulate (+=) start at zero, so the baseline returns the increment.
To benchmark a new op: add a Case here, with its family in FAMILIES.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

GELU_K, GELU_A, LN_EPS = math.sqrt(2.0 / math.pi), 0.044715, 1e-5
FAMILIES = ("encoder", "layernorm", "fused_residual", "residual", "matmul", "attention", "gelu",
            "classifier", "adamw", "global_norm", "rmsnorm", "rope", "relu2", "muon")
RMS_EPS, ROPE_BASE, SOFTCAP, NS_COEFFS = 1e-6, 10000.0, 15.0, (3.4445, -4.7750, 2.0315)


@dataclass(frozen=True)
class Dims:
    B: int
    T: int
    C: int = 768          # GPT-2 124M
    NH: int = 12
    V: int = 50257
    Vp: int = 50304
    maxT: int = 1024
    N: int = 124_475_904  # parameters of d12: the size of one AdamW / global-norm pass


class Ref(str):
    """A keyword argument that names one of the case's arrays (positional strings always do)."""


@dataclass
class Case:
    op: str                               # family, also the module stem: llmpy.<backend>.<op>
    direction: str                        # forward | backward | fused | update
    fn: str                               # function name in llmpy.cpu / llmpy.gpu
    label: str                            # shape in words
    make: Callable[[np.random.Generator], dict]   # host float32 / int32 arrays
    args: tuple                           # str: an array of make(); anything else is passed as is
    outputs: tuple[str, ...]              # arrays compared against the baseline
    baseline: Callable                    # (xp, arrays) -> {output name: expected array}
    baseline_name: str
    bytes: Callable[[dict], int] | None = None    # minimal bytes moved (reads + writes)
    flops: float | None = None
    kwargs: dict = field(default_factory=dict)
    case: str = ""                        # which instance, for ops with several shapes (matmul)
    module: str = ""                      # llmpy.<backend>.<module> when it differs from op
    baseline_f32: bool = False            # GPU: time the baseline in float32 even for bf16 storage
    bf16_only: bool = False               # GPU: the kernels exist for bf16 storage only


def nb(*arrays) -> int:
    return sum(a.nbytes for a in arrays)


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))


def zeros(*shape):
    return np.zeros(shape, dtype=np.float32)


def ln_stats(x):
    """mean, rstd of layernorm over the last axis (the saved statistics a backward needs)."""
    m = x.mean(-1, dtype=np.float64)
    v = ((x - m[..., None]) ** 2).mean(-1)
    return m.astype(np.float32), (1.0 / np.sqrt(v + LN_EPS)).astype(np.float32)


def ln_baseline(xp, x, w, b):
    m = x.mean(-1, keepdims=True)
    r = 1.0 / xp.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + LN_EPS)
    return (x - m) * r * w + b, m[..., 0], r[..., 0]


def scatter_add(xp, a, idx, b):
    if xp is np:
        np.add.at(a, idx, b)
    else:
        import cupyx
        cupyx.scatter_add(a, idx, b)


def causal_logits(xp, q, k):
    """q k^T / sqrt(HS) with -inf above the diagonal; q, k (B, NH, T, HS)."""
    T, HS = q.shape[-2], q.shape[-1]
    s = (q @ k.swapaxes(-1, -2)) * (1.0 / math.sqrt(HS))
    return xp.where(xp.tril(xp.ones((T, T), dtype=bool)), s, -xp.inf)


def softmax_causal(xp, q, k):
    """Causal softmax(q k^T / sqrt(HS)) over the last axis; q, k (B, NH, T, HS)."""
    s = causal_logits(xp, q, k)
    p = xp.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def logsumexp_causal(xp, q, k):
    """log sum_j exp(q_t.k_j / sqrt(HS)) over j <= t: (B, NH, T)."""
    s = causal_logits(xp, q, k)
    top = s.max(-1, keepdims=True)
    return top[..., 0] + xp.log(xp.exp(s - top).sum(-1))


def registry(d: Dims, quick: bool) -> list[Case]:
    B, T, C, NH, V, Vp, maxT, N = d.B, d.T, d.C, d.NH, d.V, d.Vp, d.maxT, d.N
    BT, HS = B * T, d.C // d.NH
    bt = f"B={B} T={T}"
    cases = []

    # ---- encoder: out = wte[inp] + wpe[:T]; backward scatters into dwte, sums over B into dwpe
    def enc_inputs(rng):
        return {"inp": rng.integers(0, V, (B, T), dtype=np.int32),
                "wte": randn(rng, Vp, C, scale=0.02), "wpe": randn(rng, maxT, C, scale=0.01)}
    cases.append(Case(
        "encoder", "forward", "encoder_forward", f"{bt} C={C}",
        lambda rng: {"out": zeros(B, T, C), **enc_inputs(rng)},
        ("out", "inp", "wte", "wpe"), ("out",),
        lambda xp, a: {"out": a["wte"][a["inp"]] + a["wpe"][:T]}, "wte[inp] + wpe[:T]",
        # read the gathered wte rows, wpe[:T] and the ids; write out
        bytes=lambda a: nb(a["inp"]) + 2 * nb(a["out"]) + a["wpe"][:T].nbytes))

    def enc_backward_baseline(xp, a):
        dwte, dwpe = xp.zeros_like(a["dwte"]), xp.zeros_like(a["dwpe"])
        scatter_add(xp, dwte, a["inp"], a["dout"])
        dwpe[:T] = a["dout"].sum(0)
        return {"dwte": dwte, "dwpe": dwpe}
    cases.append(Case(
        "encoder", "backward", "encoder_backward", f"{bt} C={C}",
        lambda rng: {"dwte": zeros(Vp, C), "dwpe": zeros(maxT, C), "dout": randn(rng, B, T, C),
                     "inp": rng.integers(0, V, (B, T), dtype=np.int32)},
        ("dwte", "dwpe", "dout", "inp"), ("dwte", "dwpe"),
        enc_backward_baseline, "add.at(dwte, inp, dout); dwpe += dout.sum(0)",
        # read dout and the ids; read-modify-write one dwte row per token and dwpe[:T]
        bytes=lambda a: nb(a["dout"], a["inp"]) + 2 * nb(a["dout"]) + 2 * a["dwpe"][:T].nbytes))

    # ---- layernorm (eps 1e-5, biased variance) and its fusion with the residual add
    def ln_params(rng):
        return {"weight": 1.0 + randn(rng, C, scale=0.1), "bias": randn(rng, C, scale=0.1)}
    cases.append(Case(
        "layernorm", "forward", "layernorm_forward", f"{bt} C={C}",
        lambda rng: {"out": zeros(B, T, C), "mean": zeros(B, T), "rstd": zeros(B, T),
                     "inp": randn(rng, B, T, C), **ln_params(rng)},
        ("out", "mean", "rstd", "inp", "weight", "bias"), ("out", "mean", "rstd"),
        lambda xp, a: dict(zip(("out", "mean", "rstd"), ln_baseline(xp, a["inp"], a["weight"], a["bias"]))),
        "(x - mean) / sqrt(var + eps) * w + b",
        bytes=lambda a: nb(a["inp"], a["out"], a["mean"], a["rstd"], a["weight"], a["bias"])))

    def ln_backward_make(rng):
        a = {"dinp": zeros(B, T, C), "dweight": zeros(C), "dbias": zeros(C), "dout": randn(rng, B, T, C),
             "inp": randn(rng, B, T, C), **ln_params(rng)}
        a["mean"], a["rstd"] = ln_stats(a["inp"])
        return a

    def ln_backward_baseline(xp, a):
        n = (a["inp"] - a["mean"][..., None]) * a["rstd"][..., None]
        g = a["dout"] * a["weight"]
        dx = (g - g.mean(-1, keepdims=True) - n * (g * n).mean(-1, keepdims=True)) * a["rstd"][..., None]
        return {"dinp": dx, "dweight": (n * a["dout"]).sum((0, 1)), "dbias": a["dout"].sum((0, 1))}
    cases.append(Case(
        "layernorm", "backward", "layernorm_backward", f"{bt} C={C}", ln_backward_make,
        ("dinp", "dweight", "dbias", "dout", "inp", "weight", "mean", "rstd"), ("dinp", "dweight", "dbias"),
        ln_backward_baseline, "rstd (g - mean(g) - n mean(g n)), g = w dout",
        # read dout, inp, mean, rstd, weight; dinp, dweight, dbias are read-modify-write (+=)
        bytes=lambda a: nb(a["dout"], a["inp"], a["mean"], a["rstd"], a["weight"])
        + 2 * nb(a["dinp"], a["dweight"], a["dbias"])))

    def fused_baseline(xp, a):
        r = a["inp1"] + a["inp2"]
        out, m, s = ln_baseline(xp, r, a["weight"], a["bias"])
        return {"residual": r, "normed": out, "mean": m, "rstd": s}
    cases.append(Case(
        "fused_residual", "forward", "fused_residual_forward", f"{bt} C={C}",
        lambda rng: {"residual": zeros(B, T, C), "normed": zeros(B, T, C), "mean": zeros(B, T),
                     "rstd": zeros(B, T), "inp1": randn(rng, B, T, C), "inp2": randn(rng, B, T, C),
                     **ln_params(rng)},
        ("residual", "normed", "mean", "rstd", "inp1", "inp2", "weight", "bias"),
        ("residual", "normed", "mean", "rstd"), fused_baseline, "r = a + b; layernorm(r)",
        bytes=lambda a: nb(*(a[k] for k in ("residual", "normed", "mean", "rstd", "inp1", "inp2", "weight",
                                            "bias"))),
        module="layernorm"))

    cases.append(Case(
        "residual", "forward", "residual_forward", f"{bt} C={C}",
        lambda rng: {"out": zeros(B, T, C), "inp1": randn(rng, B, T, C), "inp2": randn(rng, B, T, C)},
        ("out", "inp1", "inp2"), ("out",), lambda xp, a: {"out": a["inp1"] + a["inp2"]}, "a + b",
        bytes=lambda a: nb(a["out"], a["inp1"], a["inp2"])))

    # ---- matmul: the five linear layers of GPT-2 (quick: the MLP's first one only)
    shapes = {"qkv": (C, 3 * C, True), "attproj": (C, C, True), "fc": (C, 4 * C, True),
              "fcproj": (4 * C, C, True), "lm_head": (C, Vp, False)}
    if quick:
        shapes = {"fc": shapes["fc"]}
    for name, (cin, oc, has_bias) in shapes.items():
        label = f"{bt} C={cin} OC={oc}" + ("" if has_bias else " no bias")

        def mm_forward_make(rng, cin=cin, oc=oc, has_bias=has_bias):
            a = {"out": zeros(B, T, oc), "inp": randn(rng, B, T, cin),
                 "weight": randn(rng, oc, cin, scale=0.02)}
            if has_bias:
                a["bias"] = randn(rng, oc, scale=0.02)
            return a

        def mm_forward_baseline(xp, a, cin=cin, oc=oc):   # 2-D products: CuPy 14.2's batched bf16 is broken
            out = (a["inp"].reshape(-1, cin) @ a["weight"].T).reshape(B, T, oc)
            return {"out": out + a["bias"] if "bias" in a else out}
        cases.append(Case(
            "matmul", "forward", "matmul_forward", label, mm_forward_make,
            ("out", "inp", "weight", "bias" if has_bias else None), ("out",),
            mm_forward_baseline, "inp @ weight.T + bias", flops=2.0 * BT * cin * oc, case=name))

        def mm_backward_make(rng, cin=cin, oc=oc, has_bias=has_bias):
            a = {"dinp": zeros(B, T, cin), "dweight": zeros(oc, cin), "dout": randn(rng, B, T, oc),
                 "inp": randn(rng, B, T, cin), "weight": randn(rng, oc, cin, scale=0.02)}
            if has_bias:
                a["dbias"] = zeros(oc)
            return a

        def mm_backward_baseline(xp, a, cin=cin, oc=oc):
            dout2, inp2 = a["dout"].reshape(-1, oc), a["inp"].reshape(-1, cin)
            r = {"dinp": (dout2 @ a["weight"]).reshape(B, T, cin), "dweight": dout2.T @ inp2}
            if "dbias" in a:
                r["dbias"] = dout2.sum(0)
            return r
        cases.append(Case(
            "matmul", "backward", "matmul_backward", label, mm_backward_make,
            ("dinp", "dweight", "dbias" if has_bias else None, "dout", "inp", "weight"),
            ("dinp", "dweight") + (("dbias",) if has_bias else ()),
            mm_backward_baseline, "dout @ W; dout.T @ inp; dout.sum(0)", flops=4.0 * BT * cin * oc,
            case=name))

    # ---- attention: causal softmax(q k^T / sqrt(HS)) v, the (B, NH, T, T) probabilities materialized
    att_flops = 4.0 * B * NH * T * T * HS   # q k^T and att v, full T x T (the kernels skip no tiles)

    def heads(xp, x):   # (B, T, 3C) -> q, k, v each (B, NH, T, HS)
        return x.reshape(B, T, 3, NH, HS).transpose(2, 0, 3, 1, 4)

    def joined(y):      # (B, NH, T, HS) -> (B, T, C)
        return y.transpose(0, 2, 1, 3).reshape(B, T, C)

    def att_forward_baseline(xp, a):
        q, k, v = heads(xp, a["inp"])
        p = softmax_causal(xp, q, k)
        return {"out": joined(p @ v), "att": p, "qkvr": xp.stack((q, k, v))}
    cases.append(Case(
        "attention", "forward", "attention_forward", f"{bt} NH={NH} HS={HS}",
        lambda rng: {"out": zeros(B, T, C), "qkvr": zeros(3, B, NH, T, HS), "att": zeros(B, NH, T, T),
                     "inp": randn(rng, B, T, 3 * C)},
        ("out", "qkvr", "att", "inp"), ("out", "att", "qkvr"),
        att_forward_baseline, "softmax(mask(q k^T / sqrt(HS))) v", flops=att_flops,
        baseline_f32=True))   # CuPy 14.2's batched bf16 matmul is broken (cupy-notes.md §2.1)

    def att_backward_make(rng):
        x = randn(rng, B, T, 3 * C)
        qkvr = np.ascontiguousarray(heads(np, x))
        return {"dinp": zeros(B, T, 3 * C), "dqkvr": zeros(3, B, NH, T, HS), "datt": zeros(B, NH, T, T),
                "scratch": zeros(B, NH, T, HS), "dout": randn(rng, B, T, C), "qkvr": qkvr,
                "att": softmax_causal(np, qkvr[0], qkvr[1]).astype(np.float32)}

    def att_backward_baseline(xp, a):
        q, k, v = a["qkvr"]
        p = a["att"]
        dy = a["dout"].reshape(B, T, NH, HS).transpose(0, 2, 1, 3)
        dp = dy @ v.swapaxes(-1, -2)
        ds = p * (dp - (p * dp).sum(-1, keepdims=True)) * (1.0 / math.sqrt(HS))
        dqkv = xp.stack((ds @ k, ds.swapaxes(-1, -2) @ q, p.swapaxes(-1, -2) @ dy))   # (3, B, NH, T, HS)
        return {"dinp": dqkv.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * C)}
    cases.append(Case(
        "attention", "backward", "attention_backward", f"{bt} NH={NH} HS={HS}", att_backward_make,
        ("dinp", "dqkvr", "datt", "scratch", "dout", "qkvr", "att"), ("dinp",),
        att_backward_baseline, "softmax backward + 4 batched matmuls", flops=2 * att_flops,
        baseline_f32=True))

    # ---- the fused (flash) attention, --flash-attention 1: the same math, no T x T buffers; bf16 only
    #      on the GPU (tensor cores). Its causal kernels skip the tiles above the diagonal: half the FLOPs.
    flash_flops = att_flops / 2

    def flash_forward_baseline(xp, a):
        q, k, v = heads(xp, a["inp"])
        return {"out": joined(softmax_causal(xp, q, k) @ v), "lse": logsumexp_causal(xp, q, k)}
    cases.append(Case(
        "attention", "forward", "flash_attention_forward", f"{bt} NH={NH} HS={HS} fused",
        lambda rng: {"out": zeros(B, T, C), "lse": zeros(B, NH, T), "inp": randn(rng, B, T, 3 * C)},
        ("out", "lse", "inp"), ("out", "lse"), flash_forward_baseline, "softmax(mask(q k^T / sqrt(HS))) v",
        flops=flash_flops, case="flash", module="flash_attention", baseline_f32=True, bf16_only=True))

    def flash_backward_make(rng):
        x = randn(rng, B, T, 3 * C)
        q, k, v = heads(np, x)
        return {"dinp": zeros(B, T, 3 * C), "delta": zeros(B, NH, T), "dout": randn(rng, B, T, C), "inp": x,
                "out": joined(softmax_causal(np, q, k) @ v).astype(np.float32),
                "lse": logsumexp_causal(np, q, k).astype(np.float32)}

    def flash_backward_baseline(xp, a):
        qkvr = xp.ascontiguousarray(heads(xp, a["inp"]))
        return att_backward_baseline(xp, {"qkvr": qkvr, "att": softmax_causal(xp, qkvr[0], qkvr[1]),
                                          "dout": a["dout"]})
    cases.append(Case(
        "attention", "backward", "flash_attention_backward", f"{bt} NH={NH} HS={HS} fused", flash_backward_make,
        ("dinp", "delta", "dout", "inp", "out", "lse"), ("dinp",), flash_backward_baseline,
        "softmax backward + 4 batched matmuls", flops=flash_flops * 3.5,   # 7 tile products to the forward's 2
        case="flash", module="flash_attention", baseline_f32=True, bf16_only=True))

    # ---- GELU (tanh approximation) on the MLP's (B, T, 4C) activation
    def gelu(xp, x):
        return 0.5 * x * (1.0 + xp.tanh(GELU_K * (x + GELU_A * x * x * x)))

    def gelu_grad(xp, x):
        t = xp.tanh(GELU_K * (x + GELU_A * x * x * x))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_A * x * x)
    cases.append(Case(
        "gelu", "forward", "gelu_forward", f"{bt} 4C={4 * C}",
        lambda rng: {"out": zeros(B, T, 4 * C), "inp": randn(rng, B, T, 4 * C)},
        ("out", "inp"), ("out",), lambda xp, a: {"out": gelu(xp, a["inp"])},
        "0.5 x (1 + tanh(k (x + 0.044715 x^3)))", bytes=lambda a: nb(a["out"], a["inp"])))
    cases.append(Case(
        "gelu", "backward", "gelu_backward", f"{bt} 4C={4 * C}",
        lambda rng: {"dinp": zeros(B, T, 4 * C), "inp": randn(rng, B, T, 4 * C),
                     "dout": randn(rng, B, T, 4 * C)},
        ("dinp", "inp", "dout"), ("dinp",), lambda xp, a: {"dinp": gelu_grad(xp, a["inp"]) * a["dout"]},
        "gelu'(x) * dout", bytes=lambda a: nb(a["dinp"], a["inp"], a["dout"])))

    # ---- fused classifier: softmax + cross-entropy + dlogits, in place on the logits
    dloss = 1.0 / BT

    def cls_make(rng):
        logits = randn(rng, B, T, Vp, scale=2.0)
        logits[..., V:] = 0.0   # padded columns hold 0 (their wte rows are 0)
        return {"logits": logits, "losses": zeros(B, T),
                "targets": rng.integers(0, V, (B, T), dtype=np.int32)}

    def cls_baseline(xp, a):
        x = a["logits"][..., :V].reshape(BT, V)
        tgt = a["targets"].reshape(BT)
        rows = xp.arange(BT)
        mx = x.max(-1, keepdims=True)
        lse = xp.log(xp.exp(x - mx).sum(-1, keepdims=True)) + mx
        d = xp.exp(x - lse) * dloss
        d[rows, tgt] -= dloss
        full = xp.zeros((BT, Vp), dtype=d.dtype)
        full[:, :V] = d
        return {"logits": full.reshape(B, T, Vp), "losses": (lse[:, 0] - x[rows, tgt]).reshape(B, T)}
    cases.append(Case(
        "classifier", "fused", "fused_classifier", f"{bt} V={V} Vp={Vp}", cls_make,
        ("logits", "losses", "logits", "targets", dloss, V), ("logits", "losses"),
        cls_baseline, "log-softmax, -logp[target], (softmax - onehot) * dloss",
        # read the logits once, write dlogits over them; ids and losses (+=)
        bytes=lambda a: 2 * nb(a["logits"]) + nb(a["targets"]) + 2 * nb(a["losses"])))

    # ---- AdamW over all parameters (with fp32 master weights when the params are bf16)
    hyper = dict(lr=3e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, t=10)

    def adamw_make(rng):
        p = randn(rng, N, scale=0.02)
        return {"param": p, "m": randn(rng, N, scale=1e-3), "v": np.abs(randn(rng, N, scale=1e-6)),
                "grad": randn(rng, N, scale=1e-3), "master": p.copy()}

    def adamw_baseline(xp, a):
        h, p = hyper, a.get("master", a["param"])
        m = h["beta1"] * a["m"] + (1 - h["beta1"]) * a["grad"]
        v = h["beta2"] * a["v"] + (1 - h["beta2"]) * a["grad"] ** 2
        mhat, vhat = m / (1 - h["beta1"] ** h["t"]), v / (1 - h["beta2"] ** h["t"])
        p = p - h["lr"] * (mhat / (xp.sqrt(vhat) + h["eps"]) + h["weight_decay"] * p)
        return {"param": p, "master": p, "m": m, "v": v}
    cases.append(Case(
        "adamw", "update", "adamw_update", f"N={N:,}", adamw_make, ("param", "m", "v", "grad"),
        ("param", "master", "m", "v"), adamw_baseline, "m, v, p updates as array expressions",
        # read the fp32 weights (master, or param itself), m, v, grad; write them and param (bf16) back
        bytes=lambda a: 2 * nb(a.get("master", a["param"]), a["m"], a["v"]) + nb(a["grad"])
        + (nb(a["param"]) if "master" in a else 0),
        kwargs={**hyper, "master": Ref("master")}))

    cases += nanochat_cases(d, quick)

    cases.append(Case(
        "global_norm", "forward", "global_norm_squared", f"N={N:,}",
        lambda rng: {"norm": zeros(1), "grad": randn(rng, N, scale=1e-3)}, ("norm", "grad"), ("norm",),
        lambda xp, a: {"norm": (a["grad"] * a["grad"]).sum().reshape(1)}, "(g * g).sum()",  # pairwise sum
        bytes=lambda a: nb(a["grad"]), module="adamw"))
    return cases


def newton_schulz(xp, g, steps=5):
    """nanochat's quintic Newton-Schulz on each matrix of g (..., rows, cols), in g's dtype."""
    a, b, c = NS_COEFFS
    tall = g.shape[-2] > g.shape[-1]
    x = g.swapaxes(-1, -2) if tall else g
    x = x / (xp.sqrt((x * x).sum((-2, -1), keepdims=True)) + 1e-7)
    for _ in range(steps):
        A = x @ x.swapaxes(-1, -2)
        x = a * x + (b * A + c * (A @ A)) @ x
    return x.swapaxes(-1, -2) if tall else x


def nanochat_cases(d: Dims, quick: bool) -> list[Case]:
    """The nanochat model's own ops (issue 17) at GPT-2 124M's width: weightless RMSNorm (and QK-norm
    rows), RoPE on q, squared ReLU, the softcapped classifier and Muon over the 12 layers' c_fc."""
    B, T, C, NH, V, Vp = d.B, d.T, d.C, d.NH, d.V, d.Vp
    HS, bt = C // NH, f"B={B} T={T}"
    cases = []

    def rms(xp, x):
        return 1.0 / xp.sqrt((x * x).mean(-1) + RMS_EPS)
    cases.append(Case(
        "rmsnorm", "forward", "rmsnorm_forward", f"{bt} C={C}",
        lambda rng: {"out": zeros(B, T, C), "rstd": zeros(B, T), "inp": randn(rng, B, T, C)},
        ("out", "rstd", "inp"), ("out", "rstd"),
        lambda xp, a: {"out": a["inp"] * rms(xp, a["inp"])[..., None], "rstd": rms(xp, a["inp"])},
        "x / sqrt(mean(x^2) + eps)", bytes=lambda a: nb(a["out"], a["rstd"], a["inp"])))

    def rms_backward_make(rng):
        a = {"dinp": zeros(B, T, C), "dout": randn(rng, B, T, C), "inp": randn(rng, B, T, C)}
        a["rstd"] = (1.0 / np.sqrt((a["inp"].astype(np.float64) ** 2).mean(-1) + RMS_EPS)).astype(np.float32)
        return a

    def rms_backward_baseline(xp, a):
        r = a["rstd"][..., None]
        n = a["inp"] * r
        return {"dinp": (a["dout"] - n * (a["dout"] * n).mean(-1, keepdims=True)) * r}
    cases.append(Case(
        "rmsnorm", "backward", "rmsnorm_backward", f"{bt} C={C}", rms_backward_make,
        ("dinp", "dout", "inp", "rstd"), ("dinp",), rms_backward_baseline, "rstd (dy - n mean(dy n))",
        # read dout, inp, rstd; dinp is read-modify-write (+=)
        bytes=lambda a: nb(a["dout"], a["inp"], a["rstd"]) + 2 * nb(a["dinp"])))

    def fused_rms_baseline(xp, a):
        r = a["inp1"] + a["inp2"]
        return {"residual": r, "normed": r * rms(xp, r)[..., None], "rstd": rms(xp, r)}
    cases.append(Case(
        "rmsnorm", "forward", "fused_residual_rmsnorm_forward", f"{bt} C={C} +residual",
        lambda rng: {"residual": zeros(B, T, C), "normed": zeros(B, T, C), "rstd": zeros(B, T),
                     "inp1": randn(rng, B, T, C), "inp2": randn(rng, B, T, C)},
        ("residual", "normed", "rstd", "inp1", "inp2"), ("residual", "normed", "rstd"), fused_rms_baseline,
        "r = a + b; rmsnorm(r)",
        bytes=lambda a: nb(*(a[k] for k in ("residual", "normed", "rstd", "inp1", "inp2"))),
        case="fused"))
    cases.append(Case(
        "rmsnorm", "forward", "rmsnorm_forward", f"{bt} NH={NH} HS={HS} QK-norm",
        lambda rng: {"out": zeros(B, T, NH, HS), "rstd": zeros(B, T, NH), "inp": randn(rng, B, T, NH, HS)},
        ("out", "rstd", "inp"), ("out", "rstd"),
        lambda xp, a: {"out": a["inp"] * rms(xp, a["inp"])[..., None], "rstd": rms(xp, a["inp"])},
        "x / sqrt(mean(x^2) + eps) per head", bytes=lambda a: nb(a["out"], a["rstd"], a["inp"]), case="qk"))

    def rope_make(rng, out="out", inp="inp"):
        angle = np.outer(np.arange(T), ROPE_BASE ** (-np.arange(0, HS, 2) / HS))
        return {out: zeros(B, T, NH, HS), inp: randn(rng, B, T, NH, HS),
                "cos": np.cos(angle).astype(np.float32), "sin": np.sin(angle).astype(np.float32)}

    def rotate(x, cos, sin):
        c, s_, h = cos[:, None, :], sin[:, None, :], HS // 2
        x1, x2 = x[..., :h], x[..., h:]
        return x1 * c + x2 * s_, x2 * c - x1 * s_

    def rope_baseline(xp, a, sign=1.0, inp="inp", out="out"):
        y1, y2 = rotate(a[inp], a["cos"], sign * a["sin"])
        return {out: xp.concatenate((y1, y2), axis=-1)}
    for direction, fn, names, sign in (("forward", "rope_forward", ("out", "inp"), 1.0),
                                       ("backward", "rope_backward", ("dinp", "dout"), -1.0)):
        cases.append(Case(
            "rope", direction, fn, f"{bt} NH={NH} HS={HS}",
            lambda rng, names=names: rope_make(rng, *names), (*names, "cos", "sin"), names[:1],
            lambda xp, a, names=names, sign=sign: rope_baseline(xp, a, sign, names[1], names[0]),
            "cat(x1 cos + x2 sin, x2 cos - x1 sin)",
            bytes=lambda a, names=names: nb(a[names[0]], a[names[1]], a["cos"], a["sin"])))

    cases.append(Case(
        "relu2", "forward", "relu2_forward", f"{bt} 4C={4 * C}",
        lambda rng: {"out": zeros(B, T, 4 * C), "inp": randn(rng, B, T, 4 * C)},
        ("out", "inp"), ("out",), lambda xp, a: {"out": xp.maximum(a["inp"], 0) ** 2}, "max(x, 0)^2",
        bytes=lambda a: nb(a["out"], a["inp"])))
    cases.append(Case(
        "relu2", "backward", "relu2_backward", f"{bt} 4C={4 * C}",
        lambda rng: {"dinp": zeros(B, T, 4 * C), "inp": randn(rng, B, T, 4 * C), "dout": randn(rng, B, T, 4 * C)},
        ("dinp", "inp", "dout"), ("dinp",), lambda xp, a: {"dinp": 2 * xp.maximum(a["inp"], 0) * a["dout"]},
        "2 max(x, 0) dout", bytes=lambda a: nb(a["dinp"], a["inp"], a["dout"])))

    # ---- fused classifier with nanochat's logit softcap
    dloss = 1.0 / (B * T)

    def softcap_make(rng):
        logits = randn(rng, B, T, Vp, scale=10.0)
        logits[..., V:] = 0.0
        return {"logits": logits, "losses": zeros(B, T), "targets": rng.integers(0, V, (B, T), dtype=np.int32)}

    def softcap_baseline(xp, a):
        BT = B * T
        t = xp.tanh(a["logits"][..., :V].reshape(BT, V) / SOFTCAP)
        z, tgt, rows = SOFTCAP * t, a["targets"].reshape(BT), xp.arange(BT)
        mx = z.max(-1, keepdims=True)
        lse = xp.log(xp.exp(z - mx).sum(-1, keepdims=True)) + mx
        dz = xp.exp(z - lse) * dloss
        dz[rows, tgt] -= dloss
        full = xp.zeros((BT, Vp), dtype=dz.dtype)
        full[:, :V] = dz * (1 - t * t)
        return {"logits": full.reshape(B, T, Vp), "losses": (lse[:, 0] - z[rows, tgt]).reshape(B, T)}
    cases.append(Case(
        "classifier", "fused", "fused_classifier", f"{bt} V={V} Vp={Vp} softcap={SOFTCAP:g}", softcap_make,
        ("logits", "losses", "logits", "targets", dloss, V), ("logits", "losses"), softcap_baseline,
        "z = c tanh(x / c); log-softmax(z), dlogits through 1 - tanh^2",
        bytes=lambda a: 2 * nb(a["logits"]) + nb(a["targets"]) + 2 * nb(a["losses"]),
        kwargs={"softcap": SOFTCAP}, case="softcap"))

    # ---- Muon over the 12 layers' c_fc (4C, C): Newton-Schulz as batched GEMMs (tall: Gram C x C)
    L, rows, cols = (2, 192, 48) if quick else (12, 4 * C, C)
    k, lr, beta = min(rows, cols), 0.02, 0.95
    ns_flops = L * 5 * (4.0 * k * k * max(rows, cols) + 2.0 * k ** 3)

    def muon_make(rng):
        p = randn(rng, L, rows, cols, scale=0.02)
        return {"param": p, "momentum": randn(rng, L, rows, cols, scale=1e-3),
                "grad": randn(rng, L, rows, cols, scale=1e-3), "master": p.copy()}

    def muon_baseline(xp, a):
        buf = beta * a["momentum"] + (1 - beta) * a["grad"]
        u = (1 - beta) * a["grad"] + beta * buf
        p = a.get("master", a["param"]) - lr * max(1.0, rows / cols) ** 0.5 * newton_schulz(xp, u)
        return {"param": p, "master": p, "momentum": buf}
    cases.append(Case(
        "muon", "update", "muon_update", f"L={L} {rows}x{cols}", muon_make, ("param", "momentum", "grad"),
        ("param", "master", "momentum"), muon_baseline, "momentum + 5 Newton-Schulz steps (batched matmul)",
        flops=ns_flops, kwargs={"lr": lr, "beta": beta, "master": Ref("master")},
        baseline_f32=True))   # CuPy 14.2's batched bf16 matmul is broken (cupy-notes.md §2.1)
    return cases
