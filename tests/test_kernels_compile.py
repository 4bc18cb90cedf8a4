"""The kernels build, and the launchers drive them correctly, without a GPU.

1. Every cuda/*.cu compiles under NVRTC for sm_80 and sm_90 with exactly the options RawModule uses
   (llmpy/gpu/_kernels.py: compile_offline; cupy-notes.md §1.9), and every template instantiation
   listed in NAME_EXPRESSIONS lowers to a symbol in the cubin. If nvcc is on PATH, the same
   instantiations also build with `nvcc -cubin -arch=sm_90`.
2. The source hash in the compile options changes when an #included .cuh changes (CuPy's cache
   would otherwise reuse a stale cubin, cupy-notes.md §0.3).
3. Launch math (pure functions) and argument validation. CuPy arrays over fake, never-touched device
   addresses stand in for real ones, and `_kernels.launch` is replaced by a recorder, so each
   launcher runs end to end: its grids, kernel names and scalar argument types are checked here, and
   only the kernels' arithmetic is left to tests/test_gpu_ops.py.

Skipped only when CuPy or NVRTC cannot be imported.
"""
import itertools
import math
import shutil
import subprocess

import numpy as np
import pytest

try:
    import cupy as cp
    from cupy_backends.cuda.libs import nvrtc
    nvrtc.getVersion()
except Exception as e:  # noqa: BLE001  (any failure here means "no CuPy/NVRTC on this machine")
    pytest.skip(f"CuPy/NVRTC not importable: {e}", allow_module_level=True)

import ml_dtypes

from llmpy.gpu import _kernels as K
from llmpy.gpu import flash_attention

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
ARCHS = (80, 90)               # A100, H100/H200: where the tests below look at the code
MORE_ARCHS = (75, 86, 89, 100, 120)   # T4, A10G, L4 (Modal's default), B200, RTX 50: compiles at all
CU_FILES = sorted(K.NAME_EXPRESSIONS)

# -------------------------------------------------------------------------------------------------
# 1. compilation


def test_every_cu_file_has_name_expressions():
    on_disk = sorted(p.name for p in K.CUDA_DIR.glob("*.cu"))
    assert on_disk == CU_FILES
    assert (K.CUDA_DIR / "common.cuh").is_file()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("filename", CU_FILES)
def test_nvrtc_compiles_offline(filename, arch):
    cubin, lowered = K.compile_offline_with_names(filename, arch)
    assert cubin[:4] == b"\x7fELF" and len(cubin) > 1000
    assert set(lowered) == set(K.NAME_EXPRESSIONS[filename])
    for expr, symbol in lowered.items():
        assert symbol, f"{expr} did not lower"
        assert symbol.encode() in cubin, f"{expr} ({symbol}) is not in the cubin"


@pytest.mark.parametrize("arch", MORE_ARCHS)
def test_nvrtc_compiles_offline_for_other_gpus(arch):
    for filename in CU_FILES:
        if filename == "flash_attention.cu" and arch < 80:
            # the fused attention is bf16 on sm_80 instructions; below sm_80 the engine runs fp32 without it
            with pytest.raises(RuntimeError, match="cp.async' requires .target sm_80"):
                K.compile_offline(filename, arch)
            continue
        assert K.compile_offline(filename, arch)[:4] == b"\x7fELF", filename


# spills tolerated (stack + spill stores + spill loads, bytes), by (arch, kernel): none. The dk/dv kernel's
# 8-byte stack frame on sm_80 at 168 registers (review Appendix A) went with its grouped-query loop, which
# ptxas fits in 163 registers on sm_80 and sm_90
KNOWN_SPILL_BYTES: dict = {}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("filename", CU_FILES)
def test_nvrtc_kernels_keep_everything_in_registers(filename, arch):
    """ptxas' report through NVRTC (what a RawModule compiles): no kernel spills to local memory or keeps
    a stack frame, and each fits its largest block in registers."""
    usage = K.resource_usage(filename, arch)
    assert {name.split("<")[0] for name in usage} == {e.split("<")[0] for e in K.NAME_EXPRESSIONS[filename]}
    for name, u in usage.items():
        spilled = u["stack"] + u["spill_stores"] + u["spill_loads"]
        assert spilled <= KNOWN_SPILL_BYTES.get((arch, name), 0), f"{name} (sm_{arch}) spills: {u}"
        threads = (32 * int(name.split("<")[1].split(",")[0]) if name.startswith("flash_attention_") and "<" in name
                   else flash_attention.launch_shape("dkdv")[1] if "dkdv" in name else 1024)   # <WARPS, EXP2>
        assert max_threads_per_block(u["registers"]) >= threads, f"{name} (sm_{arch}): {u['registers']} registers"


def test_compile_offline_returns_the_cubin():
    assert K.compile_offline("residual.cu", 90)[:4] == b"\x7fELF"


def test_nvrtc_options_are_rawmodules():
    opts = K.nvrtc_options(90)
    user = K.options()
    start = opts.index(user[0])
    assert opts[start:start + len(user)] == user                 # our options, in order
    assert opts[-3:] == ("-ftz=true", "-arch=sm_90", "--device-as-default-execution-space")
    assert f"-I{K.CUDA_DIR}" in opts and "--use_fast_math" in opts
    assert any(o.startswith("-DLLMPY_SRC_HASH=0x") for o in opts)


def test_compile_error_shows_the_nvrtc_log(monkeypatch):
    monkeypatch.setitem(K.NAME_EXPRESSIONS, "gelu.cu", ("no_such_kernel<float>",))
    with pytest.raises(RuntimeError, match="no_such_kernel"):
        K.compile_offline("gelu.cu", 90)


def nvcc_every_instantiation(filename: str, tmp_path, *flags: str) -> subprocess.CompletedProcess:
    """nvcc (sm_90, RawModule's language options) on cuda/<filename> with all its instantiations.
    nvcc cannot take name expressions: taking each instance's address in host code instantiates it."""
    src = tmp_path / f"instances_{filename}"
    src.write_text(f'#include "{filename}"\nvoid* llmpy_instances[] = {{\n'
                   + "".join(f"    (void*)&{e},\n" for e in K.NAME_EXPRESSIONS[filename]) + "};\n")
    result = subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", "--use_fast_math", f"-I{K.CUDA_DIR}", *flags,
                             str(src)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


