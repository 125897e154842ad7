// The CPU kernels (declared in lora_cpu.h). This header is compiled once per instruction
// set: each including file selects a target, defines LORA_CPU_NS and includes it. All
// code lives in an anonymous namespace (internal linkage), so the AVX-512 build of a
// function can never be merged by the linker into the baseline path.
//
// Loops are written for the auto-vectorizer: GCC vector types one native register wide
// (64 bytes with AVX-512, 32 with AVX2, 16 otherwise) in register-tiled multiply-add
// micro-kernels, plain element loops for loads, conversions and stores.
// The Philox keep mask has a hand-vectorized path for AVX2 and AVX-512 (the compiler
// widens Philox's 32x32->64-bit products poorly), checked bit for bit against the
// scalar philox4x32_10 of philox.h, which the other paths and the CUDA kernels use.
#pragma once

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
// LORA_CPU_AVX2 / LORA_CPU_AVX512: set by the including file for its target (GCC's
// target pragma does not define the __AVX2__ family of macros).
#if defined(LORA_CPU_AVX2) || defined(LORA_CPU_AVX512)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

#include "lora_cpu.h"
#include "lora_math.h"

#ifndef LORA_CPU_NS
#error "define LORA_CPU_NS (the instruction-set namespace) before including lora_cpu_impl.h"
#endif

#define LORA_ALWAYS_INLINE inline __attribute__((always_inline))

namespace lora {
namespace cpu {
namespace LORA_CPU_NS {
namespace {

// Columns per block: a multiple of kPadK (so of every tile width), of 4 and of 8 (a
// block's packed mask starts on a byte).
constexpr int64_t kChunk = 256;

// One native vector register: 64 bytes with AVX-512, 32 with AVX2, 16 otherwise.
#if defined(LORA_CPU_AVX512)
constexpr int kVecBytes = 64;
#elif defined(LORA_CPU_AVX2)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <class acc>
struct Vec {
  typedef acc type __attribute__((vector_size(kVecBytes)));
  static constexpr int n = kVecBytes / static_cast<int>(sizeof(acc));
};

template <class V, class acc>
LORA_ALWAYS_INLINE V vload(const acc* p) {
  V v;
  memcpy(&v, p, sizeof v);
  return v;
}

template <class V, class acc>
LORA_ALWAYS_INLINE void vstore(acc* p, V v) {
  memcpy(p, &v, sizeof v);
}

// vstore() with a non-temporal (streaming) store where the instruction set has one: for
// a large output written once and not read back soon, it skips the read for ownership of
// each line (on a one-thread DRAM-bound pass that read costs as much as the write). p
// must be aligned to the vector size. Callers issue store_fence() before the output is
// read by another thread.
template <class V, class acc>
LORA_ALWAYS_INLINE void vstore_stream(acc* p, V v) {
#if defined(LORA_CPU_AVX512)
  __m512i r;  // the bits of v, float or double alike
  memcpy(&r, &v, sizeof r);
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), r);
#elif defined(LORA_CPU_AVX2)
  __m256i r;
  memcpy(&r, &v, sizeof r);
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), r);
#else
  vstore(p, v);
#endif
}

LORA_ALWAYS_INLINE void store_fence() {
#if defined(LORA_CPU_AVX2) || defined(LORA_CPU_AVX512)
  _mm_sfence();
#endif
}

template <class A, class B>
struct Same {
  static constexpr bool value = false;
};
template <class A>
struct Same<A, A> {
  static constexpr bool value = true;
};

