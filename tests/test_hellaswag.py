"""llmpy.hellaswag: llm.c's eval-file format (llmc-facts.md §3.4) and completion scoring (§3.5).
Reference for the scores: a straightforward transformers evaluation of the same random GPT-2 (mean
cross-entropy over each ending's tokens, argmin)."""
import numpy as np
import pytest

from llmpy.errors import LlmpyError
from llmpy.hellaswag import (EVAL_MAGIC, Example, completion_losses, evaluate_hellaswag, read_eval_file,
                             render_example, write_eval_file)

V, MAXT = 300, 64


def _examples(n=7, seed=0):
    """Hand-made token examples of varied lengths (some endings of one token)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ctx = rng.integers(0, V, size=rng.integers(1, 20))
        comps = [rng.integers(0, V, size=rng.integers(1, 9)) for _ in range(4)]
        out.append(Example.make(i, rng.integers(0, 4), ctx, comps))
    return out


# -------------------------------------------------------------------------------------------------
# file format


def test_file_layout_matches_llmc(tmp_path):
    ex = [Example.make(0, 2, [10, 11, 12], [[1], [2, 3], [4, 5, 6], [7]]),
          Example.make(1, 0, [5], [[1, 2], [3], [4], [6, 7, 8, 9]])]
    path = str(tmp_path / "hs.bin")
    size = write_eval_file(path, ex)
    raw = np.fromfile(path, dtype=np.uint8)
    header, body = raw[:1024].view(np.int32), raw[1024:].view(np.uint16)
    # example 0: 65535, bytes, index, label, 4, n_ctx, ctx..., then (len, tokens) x 4: 20 uint16 = 40 bytes
    assert body[:20].tolist() == [65535, 40, 0, 2, 4, 3, 10, 11, 12, 1, 1, 2, 2, 3, 3, 4, 5, 6, 1, 7]
    assert body[20:22].tolist() == [65535, 38]                         # example 1: 19 uint16
    assert header[:4].tolist() == [EVAL_MAGIC, 1, 2, 40]               # the longest example's bytes
    assert size == 1024 + 2 * 39 and body.size == 39
    assert read_eval_file(path) == ex


def test_round_trip(tmp_path):
    ex = _examples(12)
    write_eval_file(str(tmp_path / "hs.bin"), ex)
    assert read_eval_file(str(tmp_path / "hs.bin")) == ex


@pytest.mark.parametrize("corrupt, message", [
    (lambda b: b.__setitem__(slice(0, 4), np.int32(20240520).tobytes()), "token shard"),
    (lambda b: b.__setitem__(slice(0, 4), np.int32(7).tobytes()), "bad magic"),
    (lambda b: b.__setitem__(slice(4, 8), np.int32(2).tobytes()), "version"),
    (lambda b: b.__setitem__(slice(1024, 1026), np.uint16(7).tobytes()), "start marker"),
    (lambda b: b.__setitem__(slice(1028, 1030), np.uint16(5).tobytes()), "index"),
    (lambda b: b.__setitem__(slice(1030, 1032), np.uint16(4).tobytes()), "label"),
    (lambda b: b.__setitem__(slice(1032, 1034), np.uint16(3).tobytes()), "completions"),
    (lambda b: b.__setitem__(slice(8, 12), np.int32(3).tobytes()), "ends early"),
    (lambda b: b.__setitem__(slice(8, 12), np.int32(1).tobytes()), "unexpected bytes"),
])
def test_validation_errors(tmp_path, corrupt, message):
    path = tmp_path / "hs.bin"
    write_eval_file(str(path), _examples(2))
    b = bytearray(path.read_bytes())
    corrupt(b)
    path.write_bytes(bytes(b))
    with pytest.raises(LlmpyError, match=message):
        read_eval_file(str(path))


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(LlmpyError, match="prepare_hellaswag"):
        read_eval_file(str(tmp_path / "nope.bin"))
    path = tmp_path / "hs.bin"
    write_eval_file(str(path), _examples(2))
    path.write_bytes(path.read_bytes()[:-6])
    with pytest.raises(LlmpyError):
        read_eval_file(str(path))


def test_render_rows():
    ex = Example.make(0, 1, [7, 8, 9], [[1, 2], [3], [4, 5, 6], [2]])
    tokens, targets, mask, cut = render_example(ex, 8)
    assert not cut
    assert tokens[2].tolist() == [7, 8, 9, 4, 5, 6, 0, 0]
    assert mask[2].tolist() == [False, False, True, True, True, False, False, False]   # positions 2..4
    assert targets[2, mask[2]].tolist() == [4, 5, 6]
    # longer than T: the context loses tokens from the left, the completion is kept
    tokens, targets, mask, cut = render_example(ex, 4)
    assert cut and tokens[2].tolist() == [9, 4, 5, 6] and targets[2, mask[2]].tolist() == [4, 5, 6]


# -------------------------------------------------------------------------------------------------
# scoring against transformers


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers model, llmpy CPU GPT) with the same random weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import llmpy.cpu as ops
    from llmpy.checkpoint import load_model
    from llmpy.hf import import_hf
    from llmpy.model import GPT
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=MAXT, n_embd=64, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=V - 1, eos_token_id=V - 1)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():        # larger weights: the completions' losses differ clearly
            p.mul_(4.0)
    d = tmp_path_factory.mktemp("hs")
    hf.save_pretrained(d / "hf")
    import_hf(str(d / "hf"), str(d / "m.bin"), log=lambda *_: None)
    gcfg, params = load_model(str(d / "m.bin"))
    return hf, GPT(gcfg, ops, params=params), str(d / "m.bin")


def _reference_losses(hf, examples):
    """Mean CE over each completion's tokens given the context, one transformers forward per row."""
    import torch
    out = np.zeros((len(examples), 4))
    for i, ex in enumerate(examples):
        for c, comp in enumerate(ex.completions):
            seq = torch.tensor([list(ex.context) + list(comp)])
            with torch.no_grad():
                logp = torch.log_softmax(hf(seq).logits[0].double(), dim=-1)
            n = len(ex.context)
            out[i, c] = -np.mean([float(logp[n + j - 1, t]) for j, t in enumerate(comp)])
    return out


