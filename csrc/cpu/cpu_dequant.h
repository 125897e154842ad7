// The 4-bit dequantize (bitsandbytes NF4 / FP4; the format and the reference decode are
// lora_kernels/quant4bit.py), compiled once per instruction set like the other kernels:
//
//   out[i] = code[c_i] * scale[i / blocksize]     c_{2j} the high nibble of packed[j],
//                                                 c_{2j+1} its low nibble
//   scale[b] = absmax[b], or with double quantization
//   scale[b] = absmax_code[absmax_q[b]] * absmax2[b / blocksize2] + offset
//
// one float32 product per element rounded once to T, and the nested product rounded
// before the offset is added: bit-identical to bitsandbytes. The 16-entry code table is
// one AVX-512 register (a permute is the lookup), or two AVX2 registers and a blend.
#pragma once

#include "cpu/cpu_common.h"

namespace lora {
namespace cpu {
namespace LORA_CPU_NS {
namespace {

LORA_ALWAYS_INLINE float dequant_block_scale(const Dequant4bitArgs& p, int64_t b) {
  if (p.absmax_q == nullptr) return p.absmax[b];
  // volatile: the product is rounded to float32 before the sum, never contracted into a
  // fused multiply-add (the FMA targets would otherwise be free to).
  volatile float scaled = p.absmax_code[p.absmax_q[b]] * p.absmax2[b / p.blocksize2];
  return scaled + p.offset;
}

#if defined(LORA_CPU_AVX2) || defined(LORA_CPU_AVX512)
// The 16 codes of 8 bytes in element order (high nibble first), one per byte.
LORA_ALWAYS_INLINE __m128i dequant_nibbles16(const uint8_t* bytes) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b, low4);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
  return _mm_unpacklo_epi8(hi, lo);
}

// values[0..16) = code[c] * scale for the 16 codes of 8 bytes.
LORA_ALWAYS_INLINE void dequant_decode16(const uint8_t* bytes, const float* code, float scale,
                                         float* values) {
  const __m128i nibbles = dequant_nibbles16(bytes);
#if defined(LORA_CPU_AVX512)
  const __m512 table = _mm512_loadu_ps(code);
  const __m512i idx = _mm512_cvtepu8_epi32(nibbles);
  _mm512_storeu_ps(values, _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), _mm512_set1_ps(scale)));
#else
  const __m256 table_lo = _mm256_loadu_ps(code);
  const __m256 table_hi = _mm256_loadu_ps(code + 8);
  for (int half = 0; half < 2; ++half) {
    const __m256i idx = _mm256_cvtepu8_epi32(half == 0 ? nibbles : _mm_srli_si128(nibbles, 8));
    const __m256 lo = _mm256_permutevar8x32_ps(table_lo, idx);  // by the low 3 bits
    const __m256 hi = _mm256_permutevar8x32_ps(table_hi, idx);
    // Bit 3 of the code picks the upper half: shifted into the sign bit blendv reads.
    const __m256 pick_hi = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    const __m256 v = _mm256_blendv_ps(lo, hi, pick_hi);
    _mm256_storeu_ps(values + 8 * half, _mm256_mul_ps(v, _mm256_set1_ps(scale)));
  }
#endif
}
#endif

// out[0..count) for the codes starting at the high nibble of bytes[0] (count even, or
// the weight's odd last element).
template <class T>
LORA_ALWAYS_INLINE void dequant_run(const uint8_t* bytes, const float* code, float scale,
                                    int64_t count, T* out) {
  int64_t e = 0;
#if defined(LORA_CPU_AVX2) || defined(LORA_CPU_AVX512)
  float values[16];
  for (; e + 16 <= count; e += 16) {
    dequant_decode16(bytes + e / 2, code, scale, values);
    for (int i = 0; i < 16; ++i) out[e + i] = Store<T>::from(values[i]);
  }
#endif
  for (; e < count; ++e) {
    const uint8_t byte = bytes[e / 2];
    out[e] = Store<T>::from(code[e % 2 == 0 ? byte >> 4 : byte & 0xF] * scale);
  }
}

template <class T>
void dequant_4bit_impl(const Dequant4bitArgs& p) {
  T* out = static_cast<T*>(p.out);
  const int64_t blocks = ceil_div(p.n, p.blocksize);
  // Small weights in one thread: waking the team costs more than the work.
  const int threads = p.n >= (int64_t{1} << 16) ? num_threads_for(p.num_threads) : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * p.blocksize;  // even: a block starts on a byte
    const int64_t count = min64(p.n - start, p.blocksize);
    dequant_run<T>(p.packed + start / 2, p.code, dequant_block_scale(p, b), count, out + start);
  }
}

}  // namespace
}  // namespace LORA_CPU_NS
}  // namespace cpu
}  // namespace lora
