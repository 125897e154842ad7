// The backward's pass over the rows of X and dY on the CPU (GradPassArgs in
// cpu_kernels.h): U, G, dB's and db's sums over dY, and dA's sums over X, in one walk.
#pragma once

#include "cpu/cpu_common.h"
#include "cpu/cpu_tiles.h"

namespace lora {
namespace cpu {
namespace LORA_CPU_NS {
namespace {

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
// and scalar adds would be a large share of the pass over dY. The adds per element run
// in the same order either way.
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
// the shapes) and transposes once to [R, ldsums], rather than transposing and copying
// each chunk's sums as it ends.
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

// Row pointers of one block of the grad pass: float32 / float64 rows in place, 16-bit
// ones converted into `scratch` (rows of `cols`); `zeros` past nrows.
template <class T, class acc>
LORA_ALWAYS_INLINE void grad_block_rows(const acc** rows, acc* scratch, const acc* zeros,
                                        const T* src, int64_t ld, int64_t nrows, int64_t cols) {
  for (int64_t i = 0; i < kBlockRows; ++i) {
    if (i >= nrows) {
      rows[i] = zeros;
    } else if (Same<T, acc>::value) {
      rows[i] = reinterpret_cast<const acc*>(src + i * ld);
    } else {
      load_row<T, acc>(scratch + i * cols, src + i * ld, cols, cols, nullptr);
      rows[i] = scratch + i * cols;
    }
  }
}

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
// chunk's slot of a TransposedChunkSums until the end. Summing dB and dA in loops of
// their own (vectorized over n and k) would read each block of dY and X once more;
// with U given, the pass over dY alone replaces a shrink of dY followed by a separate
// reduce, each element of dY loaded once for both.
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
  const acc* a_t = static_cast<const acc*>(p.a_t);
  const acc* b = static_cast<const acc*>(p.b);
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
        if (x_pass) grad_block_rows(xr, x_rows.p, zeros.p, x + m0 * p.ldx, p.ldx, nrows, K);
        if (dy_pass) grad_block_rows(dyr, dy_rows.p, zeros.p, dy + m0 * p.lddy, p.lddy, nrows, N);
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
                shrink_tile<V, acc>(part_u.p + t * MR * Rv, Rv, rows, a_t + c0 * Rv,
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
                sum_rows<true, V, acc>(sums_dy_t, Rv, dyr + t * MR, ut, c0, kc, gt, b);
              } else if (u_sums) {
                sum_rows<false, V, acc>(sums_dy_t, Rv, dyr + t * MR, ut, c0, kc, nullptr,
                                        nullptr);
              } else if (R > 0) {
                const acc* rows[MR];
                for (int i = 0; i < MR; ++i) rows[i] = dyr[t * MR + i] + c0;
                shrink_tile<V, acc>(gt, Rv, rows, b + c0 * Rv, kc);
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

}  // namespace
}  // namespace LORA_CPU_NS
}  // namespace cpu
}  // namespace lora
