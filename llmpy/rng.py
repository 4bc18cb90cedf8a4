"""llm.c's random number generators, draw for draw: the torch-compatible Mersenne Twister, torch's
CPU `normal_`, the random initialisation of a GPT-2, the xorshift* generator and Fisher-Yates.

Where each one is used (llmc-facts.md §7.14):
  - MT19937(42)            weight init for model descriptors (`init_params`)
  - MT19937(42 + rank)     train-loader shuffling (`shuffle_`, in llmpy.data)
  - XorShiftStar(1337)     sampling, reset at every sampling event
  - XorShiftStar(13371337) stochastic-rounding seeds, persisted in state files

`normal_` reproduces PyTorch's x86-64 CPU kernel (the AVX2 Box-Muller, which torch also runs on
AVX-512 machines), including its float32 cephes log/sincos polynomials and the fused multiply-adds
the compiler makes of them, so `init_params` equals `torch.nn.init.normal_` on a generator seeded 42
bit for bit (tests/test_rng.py). llm.c's own C `normal_` uses libm instead and so differs from
both in the last bits; nothing downstream depends on those bits.
"""
from __future__ import annotations

import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from llmpy.model import GPTConfig, carve, param_shapes

f32, f64 = np.float32, np.float64
MASK64 = (1 << 64) - 1

# -------------------------------------------------------------------------------------------------
# Mersenne Twister (torch's CPU generator, llm.c's mt19937_state)

MT_N = 624                           # words of state
MT_MATRIX_A = 0x9908B0DF             # twist constant; llm.c stores {0, MT_MATRIX_A} in the struct
MT_STRUCT = struct.Struct("<QiI624I2I")  # llm.c layout: seed, left, next, state[624], matrix[2]
MT_STATE_BYTES = MT_STRUCT.size      # 2520


def _init_genrand(seed: int) -> np.ndarray:
    """The 624-word state of Matsumoto-Nishimura `init_genrand` (torch's and numpy-legacy seeding)."""
    key = [seed & 0xFFFFFFFF]
    for j in range(1, MT_N):
        prev = key[-1]
        key.append((1812433253 * (prev ^ (prev >> 30)) + j) & 0xFFFFFFFF)
    return np.array(key, dtype=np.uint32)


class MT19937:
    """Mersenne Twister numerically identical to torch.Generator().manual_seed(seed) on the CPU.

    The draws come from numpy's MT19937 bit generator (same algorithm, C speed); this class only
    seeds it the torch way and converts its state to and from llm.c's `mt19937_state` struct.
    numpy's `pos` (index of the next word, 624 = twist before the next draw) maps to llm.c's
    `next = pos`, `left = 625 - pos`; a freshly seeded generator is llm.c's `left=1, next=0`.
    """

    def __init__(self, seed: int = 5489):
        if not 0 <= seed <= MASK64:
            raise ValueError(f"MT19937 seed must fit in uint64, got {seed}")
        self.seed = seed
        self._bitgen = np.random.MT19937(0)   # state replaced right away
        self._set(_init_genrand(seed), MT_N)
        self._fresh = True                    # seeded and not drawn from: llm.c writes next=0

    def _set(self, key: np.ndarray, pos: int) -> None:
        self._bitgen.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": pos}}

    def randint32(self) -> int:
        """One raw 32-bit draw (llm.c `randint32`, torch `random()`)."""
        self._fresh = False
        return int(self._bitgen.random_raw())

    def random_u32(self, n: int) -> np.ndarray:
        """n consecutive raw draws as a uint32 array."""
        if n:
            self._fresh = False
        return self._bitgen.random_raw(n).astype(np.uint32)

    def uniform_f32(self, n: int) -> np.ndarray:
        """n floats in [0, 1) from the low 24 bits of each draw (torch's float uniform, exact)."""
        u = self.random_u32(n)
        u &= 0xFFFFFF
        out = u.astype(f32)
        out *= f32(2.0 ** -24)
        return out

    def to_bytes(self) -> bytes:
        """The generator as llm.c's 2520-byte `mt19937_state` struct (as stored in state files)."""
        st = self._bitgen.state["state"]
        pos = int(st["pos"])
        left, nxt = (1, 0) if (pos == MT_N and self._fresh) else (MT_N + 1 - pos, pos)
        return MT_STRUCT.pack(self.seed, left, nxt, *st["key"].tolist(), 0, MT_MATRIX_A)

    @classmethod
    def from_bytes(cls, b: bytes) -> "MT19937":
        """Inverse of `to_bytes`; ValueError if the bytes are not a valid llm.c generator state."""
        if len(b) != MT_STATE_BYTES:
            raise ValueError(f"MT19937 state must be {MT_STATE_BYTES} bytes, got {len(b)}")
        seed, left, nxt, *rest = MT_STRUCT.unpack(b)
        key, matrix = rest[:MT_N], rest[MT_N:]
        if matrix != [0, MT_MATRIX_A]:
            raise ValueError(f"MT19937 state has matrix constants {matrix}, expected [0, {MT_MATRIX_A:#x}]")
        if not (1 <= left <= MT_N + 1 and 0 <= nxt <= MT_N and (left + nxt == MT_N + 1 or (left, nxt) == (1, 0))):
            raise ValueError(f"MT19937 state has inconsistent left={left}, next={nxt}")
        gen = cls.__new__(cls)
        gen.seed = seed
        gen._bitgen = np.random.MT19937(0)
        gen._set(np.array(key, dtype=np.uint32), MT_N if left == 1 else nxt)
        gen._fresh = (left, nxt) == (1, 0)
        return gen


