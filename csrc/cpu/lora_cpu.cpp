// The CPU implementation of the lora_kernels::cpp_* ops: ATen GEMMs accumulating onto
// what the CPU kernels (cpu_steps.h) wrote. T is x's dtype; "T = acc" means the storage
// dtype equals the accumulation dtype (float32, float64), where ATen's GEMMs take the
// base and the rank-R products; 16-bit T runs every LoRA piece in the float32 kernels.
//
// Forward:
//   U = D(X) A^T              custom masked shrink, also without dropout (at rank-R
//                             widths it is faster than the BLAS GEMM, and its result
//                             does not depend on the thread count); it packs the keep
//                             mask it generates into keep_bits, the third output
//   T = acc, with bias:
//     Y = b + U (s B)^T       custom expand writing Y (the pass ATen's addmm would spend
//                             broadcasting b), then
//     Y += X W^T              ATen addmm_ (beta = 1)
//   T = acc, no bias:         Y = X W^T, Y += U (s B)^T (ATen mm, addmm_)
//   16-bit T:                 Y = X W^T + b (ATen addmm), then Y += s U B^T by the
//                             custom expand (accumulated in float32, rounded once)
// With p == 0, T = acc and M >= N, K the LoRA term folds into the weight instead:
//   Y = X (W + s B A)^T + b   W + s B A one pass of the custom expand; the GEMM runs
//                             without b and Y += b follows (ATen's addmm would
//                             broadcast b into Y and BLAS's beta = 1 kernel read Y back)
// Without dropout u is returned empty ([0, R]): backward recomputes U in the pass over
// X that dA needs anyway, so nothing but x is saved.
//
// Backward (the keep mask read from keep_bits, never generated again):
//   u empty (p == 0):         U, G = dY B, the dY sums [dB^T; db] = [U 1]^T dY and dA's
//                             sums G^T X from one custom pass over the rows of X and
//                             dY, each block of X read again from cache for G^T X
//   U saved (p > 0):          G and the dY sums from one custom pass over dY, the saved
//                             U read (one load of dY feeds both)
//   otherwise (only G, or only the sums, asked for): G = dY B (ATen mm, 16-bit T: the
//                             custom shrink), the sums by the custom reduce
//   dX = s D(G A)             T = acc: custom masked expand writing dX, sharing the
//   dA = s G^T D(X)           mask and the pass with the custom reduce over the rows of
//   dX += dY W                X, then ATen addmm_ (beta = 1)
//                             16-bit T: dX = dY W, then dX += s D(G A) in place
//                             (rounded once), the reduce in the same pass
//   (folded: dX = dY (W + s B A), dA by the custom reduce alone)
//   ds = sum(G * U)
// The reductions over rows run in an order fixed by the shapes, so results do not
// depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "common/element_math.h"
#include "common/op_common.h"
#include "cpu/cpu_kernels.h"
#include "cpu/cpu_steps.h"

