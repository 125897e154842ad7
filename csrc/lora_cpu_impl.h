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

// Columns per task block: a multiple of kPadK (so of every tile width) and of 4.
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

#if defined(LORA_CPU_AVX2) || defined(LORA_CPU_AVX512)
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

// fac[4 * i + j] = keep_factor(word j of Philox group g0 + i of row m), i < ng.
LORA_ALWAYS_INLINE void mask_factors(float* fac, const Mask& mk, int64_t m, int64_t g0, int64_t ng,
                                     int64_t gpr) {
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
  const __m256i threshold = _mm256_set1_epi32(static_cast<int>(mk.threshold));
  const __m256 scale = _mm256_set1_ps(mk.scale);
#if defined(LORA_CPU_AVX512)
  const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i mul0 = _mm512_set1_epi64(kPhiloxM0), mul1 = _mm512_set1_epi64(kPhiloxM1);
  for (; i + 16 <= ng; i += 16) {
    const __m512i qa = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(q0 + i)), lane);
    const __m512i qb = _mm512_add_epi64(qa, _mm512_set1_epi64(8));
    // State words: only the low 32 bits of each 64-bit lane count.
    __m512i a0 = qa, a1 = _mm512_srli_epi64(qa, 32), a2 = _mm512_setzero_si512(), a3 = a2;
    __m512i b0 = qb, b1 = _mm512_srli_epi64(qb, 32), b2 = a2, b3 = a2;
    for (int r = 0; r < kPhiloxRounds; ++r) {
      const __m512i k0 = _mm512_set1_epi64(k0s[r]), k1 = _mm512_set1_epi64(k1s[r]);
      const __m512i pa0 = _mm512_mul_epu32(a0, mul0), pa1 = _mm512_mul_epu32(a2, mul1);
      const __m512i pb0 = _mm512_mul_epu32(b0, mul0), pb1 = _mm512_mul_epu32(b2, mul1);
      // hi32 of each product moved to the low word by a dword swap (a shuffle-port op,
      // the multiplies use the other port); 0x96: three-way xor.
      a0 = _mm512_ternarylogic_epi64(_mm512_shuffle_epi32(pa1, _MM_PERM_CDAB), a1, k0, 0x96);
      a2 = _mm512_ternarylogic_epi64(_mm512_shuffle_epi32(pa0, _MM_PERM_CDAB), a3, k1, 0x96);
      a1 = pa1;
      a3 = pa0;
      b0 = _mm512_ternarylogic_epi64(_mm512_shuffle_epi32(pb1, _MM_PERM_CDAB), b1, k0, 0x96);
      b2 = _mm512_ternarylogic_epi64(_mm512_shuffle_epi32(pb0, _MM_PERM_CDAB), b3, k1, 0x96);
      b1 = pb1;
      b3 = pb0;
    }
    store_interleaved(fac + 4 * i, factors8(_mm512_cvtepi64_epi32(a0), threshold, scale),
                      factors8(_mm512_cvtepi64_epi32(a1), threshold, scale),
                      factors8(_mm512_cvtepi64_epi32(a2), threshold, scale),
                      factors8(_mm512_cvtepi64_epi32(a3), threshold, scale));
    store_interleaved(fac + 4 * i + 32, factors8(_mm512_cvtepi64_epi32(b0), threshold, scale),
                      factors8(_mm512_cvtepi64_epi32(b1), threshold, scale),
                      factors8(_mm512_cvtepi64_epi32(b2), threshold, scale),
                      factors8(_mm512_cvtepi64_epi32(b3), threshold, scale));
  }
#else
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

// Rows of one shrink tile: one accumulator register per row (per vector of R).
constexpr int kShrinkRows = 8;