# -------------------------------------------------------------------------------------------------
# torch's CPU normal_: uniforms, then Box-Muller on each aligned group of 16
#
# Float32 cephes polynomials as in torch's ATen/native/cpu/avx_mathfun.h (zlib licence, after
# Julien Pommier's sse_mathfun). Where GCC contracts a multiply and an add into one FMA, so do we.
# Arithmetic runs on float64 buffers holding float32 values, rounded back to float32 after every
# step (`_Rounder`): a float64 +, -, * or sqrt of float32 inputs rounded to float32 is the
# correctly rounded float32 result, and a product of two float32 is exact in float64, so a*b + c
# rounded once is the FMA (up to a rare double rounding, never observed: all 124,475,904 values
# of a d12 init equal torch's).

SQRTHF = f32(0.707106781186547524)
LOG_P = [float(f32(c)) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                                 1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                                 3.3333331174e-1)]
LOG_Q1, LOG_Q2 = float(f32(-2.12194440e-4)), float(f32(0.693359375))    # ln 2 split in two
FOPI = f32(1.27323954473516)                                            # 4 / pi
DP = [float(f32(c)) for c in (-0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8)]  # -pi/4, 3 parts
SIN_P = [float(f32(c)) for c in (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)]
COS_P = [float(f32(c)) for c in (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)]
TWO_PI = f32(2.0 * math.pi)
CHUNK = 1 << 15      # elements per Box-Muller work item: the float64 temporaries stay in L2


class _Rounder:
    """Rounds float64 arrays of one shape to float32 precision in place, through one scratch buffer."""

    def __init__(self, shape):
        self.tmp = np.empty(shape, dtype=f32)

    def __call__(self, a: np.ndarray) -> np.ndarray:
        np.copyto(self.tmp, a, casting="same_kind")
        np.copyto(a, self.tmp)
        return a


