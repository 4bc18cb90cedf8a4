"""nanochat's GPT (llmpy/nanochat.py) against an independent PyTorch implementation of the spec, written
here from issue 17's text: logits, loss and every gradient; ten AdamW and ten Muon steps; a checkpoint
directory written by llmpy loaded into the PyTorch model; bad configs and checkpoints."""
import json
import math
import os

import numpy as np
import pytest

import llmpy.cpu as ops
from llmpy import families
from llmpy.errors import LlmpyError
from llmpy.model import carve
from llmpy.nanochat import NanoChat, NanoChatConfig, init_params, param_shapes
from test_train import logged, run_cli, shards, train_args  # noqa: F401  (shards: a fixture)

torch = pytest.importorskip("torch")
F = torch.nn.functional

B, T = 2, 8


# -------------------------------------------------------------------------------------------------
# The reference: nanochat's GPT from the spec, on nanochat's named tensors


def torch_logits(cfg, W, idx):
    """Softcapped logits (B, T, V) of the spec's model; W: nanochat name -> torch tensor."""
    C, NH, NKV = cfg.n_embd, cfg.n_head, cfg.n_kv_head
    D = C // NH
    Bn, Tn = idx.shape

    def norm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    inv_freq = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = torch.arange(Tn, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angle.cos().float()[:, None, :], angle.sin().float()[:, None, :]   # (T, 1, D/2)

    def rope(x):
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], -1)

    x = norm(W["transformer.wte.weight"][idx])
    for i in range(cfg.n_layer):
        w = lambda name: W[f"transformer.h.{i}.{name}.weight"]  # noqa: E731
        h = norm(x)
        q = norm(rope((h @ w("attn.c_q").T).view(Bn, Tn, NH, D)))
        k = norm(rope((h @ w("attn.c_k").T).view(Bn, Tn, NKV, D)))
        v = (h @ w("attn.c_v").T).view(Bn, Tn, NKV, D)
        k, v = (t.repeat_interleave(NH // NKV, dim=2) for t in (k, v))   # query head h reads kv head h // G
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
        s = s.masked_fill(torch.ones(Tn, Tn, dtype=torch.bool).triu(1), float("-inf"))
        y = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(Bn, Tn, C)
        x = x + y @ w("attn.c_proj").T
        x = x + F.relu(norm(x) @ w("mlp.c_fc").T).square() @ w("mlp.c_proj").T
    logits = norm(x) @ W["lm_head.weight"].T
    return 15 * torch.tanh(logits / 15)


def torch_loss(cfg, W, idx, tgt):
    logits = torch_logits(cfg, W, idx)
    return F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tgt.reshape(-1).long()), logits


def torch_newton_schulz(G):
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.mT if G.size(-2) > G.size(-1) else G
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(5):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if G.size(-2) > G.size(-1) else X


class TorchMuon:
    """The spec's Muon: momentum 0.95 with Nesterov, NewtonSchulz5, step scaled by max(1, rows/cols)^0.5."""

    def __init__(self, params, lr):
        self.params, self.lr = params, lr
        self.bufs = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self):
        for p, buf in zip(self.params, self.bufs):
            buf.lerp_(p.grad, 1 - 0.95)
            u = p.grad.lerp(buf, 0.95)
            p -= self.lr * max(1, p.size(-2) / p.size(-1)) ** 0.5 * torch_newton_schulz(u)


# -------------------------------------------------------------------------------------------------
# helpers


def small_config(n_kv_head):
    return NanoChatConfig(n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=32, vocab_size=61, sequence_len=16)


def random_params(cfg, rng):
    """Random weights everywhere (the real init zeroes the output projections, hiding their paths)."""
    flat = np.zeros(sum(math.prod(s) for s in param_shapes(cfg).values()), np.float32)
    p = carve(flat, param_shapes(cfg))
    for name, a in p.items():
        rows = cfg.vocab_size if name in ("wte", "lm_head") else a.shape[-2]
        fan_in = a.shape[-1]
        a[..., :rows, :] = rng.standard_normal(a[..., :rows, :].shape) * (1.0 if name == "wte" else 1.5 / fan_in ** 0.5)
    return flat


def batch(cfg, rng):
    idx = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    return idx, rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)


def torch_weights(cfg, flat):
    return {k: torch.tensor(v, requires_grad=True) for k, v in families.to_tensors(cfg, flat).items()}


def assert_rel(got, want, rel, name):
    """max |got - want| <= rel * max |want|: relative to the tensor's scale."""
    want = np.asarray(want)
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel} x {scale:.3g}"


