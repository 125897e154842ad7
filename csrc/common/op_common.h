// What the CPU (cpu/lora_cpu.cpp) and CUDA (cuda/lora_cuda.cpp) implementations of the
// lora_kernels::cpp_* ops share on the torch side: the argument checks of the op
// contract (docs/backends.md), the forward's keep_bits output, and small tensor
// helpers. The forward and backward themselves are each device's own.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "common/kernel_dtype.h"

namespace lora {

// The accumulation dtype of storage dtype `t`: float64 for float64, else float32.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The launchers' name of a storage dtype (float32, float64, bfloat16, float16).
DType kernel_dtype(at::ScalarType t);

// Shapes, dtypes and devices shared by forward and backward.
void check_common(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                  const at::Tensor& lora_B, const at::Tensor& scaling, double dropout_p,
                  const at::Tensor& seed);

// The forward's bias: [N], x's dtype and device.
void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x, int64_t N);

// What the forward saved, as the backward reads it.
struct SavedForBackward {
  // u has M rows. Without them ([0, R], allowed only where the device recomputes U
  // without dropout) the backward recomputes U.
  bool u_saved;
  // keep_bits holds the packed mask (dropout, non-empty): read instead of regenerated.
  bool mask_saved;
};

// Checks grad_y, u and keep_bits against x, weight and lora_A; `u_may_be_empty`: the
// device recomputes U when the forward returned it empty (the CPU, without dropout).
SavedForBackward check_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                     const at::Tensor& weight, const at::Tensor& lora_A,
                                     double dropout_p, const at::Tensor& u,
                                     const at::Tensor& keep_bits, bool u_may_be_empty);

// Checks for the keep-mask op (seed 0-dim int64, M, K >= 0, 0 <= p < 1).
void check_keep_mask_args(const at::Tensor& seed, int64_t M, int64_t K, double dropout_p);

// Checks for the 4-bit dequantize op (common/dequant4_decode.h): packed 1-D contiguous
// uint8 with the codes of out's elements; absmax one contiguous float32 per block of an
// even blocksize, or with absmax2 (double quantization) one uint8 code, with absmax_code
// 256 float32, absmax2 one float32 per blocksize2 blocks and offset one float32; code 16
// float32; out contiguous float32, bfloat16 or float16; every tensor on out's device.
void check_dequantize_4bit_args(const at::Tensor& packed, const at::Tensor& absmax,
                                const at::Tensor& code,
                                const c10::optional<at::Tensor>& absmax_code,
                                const c10::optional<at::Tensor>& absmax2,
                                const c10::optional<at::Tensor>& offset, int64_t blocksize,
                                int64_t blocksize2, const at::Tensor& out);

// The forward's third output: the mask packed one bit per element, uint8
// [M, ceil(K / 8)], for the shrink kernel to fill; empty without dropout. For p below
// 2^-32 no kernel generates a mask (every element is kept), so it is filled here.
at::Tensor forward_keep_bits(const at::Tensor& x, double dropout_p);

// t as the kernels read it: unit column stride (one contiguous copy otherwise).
at::Tensor unit_column_stride(const at::Tensor& t);

// out += s * (a @ b) in place, s applied to the smaller operand rather than passed as
// alpha: MKL's result for a general alpha depends on the thread count (it scales at a
// point that depends on the partition), with alpha = 1 it does not. The 0-dim scaling is
// never read on the host (no device sync, nothing data-dependent for torch.compile).
void addmm_scaled_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                   const at::Tensor& scaling);

// The placeholder of a gradient that is not asked for: [0], `dtype`, like's device.
at::Tensor empty_grad(const at::Tensor& like, at::ScalarType dtype);

}  // namespace lora
