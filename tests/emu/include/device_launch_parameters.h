// kvemu shadow of <device_launch_parameters.h>: the emulator provides what kernels use from it.
#pragma once
#include <kvemu/emu.h>
