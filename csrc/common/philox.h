// Philox4x32-10 (Salmon et al., SC'11; Random123) and the dropout keep-mask rule of
// lora_kernels, bit for bit as `lora_kernels.reference.dropout_keep_mask` defines it:
//
//   q       = m * ceil(K / 4) + k / 4          (64-bit counter)
//   counter = (lo32(q), hi32(q), 0, 0)
//   key     = (lo32(seed), hi32(seed))
//   word    = philox4x32_10(counter, key)[k % 4]
//   keep    = word >= floor(p * 2^32)          (unsigned compare)
//
// Plain C++ that compiles as host code (the CPU loops) and as __host__ __device__ code
// (the CUDA kernels), so both run the same generator. No torch includes.
#pragma once

#include <stdint.h>

// Every function here has internal linkage (`static`): the CPU kernels are compiled
// once per instruction set (baseline, AVX2, AVX-512) into one library, and an inline
// function with external linkage would be merged across those objects by the linker,
// which could hand AVX-512 code to the baseline path.
#if defined(__CUDACC__)
#define LORA_HD static __host__ __device__ __forceinline__
#else
#define LORA_HD static inline
#endif

namespace lora {

// Round multipliers and Weyl key increments of Philox4x32 (Random123).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

struct Philox4 {
  uint32_t w[4];
};

// High 32 bits of the 64-bit product a * b.
LORA_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1).
LORA_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                              uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < kPhiloxRounds; ++i) {
    const uint32_t hi0 = mulhi32(kPhiloxM0, c0);
    const uint32_t lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = mulhi32(kPhiloxM1, c2);
    const uint32_t lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  Philox4 out;
  out.w[0] = c0;
  out.w[1] = c1;
  out.w[2] = c2;
  out.w[3] = c3;
  return out;
}

// Number of Philox calls (groups of four elements) per row of K elements.
LORA_HD int64_t groups_per_row(int64_t K) { return (K + 3) / 4; }

// The four words for group g (columns 4g .. 4g+3) of row m: counter q = m * gpr + g.
LORA_HD Philox4 keep_words(uint32_t seed_lo, uint32_t seed_hi, int64_t m, int64_t g,
                           int64_t gpr) {
  const uint64_t q = static_cast<uint64_t>(m) * static_cast<uint64_t>(gpr) +
                     static_cast<uint64_t>(g);
  return philox4x32_10(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), 0u, 0u,
                       seed_lo, seed_hi);
}

// The multiplier of one element under dropout: scale when kept, 0 when dropped.
LORA_HD float keep_factor(uint32_t word, uint32_t threshold, float scale) {
  return word >= threshold ? scale : 0.0f;
}

}  // namespace lora
