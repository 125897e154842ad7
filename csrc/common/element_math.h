// Per-element math of the LoRA kernels, shared by the CPU loops (cpu/cpu_*.h) and
// the CUDA kernels (cuda/cuda_kernels.cu) so that the CPU tests check the arithmetic the GPU
// runs. Storage types, their conversions to the accumulation type, and the element
// formulas of the three custom steps:
//
//   shrink:  U[m, r]  = sum_k  D(X)[m, k] * A[r, k]                 D(X) = X * keep * scale
//   expand:  O[m, k] += s * keep[m, k] * scale * sum_r G[m, r] A[r, k]
//   reduce:  S[r, k]  = sum_m  G[m, r] * D(X)[m, k]
//
// Accumulation is float32 for float32/bfloat16/float16 storage and float64 for float64.
// No torch includes.
#pragma once

#include <stdint.h>
#include <string.h>

#include "common/kernel_dtype.h"
#include "common/philox.h"

namespace lora {

// The accumulation type of a storage type.
template <class T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

LORA_HD float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

LORA_HD uint32_t f32_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// bfloat16 -> float32 is exact.
LORA_HD float bf16_to_f32(uint16_t b) { return f32_from_bits(static_cast<uint32_t>(b) << 16); }

// float32 -> bfloat16, round to nearest even; NaN becomes 0x7FC0 (as c10::BFloat16).
LORA_HD uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  const uint32_t rounding_bias = 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding_bias) >> 16);
}

// IEEE half -> float32, exact (subnormals included); the branch-free form of c10::Half.
LORA_HD float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = 0x1.0p-112f;
  const float normalized = f32_from_bits((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized = f32_from_bits((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result =
      sign | (two_w < denormalized_cutoff ? f32_to_bits(denormalized) : f32_to_bits(normalized));
  return f32_from_bits(result);
}

// float32 -> IEEE half, round to nearest even (subnormals, overflow to inf, NaN kept).
LORA_HD uint16_t f32_to_f16(float f) {
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  const uint32_t w = f32_to_bits(f);
  const float abs_f = f32_from_bits(w & 0x7FFFFFFFu);
  float base = (abs_f * scale_to_inf) * scale_to_zero;
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// Load a stored element into its accumulation type.
LORA_HD float to_acc(float v) { return v; }
LORA_HD double to_acc(double v) { return v; }
LORA_HD float to_acc(bf16 v) { return bf16_to_f32(v.bits); }
LORA_HD float to_acc(f16 v) { return f16_to_f32(v.bits); }

// Round an accumulated value to the storage type T (one rounding).
template <class T>
struct Store;
template <>
struct Store<float> {
  LORA_HD float from(float v) { return v; }
};
template <>
struct Store<double> {
  LORA_HD double from(double v) { return v; }
};
template <>
struct Store<bf16> {
  LORA_HD bf16 from(float v) { return bf16{f32_to_bf16(v)}; }
};
template <>
struct Store<f16> {
  LORA_HD f16 from(float v) { return f16{f32_to_f16(v)}; }
};

// D(X) for one element: x * keep * scale, where `factor` is keep_factor() (scale or 0),
// or 1 without dropout.
template <class acc>
LORA_HD acc dropout_elem(acc x, float factor) {
  return x * static_cast<acc>(factor);
}

// The expand step for one element: o + s * (factor * t), t = sum_r G[m, r] A[r, k].
template <class acc>
LORA_HD acc expand_elem(acc o, acc s, float factor, acc t) {
  return o + s * (static_cast<acc>(factor) * t);
}

LORA_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
LORA_HD int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
LORA_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
LORA_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

}  // namespace lora
