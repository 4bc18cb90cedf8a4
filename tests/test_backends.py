"""The two backends did not drift: llmpy.gpu exports every op of llmpy.cpu with the same required
parameters in the same order (keyword-only tuning knobs may differ). Needs CuPy importable, not a GPU."""
import inspect
import types

import pytest

import llmpy.cpu as cpu

OPS = sorted(name for name, obj in vars(cpu).items()
             if isinstance(obj, types.FunctionType) and name.endswith(("_forward", "_backward", "_update",
                                                                        "_squared", "_classifier")))


def required_positional(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def test_cpu_exports_every_op():
    assert {"encoder_forward", "encoder_backward", "layernorm_forward", "layernorm_backward",
            "fused_residual_forward", "residual_forward", "matmul_forward", "matmul_backward",
            "attention_forward", "attention_backward", "gelu_forward", "gelu_backward", "fused_classifier",
            "adamw_update", "global_norm_squared"} <= set(OPS)
    assert cpu.xp.__name__ == "numpy"


def test_importing_llmpy_does_not_import_cupy():
    import subprocess
    import sys
    code = "import sys, llmpy, llmpy.cpu, llmpy.model, llmpy.train, llmpy.cli; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("name", OPS)
def test_gpu_op_has_the_cpu_signature(name):
    gpu = pytest.importorskip("llmpy.gpu", reason="CuPy not importable")
    assert hasattr(gpu, name), f"llmpy.gpu lacks {name}"
    assert required_positional(getattr(gpu, name)) == required_positional(getattr(cpu, name))
    cpu_kw = {p.name for p in inspect.signature(getattr(cpu, name)).parameters.values() if p.kind == p.KEYWORD_ONLY}
    gpu_kw = {p.name for p in inspect.signature(getattr(gpu, name)).parameters.values() if p.kind == p.KEYWORD_ONLY}
    assert cpu_kw <= gpu_kw, f"{name}: the GPU launcher lacks keywords {cpu_kw - gpu_kw}"