// U = D(X) at, tiles of kShrinkRows rows x one vector of R, the k loop innermost:
//   c[i] += d[i][k] * at[k, r-vector]     (a broadcast multiply-add per row)
// Rows are independent, so each row's result is the same for any split over threads.
template <class T>
void shrink_impl(const ShrinkArgs& p) {
  using acc = typename AccOf<T>::type;
  using V = typename Vec<acc>::type;
  constexpr int VL = Vec<acc>::n;
  constexpr int MR = kShrinkRows;
  const int64_t M = p.M, K = p.K, R = p.R;
  const int64_t Kp = round_up(K, kPadK), Rv = round_up(R, kPadR);
  const int64_t gpr = groups_per_row(K);
  const int64_t ntiles = ceil_div(M, MR);
  const T* x = static_cast<const T*>(p.x);
  const acc* at = static_cast<const acc*>(p.at);
  acc* u = static_cast<acc*>(p.u);
  const Mask mk = p.mask;
#pragma omp parallel num_threads(num_threads_for(p.num_threads))
  {
    Buffer<acc> d(MR * kChunk);
    Buffer<acc> zeros(kChunk);
    Buffer<float> fac(kChunk);
    Buffer<acc> part(MR * Rv);
    fill(zeros.p, kChunk, acc(0));
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < ntiles; ++tile) {
      const int64_t m0 = tile * MR;
      const int64_t nrows = min64(MR, M - m0);
      fill(part.p, MR * Rv, acc(0));
      for (int64_t k0 = 0; k0 < Kp; k0 += kChunk) {
        const int64_t kc = min64(kChunk, Kp - k0);
        const int64_t nvalid = min64(kc, K - k0);
        // float32/float64 rows of a full block without dropout are read in place;
        // otherwise D(X) is converted and masked into the scratch rows first.
        const bool direct = Same<T, acc>::value && !mk.active && nvalid == kc;
        const acc* rows[MR];
        for (int64_t i = 0; i < MR; ++i) {
          if (direct) {
            rows[i] = i < nrows ? reinterpret_cast<const acc*>(x + (m0 + i) * p.ldx + k0) : zeros.p;
            continue;
          }
          const float* f = nullptr;
          if (i < nrows && mk.active) {
            mask_factors(fac.p, mk, m0 + i, k0 / 4, ceil_div(nvalid, 4), gpr);
            f = fac.p;
          }
          load_row<T, acc>(d.p + i * kChunk, i < nrows ? x + (m0 + i) * p.ldx + k0 : nullptr,
                           nvalid, kc, f);
          rows[i] = d.p + i * kChunk;
        }
        for (int64_t r0 = 0; r0 < Rv; r0 += VL) {
          V c[MR];
          for (int i = 0; i < MR; ++i) c[i] = vload<V>(part.p + i * Rv + r0);
          const acc* b = at + k0 * Rv + r0;
          for (int64_t k = 0; k < kc; ++k) {
            const V bv = vload<V>(b + k * Rv);
            for (int i = 0; i < MR; ++i) c[i] += bv * rows[i][k];
          }
          for (int i = 0; i < MR; ++i) vstore(part.p + i * Rv + r0, c[i]);
        }
      }
      for (int64_t i = 0; i < nrows; ++i)
        for (int64_t r = 0; r < R; ++r) u[(m0 + i) * p.ldu + r] = part.p[i * Rv + r];
    }
  }
}

// Rows and vectors of one expand / reduce tile.
constexpr int kTileRows = 4;
constexpr int kTileVecs = 4;

// Row chunks of the reduction: a function of (M, K) only, never of the thread count.
inline int64_t reduce_chunks(int64_t M, int64_t nkb) {
  const int64_t want = ceil_div(32, nkb);
  return max64(1, min64(want, M / 256));
}

