"""The nanochat GPU engine (llmpy/gpu/nanochat_engine.py): its bf16 step against the float32 CPU model
within a bf16 budget, CUDA-graph replay equal to eager bit for bit, exact resume through the master
weights, and `llmpy train --device cuda` on a nanochat model. On the `backend` fixture: the CPU kernel
emulator in CI, a GPU with the gpu marker (as tests/test_gpu_engine.py)."""
import numpy as np
import pytest

import llmpy.cpu
from llmpy.model import carve
from llmpy.nanochat import MATRICES, NanoChat, NanoChatConfig, param_shapes
from llmpy.rng import XorShiftStar
from test_gpu_engine import make_batches as batches
from test_gpu_nanochat_model import _cosine_and_length, start_params

GQA = NanoChatConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, vocab_size=100, sequence_len=16)


def engine(cfg, B, T, params, **kw):
    import llmpy.gpu
    from llmpy.gpu.nanochat_engine import NanoChatGPU
    kw.setdefault("log", lambda msg: None)
    return NanoChatGPU(cfg, llmpy.gpu, params=params, batch_size=B, seq_len=T, **kw)


def host(x) -> np.ndarray:
    """A CuPy array (float32 or bf16) as host float32."""
    return x.reshape(-1).view(np.uint8).get().view(x.dtype).astype(np.float32)


def train(model, data, steps, rng, *, start=0, accum=1):
    """llmpy/train.py's step: zero_grad, accum micro-steps (a seed each), mean loss, norm, clipping at 1,
    the update with 16 seeds drawn right after saving rng_state_last_update; lr warms up over 3 steps."""
    losses, last = [], None
    for step in range(start, start + steps):
        model.zero_grad()
        for k in range(accum):
            inp, tgt = data[(step * accum + k) % len(data)]
            model.forward_backward(inp, tgt, 1.0 / (inp.size * accum), seed=rng.random_u32())
        losses.append(model.mean_loss(inp.size * accum))
        norm = model.grad_norm()
        last = rng.state
        seeds = [rng.random_u32() for _ in range(16)]
        model.update(lr=1e-3 * min(1.0, (step + 1) / 3), beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                     t=step + 1, grad_scale=1.0 / norm if norm > 1.0 else 1.0, seeds=seeds)
    return losses, last


def check_bf16_step(cfg, B, T, optimizer, *, grad_budget=2.0 ** -5):
    """One micro-step and one update of the engine (bf16, master weights) against the float32 CPU model:
    the loss within 2^-8 relative, each gradient tensor within grad_budget in norm, the step in the
    master weights in direction and length, and the bf16 params within one bf16 ulp of the master."""
    import ml_dtypes
    # both start from the bf16 values the engine holds (its master weights are them widened)
    params = start_params(cfg).astype(ml_dtypes.bfloat16).astype(np.float32)
    inp, tgt = batches(cfg, B, T)[0]
    cpu = NanoChat(cfg, llmpy.cpu, params=params, optimizer=optimizer)
    with engine(cfg, B, T, params, optimizer=optimizer, cuda_graph=False) as gpu:
        assert gpu.dtype != np.float32 and gpu.master is not None
        for m in (cpu, gpu):
            m.zero_grad()
            m.forward_backward(inp, tgt, 1.0 / tgt.size)
        loss_cpu, loss_gpu = cpu.mean_loss(tgt.size), gpu.mean_loss(tgt.size)
        assert abs(loss_gpu - loss_cpu) < 2.0 ** -8 * loss_cpu, (loss_gpu, loss_cpu)
        g_gpu = carve(host(gpu.grads), param_shapes(cfg))
        errors = {}
        for name, g_cpu in cpu.g.items():
            errors[name] = float(np.linalg.norm(g_gpu[name] - g_cpu) / np.linalg.norm(g_cpu))
        assert max(errors.values()) < grad_budget, errors
        kw = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-4, weight_decay=0.1, t=1)
        cpu.update(**kw)
        gpu.update(**kw, seeds=list(range(1, 17)))
        start, master = carve(params, param_shapes(cfg)), carve(host(gpu.master), param_shapes(cfg))
        steps = {}
        for name, p_cpu in cpu.p.items():
            steps[name] = _cosine_and_length((p_cpu - start[name]).ravel(), (master[name] - start[name]).ravel())
            muon = optimizer == "muon" and name in MATRICES
            assert steps[name][0] > (0.95 if muon else 0.999), (name, steps[name])
            assert abs(steps[name][1] - 1) < (0.04 if muon else 0.005), (name, steps[name])
        p16, m32 = host(gpu.params), host(gpu.master)
        assert np.all(np.abs(p16 - m32) <= 2.0 ** -7 * np.abs(m32))
    return loss_cpu, loss_gpu, errors, steps


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_bf16_engine_step_matches_the_cpu_model_within_a_bf16_budget(backend, optimizer):
    check_bf16_step(GQA, 2, 16, optimizer)


