// The forward passes of the CPU kernels (ShrinkArgs, ExpandReduceArgs in
// cpu_kernels.h), each one walk over the rows of [M, K] in blocks.
#pragma once

#include "cpu/cpu_common.h"
#include "cpu/cpu_mask.h"
#include "cpu/cpu_tiles.h"

namespace lora {
namespace cpu {
namespace LORA_CPU_NS {
namespace {

// U = D(X) A^T, and the packed keep mask where requested.
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
  const acc* a_t = static_cast<const acc*>(p.a_t);
  acc* u = static_cast<acc*>(p.u);
  const DropoutMask mk = p.mask;
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
                                         mk.keep_bits_out, mk.ldbits);
          const acc* rows[kBlockRows];
          block_rows<T, acc>(rows, d.p, x + m0 * p.ldx + k0, p.ldx, nrows, kc, nvalid, f);
          for (int64_t i = nrows; i < kBlockRows; ++i) rows[i] = zeros.p;
          if (R > 0)
            for (int64_t i0 = 0; i0 < kBlockRows; i0 += kShrinkRows)
              if (i0 < nrows)
                shrink_tile<V, acc>(part.p + i0 * Rv, Rv, rows + i0, a_t + k0 * Rv, kc);
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
  const DropoutMask mk = p.mask;
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
                                         mk.keep_bits, nullptr, mk.ldbits);
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

}  // namespace
}  // namespace LORA_CPU_NS
}  // namespace cpu
}  // namespace lora
