"""Model FLOPs utilisation: llm.c's peak-FLOPS table (llmc/mfu.h, llmc-facts.md §7.8) and FLOP count.

A GPU's peak is its architecture's whitepaper number scaled by tensor cores and boost clock, looked up
by the exact CUDA device name. Pure Python (no CuPy): tests/test_gpu_engine.py checks it without a GPU.
"""
from __future__ import annotations

from llmpy.model import GPTConfig, num_parameters

# Architecture rows: dense TFLOPS for TF32 and for BF16 with fp32 accumulation (None: no such mode),
# at the reference boost clock (MHz) and tensor-core count of NVIDIA's whitepapers.
ARCH_PEAKS = {
    "volta": (125.0, None, 1530, 640),
    "ampere_datacenter": (156.0, 312.0, 1410, 432),
    "ampere_consumer": (40.0, 80.0, 1860, 336),
    "hopper": (378.0, 756.0, 1620, 456),
    "ada": (82.6, 165.2, 2520, 512),
}

# Exact CUDA device names -> (architecture, tensor cores, boost MHz): llm.c's list, plus the H200
# (llmpy's addition; the same compute as the H100 SXM, so ~989 bf16 TFLOPS).
GPU_SPECS = {
    "Tesla V100-SXM2-16GB": ("volta", 640, 1530),
    "Tesla V100-PCIE-32GB": ("volta", 640, 1530),
    "NVIDIA A100-PCIE-40GB": ("ampere_datacenter", 432, 1410),
    "NVIDIA A100-PCIE-80GB": ("ampere_datacenter", 432, 1410),
    "NVIDIA A100-SXM4-40GB": ("ampere_datacenter", 432, 1410),
    "NVIDIA A100-SXM4-80GB": ("ampere_datacenter", 432, 1410),
    "NVIDIA RTX A2000": ("ampere_consumer", 104, 1200),
    "NVIDIA RTX A4000": ("ampere_consumer", 192, 1560),
    "NVIDIA RTX A4500": ("ampere_consumer", 224, 1650),
    "NVIDIA RTX A5000": ("ampere_consumer", 256, 1695),
    "NVIDIA RTX A5500": ("ampere_consumer", 320, 1770),
    "NVIDIA RTX A6000": ("ampere_consumer", 336, 1800),
    "NVIDIA GeForce RTX 3090 Ti": ("ampere_consumer", 336, 1860),
    "NVIDIA GeForce RTX 3090": ("ampere_consumer", 328, 1695),
    "NVIDIA GeForce RTX 3080 Ti": ("ampere_consumer", 320, 1665),
    "NVIDIA GeForce RTX 3080": ("ampere_consumer", 272, 1710),
    "NVIDIA GeForce RTX 3070 Ti": ("ampere_consumer", 192, 1770),
    "NVIDIA GeForce RTX 3070": ("ampere_consumer", 184, 1725),
    "NVIDIA GeForce RTX 3060 Ti": ("ampere_consumer", 152, 1665),
    "NVIDIA GeForce RTX 3060": ("ampere_consumer", 112, 1777),
    "NVIDIA RTX A2000 ADA": ("ada", 88, 2130),
    "NVIDIA RTX A4000 ADA": ("ada", 192, 2175),
    "NVIDIA RTX A4500 ADA": ("ada", 224, 2580),
    "NVIDIA RTX A5000 ADA": ("ada", 400, 2550),
    "NVIDIA RTX A5880 ADA": ("ada", 440, 2460),
    "NVIDIA RTX A6000 ADA": ("ada", 568, 2505),
    "NVIDIA GeForce RTX 4090": ("ada", 512, 2520),
    "NVIDIA GeForce RTX 4080 SUPER": ("ada", 320, 2550),
    "NVIDIA GeForce RTX 4080": ("ada", 304, 2505),
    "NVIDIA GeForce RTX 4070 Ti SUPER": ("ada", 264, 2610),
    "NVIDIA GeForce RTX 4070 Ti": ("ada", 240, 2610),
    "NVIDIA GeForce RTX 4070 SUPER": ("ada", 224, 2475),
    "NVIDIA GeForce RTX 4070": ("ada", 184, 2475),
    "NVIDIA GeForce RTX 4060 Ti": ("ada", 136, 2535),
    "NVIDIA GeForce RTX 4060": ("ada", 96, 2460),
    "NVIDIA H100 PCIe": ("hopper", 456, 1620),
    "NVIDIA H100 80GB HBM3": ("hopper", 528, 1830),   # HBM3 = the SXM5 board
    "NVIDIA H200": ("hopper", 528, 1830),
}


# GPUs llm.c's table lacks, by their datasheets' dense (TF32, BF16) TFLOPS: the L4 is Modal's default
# GPU, and scaling llm.c's consumer-Ada row to it would halve its bf16 rate (perf-anchors.md §7).
DATASHEET_PEAKS = {
    "NVIDIA L4": (60.0, 121.0),
}


def peak_tflops(device_name: str, dtype: str) -> float:
    """Dense tensor-core TFLOPS of a GPU for dtype 'bf16' (fp32 accumulate) or 'fp32' (counted at the
    TF32 rate, as llm.c's fp32 build does); -1.0 for a GPU or precision the table does not know."""
    want_bf16 = dtype in ("bf16", "bfloat16")
    if device_name in DATASHEET_PEAKS:
        tf32, bf16 = DATASHEET_PEAKS[device_name]
        return bf16 if want_bf16 else tf32
    if device_name not in GPU_SPECS:
        return -1.0
    arch, cores, mhz = GPU_SPECS[device_name]
    tf32, bf16, base_mhz, base_cores = ARCH_PEAKS[arch]
    base = bf16 if want_bf16 else tf32
    if base is None:
        return -1.0
    return base * (cores / base_cores) * (mhz / base_mhz)


def flops_per_token(config: GPTConfig, T: int) -> int:
    """Training FLOPs per token, llm.c's count: 6 N (forward and backward through every weight, the
    padded vocabulary included) + 6 L C T (attention's two T x T products per layer)."""
    return 6 * num_parameters(config) + 6 * config.num_layers * config.channels * T


def mfu_percent(flops_per_tok: int, tokens_per_step: int, ms: float, peak: float) -> float:
    """Achieved FLOPs as a percentage of `peak` TFLOPS for a step of tokens_per_step tokens taking ms
    milliseconds; -1.0 when the peak is unknown (llm.c prints that as -100%)."""
    if peak <= 0 or ms <= 0:
        return -1.0
    return 100.0 * flops_per_tok * tokens_per_step / (ms / 1e3) / (peak * 1e12)
