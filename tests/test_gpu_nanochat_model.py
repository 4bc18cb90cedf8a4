"""nanochat's model (llmpy/nanochat.py) run on llmpy.gpu's ops, eager, matches the same model on
llmpy.cpu: loss, every parameter gradient, and an AdamW and a Muon step; in float32 closely, and with
bf16 storage (float32 master weights) within a bf16 budget.

Not the GPU engine (llmpy/gpu/engine.py: arena, bf16 with master weights, CUDA graphs), which drives
GPT-2 only: the model class takes the GPU backend as it is, with CuPy arrays, so this checks that every
op the model calls exists on the GPU with the CPU's contract and that the kernels compose. On the
emulator in CI (a few seconds at this size) and on a GPU (gpu marker).
"""
import numpy as np
import pytest

import llmpy.cpu
from llmpy.model import carve
from llmpy.nanochat import MATRICES, NanoChat, NanoChatConfig, init_params, param_shapes
from test_gpu_ops import BF16 as STORAGE_BF16

GQA = NanoChatConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, vocab_size=100, sequence_len=16)
MHA = NanoChatConfig(n_layer=2, n_head=4, n_kv_head=4, n_embd=64, vocab_size=100, sequence_len=16)


def start_params(cfg):
    """nanochat's init plus noise, so that the zero-initialised output projections pass gradients back;
    the padded vocabulary rows stay zero (the GPU classifier leaves padded logit columns alone, and the
    model relies on them being zero, as GPT-2's does)."""
    params = init_params(cfg)
    params += np.random.default_rng(0).standard_normal(params.size).astype(np.float32) * 0.02
    p = carve(params, param_shapes(cfg))
    p["wte"][cfg.vocab_size:] = p["lm_head"][cfg.vocab_size:] = 0.0
    return params


def _models(cfg, optimizer):
    import llmpy.gpu
    params = start_params(cfg)
    cpu = NanoChat(cfg, llmpy.cpu, params=params, optimizer=optimizer)
    gpu = NanoChat(cfg, llmpy.gpu, optimizer=optimizer)
    gpu.params.set(params)
    return cpu, gpu


def _batch(B=2, T=16):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, GQA.vocab_size, size=(B, T + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def _cosine_and_length(reference, other):
    """cos(angle) between two flat steps, and |other| / |reference|."""
    norm = np.linalg.norm(reference)
    return float(reference @ other / norm / np.linalg.norm(other)), float(np.linalg.norm(other) / norm)


@pytest.mark.parametrize("cfg,optimizer", [(GQA, "adamw"), (GQA, "muon"), (MHA, "adamw")],
                         ids=["gqa-adamw", "gqa-muon", "mha-adamw"])
def test_gpu_ops_train_the_nanochat_model_as_the_cpu_does(backend, cfg, optimizer):
    cpu, gpu = _models(cfg, optimizer)
    inp, targets = _batch()
    for m in (cpu, gpu):
        m.zero_grad()
        m.forward_backward(inp, targets, 1.0 / targets.size)
    assert abs(gpu.mean_loss(targets.size) - cpu.mean_loss(targets.size)) < 1e-5 * cpu.mean_loss(targets.size)
    g_gpu = carve(gpu.grads.get(), param_shapes(cfg))
    for name, g_cpu in cpu.g.items():
        scale = float(np.abs(g_cpu).max())
        assert scale > 0, name
        np.testing.assert_allclose(g_gpu[name], g_cpu, rtol=0, atol=1e-4 * scale, err_msg=name)
    # AdamW's first step is lr g / (|g| + eps): with eps far below the gradients (~1e-3) a gradient near 0
    # would turn its float32 noise into up to the whole step; eps = 1e-4 keeps the step a smooth function
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-4, weight_decay=0.1, t=1)
    start = carve(start_params(cfg), param_shapes(cfg))
    for m in (cpu, gpu):
        m.update(**kw)
    p_gpu = carve(gpu.params.get(), param_shapes(cfg))
    for name, p_cpu in cpu.p.items():
        step_cpu, step_gpu = (p_cpu - start[name]).ravel(), (p_gpu[name] - start[name]).ravel()
        if optimizer == "muon" and name not in ("wte", "lm_head"):
            # Newton-Schulz in bf16 on the GPU (llmpy/gpu/muon.py), float32 here: 5 quintic steps amplify the
            # rounding in a square matrix's small singular directions, so the step matches in direction and
            # length (measured: cosine 0.984-0.996, length within 1.5%), not element by element
            cosine, length = _cosine_and_length(step_cpu, step_gpu)
            assert cosine > 0.97 and abs(length - 1) < 0.03, (name, cosine, length)
        else:
            tol = 1e-3 * float(np.abs(step_cpu).max())
            np.testing.assert_allclose(step_gpu, step_cpu, rtol=0, atol=tol, err_msg=name)



