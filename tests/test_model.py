"""The whole CPU model against an independent reference: Hugging Face transformers' GPT2LMHeadModel.

Logits, loss and every parameter gradient on a small config and at the GPT-2 124M shape, then ten AdamW
steps on a fixed batch following torch.optim.AdamW's losses. The weight mapping below is written here
(not imported from llmpy.hf) so the oracle stays independent of the code under test.
"""
import numpy as np
import pytest

import llmpy.cpu as cpu
from llmpy.model import GPT, GPTConfig, carve, num_parameters, param_shapes
from llmpy.rng import init_params
from llmpy.testing import assert_close

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = GPTConfig(max_seq_len=32, vocab_size=100, padded_vocab_size=128, num_layers=2, num_heads=4, channels=64)
CONV1D = {"qkvw": "attn.c_attn.weight", "attprojw": "attn.c_proj.weight", "fcw": "mlp.c_fc.weight",
          "fcprojw": "mlp.c_proj.weight"}           # HF stores these (in, out): transposed vs llm.c
PER_LAYER = {"ln1w": "ln_1.weight", "ln1b": "ln_1.bias", "qkvb": "attn.c_attn.bias",
             "attprojb": "attn.c_proj.bias", "ln2w": "ln_2.weight", "ln2b": "ln_2.bias",
             "fcb": "mlp.c_fc.bias", "fcprojb": "mlp.c_proj.bias", **CONV1D}


def hf_model(cfg: GPTConfig, flat: np.ndarray):
    """A float32 GPT2LMHeadModel holding the same weights as llmpy's flat parameter buffer."""
    hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len,
                                     n_embd=cfg.channels, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     activation_function="gelu_new", layer_norm_epsilon=1e-5)
    model = transformers.GPT2LMHeadModel(hf_cfg).float().eval()
    p = carve(flat, param_shapes(cfg))
    sd = {"transformer.wte.weight": p["wte"][:cfg.vocab_size], "transformer.wpe.weight": p["wpe"],
          "transformer.ln_f.weight": p["lnfw"], "transformer.ln_f.bias": p["lnfb"]}
    for name, key in PER_LAYER.items():
        for layer in range(cfg.num_layers):
            w = p[name][layer]
            sd[f"transformer.h.{layer}.{key}"] = w.T if name in CONV1D else w
    with torch.no_grad():
        for key, value in sd.items():
            model.get_parameter(key).copy_(torch.from_numpy(np.ascontiguousarray(value)))
    return model


def hf_grads(cfg: GPTConfig, model) -> np.ndarray:
    """The HF model's parameter gradients laid out as llmpy's flat gradient buffer (padded rows 0)."""
    flat = np.zeros(num_parameters(cfg), dtype=np.float32)
    g = carve(flat, param_shapes(cfg))
    grad = lambda key: model.get_parameter(key).grad.numpy()  # noqa: E731
    g["wte"][:cfg.vocab_size] = grad("transformer.wte.weight")
    g["wpe"][...] = grad("transformer.wpe.weight")
    g["lnfw"][...], g["lnfb"][...] = grad("transformer.ln_f.weight"), grad("transformer.ln_f.bias")
    for name, key in PER_LAYER.items():
        for layer in range(cfg.num_layers):
            w = grad(f"transformer.h.{layer}.{key}")
            g[name][layer] = w.T if name in CONV1D else w
    return flat


def setup(cfg: GPTConfig, B: int, T: int, seed: int = 0):
    flat = np.empty(num_parameters(cfg), dtype=np.float32)
    init_params(cfg, flat)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, size=(B, T + 1)).astype(np.int32)
    return flat, np.ascontiguousarray(tokens[:, :-1]), np.ascontiguousarray(tokens[:, 1:])


def torch_loss(model, inp, tgt):
    logits = model(torch.from_numpy(inp).long()).logits
    return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(tgt).long().flatten())