// A per-thread scratch buffer (malloc/free: no library templates in this file).
template <class E>
struct Buffer {
  E* p;
  explicit Buffer(int64_t n) : p(static_cast<E*>(malloc(sizeof(E) * (n > 0 ? n : 1)))) {}
  ~Buffer() { free(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

template <class E>
void fill(E* p, int64_t n, E v) {
  for (int64_t e = 0; e < n; ++e) p[e] = v;
}

inline int num_threads_for(int requested) { return requested > 0 ? requested : 1; }

#if defined(LORA_CPU_AVX2)
// Four rows of eight keep factors (word j of groups i..i+7) stored interleaved as
// fac[4 * i + j], 32 floats.
LORA_ALWAYS_INLINE void store_interleaved(float* o, __m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t0 = _mm256_unpacklo_ps(a, b), t1 = _mm256_unpackhi_ps(a, b);
  const __m256 t2 = _mm256_unpacklo_ps(c, d), t3 = _mm256_unpackhi_ps(c, d);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  _mm256_storeu_ps(o, _mm256_permute2f128_ps(u0, u1, 0x20));
  _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
  _mm256_storeu_ps(o + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
  _mm256_storeu_ps(o + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
}

// keep_factor() on eight words: scale where w >= threshold (unsigned), else 0.
LORA_ALWAYS_INLINE __m256 factors8(__m256i w, __m256i threshold, __m256 scale) {
  const __m256i keep = _mm256_cmpeq_epi32(_mm256_max_epu32(w, threshold), w);
  return _mm256_and_ps(scale, _mm256_castsi256_ps(keep));
}
#endif

// fac[4 * i + j] = keep_factor(word j of Philox group g0 + i of row m), i < ng. With
// bits_out != nullptr, also the packed mask of the first nvalid of those elements: bit
// e % 8 of bits_out[e / 8] for element 4 * g0 + e (g0 even, so bits_out[0] starts a byte
// of the row), padding bits 0.
LORA_ALWAYS_INLINE void mask_factors(float* fac, const Mask& mk, int64_t m, int64_t g0, int64_t ng,
                                     int64_t gpr, uint8_t* bits_out = nullptr, int64_t nvalid = 0) {
  int64_t packed = 0;  // elements whose bits are already written
  const uint32_t seed_lo = static_cast<uint32_t>(mk.seed);
  const uint32_t seed_hi = static_cast<uint32_t>(mk.seed >> 32);
  int64_t i = 0;
#if defined(LORA_CPU_AVX2) || defined(LORA_CPU_AVX512)
  // Philox in the 64-bit lanes of a vector: only the low 32 bits of each state word
  // are meaningful, and _mm*_mul_epu32 reads only those, so no masking is needed
  // between rounds. Two independent states per iteration hide the multiply latency.
  uint32_t k0s[kPhiloxRounds], k1s[kPhiloxRounds];
  {
    uint32_t k0 = seed_lo, k1 = seed_hi;
    for (int r = 0; r < kPhiloxRounds; ++r) {
      k0s[r] = k0;
      k1s[r] = k1;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
  }
  const uint64_t q0 = static_cast<uint64_t>(m) * static_cast<uint64_t>(gpr) +
                      static_cast<uint64_t>(g0);
#if defined(LORA_CPU_AVX512)
  const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i mul0 = _mm512_set1_epi64(kPhiloxM0), mul1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i threshold16 = _mm512_set1_epi32(static_cast<int>(mk.threshold));
  const __m512 scale16 = _mm512_set1_ps(mk.scale);
  // kSets independent states of 8 groups each per step: the chain of one round
  // (multiply, swap, xor) is longer than the issue time of two states' rounds, so four
  // keep both vector ports busy. One step covers 32 groups (128 elements): the factors
  // go to f, the packed keep bits to two words of bits.
  constexpr int kSets = 4;
  constexpr int64_t kStep = 8 * kSets;
  const auto philox_step = [&](int64_t i0, float* f, uint64_t* bits) {
    // State words: only the low 32 bits of each 64-bit lane count.
    __m512i st[kSets][4];
    for (int t = 0; t < kSets; ++t) {
      const __m512i q =
          _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(q0 + i0 + 8 * t)), lane);
      st[t][0] = q;
      st[t][1] = _mm512_srli_epi64(q, 32);
      st[t][2] = _mm512_setzero_si512();
      st[t][3] = st[t][2];
    }
    for (int r = 0; r < kPhiloxRounds; ++r) {
      const __m512i k0 = _mm512_set1_epi64(k0s[r]), k1 = _mm512_set1_epi64(k1s[r]);
      for (int t = 0; t < kSets; ++t) {
        const __m512i p0 = _mm512_mul_epu32(st[t][0], mul0);
        const __m512i p1 = _mm512_mul_epu32(st[t][2], mul1);
        // hi32 of each product moved to the low word by a dword swap (a shuffle-port
        // op, the multiplies use the other port); 0x96: three-way xor.
        st[t][0] = _mm512_ternarylogic_epi64(_mm512_shuffle_epi32(p1, _MM_PERM_CDAB), st[t][1],
                                             k0, 0x96);
        st[t][2] = _mm512_ternarylogic_epi64(_mm512_shuffle_epi32(p0, _MM_PERM_CDAB), st[t][3],
                                             k1, 0x96);
        st[t][1] = p1;
        st[t][3] = p0;
      }
    }
    // keep = (word >= threshold), unsigned; the words sit in the even dword lanes. The
    // compares give k-masks; pext/pdep (scalar ports, idle during Philox) put the bits
    // in element order (element 4 * group + word), and masked moves turn them into
    // factors. Two states (16 groups) make 64 elements, one word of bits.
    for (int t = 0; t < kSets; t += 2) {
      uint64_t word = 0;
      for (int j = 0; j < 4; ++j) {
        const uint32_t ka = _mm512_cmpge_epu32_mask(st[t][j], threshold16);
        const uint32_t kb = _mm512_cmpge_epu32_mask(st[t + 1][j], threshold16);
        const uint64_t by_group = _pext_u32(ka, 0x5555u) | (_pext_u32(kb, 0x5555u) << 8);
        word |= _pdep_u64(by_group, 0x1111111111111111ull << j);
      }
      for (int v = 0; v < 4; ++v)
        _mm512_storeu_ps(f + 32 * t + 16 * v,
                         _mm512_maskz_mov_ps(static_cast<__mmask16>(word >> (16 * v)), scale16));
      bits[t / 2] = word;
    }
  };
  // The packed bits of the step at group i, padding elements (past nvalid, in the row's
  // last group or past it in the last step) 0, and only the bytes the row has.
  const auto store_bits = [&](int64_t i0, uint64_t* bits) {
    for (int w = 0; w < kSets / 2; ++w) {
      const int64_t e0 = 4 * i0 + 64 * w;
      if (e0 >= nvalid) {
        bits[w] = 0;
      } else if (e0 + 64 > nvalid) {
        bits[w] &= (uint64_t{1} << (nvalid - e0)) - 1;
      }
    }
    const int64_t nbytes = min64(8 * (kSets / 2), ceil_div(nvalid, 8) - (4 * i0) / 8);
    memcpy(bits_out + (4 * i0) / 8, bits, static_cast<size_t>(nbytes));
    packed = min64(4 * (i0 + kStep), nvalid);
  };
  for (; i + kStep <= ng; i += kStep) {
    uint64_t bits[kSets / 2];
    philox_step(i, fac + 4 * i, bits);
    if (bits_out != nullptr) store_bits(i, bits);
  }
  if (i < ng) {
    // The last groups of the row: one more full step into scratch (Philox of counters
    // past the row is harmless), of which the first ng - i groups are kept.
    float tail[4 * kStep];
    uint64_t bits[kSets / 2];
    philox_step(i, tail, bits);
    memcpy(fac + 4 * i, tail, sizeof(float) * 4 * (ng - i));
    if (bits_out != nullptr) store_bits(i, bits);
    i = ng;
  }
#else
  const __m256i threshold = _mm256_set1_epi32(static_cast<int>(mk.threshold));
  const __m256 scale = _mm256_set1_ps(mk.scale);
  const __m256i lane = _mm256_set_epi64x(3, 2, 1, 0);
  const __m256i mul0 = _mm256_set1_epi64x(kPhiloxM0), mul1 = _mm256_set1_epi64x(kPhiloxM1);
  // Low 32-bit words of two 4 x 64-bit vectors as one vector of eight, in order.
  const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (; i + 8 <= ng; i += 8) {
    const __m256i qa =
        _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(q0 + i)), lane);
    const __m256i qb = _mm256_add_epi64(qa, _mm256_set1_epi64x(4));
    __m256i a0 = qa, a1 = _mm256_srli_epi64(qa, 32), a2 = _mm256_setzero_si256(), a3 = a2;
    __m256i b0 = qb, b1 = _mm256_srli_epi64(qb, 32), b2 = a2, b3 = a2;
    for (int r = 0; r < kPhiloxRounds; ++r) {
      const __m256i k0 = _mm256_set1_epi64x(k0s[r]), k1 = _mm256_set1_epi64x(k1s[r]);
      const __m256i pa0 = _mm256_mul_epu32(a0, mul0), pa1 = _mm256_mul_epu32(a2, mul1);
      const __m256i pb0 = _mm256_mul_epu32(b0, mul0), pb1 = _mm256_mul_epu32(b2, mul1);
      // 0xB1: swap the two dwords of each 64-bit lane (hi32 into the low word).
      a0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(pa1, 0xB1), a1), k0);
      a2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(pa0, 0xB1), a3), k1);
      a1 = pa1;
      a3 = pa0;
      b0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(pb1, 0xB1), b1), k0);
      b2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(pb0, 0xB1), b3), k1);
      b1 = pb1;
      b3 = pb0;
    }
    // 0xAA: odd 32-bit lanes from the second operand.
    const __m256i w0 = _mm256_permutevar8x32_epi32(
        _mm256_blend_epi32(a0, _mm256_slli_epi64(b0, 32), 0xAA), order);
    const __m256i w1 = _mm256_permutevar8x32_epi32(
        _mm256_blend_epi32(a1, _mm256_slli_epi64(b1, 32), 0xAA), order);
    const __m256i w2 = _mm256_permutevar8x32_epi32(
        _mm256_blend_epi32(a2, _mm256_slli_epi64(b2, 32), 0xAA), order);
    const __m256i w3 = _mm256_permutevar8x32_epi32(
        _mm256_blend_epi32(a3, _mm256_slli_epi64(b3, 32), 0xAA), order);
    store_interleaved(fac + 4 * i, factors8(w0, threshold, scale), factors8(w1, threshold, scale),
                      factors8(w2, threshold, scale), factors8(w3, threshold, scale));
  }
