"""`llmpy sample` and llmpy.sample.sample_index: reproducible for a seed, top-k and temperature do what
they say. Reference: the softmax definition (sampling by inverse CDF, llmc-facts.md §7.11)."""
import numpy as np
import pytest

from llmpy.checkpoint import save_model
from llmpy.cli import main
from llmpy.model import GPTConfig, num_parameters
from llmpy.sample import sample_index


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A random GPT-2 with the real vocabulary (so prompts tokenize) and a tiny body."""
    cfg = GPTConfig(max_seq_len=64, vocab_size=50257, padded_vocab_size=50304, num_layers=2, num_heads=4,
                    channels=64)
    params = (np.random.default_rng(0).standard_normal(num_parameters(cfg)) * 0.5).astype(np.float32)
    path = str(tmp_path_factory.mktemp("sample") / "tiny.bin")
    save_model(path, cfg, params)
    return path


def _sample(capsys, model_path, *extra):
    assert main(["sample", "-e", model_path, "-n", "6", "--device", "cpu", *extra]) == 0
    return capsys.readouterr().out


def test_same_seed_same_text(capsys, model_path):
    a = _sample(capsys, model_path, "--prompt", "First Citizen:", "--seed", "7")
    b = _sample(capsys, model_path, "--prompt", "First Citizen:", "--seed", "7")
    c = _sample(capsys, model_path, "--prompt", "First Citizen:", "--seed", "8")
    assert a == b and a != c
    assert a.startswith("First Citizen:") and len(a) > len("First Citizen:\n")


def test_empty_prompt_starts_from_eot(capsys, model_path):
    import argparse

    from llmpy.commands import sample_command
    args = argparse.Namespace(model=model_path, prompt="", num_tokens=5, temperature=1.0, top_k=0, seed=1,
                              device="cpu")
    tokens = sample_command(args)
    assert tokens[0] == 50256 and len(tokens) == 6
    assert capsys.readouterr().out.strip() != ""


def test_bad_arguments_are_clear_errors(capsys, model_path, tmp_path):
    assert main(["sample", "-e", str(tmp_path / "missing.bin")]) == 1
    assert main(["sample", "-e", model_path, "--temperature", "0"]) == 1
    assert "temperature" in capsys.readouterr().err


def test_top_k_keeps_only_the_k_largest():
    logits = np.array([0.5, 3.0, -1.0, 2.0, 2.9, 0.0], dtype=np.float32)
    coins = np.linspace(0, 1, 200, endpoint=False)
    assert {sample_index(logits, c, top_k=1) for c in coins} == {1}
    assert {sample_index(logits, c, top_k=3) for c in coins} == {1, 3, 4}
    assert {sample_index(logits, c) for c in coins} == set(range(6))


def test_distribution_follows_softmax_with_temperature():
    logits = np.array([1.0, 0.0, -1.0, 2.0], dtype=np.float32)
    coins = (np.arange(20000) + 0.5) / 20000                      # an even grid: counts = p * N, +-1
    for temperature in (1.0, 0.5, 2.0):
        p = np.exp(logits / temperature)
        p /= p.sum()
        counts = np.bincount([sample_index(logits, c, temperature=temperature) for c in coins], minlength=4)
        np.testing.assert_allclose(counts / coins.size, p, atol=1e-4)
    # a very low temperature is argmax; a very high one is close to uniform
    assert {sample_index(logits, c, temperature=1e-4) for c in coins[::997]} == {3}
    hot = np.bincount([sample_index(logits, c, temperature=1e4) for c in coins], minlength=4) / coins.size
    np.testing.assert_allclose(hot, 0.25, atol=1e-3)
