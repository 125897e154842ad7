// The 4-bit dequantize (bitsandbytes NF4 / FP4; the format and the reference decode are
// lora_kernels/quant4bit.py), compiled once per instruction set like the other kernels.
// The per-element decode, the nested absmax's included, is common/dequant4_decode.h,
// shared with the CUDA kernel; this file adds the vector path, in which the 16-entry
// code table is one AVX-512 register (a permute is the lookup), or two AVX2 registers
// and a blend, and the product is the same single float32 multiply.
#pragma once

#include "common/dequant4_decode.h"
#include "cpu/cpu_common.h"

namespace lora {
namespace cpu {
namespace LORA_CPU_NS {
namespace {

LORA_ALWAYS_INLINE Dequant4Scales dequant_scales(const Dequant4bitArgs& p) {
  return Dequant4Scales{p.absmax, p.absmax_q, p.absmax_code, p.absmax2, p.blocksize2, p.offset};
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

#if defined(LORA_CPU_AVX2) || defined(LORA_CPU_AVX512)
// Store<T>::from for 16 values at once, bit for bit: bfloat16 by f32_to_bf16's integer
// rounding (nearest even, NaN -> 0x7FC0), half by the F16C conversion (nearest even,
// subnormals kept) with NaN first made f32_to_f16's quiet NaN of the same sign.
LORA_ALWAYS_INLINE void store16(const float* values, float* out) { memcpy(out, values, 64); }

#if defined(LORA_CPU_AVX512)
LORA_ALWAYS_INLINE void store16(const float* values, bf16* out) {
  const __m512 v = _mm512_loadu_ps(values);
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
  __m512i bits = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  bits = _mm512_mask_mov_epi32(bits, nan, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(bits));
}

LORA_ALWAYS_INLINE void store16(const float* values, f16* out) {
  __m512 v = _mm512_loadu_ps(values);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(INT32_MIN));
  const __m512i quiet = _mm512_or_si512(sign, _mm512_set1_epi32(0x7FC00000));
  v = _mm512_mask_mov_ps(v, nan, _mm512_castsi512_ps(quiet));
  const __m256i half = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), half);
}
#else
LORA_ALWAYS_INLINE void store16(const float* values, bf16* out) {
  for (int h = 0; h < 2; ++h) {
    const __m256 v = _mm256_loadu_ps(values + 8 * h);
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
    __m256i bits = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    bits = _mm256_blendv_epi8(bits, _mm256_set1_epi32(0x7FC0), nan);
    // Every lane is below 0x10000, so the unsigned-saturating pack is exact.
    const __m128i packed =
        _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 8 * h), packed);
  }
}

LORA_ALWAYS_INLINE void store16(const float* values, f16* out) {
  for (int h = 0; h < 2; ++h) {
    __m256 v = _mm256_loadu_ps(values + 8 * h);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    const __m256i sign = _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(INT32_MIN));
    const __m256i quiet = _mm256_or_si256(sign, _mm256_set1_epi32(0x7FC00000));
    v = _mm256_blendv_ps(v, _mm256_castsi256_ps(quiet), nan);
    const __m128i half = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 8 * h), half);
  }
}
#endif

LORA_ALWAYS_INLINE void store16(const float* values, double* out) {
  for (int i = 0; i < 16; ++i) out[i] = values[i];
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
    store16(values, out + e);
  }
#endif
  for (; e < count; ++e) {
    out[e] = Store<T>::from(dequant4_value(code, dequant4_code(bytes, e), scale));
  }
}

template <class T>
void dequant_4bit_impl(const Dequant4bitArgs& p) {
  T* out = static_cast<T*>(p.out);
  const int64_t blocks = ceil_div(p.n, p.blocksize);
  const Dequant4Scales scales = dequant_scales(p);
  // Small weights in one thread: waking the team costs more than the work.
  const int threads = p.n >= (int64_t{1} << 16) ? num_threads_for(p.num_threads) : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * p.blocksize;  // even: a block starts on a byte
    const int64_t count = min64(p.n - start, p.blocksize);
    dequant_run<T>(p.packed + start / 2, p.code, dequant4_block_scale(scales, b), count,
                   out + start);
  }
}

}  // namespace
}  // namespace LORA_CPU_NS
}  // namespace cpu
}  // namespace lora