def _log_ps(x: np.ndarray, rnd: _Rounder) -> np.ndarray:
    """cephes float32 natural log of float32 x in (0, 1] (normal floats only; uniforms guarantee it).

    Returns float64 holding float32 values.
    """
    bits = x.view(np.uint32)
    e = (bits >> 23).astype(np.int32) - 126                             # exponent for mantissa in [0.5, 1)
    m = ((bits & np.uint32(0x007FFFFF)) | np.uint32(0x3F000000)).view(f32)
    small = m < SQRTHF                                                  # below sqrt(1/2): 2m-1 and e-1
    e = (e - small).astype(f64)
    xm = (m - f32(1)).astype(f64)
    xm += np.where(small, m, f32(0))                                    # exact in float32
    z = rnd(xm * xm)
    y = xm * LOG_P[0]
    y += LOG_P[1]
    for p in LOG_P[2:]:                                                 # Horner, one FMA per step
        y = rnd(y)
        y *= xm
        y += p
    rnd(y)
    rnd(np.multiply(y, xm, out=y))
    y *= z                                                              # FMA(y, z, e*q1)
    y += rnd(e * LOG_Q1)
    rnd(y)
    y -= z * 0.5
    rnd(y)
    y += xm
    rnd(y)
    y += e * LOG_Q2                                                     # FMA(e, q2, x + y)
    return rnd(y)


def _sincos_ps(x: np.ndarray, rnd: _Rounder) -> tuple[np.ndarray, np.ndarray]:
    """cephes float32 sin and cos of float32 x >= 0 (octant reduction by pi/4, two polynomials).

    Returns float64 arrays holding float32 values.
    """
    j = (x * FOPI).astype(np.int32)
    j = (j + 1) & ~1                                                    # even octant index
    jf = j.astype(f64)
    r = x.astype(f64)
    for dp in DP:                                                       # x - j*pi/4, in three FMAs
        r += jf * dp
        rnd(r)
    z = rnd(r * r)
    c = z * COS_P[0]
    c += COS_P[1]
    rnd(c)
    c *= z
    c += COS_P[2]
    rnd(c)
    rnd(np.multiply(c, z, out=c))
    c *= z                                                              # FMA(c, z, -(z/2))
    c -= z * 0.5
    rnd(c)
    c += 1.0
    rnd(c)
    s = z * SIN_P[0]
    s += SIN_P[1]
    rnd(s)
    s *= z
    s += SIN_P[2]
    rnd(s)
    rnd(np.multiply(s, z, out=s))
    s *= r                                                              # FMA(s, x, x)
    s += r
    rnd(s)
    swap = (j & 2) != 0                                                 # octants where sin uses the cos poly
    sin, cos = np.where(swap, c, s), np.where(swap, s, c)
    np.negative(sin, out=sin, where=(j & 4) != 0)
    np.negative(cos, out=cos, where=((j - 2) & 4) == 0)
    return sin, cos


def _box_muller_16(block: np.ndarray, mean: float, std: float) -> None:
    """In place on a (G, 16) float32 block of uniforms: column t<8 gives the radius, t+8 the angle."""
    rnd = _Rounder((len(block), 8))
    u1 = f32(1) - block[:, :8]                                           # (0, 1]: safe for log
    radius = np.sqrt(f32(-2) * _log_ps(u1, rnd).astype(f32)).astype(f64)
    sin, cos = _sincos_ps(TWO_PI * block[:, 8:], rnd)
    std, mean = float(f32(std)), float(f32(mean))
    for half, trig in ((block[:, :8], cos), (block[:, 8:], sin)):
        rnd(np.multiply(trig, radius, out=trig))
        trig *= std                                                      # FMA(r*trig, std, mean)
        trig += mean
        np.copyto(half, trig, casting="same_kind")