#endif
#endif
  for (; i < ng; ++i) {
    const Philox4 w = keep_words(seed_lo, seed_hi, m, g0 + i, gpr);
    fac[4 * i + 0] = keep_factor(w.w[0], mk.threshold, mk.scale);
    fac[4 * i + 1] = keep_factor(w.w[1], mk.threshold, mk.scale);
    fac[4 * i + 2] = keep_factor(w.w[2], mk.threshold, mk.scale);
    fac[4 * i + 3] = keep_factor(w.w[3], mk.threshold, mk.scale);
  }
  if (bits_out != nullptr) {
    packed = packed < nvalid ? packed : nvalid;
    for (int64_t e = packed; e < nvalid; e += 8) {
      unsigned v = 0;
      for (int64_t j = 0; j < 8 && e + j < nvalid; ++j) v |= (fac[e + j] != 0.0f ? 1u : 0u) << j;
      bits_out[e / 8] = static_cast<uint8_t>(v);
    }
  }
}

// fac[e] = scale where bit e % 8 of bits[e / 8] is set, else 0, for e < n: the factors of
// a packed mask saved by the forward (the same values mask_factors gives).
LORA_ALWAYS_INLINE void factors_from_bits(float* fac, const uint8_t* bits, int64_t n, float scale) {
  int64_t e = 0;
#if defined(LORA_CPU_AVX512)
  const __m512 scale16 = _mm512_set1_ps(scale);
  for (; e + 64 <= n; e += 64) {
    uint64_t word;
    memcpy(&word, bits + e / 8, sizeof word);
    for (int v = 0; v < 4; ++v)
      _mm512_storeu_ps(fac + e + 16 * v,
                       _mm512_maskz_mov_ps(static_cast<__mmask16>(word >> (16 * v)), scale16));
  }
#endif
  for (; e < n; ++e) fac[e] = ((bits[e >> 3] >> (e & 7)) & 1u) != 0 ? scale : 0.0f;
}

// d[k] = D(x)[k] for k < nvalid and 0 for nvalid <= k < n; a null row reads as zeros.
template <class T, class acc>
LORA_ALWAYS_INLINE void load_row(acc* d, const T* x, int64_t nvalid, int64_t n, const float* fac) {
  int64_t k = 0;
  if (x != nullptr) {
    if (fac != nullptr) {
      for (; k < nvalid; ++k) d[k] = dropout_elem<acc>(to_acc(x[k]), fac[k]);
    } else {
      for (; k < nvalid; ++k) d[k] = to_acc(x[k]);
    }
  }
  for (; k < n; ++k) d[k] = acc(0);
}

// ---- Blocking ------------------------------------------------------------------------
// The kernels walk [M, K] in blocks of kBlockRows rows x kChunk columns: the block's
// scratch (keep factors, D(X) rows) stays in L1 and every step of the pass (expand,
// reduce, shrink) reads it from there. Each block row is read left to right, so the
// hardware prefetcher sees kBlockRows sequential streams.
constexpr int64_t kBlockRows = 16;

// Outputs of at least this many bytes are written with streaming stores.
constexpr int64_t kStreamBytes = int64_t{4} << 20;

// Row chunks of a reduction: a function of M alone, never of the thread count, so the
// order of the sums over m (within a block, then block by block, then chunk by chunk)
// is the same for any number of threads.
inline int64_t reduce_rows_per_chunk(int64_t M) {
  const int64_t nchunks = max64(1, min64(16, M / 256));
  return round_up(ceil_div(M, nchunks), kBlockRows);
}

// Rows of one shrink tile: one accumulator register per row (per vector of R).
constexpr int kShrinkRows = 8;

// part[i, r-vector] += sum_k rows[i][k] * at[k, r-vector] for i < MR, k < kc: the
// k loop innermost, a broadcast multiply-add per row. Rows are independent, so each
// row's result is the same for any split over threads.
template <class V, class acc>
LORA_ALWAYS_INLINE void shrink_tile(acc* part, int64_t Rv, const acc* const* rows, const acc* at,
                                    int64_t kc) {
  constexpr int VL = static_cast<int>(sizeof(V) / sizeof(acc));
  constexpr int MR = kShrinkRows;
  for (int64_t r0 = 0; r0 < Rv; r0 += VL) {
    // Two sums per row, of even and of odd k: with one, each row's chain of dependent
    // multiply-adds (one per k) would bound the loop at one k per multiply-add latency.
    V c[MR], c_odd[MR];
    for (int i = 0; i < MR; ++i) {
      c[i] = vload<V>(part + i * Rv + r0);
      c_odd[i] = V{};
    }
    const acc* b = at + r0;
    int64_t k = 0;
    for (; k + 2 <= kc; k += 2) {
      const V bv = vload<V>(b + k * Rv), bv_odd = vload<V>(b + (k + 1) * Rv);
      for (int i = 0; i < MR; ++i) {
        c[i] += bv * rows[i][k];
        c_odd[i] += bv_odd * rows[i][k + 1];
      }
    }
    if (k < kc) {
      const V bv = vload<V>(b + k * Rv);
      for (int i = 0; i < MR; ++i) c[i] += bv * rows[i][k];
    }
    for (int i = 0; i < MR; ++i) vstore(part + i * Rv + r0, c[i] + c_odd[i]);
  }
}

// racc[r, k + j] += sum_{i < nrows} gb[i, r] * rows[i][k + j] for r < RB, j < CV vectors:
// the RB x CV sums stay in registers over the block's rows (one load of D(X) per CV
// vectors feeds RB * CV multiply-adds), and reach memory once per block.
template <int RB, int CV, class V, class acc>
LORA_ALWAYS_INLINE void reduce_tile(acc* racc, int64_t ldr, const acc* const* rows, int64_t nrows,
                                    const acc* gb, int64_t ldgb, int64_t k) {
  constexpr int VL = static_cast<int>(sizeof(V) / sizeof(acc));
  V c[RB][CV];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < CV; ++j) c[r][j] = V{} ;
  for (int64_t i = 0; i < nrows; ++i) {
    V d[CV];
    for (int j = 0; j < CV; ++j) d[j] = vload<V>(rows[i] + k + j * VL);
    const acc* gi = gb + i * ldgb;
    for (int r = 0; r < RB; ++r) {
      const acc gr = gi[r];
      for (int j = 0; j < CV; ++j) c[r][j] += d[j] * gr;
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < CV; ++j) {
      acc* o = racc + r * ldr + k + j * VL;
      vstore(o, vload<V>(o) + c[r][j]);
    }
}

