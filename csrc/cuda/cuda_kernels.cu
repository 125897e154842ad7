// CUDA kernels of the LoRA op (launchers declared in cuda_kernels.h). Only CUDA headers:
// the element math and the Philox mask come from common/element_math.h and
// common/philox.h, the same
// functions the CPU kernels run, so the CPU tests check this arithmetic too.
//
//   shrink_kernel   U = D(X) A^T        a block per kShrinkRows rows; D(X) staged in
//                                       shared memory, one warp per rank index
//   expand_kernel   O += s D(G A)       a thread per group of four columns
//   reduce_kernel   S = G2^T D(X)       a thread per four columns x kReduceRanks ranks,
//                                       rows in fixed chunks, chunks summed in order
//   keep_mask_kernel                    the mask itself, for tests
// The shrink writes the mask packed one bit per element (keep_bits) as it generates it;
// the backward kernels read those bits instead of running Philox again.
#include <cuda_runtime.h>
#include <stdint.h>

#include "common/dropout_mask.h"
#include "common/element_math.h"
#include "common/kernel_dtype.h"
#include "common/philox.h"
#include "cuda/cuda_kernels.h"

namespace lora {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kShrinkRows = 4;
// Columns of D(X) staged per step of the shrink: 16 KiB of shared memory.
constexpr int64_t kShrinkBytes = 16384;
constexpr int kReduceRanks = 16;
constexpr int64_t kReduceRows = kReduceChunkRows;

// The mask as a kernel applies it: the seed loaded from the device where it is used.
__device__ __forceinline__ DropoutMask load_mask(const DropoutMask& mask) {
  DropoutMask ms = mask;
  if (mask.active && mask.keep_bits == nullptr) {
    ms.seed = static_cast<uint64_t>(*mask.device_seed);
  }
  return ms;
}

// Factors of the four elements of group g of row m: keep_factor(), or 1 without dropout.
__device__ __forceinline__ void group_factors(const DropoutMask& ms, int64_t m, int64_t g,
                                              int64_t gpr, float f[4]) {
  if (!ms.active) {
    f[0] = f[1] = f[2] = f[3] = 1.0f;
    return;
  }
  if (ms.keep_bits != nullptr) {
    // The saved mask: group g is the low (even g) or high (odd g) nibble of a byte.
    const unsigned nibble = ms.keep_bits[m * ms.ldbits + g / 2] >> (4 * (g & 1));
#pragma unroll
    for (int j = 0; j < 4; ++j) f[j] = (nibble >> j) & 1u ? ms.scale : 0.0f;
    return;
  }
  const Philox4 w = keep_words(static_cast<uint32_t>(ms.seed), static_cast<uint32_t>(ms.seed >> 32),
                              m, g, gpr);
#pragma unroll
  for (int j = 0; j < 4; ++j) f[j] = keep_factor(w.w[j], ms.threshold, ms.scale);
}

template <class acc>
__device__ __forceinline__ acc warp_sum(acc v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    shrink_kernel(int64_t M, int64_t K, int64_t R, const T* __restrict__ x, int64_t ldx,
                  const typename AccOf<T>::type* __restrict__ a,
                  typename AccOf<T>::type* __restrict__ u, DropoutMask mask) {
  using acc = typename AccOf<T>::type;
  constexpr int64_t kChunk = kShrinkBytes / (kShrinkRows * static_cast<int64_t>(sizeof(acc)));
  constexpr int64_t kGroups = kChunk / 4;
  extern __shared__ __align__(16) unsigned char smem[];
  acc* d = reinterpret_cast<acc*>(smem);  // [kShrinkRows][kChunk]
  acc* part = d + kShrinkRows * kChunk;   // [kShrinkRows][R]
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / kWarp, lane = tid % kWarp, nwarps = kThreads / kWarp;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kShrinkRows;
  const int64_t gpr = groups_per_row(K);
  const DropoutMask ms = load_mask(mask);
  for (int64_t e = tid; e < kShrinkRows * R; e += kThreads) part[e] = acc(0);
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t kc = min64(kChunk, K - k0);
    __syncthreads();
    for (int64_t e = tid; e < kShrinkRows * kGroups; e += kThreads) {
      const int64_t i = e / kGroups, gl = e % kGroups;
      const int64_t m = m0 + i, k = k0 + 4 * gl;
      float f[4] = {1.0f, 1.0f, 1.0f, 1.0f};
      if (m < M && k < K) group_factors(ms, m, k / 4, gpr, f);
      unsigned nibble = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const bool valid = m < M && k + j < K;
        d[i * kChunk + 4 * gl + j] = valid ? dropout_elem<acc>(to_acc(x[m * ldx + k + j]), f[j])
                                           : acc(0);
        if (valid && f[j] != 0.0f) nibble |= 1u << j;
      }
      if (mask.keep_bits_out != nullptr && mask.active) {
        // Two neighbouring groups (lanes 2i and 2i + 1: kGroups and kThreads are even)
        // make one byte of the packed mask; the even one writes it.
        const unsigned high = __shfl_xor_sync(0xffffffffu, nibble, 1);
        if ((gl & 1) == 0 && m < M && k < K)
          mask.keep_bits_out[m * mask.ldbits + k / 8] =
              static_cast<uint8_t>(nibble | (high << 4));
      }
    }
    __syncthreads();
    // Rank r belongs to warp r % nwarps: only that warp touches part[., r].
    for (int64_t r = warp; r < R; r += nwarps) {
      acc s[kShrinkRows];
#pragma unroll
      for (int i = 0; i < kShrinkRows; ++i) s[i] = acc(0);
      const acc* ar = a + r * K + k0;
      for (int64_t k = lane; k < kc; k += kWarp) {
        const acc av = ar[k];
#pragma unroll
        for (int i = 0; i < kShrinkRows; ++i) s[i] += d[i * kChunk + k] * av;
      }
#pragma unroll
      for (int i = 0; i < kShrinkRows; ++i) {
        const acc total = warp_sum(s[i]);
        if (lane == 0) part[i * R + r] += total;
      }
    }
  }
  __syncthreads();
  for (int64_t e = tid; e < kShrinkRows * R; e += kThreads) {
    const int64_t i = e / R, r = e % R;
    if (m0 + i < M) u[(m0 + i) * R + r] = part[e];
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    expand_kernel(int64_t M, int64_t K, int64_t R, T* __restrict__ out, int64_t ldo,
                  const typename AccOf<T>::type* __restrict__ g,
                  const typename AccOf<T>::type* __restrict__ a,
                  const typename AccOf<T>::type* __restrict__ s_ptr, DropoutMask mask,
                  int64_t blocks_per_row) {
  using acc = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  acc* gs = reinterpret_cast<acc*>(smem);  // [R]: the coefficients of this row
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t m = static_cast<int64_t>(blockIdx.x) / blocks_per_row;
  const int64_t grp = (static_cast<int64_t>(blockIdx.x) % blocks_per_row) * kThreads + tid;
  for (int64_t r = tid; r < R; r += kThreads) gs[r] = g[m * R + r];
  __syncthreads();
  const int64_t k = 4 * grp;
  if (m >= M || k >= K) return;
  const acc s = *s_ptr;
  float f[4];
  group_factors(load_mask(mask), m, grp, groups_per_row(K), f);
  acc t[4] = {acc(0), acc(0), acc(0), acc(0)};
  for (int64_t r = 0; r < R; ++r) {
    const acc gr = gs[r];
    const acc* ar = a + r * K + k;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (k + j < K) t[j] += gr * ar[j];
  }
  T* o = out + m * ldo + k;
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (k + j < K) o[j] = Store<T>::from(expand_elem<acc>(to_acc(o[j]), s, f[j], t[j]));
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    reduce_kernel(int64_t M, int64_t K, int64_t R2, const T* __restrict__ x, int64_t ldx,
                  const typename AccOf<T>::type* __restrict__ g2,
                  typename AccOf<T>::type* __restrict__ dst, DropoutMask mask) {
  using acc = typename AccOf<T>::type;
  __shared__ acc gsh[kReduceRows][kReduceRanks];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t chunk = blockIdx.z;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kReduceRanks;
  const int64_t grp = static_cast<int64_t>(blockIdx.x) * kThreads + tid;
  const int64_t k = 4 * grp;
  const int64_t m_begin = chunk * kReduceRows;
  const int64_t m_end = min64(M, m_begin + kReduceRows);
  const int64_t nr = min64(kReduceRanks, R2 - r0);
  for (int64_t e = tid; e < kReduceRows * kReduceRanks; e += kThreads) {
    const int64_t i = e / kReduceRanks, r = e % kReduceRanks;
    gsh[i][r] = (m_begin + i < m_end && r < nr) ? g2[(m_begin + i) * R2 + r0 + r] : acc(0);
  }
  __syncthreads();
  if (k >= K) return;
  const DropoutMask ms = load_mask(mask);
  const int64_t gpr = groups_per_row(K);
  acc sums[kReduceRanks][4];
#pragma unroll
  for (int r = 0; r < kReduceRanks; ++r)
#pragma unroll
    for (int j = 0; j < 4; ++j) sums[r][j] = acc(0);
  for (int64_t m = m_begin; m < m_end; ++m) {
    float f[4];
    group_factors(ms, m, grp, gpr, f);
    acc d[4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
      d[j] = k + j < K ? dropout_elem<acc>(to_acc(x[m * ldx + k + j]), f[j]) : acc(0);
    const acc* gr = gsh[m - m_begin];
#pragma unroll
    for (int r = 0; r < kReduceRanks; ++r)
#pragma unroll
      for (int j = 0; j < 4; ++j) sums[r][j] += gr[r] * d[j];
  }
  acc* out = dst + chunk * R2 * K;
#pragma unroll
  for (int r = 0; r < kReduceRanks; ++r)
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (r < nr && k + j < K) out[(r0 + r) * K + k + j] = sums[r][j];
}

// sums[e] = sum over chunks c, in order, of partial[c][e].
template <class acc>
__global__ void __launch_bounds__(kThreads)
    sum_chunks_kernel(int64_t n, int64_t nchunks, const acc* __restrict__ partial,
                      acc* __restrict__ sums) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= n) return;
  acc total = partial[e];
  for (int64_t c = 1; c < nchunks; ++c) total += partial[c * n + e];
  sums[e] = total;
}

__global__ void __launch_bounds__(kThreads)
    keep_mask_kernel(uint8_t* __restrict__ keep, int64_t M, int64_t K, DropoutMask mask) {
  const int64_t gpr = groups_per_row(K);
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= M * gpr) return;
  const int64_t m = e / gpr, g = e % gpr;
  float f[4];
  group_factors(load_mask(mask), m, g, gpr, f);
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (4 * g + j < K) keep[m * K + 4 * g + j] = f[j] != 0.0f ? 1 : 0;
}

int64_t reduce_chunks(int64_t M) { return ceil_div(M, kReduceRows); }

template <class T>
cudaError_t shrink_typed(int64_t M, int64_t K, int64_t R, const void* x, int64_t ldx,
                         const void* a, void* u, DropoutMask mask, cudaStream_t stream) {
  using acc = typename AccOf<T>::type;
  const size_t smem = static_cast<size_t>(kShrinkBytes) + sizeof(acc) * kShrinkRows * R;
  const int64_t blocks = ceil_div(M, kShrinkRows);
  shrink_kernel<T><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
      M, K, R, static_cast<const T*>(x), ldx, static_cast<const acc*>(a), static_cast<acc*>(u),
      mask);
  return cudaGetLastError();
}