def normal_(out: np.ndarray, mean: float, std: float, gen: MT19937) -> np.ndarray:
    """Fill `out` (contiguous float32, >= 16 elements) like torch's `out.normal_(mean, std, generator)`.

    Draws len(out) uniforms in order, transforms each aligned group of 16, and, if len(out) is not a
    multiple of 16, redoes the last 16 outputs from 16 fresh uniforms (torch's rule). Returns out.
    """
    if out.dtype != f32 or not out.flags.c_contiguous:
        raise ValueError(f"normal_ needs a contiguous float32 array, got {out.dtype}")
    flat = out.reshape(-1)
    n = flat.size
    if n < 16:
        raise ValueError(f"normal_ supports 16 or more elements (torch's vectorised path), got {n}")
    for i in range(0, n, CHUNK):                                         # uniforms, in draw order
        flat[i:i + CHUNK] = gen.uniform_f32(min(CHUNK, n - i))
    groups = flat[:n - n % 16].reshape(-1, 16)
    work = [groups[i:i + CHUNK // 16] for i in range(0, len(groups), CHUNK // 16)]
    if len(work) == 1:
        _box_muller_16(work[0], mean, std)
    else:                                                                # numpy drops the GIL in ufuncs
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(lambda blk: _box_muller_16(blk, mean, std), work))
    if n % 16:
        tail = gen.uniform_f32(16).reshape(1, 16)
        _box_muller_16(tail, mean, std)
        flat[n - 16:] = tail[0]
    return out


def init_params(cfg: GPTConfig, out: np.ndarray | None = None) -> np.ndarray:
    """llm.c's random init for model descriptors (llmc-facts.md §8.2) into a flat float32 buffer.

    One MT19937(42); draws in PyTorch's module order: wte (first V rows), wpe, then per layer
    qkvw, attprojw, fcw, fcprojw; the residual projections use std 0.02/sqrt(2L). Biases and the
    padded wte rows are 0, LayerNorm weights 1. Returns the buffer (allocated if `out` is None).
    """
    shapes = param_shapes(cfg)
    n = sum(math.prod(s) for s in shapes.values())
    if out is None:
        out = np.empty(n, dtype=f32)
    if out.dtype != f32 or out.shape != (n,):
        raise ValueError(f"init_params needs a float32 buffer of shape ({n},), got {out.dtype} {out.shape}")
    out.fill(0)
    p = carve(out, shapes)
    for name in ("ln1w", "ln2w", "lnfw"):
        p[name].fill(1)
    gen = MT19937(42)
    std, proj_std = 0.02, 0.02 / math.sqrt(2 * cfg.num_layers)
    normal_(p["wte"][:cfg.vocab_size].reshape(-1), 0.0, std, gen)
    normal_(p["wpe"].reshape(-1), 0.0, std, gen)
    for layer in range(cfg.num_layers):
        normal_(p["qkvw"][layer].reshape(-1), 0.0, std, gen)
        normal_(p["attprojw"][layer].reshape(-1), 0.0, proj_std, gen)
        normal_(p["fcw"][layer].reshape(-1), 0.0, std, gen)
        normal_(p["fcprojw"][layer].reshape(-1), 0.0, proj_std, gen)
    return out


# -------------------------------------------------------------------------------------------------
# xorshift* (sampling and stochastic-rounding seeds) and Fisher-Yates


class XorShiftStar:
    """llm.c's 64-bit xorshift* generator; `.state` is the uint64 state as a Python int."""

    def __init__(self, seed: int):
        if not 0 <= seed <= MASK64:
            raise ValueError(f"XorShiftStar seed must fit in uint64, got {seed}")
        self.state = seed

    def random_u32(self) -> int:
        s = self.state
        s ^= s >> 12
        s ^= (s << 25) & MASK64
        s ^= s >> 27
        self.state = s
        return ((s * 0x2545F4914F6CDD1D) & MASK64) >> 32

    def random_f32(self) -> float:
        """A float in [0, 1) with 24 random bits (exactly representable in float32)."""
        return (self.random_u32() >> 8) / 16777216.0


def shuffle_(perm: np.ndarray, gen: MT19937) -> np.ndarray:
    """In-place Fisher-Yates, llm.c order: for i = n-1 down to 1, swap perm[i] with perm[randint32 % (i+1)]."""
    n = len(perm)
    if n < 2:
        return perm
    draws = gen.random_u32(n - 1).astype(np.int64)                      # one draw per i, in loop order
    js = (draws % np.arange(n, 1, -1)).tolist()
    p = perm.tolist()
    for i, j in zip(range(n - 1, 0, -1), js):
        p[i], p[j] = p[j], p[i]
    perm[:] = p
    return perm