// The reduce step of one block: racc[r, 0:kc] += sum_i gb[i, r] * rows[i][0:kc], r < R2.
template <class V, class acc>
LORA_ALWAYS_INLINE void reduce_block(acc* racc, int64_t ldr, const acc* const* rows,
                                     int64_t nrows, const acc* gb, int64_t R2, int64_t kc) {
  constexpr int VL = static_cast<int>(sizeof(V) / sizeof(acc));
  constexpr int RB = 8;
  int64_t r0 = 0;
  for (; r0 + RB <= R2; r0 += RB)
    for (int64_t k = 0; k < kc; k += 2 * VL)
      reduce_tile<RB, 2, V, acc>(racc + r0 * ldr, ldr, rows, nrows, gb + r0, R2, k);
  // The last R2 % 8 coefficients (the bias's column of ones, or a rank not a multiple
  // of 8) one at a time, four vectors wide.
  for (; r0 < R2; ++r0)
    for (int64_t k = 0; k < kc; k += 4 * VL)
      reduce_tile<1, 4, V, acc>(racc + r0 * ldr, ldr, rows, nrows, gb + r0, R2, k);
}

// Rows and vectors of one expand tile: per r, kTileVecs loads of a and kTileRows
// broadcasts of g feed kTileRows x kTileVecs multiply-adds into as many registers.
// AVX-512 (32 registers): 8 x 2; in a training step (one thread, M=4096, K=N=1024,
// R=16, fp32) its forward expand took 3.4 ms against 4.0 for 4 x 4, the backward's was
// within the noise. AVX2 and SSE (16 registers): 4 x 2 leaves room for the operands
// (standalone, AVX2 build: 2.5 ms against 3.1 for 8 x 2 and 3.6 for 4 x 4).
#if defined(LORA_CPU_AVX512)
constexpr int kTileRows = 8;
#else
constexpr int kTileRows = 4;
#endif
constexpr int kTileVecs = 2;

// The expand step of kTileRows rows x one block of columns:
//   t = sum_r g[m_i, r] a[r, k]  (registers), then out = in + s * factor * t
// (or out = s * factor * t with overwrite). gb is [R][kTileRows]; in rows may have
// stride 0 (a broadcast row, the bias).
template <class T, class V, class acc>
LORA_ALWAYS_INLINE void expand_rows(T* out, int64_t ldo, const T* in, int64_t ldi, bool overwrite,
                                    bool stream,
                                    const acc* gb, const acc* a, int64_t lda, int64_t R, acc s,
                                    const float* fac, int64_t nrows, int64_t kc, int64_t nvalid,
                                    acc* t) {
  constexpr int VL = static_cast<int>(sizeof(V) / sizeof(acc));
  constexpr int MR = kTileRows;
  constexpr int NV = kTileVecs;
  constexpr int TW = NV * VL;
  for (int64_t kt = 0; kt < kc && kt < nvalid; kt += TW) {
    V c[MR][NV];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j) c[i][j] = V{};
    for (int64_t r = 0; r < R; ++r) {
      V av[NV];
      for (int j = 0; j < NV; ++j) av[j] = vload<V>(a + r * lda + kt + j * VL);
      for (int i = 0; i < MR; ++i) {
        const acc gi = gb[r * MR + i];
        for (int j = 0; j < NV; ++j) c[i][j] += av[j] * gi;
      }
    }
    const int64_t nk = min64(TW, nvalid - kt);
    for (int64_t i = 0; i < nrows; ++i) {
      T* o = out + i * ldo + kt;
      const T* src = in + i * ldi + kt;
      const float* fi = fac != nullptr ? fac + i * kChunk + kt : nullptr;
      if (Same<T, acc>::value && nk == TW) {
        // The vector form of expand_elem(): o + s * (factor * t).
        for (int j = 0; j < NV; ++j) {
          V term = c[i][j];
          if (fi != nullptr) {
            V f;
            for (int e = 0; e < VL; ++e) f[e] = static_cast<acc>(fi[j * VL + e]);
            term = f * term;
          }
          const V base = overwrite ? V{} : vload<V>(reinterpret_cast<const acc*>(src) + j * VL);
          const V value = overwrite ? s * term : base + s * term;
          if (stream) {
            vstore_stream(reinterpret_cast<acc*>(o) + j * VL, value);
          } else {
            vstore(reinterpret_cast<acc*>(o) + j * VL, value);
          }
        }
        continue;
      }
      for (int j = 0; j < NV; ++j) vstore(t + j * VL, c[i][j]);
      for (int64_t k = 0; k < nk; ++k) {
        const float f = fi != nullptr ? fi[k] : 1.0f;
        const acc base = overwrite ? acc(0) : to_acc(src[k]);
        o[k] = Store<T>::from(overwrite ? s * (static_cast<acc>(f) * t[k])
                                        : expand_elem<acc>(base, s, f, t[k]));
      }
    }
  }
}

// The rows of one block as the reduce and shrink steps read them: float32/float64 rows
// of a full column block without dropout in place, otherwise D(X) converted and masked
// into the scratch d (zero past column nvalid).
template <class T, class acc>
LORA_ALWAYS_INLINE void block_rows(const acc** rows, acc* d, const T* x, int64_t ldx,
                                   int64_t nrows, int64_t kc, int64_t nvalid, const float* fac) {
  const bool direct = Same<T, acc>::value && fac == nullptr && nvalid == kc;
  for (int64_t i = 0; i < nrows; ++i) {
    if (direct) {
      rows[i] = reinterpret_cast<const acc*>(x + i * ldx);
    } else {
      load_row<T, acc>(d + i * kChunk, x + i * ldx, nvalid, kc,
                       fac != nullptr ? fac + i * kChunk : nullptr);
      rows[i] = d + i * kChunk;
    }
  }
}

// The keep factors of one block (kChunk floats per row), or nullptr without dropout:
// read from the packed mask `bits_in` where given, else generated (and packed into
// `bits_out` where given). Packed rows have stride ldbits bytes.
LORA_ALWAYS_INLINE const float* block_factors(float* fac, const Mask& mk, int64_t m0,
                                              int64_t nrows, int64_t k0, int64_t nvalid,
                                              int64_t gpr, const uint8_t* bits_in,
                                              uint8_t* bits_out, int64_t ldbits) {
  if (!mk.active) return nullptr;
  for (int64_t i = 0; i < nrows; ++i) {
    const int64_t row = (m0 + i) * ldbits + k0 / 8;
    if (bits_in != nullptr) {
      factors_from_bits(fac + i * kChunk, bits_in + row, nvalid, mk.scale);
    } else {
      mask_factors(fac + i * kChunk, mk, m0 + i, k0 / 4, ceil_div(nvalid, 4), gpr,
                   bits_out != nullptr ? bits_out + row : nullptr, nvalid);
    }
  }
  return fac;
}

// The first ncols columns of nrows rows, from src (row stride ldsrc) to dst (ldd): a
// block's reduce coefficients packed side by side, or a block's R-padded U or G rows
// written out to [M, R].
template <class acc>
LORA_ALWAYS_INLINE void copy_rows(acc* dst, int64_t ldd, const acc* src, int64_t ldsrc,
                                  int64_t nrows, int64_t ncols) {
  for (int64_t i = 0; i < nrows; ++i)
    for (int64_t c = 0; c < ncols; ++c) dst[i * ldd + c] = src[i * ldsrc + c];
}