namespace lora {
namespace {

namespace steps = cpu_steps;
using steps::ReduceTerm;

// Fold the LoRA term into the weight (p == 0, T = acc) when that costs less than the
// R-wide GEMMs it replaces: the fold is one pass over [N, K], the term one over [M, N]
// (forward) or [M, K] (backward).
bool fold_lora(bool storage_is_acc, double dropout_p, int64_t M, int64_t N, int64_t K) {
  return storage_is_acc && !(dropout_p > 0.0) && M >= N && M >= K;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scaling,
    double dropout_p, const at::Tensor& seed) {
  check_common(x, weight, lora_A, lora_B, scaling, dropout_p, seed);
  const auto t = x.scalar_type();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_A.size(0);
  check_bias(bias, x, N);
  const at::Tensor keep_bits = forward_keep_bits(x, dropout_p);
  const bool dropout = dropout_p > 0.0;
  // The shrink generates the mask and packs it into keep_bits for backward.
  DropoutMask mask = steps::host_dropout_mask(dropout_p, seed);
  if (mask.active) {
    mask.keep_bits_out = keep_bits.data_ptr<uint8_t>();
    mask.ldbits = keep_bits.stride(0);
  }
  const at::Tensor x2 = unit_column_stride(x);
  const bool storage_is_acc = t == acc_dtype(t);
  // Without dropout backward recomputes U: u is returned empty.
  const auto saved = [&](const at::Tensor& u) {
    return dropout ? u : at::empty({0, R}, x.options().dtype(acc_dtype(t)));
  };
  if (!storage_is_acc) {
    at::Tensor u = steps::shrink(x2, lora_A, mask);
    at::Tensor y = bias.has_value() ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
    // y += s * U B^T, accumulated in fp32 and rounded to x's dtype once.
    steps::expand_reduce(steps::accumulate_into(y, u, lora_B.t(), scaling), ReduceTerm{},
                         DropoutMask{});
    return {y, saved(u), keep_bits};
  }
  const at::Tensor A = lora_A.to(t), B = lora_B.to(t);
  if (fold_lora(storage_is_acc, dropout_p, M, N, K)) {
    // The folded GEMM needs no U (and backward recomputes it).
    at::Tensor y = at::mm(x2, steps::fold(weight, B, A, scaling).t());
    if (bias.has_value()) y.add_(*bias);
    return {y, saved(at::Tensor()), keep_bits};
  }
  at::Tensor u = steps::shrink(x2, lora_A, mask);
  if (bias.has_value()) {
    // Y = b + s U B^T, written in the one pass over Y that the bias needs anyway, then
    // the GEMM adds X W^T onto it.
    at::Tensor y = at::empty({M, N}, x.options());
    steps::expand_reduce(steps::base_plus(y, *bias, u, lora_B.t(), scaling), ReduceTerm{},
                         DropoutMask{});
    y.addmm_(x2, weight.t());
    return {y, saved(u), keep_bits};
  }
  at::Tensor y = at::mm(x2, weight.t());
  addmm_scaled_(y, u, B.t(), scaling);
  return {y, saved(u), keep_bits};
}

// The backward's results before the scaling and dtype of the outputs are applied.
struct GradParts {
  at::Tensor g;        // G = dY B [M, R]
  at::Tensor u;        // U [M, R], where ds needs it
  at::Tensor dy_sums;  // [U 1]^T dY: dB^T's rows, then db's
  at::Tensor a_sums;   // G^T D(X): dA / s
};

// Which gradients the caller asks for.
struct GradsWanted {
  bool x, lora, scaling, bias;
};

// G and the dY sums (and, with U recomputed, U and dA's sums) from the pass over dY.
GradParts grad_pass_over_dy(const at::Tensor& dy, const at::Tensor& x2, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, const at::Tensor& u, bool u_saved,
                            bool folded, const GradsWanted& want) {
  const auto t = x2.scalar_type();
  const int64_t M = x2.size(0);
  const bool need_g = want.lora || want.scaling || (want.x && !folded);
  const bool need_dy_sums = want.lora || want.bias;
  GradParts parts;
  parts.u = u;
  if (!u_saved) {
    // U was not saved (no dropout): one pass over the rows of X and dY gives the dY sums
    // and dA's sums G^T X, and U and G where they are used (ds; the unfolded dX).
    if (need_g || need_dy_sums) {
      steps::GradPassOutputs outputs;
      outputs.u = want.scaling;
      outputs.g = want.scaling || (want.x && !folded);
      outputs.dy_u_sums = want.lora;
      outputs.dy_ones_sums = want.bias;
      outputs.x_sums = want.lora;
      std::tie(parts.u, parts.g, parts.dy_sums, parts.a_sums) =
          steps::grad_pass(x2, dy, lora_A, lora_B, /*u_given=*/at::Tensor(), outputs);
    }
  } else if (need_g && need_dy_sums) {
    // The saved U read, not recomputed: one pass over the rows of dY gives G and the dY
    // sums, each element of dY loaded once for both.
    steps::GradPassOutputs outputs;
    outputs.g = true;
    outputs.dy_u_sums = want.lora;
    outputs.dy_ones_sums = want.bias;
    std::tie(std::ignore, parts.g, parts.dy_sums, std::ignore) =
        steps::grad_pass(x2, dy, lora_A, lora_B, /*u_given=*/u, outputs);
  } else {
    at::Tensor coeff;
    if (want.lora && want.bias) {
      coeff = at::cat({u, at::ones({M, 1}, u.options())}, 1);
    } else if (want.lora) {
      coeff = u;
    } else if (want.bias) {
      coeff = at::ones({M, 1}, u.options());
    }
    if (need_g) {
      parts.g = t == acc_dtype(t) ? at::mm(dy, lora_B.to(t))
                                  : steps::shrink(dy, lora_B.t(), DropoutMask{});
    }
    if (need_dy_sums) {
      parts.dy_sums = steps::expand_reduce(steps::ExpandTerm{}, ReduceTerm{dy, coeff},
                                           DropoutMask{});
    }
  }
  return parts;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scaling,
    double dropout_p, const at::Tensor& seed, const at::Tensor& u, const at::Tensor& keep_bits,
    bool need_grad_x, bool need_grad_lora, bool need_grad_scaling, bool need_grad_bias) {
  check_common(x, weight, lora_A, lora_B, scaling, dropout_p, seed);
  const SavedForBackward saved = check_backward_args(grad_y, x, weight, lora_A, dropout_p, u,
                                                     keep_bits, /*u_may_be_empty=*/true);
  const auto t = x.scalar_type();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_A.size(0);
  // The forward's packed mask where saved, else the mask generated from the seed.
  DropoutMask mask = steps::host_dropout_mask(dropout_p, seed);
  if (mask.active && saved.mask_saved) {
    mask.keep_bits = keep_bits.data_ptr<uint8_t>();
    mask.ldbits = keep_bits.stride(0);
  }
  const bool storage_is_acc = t == acc_dtype(t);
  const at::Tensor dy = unit_column_stride(grad_y);
  const at::Tensor x2 = unit_column_stride(x);
  const GradsWanted want{need_grad_x, need_grad_lora, need_grad_scaling, need_grad_bias};
  const bool folded = fold_lora(storage_is_acc, dropout_p, M, N, K);

  at::Tensor grad_x = empty_grad(x, t);
  at::Tensor grad_B = empty_grad(x, lora_B.scalar_type());
  at::Tensor grad_scaling = empty_grad(x, scaling.scalar_type());
  at::Tensor grad_bias = empty_grad(x, t);

  GradParts parts = grad_pass_over_dy(dy, x2, lora_A, lora_B, u, saved.u_saved, folded, want);
  const at::Tensor& g = parts.g;
  // dA's reduce rides along with the pass over X below unless the grad pass did it.
  const bool reduce_A = need_grad_lora && saved.u_saved;
  const ReduceTerm reduce_a{reduce_A ? x2 : at::Tensor(), g};
  if (need_grad_x) {
    if (folded) {
      grad_x = at::mm(dy, steps::fold(weight, lora_B, lora_A, scaling));
      if (reduce_A) parts.a_sums = steps::expand_reduce(steps::ExpandTerm{}, reduce_a, mask);
    } else if (storage_is_acc) {
      // dX = s D(G A) written once (sharing the mask with dA's pass over X), then the
      // GEMM accumulates dY W onto it.
      grad_x = at::empty({M, K}, x.options());
      const at::Tensor sums = steps::expand_reduce(
          steps::overwrite(grad_x, g, lora_A, scaling),
          ReduceTerm{x2, reduce_A ? g : at::Tensor()}, mask);
      if (reduce_A) parts.a_sums = sums;
      grad_x.addmm_(dy, weight);
    } else {
      grad_x = at::mm(dy, weight);
      // dX += s D(G A) and, sharing the pass over X and the mask, sums = G^T D(X).
      const at::Tensor sums =
          steps::expand_reduce(steps::accumulate_into(grad_x, g, lora_A, scaling), reduce_a, mask);
      if (reduce_A) parts.a_sums = sums;
    }
  } else if (reduce_A) {
    parts.a_sums = steps::expand_reduce(steps::ExpandTerm{}, reduce_a, mask);
  }
  at::Tensor grad_A = need_grad_lora ? (parts.a_sums * scaling).to(lora_A.scalar_type())
                                     : empty_grad(x, lora_A.scalar_type());
  if (need_grad_lora) {
    grad_B = (parts.dy_sums.narrow(0, 0, R) * scaling).t().to(lora_B.scalar_type()).contiguous();
  }
  // A copy even when the dtype matches: the row is a view into the sums.
  if (need_grad_bias) {
    grad_bias = parts.dy_sums[parts.dy_sums.size(0) - 1].to(t, /*non_blocking=*/false,
                                                              /*copy=*/true);
  }
  if (need_grad_scaling) grad_scaling = steps::dot(g, parts.u).to(scaling.scalar_type());
  return {grad_x.contiguous(), grad_A, grad_B, grad_scaling, grad_bias};
}

at::Tensor cpu_keep_mask(const at::Tensor& seed, int64_t M, int64_t K, double dropout_p) {
  check_keep_mask_args(seed, M, K, dropout_p);
  at::Tensor keep = at::empty({M, K}, seed.options().dtype(at::kBool));
  if (M * K > 0) {
    cpu::keep_mask(reinterpret_cast<uint8_t*>(keep.data_ptr<bool>()), M, K,
                   steps::host_dropout_mask(dropout_p, seed), at::get_num_threads());
  }
  return keep;
}

// out = the dense weight of a bitsandbytes 4-bit weight (cpu_dequant.h; the Python side,
// lora_kernels/quant4bit.py, reads and checks the quant state; check_dequantize_4bit_args
// checks what the kernel itself reads).
void cpu_dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                         const c10::optional<at::Tensor>& absmax_code,
                         const c10::optional<at::Tensor>& absmax2,
                         const c10::optional<at::Tensor>& offset, int64_t blocksize,
                         int64_t blocksize2, const at::Tensor& out) {
  check_dequantize_4bit_args(packed, absmax, code, absmax_code, absmax2, offset, blocksize,
                             blocksize2, out);
  const int64_t n = out.numel();
  cpu::Dequant4bitArgs args{};
  args.dtype = kernel_dtype(out.scalar_type());
  args.n = n;
  args.packed = packed.data_ptr<uint8_t>();
  args.code = code.data_ptr<float>();
  args.blocksize = blocksize;
  if (absmax2.has_value()) {
    args.absmax_q = absmax.data_ptr<uint8_t>();
    args.absmax_code = absmax_code->data_ptr<float>();
    args.absmax2 = absmax2->data_ptr<float>();
    args.blocksize2 = blocksize2;
    args.offset = offset->item<float>();
  } else {
    args.absmax = absmax.data_ptr<float>();
  }
  args.out = out.data_ptr();
  args.num_threads = at::get_num_threads();
  cpu::dequant_4bit(args);
}

}  // namespace
}  // namespace lora

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("cpp_forward", &lora::cpu_forward);
  m.impl("cpp_backward", &lora::cpu_backward);
  m.impl("cpp_keep_mask", &lora::cpu_keep_mask);
  m.impl("cpp_dequantize_4bit", &lora::cpu_dequantize_4bit);
}
