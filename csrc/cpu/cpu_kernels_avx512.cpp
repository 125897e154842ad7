// CPU kernels built for AVX512 (cpu_kernels_impl.h under a target pragma); cpu_kernels.cpp
// uses them only on CPUs that support the instruction set.
#include "cpu/cpu_kernels.h"

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
// The system headers first, under the default target.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(_OPENMP)
#include <omp.h>
#endif

#pragma GCC push_options
// GCC 12's AVX-512 intrinsics (_mm512_undefined_* inside them) trip -Wmaybe-uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")
#define LORA_CPU_NS avx512
#define LORA_CPU_AVX512 1
#include "cpu/cpu_kernels_impl.h"
#undef LORA_CPU_NS
#pragma GCC diagnostic pop
#pragma GCC pop_options

const lora::cpu::Kernels* lora::cpu::kernels_avx512() { return &avx512::kTable; }
#else
// Other compilers and architectures: the baseline build only.
const lora::cpu::Kernels* lora::cpu::kernels_avx512() { return nullptr; }
#endif
