"""The kernel emulator (tests/cuda_emu.py, tests/emu/) is itself right: it runs every instantiation
the launchers can ask for, computes block reductions correctly, and reports the mistakes it exists
to catch (bad arguments, out-of-bounds accesses, misaligned 128-bit accesses, divergent barriers,
uninitialised reads, freed memory, what CUDA refuses during graph capture) instead of running through
them, and its graphs replay what was captured with the arguments it was captured with. The kernels'
own results are checked in tests/test_gpu_ops.py, the engine's in tests/test_gpu_engine.py."""
import ml_dtypes
import numpy as np
import pytest

from llmpy.gpu import _kernels as K
from llmpy.testing import requires_gpu

cuda_emu = pytest.importorskip("cuda_emu", reason="needs CuPy importable")
EmulatorError = cuda_emu.EmulatorError
F32 = np.dtype(np.float32)


def test_every_name_expression_is_registered(emulator):
    listed = {e for exprs in K.NAME_EXPRESSIONS.values() for e in exprs}
    selftest = set(cuda_emu.SELFTEST["selftest.cu"])
    assert set(emulator.kernels) == listed | selftest


def test_block_sum_matches_numpy(emulator, rng):
    for threads in (32, 96, 1024):
        x = rng.standard_normal((3, threads)).astype(np.float32)
        out = emulator.empty((3,))
        emulator.run("block_sum_kernel", (3,), (threads,), (out, emulator.to_device(x)))
        np.testing.assert_allclose(emulator.to_host(out), x.sum(axis=1), rtol=1e-5, atol=1e-5)


def test_arguments_are_checked_against_the_kernel(emulator):
    out = emulator.empty((8,))
    emulator.run("fill_kernel", (1,), (32,), (out, np.int32(8)))
    assert np.all(emulator.to_host(out) == 1.0)
    with pytest.raises(EmulatorError, match=r"argument 1: the kernel takes int \(4 bytes\), got Python int"):
        emulator.run("fill_kernel", (1,), (32,), (out, 8))
    with pytest.raises(EmulatorError, match=r"argument 1: the kernel takes int \(4 bytes\), got int64"):
        emulator.run("fill_kernel", (1,), (32,), (out, np.int64(8)))
    with pytest.raises(EmulatorError, match=r"argument 0: the kernel takes float\*, got a bfloat16 array"):
        emulator.run("fill_kernel", (1,), (32,), (emulator.empty((8,), ml_dtypes.bfloat16), np.int32(8)))
    with pytest.raises(EmulatorError, match="takes 2 arguments, the launcher passed 1"):
        emulator.run("fill_kernel", (1,), (32,), (out,))
    with pytest.raises(EmulatorError, match="invalid launch configuration"):
        emulator.run("fill_kernel", (1,), (2048,), (out, np.int32(8)))
    with pytest.raises(EmulatorError, match=r"argument 0: None is not a null pointer under CuPy; pass K.NULL"):
        emulator.run("fill_kernel", (1,), (32,), (None, np.int32(8)))


def test_out_of_bounds_accesses_are_reported(emulator):
    out = emulator.empty((3,), label="out")          # 12 bytes: 4 bytes of padding before the guard page
    with pytest.raises(EmulatorError, match="wrote outside out"):
        emulator.run("fill_kernel", (1,), (32,), (out, np.int32(4)))
    big = emulator.empty((1000,), label="big")
    with pytest.raises(EmulatorError, match="invalid memory access .* bytes past the end of big"):
        emulator.run("fill_kernel", (1,), (32,), (big, np.int32(5000)))
    src = emulator.to_device(np.ones(1024, np.float32), label="src")
    with pytest.raises(EmulatorError, match="bytes past the end of src"):
        emulator.run("sum_kernel", (1,), (32,), (out[:1], src, np.int32(1100)))


def test_misaligned_128_bit_access_is_reported(emulator):
    src = emulator.to_device(np.arange(64, dtype=np.float32))
    out = emulator.empty((32,))
    with pytest.raises(EmulatorError, match=r"misaligned 128-bit load at 0x[0-9a-f]+4 \(16-byte alignment "
                                            r"required\) in block \(0,0,0\) thread \(0,0,0\)"):
        emulator.run("misaligned_load_kernel", (1,), (32,), (out, src))
    from llmpy.gpu import gelu                      # an aligned x128 kernel runs
    gelu.gelu_forward(out, src[:32])
    assert not np.any(np.isnan(emulator.to_host(out)))


