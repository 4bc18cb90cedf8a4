"""CPU backend: the NumPy reference of every op. Same function names and arguments as llmpy.gpu."""
import numpy as xp  # noqa: F401  (the backend's array module, used by model.py to allocate)

from llmpy.cpu.adamw import adamw_update, global_norm_squared  # noqa: F401
from llmpy.cpu.attention import (attention_backward, attention_forward, flash_attention_backward,  # noqa: F401
                                 flash_attention_forward, gqa_attention_backward, gqa_attention_forward,
                                 gqa_flash_attention_backward, gqa_flash_attention_forward)
from llmpy.cpu.classifier import fused_classifier, softcap_forward  # noqa: F401
from llmpy.cpu.encoder import encoder_backward, encoder_forward  # noqa: F401
from llmpy.cpu.gelu import gelu_backward, gelu_forward  # noqa: F401
from llmpy.cpu.layernorm import fused_residual_forward, layernorm_backward, layernorm_forward  # noqa: F401
from llmpy.cpu.matmul import matmul_backward, matmul_forward  # noqa: F401
from llmpy.cpu.muon import muon_update, newton_schulz  # noqa: F401
from llmpy.cpu.relu2 import relu2_backward, relu2_forward  # noqa: F401
from llmpy.cpu.residual import residual_forward  # noqa: F401
from llmpy.cpu.rmsnorm import fused_residual_rmsnorm_forward, rmsnorm_backward, rmsnorm_forward  # noqa: F401
from llmpy.cpu.rope import rope_backward, rope_forward  # noqa: F401

NAME = "cpu"
