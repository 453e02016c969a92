// kvemu shadow of <cuda_runtime.h>: the emulator provides what kernels use from it.
#pragma once
#include <kvemu/emu.h>