def test_fp32_engine_matches_the_cpu_model(backend):
    """--dtype fp32: no master weights; the loss, every gradient and an AdamW step as the CPU model's."""
    cfg, B, T = GQA, 2, 16
    params = start_params(cfg)
    inp, tgt = batches(cfg, B, T)[0]
    cpu = NanoChat(cfg, llmpy.cpu, params=params)
    with engine(cfg, B, T, params, dtype="fp32") as gpu:
        assert gpu.master is None and gpu.checkpoint_dtype == "fp32"
        for m in (cpu, gpu):
            m.zero_grad()
            m.forward_backward(inp, tgt, 1.0 / tgt.size)
        assert abs(gpu.mean_loss(tgt.size) - cpu.mean_loss(tgt.size)) < 1e-5 * cpu.mean_loss(tgt.size)
        g_gpu = carve(host(gpu.grads), param_shapes(cfg))
        for name, g_cpu in cpu.g.items():
            np.testing.assert_allclose(g_gpu[name], g_cpu, rtol=0, atol=1e-4 * np.abs(g_cpu).max(), err_msg=name)
        kw = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-4, weight_decay=0.1, t=1)
        cpu.update(**kw)
        gpu.update(**kw)
        p_gpu, start = carve(gpu.params_f32(), param_shapes(cfg)), carve(params, param_shapes(cfg))
        for name, p_cpu in cpu.p.items():
            step = p_cpu - start[name]
            np.testing.assert_allclose(p_gpu[name] - start[name], step, rtol=0, atol=1e-3 * np.abs(step).max(),
                                       err_msg=name)


@pytest.mark.slow
def test_bf16_engine_step_at_gpt2_124m_width(backend):
    """The 124M-size model's layers at full context: n_embd 768, 6 heads of 128 (nanochat's d12) with 2 kv
    heads, the GPT-2 vocabulary, T=1024; two layers and B=1 so that the emulator runs it in about a minute.
    Measured on the emulator: loss 10.97576 (CPU) vs 10.97572, gradient errors 0.7-1.1% in norm, Muon and
    AdamW steps with cosine >= 0.9993 and length within 0.03%."""
    cfg = NanoChatConfig(n_layer=2, n_head=6, n_kv_head=2, n_embd=768, vocab_size=50257, sequence_len=1024)
    loss_cpu, loss_gpu, errors, steps = check_bf16_step(cfg, 1, 1024, "muon")
    print(f"loss cpu {loss_cpu:.6f} gpu {loss_gpu:.6f}; grad errors {errors}; steps {steps}")


@pytest.mark.parametrize("optimizer,master_weights", [("adamw", True), ("muon", True), ("muon", False)],
                         ids=["adamw", "muon", "muon-w0"])