# -------------------------------------------------------------------------------------------------
# forward and backward


@pytest.mark.parametrize("n_kv_head", [2, 4, 1])
def test_logits_loss_and_every_gradient_match_torch(rng, n_kv_head):
    cfg = small_config(n_kv_head)
    flat = random_params(cfg, rng)
    idx, tgt = batch(cfg, rng)
    model = NanoChat(cfg, ops, params=flat)
    logits = model.forward(idx)[..., :cfg.vocab_size].copy()
    val_loss = model.loss(tgt)
    model.zero_grad()
    model.forward_backward(idx, tgt, 1.0 / (B * T))

    W = torch_weights(cfg, flat)
    loss_t, logits_t = torch_loss(cfg, W, torch.from_numpy(idx), torch.from_numpy(tgt))
    loss_t.backward()
    assert_rel(logits, logits_t.detach().numpy(), 1e-5, "logits")
    assert abs(val_loss - loss_t.item()) <= 1e-5 * loss_t.item()
    assert abs(model.mean_loss(B * T) - loss_t.item()) <= 1e-5 * loss_t.item()
    grads = families.to_tensors(cfg, model.grads)
    assert len(grads) == 2 + 6 * cfg.n_layer
    for name, g in grads.items():
        assert_rel(g, W[name].grad.numpy(), 1e-5, "d " + name)
    pg = carve(model.grads, model.shapes)
    assert not pg["wte"][cfg.vocab_size:].any() and not pg["lm_head"][cfg.vocab_size:].any(), "padded rows"


def test_grad_accumulation_adds_micro_steps(rng):
    cfg = small_config(2)
    model = NanoChat(cfg, ops, params=random_params(cfg, rng))
    (i1, t1), (i2, t2) = batch(cfg, rng), batch(cfg, rng)
    model.zero_grad()
    model.forward_backward(i1, t1, 0.5 / (B * T))
    model.forward_backward(i2, t2, 0.5 / (B * T))
    both = model.grads.copy()
    single = np.zeros_like(both)
    for i, t in ((i1, t1), (i2, t2)):
        model.zero_grad()
        model.forward_backward(i, t, 0.5 / (B * T))
        single += model.grads
    assert_rel(both, single, 1e-6, "accumulated gradients")


