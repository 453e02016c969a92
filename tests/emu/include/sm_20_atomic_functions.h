// kvemu shadow of <sm_20_atomic_functions.h>: the emulator provides what kernels use from it.
#pragma once
#include <kvemu/emu.h>