// Sums of each row chunk: written straight to `sums` with one chunk, otherwise staged
// and added in chunk order at the end (the order fixed by the shapes).
template <class acc>
struct ChunkSums {
  int64_t nchunks, R2, K, Kp;
  acc* sums;
  int64_t ldsums;
  Buffer<acc> staging;
  ChunkSums(int64_t nchunks_, int64_t R2_, int64_t K_, int64_t Kp_, acc* sums_, int64_t ld)
      : nchunks(nchunks_), R2(R2_), K(K_), Kp(Kp_), sums(sums_), ldsums(ld),
        staging(nchunks_ > 1 ? nchunks_ * R2_ * Kp_ : 1) {}
  void store(int64_t chunk, const acc* racc) {
    if (nchunks > 1) {
      memcpy(staging.p + chunk * R2 * Kp, racc, sizeof(acc) * R2 * Kp);
    } else {
      for (int64_t r = 0; r < R2; ++r) memcpy(sums + r * ldsums, racc + r * Kp, sizeof(acc) * K);
    }
  }
  // Inside the parallel region (a worksharing loop over r).
  void finish() {
    if (nchunks <= 1) return;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R2; ++r) {
      acc* dst = sums + r * ldsums;
      for (int64_t k = 0; k < K; ++k) dst[k] = staging.p[r * Kp + k];
      for (int64_t c = 1; c < nchunks; ++c) {
        const acc* src = staging.p + (c * R2 + r) * Kp;
        for (int64_t k = 0; k < K; ++k) dst[k] += src[k];
      }
    }
  }
};

template <class acc>
void zero_sums(acc* sums, int64_t R2, int64_t K, int64_t ldsums) {
  for (int64_t r = 0; r < R2; ++r)
    for (int64_t k = 0; k < K; ++k) sums[r * ldsums + k] = acc(0);
}

// U = D(X) at, and the packed keep mask where requested.
template <class T>
void shrink_impl(const ShrinkArgs& p) {
  using acc = typename AccOf<T>::type;
  using V = typename Vec<acc>::type;
  const int64_t M = p.M, K = p.K, R = p.R;
  if (M <= 0 || K <= 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < R; ++r) static_cast<acc*>(p.u)[m * p.ldu + r] = acc(0);
    return;
  }
  const int64_t Kp = round_up(K, kPadK), Rv = round_up(R > 0 ? R : 1, kPadR);
  const int64_t gpr = groups_per_row(K);
  // Rows are independent here, so the chunks serve load balance only.
  const int64_t rows_per_chunk = 4 * kBlockRows;
  const int64_t nchunks = ceil_div(M, rows_per_chunk);
  const T* x = static_cast<const T*>(p.x);
  const acc* at = static_cast<const acc*>(p.at);
  acc* u = static_cast<acc*>(p.u);
  const Mask mk = p.mask;
#pragma omp parallel num_threads(num_threads_for(p.num_threads))
  {
    Buffer<acc> d(kBlockRows * kChunk);
    Buffer<acc> zeros(kChunk);
    Buffer<float> fac(kBlockRows * kChunk);
    Buffer<acc> part(kBlockRows * Rv);
    fill(zeros.p, kChunk, acc(0));
#pragma omp for schedule(dynamic, 1)
    for (int64_t chunk = 0; chunk < nchunks; ++chunk) {
      const int64_t m_end = min64(M, (chunk + 1) * rows_per_chunk);
      for (int64_t m0 = chunk * rows_per_chunk; m0 < m_end; m0 += kBlockRows) {
        const int64_t nrows = min64(kBlockRows, m_end - m0);
        fill(part.p, kBlockRows * Rv, acc(0));
        for (int64_t k0 = 0; k0 < Kp; k0 += kChunk) {
          const int64_t kc = min64(kChunk, Kp - k0);
          const int64_t nvalid = min64(kc, K - k0);
          const float* f = block_factors(fac.p, mk, m0, nrows, k0, nvalid, gpr, nullptr,
                                         static_cast<uint8_t*>(p.keep_bits_out), p.ldbits);
          const acc* rows[kBlockRows];
          block_rows<T, acc>(rows, d.p, x + m0 * p.ldx + k0, p.ldx, nrows, kc, nvalid, f);
          for (int64_t i = nrows; i < kBlockRows; ++i) rows[i] = zeros.p;
          if (R > 0)
            for (int64_t i0 = 0; i0 < kBlockRows; i0 += kShrinkRows)
              if (i0 < nrows)
                shrink_tile<V, acc>(part.p + i0 * Rv, Rv, rows + i0, at + k0 * Rv, kc);
        }
        copy_rows(u + m0 * p.ldu, p.ldu, part.p, Rv, nrows, R);
      }
    }
  }
}