def test_graph_replay_equals_eager_bitwise(backend, optimizer, master_weights):
    """Graphs on and off give the same bits: losses, params, m, v, master. 2 micro-steps per step, then 1:
    dloss changes, so the micro-step graph is captured twice. -w 0: bf16 params updated in place."""
    cfg, B, T = GQA, 2, 16
    data = batches(cfg, B, T, n=3)
    results = {}
    for graph in (False, True):
        with engine(cfg, B, T, start_params(cfg), optimizer=optimizer, cuda_graph=graph,
                    master_weights=master_weights) as model:
            assert (model.master is not None) == master_weights
            rng = XorShiftStar(1337)
            losses, _ = train(model, data, 3, rng, accum=2)
            more, _ = train(model, data, 2, rng, start=3)
            state = model.optimizer_state()
            results[graph] = (losses + more, host(model.params), state)
            if graph:   # 6 + 2 micro-steps: 2 captures after 2 eager warm-ups; 5 updates: 1 warm-up
                assert model.graph.disabled is None and (model.graph.captures, model.graph.replays) == (2, 6)
                assert model.update_graph.disabled is None and model.update_graph.replays == 4
    (l0, p0, s0), (l1, p1, s1) = results[False], results[True]
    assert l1 == l0 and l0[-1] < l0[0]
    assert np.array_equal(p1, p0) and all(np.array_equal(s1[k], s0[k]) for k in ("m", "v"))
    assert (s1["master"] is None) == (s0["master"] is None) != master_weights
    assert not master_weights or np.array_equal(s1["master"], s0["master"])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_through_the_master_weights_is_bit_exact(backend, optimizer):
    """Train 3 steps, keep the params and state as a checkpoint would; a fresh engine started from other
    params, given that state, has exactly the checkpoint's params (init from master with the last
    update's seeds) and repeats the next 2 steps bit for bit."""
    cfg, B, T = GQA, 2, 16
    data = batches(cfg, B, T, n=4)
    rng = XorShiftStar(1337)
    with engine(cfg, B, T, start_params(cfg), optimizer=optimizer) as model:
        _, last = train(model, data, 3, rng)
        saved = dict(model.optimizer_state(), rng_state_last_update=last)
        saved_params, rng_state = model.params_f32(), rng.state
        rest, _ = train(model, data, 2, rng, start=3)
    with engine(cfg, B, T, start_params(cfg) * 0.5, optimizer=optimizer) as model:
        model.load_optimizer_state(saved)
        assert np.array_equal(model.params_f32(), saved_params)
        rng = XorShiftStar(0)
        rng.state = rng_state
        again, _ = train(model, data, 2, rng, start=3)
    assert again == rest


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_engine_samples_as_the_cpu_model_does_through_its_kv_cache(backend, dtype):
    """The engine has no KV cache: llmpy.sample.generate runs a forward per token over the sequence so
    far (padded to 64 positions: the pool's shapes, not the arena's). fp32 draws the CPU model's tokens
    (drawn through its NumPy KV cache); bf16 is compared by what sampling reads (review WRONG-2): the
    capped next-token logits along the CPU's sample, within a bf16 budget of them. fp32 also gives the CPU
    model's HellaSwag completion losses."""
    import ml_dtypes

    from llmpy.sample import generate
    cfg = NanoChatConfig(n_layer=2, n_head=4, n_kv_head=1, n_embd=64, vocab_size=100, sequence_len=96)
    params = start_params(cfg)
    ref = generate(NanoChat(cfg, llmpy.cpu, params=params), [cfg.vocab_size - 1], 24, XorShiftStar(42))
    assert len(ref) == 25 and len(set(ref)) > 5                # a real sample, not one repeated token
    seq = np.asarray([ref[:-1]], dtype=np.int32)               # what each sampling step read logits for
    with engine(cfg, 1, 96, params, dtype=dtype, master_weights=False, cuda_graph=False) as gpu:
        assert gpu.kv_cache is None
        tokens = generate(gpu, [cfg.vocab_size - 1], 24, XorShiftStar(42))
        logits = host(gpu.forward(seq)).reshape(1, len(ref) - 1, -1)[0, :, :cfg.vocab_size]
    exact = NanoChat(cfg, llmpy.cpu, params=params).forward(seq)[0, :, :cfg.vocab_size]
    if dtype == "fp32":
        assert tokens == ref
        np.testing.assert_allclose(logits, exact, rtol=0, atol=1e-4 * np.abs(exact).max())
        # HellaSwag's completion losses (the trainer's other inference path) at the training shape (4, 32)
        from llmpy.hellaswag import Example, completion_losses
        rng = np.random.default_rng(5)
        examples = [Example.make(i, i % 4, rng.integers(0, cfg.vocab_size, size=3 + 2 * i),
                                 [rng.integers(0, cfg.vocab_size, size=1 + (i + c) % 5) for c in range(4)])
                    for i in range(5)]
        want, _ = completion_losses(NanoChat(cfg, llmpy.cpu, params=params), examples, 4, 32)
        with engine(cfg, 4, 32, params, dtype=dtype, master_weights=False, cuda_graph=False) as gpu:
            got, _ = completion_losses(gpu, examples, 4, 32)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)
        return
    assert len(tokens) == len(ref) and all(0 <= t < cfg.vocab_size for t in tokens)
    rounded = params.astype(ml_dtypes.bfloat16).astype(np.float32)   # the engine's bf16 weights
    lowp = NanoChat(cfg, llmpy.cpu, params=rounded).forward(seq)[0, :, :cfg.vocab_size]
    err, weights_err = np.abs(logits - exact).max(), np.abs(lowp - exact).max()
    assert 0 < err <= 4 * weights_err + 2.0 ** -7 * np.abs(exact).max(), (err, weights_err)


