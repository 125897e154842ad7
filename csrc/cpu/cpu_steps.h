// The CPU kernels (cpu_kernels.h) over tensors, namespace lora::cpu_steps: each step
// packs its small operands, allocates its outputs and calls one kernel;
// cpu/lora_cpu.cpp composes them with ATen GEMMs into the forward and backward. The
// `a` operands are [R, K] in any float dtype and any strides (the steps pack them, they
// are small); x, out are [M, K] with unit column stride; results are in the
// accumulation dtype of x (float32, or float64).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common/dropout_mask.h"

namespace lora {
namespace cpu_steps {

// The dropout mask of the CPU kernels for dropout_p and the 0-dim seed tensor (read on
// the host when dropout_p > 0); no packed mask attached.
DropoutMask host_dropout_mask(double dropout_p, const at::Tensor& seed);

// U [M, R] = D(x) a^T; with an active mask whose keep_bits_out is set, the mask is
// also written there packed.
at::Tensor shrink(const at::Tensor& x, const at::Tensor& a, const DropoutMask& mask);

// What an expand writes into out [M, K] (storage dtype, unit column stride):
//   out = base + s * D(g a)
// with base out itself (accumulate), zero (overwrite: out is not read) or a given
// tensor, [K] broadcast over the rows (the bias) or [M, K] (W, for the fold).
struct ExpandTerm {
  enum class Base { kOut, kZero, kTensor };
  at::Tensor out;  // undefined: no expand
  Base base_kind = Base::kOut;
  at::Tensor base;
  at::Tensor g, a, scaling;  // g [M, R], a [R, K], scaling 0-dim
};
ExpandTerm accumulate_into(const at::Tensor& out, const at::Tensor& g, const at::Tensor& a,
                           const at::Tensor& scaling);
ExpandTerm overwrite(const at::Tensor& out, const at::Tensor& g, const at::Tensor& a,
                     const at::Tensor& scaling);
ExpandTerm base_plus(const at::Tensor& out, const at::Tensor& base, const at::Tensor& g,
                     const at::Tensor& a, const at::Tensor& scaling);

// What a reduce sums: sums [R2, K] = coeff^T D(x), coeff [M, R2]. Either undefined: no
// reduce.
struct ReduceTerm {
  at::Tensor x, coeff;
};

// One pass over [M, K] doing the expand, the reduce or both, sharing the mask (read
// from mask.keep_bits where set, else generated); returns the sums, or undefined
// without a reduce.
at::Tensor expand_reduce(const ExpandTerm& expand, const ReduceTerm& reduce,
                         const DropoutMask& mask);

// Which results the backward's pass over x and dy gives (cpu::GradPassArgs).
struct GradPassOutputs {
  bool u = false;       // U = x A^T (computed, or the given U)
  bool g = false;       // G = dy B
  bool dy_u_sums = false;   // U^T dy: dB's sums, the first R rows of dy_sums
  bool dy_ones_sums = false;  // 1^T dy: db, the last row of dy_sums
  bool x_sums = false;  // G^T x: dA's sums
};

// The backward's pass over x and dy: {U, G, dy_sums, x_sums}, each undefined where not
// asked for. With u_given defined (U saved by the forward) U is read, not computed,
// and x is read only for x_sums.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grad_pass(
    const at::Tensor& x, const at::Tensor& dy, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& u_given, const GradPassOutputs& outputs);

// sum(a * b) of two [M, R] accumulation-dtype tensors, 0-dim, in a fixed order.
at::Tensor dot(const at::Tensor& a, const at::Tensor& b);

// W + s B A [N, K] in W's dtype (float32/float64), one pass of the expand kernel.
at::Tensor fold(const at::Tensor& weight, const at::Tensor& B, const at::Tensor& A,
                const at::Tensor& scaling);

}  // namespace cpu_steps
}  // namespace lora
