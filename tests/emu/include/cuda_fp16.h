// kvemu shadow of <cuda_fp16.h>: the real header (host half types and operators), then the emulator's
// device-only half functions.
#pragma once
#include_next <cuda_fp16.h>
#include <kvemu/emu.h>
