"""llmpy.rng against its references: llm.c's documented MT19937 outputs (llmc/rand.h), PyTorch's CPU
generator and normal_ (torch is a test oracle only), and plain re-implementations of xorshift* and
Fisher-Yates."""
import math
import platform
import struct

import numpy as np
import pytest

from llmpy.model import GPTConfig, carve, num_parameters, param_shapes
from llmpy.rng import MT_STATE_BYTES, MT19937, XorShiftStar, init_params, normal_, shuffle_

SMALL = GPTConfig(max_seq_len=32, vocab_size=300, padded_vocab_size=384, num_layers=2, num_heads=4, channels=64)
X86 = platform.machine().lower() in ("x86_64", "amd64")   # torch's AVX2 Box-Muller: we match it bit for bit


def ulps(a, b):
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def test_mt19937_matches_llmc_reference_values():
    gen = MT19937(137)   # the example in llm.c's llmc/rand.h
    assert [gen.randint32() for _ in range(5)] == [4053805790, 2173880614, 380293709, 1237255315, 2986595568]


def test_random_u32_continues_randint32_stream():
    a, b = MT19937(7), MT19937(7)
    seq = [a.randint32() for _ in range(1300)]
    assert b.random_u32(1300).tolist() == seq
    assert b.random_u32(0).size == 0


def test_uniform_is_low_24_bits():
    a, b = MT19937(3), MT19937(3)
    u = a.uniform_f32(1000)
    assert u.dtype == np.float32
    np.testing.assert_array_equal(u, (b.random_u32(1000) & 0xFFFFFF).astype(np.float64) / 2 ** 24)


def llmc_left_next(gen):
    seed, left, nxt = struct.unpack_from("<QiI", gen.to_bytes())
    return seed, left, nxt


def test_state_bytes_layout_follows_llmc():
    gen = MT19937(42)
    b = gen.to_bytes()
    assert len(b) == MT_STATE_BYTES == 2520
    assert llmc_left_next(gen) == (42, 1, 0)                       # manual_seed: left=1, next=0
    assert struct.unpack_from("<2I", b, 2512) == (0, 0x9908B0DF)   # matrix constants last
    assert struct.unpack_from("<I", b, 16)[0] == 42                # state[0] = seed
    gen.randint32()
    assert llmc_left_next(gen)[1:] == (624, 1)                     # twisted, then one word used
    gen.random_u32(623)
    assert llmc_left_next(gen)[1:] == (1, 624)
    gen.randint32()
    assert llmc_left_next(gen)[1:] == (624, 1)


@pytest.mark.parametrize("k", [0, 1, 2, 623, 624, 625, 1000, 1248])
def test_state_bytes_round_trip_continues_the_stream(k):
    gen = MT19937(42)
    gen.random_u32(k)
    clone = MT19937.from_bytes(gen.to_bytes())
    assert clone.to_bytes() == gen.to_bytes()
    assert clone.random_u32(700).tolist() == gen.random_u32(700).tolist()


def test_state_bytes_rejects_garbage():
    b = bytearray(MT19937(1).to_bytes())
    with pytest.raises(ValueError, match="bytes"):
        MT19937.from_bytes(bytes(b[:-4]))
    bad = bytearray(b)
    struct.pack_into("<I", bad, 2516, 123)
    with pytest.raises(ValueError, match="matrix"):
        MT19937.from_bytes(bytes(bad))
    bad = bytearray(b)
    struct.pack_into("<iI", bad, 8, 5, 5)
    with pytest.raises(ValueError, match="left"):
        MT19937.from_bytes(bytes(bad))


# ---- normal_ against torch ---------------------------------------------------------------------


def test_normal_matches_torch_with_shared_generator():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(42)
    gen = MT19937(42)
    for n, mean, std in [(16, 0.0, 0.02), (17, 0.0, 0.02), (1000, 1.5, 0.5), (100003, 0.0, 0.02), (48, -2.0, 3.0)]:
        expected = torch.empty(n).normal_(mean, std, generator=g).numpy()
        got = normal_(np.empty(n, np.float32), mean, std, gen)
        if X86:
            assert ulps(got, expected).max() == 0, f"n={n}: not bit-identical to torch"
        else:   # other CPUs run torch's scalar libm path: agreement to float32 rounding only
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * std + 1e-6 * abs(mean))
    assert llmc_left_next(gen) == torch_left_next(g)             # still in lock step


def torch_left_next(g):
    """(seed, left, next) from torch's CPU generator state (legacy THGeneratorState layout)."""
    raw = g.get_state().numpy().tobytes()
    seed, left, _seeded, nxt = struct.unpack_from("<QiiQ", raw)
    return seed, left, nxt


def test_mt_state_words_match_torch_generator():
    torch = pytest.importorskip("torch")
    for k in (16, 624, 1000):
        g = torch.Generator().manual_seed(42)
        torch.empty(k).uniform_(generator=g)                       # k float draws = k raw words
        gen = MT19937(42)
        gen.random_u32(k)
        raw = g.get_state().numpy().tobytes()
        words = np.frombuffer(raw, dtype="<u8", count=624, offset=24).astype(np.uint32)
        ours = np.frombuffer(gen.to_bytes(), dtype="<u4", count=624, offset=16)
        np.testing.assert_array_equal(words, ours)
        assert llmc_left_next(gen) == torch_left_next(g)