@pytest.mark.parametrize("B", [4, 6, 8])
def test_accuracy_and_predictions_match_transformers(models, tmp_path, B):
    hf, gpt, _ = models
    ex = _examples(7)
    path = str(tmp_path / "hs.bin")
    write_eval_file(path, ex)
    acc, preds, labels = evaluate_hellaswag(gpt, B, 32, path=path, log=lambda *_: None, return_predictions=True)
    ref = _reference_losses(hf, ex)
    ours, _ = completion_losses(gpt, ex, B, 32)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(preds, ref.argmin(axis=1))
    assert labels.tolist() == [e.label for e in ex]
    assert acc == np.mean(ref.argmin(axis=1) == labels)
    assert 0 < acc < 1                                     # the examples are not all right or all wrong


def test_max_examples_and_small_batch(models, tmp_path):
    _, gpt, _ = models
    path = str(tmp_path / "hs.bin")
    write_eval_file(path, _examples(7))
    lines = []
    evaluate_hellaswag(gpt, 4, 32, path=path, log=lines.append, max_examples=3)
    assert lines[0].startswith("HellaSwag: ") and "/3 = " in lines[0]
    with pytest.raises(LlmpyError, match="batch size"):
        evaluate_hellaswag(gpt, 2, 32, path=path)


def test_eval_hellaswag_command(models, tmp_path, capsys):
    from llmpy.cli import main
    _, gpt, model_path = models
    ex = _examples(5)
    path = str(tmp_path / "hs.bin")
    write_eval_file(path, ex)
    expected = evaluate_hellaswag(gpt, 4, 32, path=path, log=lambda *_: None)
    assert main(["eval-hellaswag", "-e", model_path, "--data", path, "-b", "8", "-t", "64",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"= {expected:.4f}" in out
    assert main(["eval-hellaswag", "-e", model_path, "--data", str(tmp_path / "x.bin")]) == 1