def test_barrier_mistakes_are_reported(emulator):
    out = emulator.empty((64,))
    with pytest.raises(EmulatorError, match=r"divergent __syncthreads: .*selftest.cu:\d+ and .*selftest.cu:\d+"):
        emulator.run("divergent_sync_kernel", (1,), (64,), (out,))
    with pytest.raises(EmulatorError, match="deadlock: .* waits at a shuffle while other threads"):
        emulator.run("half_warp_shuffle_kernel", (1,), (64,), (out,))
    with pytest.raises(EmulatorError, match="after lane 5 of its warp exited"):
        emulator.run("shuffle_after_exit_kernel", (1,), (32,), (out,))


def test_reverse_order_exposes_a_missing_barrier(emulator):
    """racy_shared_kernel reads a neighbour's shared-memory slot without __syncthreads: in order and
    reversed, the emulator gives different results (test_gpu_ops runs every op both ways)."""
    def run():
        out = emulator.zeros((2, 64))
        emulator.run("racy_shared_kernel", (2,), (64,), (out,))
        return emulator.to_host(out).copy()

    run()                                   # leaves the slots of block 1 behind
    in_order = run()
    emulator.set_reverse_order(True)
    reversed_order = run()
    expected = np.roll(np.arange(128, dtype=np.float32).reshape(2, 64), -1, axis=1)
    assert np.array_equal(reversed_order[:, :63], expected[:, :63])   # the neighbour had written already
    assert not np.array_equal(in_order, reversed_order)
    emulator.set_reverse_order(False)
    block_sum = emulator.empty((2,))
    x = np.arange(128, dtype=np.float32).reshape(2, 64)
    emulator.run("block_sum_kernel", (2,), (64,), (block_sum, emulator.to_device(x)))
    np.testing.assert_array_equal(emulator.to_host(block_sum), x.sum(axis=1))


def test_fresh_memory_reads_as_nan(emulator):
    assert np.all(np.isnan(emulator.to_host(emulator.empty((5,)))))
    assert np.all(np.isnan(emulator.to_host(emulator.empty((5,), ml_dtypes.bfloat16)).astype(np.float32)))
    out = emulator.zeros((32,))
    emulator.run("uninitialized_shared_kernel", (1,), (32,), (out,), shared_mem=128)
    assert np.all(np.isnan(emulator.to_host(out)))
    with pytest.raises(EmulatorError, match="exceed"):
        emulator.run("uninitialized_shared_kernel", (1,), (32,), (out,), shared_mem=300 * 1024)
    # static __shared__ too: each block starts from NaN, not from what the last block left
    stale = emulator.zeros((3,))
    emulator.run("stale_shared_kernel", (3,), (1,), (stale,))
    host = emulator.to_host(stale)
    assert host[0] == 1.0 and np.all(np.isnan(host[1:])), host


def test_writes_past_the_dynamic_shared_memory_are_reported(emulator):
    emulator.run("shared_fill_kernel", (1,), (32,), (np.int32(100),), shared_mem=400)
    with pytest.raises(EmulatorError, match="wrote dynamic shared memory at byte 396, past the 396 bytes"):
        emulator.run("shared_fill_kernel", (1,), (32,), (np.int32(100),), shared_mem=396)


def _mma_inputs(rng):
    BF16 = ml_dtypes.bfloat16
    a, b = (rng.standard_normal((16, 16)).astype(BF16) for _ in range(2))
    wants = {0: a.astype(np.float64) @ b.astype(np.float64).T, 1: a.astype(np.float64) @ b.astype(np.float64)}
    return a, b, wants


