// The CPU kernels over tensors (cpu_steps.h).
#include "cpu/cpu_steps.h"

#include <ATen/Parallel.h>

#include "common/element_math.h"
#include "common/op_common.h"
#include "cpu/cpu_kernels.h"

namespace lora {
namespace cpu_steps {
namespace {

// [round_up(rows, kPadK), round_up(R, kPadR)] zero-padded, accumulation dtype: the
// packed right operand of the shrink (a^T for a [R, rows]).
at::Tensor pack_shrink_operand(const at::Tensor& a_t, at::ScalarType acc) {
  const int64_t rows = a_t.size(0), R = a_t.size(1);
  at::Tensor packed = at::zeros({round_up(rows, cpu::kPadK), round_up(R, cpu::kPadR)},
                                a_t.options().dtype(acc));
  packed.narrow(0, 0, rows).narrow(1, 0, R).copy_(a_t);
  return packed;
}

}  // namespace

DropoutMask host_dropout_mask(double dropout_p, const at::Tensor& seed) {
  DropoutMask mask = make_dropout_mask(dropout_p);
  if (dropout_p > 0.0) mask.seed = static_cast<uint64_t>(seed.item<int64_t>());
  return mask;
}

at::Tensor shrink(const at::Tensor& x, const at::Tensor& a, const DropoutMask& mask) {
  const int64_t M = x.size(0), K = x.size(1), R = a.size(0);
  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor u = at::empty({M, R}, x.options().dtype(acc));
  if (M == 0 || R == 0) return u;
  const at::Tensor a_t = pack_shrink_operand(a.t(), acc);
  cpu::ShrinkArgs args{};
  args.dtype = kernel_dtype(x.scalar_type());
  args.M = M;
  args.K = K;
  args.R = R;
  args.x = x.data_ptr();
  args.ldx = x.stride(0);
  args.a_t = a_t.data_ptr();
  args.u = u.data_ptr();
  args.ldu = R;
  args.mask = mask;
  args.num_threads = at::get_num_threads();
  cpu::shrink(args);
  return u;
}

ExpandTerm accumulate_into(const at::Tensor& out, const at::Tensor& g, const at::Tensor& a,
                           const at::Tensor& scaling) {
  return {out, ExpandTerm::Base::kOut, at::Tensor(), g, a, scaling};
}

ExpandTerm overwrite(const at::Tensor& out, const at::Tensor& g, const at::Tensor& a,
                     const at::Tensor& scaling) {
  return {out, ExpandTerm::Base::kZero, at::Tensor(), g, a, scaling};
}

ExpandTerm base_plus(const at::Tensor& out, const at::Tensor& base, const at::Tensor& g,
                     const at::Tensor& a, const at::Tensor& scaling) {
  return {out, ExpandTerm::Base::kTensor, base, g, a, scaling};
}

at::Tensor expand_reduce(const ExpandTerm& expand, const ReduceTerm& reduce,
                         const DropoutMask& mask) {
  const at::Tensor& out = expand.out;
  const at::Tensor& ref = out.defined() ? out : reduce.x;
  const int64_t M = ref.size(0), K = ref.size(1);
  const auto acc = acc_dtype(ref.scalar_type());
  const auto opts = ref.options().dtype(acc);
  cpu::ExpandReduceArgs args{};
  args.dtype = kernel_dtype(ref.scalar_type());
  args.M = M;
  args.K = K;
  at::Tensor a_packed, g_acc, s_acc, coeff_acc, sums, base_c;
  if (out.defined()) {
    const int64_t R = expand.g.size(1);
    const int64_t Kp = round_up(K, cpu::kPadK);
    a_packed = at::zeros({R, Kp}, opts);
    a_packed.narrow(1, 0, K).copy_(expand.a);
    g_acc = expand.g.to(acc).contiguous();
    s_acc = expand.scaling.to(acc).contiguous();
    args.out = out.data_ptr();
    args.ldo = out.stride(0);
    args.g = g_acc.data_ptr();
    args.ldg = R;
    args.a = a_packed.data_ptr();
    args.lda = Kp;
    args.R = R;
    args.s = s_acc.data_ptr();
    if (expand.base_kind == ExpandTerm::Base::kTensor) {
      base_c = expand.base.contiguous();
      args.in = base_c.data_ptr();
      args.ldi = expand.base.dim() == 1 ? 0 : base_c.stride(0);  // 0: the same row for every m
    } else {
      args.overwrite = expand.base_kind == ExpandTerm::Base::kZero;
    }
  }
  if (reduce.x.defined() && reduce.coeff.defined()) {
    const int64_t R2 = reduce.coeff.size(1);
    coeff_acc = reduce.coeff.to(acc).contiguous();
    sums = at::empty({R2, K}, opts);
    args.x = reduce.x.data_ptr();
    args.ldx = reduce.x.stride(0);
    args.g2 = coeff_acc.data_ptr();
    args.ldg2 = R2;
    args.R2 = R2;
    args.sums = sums.data_ptr();
    args.ldsums = K;
  }
  args.mask = mask;
  args.num_threads = at::get_num_threads();
  if (args.out != nullptr || args.sums != nullptr) cpu::expand_reduce(args);
  return sums;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grad_pass(
    const at::Tensor& x, const at::Tensor& dy, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& u_given, const GradPassOutputs& outputs) {
  const int64_t M = x.size(0), K = x.size(1), N = dy.size(1), R = A.size(0);
  const auto acc = acc_dtype(x.scalar_type());
  const auto opts = x.options().dtype(acc);
  const int64_t R2 = (outputs.dy_u_sums ? R : 0) + (outputs.dy_ones_sums ? 1 : 0);
  at::Tensor u = outputs.u ? at::empty({M, R}, opts) : at::Tensor();
  at::Tensor g = outputs.g ? at::empty({M, R}, opts) : at::Tensor();
  at::Tensor dy_sums = R2 > 0 ? at::empty({R2, N}, opts) : at::Tensor();
  at::Tensor x_sums = outputs.x_sums ? at::empty({R, K}, opts) : at::Tensor();
  const at::Tensor a_t = pack_shrink_operand(A.t(), acc), b = pack_shrink_operand(B, acc);
  cpu::GradPassArgs args{};
  args.dtype = kernel_dtype(x.scalar_type());
  args.M = M;
  args.K = K;
  args.N = N;
  args.R = R;
  args.x = x.data_ptr();
  args.ldx = x.stride(0);
  args.dy = dy.data_ptr();
  args.lddy = dy.stride(0);
  args.a_t = a_t.data_ptr();
  args.b = b.data_ptr();
  args.u = outputs.u ? u.data_ptr() : nullptr;
  const at::Tensor u_in = u_given.defined() ? unit_column_stride(u_given) : at::Tensor();
  if (u_in.defined()) {
    args.u_in = u_in.data_ptr();
    args.ldu_in = u_in.stride(0);
  }
  args.g = outputs.g ? g.data_ptr() : nullptr;
  args.u_sums = outputs.dy_u_sums;
  args.ones = outputs.dy_ones_sums;
  args.dy_sums = R2 > 0 ? dy_sums.data_ptr() : nullptr;
  args.x_sums = outputs.x_sums ? x_sums.data_ptr() : nullptr;
  args.num_threads = at::get_num_threads();
  cpu::grad_pass(args);
  return {u, g, dy_sums, x_sums};
}

at::Tensor dot(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const double v =
      cpu::dot(kernel_dtype(ac.scalar_type()), ac.data_ptr(), bc.data_ptr(), ac.numel());
  return at::scalar_tensor(v, ac.options());
}

at::Tensor fold(const at::Tensor& weight, const at::Tensor& B, const at::Tensor& A,
                const at::Tensor& scaling) {
  const at::Tensor w = unit_column_stride(weight);
  at::Tensor out = at::empty({w.size(0), w.size(1)}, w.options());
  if (A.size(0) == 0) return out.copy_(w);
  // out = W + s B A: the expand with W as its base (g = B, a = A), no dropout.
  expand_reduce(base_plus(out, w, B, A, scaling), ReduceTerm{}, DropoutMask{});
  return out;
}

}  // namespace cpu_steps
}  // namespace lora