// The fused expand / reduce pass (see ExpandReduceArgs). Tasks are row chunks; inside
// one, blocks of kBlockRows rows x kChunk columns share one set of keep factors
// between the expand (in tiles of kTileRows rows) and the reduce.
template <class T>
void expand_reduce_impl(const ExpandReduceArgs& p) {
  using acc = typename AccOf<T>::type;
  using V = typename Vec<acc>::type;
  constexpr int MR = kTileRows;
  const int64_t M = p.M, K = p.K, R = p.R, R2 = p.R2;
  const int64_t Kp = round_up(K, kPadK);
  const int64_t gpr = groups_per_row(K);
  const bool do_expand = p.out != nullptr;
  const bool do_reduce = p.sums != nullptr;
  acc* sums = static_cast<acc*>(p.sums);
  if (M <= 0 || K <= 0 || (!do_expand && !do_reduce)) {
    if (do_reduce) zero_sums(sums, R2, K, p.ldsums);
    return;
  }
  const int64_t rows_per_chunk = do_reduce ? reduce_rows_per_chunk(M) : 4 * kBlockRows;
  const int64_t nchunks = ceil_div(M, rows_per_chunk);
  T* out = static_cast<T*>(p.out);
  const T* in = p.in != nullptr ? static_cast<const T*>(p.in) : out;
  const int64_t ldi = p.in != nullptr ? p.ldi : p.ldo;
  const T* x = static_cast<const T*>(p.x);
  const acc* g = static_cast<const acc*>(p.g);
  const acc* g2 = static_cast<const acc*>(p.g2);
  const acc* a = static_cast<const acc*>(p.a);
  const acc s = do_expand ? *static_cast<const acc*>(p.s) : acc(0);
  const Mask mk = p.mask;
  // Streaming stores for an output larger than L2 in the accumulation dtype (Y, dX, the
  // folded weight), written once and read next by ATen's GEMM, rows vector-aligned.
  const bool stream = do_expand && Same<T, acc>::value &&
                      M * p.ldo * static_cast<int64_t>(sizeof(T)) >= kStreamBytes &&
                      reinterpret_cast<uintptr_t>(out) % kVecBytes == 0 &&
                      (p.ldo * static_cast<int64_t>(sizeof(T))) % kVecBytes == 0;
  ChunkSums<acc> chunk_sums(do_reduce ? nchunks : 1, R2, K, Kp, sums, p.ldsums);
#pragma omp parallel num_threads(num_threads_for(p.num_threads))
  {
    Buffer<float> fac(kBlockRows * kChunk);
    Buffer<acc> d(kBlockRows * kChunk);
    Buffer<acc> t(kTileVecs * Vec<acc>::n);
    Buffer<acc> racc(do_reduce ? R2 * Kp : 1);
    Buffer<acc> gb(kBlockRows * (R > 0 ? R : 1));
    Buffer<acc> gb2(kBlockRows * (R2 > 0 ? R2 : 1));
#pragma omp for schedule(dynamic, 1)
    for (int64_t chunk = 0; chunk < nchunks; ++chunk) {
      const int64_t m_end = min64(M, (chunk + 1) * rows_per_chunk);
      if (do_reduce) fill(racc.p, R2 * Kp, acc(0));
      for (int64_t m0 = chunk * rows_per_chunk; m0 < m_end; m0 += kBlockRows) {
        const int64_t nrows = min64(kBlockRows, m_end - m0);
        if (do_expand) {
          // gb holds, per tile of MR rows, [R][MR]: the MR coefficients of one r side by side.
          for (int64_t i0 = 0; i0 < kBlockRows; i0 += MR)
            for (int64_t r = 0; r < R; ++r)
              for (int64_t i = 0; i < MR; ++i)
                gb.p[i0 * R + r * MR + i] = i0 + i < nrows ? g[(m0 + i0 + i) * p.ldg + r] : acc(0);
        }
        if (do_reduce) copy_rows(gb2.p, R2, g2 + m0 * p.ldg2, p.ldg2, nrows, R2);
        for (int64_t k0 = 0; k0 < Kp; k0 += kChunk) {
          const int64_t kc = min64(kChunk, Kp - k0);
          const int64_t nvalid = min64(kc, K - k0);
          const float* f = block_factors(fac.p, mk, m0, nrows, k0, nvalid, gpr,
                                         static_cast<const uint8_t*>(p.keep_bits), nullptr,
                                         p.ldbits);
          if (do_expand) {
            for (int64_t i0 = 0; i0 < nrows; i0 += MR) {
              expand_rows<T, V, acc>(out + (m0 + i0) * p.ldo + k0, p.ldo, in + (m0 + i0) * ldi + k0,
                                     ldi, p.overwrite, stream, gb.p + i0 * R, a + k0, p.lda, R, s,
                                     f != nullptr ? f + i0 * kChunk : nullptr,
                                     min64(MR, nrows - i0), kc, nvalid, t.p);
            }
          }
          if (do_reduce) {
            const acc* rows[kBlockRows];
            block_rows<T, acc>(rows, d.p, x + m0 * p.ldx + k0, p.ldx, nrows, kc, nvalid, f);
            reduce_block<V, acc>(racc.p + k0, Kp, rows, nrows, gb2.p, R2, kc);
          }
        }
      }
      if (do_reduce) chunk_sums.store(chunk, racc.p);
      if (stream) store_fence();  // this chunk's streamed rows, before the loop's barrier
    }
    if (do_reduce) chunk_sums.finish();
  }
}

// ---- The backward's pass over X and dY (grad_pass) --------------------------------------
// Rows per tile: over a tile's rows (one column chunk) U and G keep one register per
// row (per vector of R), so each element of X or dY is loaded once per pass and, in the
// pass over dY, one broadcast of it feeds both G's and dB's multiply-adds.
constexpr int kGradRows = kShrinkRows;
// Columns whose R-wide sums are in registers at once: four independent chains of
// kGradRows multiply-adds each cover the multiply-add latency.
constexpr int kSumCols = 4;

// Columns c .. c + NB of the sums over one tile's rows, r-vector r0:
//   sums_t[c + j, r0:] += sum_i rows[i][c + j] * coef[i]   (i in order)
// and with kShrink also g[i] += sum_j rows[i][c + j] * b[c + j, r0:] (the shrink).
template <int NB, bool kShrink, class V, class acc>
LORA_ALWAYS_INLINE void sum_columns(acc* sums_t, int64_t Rv, int64_t r0, const acc* const* rows,
                                    int64_t c, const V* coef, V* g, const acc* b) {
  V s[NB], bv[NB];
  for (int j = 0; j < NB; ++j) {
    s[j] = vload<V>(sums_t + (c + j) * Rv + r0);
    if (kShrink) bv[j] = vload<V>(b + (c + j) * Rv + r0);
  }
  for (int i = 0; i < kGradRows; ++i)
    for (int j = 0; j < NB; ++j) {
      const acc y = rows[i][c + j];
      s[j] += coef[i] * y;
      if (kShrink) g[i] += bv[j] * y;
    }
  for (int j = 0; j < NB; ++j) vstore(sums_t + (c + j) * Rv + r0, s[j]);
}

// The sums over one tile of kGradRows rows, R-wide and transposed ([n, Rv]: R is the
// vector axis), for columns c0 <= c < c0 + kc:
//   sums_t[c, :] += sum_i rows[i][c] * coef[i, :]
// and with kShrink, from the same broadcasts, gpart[i, :] += sum_c rows[i][c] * b[c, :]
// (G = dY B, summed over c in order: one chain per row, which the kSumCols columns'
// chains of the sums run beside).
template <bool kShrink, class V, class acc>
LORA_ALWAYS_INLINE void sum_rows_rv(acc* sums_t, int64_t Rv, const acc* const* rows,
                                    const acc* coef, int64_t c0, int64_t kc, acc* gpart,
                                    const acc* b) {
  constexpr int VL = static_cast<int>(sizeof(V) / sizeof(acc));
  constexpr int MR = kGradRows;
  for (int64_t r0 = 0; r0 < Rv; r0 += VL) {
    V cf[MR], g[MR];
    for (int i = 0; i < MR; ++i) {
      cf[i] = vload<V>(coef + i * Rv + r0);
      g[i] = kShrink ? vload<V>(gpart + i * Rv + r0) : V{};
    }
    int64_t c = c0;
    for (; c + kSumCols <= c0 + kc; c += kSumCols)
      sum_columns<kSumCols, kShrink, V, acc>(sums_t, Rv, r0, rows, c, cf, g, b);
    for (; c < c0 + kc; ++c) sum_columns<1, kShrink, V, acc>(sums_t, Rv, r0, rows, c, cf, g, b);
    if (kShrink)
      for (int i = 0; i < MR; ++i) vstore(gpart + i * Rv + r0, g[i]);
  }
}

// sum_rows_rv() with R in one vector (R <= 16 in float32) made a compile-time constant:
// the operands' offsets become immediates, which frees the registers that hold them.
template <bool kShrink, class V, class acc>
LORA_ALWAYS_INLINE void sum_rows(acc* sums_t, int64_t Rv, const acc* const* rows, const acc* coef,
                                 int64_t c0, int64_t kc, acc* gpart, const acc* b) {
  constexpr int VL = static_cast<int>(sizeof(V) / sizeof(acc));
  if (Rv == VL) {
    sum_rows_rv<kShrink, V, acc>(sums_t, VL, rows, coef, c0, kc, gpart, b);
  } else {
    sum_rows_rv<kShrink, V, acc>(sums_t, Rv, rows, coef, c0, kc, gpart, b);
  }
}

