// kvemu shadow of <device_functions.h>: the emulator provides what kernels use from it.
#pragma once
#include <kvemu/emu.h>
