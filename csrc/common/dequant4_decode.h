// The per-element decode of a bitsandbytes 4-bit weight (NF4 / FP4; the format and the
// reference decode are lora_kernels/quant4bit.py), shared by the CPU kernel
// (cpu/cpu_dequant.h, whose vector path computes the same product in registers) and the
// CUDA kernel (cuda/cuda_dequant.cu), so that the CPU tests check the arithmetic the GPU
// runs:
//
//   out[i]   = code[c_i] * scale[i / blocksize]     c_{2j} the high nibble of packed[j],
//                                                   c_{2j+1} its low nibble
//   scale[b] = absmax[b], or with double quantization
//   scale[b] = absmax_code[absmax_q[b]] * absmax2[b / blocksize2] + offset
//
// in float32, each product rounded once, the nested product rounded before the offset is
// added (never a fused multiply-add: bitsandbytes computes them in two kernels); the
// caller rounds out[i] once to the output dtype. No torch includes.
#pragma once

#include <stdint.h>

#include "common/philox.h"  // LORA_HD

namespace lora {

// The scale operands of the blocks of one weight, pointers into the memory of the device
// that decodes it.
struct Dequant4Scales {
  const float* absmax;       // [blocks], or nullptr with absmax_q
  const uint8_t* absmax_q;   // [blocks]: the codes of the nested absmax, or nullptr
  const float* absmax_code;  // [256] (with absmax_q)
  const float* absmax2;      // [ceil(blocks / blocksize2)] (with absmax_q)
  int64_t blocksize2;
  float offset;
};

// The 4-bit code of element i: the high nibble of packed[i / 2] for even i, else the low.
LORA_HD unsigned dequant4_code(const uint8_t* packed, int64_t i) {
  const unsigned byte = packed[i / 2];
  return i % 2 == 0 ? byte >> 4 : byte & 0xFu;
}

// scale[b] of quant block b.
LORA_HD float dequant4_block_scale(const Dequant4Scales& s, int64_t b) {
  if (s.absmax_q == nullptr) return s.absmax[b];
  const float code2 = s.absmax_code[s.absmax_q[b]];
  const float absmax2 = s.absmax2[b / s.blocksize2];
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(code2, absmax2), s.offset);
#else
  // volatile: the product is rounded to float32 before the sum, never contracted into a
  // fused multiply-add (GCC contracts by default where the target has FMA).
  volatile float scaled = code2 * absmax2;
  return scaled + s.offset;
#endif
}

// out[i] before its rounding to the output dtype: the value of code c times the scale.
LORA_HD float dequant4_value(const float* code, unsigned c, float scale) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(code[c], scale);
#else
  return code[c] * scale;
#endif
}

}  // namespace lora