# -------------------------------------------------------------------------------------------------
# optimizers: ten steps each, with clipping, against torch


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ten_steps_follow_torch(rng, optimizer):
    cfg = small_config(2)
    flat = random_params(cfg, rng)
    lr, muon_lr, wd = 1e-2, 0.03, 0.1
    model = NanoChat(cfg, ops, params=flat, optimizer=optimizer, muon_lr=muon_lr, peak_lr=lr)
    W = torch_weights(cfg, flat)
    matrices = [w for k, w in W.items() if k.startswith("transformer.h.")]
    others = [w for k, w in W.items() if not k.startswith("transformer.h.")]
    adam_params = others if optimizer == "muon" else list(W.values())
    adam = torch.optim.AdamW(adam_params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    muon = TorchMuon(matrices, muon_lr) if optimizer == "muon" else None
    for step in range(10):
        idx, tgt = batch(cfg, rng)
        model.zero_grad()
        model.forward_backward(idx, tgt, 1.0 / (B * T))
        norm = model.grad_norm()
        model.update(lr=lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=wd, t=step + 1,
                     grad_scale=1.0 / norm if norm > 1.0 else 1.0)

        for w in W.values():
            w.grad = None
        loss_t, _ = torch_loss(cfg, W, torch.from_numpy(idx), torch.from_numpy(tgt))
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(list(W.values()), 1.0)
        assert abs(model.mean_loss(B * T) - loss_t.item()) <= 1e-4 * loss_t.item(), f"loss at step {step}"
        adam.step()
        if muon is not None:
            muon.step()
    for name, p in families.to_tensors(cfg, model.params).items():
        assert_rel(p, W[name].detach().numpy(), 1e-4, name)


# -------------------------------------------------------------------------------------------------
# checkpoints, descriptors, init, bad configs


def test_checkpoint_directory_loads_into_torch(rng, tmp_path):
    from safetensors.torch import load_file
    cfg = small_config(1)
    flat = random_params(cfg, rng)
    path = str(tmp_path / "model_00000005")
    families.save_model_dir(path, cfg, flat)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    with open(os.path.join(path, "config.json")) as f:
        conf = json.load(f)
    assert conf == dict(n_layer=2, n_head=4, n_kv_head=1, n_embd=32, vocab_size=61, sequence_len=16)
    W = load_file(os.path.join(path, "model.safetensors"))
    assert W["transformer.h.1.attn.c_k.weight"].shape == (8, 32) and W["lm_head.weight"].shape == (61, 32)
    idx, _ = batch(cfg, rng)
    model = NanoChat(cfg, ops, params=flat)
    logits = model.forward(idx)[..., :cfg.vocab_size]
    want = torch_logits(NanoChatConfig(**conf), W, torch.from_numpy(idx)).numpy()
    assert_rel(logits, want, 1e-5, "logits of the loaded checkpoint")
    cfg2, flat2 = families.load_model_dir(path)
    assert cfg2 == cfg and np.array_equal(flat2, flat)                   # exact round trip


def test_descriptor_and_init():
    cfg = families.config_from_descriptor("nanochat:d4:kv1")
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (4, 256, 2, 1, 128)
    assert families.config_from_descriptor("nanochat:d3").n_head == 2                      # 192 = 2 x 96
    p = carve(init_params(cfg), param_shapes(cfg))
    assert not p["attn_proj"].any() and not p["mlp_proj"].any(), "output projections start at zero"
    assert abs(p["lm_head"][:cfg.vocab_size].std() - 0.001) < 1e-4
    assert abs(p["wte"][:cfg.vocab_size].std() - 1.0) < 1e-2
    assert abs(p["c_q"].std() - 1 / 256 ** 0.5) < 1e-3
    assert abs(p["c_k"].std() - (128 / 256) ** 0.5 / 256 ** 0.5) < 1e-3                    # narrow output
    assert not p["wte"][cfg.vocab_size:].any()
    for bad in ("nanochat:4", "nanochat:d4:q2", "nanochat:d4:kv1:x"):
        with pytest.raises(ValueError, match="nanochat:dN"):
            families.config_from_descriptor(bad)


@pytest.mark.parametrize("fields,message", [
    (dict(n_head=4, n_kv_head=3), "n_head 4 is not divisible by n_kv_head 3"),
    (dict(n_head=4, n_embd=12), "head dim n_embd / n_head = 3 is odd"),
    (dict(n_head=5), "n_embd 32 is not divisible by n_head 5"),
    (dict(n_layer=0), "n_layer must be positive"),
    (dict(n_kv_head=None), "missing or non-integer n_kv_head"),
])
def test_bad_configs_name_the_file(tmp_path, fields, message):
    conf = dict(n_layer=1, n_head=4, n_kv_head=4, n_embd=32, vocab_size=61, sequence_len=16) | fields
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(LlmpyError, match=message) as e:
        families.load_model_dir(str(tmp_path))
    assert str(e.value).startswith(str(tmp_path / "config.json")) and "\n" not in str(e.value)


def test_missing_or_misshaped_tensors_name_the_file_and_tensor(rng, tmp_path):
    from llmpy.hf import write_safetensors
    cfg = small_config(2)
    path = str(tmp_path / "ck")
    families.save_model_dir(path, cfg, random_params(cfg, rng))
    weights = os.path.join(path, "model.safetensors")
    tensors = families.to_tensors(cfg, random_params(cfg, rng))
    write_safetensors(weights, {k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.weight"})
    with pytest.raises(LlmpyError, match=f"{weights}: tensor transformer.h.1.mlp.c_fc.weight is missing"):
        families.load_model_dir(path)
    tensors["transformer.h.0.attn.c_v.weight"] = np.zeros((8, 32), np.float32)
    write_safetensors(weights, tensors)
    with pytest.raises(LlmpyError, match=r"transformer.h.0.attn.c_v.weight has shape \(8, 32\), config.json "
                                         r"needs \(16, 32\)"):
        families.load_model_dir(path)
    os.remove(weights)
    with pytest.raises(LlmpyError, match="model.safetensors: no such file"):
        families.load_model_dir(path)


# -------------------------------------------------------------------------------------------------
# sampling: the KV cache gives the full forward's logits, and generate() the same tokens


def test_kv_cache_matches_the_full_forward(rng):
    from llmpy.rng import XorShiftStar
    from llmpy.sample import generate
    cfg = small_config(2)
    model = NanoChat(cfg, ops, params=random_params(cfg, rng))
    toks = rng.integers(0, cfg.vocab_size, 12).astype(np.int32)
    full = model.forward(toks[None])[0, :, :cfg.vocab_size].copy()
    cache = model.kv_cache(16)
    rows = [cache.feed(toks[:5])] + [cache.feed([t]) for t in toks[5:]]
    assert_rel(np.stack(rows), full[4:], 1e-5, "cached logits")
    with pytest.raises(ValueError, match="holds 16 positions"):
        cache.feed(toks[:5])

    class NoCache:                                # the same model through generate()'s full-forward path
        config, xp, forward = model.config, np, model.forward

    with_cache = generate(model, [3, 7], 10, XorShiftStar(5))
    assert with_cache == generate(NoCache(), [3, 7], 10, XorShiftStar(5))
    assert len(with_cache) == 12


# -------------------------------------------------------------------------------------------------
# the trainer: -e a nanochat directory, --optimizer muon, grad accumulation, checkpoints, exact resume


def test_train_resumes_exactly_and_samples(tmp_path, shards):
    cfg = NanoChatConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, vocab_size=2048, sequence_len=64)
    start = str(tmp_path / "start")
    families.save_model_dir(start, cfg, init_params(cfg))
    out = tmp_path / "run"
    args = train_args(start, shards, out, 6, "-n", "3", "-d", "128", "--optimizer", "muon", "--muon-lr", "0.05")
    r = run_cli(args, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "optimizer muon" in r.stdout and "accum=2" in r.stdout
    first = logged(out, "train")
    assert first[-1][1] < first[0][1] - 0.3, first                  # it learns the repeating pattern
    assert sorted(os.listdir(out / "model_00000006")) == ["config.json", "model.safetensors"]
    final = (out / "model_00000006" / "model.safetensors").read_bytes()
    (out / "DONE_00000006").unlink()
    r = run_cli(args + ["-y", "1"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout and "model_00000003" in r.stdout
    assert logged(out, "train")[6:] == first[3:], "resumed losses must equal the uninterrupted run's exactly"
    assert (out / "model_00000006" / "model.safetensors").read_bytes() == final

    r = run_cli(args[:-4] + ["--optimizer", "adamw", "-y", "1", "-x", "9"], tmp_path)   # the other optimizer
    assert r.returncode == 1 and "--optimizer adamw: the checkpoint's optimizer state was written by muon" \
        in r.stderr, r.stderr

    import argparse
    from llmpy.commands import sample_command
    sample = argparse.Namespace(model=str(out / "model_00000006"), prompt="", num_tokens=5, temperature=1.0,
                                top_k=0, seed=1, device="cpu")
    tokens = sample_command(sample, out=open(os.devnull, "w"))
    assert len(tokens) == 6 and tokens[0] == 2047 and max(tokens) < 2048       # from EOT clipped to V - 1
    assert sample_command(sample, out=open(os.devnull, "w")) == tokens         # same seed, same tokens


@pytest.mark.parametrize("args,needle", [
    (["-e", "nanochat:d2", "--optimizer", "sgd"], "invalid choice: 'sgd'"),
    (["-e", "d6", "--optimizer", "muon"], "--optimizer muon trains nanochat models"),
    (["-e", "nanochat:x2"], "-e nanochat:x2: expected nanochat:dN"),
    (["-e", "nanochat:d4:kv3"], "-e nanochat:d4:kv3: n_head 2 is not divisible by n_kv_head 3"),
    (["-e", "nanochat:d2", "-t", "2048"], "-t/--seq-len 2048 exceeds the model's sequence_len 1024"),
])
def test_bad_flags_are_one_line(tmp_path, shards, args, needle):
    r = run_cli(["train", "--device", "cpu", "-x", "1", "-i", shards[0], "-j", shards[1], *args], tmp_path)
    assert r.returncode != 0 and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_state_of_the_other_optimizer_is_refused(rng):
    cfg = small_config(2)
    flat = random_params(cfg, rng)
    states = {}
    for optimizer in ("adamw", "muon"):
        model = NanoChat(cfg, ops, params=flat, optimizer=optimizer)
        model.load_optimizer_state(model.optimizer_state())            # before any step: either is fine
        model.zero_grad()
        model.forward_backward(*batch(cfg, rng), 1.0 / (B * T))
        model.update(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, t=1)
        states[optimizer] = model.optimizer_state()
        model.load_optimizer_state(states[optimizer])                   # its own: fine
    with pytest.raises(LlmpyError, match="--optimizer muon: .* written by adamw; resume with --optimizer adamw"):
        NanoChat(cfg, ops, optimizer="muon").load_optimizer_state(states["adamw"])
    with pytest.raises(LlmpyError, match="--optimizer adamw: .* written by muon"):
        NanoChat(cfg, ops, optimizer="adamw").load_optimizer_state(states["muon"])
