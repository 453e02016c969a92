// kvemu shadow of <cuda_runtime_api.h>: the emulator provides what kernels use from it.
#pragma once
#include <kvemu/emu.h>
