// The CUDA kernels of the LoRA op (lora_cuda.cu): plain launchers over pointers, sizes,
// strides and a stream, so that the .cu file needs only CUDA headers (no torch) and
// compiles with nvcc against any torch, or none.
//
// Conventions (M tokens, K width, R rank):
// - x, out: storage dtype, rows of unit stride, row stride ld*.
// - a: accumulation dtype [R, K] contiguous; g, g2, u: accumulation dtype, contiguous.
// - The scaling s and the seed stay on the device: kernels load them (no host sync).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace lora {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// The dropout keep mask (lora_kernels.reference.dropout_keep_mask), and its packed
// form (docs/backends.md, keep_bits: bit k % 8 of byte [m, k / 8], row stride ldbits):
// the shrink writes it to bits_out where given, the other kernels read it from bits
// where given instead of generating the mask from the seed.
struct DeviceMask {
  bool active;          // false: no dropout (every factor is 1)
  const int64_t* seed;  // device pointer to the 63-bit seed; read only when active
  uint32_t threshold;   // floor(p * 2^32)
  float scale;          // float32(1 / (1 - p))
  const uint8_t* bits = nullptr;
  uint8_t* bits_out = nullptr;
  int64_t ldbits = 0;
};

// The largest rank the shrink kernel takes (its per-row partial sums live in shared
// memory).
constexpr int64_t kMaxRank = 1024;

// u[m, r] = sum_k D(x)[m, k] a[r, k]             u: [M, R] contiguous
cudaError_t launch_shrink(DType dtype, int64_t M, int64_t K, int64_t R, const void* x,
                          int64_t ldx, const void* a, void* u, DeviceMask mask,
                          cudaStream_t stream);

// out[m, k] += s * keep * scale * sum_r g[m, r] a[r, k]     (s: device pointer)
cudaError_t launch_expand(DType dtype, int64_t M, int64_t K, int64_t R, void* out, int64_t ldo,
                          const void* g, const void* a, const void* s, DeviceMask mask,
                          cudaStream_t stream);

// The most rows the reduce takes (its row chunks are one grid dimension).
constexpr int64_t kReduceChunkRows = 128;
constexpr int64_t kMaxRows = 65535 * kReduceChunkRows;

// Elements of accumulation dtype the reduce needs as workspace (0: none).
int64_t reduce_workspace_elements(int64_t M, int64_t K, int64_t R2);

// sums[r, k] = sum_m g2[m, r] D(x)[m, k]          sums: [R2, K] contiguous
// Rows are summed in chunks of a fixed size, then the chunks in order: deterministic.
cudaError_t launch_reduce(DType dtype, int64_t M, int64_t K, int64_t R2, const void* x,
                          int64_t ldx, const void* g2, void* sums, void* workspace,
                          DeviceMask mask, cudaStream_t stream);

// keep[m, k] in {0, 1}, [M, K] row-major bytes.
cudaError_t launch_keep_mask(uint8_t* keep, int64_t M, int64_t K, DeviceMask mask,
                             cudaStream_t stream);

}  // namespace cuda
}  // namespace lora
