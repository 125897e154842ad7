// The CUDA implementation of the lora_kernels::cpp_* ops: ATen GEMMs (cuBLAS) and the
// CUDA kernels of cuda_kernels.cu (the 4-bit dequantize's: cuda_dequant.cu). Compiled
// only where torch is a CUDA build and a CUDA toolkit is present. Nothing here reads a
// device scalar on the host: the seed, the scaling and the nested absmax's offset go to
// the kernels as pointers, and the ATen GEMMs get s through small
// [M, R] / [R, K] tensor ops. T is x's dtype; "T = acc" means the storage dtype equals
// the accumulation dtype (float32, float64).
//
// Forward:
//   U = D(X) A^T              custom masked shrink; it packs the keep mask it generates
//                             into keep_bits, the third output, saved for backward
//                             (p == 0 and T = acc: ATen mm)
//   T = acc:                  Y = X W^T + b, Y += U (s B)^T (ATen addmm, addmm_; cuBLAS
//                             adds b in its epilogue)
//   16-bit T:                 Y = X W^T + b, then Y += s U B^T by the custom expand
//                             (accumulated in float32, rounded once)
// With p == 0, T = acc and M >= N, K the LoRA term folds into the weight instead:
//   Y = X (W + s B A)^T + b   (one GEMM; W + s B A one ATen addmm)
// U is always saved (the CUDA backward does not recompute it).
//
// Backward (the keep mask read from keep_bits, never generated again):
//   G = dY B                  ATen mm (16-bit T: the custom shrink)
//   [dB^T; db] = [U 1]^T dY   custom reduce
//   dX = dY W, then           ATen mm
//   dX += s D(G A)            custom masked expand, in place (16-bit T: rounded once)
//   dA = s G^T D(X)           custom masked reduce over the rows of X
//   (p == 0 and folded: dX = dY (W + s B A), dA by the custom reduce)
//   ds = sum(G * U)
// The reductions over rows run in fixed chunks summed in order: deterministic.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "common/element_math.h"
#include "common/op_common.h"
#include "cuda/cuda_dequant.h"
#include "cuda/cuda_kernels.h"

namespace lora {
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The dropout mask of the CUDA kernels: the seed stays on the device (read by the
// kernels), so nothing waits for the GPU.
DropoutMask device_dropout_mask(double dropout_p, const at::Tensor& seed) {
  DropoutMask mask = make_dropout_mask(dropout_p);
  if (dropout_p > 0.0) mask.device_seed = seed.data_ptr<int64_t>();
  return mask;
}

// U = D(x) a^T [M, R], a [R, K] in any float dtype; with keep_bits_out set the shrink
// also packs the mask it generates.
at::Tensor shrink(const at::Tensor& x, const at::Tensor& a, const DropoutMask& mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), R = a.size(0);
  TORCH_CHECK(R <= cuda::kMaxRank, "lora_kernels: the CUDA backend takes ranks up to ",
              cuda::kMaxRank, ", got R = ", R);
  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor u = at::empty({M, R}, x.options().dtype(acc));
  const at::Tensor a_acc = a.to(acc).contiguous();
  C10_CUDA_CHECK(cuda::launch_shrink(kernel_dtype(x.scalar_type()), M, K, R, x.data_ptr(),
                                     x.stride(0), a_acc.data_ptr(), u.data_ptr(), mask,
                                     current_stream()));
  return u;
}

// out += s * D(g a) in place, out [M, K], g [M, R], a [R, K].
void expand(const at::Tensor& out, const at::Tensor& g, const at::Tensor& a,
            const at::Tensor& scaling, const DropoutMask& mask) {
  const c10::cuda::CUDAGuard guard(out.device());
  if (g.size(1) == 0) return;
  const int64_t M = out.size(0), K = out.size(1), R = g.size(1);
  const auto acc = acc_dtype(out.scalar_type());
  const at::Tensor g_acc = g.to(acc).contiguous();
  const at::Tensor a_acc = a.to(acc).contiguous();
  const at::Tensor s_acc = scaling.to(acc).contiguous();
  C10_CUDA_CHECK(cuda::launch_expand(kernel_dtype(out.scalar_type()), M, K, R, out.data_ptr(),
                                     out.stride(0), g_acc.data_ptr(), a_acc.data_ptr(),
                                     s_acc.data_ptr(), mask, current_stream()));
}

// sums [R2, K] = coeff^T D(x), coeff [M, R2].
at::Tensor reduce(const at::Tensor& x, const at::Tensor& coeff, const DropoutMask& mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), R2 = coeff.size(1);
  TORCH_CHECK(M <= cuda::kMaxRows, "lora_kernels: the CUDA backend takes up to ",
              cuda::kMaxRows, " rows (tokens), got M = ", M);
  const auto acc = acc_dtype(x.scalar_type());
  const auto opts = x.options().dtype(acc);
  const at::Tensor coeff_acc = coeff.to(acc).contiguous();
  at::Tensor sums = at::empty({R2, K}, opts);
  const int64_t ws_elements = cuda::reduce_workspace_elements(M, K, R2);
  const at::Tensor workspace = at::empty({ws_elements > 0 ? ws_elements : 1}, opts);
  C10_CUDA_CHECK(cuda::launch_reduce(kernel_dtype(x.scalar_type()), M, K, R2, x.data_ptr(),
                                     x.stride(0), coeff_acc.data_ptr(), sums.data_ptr(),
                                     workspace.data_ptr(), mask, current_stream()));
  return sums;
}