def fixed_block(mangled: str) -> int:
    """The block a kernel launches with at most: 1024, or for the tiled flash kernels, written for one
    block size (__launch_bounds__ says so too), 32 x WARPS from the mangled <WARPS, EXP2, GQA> (ILi8ELb1ELb0E),
    128 for dk/dv."""
    import re
    if m := re.search(r"flash_attention_\w+_kernelILi(\d+)E", mangled):
        return 32 * int(m[1])
    return flash_attention.launch_shape("dkdv")[1] if "flash_attention_backward_dkdv" in mangled else 1024


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("filename", CU_FILES)
def test_nvcc_compiles_every_instantiation(filename, tmp_path):
    result = nvcc_every_instantiation(filename, tmp_path, "-cubin", "--resource-usage",
                                      "-o", str(tmp_path / "out.cubin"))
    # ptxas's resource report, one block per kernel: every kernel must launch with the largest block its
    # launcher may use (1024 threads, or the fixed block of a tiled kernel) and keep everything in
    # registers, or the GPU would refuse the launch ("too many resources requested") or run it from
    # local memory
    usage = parse_resource_usage(result.stdout + result.stderr)
    assert len(usage) == len(K.NAME_EXPRESSIONS[filename]), usage
    for kernel, u in usage.items():
        threads = fixed_block(kernel)
        assert max_threads_per_block(u["registers"]) >= threads, f"{kernel}: {u['registers']} registers"
        assert u["spill_stores"] == u["spill_loads"] == 0 and u["stack"] == 0, f"{kernel} spills: {u}"
        assert u["smem"] <= 48 * 1024, f"{kernel}: {u['smem']} bytes of static shared memory"


# The kernels that move 16 bytes per load and store (Packed128), where llm.c's do; the others (permutes,
# AdamW, norms, casts, the per-column softmax and the fold kernels) use scalar accesses. The flash delta
# kernel reads rows 16 bytes at a time and writes one float per row.
X128_LOAD_ONLY = {"flash_attention_delta_kernel"}
X128_KERNELS = {"encoder_forward_kernel", "encoder_backward_wpe_kernel", "encoder_backward_wte_kernel",
                "layernorm_forward_kernel", "fused_residual_forward_kernel", "layernorm_backward_kernel",
                "gelu_forward_kernel", "gelu_backward_kernel", "residual_forward_kernel",
                "softmax_forward128_kernel", "softmax_backward128_kernel", "fused_classifier_kernel",
                "bias_backward_kernel", "flash_attention_forward_kernel",
                "flash_attention_backward_dkdv_kernel", "flash_attention_backward_dq_kernel",
                "rmsnorm_forward_kernel", "fused_residual_rmsnorm_forward_kernel", "rmsnorm_backward_kernel",
                "rope_kernel", "relu2_forward_kernel", "relu2_backward_kernel", "muon_copy_kernel", "qkv_pack_kernel",
                "qkv_unpack_kernel",
                "softcap_forward_kernel"}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("filename", CU_FILES)
def test_x128_kernels_load_and_store_16_bytes(filename, tmp_path):
    """In the PTX, a Packed128 access is ld/st.global.v4 (4 x 32 bits); nothing in the source says so. A
    16-byte cp.async (global to shared, flash attention's tiles) counts as a 16-byte load."""
    def kind(m):
        return "ld.v4" if m.group(3) else m.group(1) + (".v4" if ".v4" in m.group(2) else "")
    pattern = r"\b(ld|st)\.global((?:\.\w+)*)|\b(cp\.async\.cg\.shared\.global)\s.*,\s*16;"
    found = ptx_matches(filename, tmp_path, pattern)
    access = {kernel: {kind(m) for m in matches} for kernel, matches in found.items()}
    assert set(access) == {e.split("<")[0] for e in K.NAME_EXPRESSIONS[filename]}
    for kernel, kinds in access.items():
        if kernel in X128_KERNELS:
            assert {"ld.v4", "st.v4"} <= kinds, f"{kernel}: {sorted(kinds)}"
        elif kernel in X128_LOAD_ONLY:
            assert "ld.v4" in kinds and "st.v4" not in kinds, f"{kernel}: {sorted(kinds)}"
        else:
            assert not kinds & {"ld.v4", "st.v4"}, f"{kernel} is vectorised but not listed: {sorted(kinds)}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_flash_attention_multiplies_on_tensor_cores(tmp_path):
    """The fused attention's products are bf16 x bf16 -> fp32 tensor-core MMAs (mma.sync m16n8k16 in the
    PTX), 32 per 16 x 64 x 64 tile product, with operands from ldmatrix; the delta kernel has none."""
    found = ptx_matches("flash_attention.cu", tmp_path,
                        r"(?<!w)(mma\.sync\.aligned\.m16n8k16\.row\.col\.[\w.]+|ldmatrix\.sync\.aligned\.[\w.]+)")
    ops = {kernel: [m.group(1) for m in matches] for kernel, matches in found.items()}
    for plain in ("flash_attention_delta_kernel", "qkv_pack_kernel", "qkv_unpack_kernel"):
        assert ops.pop(plain) == [], plain
    products = {"flash_attention_forward_kernel": 2, "flash_attention_backward_dkdv_kernel": 4,
                "flash_attention_backward_dq_kernel": 3}      # per pair of tiles (the loops are unrolled)
    for kernel, got in ops.items():   # forward and dq: both instantiations (tile 64 and 128) under one name
        mmas = [op for op in got if op.startswith("mma")]
        assert set(mmas) == {"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"}, kernel
        copies = 1 if "dkdv" in kernel else 2 * len(flash_attention.TILES)     # with and without GQA
        assert len(mmas) == copies * 32 * products[kernel], (kernel, len(mmas))
        assert {op for op in got if op.startswith("ldmatrix")} == {
            "ldmatrix.sync.aligned.m8n8.x4.shared.b16", "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"}, kernel


def ptx_matches(filename: str, tmp_path, pattern: str) -> dict[str, list]:
    """{kernel name: the re matches of `pattern` in its PTX body} for cuda/<filename> through nvcc."""
    import re
    ptx = tmp_path / "out.ptx"
    nvcc_every_instantiation(filename, tmp_path, "-ptx", "-o", str(ptx))
    found: dict[str, list] = {}
    kernel = None
    for line in ptx.read_text().splitlines():
        if m := re.search(r"\.entry _Z(\d+)(\w+)\(", line):       # mangled: _Z<length><name>I...
            kernel = m.group(2)[:int(m.group(1))]
            found.setdefault(kernel, [])
        elif kernel and (m := re.search(pattern, line)):
            found[kernel].append(m)
    return found


