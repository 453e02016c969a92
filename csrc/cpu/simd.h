// Code generation shared by the CPU kernels (csrc/cpu/*.cpp).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One build that still uses AVX-512 (x86-64-v4) or AVX2 + FMA (x86-64-v3) where the machine has
// them: GCC compiles a function marked KVFIX_CPU_CLONES once per target and picks one at load time.
// Built with KVFIX_CPU_NO_AVX512=1 (setup.py): without the AVX-512 clone, to time the AVX2 path on
// a machine that has AVX-512.
#if defined(KVFIX_CPU_NO_AVX512)
#define KVFIX_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define KVFIX_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#else
#define KVFIX_CPU_CLONES
#endif

// Helpers called from a KVFIX_CPU_CLONES function: inlined, so they are compiled for its target.
#define KVFIX_INLINE inline __attribute__((always_inline))
