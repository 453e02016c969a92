// kvemu shadow of <cuda_pipeline_primitives.h>: the emulator provides what kernels use from it.
#pragma once
#include <kvemu/emu.h>
