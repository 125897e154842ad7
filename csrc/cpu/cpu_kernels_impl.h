// The CPU kernels (declared in cpu_kernels.h) as one table of entry points. This header
// is compiled once per instruction set: each including file (cpu_kernels.cpp,
// cpu_kernels_avx2.cpp, cpu_kernels_avx512.cpp) selects a target, defines LORA_CPU_NS
// and includes it. The code is split by concern:
//   cpu_common.h     vector type, loads and stores, buffers, blocking
//   cpu_mask.h       the keep mask: Philox (vectorized), factors, packed bits
//   cpu_tiles.h      the register tiles of the shrink, reduce and expand
//   cpu_passes.h     shrink and the fused expand / reduce pass
//   cpu_grad_pass.h  the backward's pass over X and dY
//   cpu_dequant.h    the 4-bit (bitsandbytes) dequantize
#pragma once

#include "cpu/cpu_common.h"
#include "cpu/cpu_dequant.h"
#include "cpu/cpu_grad_pass.h"
#include "cpu/cpu_mask.h"
#include "cpu/cpu_passes.h"
#include "cpu/cpu_tiles.h"

namespace lora {
namespace cpu {
namespace LORA_CPU_NS {
namespace {

void shrink_entry(const ShrinkArgs& p) {
  if (p.M <= 0 || p.R <= 0) return;
  by_dtype(p.dtype, [&](auto t) { shrink_impl<decltype(t)>(p); });
}

void expand_reduce_entry(const ExpandReduceArgs& p) {
  by_dtype(p.dtype, [&](auto t) { expand_reduce_impl<decltype(t)>(p); });
}

void grad_pass_entry(const GradPassArgs& p) {
  by_dtype(p.dtype, [&](auto t) { grad_pass_impl<decltype(t)>(p); });
}

void dequant_4bit_entry(const Dequant4bitArgs& p) {
  if (p.n <= 0) return;
  by_dtype(p.dtype, [&](auto t) { dequant_4bit_impl<decltype(t)>(p); });
}

}  // namespace

#define LORA_STR2(x) #x
#define LORA_STR(x) LORA_STR2(x)
const Kernels kTable = {LORA_STR(LORA_CPU_NS), &shrink_entry,   &expand_reduce_entry,
                        &grad_pass_entry,       &keep_mask_impl, &dequant_4bit_entry};
#undef LORA_STR
#undef LORA_STR2

}  // namespace LORA_CPU_NS
}  // namespace cpu
}  // namespace lora

#undef LORA_ALWAYS_INLINE