# -------------------------------------------------------------------------------------------------
# bf16: the storage llm.c's GPU engine uses (bf16 parameters, gradients and activations; float32 master
# weights, optimizer moments, rstd and losses), on the same eager model. A stand-in for a nanochat GPU
# engine, which does not exist yet: it shows the bf16 kernels compose through the whole model.


class BF16NanoChat(NanoChat):
    def __init__(self, cfg, ops, params, optimizer):
        super().__init__(cfg, ops, optimizer=optimizer)
        self.dtype = np.dtype(STORAGE_BF16)
        self.params = self.xp.zeros(self.num_parameters, dtype=self.dtype)
        self.params.set(params.astype(self.dtype))
        self.p = carve(self.params, self.shapes)
        self.master = self.xp.zeros(self.num_parameters, dtype=np.float32)
        self.master.set(params)

    def _buffers(self, key, shapes: dict) -> dict:
        if key not in self._acts:
            self._acts[key] = {k: self.xp.zeros(s, dtype=np.float32 if k.endswith("rstd") or k == "losses"
                                                else self.dtype) for k, s in shapes.items()}
        return self._acts[key]

    def update(self, *, lr, beta1, beta2, eps, weight_decay, t, grad_scale=1.0, seeds=None):
        m, v = self._moments()
        master = carve(self.master, self.shapes)
        for name in self.shapes:
            if self.optimizer == "muon" and name in MATRICES:
                self.ops.muon_update(self.p[name], m[name], self.g[name], lr=self.muon_lr * lr / self.peak_lr,
                                     grad_scale=grad_scale, master=master[name], seed=t)
            else:
                self.ops.adamw_update(self.p[name], m[name], v[name], self.g[name], lr=lr, beta1=beta1, beta2=beta2,
                                      eps=eps, weight_decay=weight_decay, t=t, grad_scale=grad_scale,
                                      master=master[name], seed=t)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_bf16_gpu_ops_train_the_nanochat_model_within_a_bf16_budget(backend, optimizer):
    import llmpy.gpu
    cfg = GQA
    params = start_params(cfg)
    cpu = NanoChat(cfg, llmpy.cpu, params=params, optimizer=optimizer)
    gpu = BF16NanoChat(cfg, llmpy.gpu, params, optimizer)
    inp, targets = _batch()
    for m in (cpu, gpu):
        m.zero_grad()
        m.forward_backward(inp, targets, 1.0 / targets.size)
    # budgets against the float32 CPU model, in bf16 units (2^-8 relative): the loss within one (measured
    # 3e-6 relative: the mean over tokens averages the roundings out), each gradient tensor within 8 in
    # norm (measured 0.006-0.012, about 2-3: roundings compound through the layers)
    loss_cpu, loss_gpu = cpu.mean_loss(targets.size), gpu.mean_loss(targets.size)
    assert abs(loss_gpu - loss_cpu) < 2.0 ** -8 * loss_cpu
    g_gpu = carve(gpu.grads.get().astype(np.float32), param_shapes(cfg))
    for name, g_cpu in cpu.g.items():
        assert np.linalg.norm(g_gpu[name] - g_cpu) < 2.0 ** -5 * np.linalg.norm(g_cpu), name
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-4, weight_decay=0.1, t=1)
    for m in (cpu, gpu):
        m.update(**kw)
    # the step lands in the float32 master weights: its direction and length per tensor (measured: AdamW
    # cosine >= 0.9997, length within 0.02%; Muon, with bf16 Newton-Schulz as well, cosine >= 0.978,
    # length within 2%)
    start, master = carve(params, param_shapes(cfg)), carve(gpu.master.get(), param_shapes(cfg))
    for name, p_cpu in cpu.p.items():
        step_cpu, step_gpu = (p_cpu - start[name]).ravel(), (master[name] - start[name]).ravel()
        cosine, length = _cosine_and_length(step_cpu, step_gpu)
        muon = optimizer == "muon" and name in MATRICES
        assert cosine > (0.95 if muon else 0.999), (name, cosine)
        assert abs(length - 1) < (0.04 if muon else 0.005), (name, length)
    # and the bf16 parameters are the master weights rounded (stochastically: within one bf16 ulp)
    p16 = gpu.params.get().astype(np.float32)
    assert np.all(np.abs(p16 - gpu.master.get()) <= 2.0 ** -7 * np.abs(gpu.master.get()))
