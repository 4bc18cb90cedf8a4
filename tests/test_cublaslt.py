"""Tests for llmpy/gpu/cublaslt.py, the thin device part under llmpy/gpu/matmul.py, without a GPU.

1. A recording stand-in for `nvmath.bindings.cublasLt` (FakeLt) checks what the ops ask of cuBLASLt:
   which pointer goes in which operand slot, the descriptor attributes (transposes, epilogue, bias and
   aux pointers, batch strides), alpha/beta, the workspace, and that descriptors and the heuristic are
   built once per shape and never during graph capture. The arrays are CuPy arrays over made-up device
   addresses: nothing is dereferenced.
2. With nvmath-python and libcublasLt (the nvidia-cublas wheel), the real library accepts the descriptors
   and layouts and reads back what was set, and the heuristic and matmul calls, with llmpy's argument
   lists, pass the bindings and reach cuBLASLt. No GPU is needed; without a driver these run in a child
   process with a stub libcuda.so.1 (see below).
"""
import ctypes
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from llmpy.gpu import cublaslt, matmul

cp = pytest.importorskip("cupy")

BASE = 0x7F0000000000  # made-up device addresses for the fake arrays


def fake_device_array(shape, dtype=np.float32, address=BASE):
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    mem = cp.cuda.UnownedMemory(address, max(nbytes, 1), None, 0)
    return cp.ndarray(shape, dtype, memptr=cp.cuda.MemoryPointer(mem, 0))


class _Arrays:
    """Hands out fake arrays at distinct, 256-byte-aligned addresses."""

    def __init__(self):
        self.next = BASE

    def __call__(self, shape, dtype=np.float32):
        arr = fake_device_array(shape, dtype, self.next)
        self.next += (arr.nbytes + 4095) // 4096 * 4096 + 4096
        return arr


def _value(buf: int, size: int) -> int:
    return int.from_bytes(ctypes.string_at(buf, size), "little", signed=True)


class FakeLt:
    """Records the calls CublasLt makes; object handles are increasing integers."""

    class MatmulDescAttribute:
        TRANSA, TRANSB, EPILOGUE, BIAS_POINTER = 3, 4, 7, 8
        EPILOGUE_AUX_POINTER, EPILOGUE_AUX_LD, BIAS_DATA_TYPE = 11, 12, 26

    class MatrixLayoutAttribute:
        BATCH_COUNT, STRIDED_BATCH_OFFSET = 5, 6

    class MatmulPreferenceAttribute:
        MAX_WORKSPACE_BYTES, REDUCTION_SCHEME_MASK = 1, 3
        MIN_ALIGNMENT_A_BYTES, MIN_ALIGNMENT_B_BYTES, MIN_ALIGNMENT_C_BYTES, MIN_ALIGNMENT_D_BYTES = 5, 6, 7, 8

    class MatmulHeuristicResult:
        def __init__(self, n):
            self.ptr = 0xA160

    def __init__(self, algorithms=1, restricted_algorithms=None):
        self.algorithms = algorithms      # what the heuristic finds; with split-K reductions restricted:
        self.restricted_algorithms = restricted_algorithms   # None: the same
        self.ids = 100
        self.live: dict[int, str] = {}
        self.attrs: dict[int, dict] = {}
        self.info: dict[int, tuple] = {}
        self.heuristic_calls, self.matmuls = [], []

    def _new(self, kind, info=()):
        self.ids += 1
        self.live[self.ids], self.attrs[self.ids], self.info[self.ids] = kind, {}, info
        return self.ids

    def _set(self, obj, attr, buf, size):
        assert obj in self.live
        self.attrs[obj][attr] = _value(buf, size)

    def _destroy(self, obj):
        del self.live[obj]

    create = staticmethod(lambda: 1)
    destroy = staticmethod(lambda handle: None)
    get_matmul_desc_attribute_dtype = get_matrix_layout_attribute_dtype = \
        get_matmul_preference_attribute_dtype = staticmethod(lambda attr: np.int64)

    def matmul_desc_create(self, compute, scale):
        return self._new("desc", (compute, scale))

    def matrix_layout_create(self, data_type, rows, cols, ld):
        return self._new("layout", (data_type, rows, cols, ld))

    def matmul_preference_create(self):
        return self._new("pref")

    matmul_desc_set_attribute = matrix_layout_set_attribute = matmul_preference_set_attribute = _set
    matmul_desc_destroy = matrix_layout_destroy = matmul_preference_destroy = _destroy

    def matmul_algo_get_heuristic(self, handle, desc, a, b, c, d, pref, requested, results, count):
        self.heuristic_calls.append(dict(desc=desc, layouts=(a, b, c, d), pref=dict(self.attrs[pref])))
        mask = self.attrs[pref][self.MatmulPreferenceAttribute.REDUCTION_SCHEME_MASK]
        restricted = mask != cublaslt.REDUCTION_SCHEME_ALL and self.restricted_algorithms is not None
        ctypes.c_int32.from_address(count).value = self.restricted_algorithms if restricted else self.algorithms

    def matmul(self, handle, desc, alpha, a, adesc, b, bdesc, beta, c, cdesc, d, ddesc, algo, ws, ws_bytes,
               stream):
        self.matmuls.append(dict(
            desc=desc, attrs=dict(self.attrs[desc]), compute=self.info[desc][0], a=a, b=b, c=c, d=d,
            layouts={name: (self.info[lay], dict(self.attrs[lay]))
                     for name, lay in (("a", adesc), ("b", bdesc), ("d", ddesc))},
            same_cd=cdesc == ddesc, alpha=ctypes.c_float.from_address(alpha).value,
            beta=ctypes.c_float.from_address(beta).value, algo=algo, ws=ws, ws_bytes=ws_bytes, stream=stream))