@pytest.mark.parametrize("cfg,B,T,tol,flash", [(TINY, 3, 17, 2e-5, False),
                                               (TINY, 3, 17, 2e-5, True),    # the fused attention's ops
                                               pytest.param(GPTConfig.from_descriptor("d12"), 4, 64, 2e-4, False,
                                                            marks=pytest.mark.slow)],
                         ids=["tiny", "tiny-flash", "gpt2-124M"])
def test_forward_backward_match_transformers(cfg, B, T, tol, flash):
    flat, inp, tgt = setup(cfg, B, T)
    model = GPT(cfg, cpu, params=flat)
    model.flash_attention = flash
    logits = model.forward(inp)[..., :cfg.vocab_size].copy()
    loss = model.loss(tgt)
    model.forward(inp)
    model.zero_grad()
    model.backward(inp, tgt, 1.0 / tgt.size)

    ref = hf_model(cfg, flat)
    ref_logits, ref_loss = torch_loss(ref, inp, tgt)
    ref_loss.backward()
    assert_close(logits, ref_logits.detach().numpy(), atol=tol, rtol=tol, name="logits")
    assert abs(loss - ref_loss.item()) < tol
    assert abs(model.mean_loss(tgt.size) - ref_loss.item()) < tol
    ref_g = carve(hf_grads(cfg, ref), param_shapes(cfg))
    for name, grad in model.g.items():
        scale = max(float(np.abs(ref_g[name]).max()), 1e-6)   # tolerance relative to the tensor's scale
        assert_close(grad, ref_g[name], atol=tol * scale, rtol=tol, name=f"d{name}")
    assert not model.g["wte"][cfg.vocab_size:].any(), "padded vocab rows must get no gradient"
    assert ("att" in model.acts(B, T)) != flash and ("att_lse" in model.acts(B, T)) == flash


def test_ten_adamw_steps_follow_torch():
    """llm.c's overfit check (test_gpt2cu): lr 1e-4, betas (0.9, 0.95), eps 1e-8, clip at 1.0, wd on 2-D only."""
    cfg, B, T = TINY, 4, 32
    flat, inp, tgt = setup(cfg, B, T, seed=1)
    model = GPT(cfg, cpu, params=flat)
    ref = hf_model(cfg, flat)
    decay = [p for n, p in ref.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in ref.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    ours, theirs = [], []
    for step in range(10):
        model.forward(inp)
        model.zero_grad()
        model.backward(inp, tgt, 1.0 / tgt.size)
        ours.append(model.mean_loss(tgt.size))
        norm = model.grad_norm()
        model.update(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, t=step + 1,
                     grad_scale=1.0 / norm if norm > 1.0 else 1.0)

        opt.zero_grad()
        _, loss = torch_loss(ref, inp, tgt)
        loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        theirs.append(loss.item())
        assert abs(norm - ref_norm.item()) < 1e-4 * max(1.0, norm)
    assert ours[-1] < ours[0] - 0.5, f"loss did not fall: {ours}"
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_descriptors_and_parameter_counts():
    counts = {"d6": 30_357_504, "d12": 124_475_904, "d24": 354_871_296, "d36": 774_090_240,
              "d48": 1_557_686_400, "gpt3:c768": 125_262_336}
    for desc, n in counts.items():
        assert num_parameters(GPTConfig.from_descriptor(desc)) == n, desc
    with pytest.raises(ValueError, match="unknown model descriptor"):
        GPTConfig.from_descriptor("d13")


def test_padded_rows_stay_zero_and_inference_needs_no_grads():
    flat, inp, tgt = setup(TINY, 2, 8)
    model = GPT(TINY, cpu, params=flat)
    assert not model.p["wte"][TINY.vocab_size:].any()
    logits = model.forward(inp)
    assert model.grads is None
    assert not logits[..., TINY.vocab_size:].any(), "padded logits come from zero rows"