def test_cli_trains_a_nanochat_model_on_the_gpu_engine_and_resumes_exactly(backend, tmp_path, monkeypatch, capsys):
    """`llmpy train --device cuda -e DIR --optimizer muon`: bf16 with CUDA graphs; steps 3..5 replayed
    after `-y 1` log the same losses and the final model file is byte-identical; the losses follow the
    float32 CPU trainer's within llm.c's bf16 tolerance; the run and `llmpy sample --device cuda` sample
    on the engine."""
    import test_train
    from llmpy import families
    from llmpy.cli import main
    from llmpy.nanochat import init_params
    if backend == "emulator":
        monkeypatch.setattr("llmpy.train.resolve_device", lambda requested: "cpu" if requested == "cpu" else "cuda")
    shards = test_train.shards.__wrapped__(tmp_path)
    cfg = NanoChatConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, vocab_size=2048, sequence_len=64)
    start = str(tmp_path / "start")
    families.save_model_dir(start, cfg, init_params(cfg))
    out = tmp_path / "run"
    args = test_train.train_args(start, shards, out, 6, "-n", "3", "--optimizer", "muon", "--muon-lr", "0.05",
                                 "-s", "6", "-g", "9")
    args[args.index("--device") + 1] = "cuda"
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "device: cuda" in printed and "precision: bf16" in printed and "optimizer muon" in printed
    assert printed.count("generating:\n---\n") == 1           # the last step's sample, from the engine
    first = test_train.logged(out, "train")
    assert [s for s, _ in first] == list(range(6)) and first[-1][1] < first[0][1]
    final = (out / "model_00000006" / "model.safetensors").read_bytes()
    (out / "DONE_00000006").unlink()
    assert main(args + ["-y", "1"]) == 0
    assert "model_00000003" in capsys.readouterr().out
    assert test_train.logged(out, "train")[6:] == first[3:]
    assert (out / "model_00000006" / "model.safetensors").read_bytes() == final
    cpu_args = test_train.train_args(start, shards, tmp_path / "cpu", 6, "--optimizer", "muon", "--muon-lr", "0.05")
    assert main(cpu_args) == 0
    cpu_losses = [loss for _, loss in test_train.logged(tmp_path / "cpu", "train")]
    np.testing.assert_allclose([loss for _, loss in first], cpu_losses, atol=0.05)

    # `llmpy sample --device cuda` on the directory the run wrote: the engine at B=1, 8 tokens after the prompt
    assert main(["sample", "-e", str(out / "model_00000006"), "--device", "cuda", "-n", "8"]) == 0
    text = capsys.readouterr()
    assert "device: cuda" in text.err and text.out.endswith("\n") and len(text.out.strip()) > 0


def test_bench_train_gpu_variants_run_the_nanochat_engine(backend, monkeypatch):
    """scripts/bench_train.py on the GPU with a nanochat model: its eager and graph variants build the
    nanochat engine with the asked optimizer, and their step losses follow the CPU model's (the
    GPU-busy probe, which needs real CUDA events, is stubbed)."""
    import argparse
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import bench_train
    cfg, B, T = GQA, 2, 16
    params, (inp, tgt) = start_params(cfg), batches(cfg, B, T)[0]
    monkeypatch.setattr(bench_train, "Blocker", lambda: None)
    monkeypatch.setattr(bench_train, "gpu_busy_step",
                        lambda *a: {"forward+backward": 1.0, "optimizer": 0.5, "busy": 1.5})
    args = argparse.Namespace(warmup=1, steps=2, optimizer="muon")
    fpt = bench_train.flops_per_token(cfg, T)
    cpu = bench_train.bench_llmpy_cpu(cfg, params, inp, tgt, args, fpt, None)
    for name in ("eager", "graph"):
        key, options = bench_train.GPU_VARIANTS[name]
        r = bench_train.bench_llmpy_gpu(cfg, params, inp, tgt, args, fpt, {}, options)
        assert r["impl"] == f"llmpy.gpu (bfloat16, {name}, muon)", r["impl"]
        assert len(r["losses"]) == 3 and r["arena_mb"] > 0 and r["gpu_busy_ms"] == 1.5
        np.testing.assert_allclose(r["losses"], cpu["losses"], rtol=2e-2)