// The fused expand / reduce pass (see ExpandReduceArgs). A task is (row chunk, column
// block); inside it, tiles of kTileRows rows x kTileVecs vectors:
//   expand: c[i][j] = sum_r g[m_i, r] a[r, k_j]  (registers), then one update of out
//   reduce: sums_chunk[r, k_j] += sum_i g2[m_i, r] d[i][k_j]  (d in registers)
template <class T>
void expand_reduce_impl(const ExpandReduceArgs& p) {
  using acc = typename AccOf<T>::type;
  using V = typename Vec<acc>::type;
  constexpr int VL = Vec<acc>::n;
  constexpr int MR = kTileRows;
  constexpr int NV = kTileVecs;
  constexpr int TW = NV * VL;  // tile width in columns; divides kPadK and kChunk
  const int64_t M = p.M, K = p.K, R = p.R, R2 = p.R2;
  const int64_t Kp = round_up(K, kPadK);
  const int64_t nkb = ceil_div(Kp, kChunk);
  const int64_t gpr = groups_per_row(K);
  const bool do_expand = p.out != nullptr && R > 0;
  const bool do_reduce = p.sums != nullptr;
  acc* sums = static_cast<acc*>(p.sums);
  if (M <= 0 || K <= 0 || (!do_expand && !do_reduce)) {
    if (do_reduce)
      for (int64_t r = 0; r < R2; ++r)
        for (int64_t k = 0; k < K; ++k) sums[r * p.ldsums + k] = acc(0);
    return;
  }
  int64_t nchunks = do_reduce ? reduce_chunks(M, nkb) : ceil_div(M, 64);
  const int64_t rows_per_chunk = round_up(ceil_div(M, nchunks), MR);
  nchunks = ceil_div(M, rows_per_chunk);
  T* out = static_cast<T*>(p.out);
  const T* in = p.in != nullptr ? static_cast<const T*>(p.in) : out;
  const int64_t ldi = p.in != nullptr ? p.ldi : p.ldo;
  const T* x = static_cast<const T*>(p.x);
  const acc* g = static_cast<const acc*>(p.g);
  const acc* g2 = static_cast<const acc*>(p.g2);
  const acc* a = static_cast<const acc*>(p.a);
  const acc s = do_expand ? *static_cast<const acc*>(p.s) : acc(0);
  const Mask mk = p.mask;
  // Partial sums of each row chunk, added in chunk order at the end.
  const bool staged = do_reduce && nchunks > 1;
  Buffer<acc> staging(staged ? nchunks * R2 * Kp : 1);
#pragma omp parallel num_threads(num_threads_for(p.num_threads))
  {
    Buffer<float> fac(MR * kChunk);
    Buffer<float> fzeros(kChunk);
    Buffer<acc> d(MR * kChunk);
    Buffer<acc> zeros(kChunk);
    Buffer<acc> t(MR * TW);
    fill(fzeros.p, kChunk, 0.0f);
    fill(zeros.p, kChunk, acc(0));
    Buffer<acc> racc(do_reduce ? R2 * kChunk : 1);
    Buffer<acc> gb(MR * (R > 0 ? R : 1));
    Buffer<acc> gb2(MR * (R2 > 0 ? R2 : 1));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < nchunks * nkb; ++task) {
      const int64_t chunk = task / nkb, kb = task % nkb;
      const int64_t k0 = kb * kChunk;
      const int64_t kc = min64(kChunk, Kp - k0);
      const int64_t nvalid = min64(kc, K - k0);
      const int64_t m_begin = chunk * rows_per_chunk;
      const int64_t m_end = min64(M, m_begin + rows_per_chunk);
      if (do_reduce) fill(racc.p, R2 * kChunk, acc(0));
      for (int64_t m0 = m_begin; m0 < m_end; m0 += MR) {
        const int64_t nrows = min64(MR, m_end - m0);
        if (mk.active)
          for (int64_t i = 0; i < nrows; ++i)
            mask_factors(fac.p + i * kChunk, mk, m0 + i, k0 / 4, ceil_div(nvalid, 4), gpr);
        if (do_expand) {
          // gb is [R][MR]: the MR coefficients of one r side by side.
          for (int64_t r = 0; r < R; ++r)
            for (int64_t i = 0; i < MR; ++i)
              gb.p[r * MR + i] = i < nrows ? g[(m0 + i) * p.ldg + r] : acc(0);
          for (int64_t kt = 0; kt < kc; kt += TW) {
            V c[MR][NV] = {};
            const acc* ar = a + k0 + kt;
            for (int64_t r = 0; r < R; ++r) {
              V av[NV];
              for (int j = 0; j < NV; ++j) av[j] = vload<V>(ar + r * p.lda + j * VL);
              for (int i = 0; i < MR; ++i) {
                const acc gi = gb.p[r * MR + i];
                for (int j = 0; j < NV; ++j) c[i][j] += av[j] * gi;
              }
            }
            for (int i = 0; i < MR; ++i)
              for (int j = 0; j < NV; ++j) vstore(t.p + i * TW + j * VL, c[i][j]);
            const int64_t nk = min64(TW, nvalid - kt);
            for (int64_t i = 0; i < nrows; ++i) {
              T* o = out + (m0 + i) * p.ldo + k0 + kt;
              const T* src = in + (m0 + i) * ldi + k0 + kt;
              const acc* ti = t.p + i * TW;
              if (mk.active) {
                const float* fi = fac.p + i * kChunk + kt;
                for (int64_t k = 0; k < nk; ++k)
                  o[k] = Store<T>::from(expand_elem<acc>(to_acc(src[k]), s, fi[k], ti[k]));
              } else {
                for (int64_t k = 0; k < nk; ++k)
                  o[k] = Store<T>::from(expand_elem<acc>(to_acc(src[k]), s, 1.0f, ti[k]));
              }
            }
          }
        }
        if (do_reduce) {
          // float32 / float64 rows of a full block are read in place, D(X) = X * factor
          // formed in registers (float32 only: the factors are float32); otherwise D(X)
          // is converted and masked into the scratch rows first.
          const bool direct = Same<T, acc>::value && nvalid == kc &&
                              (!mk.active || Same<acc, float>::value);
          const acc* rows[MR];
          const float* frows[MR];
          for (int64_t i = 0; i < MR; ++i) {
            for (int64_t r = 0; r < R2; ++r)
              gb2.p[r * MR + i] = i < nrows ? g2[(m0 + i) * p.ldg2 + r] : acc(0);
            if (direct) {
              rows[i] = i < nrows ? reinterpret_cast<const acc*>(x + (m0 + i) * p.ldx + k0) : zeros.p;
              frows[i] = i < nrows ? fac.p + i * kChunk : fzeros.p;
            } else {
              load_row<T, acc>(d.p + i * kChunk, i < nrows ? x + (m0 + i) * p.ldx + k0 : nullptr,
                               nvalid, kc, mk.active ? fac.p + i * kChunk : nullptr);
              rows[i] = d.p + i * kChunk;
              frows[i] = nullptr;
            }
          }
          const bool scale_rows = direct && mk.active;
          for (int64_t kt = 0; kt < kc; kt += TW) {
            V dv[MR][NV];
            for (int i = 0; i < MR; ++i)
              for (int j = 0; j < NV; ++j) dv[i][j] = vload<V>(rows[i] + kt + j * VL);
            if (scale_rows) {
              // The same product as dropout_elem(): x * factor, in float32.
              for (int i = 0; i < MR; ++i)
                for (int j = 0; j < NV; ++j)
                  dv[i][j] *= vload<V>(reinterpret_cast<const acc*>(frows[i] + kt + j * VL));
            }
            for (int64_t r = 0; r < R2; ++r) {
              acc* pr = racc.p + r * kChunk + kt;
              const acc* gr = gb2.p + r * MR;
              for (int j = 0; j < NV; ++j) {
                V sv = vload<V>(pr + j * VL);
                for (int i = 0; i < MR; ++i) sv += dv[i][j] * gr[i];
                vstore(pr + j * VL, sv);
              }
            }
          }
        }
      }
      if (do_reduce) {
        if (staged) {
          acc* dst = staging.p + chunk * R2 * Kp + k0;
          for (int64_t r = 0; r < R2; ++r)
            for (int64_t k = 0; k < kc; ++k) dst[r * Kp + k] = racc.p[r * kChunk + k];
        } else {
          for (int64_t r = 0; r < R2; ++r)
            for (int64_t k = 0; k < nvalid; ++k)
              sums[r * p.ldsums + k0 + k] = racc.p[r * kChunk + k];
        }
      }
    }
    if (staged) {
#pragma omp for schedule(static)
      for (int64_t r = 0; r < R2; ++r) {
        acc* dst = sums + r * p.ldsums;
        for (int64_t k = 0; k < K; ++k) dst[k] = staging.p[r * Kp + k];
        for (int64_t c = 1; c < nchunks; ++c) {
          const acc* src = staging.p + (c * R2 + r) * Kp;
          for (int64_t k = 0; k < K; ++k) dst[k] += src[k];
        }
      }
    }
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

void shrink_entry(const ShrinkArgs& p) {
  if (p.M <= 0 || p.R <= 0) return;
  switch (p.dtype) {
    case DType::kFloat32:
      shrink_impl<float>(p);
      break;
    case DType::kFloat64:
      shrink_impl<double>(p);
      break;
    case DType::kBFloat16:
      shrink_impl<bf16>(p);
      break;
    case DType::kFloat16:
      shrink_impl<f16>(p);
      break;
  }
}

void expand_reduce_entry(const ExpandReduceArgs& p) {
  switch (p.dtype) {
    case DType::kFloat32:
      expand_reduce_impl<float>(p);
      break;
    case DType::kFloat64:
      expand_reduce_impl<double>(p);
      break;
    case DType::kBFloat16:
      expand_reduce_impl<bf16>(p);
      break;
    case DType::kFloat16:
      expand_reduce_impl<f16>(p);
      break;
  }
}

}  // namespace

#define LORA_STR2(x) #x
#define LORA_STR(x) LORA_STR2(x)
const Kernels kTable = {LORA_STR(LORA_CPU_NS), &shrink_entry, &expand_reduce_entry,
                        &keep_mask_impl};
#undef LORA_STR
#undef LORA_STR2

}  // namespace LORA_CPU_NS
}  // namespace cpu
}  // namespace lora

#undef LORA_ALWAYS_INLINE