// W + s B A with cuBLAS (s on the small operand: no host read).
at::Tensor fold(const at::Tensor& weight, const at::Tensor& B, const at::Tensor& A,
                const at::Tensor& scaling) {
  const auto t = weight.scalar_type();
  return at::addmm(weight, B.to(t) * scaling.to(t), A.to(t));
}

// Fold the LoRA term into the weight (p == 0, T = acc) when that costs less than the
// R-wide GEMMs it replaces.
bool fold_lora(bool storage_is_acc, double dropout_p, int64_t M, int64_t N, int64_t K) {
  return storage_is_acc && !(dropout_p > 0.0) && M >= N && M >= K;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scaling,
    double dropout_p, const at::Tensor& seed) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_common(x, weight, lora_A, lora_B, scaling, dropout_p, seed);
  const auto t = x.scalar_type();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  check_bias(bias, x, N);
  const at::Tensor keep_bits = forward_keep_bits(x, dropout_p);
  DropoutMask mask = device_dropout_mask(dropout_p, seed);
  if (mask.active) {
    mask.keep_bits_out = keep_bits.data_ptr<uint8_t>();
    mask.ldbits = keep_bits.stride(0);
  }
  const at::Tensor x2 = unit_column_stride(x);
  const auto linear = [&](const at::Tensor& w) {
    return bias.has_value() ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
  };
  if (t != acc_dtype(t)) {
    at::Tensor u = shrink(x2, lora_A, mask);
    at::Tensor y = linear(weight);
    // y += s * U B^T, accumulated in fp32 and rounded to x's dtype once.
    expand(y, u, lora_B.t(), scaling, DropoutMask{});
    return {y, u, keep_bits};
  }
  const at::Tensor A = lora_A.to(t), B = lora_B.to(t);
  const auto shrink_u = [&] {
    return dropout_p > 0.0 ? shrink(x2, lora_A, mask) : at::mm(x2, A.t());
  };
  if (fold_lora(true, dropout_p, M, N, K)) {
    return {linear(fold(weight, B, A, scaling)), shrink_u(), keep_bits};
  }
  at::Tensor u = shrink_u();
  at::Tensor y = linear(weight);
  addmm_scaled_(y, u, B.t(), scaling);
  return {y, u, keep_bits};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scaling,
    double dropout_p, const at::Tensor& seed, const at::Tensor& u, const at::Tensor& keep_bits,
    bool need_grad_x, bool need_grad_lora, bool need_grad_scaling, bool need_grad_bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_common(x, weight, lora_A, lora_B, scaling, dropout_p, seed);
  const SavedForBackward saved = check_backward_args(grad_y, x, weight, lora_A, dropout_p, u,
                                                     keep_bits, /*u_may_be_empty=*/false);
  const auto t = x.scalar_type();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_A.size(0);
  // The forward's packed mask where saved, else the mask generated from the seed.
  DropoutMask mask = device_dropout_mask(dropout_p, seed);
  if (mask.active && saved.mask_saved) {
    mask.keep_bits = keep_bits.data_ptr<uint8_t>();
    mask.ldbits = keep_bits.stride(0);
  }
  const bool storage_is_acc = t == acc_dtype(t);
  const at::Tensor dy = unit_column_stride(grad_y);
  const at::Tensor x2 = unit_column_stride(x);

  at::Tensor grad_x = empty_grad(x, t);
  at::Tensor grad_A = empty_grad(x, lora_A.scalar_type());
  at::Tensor grad_B = empty_grad(x, lora_B.scalar_type());
  at::Tensor grad_scaling = empty_grad(x, scaling.scalar_type());
  at::Tensor grad_bias = empty_grad(x, t);

  // G = dY B [M, R] (accumulation dtype) and the sums [dB^T; db] = [U 1]^T dY [R (+1), N].
  const bool folded = fold_lora(storage_is_acc, dropout_p, M, N, K);
  const bool need_g = need_grad_lora || need_grad_scaling || (need_grad_x && !folded);
  const bool need_dy_sums = need_grad_lora || need_grad_bias;
  at::Tensor g, dy_sums;
  at::Tensor coeff;
  if (need_grad_lora && need_grad_bias) {
    coeff = at::cat({u, at::ones({M, 1}, u.options())}, 1);
  } else if (need_grad_lora) {
    coeff = u;
  } else if (need_grad_bias) {
    coeff = at::ones({M, 1}, u.options());
  }
  if (need_g) {
    g = storage_is_acc ? at::mm(dy, lora_B.to(t)) : shrink(dy, lora_B.t(), DropoutMask{});
  }
  if (need_dy_sums) dy_sums = reduce(dy, coeff, DropoutMask{});

  if (need_grad_x) {
    if (folded) {
      grad_x = at::mm(dy, fold(weight, lora_B, lora_A, scaling));
      if (need_grad_lora) grad_A = reduce(x2, g, mask);
    } else {
      grad_x = at::mm(dy, weight);
      // dX += s D(G A), then dA's sums G^T D(X) under the same mask.
      expand(grad_x, g, lora_A, scaling, mask);
      if (need_grad_lora) grad_A = reduce(x2, g, mask);
    }
  } else if (need_grad_lora) {
    grad_A = reduce(x2, g, mask);
  }
  if (need_grad_lora) grad_A = (grad_A * scaling).to(lora_A.scalar_type());

  if (need_grad_lora) {
    grad_B = (dy_sums.narrow(0, 0, R) * scaling).t().to(lora_B.scalar_type()).contiguous();
  }
  // A copy even when the dtype matches: the row is a view into the sums.
  if (need_grad_bias) {
    grad_bias = dy_sums[dy_sums.size(0) - 1].to(t, /*non_blocking=*/false, /*copy=*/true);
  }
  if (need_grad_scaling) grad_scaling = (g * u).sum().to(scaling.scalar_type());
  return {grad_x.contiguous(), grad_A, grad_B, grad_scaling, grad_bias};
}

