"""llmpy: GPT-2 training in Python, llm.c-compatible, on CUDA kernels driven by CuPy or on NumPy.

Importing llmpy never imports CuPy; `llmpy.gpu` does, on demand.
"""
__version__ = "0.1.0"