def test_normal_statistics_and_tail_rule():
    gen = MT19937(0)
    x = normal_(np.empty(1_000_003, np.float32), 1.0, 2.0, gen)
    assert abs(x.mean() - 1.0) < 0.01 and abs(x.std() - 2.0) < 0.01
    # n % 16 != 0: the first n-16 outputs equal the first groups of a longer, aligned draw
    a = normal_(np.empty(40, np.float32), 0.0, 1.0, MT19937(5))
    b = normal_(np.empty(48, np.float32), 0.0, 1.0, MT19937(5))
    np.testing.assert_array_equal(a[:24], b[:24])
    assert not np.array_equal(a[24:], b[24:40])


def test_normal_rejects_bad_input():
    with pytest.raises(ValueError):
        normal_(np.empty(8, np.float32), 0.0, 1.0, MT19937(0))
    with pytest.raises(ValueError):
        normal_(np.empty(32, np.float64), 0.0, 1.0, MT19937(0))


# ---- init_params -------------------------------------------------------------------------------


def torch_init(cfg):
    """A plain re-creation of llm.c's/train_gpt2.py's init with torch's generator (§8.2)."""
    import torch
    g = torch.Generator().manual_seed(42)
    out = np.zeros(num_parameters(cfg), np.float32)
    p = carve(out, param_shapes(cfg))
    draw = lambda n, std: torch.empty(n).normal_(0.0, std, generator=g).numpy()   # noqa: E731
    C, V, L = cfg.channels, cfg.vocab_size, cfg.num_layers
    p["wte"][:V] = draw(V * C, 0.02).reshape(V, C)
    p["wpe"][:] = draw(cfg.max_seq_len * C, 0.02).reshape(-1, C)
    proj = 0.02 / math.sqrt(2 * L)
    for layer in range(L):
        p["qkvw"][layer] = draw(3 * C * C, 0.02).reshape(3 * C, C)
        p["attprojw"][layer] = draw(C * C, proj).reshape(C, C)
        p["fcw"][layer] = draw(4 * C * C, 0.02).reshape(4 * C, C)
        p["fcprojw"][layer] = draw(4 * C * C, proj).reshape(C, 4 * C)
    for name in ("ln1w", "ln2w", "lnfw"):
        p[name][:] = 1
    return out


def test_init_params_matches_torch_recreation():
    pytest.importorskip("torch")
    got, expected = init_params(SMALL), torch_init(SMALL)
    if X86:
        np.testing.assert_array_equal(got, expected)
    else:
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)


def test_init_params_structure():
    flat = init_params(SMALL)
    assert flat.dtype == np.float32 and flat.shape == (num_parameters(SMALL),)
    p = carve(flat, param_shapes(SMALL))
    assert np.all(p["wte"][SMALL.vocab_size:] == 0)
    for name in ("ln1b", "qkvb", "attprojb", "ln2b", "fcb", "fcprojb", "lnfb"):
        assert np.all(p[name] == 0), name
    for name in ("ln1w", "ln2w", "lnfw"):
        assert np.all(p[name] == 1), name
    assert abs(p["qkvw"].std() - 0.02) < 1e-3
    assert abs(p["fcprojw"].std() - 0.01) < 1e-3                  # 0.02 / sqrt(2 * 2)
    again = np.full_like(flat, 7.0)
    assert init_params(SMALL, again) is again and np.array_equal(again, flat)


# ---- xorshift* and Fisher-Yates ----------------------------------------------------------------


def xorshift_reference(state, n):
    """xorshift* in numpy uint64 arithmetic (wrapping), an independent oracle."""
    s = np.uint64(state)
    out = []
    with np.errstate(over="ignore"):
        for _ in range(n):
            s ^= s >> np.uint64(12)
            s ^= s << np.uint64(25)
            s ^= s >> np.uint64(27)
            out.append(int((s * np.uint64(0x2545F4914F6CDD1D)) >> np.uint64(32)))
    return out, int(s)


@pytest.mark.parametrize("seed", [1337, 13371337, 1, 2 ** 64 - 1])
def test_xorshift_star(seed):
    expected, final = xorshift_reference(seed, 50)
    gen = XorShiftStar(seed)
    assert [gen.random_u32() for _ in range(50)] == expected
    assert gen.state == final
    f = XorShiftStar(seed).random_f32()
    assert f == (expected[0] >> 8) / 2 ** 24 and 0.0 <= f < 1.0


def test_shuffle_is_llmc_fisher_yates():
    perm = np.arange(1000, dtype=np.int32)
    shuffle_(perm, MT19937(42))
    ref, gen = list(range(1000)), MT19937(42)
    for i in range(999, 0, -1):
        j = gen.randint32() % (i + 1)
        ref[i], ref[j] = ref[j], ref[i]
    assert perm.tolist() == ref and perm.dtype == np.int32
    assert sorted(perm.tolist()) == list(range(1000))
    one = np.zeros(1, np.int32)
    gen = MT19937(1)
    before = gen.to_bytes()
    shuffle_(one, gen)
    assert gen.to_bytes() == before                                # n < 2 draws nothing
