// The CUDA 4-bit dequantize (bitsandbytes NF4 / FP4, cuda_dequant.cu): a torch-free
// launcher over pointers, like those of cuda_kernels.h.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "common/kernel_dtype.h"

namespace lora {
namespace cuda {

// out[i] = code[c_i] * scale[i / blocksize] for the n elements of the flattened weight
// (common/dequant4_decode.h), c_{2j} the high nibble of packed[j]; scale = absmax, or with
// absmax_q (double quantization) scale[b] = absmax_code[absmax_q[b]] *
// absmax2[b / blocksize2] + *offset. One launch; every pointer is device memory (offset
// too: nothing is read on the host). dtype (out's): float32, bfloat16 or float16.
struct Dequant4bitLaunch {
  DType dtype;
  int64_t n;
  const uint8_t* packed;     // [ceil(n / 2)]
  const float* code;         // [16]
  int64_t blocksize;         // even
  const float* absmax;       // [ceil(n / blocksize)], or nullptr with absmax_q
  const uint8_t* absmax_q;   // [ceil(n / blocksize)], or nullptr
  const float* absmax_code;  // [256] (with absmax_q)
  const float* absmax2;      // [ceil(blocks / blocksize2)] (with absmax_q)
  int64_t blocksize2;
  const float* offset;       // [] (with absmax_q)
  void* out;                 // [n] contiguous
};

cudaError_t launch_dequant_4bit(const Dequant4bitLaunch& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace lora
