// The CUDA 4-bit dequantize (launcher declared in cuda_dequant.h): one launch, the nested
// absmax decoded in the same kernel, so no [blocks] float32 absmax is ever written. The
// decode is common/dequant4_decode.h, the functions the CPU kernel runs, so the CPU tests
// check this arithmetic too; on the device its products are __fmul_rn and its sum
// __fadd_rn, which nvcc never contracts into a fused multiply-add.
//
//   dequant_4bit_kernel   a thread per kBytesPerThread packed bytes (2 elements each),
//                         the 16 codes in shared memory, a block's scale decoded once
//                         per thread and again only where the thread's elements cross
//                         into the next block
#include <cuda_runtime.h>
#include <stdint.h>

#include "common/dequant4_decode.h"
#include "common/element_math.h"
#include "common/kernel_dtype.h"
#include "cuda/cuda_dequant.h"

namespace lora {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// 8 bytes of codes per thread: 16 elements, 32 bytes of bf16 output.
constexpr int64_t kBytesPerThread = 8;

template <class T>
__global__ void __launch_bounds__(kThreads)
    dequant_4bit_kernel(int64_t n, const uint8_t* __restrict__ packed,
                        const float* __restrict__ code, int64_t blocksize, Dequant4Scales scales,
                        const float* __restrict__ offset, T* __restrict__ out) {
  __shared__ float code_sh[16];
  if (threadIdx.x < 16) code_sh[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t j0 = thread * kBytesPerThread;
  const int64_t i0 = 2 * j0;  // even, so a byte's two elements are in one block
  if (i0 >= n) return;
  if (scales.absmax_q != nullptr) scales.offset = *offset;
  int64_t b = i0 / blocksize;
  int64_t next = (b + 1) * blocksize;  // the first element of block b + 1
  float scale = dequant4_block_scale(scales, b);
#pragma unroll
  for (int64_t e = 0; e < 2 * kBytesPerThread; e += 2) {
    const int64_t i = i0 + e;
    if (i >= n) break;
    // blocksize >= 2: one step of two elements crosses at most one block boundary.
    if (i >= next) {
      ++b;
      next += blocksize;
      scale = dequant4_block_scale(scales, b);
    }
    out[i] = Store<T>::from(dequant4_value(code_sh, dequant4_code(packed, i), scale));
    if (i + 1 < n) {
      out[i + 1] = Store<T>::from(dequant4_value(code_sh, dequant4_code(packed, i + 1), scale));
    }
  }
}

template <class T>
cudaError_t dequant_typed(const Dequant4bitLaunch& p, cudaStream_t stream) {
  const Dequant4Scales scales{p.absmax, p.absmax_q, p.absmax_code, p.absmax2, p.blocksize2, 0.0f};
  const int64_t threads = ceil_div(ceil_div(p.n, 2), kBytesPerThread);
  const int64_t blocks = ceil_div(threads, kThreads);
  dequant_4bit_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      p.n, p.packed, p.code, p.blocksize, scales, p.offset, static_cast<T*>(p.out));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_dequant_4bit(const Dequant4bitLaunch& args, cudaStream_t stream) {
  if (args.n <= 0) return cudaSuccess;
  if (args.blocksize < 2 || args.blocksize % 2 != 0) return cudaErrorInvalidValue;
  if (ceil_div(ceil_div(args.n, 2 * kBytesPerThread), kThreads) > 0x7FFFFFFF) {
    return cudaErrorInvalidValue;  // more blocks than a grid's x dimension holds
  }
  switch (args.dtype) {
    case DType::kFloat32:
      return dequant_typed<float>(args, stream);
    case DType::kBFloat16:
      return dequant_typed<bf16>(args, stream);
    case DType::kFloat16:
      return dequant_typed<f16>(args, stream);
    case DType::kFloat64:
      break;
  }
  return cudaErrorInvalidValue;  // bitsandbytes has no float64 dense weight
}

}  // namespace cuda
}  // namespace lora