class FakeStream:
    ptr = 0x5EED
    capturing = False

    def is_capturing(self):
        return self.capturing


@pytest.fixture
def env(monkeypatch):
    """(fake library, fake stream, handle with a fake 32 MiB workspace, array factory)."""
    lt, stream, arrays = FakeLt(), FakeStream(), _Arrays()
    monkeypatch.setattr(cublaslt, "_load_cublaslt", lambda: lt)
    monkeypatch.setattr(cublaslt, "_current_stream", lambda: stream)
    workspace = arrays((cublaslt.WORKSPACE_BYTES,), np.uint8)
    handle = cublaslt.CublasLt(workspace)
    return types.SimpleNamespace(lt=lt, stream=stream, handle=handle, arrays=arrays, workspace=workspace)


D = FakeLt.MatmulDescAttribute
L = FakeLt.MatrixLayoutAttribute


def test_forward_bias_call(env):
    BT, C, OC = 5, 16, 24
    out, inp, w = env.arrays((BT, OC)), env.arrays((BT, C)), env.arrays((OC, C))
    b1, b2 = env.arrays((OC,)), env.arrays((OC,))
    matmul.matmul_forward(out, inp, w, b1, handle=env.handle)
    matmul.matmul_forward(out, inp, w, b2, handle=env.handle)
    assert len(env.lt.heuristic_calls) == 1  # descriptors and algorithm built once, then reused
    first, second = env.lt.matmuls
    assert (first["a"], first["b"], first["c"], first["d"]) == (w.data.ptr, inp.data.ptr, out.data.ptr,
                                                               out.data.ptr)
    assert first["same_cd"] and first["desc"] == second["desc"]
    assert first["attrs"][D.TRANSA] == cublaslt.OP_T and first["attrs"][D.TRANSB] == cublaslt.OP_N
    assert first["attrs"][D.EPILOGUE] == cublaslt.EPILOGUE_BIAS
    assert first["attrs"][D.BIAS_DATA_TYPE] == cublaslt.CUDA_R_32F
    assert first["attrs"][D.BIAS_POINTER] == b1.data.ptr and second["attrs"][D.BIAS_POINTER] == b2.data.ptr
    assert D.EPILOGUE_AUX_POINTER not in first["attrs"]
    assert first["compute"] == cublaslt.COMPUTE_32F
    assert first["layouts"]["a"][0] == (cublaslt.CUDA_R_32F, C, OC, C)  # W read column-major: (C, OC), ld C
    assert first["layouts"]["b"][0] == (cublaslt.CUDA_R_32F, C, BT, C)
    assert first["layouts"]["d"][0] == (cublaslt.CUDA_R_32F, OC, BT, OC)
    assert (first["alpha"], first["beta"]) == (1.0, 0.0)
    assert (first["ws"], first["ws_bytes"]) == (env.workspace.data.ptr, cublaslt.WORKSPACE_BYTES)
    assert first["stream"] == FakeStream.ptr and first["algo"] == 0xA160
    pref = env.lt.heuristic_calls[0]["pref"]
    assert pref[FakeLt.MatmulPreferenceAttribute.MAX_WORKSPACE_BYTES] == cublaslt.WORKSPACE_BYTES
    assert pref[FakeLt.MatmulPreferenceAttribute.MIN_ALIGNMENT_A_BYTES] == 256
    assert pref[FakeLt.MatmulPreferenceAttribute.REDUCTION_SCHEME_MASK] == cublaslt.REDUCTION_SCHEME_INPLACE
    assert set(env.lt.live.values()) == {"desc", "layout"}  # the preference was destroyed