template <class T>
cudaError_t expand_typed(int64_t M, int64_t K, int64_t R, void* out, int64_t ldo, const void* g,
                         const void* a, const void* s, DropoutMask mask, cudaStream_t stream) {
  using acc = typename AccOf<T>::type;
  const int64_t blocks_per_row = ceil_div(groups_per_row(K), kThreads);
  const size_t smem = sizeof(acc) * static_cast<size_t>(R > 0 ? R : 1);
  expand_kernel<T><<<static_cast<unsigned>(M * blocks_per_row), kThreads, smem, stream>>>(
      M, K, R, static_cast<T*>(out), ldo, static_cast<const acc*>(g), static_cast<const acc*>(a),
      static_cast<const acc*>(s), mask, blocks_per_row);
  return cudaGetLastError();
}

template <class T>
cudaError_t reduce_typed(int64_t M, int64_t K, int64_t R2, const void* x, int64_t ldx,
                         const void* g2, void* sums, void* workspace, DropoutMask mask,
                         cudaStream_t stream) {
  using acc = typename AccOf<T>::type;
  const int64_t nchunks = reduce_chunks(M);
  acc* dst = nchunks > 1 ? static_cast<acc*>(workspace) : static_cast<acc*>(sums);
  const dim3 grid(static_cast<unsigned>(ceil_div(groups_per_row(K), kThreads)),
                  static_cast<unsigned>(ceil_div(R2, kReduceRanks)),
                  static_cast<unsigned>(nchunks));
  reduce_kernel<T><<<grid, kThreads, 0, stream>>>(M, K, R2, static_cast<const T*>(x), ldx,
                                                  static_cast<const acc*>(g2), dst, mask);
  if (nchunks > 1) {
    const int64_t n = R2 * K;
    sum_chunks_kernel<acc><<<static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0, stream>>>(
        n, nchunks, dst, static_cast<acc*>(sums));
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_shrink(DType dtype, int64_t M, int64_t K, int64_t R, const void* x,
                          int64_t ldx, const void* a, void* u, DropoutMask mask,
                          cudaStream_t stream) {
  if (M <= 0 || R <= 0) return cudaSuccess;
  return by_dtype(dtype, [&](auto t) {
    return shrink_typed<decltype(t)>(M, K, R, x, ldx, a, u, mask, stream);
  });
}

cudaError_t launch_expand(DType dtype, int64_t M, int64_t K, int64_t R, void* out, int64_t ldo,
                          const void* g, const void* a, const void* s, DropoutMask mask,
                          cudaStream_t stream) {
  if (M <= 0 || K <= 0 || R <= 0) return cudaSuccess;
  return by_dtype(dtype, [&](auto t) {
    return expand_typed<decltype(t)>(M, K, R, out, ldo, g, a, s, mask, stream);
  });
}

int64_t reduce_workspace_elements(int64_t M, int64_t K, int64_t R2) {
  const int64_t nchunks = reduce_chunks(M);
  return nchunks > 1 ? nchunks * R2 * K : 0;
}

cudaError_t launch_reduce(DType dtype, int64_t M, int64_t K, int64_t R2, const void* x,
                          int64_t ldx, const void* g2, void* sums, void* workspace,
                          DropoutMask mask, cudaStream_t stream) {
  if (K <= 0 || R2 <= 0) return cudaSuccess;
  if (M > kMaxRows) return cudaErrorInvalidValue;
  if (M <= 0) {  // an empty sum
    const size_t elem = dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
    return cudaMemsetAsync(sums, 0, elem * static_cast<size_t>(R2 * K), stream);
  }
  return by_dtype(dtype, [&](auto t) {
    return reduce_typed<decltype(t)>(M, K, R2, x, ldx, g2, sums, workspace, mask, stream);
  });
}

cudaError_t launch_keep_mask(uint8_t* keep, int64_t M, int64_t K, DropoutMask mask,
                             cudaStream_t stream) {
  const int64_t n = M * groups_per_row(K);
  if (n <= 0) return cudaSuccess;
  keep_mask_kernel<<<static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0, stream>>>(
      keep, M, K, mask);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lora