// sums[c] += sum_i rows[i][c] for c < n, i < nrows in order: the bias's column of ones.
// Column vectors outermost, the sum in a register over the rows: written as a plain
// loop over rows and columns, the compiler cannot vectorize it (sums may alias a row),
// and the scalar adds cost 1.2 ms of a 3.2 ms pass over dY (M = 4096, N = 1024, float32,
// one thread). The adds per element run in the same order either way.
template <class V, class acc>
LORA_ALWAYS_INLINE void sum_rows_of_ones(acc* sums, const acc* const* rows, int64_t nrows,
                                         int64_t n) {
  constexpr int VL = static_cast<int>(sizeof(V) / sizeof(acc));
  int64_t c = 0;
  for (; c + VL <= n; c += VL) {
    V s = vload<V>(sums + c);
    for (int64_t i = 0; i < nrows; ++i) s += vload<V>(rows[i] + c);
    vstore(sums + c, s);
  }
  for (; c < n; ++c) {
    acc s = sums[c];
    for (int64_t i = 0; i < nrows; ++i) s += rows[i][c];
    sums[c] = s;
  }
}

// The R-wide sums of a reduction over row chunks, kept transposed ([n, Rv]: R is the
// vector axis, as sum_rows adds them) in one slot per chunk, so a chunk neither copies
// nor transposes its sums. finish() adds the slots in chunk order (the order fixed by
// the shapes) and transposes once to [R, ldsums]. (Transposing and copying each chunk's
// sums instead cost 0.35 ms of a 4.7 ms pass: C++ harness, one thread, M = 4096, K = N
// = 1024, R = 16, 16 chunks.)
template <class acc>
struct TransposedChunkSums {
  int64_t nchunks, R, n, Rv;
  acc* sums;
  int64_t ldsums;
  Buffer<acc> slots;
  TransposedChunkSums(bool active, int64_t nchunks_, int64_t R_, int64_t n_, int64_t Rv_,
                      acc* sums_, int64_t ld)
      : nchunks(nchunks_), R(R_), n(n_), Rv(Rv_), sums(sums_), ldsums(ld),
        slots(active ? nchunks_ * n_ * Rv_ : 1) {}
  // The slot of one chunk, zeroed.
  acc* begin(int64_t chunk) {
    acc* slot = slots.p + chunk * n * Rv;
    fill(slot, n * Rv, acc(0));
    return slot;
  }
  // Inside the parallel region (a worksharing loop over blocks of columns).
  void finish() {
    constexpr int64_t kCols = 64;
#pragma omp for schedule(static)
    for (int64_t c0 = 0; c0 < n; c0 += kCols) {
      const int64_t nc = min64(kCols, n - c0);
      acc* first = slots.p + c0 * Rv;
      for (int64_t chunk = 1; chunk < nchunks; ++chunk) {
        const acc* src = slots.p + chunk * n * Rv + c0 * Rv;
        for (int64_t e = 0; e < nc * Rv; ++e) first[e] += src[e];
      }
      for (int64_t r = 0; r < R; ++r)
        for (int64_t c = 0; c < nc; ++c) sums[r * ldsums + c0 + c] = first[c * Rv + r];
    }
  }
};