def test_unrestricted_reductions_only_when_the_mask_finds_nothing(env, monkeypatch):
    """No algorithm under the reduction-scheme mask: the heuristic runs again with every scheme allowed,
    and a warning says so (a graph replay may then differ from eager in the last bits)."""
    lt = FakeLt(restricted_algorithms=0)
    monkeypatch.setattr(cublaslt, "_load_cublaslt", lambda: lt)
    handle = cublaslt.CublasLt(env.arrays((cublaslt.WORKSPACE_BYTES,), np.uint8))
    out, inp, w = env.arrays((5, 24)), env.arrays((5, 16)), env.arrays((24, 16))
    with pytest.warns(RuntimeWarning, match="split-K reductions limited to mask 1"):
        matmul.matmul_forward(out, inp, w, None, handle=handle)
    masks = [c["pref"][FakeLt.MatmulPreferenceAttribute.REDUCTION_SCHEME_MASK] for c in lt.heuristic_calls]
    assert masks == [cublaslt.REDUCTION_SCHEME_INPLACE, cublaslt.REDUCTION_SCHEME_ALL] and len(lt.matmuls) == 1
    assert set(lt.live.values()) == {"desc", "layout"}      # both preferences destroyed


def test_forward_gelu_sets_aux(env):
    import ml_dtypes
    bf16 = ml_dtypes.bfloat16
    BT, C, OC = 5, 16, 24
    out, inp, w, b = env.arrays((BT, OC), bf16), env.arrays((BT, C), bf16), env.arrays((OC, C), bf16), \
        env.arrays((OC,), bf16)
    aux = env.arrays((BT, OC), bf16)
    matmul.matmul_forward(out, inp, w, b, gelu_aux=aux, handle=env.handle)
    call = env.lt.matmuls[0]
    assert call["attrs"][D.EPILOGUE] == cublaslt.EPILOGUE_GELU_AUX_BIAS
    assert call["attrs"][D.EPILOGUE_AUX_POINTER] == aux.data.ptr and call["attrs"][D.EPILOGUE_AUX_LD] == OC
    assert call["attrs"][D.BIAS_DATA_TYPE] == cublaslt.CUDA_R_16BF
    assert call["layouts"]["a"][0][0] == cublaslt.CUDA_R_16BF


