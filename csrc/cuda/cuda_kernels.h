// The CUDA kernels of the LoRA op (cuda_kernels.cu): plain launchers over pointers, sizes,
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

#include "common/dropout_mask.h"
#include "common/kernel_dtype.h"

namespace lora {
namespace cuda {

// The dropout mask (common/dropout_mask.h) reaches the kernels with its seed as
// device_seed, read on the device only when the mask is active and not read from
// keep_bits. The shrink writes the packed mask to keep_bits_out where given, the other
// kernels read it from keep_bits where given instead of generating it from the seed.

// The largest rank the shrink kernel takes (its per-row partial sums live in shared
// memory).
constexpr int64_t kMaxRank = 1024;

// u[m, r] = sum_k D(x)[m, k] a[r, k]             u: [M, R] contiguous
cudaError_t launch_shrink(DType dtype, int64_t M, int64_t K, int64_t R, const void* x,
                          int64_t ldx, const void* a, void* u, DropoutMask mask,
                          cudaStream_t stream);

// out[m, k] += s * keep * scale * sum_r g[m, r] a[r, k]     (s: device pointer)
cudaError_t launch_expand(DType dtype, int64_t M, int64_t K, int64_t R, void* out, int64_t ldo,
                          const void* g, const void* a, const void* s, DropoutMask mask,
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
                          DropoutMask mask, cudaStream_t stream);

// keep[m, k] in {0, 1}, [M, K] row-major bytes.
cudaError_t launch_keep_mask(uint8_t* keep, int64_t M, int64_t K, DropoutMask mask,
                             cudaStream_t stream);

}  // namespace cuda
}  // namespace lora
