// Stand-in for the CUDA toolkit's <cuda_bf16.h> when cuda/*.cu are compiled for the CPU emulator:
// common.cuh includes <cuda_bf16.h>, and -I tests/emu puts this file first. See emu.h.
#pragma once
#include "emu.h"
