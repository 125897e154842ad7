// The CPU kernels' register tiles: loading (and masking) rows into a block's scratch,
// the shrink, reduce and expand micro-kernels over one block, and the per-chunk sums
// of a reduction.
#pragma once

#include "cpu/cpu_common.h"

namespace lora {
namespace cpu {
namespace LORA_CPU_NS {
namespace {

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

// part[i, r-vector] += sum_k rows[i][k] * a_t[k, r-vector] for i < MR, k < kc: the
// k loop innermost, a broadcast multiply-add per row. Rows are independent, so each
// row's result is the same for any split over threads.
template <class V, class acc>
LORA_ALWAYS_INLINE void shrink_tile(acc* part, int64_t Rv, const acc* const* rows, const acc* a_t,
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
    const acc* b = a_t + r0;
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
// AVX-512 has 32 vector registers: 8 x 2 accumulators fit with the operands. AVX2 and
// SSE have 16: 4 x 2 leaves room for the operands (8 x 2 would spill). Both were the
// faster of the shapes measured (the figures are in the commit history).
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

}  // namespace
}  // namespace LORA_CPU_NS
}  // namespace cpu
}  // namespace lora