def test_backward_products_and_order(env, monkeypatch):
    BT, C, OC = 5, 16, 24
    a = env.arrays
    dinp, dweight, dbias, dout, inp, w = a((BT, C)), a((OC, C)), a((OC,)), a((BT, OC)), a((BT, C)), a((OC, C))
    pre = a((BT, C))
    order = []
    bias_module = types.ModuleType("llmpy.gpu.bias")
    bias_module.matmul_bias_backward = lambda db, g: order.append(("bias", db.data.ptr, g.data.ptr))
    monkeypatch.setitem(sys.modules, "llmpy.gpu.bias", bias_module)
    real_matmul = env.lt.matmul
    monkeypatch.setattr(env.lt, "matmul", lambda *args: (order.append(("matmul",)), real_matmul(*args)))
    matmul.matmul_backward(dinp, dweight, dbias, dout, inp, w, gelu_aux=pre, handle=env.handle)
    assert order == [("bias", dbias.data.ptr, dout.data.ptr), ("matmul",), ("matmul",)]
    d_inp, d_w = env.lt.matmuls
    # dinp = dout @ W, overwrite, DGELU with the pre-activation as aux (leading dimension C)
    assert (d_inp["a"], d_inp["b"], d_inp["d"]) == (w.data.ptr, dout.data.ptr, dinp.data.ptr)
    assert (d_inp["attrs"][D.TRANSA], d_inp["attrs"][D.TRANSB]) == (cublaslt.OP_N, cublaslt.OP_N)
    assert d_inp["attrs"][D.EPILOGUE] == cublaslt.EPILOGUE_DGELU and d_inp["beta"] == 0.0
    assert d_inp["attrs"][D.EPILOGUE_AUX_POINTER] == pre.data.ptr and d_inp["attrs"][D.EPILOGUE_AUX_LD] == C
    # dweight += dout^T @ inp: beta = 1
    assert (d_w["a"], d_w["b"], d_w["d"]) == (inp.data.ptr, dout.data.ptr, dweight.data.ptr)
    assert (d_w["attrs"][D.TRANSA], d_w["attrs"][D.TRANSB]) == (cublaslt.OP_N, cublaslt.OP_T)
    assert d_w["attrs"][D.EPILOGUE] == cublaslt.EPILOGUE_DEFAULT and d_w["beta"] == 1.0


def test_batched_sets_batch_layouts(env):
    B, NH, T, HS = 2, 3, 8, 16
    q, k, att = env.arrays((B, NH, T, HS)), env.arrays((B, NH, T, HS)), env.arrays((B, NH, T, T))
    matmul.batched_matmul(att, q, k, transa=False, transb=True, alpha=0.125, handle=env.handle)
    call = env.lt.matmuls[0]
    assert (call["a"], call["b"], call["d"]) == (k.data.ptr, q.data.ptr, att.data.ptr)
    assert call["alpha"] == 0.125 and call["beta"] == 0.0
    assert call["attrs"][D.TRANSA] == cublaslt.OP_T and call["attrs"][D.TRANSB] == cublaslt.OP_N
    for name, stride in (("a", T * HS), ("b", T * HS), ("d", T * T)):
        attrs = call["layouts"][name][1]
        assert attrs == {L.BATCH_COUNT: B * NH, L.STRIDED_BATCH_OFFSET: stride}, name


def test_new_shape_during_capture_is_refused(env):
    out, inp, w = env.arrays((5, 24)), env.arrays((5, 16)), env.arrays((24, 16))
    matmul.matmul_forward(out, inp, w, None, handle=env.handle)
    env.stream.capturing = True
    matmul.matmul_forward(out, inp, w, None, handle=env.handle)  # cached: fine while capturing
    with pytest.raises(RuntimeError, match="warm-up"):
        matmul.matmul_forward(env.arrays((6, 24)), env.arrays((6, 16)), w, None, handle=env.handle)
    assert len(env.lt.matmuls) == 2


def test_tf32_selects_the_compute_type(env):
    import ml_dtypes
    out, inp, w = env.arrays((5, 24)), env.arrays((5, 16)), env.arrays((24, 16))
    env.handle.tf32 = True
    matmul.matmul_forward(out, inp, w, None, handle=env.handle)
    bf = [env.arrays(s, ml_dtypes.bfloat16) for s in ((5, 24), (5, 16), (24, 16))]
    matmul.matmul_forward(*bf, None, handle=env.handle)
    assert [m["compute"] for m in env.lt.matmuls] == [cublaslt.COMPUTE_32F_FAST_TF32, cublaslt.COMPUTE_32F]


def test_no_algorithm_raises_and_frees(env):
    env.lt.algorithms = 0
    with pytest.raises(RuntimeError, match="no algorithm"):
        matmul.matmul_forward(env.arrays((5, 24)), env.arrays((5, 16)), env.arrays((24, 16)), None,
                              handle=env.handle)
    assert env.lt.live == {} and env.lt.matmuls == []