def test_mma_sync_and_ldmatrix_layouts(emulator, rng):
    """The tensor-core stand-ins (tests/emu/sm80.h) place every element where the PTX ISA's fragment
    layouts say, for ldmatrix, ldmatrix.trans and mma.sync.m16n8k16 together: the product matches NumPy
    (bf16 in, fp32 sums). They stop on what a GPU would trip on: a row address that is not 16-byte
    aligned, and a warp with missing lanes."""
    a, b, wants = _mma_inputs(rng)
    da, db = emulator.to_device(a), emulator.to_device(b)
    c = emulator.empty((256,))
    for trans, want in wants.items():
        emulator.run("mma_product_kernel", (1,), (32,), (c, da, db, np.int32(0), np.int32(trans)))
        np.testing.assert_allclose(emulator.to_host(c).reshape(16, 16), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(EmulatorError, match=r"misaligned ldmatrix row .*16-byte alignment"):
        emulator.run("mma_product_kernel", (1,), (32,), (c, da, db, np.int32(4), np.int32(0)))
    with pytest.raises(EmulatorError, match="warp-wide matrix instruction in a partial warp"):
        emulator.run("mma_product_kernel", (1,), (16,), (c, da, db, np.int32(0), np.int32(0)))


def test_cp_async_lands_at_the_wait(emulator, rng):
    """cp.async's stand-in writes shared memory when the thread waits for its copies, so reading them
    without the wait finds the old contents (NaN here); misaligned addresses stop the launch."""
    x = rng.standard_normal(4 * 64 + 4).astype(np.float32)
    dx, out = emulator.to_device(x), emulator.empty((256,))
    emulator.run("async_copy_kernel", (1,), (64,), (out, dx, np.int32(0), np.int32(1)), shared_mem=1024)
    np.testing.assert_array_equal(emulator.to_host(out), np.roll(x[:256].reshape(64, 4), -1, axis=0).ravel())
    emulator.run("async_copy_kernel", (1,), (64,), (out, dx, np.int32(0), np.int32(0)), shared_mem=1024)
    assert np.isnan(emulator.to_host(out)).all()
    with pytest.raises(EmulatorError, match=r"misaligned cp.async source .*16-byte alignment"):
        emulator.run("async_copy_kernel", (1,), (64,), (out, dx, np.int32(1), np.int32(1)), shared_mem=1024)


@requires_gpu
def test_mma_layouts_are_the_gpus(rng):
    """The same kernel through NVRTC on a GPU, with the real ldmatrix and mma.sync: the hardware agrees
    with NumPy, so the layouts the emulator (and cuda/flash_attention.cu) assume are the real ones."""
    import cupy as cp
    mod = cp.RawModule(code=(cuda_emu.EMU_DIR / "selftest.cu").read_text(), options=K.options(),
                       name_expressions=["mma_product_kernel"])
    fn = mod.get_function("mma_product_kernel")
    a, b, wants = _mma_inputs(rng)
    da, db = cp.asarray(a), cp.asarray(b)
    c = cp.full((256,), np.nan, dtype=np.float32)
    for trans, want in wants.items():
        fn((1,), (32,), (c, da, db, np.int32(0), np.int32(trans)))
        np.testing.assert_allclose(cp.asnumpy(c).reshape(16, 16), want, rtol=1e-5, atol=1e-5)


def test_launchers_are_routed_to_the_emulator(emulator):
    from llmpy.gpu import gelu
    x = emulator.to_device(np.linspace(-3, 3, 37, dtype=np.float32))
    y = emulator.empty((37,))
    gelu.gelu_forward(y, x)
    assert emulator.launches == ["gelu_forward_kernel<float>"]
    assert not np.any(np.isnan(y.get()))


def test_memory_is_freed_with_its_last_array(emulator):
    import cupy as cp
    pool = cp.get_default_memory_pool()
    base = pool.used_bytes()
    a = emulator.empty((1000,))
    view = a[10:]
    ptr = view.data.ptr
    del a
    assert pool.used_bytes() == base + 4000            # the view keeps the allocation alive
    emulator.run("sum_kernel", (1,), (1,), (view[:1], view, np.int32(5)))
    del view
    assert pool.used_bytes() == base
    stale = cp.ndarray((5,), np.float32, memptr=cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(ptr, 20, None, 0), 0))
    with pytest.raises(EmulatorError, match="argument 1: pointer is not emulator memory"):
        emulator.run("sum_kernel", (1,), (1,), (emulator.empty((1,)), stale, np.int32(5)))