at::Tensor cuda_keep_mask(const at::Tensor& seed, int64_t M, int64_t K, double dropout_p) {
  check_keep_mask_args(seed, M, K, dropout_p);
  const c10::cuda::CUDAGuard guard(seed.device());
  at::Tensor keep = at::empty({M, K}, seed.options().dtype(at::kBool));
  C10_CUDA_CHECK(cuda::launch_keep_mask(reinterpret_cast<uint8_t*>(keep.data_ptr<bool>()), M, K,
                                        device_dropout_mask(dropout_p, seed), current_stream()));
  return keep;
}

// out = the dense weight of a bitsandbytes 4-bit weight (cuda_dequant.cu; the Python side,
// lora_kernels/quant4bit.py, reads and checks the quant state). The offset goes to the
// kernel as a pointer: no host sync.
void cuda_dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax,
                          const at::Tensor& code, const c10::optional<at::Tensor>& absmax_code,
                          const c10::optional<at::Tensor>& absmax2,
                          const c10::optional<at::Tensor>& offset, int64_t blocksize,
                          int64_t blocksize2, const at::Tensor& out) {
  check_dequantize_4bit_args(packed, absmax, code, absmax_code, absmax2, offset, blocksize,
                             blocksize2, out);
  const c10::cuda::CUDAGuard guard(out.device());
  cuda::Dequant4bitLaunch args{};
  args.dtype = kernel_dtype(out.scalar_type());
  args.n = out.numel();
  args.packed = packed.data_ptr<uint8_t>();
  args.code = code.data_ptr<float>();
  args.blocksize = blocksize;
  if (absmax2.has_value()) {
    args.absmax_q = absmax.data_ptr<uint8_t>();
    args.absmax_code = absmax_code->data_ptr<float>();
    args.absmax2 = absmax2->data_ptr<float>();
    args.blocksize2 = blocksize2;
    args.offset = offset->data_ptr<float>();
  } else {
    args.absmax = absmax.data_ptr<float>();
  }
  args.out = out.data_ptr();
  C10_CUDA_CHECK(cuda::launch_dequant_4bit(args, current_stream()));
}

}  // namespace
}  // namespace lora

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("cpp_forward", &lora::cuda_forward);
  m.impl("cpp_backward", &lora::cuda_backward);
  m.impl("cpp_keep_mask", &lora::cuda_keep_mask);
  m.impl("cpp_dequantize_4bit", &lora::cuda_dequantize_4bit);
}
