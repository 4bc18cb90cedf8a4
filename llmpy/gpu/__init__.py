"""GPU backend: CuPy arrays, llmpy's CUDA kernels (cuda/*.cu, compiled by llmpy/gpu/_kernels.py) and
cuBLASLt matmuls (llmpy/gpu/matmul.py). Same op names and positional arguments as llmpy.cpu; the
knobs (block sizes, scratch buffers, seeds) are keyword-only. Importing it imports CuPy (which
needs no GPU to import); kernels compile on first use.
"""
import cupy as xp  # noqa: F401  (the backend's array module, used by model.py to allocate)

from llmpy.gpu.adamw import adamw_update, global_norm_squared  # noqa: F401
from llmpy.gpu.attention import (attention_backward, attention_forward, gqa_attention_backward,  # noqa: F401
                                 gqa_attention_forward)
from llmpy.gpu.classifier import fused_classifier, softcap_forward  # noqa: F401
from llmpy.gpu.encoder import encoder_backward, encoder_forward  # noqa: F401
from llmpy.gpu.flash_attention import (flash_attention_backward, flash_attention_forward,  # noqa: F401
                                       gqa_flash_attention_backward, gqa_flash_attention_forward)
from llmpy.gpu.gelu import gelu_backward, gelu_forward  # noqa: F401
from llmpy.gpu.layernorm import fused_residual_forward, layernorm_backward, layernorm_forward  # noqa: F401
from llmpy.gpu.matmul import matmul_backward, matmul_forward  # noqa: F401
from llmpy.gpu.relu2 import relu2_backward, relu2_forward  # noqa: F401
from llmpy.gpu.residual import residual_forward  # noqa: F401
from llmpy.gpu.rmsnorm import fused_residual_rmsnorm_forward, rmsnorm_backward, rmsnorm_forward  # noqa: F401
from llmpy.gpu.muon import muon_update, newton_schulz  # noqa: F401
from llmpy.gpu.rope import rope_backward, rope_forward, rope_tables  # noqa: F401

NAME = "gpu"
