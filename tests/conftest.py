"""Shared fixtures. Markers (gpu, slow) are registered in pyproject.toml."""
import numpy as np
import pytest

from llmpy.testing import gpu_marks


@pytest.fixture
def rng():
    """A fresh, fixed-seed generator per test, so every test is deterministic on its own."""
    return np.random.default_rng(1234)


# -------------------------------------------------------------------------------------------------
# The CUDA kernel emulator (tests/cuda_emu.py): the kernels of cuda/ compiled for the CPU, so the GPU
# op tests also run on machines without a GPU.

@pytest.fixture(scope="session")
def emulator_library(tmp_path_factory):
    """Path of the emulator's shared library, built once per session (skips without CuPy or g++)."""
    import shutil
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("the kernel emulator needs a C++ compiler (g++)")
    try:
        import cupy  # noqa: F401  (launchers take cupy.ndarray arguments, even over host memory)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"the kernel emulator needs CuPy importable: {e}")
    import cuda_emu
    return cuda_emu.build(tmp_path_factory.mktemp("cuda_emu"))


@pytest.fixture
def emulator(emulator_library, monkeypatch):
    """A fresh emulator with llmpy.gpu's launches, cupy allocations and batched matmuls routed to it."""
    import cuda_emu
    emu = cuda_emu.Emulator(emulator_library)
    emu.set_reverse_order(False)
    try:
        with emu.installed(monkeypatch):
            yield emu
    finally:
        emu.set_reverse_order(False)     # the library, and so the setting, is shared by every test


@pytest.fixture(params=[pytest.param("cuda", marks=gpu_marks()), "emulator"])
def backend(request):
    """Where llmpy.gpu runs: "cuda", a real GPU (marker gpu; skipped without one), or "emulator",
    the CPU emulator above (any machine with g++ and CuPy importable). Returns the name."""
    if request.param == "emulator":
        request.getfixturevalue("emulator")
    return request.param