def test_close_and_set_workspace_free_descriptors(env):
    out, inp, w = env.arrays((5, 24)), env.arrays((5, 16)), env.arrays((24, 16))
    matmul.matmul_forward(out, inp, w, None, handle=env.handle)
    assert env.lt.live
    env.handle.set_workspace(env.arrays((1 << 20,), np.uint8))  # new size: algorithms re-chosen
    assert env.lt.live == {}
    matmul.matmul_forward(out, inp, w, None, handle=env.handle)
    assert env.lt.matmuls[-1]["ws_bytes"] == 1 << 20 and len(env.lt.heuristic_calls) == 2
    env.handle.close()
    assert env.lt.live == {} and env.handle.handle == 0


# -------------------------------------------------------------------------------------------------
# The real library. Descriptors and layouts are host objects: they need libcublasLt, not a GPU. nvmath
# only asks the driver (libcuda.so.1) for its CUDA version, to pick the library's major version. Without a
# driver, these tests run again in a child process whose libcuda.so.1 is a stub that answers only that
# question (built here with gcc), so CI checks llmpy's calls against the real bindings and library.

_STUB_DRIVER_ENV = "LLMPY_TEST_STUB_LIBCUDA"
_STUB_DRIVER_SOURCE = "int cuDriverGetVersion(int *version) { *version = 13000; return 0; }\n"


def _load_real_cublaslt():
    """nvmath's cuBLASLt bindings with the library loaded, or None when only the driver is missing."""
    try:
        from nvmath.bindings import cublasLt as lt
    except ImportError as e:
        pytest.skip(f"nvmath-python is needed: {e}")
    try:
        lt.get_version()  # loads libcublasLt
    except Exception as e:
        if "libcuda" not in str(e) or os.environ.get(_STUB_DRIVER_ENV):
            pytest.skip(f"libcublasLt does not load: {e}")
        return None
    return lt


