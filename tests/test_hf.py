"""llmpy.hf: Hugging Face GPT-2 <-> llm.c model files. Reference: transformers.GPT2LMHeadModel (a small
random one, saved with save_pretrained), the layout in ecosystem-facts.md §3."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from llmpy.checkpoint import bf16_bits_to_f32, f32_to_bf16_bits, load_model
from llmpy.errors import LlmpyError
from llmpy.hf import (_read_safetensors_numpy, export_hf, flat_to_hf, hf_config, import_hf, read_safetensors,
                      write_safetensors)
from llmpy.model import GPTConfig, num_parameters

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V, MAXT, C, L, NH = 300, 64, 64, 2, 4


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(model, directory): a random GPT2LMHeadModel without dropout, saved with save_pretrained."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=MAXT, n_embd=C, n_layer=L, n_head=NH,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=V - 1, eos_token_id=V - 1)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():                       # non-trivial LayerNorm and bias values too
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    model.save_pretrained(d)
    return model, str(d)


def _tokens(B=2, T=24, seed=1):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, V, size=(B, T)))


def test_round_trip_gives_identical_logits(hf_model, tmp_path):
    model, d = hf_model
    import_hf(d, str(tmp_path / "m.bin"), log=lambda *_: None)
    export_hf(str(tmp_path / "m.bin"), str(tmp_path / "out"), log=lambda *_: None)
    back = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "out")).eval()
    x = _tokens()
    with torch.no_grad():
        np.testing.assert_allclose(back(x).logits.numpy(), model(x).logits.numpy(), atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["activation_function"] == "gelu_new"


def test_imported_model_loss_matches_transformers(hf_model, tmp_path):
    import llmpy.cpu as ops
    from llmpy.model import GPT
    model, d = hf_model
    cfg = import_hf(d, str(tmp_path / "m.bin"), log=lambda *_: None)
    assert cfg == GPTConfig(MAXT, V, 384, L, NH, C)           # Vp: V rounded up to a multiple of 128
    cfg, params = load_model(str(tmp_path / "m.bin"))
    x = _tokens(B=3, T=33)
    with torch.no_grad():
        ref = float(model(x, labels=x).loss)                  # HF shifts the labels by one
    gpt = GPT(cfg, ops, params=params)
    xn = x.numpy().astype(np.int32)
    gpt.forward(np.ascontiguousarray(xn[:, :-1]))
    assert abs(gpt.loss(np.ascontiguousarray(xn[:, 1:])) - ref) < 1e-4


def test_bf16_import_round_trip(hf_model, tmp_path):
    model, d = hf_model
    import_hf(d, str(tmp_path / "f32.bin"), log=lambda *_: None)
    import_hf(d, str(tmp_path / "bf16.bin"), dtype="bf16", log=lambda *_: None)
    assert os.path.getsize(tmp_path / "bf16.bin") == 1024 + 2 * num_parameters(GPTConfig(MAXT, V, 384, L, NH, C))
    _, p32 = load_model(str(tmp_path / "f32.bin"))
    _, p16 = load_model(str(tmp_path / "bf16.bin"))
    np.testing.assert_array_equal(p16, bf16_bits_to_f32(f32_to_bf16_bits(p32)))
    # the bf16 file exported back equals the original model with its weights rounded to bf16
    export_hf(str(tmp_path / "bf16.bin"), str(tmp_path / "out"), log=lambda *_: None)
    back = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "out")).eval()
    rounded = transformers.GPT2LMHeadModel(model.config).eval()
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    x = _tokens()
    with torch.no_grad():
        np.testing.assert_allclose(back(x).logits.numpy(), rounded(x).logits.numpy(), atol=1e-5, rtol=0)


def test_hub_layout_without_prefix_and_with_mask_buffers(hf_model, tmp_path):
    """openai-community/gpt2 stores h.0.* without 'transformer.' and (old files) attn.bias buffers."""
    _, d = hf_model
    tensors = {k.removeprefix("transformer."): v for k, v in read_safetensors(os.path.join(d, "model.safetensors")).items()}
    for i in range(L):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, MAXT, MAXT), np.float32))
    hub = tmp_path / "hub"
    hub.mkdir()
    write_safetensors(str(hub / "model.safetensors"), tensors)
    (hub / "config.json").write_text((Path(d) / "config.json").read_text())
    import_hf(d, str(tmp_path / "a.bin"), log=lambda *_: None)
    import_hf(str(hub), str(tmp_path / "b.bin"), log=lambda *_: None)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


def test_numpy_safetensors_reader_matches_the_package(hf_model, tmp_path):
    _, d = hf_model
    path = os.path.join(d, "model.safetensors")
    ours, theirs = _read_safetensors_numpy(path), read_safetensors(path)
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k])
    # bf16 tensors are widened to float32
    from safetensors.torch import save_file
    t = torch.randn(5, 3).to(torch.bfloat16)
    save_file({"x": t}, str(tmp_path / "bf16.safetensors"))
    np.testing.assert_array_equal(_read_safetensors_numpy(str(tmp_path / "bf16.safetensors"))["x"], t.float().numpy())


def test_padded_rows_and_export_layout():
    cfg = GPTConfig(MAXT, V, 384, L, NH, C)
    flat = np.random.default_rng(0).standard_normal(num_parameters(cfg)).astype(np.float32)
    t = flat_to_hf(cfg, flat)
    assert t["transformer.wte.weight"].shape == (V, C)
    assert t["transformer.h.1.attn.c_attn.weight"].shape == (C, 3 * C)     # Conv1D (in, out)
    assert t["transformer.h.0.mlp.c_proj.weight"].shape == (4 * C, C)
    assert hf_config(cfg)["n_inner"] is None and hf_config(cfg)["tie_word_embeddings"] is True


def test_clear_errors(hf_model, tmp_path):
    _, d = hf_model
    with pytest.raises(LlmpyError, match="not a directory"):
        import_hf(str(tmp_path / "missing"), str(tmp_path / "m.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlmpyError, match="config.json"):
        import_hf(str(tmp_path / "empty"), str(tmp_path / "m.bin"))
    (tmp_path / "empty" / "config.json").write_text((Path(d) / "config.json").read_text())
    with pytest.raises(LlmpyError, match="model.safetensors"):
        import_hf(str(tmp_path / "empty"), str(tmp_path / "m.bin"))
    cfg = json.loads((Path(d) / "config.json").read_text())
    cfg["n_inner"] = 100
    (tmp_path / "empty" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlmpyError, match="n_inner"):
        import_hf(str(tmp_path / "empty"), str(tmp_path / "m.bin"))
    with pytest.raises(LlmpyError, match="not found"):
        export_hf(str(tmp_path / "nope.bin"), str(tmp_path / "out"))