// The backward's pass over X and dY (see GradPassArgs): without dropout the whole of
// it, U recomputed; with dropout only the pass over dY, the saved U read. Tasks are
// row chunks; per block of kBlockRows rows, column chunk by column chunk, in tiles of
// kGradRows rows, three passes over the block:
//   X:  U = X A^T                 shrink_tile, the forward's shrink (so the same U)
//   dY: G = dY B and dB's sums    sum_rows: one broadcast of dY[m, n] feeds both
//       U^T dY (+ the bias's 1^T dY, vectorized over n)
//   X:  dA's sums G^T X           sum_rows; the block's 64 KiB of X (K = 1024, float32)
//                                 read again from L2, not DRAM
// The R-wide sums stay transposed ([N, R], [K, R]: R is the vector axis) in each
// chunk's slot of a TransposedChunkSums until the end. In a training step (one thread,
// M = 4096, K = N = 1024, R = 16, float32) this took 4.5 ms standalone against 5.7 for
// the earlier pass, which summed dB and dA vectorized over n and k in their own loops
// (C++ harness over csrc/, warm caches). With U given, the pass over dY alone takes
// 1.85 ms against 2.66 for the shrink of dY followed by a separate reduce.
template <class T>
void grad_pass_impl(const GradPassArgs& p) {
  using acc = typename AccOf<T>::type;
  using V = typename Vec<acc>::type;
  constexpr int MR = kGradRows;
  const int64_t M = p.M, K = p.K, N = p.N, R = p.R;
  const int64_t R2 = (p.u_sums ? R : 0) + (p.ones ? 1 : 0);
  const bool dy_reduce = p.dy_sums != nullptr && R2 > 0;
  const bool u_sums = dy_reduce && p.u_sums && R > 0;
  const bool ones = dy_reduce && p.ones;
  const bool x_reduce = p.x_sums != nullptr && R > 0;
  acc* dy_sums = static_cast<acc*>(p.dy_sums);
  acc* x_sums = static_cast<acc*>(p.x_sums);
  if (M <= 0 || (K <= 0 && N <= 0)) {
    if (p.dy_sums != nullptr) zero_sums(dy_sums, R2, N, N);
    if (p.x_sums != nullptr) zero_sums(x_sums, R, K, K);
    for (int64_t e = 0; e < M * R; ++e) {
      if (p.g != nullptr) static_cast<acc*>(p.g)[e] = acc(0);
      if (p.u != nullptr) static_cast<acc*>(p.u)[e] = acc(0);
    }
    return;
  }
  const int64_t Kp = round_up(K, kPadK), Np = round_up(N, kPadK);
  const int64_t Rv = round_up(R > 0 ? R : 1, kPadR);
  const int64_t rows_per_chunk = reduce_rows_per_chunk(M);
  const int64_t nchunks = ceil_div(M, rows_per_chunk);
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const acc* at = static_cast<const acc*>(p.at);
  const acc* bt = static_cast<const acc*>(p.bt);
  acc* u = static_cast<acc*>(p.u);
  acc* g = static_cast<acc*>(p.g);
  // float32 / float64 rows are read in place, 16-bit ones converted per block.
  constexpr bool kDirect = Same<T, acc>::value;
  // U (read from u_in where the forward saved it, else computed) and G are formed where
  // they are returned or the sums need them (dB's U^T dY, dA's G^T X), and written out
  // to [M, R] only where returned; the passes over X and dY run only for what they
  // produce.
  const acc* u_in = static_cast<const acc*>(p.u_in);
  const bool need_u = u != nullptr || u_sums;
  const bool compute_u = need_u && u_in == nullptr;
  const bool need_g = g != nullptr || x_reduce;
  const bool x_pass = compute_u || x_reduce;
  const bool dy_pass = need_g || u_sums || ones;
  // dB's sums U^T dY in rows [0, R) of dy_sums, the bias's 1^T dY in its last row.
  // (The ones' sums are the case R = Rv = 1: a slot of N per chunk, no transpose.)
  TransposedChunkSums<acc> u_chunk_sums(u_sums, nchunks, R, N, Rv, dy_sums, N);
  TransposedChunkSums<acc> ones_chunk_sums(ones, nchunks, 1, N, 1,
                                          ones ? dy_sums + (R2 - 1) * N : nullptr, N);
  TransposedChunkSums<acc> x_chunk_sums(x_reduce, nchunks, R, K, Rv, x_sums, K);
#pragma omp parallel num_threads(num_threads_for(p.num_threads))
  {
    Buffer<acc> zeros(max64(Kp, Np));
    Buffer<acc> x_rows(kDirect ? 1 : kBlockRows * max64(K, 1));
    Buffer<acc> dy_rows(kDirect ? 1 : kBlockRows * max64(N, 1));
    Buffer<acc> part_u(kBlockRows * Rv);
    Buffer<acc> part_g(kBlockRows * Rv);
    fill(zeros.p, max64(Kp, Np), acc(0));
    // Row pointers of one block: in place, or converted into `scratch`; zeros past nrows.
    const auto block_rows_of = [&](const acc** rows, acc* scratch, const T* src, int64_t ld,
                                   int64_t nrows, int64_t cols) {
      for (int64_t i = 0; i < kBlockRows; ++i) {
        if (i >= nrows) {
          rows[i] = zeros.p;
        } else if (kDirect) {
          rows[i] = reinterpret_cast<const acc*>(src + i * ld);
        } else {
          load_row<T, acc>(scratch + i * cols, src + i * ld, cols, cols, nullptr);
          rows[i] = scratch + i * cols;
        }
      }
    };
#pragma omp for schedule(dynamic, 1)
    for (int64_t chunk = 0; chunk < nchunks; ++chunk) {
      const int64_t m_end = min64(M, (chunk + 1) * rows_per_chunk);
      acc* sums_dy_t = u_sums ? u_chunk_sums.begin(chunk) : nullptr;
      acc* sums_x_t = x_reduce ? x_chunk_sums.begin(chunk) : nullptr;
      acc* sums_ones = ones ? ones_chunk_sums.begin(chunk) : nullptr;
      for (int64_t m0 = chunk * rows_per_chunk; m0 < m_end; m0 += kBlockRows) {
        const int64_t nrows = min64(kBlockRows, m_end - m0);
        const acc* xr[kBlockRows];
        const acc* dyr[kBlockRows];
        // (16-bit rows are converted only for the passes that read them.)
        if (x_pass) block_rows_of(xr, x_rows.p, x + m0 * p.ldx, p.ldx, nrows, K);
        if (dy_pass) block_rows_of(dyr, dy_rows.p, dy + m0 * p.lddy, p.lddy, nrows, N);
        // The tiles of kGradRows rows that hold any of the block's nrows rows.
        const int64_t ntiles = ceil_div(nrows, MR);
        if (need_u) {
          fill(part_u.p, kBlockRows * Rv, acc(0));
          if (!compute_u) {
            copy_rows(part_u.p, Rv, u_in + m0 * p.ldu_in, p.ldu_in, nrows, R);
          } else if (R > 0) {
            for (int64_t c0 = 0; c0 < K; c0 += kChunk)
              for (int64_t t = 0; t < ntiles; ++t) {
                const acc* rows[MR];
                for (int i = 0; i < MR; ++i) rows[i] = xr[t * MR + i] + c0;
                shrink_tile<V, acc>(part_u.p + t * MR * Rv, Rv, rows, at + c0 * Rv,
                                    min64(kChunk, K - c0));
              }
          }
          if (u != nullptr) copy_rows(u + m0 * R, R, part_u.p, Rv, nrows, R);
        }
        if (need_g || u_sums) {
          fill(part_g.p, kBlockRows * Rv, acc(0));
          for (int64_t c0 = 0; c0 < N; c0 += kChunk)
            for (int64_t t = 0; t < ntiles; ++t) {
              const int64_t kc = min64(kChunk, N - c0);
              acc* gt = part_g.p + t * MR * Rv;
              const acc* ut = part_u.p + t * MR * Rv;
              if (u_sums && need_g) {
                sum_rows<true, V, acc>(sums_dy_t, Rv, dyr + t * MR, ut, c0, kc, gt, bt);
              } else if (u_sums) {
                sum_rows<false, V, acc>(sums_dy_t, Rv, dyr + t * MR, ut, c0, kc, nullptr,
                                        nullptr);
              } else if (R > 0) {
                const acc* rows[MR];
                for (int i = 0; i < MR; ++i) rows[i] = dyr[t * MR + i] + c0;
                shrink_tile<V, acc>(gt, Rv, rows, bt + c0 * Rv, kc);
              }
            }
          if (g != nullptr) copy_rows(g + m0 * R, R, part_g.p, Rv, nrows, R);
        }
        if (ones) sum_rows_of_ones<V, acc>(sums_ones, dyr, nrows, N);
        if (x_reduce)
          for (int64_t c0 = 0; c0 < K; c0 += kChunk)
            for (int64_t t = 0; t < ntiles; ++t)
              sum_rows<false, V, acc>(sums_x_t, Rv, xr + t * MR, part_g.p + t * MR * Rv, c0,
                                      min64(kChunk, K - c0), nullptr, nullptr);
      }
    }
    if (u_sums) u_chunk_sums.finish();
    if (ones) ones_chunk_sums.finish();
    if (x_reduce) x_chunk_sums.finish();
  }
}

void keep_mask_impl(uint8_t* keep, int64_t M, int64_t K, const Mask& mk, int num_threads) {
  const int64_t gpr = groups_per_row(K);
  const int64_t Kc = round_up(K, 4);
#pragma omp parallel num_threads(num_threads_for(num_threads))
  {
    Buffer<float> fac(Kc);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      if (mk.active) {
        mask_factors(fac.p, mk, m, 0, gpr, gpr);
        for (int64_t k = 0; k < K; ++k) keep[m * K + k] = fac.p[k] != 0.0f ? 1 : 0;
      } else {
        for (int64_t k = 0; k < K; ++k) keep[m * K + k] = 1;
      }
    }
  }
}

// Calls fn with a value of the storage type named by dtype (the kernel's T).
template <class Fn>
void by_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      fn(float{});
      break;
    case DType::kFloat64:
      fn(double{});
      break;
    case DType::kBFloat16:
      fn(bf16{});
      break;
    case DType::kFloat16:
      fn(f16{});
      break;
  }
}

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

}  // namespace

#define LORA_STR2(x) #x
#define LORA_STR(x) LORA_STR2(x)
const Kernels kTable = {LORA_STR(LORA_CPU_NS), &shrink_entry, &expand_reduce_entry,
                        &grad_pass_entry, &keep_mask_impl};
#undef LORA_STR
#undef LORA_STR2

}  // namespace LORA_CPU_NS
}  // namespace cpu
}  // namespace lora

#undef LORA_ALWAYS_INLINE
