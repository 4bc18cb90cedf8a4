"""nanochat's model (llmpy/nanochat.py) run on llmpy.gpu's ops, eager and in float32, matches the same
model on llmpy.cpu: loss, every parameter gradient, and an AdamW and a Muon step.

Not the GPU engine (llmpy/gpu/engine.py: arena, bf16 with master weights, CUDA graphs), which drives
GPT-2 only: the model class takes the GPU backend as it is, with CuPy arrays, so this checks that every
op the model calls exists on the GPU with the CPU's contract and that the kernels compose. On the
emulator in CI (a few seconds at this size) and on a GPU (gpu marker).
"""
import numpy as np
import pytest

import llmpy.cpu
from llmpy.model import carve
from llmpy.nanochat import NanoChat, NanoChatConfig, init_params, param_shapes

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
            cosine = step_cpu @ step_gpu / np.linalg.norm(step_cpu) / np.linalg.norm(step_gpu)
            assert cosine > 0.97, (name, cosine)
            assert abs(np.linalg.norm(step_gpu) / np.linalg.norm(step_cpu) - 1) < 0.03, name
        else:
            tol = 1e-3 * float(np.abs(step_cpu).max())
            np.testing.assert_allclose(step_gpu, step_cpu, rtol=0, atol=tol, err_msg=name)