def test_graph_capture_records_and_replays_with_the_captured_arguments(emulator):
    cuda = emulator.cuda
    out = emulator.zeros((8,))
    side = cuda.Stream(non_blocking=True)
    with side:
        side.begin_capture()
        assert cuda.get_current_stream().is_capturing()
        emulator.run("fill_kernel", (1,), (32,), (out, np.int32(3)))
        out[5:].fill(2.0)
        graph = side.end_capture()
    assert np.all(emulator.to_host(out) == 0), "capture must record, not run"
    graph.launch(side)
    np.testing.assert_array_equal(emulator.to_host(out), [1, 1, 1, 0, 0, 2, 2, 2])
    out.fill(0)
    emulator.run("fill_kernel", (1,), (32,), (out, np.int32(1)))     # eager, another n: not the graph's
    graph.launch(side)                                              # replays n=3, as captured
    np.testing.assert_array_equal(emulator.to_host(out), [1, 1, 1, 0, 0, 2, 2, 2])
    assert emulator.launches == ["fill_kernel"] * 3


def test_a_stream_forked_into_a_capture_is_recorded_and_must_be_joined(emulator):
    """CUDA's fork/join inside a capture (llmpy/dist/overlap.py's comm stream): a stream that waits for
    an event recorded on the capturing stream joins the capture, its work is recorded in issue order,
    and the capture ends only after the capturing stream waited for an event recorded after that work."""
    cuda = emulator.cuda
    out = emulator.zeros((8,))
    origin, comm = cuda.Stream(non_blocking=True), cuda.Stream(non_blocking=True)
    fork, join = cuda.Event(), cuda.Event()
    with origin:
        origin.begin_capture()
        emulator.run("fill_kernel", (1,), (32,), (out, np.int32(2)))
        fork.record(origin)
        comm.wait_event(fork)
        assert comm.is_capturing()
        with comm:
            out[4:6].fill(3.0)
        emulator.run("fill_kernel", (1,), (32,), (out[6:], np.int32(1)))
        join.record(comm)
        origin.wait_event(join)
        graph = origin.end_capture()
    assert not comm.is_capturing() and np.all(emulator.to_host(out) == 0), "capture must record, not run"
    graph.launch(origin)
    np.testing.assert_array_equal(emulator.to_host(out), [1, 1, 0, 0, 3, 3, 1, 0])
    with origin:
        origin.begin_capture()
        fork.record(origin)
        comm.wait_event(fork)
        join.record(comm)                   # recorded before the work: joins nothing
        with comm:
            out.fill(0.0)
        origin.wait_event(join)
        with pytest.raises(EmulatorError, match="not joined back"):
            origin.end_capture()
    assert not origin.is_capturing() and not comm.is_capturing()


def test_what_cuda_refuses_during_capture_is_refused(emulator):
    from llmpy.gpu.graph import AllocationDuringCapture, _refuse_allocation
    cuda = emulator.cuda
    out = emulator.zeros((4,))
    side = cuda.Stream(non_blocking=True)
    refused = {
        "device-to-host copy": lambda: out.get(),
        "host-to-device copy": lambda: out.set(np.ones(4, np.float32)),
        "reduction read back": lambda: float(out.sum()),
        "stream synchronize": lambda: side.synchronize(),
    }
    for what, call in refused.items():
        with side:
            side.begin_capture()
            with pytest.raises(EmulatorError, match=what):
                call()
            side.end_capture()
    with side:
        side.begin_capture()
        with cuda.Stream() as other, pytest.raises(EmulatorError, match="stream that is not capturing"):
            assert not other.is_capturing()
            emulator.run("fill_kernel", (1,), (32,), (out, np.int32(4)))
        with cuda.using_allocator(_refuse_allocation), pytest.raises(AllocationDuringCapture):
            emulator.empty((4,))
        side.end_capture()
    emulator.empty((4,))                                            # allowed again after capture
    with pytest.raises(EmulatorError, match="legacy null stream"):
        cuda.get_current_stream().begin_capture()