@pytest.fixture(scope="module")
def stub_driver_run(request, tmp_path_factory):
    """Output of this module's real-library tests, run in a child process with the stub libcuda.so.1."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no driver, and no C compiler to build the stub libcuda.so.1")
    stub_dir = tmp_path_factory.mktemp("stub_libcuda")
    (stub_dir / "stub.c").write_text(_STUB_DRIVER_SOURCE)
    subprocess.run([gcc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(stub_dir / "libcuda.so.1"),
                    str(stub_dir / "stub.c")], check=True)
    env = dict(os.environ, **{_STUB_DRIVER_ENV: "1"})
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(stub_dir), env.get("LD_LIBRARY_PATH")]))
    module = Path(__file__).resolve().relative_to(request.config.rootpath).as_posix()
    tests = [f"{module}::{name}" for name in ("test_real_descriptors_read_back", "test_calls_reach_the_real_library")]
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *tests],
                           cwd=request.config.rootpath, env=env, capture_output=True, text=True, timeout=300)
    return child.stdout + child.stderr


@pytest.fixture
def real_lt(request):
    """The real bindings; None when this test already ran (and passed) in the stub-driver child."""
    lt = _load_real_cublaslt()
    if lt is not None:
        return lt
    output = request.getfixturevalue("stub_driver_run")
    if f"PASSED {request.node.nodeid}" not in output.splitlines():
        pytest.fail(f"{request.node.nodeid} did not pass with the stub libcuda.so.1:\n{output[-4000:]}")
    return None

def _get(getter, obj, attr, dtype):
    buf, written = np.zeros(1, dtype), np.zeros(1, np.uint64)
    getter(obj, attr, buf.ctypes.data, buf.itemsize, written.ctypes.data)
    assert written[0] == buf.itemsize
    return int(buf[0])


@pytest.mark.parametrize("case", ["forward_bias", "forward_gelu", "dinp_dgelu", "batched"])
def test_real_descriptors_read_back(case, real_lt):
    lt = real_lt
    if lt is None:
        return  # passed in the stub-driver child (the fixture checked)
    plans = {
        "forward_bias": (matmul.gemm_plan_forward((64, 2304), (64, 768), (2304, 768)), matmul.EPILOGUE_BIAS, True),
        "forward_gelu": (matmul.gemm_plan_forward((64, 3072), (64, 768), (3072, 768)),
                         matmul.EPILOGUE_GELU_AUX_BIAS, True),
        "dinp_dgelu": (matmul.gemm_plan_dinp((64, 3072), (64, 768), (768, 3072)), matmul.EPILOGUE_DGELU, False),
        "batched": (matmul.gemm_plan_batched((4, 12, 64, 64), (4, 12, 64, 64), (4, 12, 64, 64), transb=True),
                    matmul.EPILOGUE_DEFAULT, False),
    }
    plan, epilogue, has_bias = plans[case]
    entry = cublaslt._Entry(lt, plan, cublaslt.CUDA_R_16BF, cublaslt.COMPUTE_32F, epilogue, has_bias)
    try:
        entry.set_pointers(0x7F0000001000, 0x7F0000002000)
        A = lt.MatmulDescAttribute
        get_desc = lt.matmul_desc_get_attribute
        dtype_of = lt.get_matmul_desc_attribute_dtype
        assert _get(get_desc, entry.desc, A.TRANSA, dtype_of(A.TRANSA)) == int(plan.transa)
        assert _get(get_desc, entry.desc, A.TRANSB, dtype_of(A.TRANSB)) == int(plan.transb)
        assert _get(get_desc, entry.desc, A.EPILOGUE, dtype_of(A.EPILOGUE)) == epilogue
        if has_bias:
            assert _get(get_desc, entry.desc, A.BIAS_POINTER, dtype_of(A.BIAS_POINTER)) == 0x7F0000001000
            assert _get(get_desc, entry.desc, A.BIAS_DATA_TYPE, dtype_of(A.BIAS_DATA_TYPE)) == cublaslt.CUDA_R_16BF
        if epilogue in cublaslt.AUX_EPILOGUES:
            assert _get(get_desc, entry.desc, A.EPILOGUE_AUX_POINTER, dtype_of(A.EPILOGUE_AUX_POINTER)) == \
                0x7F0000002000
            assert _get(get_desc, entry.desc, A.EPILOGUE_AUX_LD, dtype_of(A.EPILOGUE_AUX_LD)) == plan.ldd
        LA = lt.MatrixLayoutAttribute
        get_lay, lay_dtype = lt.matrix_layout_get_attribute, lt.get_matrix_layout_attribute_dtype
        for layout, (rows, cols, ld), stride in ((entry.a_layout, plan.a_layout, plan.stride_a),
                                                 (entry.b_layout, plan.b_layout, plan.stride_b),
                                                 (entry.d_layout, plan.d_layout, plan.stride_d)):
            got = [_get(get_lay, layout, attr, lay_dtype(attr)) for attr in (LA.TYPE, LA.ROWS, LA.COLS, LA.LD)]
            assert got == [cublaslt.CUDA_R_16BF, rows, cols, ld]
            assert _get(get_lay, layout, LA.BATCH_COUNT, lay_dtype(LA.BATCH_COUNT)) == plan.batch
            if plan.batch > 1:
                assert _get(get_lay, layout, LA.STRIDED_BATCH_OFFSET, lay_dtype(LA.STRIDED_BATCH_OFFSET)) == stride
        # the preference, with the reduction-scheme mask that keeps graph replays bitwise equal to eager
        assert int(lt.ReductionScheme.INPLACE) == cublaslt.REDUCTION_SCHEME_INPLACE
        assert int(lt.ReductionScheme.MASK) == cublaslt.REDUCTION_SCHEME_ALL
        pref = entry.preference(cublaslt.WORKSPACE_BYTES, (256, 16, 64), cublaslt.REDUCTION_SCHEMES)
        try:
            P, get_pref = lt.MatmulPreferenceAttribute, lt.matmul_preference_get_attribute
            pref_dtype = lt.get_matmul_preference_attribute_dtype
            got = {attr: _get(get_pref, pref, attr, pref_dtype(attr)) for attr in (
                P.MAX_WORKSPACE_BYTES, P.REDUCTION_SCHEME_MASK, P.MIN_ALIGNMENT_A_BYTES, P.MIN_ALIGNMENT_B_BYTES,
                P.MIN_ALIGNMENT_C_BYTES, P.MIN_ALIGNMENT_D_BYTES)}
            assert list(got.values()) == [cublaslt.WORKSPACE_BYTES, cublaslt.REDUCTION_SCHEME_INPLACE, 256, 16, 64, 64]
        finally:
            lt.matmul_preference_destroy(pref)
    finally:
        entry.destroy()


NOT_INITIALIZED = 1  # CUBLAS_STATUS_NOT_INITIALIZED (cublas_api.h)


class _NoDeviceLt:
    """The real bindings with no handle: cublasLtCreate needs a GPU. The heuristic and the matmul get
    the real descriptors and llmpy's argument lists; the library answers NOT_INITIALIZED (handle 0), which
    shows the call passed the bindings' signature and types and reached cublasLt. The heuristic is then
    taken to have found one algorithm."""

    def __init__(self, lt):
        self._lt, self.reached = lt, []

    def __getattr__(self, name):
        return getattr(self._lt, name)

    def create(self):
        return 0

    def destroy(self, handle):
        assert handle == 0

    def _reach(self, name, function, args):
        with pytest.raises(self._lt.cuBLASLtError) as error:
            function(*args)
        assert error.value.status == NOT_INITIALIZED, error.value
        self.reached.append(name)

    def matmul_algo_get_heuristic(self, *args):
        self._reach("heuristic", self._lt.matmul_algo_get_heuristic, args)
        ctypes.c_int32.from_address(args[-1]).value = 1

    def matmul(self, *args):
        self._reach("matmul", self._lt.matmul, args)


@pytest.mark.parametrize("case", ["forward_bias_fp32", "forward_gelu_bf16", "backward_dgelu_bf16", "batched_bf16"])
def test_calls_reach_the_real_library(case, real_lt, monkeypatch):
    if real_lt is None:
        return  # passed in the stub-driver child (the fixture checked)
    import ml_dtypes
    lt, arrays = _NoDeviceLt(real_lt), _Arrays()
    monkeypatch.setattr(cublaslt, "_load_cublaslt", lambda: lt)
    monkeypatch.setattr(cublaslt, "_current_stream", lambda: FakeStream())
    handle = cublaslt.CublasLt(arrays((cublaslt.WORKSPACE_BYTES,), np.uint8))
    dt = np.float32 if case.endswith("fp32") else ml_dtypes.bfloat16
    BT, C, OC = 64, 768, 3072
    try:
        for _ in range(2):  # the second call reuses the cached descriptors: only the matmul runs
            if case.startswith("forward"):
                gelu = arrays((BT, OC), dt) if "gelu" in case else None
                matmul.matmul_forward(arrays((BT, OC), dt), arrays((BT, C), dt), arrays((OC, C), dt),
                                      arrays((OC,), dt), gelu_aux=gelu, handle=handle)
            elif case.startswith("backward"):
                bias_module = types.ModuleType("llmpy.gpu.bias")
                bias_module.matmul_bias_backward = lambda dbias, dout: None
                monkeypatch.setitem(sys.modules, "llmpy.gpu.bias", bias_module)
                matmul.matmul_backward(arrays((BT, C), dt), arrays((OC, C), dt), arrays((OC,), dt),
                                       arrays((BT, OC), dt), arrays((BT, C), dt), arrays((OC, C), dt),
                                       gelu_aux=arrays((BT, C), dt), handle=handle)
            else:
                q, k = arrays((4, 12, 64, 64), dt), arrays((4, 12, 64, 64), dt)
                matmul.batched_matmul(arrays((4, 12, 64, 64), dt), q, k, transa=False, transb=True, alpha=0.125,
                                      handle=handle)
        per_call = 2 if case.startswith("backward") else 1  # dinp and dweight
        assert lt.reached == ["heuristic", "matmul"] * per_call + ["matmul"] * per_call
        assert len(handle._cache) == per_call
    finally:
        handle.close()
    assert handle._cache == {}
