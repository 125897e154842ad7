// The storage dtypes the kernels take, as the torch-free launchers (CPU and CUDA) name
// them, their element types, and the one switch from the name to the type.
//
// No functions but the switch: cpu/cpu_kernels.h includes this under the compiler's
// default target, and the per-element math (element_math.h) must be compiled under
// each CPU build's own target pragma.
#pragma once

#include <stdint.h>

namespace lora {

// 16-bit storage types, bit-compatible with c10::BFloat16 / c10::Half and the CUDA
// __nv_bfloat16 / __half layouts.
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// fn(a value of the storage type named by dtype), e.g.
//   by_dtype(dtype, [&](auto t) { kernel<decltype(t)>(args); })
// returning what fn returns.
template <class Fn>
auto by_dtype(DType dtype, Fn&& fn) -> decltype(fn(float{})) {
  switch (dtype) {
    case DType::kFloat64:
      return fn(double{});
    case DType::kBFloat16:
      return fn(bf16{});
    case DType::kFloat16:
      return fn(f16{});
    case DType::kFloat32:
      break;
  }
  return fn(float{});
}

}  // namespace lora
