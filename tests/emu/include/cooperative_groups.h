// kvemu shadow of <cooperative_groups.h>.
#pragma once
#error "kvemu: cooperative groups are not emulated; use __syncthreads / __shfl_*_sync / __syncwarp (or extend tests/emu/include/kvemu)"
