// kvemu shadow of <mma.h>: nvcuda::wmma on the emulator.
#pragma once
#include <kvemu/wmma.h>