def parse_resource_usage(text: str) -> dict:
    """{mangled kernel: registers, smem (static bytes), stack, spill_stores, spill_loads} from the
    `ptxas info` lines that nvcc --resource-usage prints."""
    import re
    usage, current = {}, None
    for line in text.splitlines():
        if m := re.search(r"Function properties for (\w+)", line):
            current = usage.setdefault(m.group(1), {"registers": 0, "smem": 0, "stack": 0, "spill_stores": 0,
                                                     "spill_loads": 0})
        elif current is not None and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                                                       r"(\d+) bytes spill loads", line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current["registers"] = int(m.group(1))
            if sm := re.search(r"(\d+) bytes smem", line):
                current["smem"] = int(sm.group(1))
    return usage


def max_threads_per_block(registers: int) -> int:
    """The largest block (a multiple of 32) sm_80/sm_90 can launch with `registers` per thread:
    64K registers per block, allocated per warp in units of 256."""
    per_warp = -(-registers * 32 // 256) * 256
    return min(1024, 65536 // per_warp * 32)


def test_resource_usage_parsing_and_register_limit():
    report = """ptxas info    : Function properties for _Z3fooPf
    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 72 registers, used 1 barriers, 4096 bytes smem, 380 bytes cmem[0]
ptxas info    : Function properties for _Z3barPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 56 registers, used 0 barriers, 360 bytes cmem[0]"""
    assert parse_resource_usage(report) == {
        "_Z3fooPf": {"registers": 72, "smem": 4096, "stack": 0, "spill_stores": 8, "spill_loads": 4},
        "_Z3barPf": {"registers": 56, "smem": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0}}
    assert max_threads_per_block(64) == 1024 and max_threads_per_block(56) == 1024
    assert max_threads_per_block(65) == 896 and max_threads_per_block(72) == 896
    assert max_threads_per_block(128) == 512 and max_threads_per_block(255) == 256


# -------------------------------------------------------------------------------------------------
# 2. source hash


def test_source_hash_follows_included_headers(tmp_path):
    cuda = tmp_path / "cuda"
    shutil.copytree(K.CUDA_DIR, cuda)
    before = K.source_hash(cuda)
    assert before == K.source_hash(K.CUDA_DIR) and len(before) == 16
    (tmp_path / "cuda" / "notes.txt").write_text("not a kernel source")
    assert K.source_hash(cuda) == before
    with open(cuda / "common.cuh", "a") as f:
        f.write("// edited\n")
    assert K.source_hash(cuda) != before


# -------------------------------------------------------------------------------------------------
# 3. launch math and argument checks, with fake device arrays and a recording launcher

_next_fake_address = itertools.count(1 << 40, 1 << 28)   # 256 MiB apart: arrays never overlap


def fake(shape, dtype=F32, *, offset_bytes=0):
    """A C-contiguous CuPy array over a fake, 256-byte aligned device address (never dereferenced)."""
    dtype = np.dtype(dtype)
    nbytes = max(1, int(np.prod(shape)) * dtype.itemsize) + offset_bytes
    mem = cp.cuda.UnownedMemory(next(_next_fake_address), nbytes, None, 0)
    return cp.ndarray(shape, dtype, memptr=cp.cuda.MemoryPointer(mem, offset_bytes))


@pytest.fixture
def launches(monkeypatch):
    """Replace _kernels.launch with a recorder that checks what a real launch would need."""
    calls = []

    def record(filename, name, grid, block, args, *, shared_mem=0):
        assert name in K.NAME_EXPRESSIONS[filename], f"{name} is not instantiated for {filename}"
        assert 1 <= len(grid) <= 3 and all(isinstance(g, int) and g >= 1 for g in grid), grid
        assert len(grid) < 2 or grid[1] <= 65535
        assert np.prod(block) <= 1024 and np.prod(block) % 32 == 0, block
        for a in args:   # a Python int/float would reach the kernel as int64/double, None as garbage
            assert isinstance(a, (cp.ndarray, np.generic)), f"{name}: argument {a!r}"
        calls.append(dict(file=filename, name=name, grid=tuple(grid), block=tuple(block), args=args,
                          shared_mem=shared_mem))

    monkeypatch.setattr(K, "launch", record)
    return calls


def test_launch_refuses_none_for_a_pointer():
    # CuPy would launch it with a non-NULL garbage pointer (cupy/cupy#9046); K.NULL is 8 zero bytes
    with pytest.raises(ValueError, match=r"^gelu_forward_kernel<float>: None .*cupy/cupy#9046"):
        K.launch("gelu.cu", "gelu_forward_kernel<float>", (1,), (32,), (None, fake((4,)), K.i32(4)))
    assert K.NULL.dtype == np.uint64 and K.NULL.tobytes() == bytes(8)
    arr = fake((4,))
    assert K.nullable(None) is K.NULL and K.nullable(arr) is arr


def test_grid_math():
    assert K.ceil_div(10, 3) == 4 and K.ceil_div(9, 3) == 3
    assert K.x128_elems(BF16) == 8 and K.x128_elems(F32) == 4
    assert K.grid_1d(0, 256) == (1,) and K.grid_1d(257, 256) == (2,)
    assert K.elementwise_grid(4 * 64 * 3072, BF16, 256) == (384,)    # 786432 / 8 / 256
    assert K.elementwise_grid(37, BF16, 256) == (1,)
    assert K.elementwise_grid(4097, F32, 256) == (5,)                # 1025 chunks
    for bad in (0, 16, 48, 2048, 256.0):
        with pytest.raises(ValueError, match="block_size"):
            K.check_block_size(bad)


def test_template_names():
    assert K.template_name("gelu_forward_kernel", BF16) == "gelu_forward_kernel<__nv_bfloat16>"
    assert K.template_name("copy_and_cast_kernel", F32, BF16) == "copy_and_cast_kernel<float, __nv_bfloat16>"
    with pytest.raises(ValueError, match="float16"):
        K.template_name("gelu_forward_kernel", np.float16)


def test_check_names_the_argument():
    a = fake((4, 8))
    assert K.check("a", a, dtype=F32, shape=(4, None), aligned=True) is a
    with pytest.raises(ValueError, match="^x: expected a cupy.ndarray"):
        K.check("x", np.zeros(3))
    with pytest.raises(ValueError, match="^x: dtype float32, expected bfloat16"):
        K.check("x", a, dtype=BF16)
    with pytest.raises(ValueError, match=r"^x: shape \(4, 8\), expected \(4, 9\)"):
        K.check("x", a, shape=(4, 9))
    with pytest.raises(ValueError, match="^x: must be C-contiguous"):
        K.check("x", a[:, ::2])
    with pytest.raises(ValueError, match="^x: data pointer must be 16-byte aligned"):
        K.check("x", fake((4,), offset_bytes=4), aligned=True)
    with pytest.raises(ValueError, match="^w: dtype bfloat16 differs from v's float32"):
        K.check_floats(v=a, w=fake((4, 8), BF16))
    with pytest.raises(ValueError, match=r"^w: shape \(8,\) differs"):
        K.check_same_shape(v=a, w=fake((8,)))
    assert K.i32(5).dtype == np.int32 and K.u32(-1) == np.uint32(0xFFFFFFFF)
    with pytest.raises(ValueError):
        K.i32(2**31)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_elementwise_launchers(launches, dtype):
    from llmpy.gpu import gelu, residual
    x, y, z = fake((3, 37), dtype), fake((3, 37), dtype), fake((3, 37), dtype)
    gelu.gelu_forward(y, x)
    gelu.gelu_backward(x, y, x)                        # dinp may be dout
    residual.residual_forward(z, x, y, block_size=128)
    T = K.TEMPLATE_ARG[dtype]
    assert [c["name"] for c in launches] == [f"gelu_forward_kernel<{T}>", f"gelu_backward_kernel<{T}>",
                                             f"residual_forward_kernel<{T}>"]
    assert launches[0]["grid"] == (1,) and launches[0]["args"][-1] == 111
    with pytest.raises(ValueError, match="^dout: dtype"):
        gelu.gelu_backward(x, y, fake((3, 37), F32 if dtype == BF16 else BF16))
    with pytest.raises(ValueError, match=r"^inp1: shape \(3, 37\) differs from out's \(37, 3\)"):
        residual.residual_forward(fake((37, 3), dtype), x, y)
    with pytest.raises(ValueError, match="^inp: data pointer"):
        gelu.gelu_forward(y, fake((3, 37), dtype, offset_bytes=2))


def test_nanochat_launchers(launches):
    from llmpy.gpu import relu2, rmsnorm, rope
    B, T, H, D = 2, 5, 3, 64
    q, rstd = fake((B, T, H, D), BF16), fake((B, T, H))
    rmsnorm.rmsnorm_forward(q, rstd, q)                            # QK-norm, in place: 30 rows of D
    assert launches[-1]["grid"] == (4,) and launches[-1]["args"][-2:] == (30, 64)
    rmsnorm.rmsnorm_backward(q, q, q, rstd, accumulate=False)
    assert launches[-1]["name"] == "rmsnorm_backward_kernel<__nv_bfloat16>" and launches[-1]["args"][-1] == 0
    rmsnorm.fused_residual_rmsnorm_forward(q, q, rstd, q, q)
    with pytest.raises(ValueError, match=r"^rstd: shape \(2, 5\)"):
        rmsnorm.rmsnorm_forward(q, fake((B, T)), q)
    with pytest.raises(ValueError, match="^C = 36 must be a multiple of 8"):
        rmsnorm.rmsnorm_forward(fake((2, 36), BF16), fake((2,)), fake((2, 36), BF16))

    cos, sin = fake((8, D // 2)), fake((8, D // 2))
    rope.rope_forward(q, q, cos, sin)
    call = launches[-1]
    assert call["grid"] == (1,) and call["args"][4] == np.float32(1.0) and call["args"][-4:] == (30, T, H, D)
    rope.rope_backward(q, q, cos, sin, block_size=32)
    assert launches[-1]["grid"] == (K.ceil_div(30 * 4, 32),) and launches[-1]["args"][4] == np.float32(-1.0)
    with pytest.raises(ValueError, match="^D = 24 must be a multiple of 16"):
        rope.rope_forward(fake((B, T, H, 24), BF16), fake((B, T, H, 24), BF16), fake((8, 12)), fake((8, 12)))
    with pytest.raises(ValueError, match="^sin: 4 positions, the input has T = 5"):
        rope.rope_forward(q, q, cos, fake((4, D // 2)))
    with pytest.raises(ValueError, match=r"^cos: dtype bfloat16"):
        rope.rope_forward(q, q, fake((8, D // 2), BF16), sin)

    relu2.relu2_forward(q, q)
    relu2.relu2_backward(q, q, q)
    assert launches[-1]["name"] == "relu2_backward_kernel<__nv_bfloat16>" and launches[-1]["args"][-1] == q.size


def test_gqa_attention_launchers(launches, monkeypatch):
    import llmpy.gpu.matmul
    from llmpy.gpu import attention
    products = []
    monkeypatch.setattr(llmpy.gpu.matmul, "batched_matmul",
                        lambda out, a, b, **kw: products.append((out.shape, a.shape, b.shape, kw)))
    B, T, NH, NKV, HS = 2, 40, 6, 2, 16
    q, k, v, att = fake((B, T, NH, HS), BF16), fake((B, T, NKV, HS), BF16), fake((B, T, NKV, HS), BF16), \
        fake((B, NH, T, T), BF16)
    need = attention.gqa_workspace_size(B, T, NH, NKV, HS, BF16)
    assert need == 2 * B * T * HS * (NH + NKV)
    attention.gqa_attention_forward(fake(q.shape, BF16), att, q, k, v, workspace=fake((need,), BF16))
    assert [c["name"].split("<")[0] for c in launches] == ["unpermute_backward_kernel"] * 3 + [
        "softmax_forward128_kernel", "unpermute_kernel"]
    assert [c["args"][-2] for c in launches if "permute" in c["name"]] == [NH, NKV, NKV, NH]
    G = NH // NKV                                   # one product per (b, kv head) over its group's rows
    assert products == [((B * NKV, G * T, T), (B * NKV, G * T, HS), (B * NKV, T, HS), dict(transa=False, transb=True)),
                        ((B * NKV, G * T, HS), (B * NKV, G * T, T), (B * NKV, T, HS), dict(transa=False, transb=False))]
    products.clear()
    need = attention.gqa_workspace_size(B, T, NH, NKV, HS, BF16, backward=True)
    attention.gqa_attention_backward(fake(q.shape, BF16), fake(k.shape, BF16), fake(v.shape, BF16), att, q, q, k, v,
                                     att, workspace=fake((need,), BF16))
    assert products[1][:3] == ((B * NKV, T, HS), (B * NKV, G * T, T), (B * NKV, G * T, HS))   # dv = att^T dy
    with pytest.raises(ValueError, match="^k: 4 kv heads must divide the 6 query heads"):
        attention.gqa_attention_forward(fake(q.shape, BF16), att, q, fake((B, T, 4, HS), BF16),
                                        fake((B, T, 4, HS), BF16), workspace=fake((need,), BF16))
    with pytest.raises(ValueError, match="^workspace: 8 elements, need"):
        attention.gqa_attention_forward(fake(q.shape, BF16), att, q, k, v, workspace=fake((8,), BF16))


def test_muon_launchers(launches, monkeypatch):
    import llmpy.gpu.matmul
    from llmpy.gpu import muon
    products = []
    monkeypatch.setattr(llmpy.gpu.matmul, "batched_matmul",
                        lambda out, a, b, **kw: products.append((out.shape, a.shape, b.shape, kw)))
    L, rows, cols = 3, 40, 96
    param, grad, buf = fake((L, rows, cols), BF16), fake((L, rows, cols), BF16), fake((L, rows, cols))
    need = muon.workspace_size(param.shape)
    assert need == L * rows * cols + 2 * L * rows * rows + L * rows * cols
    assert muon.scratch_size(param.shape) == L * 15                     # 3840 elements / 256 per block
    muon.muon_update(param, buf, grad, lr=0.02, workspace=fake((need,), BF16), scratch=fake((L * 15,)))
    names = [c["name"] for c in launches]
    assert names[:2] == ["muon_momentum_kernel<__nv_bfloat16>", "muon_normalize_kernel"]
    assert names[2:-1] == ["muon_copy_kernel"] * 10 and names[-1] == "muon_apply_kernel<__nv_bfloat16>"
    assert launches[0]["grid"] == (15, L) and launches[-1]["grid"] == (K.ceil_div(rows * cols, 512), L)
    assert launches[-1]["args"][5] == np.float32(1.0)                    # wide: step scale 1
    a, b, c = muon.NS_COEFFS
    assert len(products) == 15 and products[:3] == [
        ((L, rows, rows), (L, rows, cols), (L, rows, cols), dict(transa=False, transb=True)),
        ((L, rows, rows), (L, rows, rows), (L, rows, rows), dict(transa=False, transb=False, alpha=c, beta=b)),
        ((L, rows, cols), (L, rows, rows), (L, rows, cols), dict(transa=False, transb=False, alpha=1.0, beta=a))]
    launches.clear()
    products.clear()
    tall = fake((cols, rows), np.float32)                                # tall: Gram matrix X^T X
    muon.muon_update(tall, fake((cols, rows)), tall, lr=0.02, workspace=fake((muon.workspace_size(tall.shape),), BF16),
                     scratch=fake((muon.scratch_size(tall.shape),)))
    assert products[0] == ((1, rows, rows), (1, cols, rows), (1, cols, rows), dict(transa=True, transb=False))
    assert products[2][1:3] == ((1, cols, rows), (1, rows, rows))      # X B
    assert launches[-1]["args"][5] == np.float32(math.sqrt(cols / rows))
    with pytest.raises(ValueError, match="^workspace: 8 bfloat16 elements, need"):
        muon.muon_update(param, buf, grad, lr=0.02, workspace=fake((8,), BF16), scratch=fake((L * 15,)))
    with pytest.raises(ValueError, match="^momentum: dtype bfloat16"):
        muon.muon_update(param, grad, grad, lr=0.02)
    with pytest.raises(ValueError, match=r"^param: shape \(7,\), expected \(..., rows, cols\)"):
        muon.muon_update(fake((7,)), fake((7,)), fake((7,)), lr=0.02)


def test_encoder_launchers(launches, monkeypatch):
    from llmpy.gpu import encoder
    B, T, C, Vp, maxT = 2, 5, 24, 40, 8
    out, wte, wpe = fake((B, T, C), BF16), fake((Vp, C), BF16), fake((maxT, C), BF16)
    inp = fake((B, T), np.int32)
    encoder.encoder_forward(out, inp, wte, wpe)
    assert launches[-1]["grid"] == (1,) and launches[-1]["args"][-3:] == (B * T, T, C)

    tokens = np.array([[3, 1, 3, 0, 3], [1, 1, 7, 3, 0]], dtype=np.int32)
    monkeypatch.setattr(encoder, "_upload", lambda buckets, workspace: fake(buckets.shape, np.int32))
    encoder.encoder_backward(wte, wpe, out, inp, seed=2**32 + 7, inp_host=tokens)
    wpe_call, wte_call = launches[-2:]
    assert wpe_call["name"] == "encoder_backward_wpe_kernel<__nv_bfloat16>"
    assert wpe_call["args"][-1] == np.uint32(7) and wpe_call["args"][-1].dtype == np.uint32
    assert wte_call["grid"] == (4, 1) and wte_call["block"] == (32, encoder.WTE_WARPS)   # tokens 3, 1, 0, 7
    assert wte_call["args"][3] == 4
    with pytest.raises(ValueError, match="token ids"):
        encoder.encoder_backward(wte, wpe, out, inp, inp_host=tokens + Vp)
    with pytest.raises(ValueError, match="^C = 20 must be a multiple of 8"):
        encoder.encoder_forward(fake((B, T, 20), BF16), inp, fake((Vp, 20), BF16), fake((maxT, 20), BF16))
    with pytest.raises(ValueError, match="exceeds wpe"):
        encoder.encoder_forward(fake((B, 9, C), BF16), fake((B, 9), np.int32), wte, wpe)
    with pytest.raises(ValueError, match="^inp: dtype"):
        encoder.encoder_forward(out, fake((B, T), np.int64), wte, wpe)


def test_wte_buckets_group_positions_by_token():
    from llmpy.gpu.encoder import wte_buckets
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 13, size=(4, 9)).astype(np.int32)
    buckets, nb = wte_buckets(tokens, 13)
    assert buckets.dtype == np.int32 and buckets.size == 2 * nb + 1 + tokens.size
    tok, starts, pos = buckets[:nb], buckets[nb:2 * nb + 1], buckets[2 * nb + 1:]
    sizes = np.diff(starts)
    assert starts[0] == 0 and starts[-1] == tokens.size and np.all(sizes[:-1] >= sizes[1:])
    assert sorted(tok) == sorted(set(tokens.ravel()))
    for i in range(nb):
        run = pos[starts[i]:starts[i + 1]]
        assert np.all(np.diff(run) > 0) and np.all(tokens.ravel()[run] == tok[i])
    # replaying the list is the scatter-add
    dout, dwte = rng.standard_normal((tokens.size, 3)), np.zeros((13, 3))
    for i in range(nb):
        dwte[tok[i]] += dout[pos[starts[i]:starts[i + 1]]].sum(axis=0)
    expected = np.zeros((13, 3))
    np.add.at(expected, tokens.ravel(), dout)
    np.testing.assert_allclose(dwte, expected, atol=1e-12)
    # the worst case (every token different) fills the workspace the engine plans exactly
    from llmpy.gpu.encoder import workspace_size
    assert wte_buckets(np.arange(36, dtype=np.int32).reshape(4, 9), 40)[0].size == workspace_size(4, 9)


def test_layernorm_launchers(launches):
    from llmpy.gpu import layernorm as ln
    B, T, C = 3, 7, 40
    x, out = fake((B, T, C), BF16), fake((B, T, C), BF16)
    w, b = fake((C,), BF16), fake((C,), BF16)
    mean, rstd = fake((B, T)), fake((B, T))
    ln.layernorm_forward(out, mean, rstd, x, w, b)
    assert launches[-1]["grid"] == (3,) and launches[-1]["args"][-2:] == (21, 40)   # 21 rows, 8 per block
    ln.fused_residual_forward(fake((B, T, C), BF16), out, mean, rstd, x, fake((B, T, C), BF16), w, b)
    assert launches[-1]["name"] == "fused_residual_forward_kernel<__nv_bfloat16>"

    assert ln.backward_blocks(21) == 3 and ln.backward_blocks(4 * 1024 * 64) == ln.BACKWARD_MAX_BLOCKS
    need = ln.backward_scratch_size(21, C)
    assert need == 3 * 2 * C
    ln.layernorm_backward(fake((B, T, C), BF16), fake((C,), BF16), fake((C,), BF16), out, x, w, mean, rstd,
                          scratch=fake((need,)))
    main, fold = launches[-2:]
    assert main["grid"] == (3,) and main["shared_mem"] == 8 * 2 * C * 4      # per warp: dweight, dbias
    assert fold["grid"] == (K.ceil_div(2 * C, 32),) and fold["block"] == (32, ln.FOLD_WARPS)
    assert fold["args"][-2:] == (3, C)
    with pytest.raises(ValueError, match="^C = 8192: the backward keeps 8 warps x 2C fp32 sums"):   # 512 KiB
        big = fake((2, 8192), BF16)
        ln.layernorm_backward(big, fake((8192,), BF16), fake((8192,), BF16), big, big, fake((8192,), BF16),
                              fake((2,)), fake((2,)))
    with pytest.raises(ValueError, match="^scratch: 10 float32 elements, need 240"):
        ln.layernorm_backward(fake((B, T, C), BF16), fake((C,), BF16), fake((C,), BF16), out, x, w, mean,
                              rstd, scratch=fake((10,)))
    with pytest.raises(ValueError, match="^mean: dtype bfloat16"):
        ln.layernorm_forward(out, fake((B, T), BF16), rstd, x, w, b)
    with pytest.raises(ValueError, match=r"^rstd: shape \(3, 8\)"):
        ln.layernorm_forward(out, mean, fake((B, 8)), x, w, b)
    with pytest.raises(ValueError, match=r"^weight: shape \(41,\)"):
        ln.layernorm_forward(out, mean, rstd, x, fake((41,), BF16), b)
    with pytest.raises(ValueError, match="^C = 36 must be a multiple of 8"):
        ln.layernorm_forward(fake((2, 36), BF16), fake((2,)), fake((2,)), fake((2, 36), BF16),
                             fake((36,), BF16), fake((36,), BF16))


def test_attention_launchers(launches, monkeypatch):
    import llmpy.gpu.matmul
    from llmpy.gpu import attention
    products = []
    monkeypatch.setattr(llmpy.gpu.matmul, "batched_matmul",
                        lambda out, a, b, **kw: products.append((out.shape, a.shape, b.shape, kw)))
    B, T, NH, HS = 2, 40, 3, 16
    C = NH * HS
    inp, qkvr, att, out = (fake((B, T, 3 * C), BF16), fake((3, B, NH, T, HS), BF16),
                           fake((B, NH, T, T), BF16), fake((B, T, C), BF16))
    attention.attention_forward(out, qkvr, att, inp)
    assert [c["name"].split("<")[0] for c in launches] == ["permute_kernel", "softmax_forward128_kernel",
                                                          "unpermute_kernel"]  # T = 40: whole chunks of 8
    softmax = launches[1]
    assert softmax["grid"] == (K.ceil_div(B * NH * T, 8),)
    assert softmax["args"][2].dtype == np.float32 and softmax["args"][2] == np.float32(0.25)
    assert products == [((B * NH, T, T), (B * NH, T, HS), (B * NH, T, HS), dict(transa=False, transb=True)),
                        ((B * NH, T, HS), (B * NH, T, T), (B * NH, T, HS), dict(transa=False, transb=False))]
    assert launches[0]["grid"] == (K.ceil_div(B * T * C, 256),)
    assert softmax["args"][0] is softmax["args"][1] is att and softmax["args"][-1] == np.int32(1)  # zeros too

    # with a preatt scratch, q k^T lands there and the softmax writes only att's causal part
    launches.clear()
    products.clear()
    preatt = fake(att.shape, BF16)
    attention.attention_forward(out, qkvr, att, inp, preatt=preatt)
    softmax = launches[1]
    assert softmax["args"][0] is att and softmax["args"][1] is preatt and softmax["args"][-1] == np.int32(0)
    assert products[0][0] == (B * NH, T, T)
    with pytest.raises(ValueError, match=r"^preatt: shape \(2, 3, 40, 39\)"):
        attention.attention_forward(out, qkvr, att, inp, preatt=fake((B, NH, T, T - 1), BF16))

    launches.clear()
    products.clear()
    dinp, dqkvr, datt, scratch = (fake(inp.shape, BF16), fake(qkvr.shape, BF16), fake(att.shape, BF16),
                                  fake((B, NH, T, HS), BF16))
    attention.attention_backward(dinp, dqkvr, datt, scratch, out, qkvr, att)
    assert [c["name"].split("<")[0] for c in launches] == ["unpermute_backward_kernel",
                                                          "softmax_backward128_kernel", "permute_backward_kernel"]
    assert [(p[3]["transa"], p[3]["transb"]) for p in products] == [(False, True), (True, False),
                                                                    (False, False), (True, False)]
    with pytest.raises(ValueError, match=r"^att: shape \(2, 3, 40, 41\)"):
        attention.attention_forward(out, qkvr, fake((B, NH, T, T + 1), BF16), inp)
    with pytest.raises(ValueError, match=r"^inp: shape"):
        attention.attention_forward(out, qkvr, att, fake((B, T, 3 * C + 8), BF16))
    with pytest.raises(ValueError, match="^scratch: dtype float32"):
        attention.attention_backward(dinp, dqkvr, datt, fake((B, NH, T, HS)), out, qkvr, att)
    # rows that are not whole 16-byte chunks (bf16 T = 13; float T = 6) take the per-column kernels
    assert attention.softmax_kernel_name("softmax_forward_kernel", BF16, 13) == \
        "softmax_forward_kernel<__nv_bfloat16>"
    assert attention.softmax_kernel_name("softmax_backward_kernel", np.float32, 6) == "softmax_backward_kernel<float>"
    assert attention.softmax_kernel_name("softmax_backward_kernel", np.float32, 12) == \
        "softmax_backward128_kernel<float>"


def test_flash_attention_launchers(launches):
    from llmpy.gpu import flash_attention as fa
    B, T, NH = 3, 100, 2
    C = NH * 64
    qkv, out, lse = fake((B, T, 3 * C), BF16), fake((B, T, C), BF16), fake((B, NH, T))
    fa.flash_attention_forward(out, lse, qkv)
    (fwd,) = launches
    assert (fwd["name"], fwd["grid"], fwd["block"]) == ("flash_attention_forward_kernel<4, false, false>", (2, B * NH),
                                                        (128,))
    assert fwd["shared_mem"] == 5 * 64 * 72 * 2 == 46080        # Q, and K and V twice (double buffered)
    assert [a.dtype for a in fwd["args"][3:]] == [np.int32] * 4 + [np.float32] and fwd["args"][7] == np.float32(0.125)
    assert fwd["args"][5:7] == (NH, NH)                           # GPT-2: as many kv heads as query heads

    launches.clear()
    dqkv, dout, delta = fake(qkv.shape, BF16), fake(out.shape, BF16), fake(lse.shape)
    fa.flash_attention_backward(dqkv, delta, dout, qkv, out, lse)
    assert [(c["name"], c["grid"], c["shared_mem"]) for c in launches] == [
        ("flash_attention_delta_kernel", (K.ceil_div(B * T * NH, 256),), 0),
        ("flash_attention_backward_dkdv_kernel", (2, B * NH), 6 * 64 * 72 * 2 + 4 * 64 * 4),   # + lse, delta x2
        ("flash_attention_backward_dq_kernel<4, false, false>", (2, B * NH), 6 * 64 * 72 * 2)]
    assert all(c["shared_mem"] <= 227 * 1024 for c in launches)        # what an sm_90 block may opt into

    # tile=128: 8 warps own 128 query rows (one block for T = 100); the walked tiles and dk/dv stay 64 rows
    launches.clear()
    fa.flash_attention_forward(out, lse, qkv, tile=128)
    fa.flash_attention_backward(dqkv, delta, dout, qkv, out, lse, tile=128)
    assert [(c["name"], c["grid"], c["block"], c["shared_mem"]) for c in launches] == [
        ("flash_attention_forward_kernel<8, true, false>", (1, B * NH), (256,), 6 * 64 * 72 * 2),     # Q Q | K K | V V
        ("flash_attention_delta_kernel", (K.ceil_div(B * T * NH, 256),), (256,), 0),
        ("flash_attention_backward_dkdv_kernel", (2, B * NH), (128,), 6 * 64 * 72 * 2 + 4 * 64 * 4),
        ("flash_attention_backward_dq_kernel<8, true, false>", (1, B * NH), (256,), 8 * 64 * 72 * 2)]
    with pytest.raises(ValueError, match=r"^tile: 32, expected one of \[64, 128\]"):
        fa.flash_attention_forward(out, lse, qkv, tile=32)

    # grouped-query (NKV = 1 of NH = 2): packed rows of (2 + 2) heads; dk/dv blocks per (b, kv head)
    launches.clear()
    gqkv = fake((B, T, 4 * 64), BF16)
    fa.flash_attention_forward(out, lse, gqkv, n_kv_head=1)
    fa.flash_attention_backward(fake(gqkv.shape, BF16), delta, dout, gqkv, out, lse, n_kv_head=1)
    assert [(c["name"], c["grid"], c["args"][-2]) for c in launches[::2]] == [
        ("flash_attention_forward_kernel<4, false, true>", (2, B * NH), 1),
        ("flash_attention_backward_dkdv_kernel", (2, B), 1)]
    assert launches[-1]["grid"] == (2, B * NH)
    with pytest.raises(ValueError, match=r"^n_kv_head = 3 must divide the 2 heads"):
        fa.flash_attention_forward(out, lse, gqkv, n_kv_head=3)
    with pytest.raises(ValueError, match=r"^inp: shape \(3, 100, 384\) with 2 heads .* and 1 kv heads"):
        fa.flash_attention_forward(out, lse, qkv, n_kv_head=1)
    launches.clear()
    q, kv = fake((B, T, NH, 64), BF16), fake((B, T, 1, 64), BF16)
    fa.gqa_flash_attention_backward(fake(q.shape, BF16), fake(kv.shape, BF16), fake(kv.shape, BF16), delta, q, q,
                                    kv, kv, q, lse, workspace=fake((2 * B * T * 4 * 64,), BF16))
    assert [c["name"].split("<")[0] for c in launches] == [
        "qkv_pack_kernel", "flash_attention_delta_kernel", "flash_attention_backward_dkdv_kernel",
        "flash_attention_backward_dq_kernel", "qkv_unpack_kernel"]
    assert launches[0]["args"][-3:] == (B * T, NH * 64, 64)

    assert fa.supports(BF16, 64) and not fa.supports(np.float32, 64) and not fa.supports(BF16, 32)
    with pytest.raises(ValueError, match=r"^inp: dtype float32, expected bfloat16"):
        fa.flash_attention_forward(out, lse, fake(qkv.shape))
    with pytest.raises(ValueError, match=r"^inp: shape \(3, 100, 192\) with 2 heads .*head size 64"):
        fa.flash_attention_forward(out, lse, fake((B, T, 3 * 32 * NH), BF16))
    with pytest.raises(ValueError, match=r"^lse: shape \(3, 2, 99\)"):
        fa.flash_attention_forward(out, fake((B, NH, T - 1)), qkv)
    with pytest.raises(ValueError, match=r"^dout: shape"):
        fa.flash_attention_backward(dqkv, delta, fake((B, T, 3 * C), BF16), qkv, out, lse)
    with pytest.raises(ValueError, match=r"^delta: dtype bfloat16"):
        fa.flash_attention_backward(dqkv, fake(lse.shape, BF16), dout, qkv, out, lse)


def test_classifier_launcher(launches):
    from llmpy.gpu import classifier
    B, T, Vp = 2, 3, 64
    logits, losses, targets = fake((B, T, Vp), BF16), fake((B, T)), fake((B, T), np.int32)
    classifier.fused_classifier(logits, losses, logits, targets, 1 / 6, 57)
    call = launches[-1]
    assert call["grid"] == (6,) and call["block"] == (1024,)
    assert call["args"][4].dtype == np.float32 and call["args"][-4:] == (6, 57, 64, 0.0)
    assert call["args"][-1].dtype == np.float32                         # softcap, off
    classifier.fused_classifier(logits, losses, logits, targets, 1 / 6, 57, softcap=15)
    assert launches[-1]["args"][-1] == np.float32(15.0) and launches[-1]["args"][-1].dtype == np.float32
    with pytest.raises(ValueError, match="softcap = -1"):
        classifier.fused_classifier(logits, losses, logits, targets, 1 / 6, 57, softcap=-1)
    classifier.fused_classifier(None, losses, logits, targets, 1.0, 64)
    assert launches[-1]["args"][0] is K.NULL
    with pytest.raises(ValueError, match="V = 65"):
        classifier.fused_classifier(None, losses, logits, targets, 1.0, 65)
    with pytest.raises(ValueError, match="^losses: dtype bfloat16"):
        classifier.fused_classifier(None, fake((B, T), BF16), logits, targets, 1.0, 60)
    with pytest.raises(ValueError, match="^Vp = 60 must be a multiple of 8"):
        classifier.fused_classifier(None, losses, fake((B, T, 60), BF16), targets, 1.0, 60)
    big = fake((64, 1024, 50304), BF16)                    # 3.3e9 elements: allowed, rows use size_t
    classifier.fused_classifier(big, fake((64, 1024)), big, fake((64, 1024), np.int32), 1.0, 50257)


def test_adamw_launchers(launches):
    from llmpy.gpu import adamw
    L, n = 3, 1000
    param, grad = fake((L, n), BF16), fake((L, n), BF16)
    m, v, master = fake((L, n)), fake((L, n)), fake((L, n))
    adamw.adamw_update(param, m, v, grad, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                       t=2, master=master, seed=5, num_slices=L)
    call = launches[-1]
    assert call["grid"] == (2, 3) and call["block"] == (512,)
    a = call["args"]
    assert a[5] == n and all(x.dtype == np.int64 and x == n for x in a[6:9])
    np.testing.assert_allclose([a[12], a[13]], [1 - 0.9**2, 1 - 0.95**2], rtol=1e-6)   # bias corrections
    assert all(x.dtype == np.float32 for x in a[9:17])
    assert a[-3] == 5 and a[-2] is K.NULL and a[-1] is K.NULL
    np.testing.assert_allclose(adamw.step_scalars(lr=0.1, beta1=0.9, beta2=0.99, t=3, grad_scale=0.5),
                               [0.1, 0.5, 1 - 0.9**3, 1 - 0.99**3], rtol=1e-6)
    adamw.adamw_update(param, m, v, grad, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                       t=2, scalars=fake((4,)), seed_ptr=fake((1,), np.uint32))
    assert launches[-1]["grid"] == (6, 1) and launches[-1]["args"][1] is K.NULL
    adamw.init_from_master(param, master, seed=5, num_slices=L)
    assert launches[-1]["grid"] == (2, 3) and launches[-1]["name"] == "init_from_master_kernel<__nv_bfloat16>"
    with pytest.raises(ValueError, match="num_slices = 7"):
        adamw.adamw_grid(3000, 7, 512)
    with pytest.raises(ValueError, match="^m: dtype bfloat16"):
        adamw.adamw_update(param, grad, v, grad, lr=1, beta1=0.9, beta2=0.9, eps=1e-8, weight_decay=0, t=1)
    with pytest.raises(ValueError, match="1-based"):
        adamw.adamw_update(param, m, v, grad, lr=1, beta1=0.9, beta2=0.9, eps=1e-8, weight_decay=0, t=0)
    with pytest.raises(ValueError, match=r"^scalars: shape \(3,\)"):
        adamw.adamw_update(param, m, v, grad, lr=1, beta1=0.9, beta2=0.9, eps=1e-8, weight_decay=0, t=1,
                           scalars=fake((3,)))


def test_reduction_launchers(launches):
    from llmpy.gpu import bias, cast, global_norm
    assert global_norm.norm_blocks(10) == 1 and global_norm.norm_blocks(124_475_904) == 1024
    global_norm.global_norm_squared(fake((1,)), fake((1000, 7), BF16), scratch=fake((1024,)))
    stage1, stage2 = launches[-2:]
    assert stage1["grid"] == (14,) and stage1["args"][2].dtype == np.int64
    assert stage2["name"] == "global_norm_finish_kernel" and stage2["args"][-1] == 14
    with pytest.raises(ValueError, match="^scratch: 3 float32 elements, need 14"):
        global_norm.global_norm_squared(fake((1,)), fake((1000, 7), BF16), scratch=fake((3,)))

    assert bias.bias_grid(256, 768, BF16) == (3, 8)       # 256 rows / (8 warps x 4 rows)
    assert bias.bias_grid(65536, 768, BF16) == (3, 170)   # 512 // 3 blocks high
    assert bias.bias_grid(5, 40, BF16) == (1, 1) and bias.scratch_size(5, 40, BF16) == 0
    bias.matmul_bias_backward(fake((40,), BF16), fake((5, 40), BF16))
    assert launches[-1]["name"] == "bias_backward_kernel<__nv_bfloat16>" and launches[-1]["args"][1] is K.NULL
    bias.matmul_bias_backward(fake((768,)), fake((4, 64, 768)), scratch=fake((8 * 768,)))
    main, fold = launches[-2:]
    assert main["grid"] == (6, 8) and main["block"] == (32, 8) and fold["args"][-2:] == (8, 768)
    with pytest.raises(ValueError, match=r"^dbias: shape \(40,\)"):
        bias.matmul_bias_backward(fake((40,), BF16), fake((5, 48), BF16))

    cast.copy_and_cast(fake((10, 3)), fake((10, 3), BF16))
    assert launches[-1]["name"] == "copy_and_cast_kernel<float, __nv_bfloat16>"
    cast.init_master(fake((7,)), fake((7,), BF16))
    with pytest.raises(ValueError, match="^master: dtype bfloat16"):
        cast.init_master(fake((7,), BF16), fake((7,), BF16))
