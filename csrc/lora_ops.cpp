// The lora_kernels::cpp_* ops: schemas, argument checks, the forward/backward
// orchestration (ATen GEMMs accumulating onto what the custom steps wrote, plus the
// custom steps), and the CPU implementation. The CUDA implementation (lora_cuda.cpp)
// reuses the orchestration with its own steps (it has no optional fused steps, so it
// takes the composed forms marked "else" below).
//
// Forward (T = x's dtype; float32 and float64 take the ATen path, bfloat16 and float16
// the fp32-accumulating custom kernels for everything but the base GEMM):
//   U = D(X) A^T              custom masked shrink; it packs the keep mask it generates
//                             into keep_bits, the third output, saved for backward
//                             (CUDA, p == 0: ATen mm)
//   Y = b + U (s B)^T         custom expand writing Y (the pass ATen's addmm would spend
//                             broadcasting b), then
//   Y += X W^T                ATen addmm_ (beta = 1)
//     else Y = X W^T + b, Y += U (s B)^T (ATen addmm, addmm_; custom expand for 16-bit T)
// With p == 0 and M >= N, K the LoRA term folds into the weight instead:
//   Y = X (W + s B A)^T + b   (one GEMM; W + s B A one pass of the custom expand; on
//                             the CPU the GEMM runs without b and Y += b follows)
// With p == 0 on the CPU (Steps::grad_pass) u is returned empty: backward recomputes U.
//
// Backward (the keep mask read from keep_bits, never generated again):
//   G = dY B and              one custom pass over dY, the saved U read (the grad
//   [dB^T; db] = [U 1]^T dY     pass's dY part: one load of dY feeds G and the sums)
//                               else ATen mm for G, a custom reduce for the sums
//   dX = s D(G A)             custom masked expand writing dX, sharing the mask and the
//   dA = s G^T D(X)           pass with the custom reduce over the rows of X, then
//   dX += dY W                ATen addmm_ (beta = 1)
//     else dX = dY W, then dX += s D(G A) in place (16-bit T: rounded once)
//   (p == 0 and folded: dX = dY (W + s B A), dA by the custom reduce alone)
//   (p == 0, u empty: U, G, the dY sums and dA's sums G^T X from one custom pass over
//    the rows of X and dY, each block of X read again from cache for G^T X)
//   ds = sum(G * U)
// The reductions over rows run in an order fixed by the shapes, so CPU results do not
// depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "lora_cpu.h"
#include "lora_math.h"
#include "lora_ops.h"

namespace lora {
namespace {

const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

bool is_storage_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_dropout_p(double dropout_p) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0,
              "lora_kernels: dropout_p must satisfy 0 <= dropout_p < 1, got ", dropout_p);
}

void check_seed(const at::Tensor& seed, const at::Device& device) {
  TORCH_CHECK(seed.dim() == 0 && seed.scalar_type() == at::kLong,
              "lora_kernels: seed must be a 0-dim int64 tensor, got ", seed.dim(),
              "-dim ", dtype_name(seed.scalar_type()));
  TORCH_CHECK(seed.device() == device, "lora_kernels: seed must be on ", device,
              " (the device of x), got ", seed.device());
}

// Shapes, dtypes and devices shared by forward and backward (docs/backends.md).
void check_common(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                  const at::Tensor& lora_B, const at::Tensor& scaling, double dropout_p,
                  const at::Tensor& seed) {
  TORCH_CHECK(x.dim() == 2, "lora_kernels: x must be 2-D [M, K], got ", x.dim(), "-D ",
              x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(is_storage_dtype(t),
              "lora_kernels: x must be float32, float64, bfloat16 or float16, got ",
              dtype_name(t));
  const int64_t K = x.size(1);
  const at::Device device = x.device();
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K,
              "lora_kernels: weight must be [N, K] with K = ", K, " (x's last dim), got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == t, "lora_kernels: weight must have x's dtype ",
              dtype_name(t), ", got ", dtype_name(weight.scalar_type()));
  const int64_t N = weight.size(0);
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == K,
              "lora_kernels: lora_A must be [R, K] with K = ", K, ", got ", lora_A.sizes());
  const int64_t R = lora_A.size(0);
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == N && lora_B.size(1) == R,
              "lora_kernels: lora_B must be [N, R] = [", N, ", ", R, "], got ", lora_B.sizes());
  TORCH_CHECK(lora_A.scalar_type() == t || lora_A.scalar_type() == at::kFloat,
              "lora_kernels: lora_A must have x's dtype ", dtype_name(t), " or float32, got ",
              dtype_name(lora_A.scalar_type()));
  TORCH_CHECK(lora_B.scalar_type() == lora_A.scalar_type(),
              "lora_kernels: lora_B must have lora_A's dtype ", dtype_name(lora_A.scalar_type()),
              ", got ", dtype_name(lora_B.scalar_type()));
  const auto acc = acc_dtype(t);
  TORCH_CHECK(scaling.dim() == 0 && scaling.scalar_type() == acc,
              "lora_kernels: scaling must be a 0-dim ", dtype_name(acc), " tensor, got ",
              scaling.dim(), "-dim ", dtype_name(scaling.scalar_type()));
  for (const auto& [name, tensor] :
       {std::pair<const char*, const at::Tensor*>{"weight", &weight},
        {"lora_A", &lora_A},
        {"lora_B", &lora_B},
        {"scaling", &scaling}}) {
    TORCH_CHECK(tensor->device() == device, "lora_kernels: ", name, " must be on ", device,
                " (the device of x), got ", tensor->device());
  }
  check_dropout_p(dropout_p);
  check_seed(seed, device);
}

// x as the kernels read it: unit column stride (one contiguous copy otherwise).
at::Tensor unit_column_stride(const at::Tensor& t) {
  return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous();
}

// out += s * (a @ b) in place, s applied to the smaller operand rather than passed as
// alpha: MKL's result for a general alpha depends on the thread count (it scales at a
// point that depends on the partition), with alpha = 1 it does not. The 0-dim scaling is
// never read on the host (no device sync, nothing data-dependent for torch.compile).
void addmm_scaled_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                   const at::Tensor& scaling) {
  if (a.numel() <= b.numel()) {
    out.addmm_(a * scaling.to(a.scalar_type()), b);
  } else {
    out.addmm_(a, b * scaling.to(b.scalar_type()));
  }
}

// Fold the LoRA term into the weight (p == 0, float32/64) when that costs less than
// the R-wide GEMMs it replaces: the fold is one pass over [N, K], the term one over
// [M, N] (forward) or [M, K] (backward).
bool fold_lora(bool fast, const Dropout& d, int64_t M, int64_t N, int64_t K) {
  return fast && !d.active() && M >= N && M >= K;
}

at::Tensor empty_grad(const at::Tensor& like, at::ScalarType dtype) {
  return at::empty({0}, like.options().dtype(dtype));
}

}  // namespace

void check_keep_mask_args(const at::Tensor& seed, int64_t M, int64_t K, double dropout_p) {
  TORCH_CHECK(M >= 0 && K >= 0, "lora_kernels: M and K must be >= 0, got M = ", M, ", K = ", K);
  check_dropout_p(dropout_p);
  check_seed(seed, seed.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scaling,
    double dropout_p, const at::Tensor& seed, const Steps& steps) {
  check_common(x, weight, lora_A, lora_B, scaling, dropout_p, seed);
  const auto t = x.scalar_type();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "lora_kernels: bias must be [N] = [", N,
                "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == t, "lora_kernels: bias must have x's dtype ",
                dtype_name(t), ", got ", dtype_name(bias->scalar_type()));
    TORCH_CHECK(bias->device() == x.device(), "lora_kernels: bias must be on ", x.device(),
                " (the device of x), got ", bias->device());
  }
  // The mask packed one bit per element, filled by the shrink step and saved for
  // backward (docs/backends.md); empty without dropout.
  const at::Tensor keep_bits =
      dropout_p > 0.0 ? at::empty({M, ceil_div(K, 8)}, x.options().dtype(at::kByte))
                      : at::empty({0}, x.options().dtype(at::kByte));
  if (dropout_p > 0.0 && !make_dropout_params(dropout_p).active) {
    // p below 2^-32: the threshold floors to 0 and every element is kept, so no step
    // generates a mask; the packed mask is all ones (padding bits 0).
    keep_bits.fill_(0xFF);
    if (K % 8 != 0) keep_bits.select(1, K / 8).fill_((1 << (K % 8)) - 1);
  }
  const Dropout d{dropout_p, seed, dropout_p > 0.0 ? keep_bits : at::Tensor()};
  const at::Tensor x2 = unit_column_stride(x);
  // float32 / float64: every GEMM in ATen, in x's dtype (which is the accumulation dtype).
  const bool fast = t == acc_dtype(t);
  // X w^T + b; b added after the GEMM where the device prefers it (Steps::bias_after_gemm),
  // only in the accumulation dtype (a 16-bit Y would be rounded twice).
  const auto linear = [&](const at::Tensor& w) {
    if (!bias.has_value()) return at::mm(x2, w.t());
    return fast && steps.bias_after_gemm ? at::mm(x2, w.t()).add_(*bias)
                                         : at::addmm(*bias, x2, w.t());
  };
  // Without dropout, a device with the grad_pass step recomputes U in backward (in the
  // pass over X that dA needs anyway), so u is returned empty ([0, R]) and nothing but x
  // is saved.
  const bool save_u = d.active() || steps.grad_pass == nullptr;
  const at::Tensor unsaved_u =
      save_u ? at::Tensor() : at::empty({0, lora_A.size(0)}, x.options().dtype(acc_dtype(t)));
  const auto saved = [&](const at::Tensor& u) { return save_u ? u : unsaved_u; };
  if (fast) {
    const at::Tensor A = lora_A.to(t), B = lora_B.to(t);
    const auto shrink_u = [&] {
      return d.active() || steps.shrink_without_dropout ? steps.shrink(x2, lora_A, d)
                                                        : at::mm(x2, A.t());
    };
    if (fold_lora(fast, d, M, N, K)) {
      // The folded GEMM needs no U; it is computed only where backward keeps it.
      return {linear(steps.fold(weight, B, A, scaling)), save_u ? shrink_u() : unsaved_u,
              keep_bits};
    }
    at::Tensor u = shrink_u();
    if (bias.has_value() && steps.expand_write_reduce != nullptr) {
      // Y = b + s U B^T, written in the one pass over Y that the bias needs anyway (ATen's
      // addmm broadcasts b into Y before its GEMM), then the GEMM adds X W^T onto it.
      at::Tensor y = at::empty({M, N}, x.options());
      steps.expand_write_reduce(y, *bias, u, lora_B.t(), scaling, at::Tensor(), at::Tensor(),
                                Dropout{0.0, seed});
      y.addmm_(x2, weight.t());
      return {y, saved(u), keep_bits};
    }
    at::Tensor y = linear(weight);
    addmm_scaled_(y, u, B.t(), scaling);
    return {y, saved(u), keep_bits};
  }
  at::Tensor u = steps.shrink(x2, lora_A, d);
  at::Tensor y = linear(weight);
  // y += s * U B^T, accumulated in fp32 and rounded to x's dtype once.
  steps.expand_reduce(y, u, lora_B.t(), scaling, at::Tensor(), at::Tensor(), Dropout{0.0, seed});
  return {y, saved(u), keep_bits};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scaling,
    double dropout_p, const at::Tensor& seed, const at::Tensor& u, const at::Tensor& keep_bits,
    bool need_grad_x, bool need_grad_lora, bool need_grad_scaling, bool need_grad_bias,
    const Steps& steps) {
  check_common(x, weight, lora_A, lora_B, scaling, dropout_p, seed);
  const auto t = x.scalar_type();
  const auto acc = acc_dtype(t);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_A.size(0);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == M && grad_y.size(1) == N,
              "lora_kernels: grad_y must be [M, N] = [", M, ", ", N, "], got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == t, "lora_kernels: grad_y must have x's dtype ",
              dtype_name(t), ", got ", dtype_name(grad_y.scalar_type()));
  // u without rows ([0, R], the forward's output without dropout on the CPU): U is
  // recomputed here. (With M = 0 either reading gives the same empty results.)
  const bool u_saved = !(M > 0 && u.dim() == 2 && u.size(0) == 0 && u.size(1) == R);
  if (u_saved) {
    TORCH_CHECK(u.dim() == 2 && u.size(0) == M && u.size(1) == R,
                "lora_kernels: u must be [M, R] = [", M, ", ", R, "] or, without dropout on ",
                "the CPU, [0, R] (the forward's second output), got ", u.sizes());
  } else {
    TORCH_CHECK(dropout_p == 0.0 && steps.grad_pass != nullptr,
                "lora_kernels: u may be empty ([0, R]) only without dropout on the CPU (the ",
                "forward's second output); with dropout_p = ", dropout_p, " on ", x.device(),
                " it must be [M, R] = [", M, ", ", R, "]");
  }
  TORCH_CHECK(u.scalar_type() == acc, "lora_kernels: u must be ", dtype_name(acc), ", got ",
              dtype_name(u.scalar_type()));
  for (const auto& [name, tensor] : {std::pair<const char*, const at::Tensor*>{"grad_y", &grad_y},
                                     {"u", &u}}) {
    TORCH_CHECK(tensor->device() == x.device(), "lora_kernels: ", name, " must be on ",
                x.device(), " (the device of x), got ", tensor->device());
  }
  TORCH_CHECK(keep_bits.scalar_type() == at::kByte && keep_bits.device() == x.device(),
              "lora_kernels: keep_bits must be uint8 on ", x.device(), ", got ",
              dtype_name(keep_bits.scalar_type()), " on ", keep_bits.device());
  const bool saved_mask = dropout_p > 0.0 && keep_bits.numel() > 0;
  if (saved_mask) {
    TORCH_CHECK(keep_bits.dim() == 2 && keep_bits.size(0) == M &&
                    keep_bits.size(1) == ceil_div(K, 8) && keep_bits.is_contiguous(),
                "lora_kernels: keep_bits must be a contiguous [M, ceil(K / 8)] = [", M, ", ",
                ceil_div(K, 8), "] (the forward's third output), got ", keep_bits.sizes());
  }
  const Dropout d{dropout_p, seed, saved_mask ? keep_bits : at::Tensor()};
  const bool fast = t == acc;
  const at::Tensor dy = unit_column_stride(grad_y);
  const at::Tensor x2 = unit_column_stride(x);

  at::Tensor grad_x = empty_grad(x, t);
  at::Tensor grad_A = empty_grad(x, lora_A.scalar_type());
  at::Tensor grad_B = empty_grad(x, lora_B.scalar_type());
  at::Tensor grad_scaling = empty_grad(x, scaling.scalar_type());
  at::Tensor grad_bias = empty_grad(x, t);

  // G = dY B [M, R] (accumulation dtype) and, from the same pass over dY, the sums
  // [dB^T; db] = [U 1]^T dY [R (+1), N].
  const bool fold = fold_lora(fast, d, M, N, K);
  const bool need_g = need_grad_lora || need_grad_scaling || (need_grad_x && !fold);
  const bool need_dy_sums = need_grad_lora || need_grad_bias;
  at::Tensor g, dy_sums, u_used = u;
  bool grad_A_done = false;
  const Dropout no_dropout{0.0, seed};
  if (!u_saved) {
    // U was not saved (no dropout): one pass over the rows of X and dY gives the dY sums
    // and dA's sums G^T X, and U and G where they are used below (ds; the unfolded dX).
    if (need_g || need_dy_sums) {
      std::tie(u_used, g, dy_sums, grad_A) = steps.grad_pass(
          x2, dy, lora_A, lora_B, /*u_given=*/at::Tensor(), /*want_u=*/need_grad_scaling,
          /*want_g=*/need_grad_scaling || (need_grad_x && !fold), need_grad_lora,
          need_grad_bias, need_grad_lora);
      grad_A_done = need_grad_lora;
    }
  } else if (need_g && need_dy_sums && steps.grad_pass != nullptr) {
    // The saved U read, not recomputed: one pass over the rows of dY gives G and the dY
    // sums, each element of dY loaded once for both.
    std::tie(std::ignore, g, dy_sums, std::ignore) =
        steps.grad_pass(x2, dy, lora_A, lora_B, /*u_given=*/u, /*want_u=*/false,
                        /*want_g=*/true, need_grad_lora, need_grad_bias, /*x_sums=*/false);
  } else {
    at::Tensor coeff;
    if (need_grad_lora && need_grad_bias) {
      coeff = at::cat({u, at::ones({M, 1}, u.options())}, 1);
    } else if (need_grad_lora) {
      coeff = u;
    } else if (need_grad_bias) {
      coeff = at::ones({M, 1}, u.options());
    }
    if (need_g) g = fast ? at::mm(dy, lora_B.to(t)) : steps.shrink(dy, lora_B.t(), no_dropout);
    if (need_dy_sums) {
      dy_sums = steps.expand_reduce(at::Tensor(), at::Tensor(), at::Tensor(), scaling, dy,
                                    coeff, no_dropout);
    }
  }

  if (need_grad_x) {
    // dA's reduce rides along with the pass over X below unless the grad pass did it.
    const bool reduce_A = need_grad_lora && !grad_A_done;
    if (fold) {
      grad_x = at::mm(dy, steps.fold(weight, lora_B, lora_A, scaling));
      if (reduce_A) grad_A = steps.expand_reduce(at::Tensor(), g, lora_A, scaling, x2, g, d);
    } else if (fast && steps.expand_write_reduce != nullptr) {
      // dX = s D(G A) written once (sharing the mask with dA's pass over X), then the
      // GEMM accumulates dY W onto it.
      grad_x = at::empty({M, K}, x.options());
      const at::Tensor sums = steps.expand_write_reduce(grad_x, at::Tensor(), g, lora_A, scaling,
                                                        x2, reduce_A ? g : at::Tensor(), d);
      if (reduce_A) grad_A = sums;
      grad_x.addmm_(dy, weight);
    } else {
      grad_x = at::mm(dy, weight);
      // dX += s D(G A) and, sharing the pass over X and the mask, sums = G^T D(X).
      const at::Tensor sums = steps.expand_reduce(
          grad_x, g, lora_A, scaling, reduce_A ? x2 : at::Tensor(), g, d);
      if (reduce_A) grad_A = sums;
    }
  } else if (need_grad_lora && !grad_A_done) {
    grad_A = steps.expand_reduce(at::Tensor(), g, lora_A, scaling, x2, g, d);
  }
  if (need_grad_lora) grad_A = (grad_A * scaling).to(lora_A.scalar_type());
  if (!grad_A.defined()) grad_A = empty_grad(x, lora_A.scalar_type());

  if (need_grad_lora) {
    grad_B = (dy_sums.narrow(0, 0, R) * scaling).t().to(lora_B.scalar_type()).contiguous();
  }
  // A copy even when the dtype matches: the row is a view into the sums.
  if (need_grad_bias) {
    grad_bias = dy_sums[dy_sums.size(0) - 1].to(t, /*non_blocking=*/false, /*copy=*/true);
  }
  if (need_grad_scaling) grad_scaling = steps.dot(g, u_used).to(scaling.scalar_type());
  return {grad_x.contiguous(), grad_A, grad_B, grad_scaling, grad_bias};
}

namespace {

// ---- CPU steps -------------------------------------------------------------------

cpu::DType cpu_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cpu::DType::kFloat32;
    case at::kDouble:
      return cpu::DType::kFloat64;
    case at::kBFloat16:
      return cpu::DType::kBFloat16;
    case at::kHalf:
      return cpu::DType::kFloat16;
    default:
      TORCH_CHECK(false, "lora_kernels: unsupported dtype ", dtype_name(t));
  }
}

cpu::Mask cpu_mask(const Dropout& d) {
  cpu::Mask mask{false, 0, 0u, 1.0f};
  if (d.active()) {
    const DropoutParams params = make_dropout_params(d.p);
    mask.active = params.active;
    mask.seed = static_cast<uint64_t>(d.seed.item<int64_t>());
    mask.threshold = params.threshold;
    mask.scale = params.scale;
  }
  return mask;
}

// [round_up(rows, kPadK), round_up(R, kPadR)] zero-padded, accumulation dtype: the
// packed right operand of the shrink (a^T for a [R, rows]).
at::Tensor pack_shrink_operand(const at::Tensor& a_t, at::ScalarType acc) {
  const int64_t rows = a_t.size(0), R = a_t.size(1);
  at::Tensor packed = at::zeros({round_up(rows, cpu::kPadK), round_up(R, cpu::kPadR)},
                                a_t.options().dtype(acc));
  packed.narrow(0, 0, rows).narrow(1, 0, R).copy_(a_t);
  return packed;
}

// U = D(x) a^T; with dropout it also writes the packed keep mask into d.keep_bits.
at::Tensor cpu_shrink(const at::Tensor& x, const at::Tensor& a, const Dropout& d) {
  const int64_t M = x.size(0), K = x.size(1), R = a.size(0);
  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor u = at::empty({M, R}, x.options().dtype(acc));
  if (M == 0 || R == 0) return u;
  const at::Tensor a_t = pack_shrink_operand(a.t(), acc);
  cpu::ShrinkArgs args{};
  args.dtype = cpu_dtype(x.scalar_type());
  args.M = M;
  args.K = K;
  args.R = R;
  args.x = x.data_ptr();
  args.ldx = x.stride(0);
  args.at = a_t.data_ptr();
  args.u = u.data_ptr();
  args.ldu = R;
  args.mask = cpu_mask(d);
  args.num_threads = at::get_num_threads();
  if (args.mask.active && d.keep_bits.defined()) {
    args.keep_bits_out = d.keep_bits.data_ptr();
    args.ldbits = d.keep_bits.stride(0);
  }
  cpu::shrink(args);
  return u;
}

// The backward's pass over x and dy (Steps::grad_pass, cpu::GradPassArgs): U recomputed,
// or read from u_given where the forward saved it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_grad_pass(
    const at::Tensor& x, const at::Tensor& dy, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& u_given, bool want_u, bool want_g, bool u_sums, bool ones,
    bool x_sums) {
  const int64_t M = x.size(0), K = x.size(1), N = dy.size(1), R = A.size(0);
  const auto acc = acc_dtype(x.scalar_type());
  const auto opts = x.options().dtype(acc);
  const int64_t R2 = (u_sums ? R : 0) + (ones ? 1 : 0);
  at::Tensor u = want_u ? at::empty({M, R}, opts) : at::Tensor();
  at::Tensor g = want_g ? at::empty({M, R}, opts) : at::Tensor();
  at::Tensor dy_sums = R2 > 0 ? at::empty({R2, N}, opts) : at::Tensor();
  at::Tensor sums_x = x_sums ? at::empty({R, K}, opts) : at::Tensor();
  const at::Tensor a_t = pack_shrink_operand(A.t(), acc), b = pack_shrink_operand(B, acc);
  cpu::GradPassArgs args{};
  args.dtype = cpu_dtype(x.scalar_type());
  args.M = M;
  args.K = K;
  args.N = N;
  args.R = R;
  args.x = x.data_ptr();
  args.ldx = x.stride(0);
  args.dy = dy.data_ptr();
  args.lddy = dy.stride(0);
  args.at = a_t.data_ptr();
  args.bt = b.data_ptr();
  args.u = want_u ? u.data_ptr() : nullptr;
  const at::Tensor u_in = u_given.defined() ? unit_column_stride(u_given) : at::Tensor();
  if (u_in.defined()) {
    args.u_in = u_in.data_ptr();
    args.ldu_in = u_in.stride(0);
  }
  args.g = want_g ? g.data_ptr() : nullptr;
  args.u_sums = u_sums;
  args.ones = ones;
  args.dy_sums = R2 > 0 ? dy_sums.data_ptr() : nullptr;
  args.x_sums = x_sums ? sums_x.data_ptr() : nullptr;
  args.num_threads = at::get_num_threads();
  cpu::grad_pass(args);
  return {u, g, dy_sums, sums_x};
}

// The expand / reduce pass. `base` undefined: out += s D(g a) in place, or, with
// `write`, out = s D(g a) without reading out; `base` defined: out = base + s D(g a),
// base [K] (broadcast over the rows: the bias) or [M, K] with unit column stride (W,
// for the fold).
at::Tensor cpu_expand_reduce_impl(const at::Tensor& out, bool write, const at::Tensor& base,
                                  const at::Tensor& g, const at::Tensor& a,
                                  const at::Tensor& scaling, const at::Tensor& x,
                                  const at::Tensor& g2, const Dropout& d) {
  const at::Tensor& ref = out.defined() ? out : x;
  const int64_t M = ref.size(0), K = ref.size(1);
  const auto acc = acc_dtype(ref.scalar_type());
  const auto opts = ref.options().dtype(acc);
  cpu::ExpandReduceArgs args{};
  args.dtype = cpu_dtype(ref.scalar_type());
  args.M = M;
  args.K = K;
  at::Tensor a_packed, g_acc, s_acc, g2_acc, sums, base_c;
  if (out.defined()) {
    const int64_t R = g.size(1);
    const int64_t Kp = round_up(K, cpu::kPadK);
    a_packed = at::zeros({R, Kp}, opts);
    a_packed.narrow(1, 0, K).copy_(a);
    g_acc = g.to(acc).contiguous();
    s_acc = scaling.to(acc).contiguous();
    args.out = out.data_ptr();
    args.ldo = out.stride(0);
    args.g = g_acc.data_ptr();
    args.ldg = R;
    args.a = a_packed.data_ptr();
    args.lda = Kp;
    args.R = R;
    args.s = s_acc.data_ptr();
    if (base.defined()) {
      base_c = base.contiguous();
      args.in = base_c.data_ptr();
      args.ldi = base.dim() == 1 ? 0 : base_c.stride(0);  // 0: the same row for every m
    } else {
      args.overwrite = write;
    }
  }
  if (x.defined() && g2.defined()) {
    const int64_t R2 = g2.size(1);
    g2_acc = g2.to(acc).contiguous();
    sums = at::empty({R2, K}, opts);
    args.x = x.data_ptr();
    args.ldx = x.stride(0);
    args.g2 = g2_acc.data_ptr();
    args.ldg2 = R2;
    args.R2 = R2;
    args.sums = sums.data_ptr();
    args.ldsums = K;
  }
  args.mask = cpu_mask(d);
  if (args.mask.active && d.keep_bits.defined()) {
    args.keep_bits = d.keep_bits.data_ptr();
    args.ldbits = d.keep_bits.stride(0);
  }
  args.num_threads = at::get_num_threads();
  if (args.out != nullptr || args.sums != nullptr) cpu::expand_reduce(args);
  return sums;
}

at::Tensor cpu_expand_reduce(const at::Tensor& out, const at::Tensor& g, const at::Tensor& a,
                             const at::Tensor& scaling, const at::Tensor& x, const at::Tensor& g2,
                             const Dropout& d) {
  return cpu_expand_reduce_impl(out, /*write=*/false, at::Tensor(), g, a, scaling, x, g2, d);
}

at::Tensor cpu_expand_write_reduce(const at::Tensor& out, const at::Tensor& row,
                                   const at::Tensor& g, const at::Tensor& a,
                                   const at::Tensor& scaling, const at::Tensor& x,
                                   const at::Tensor& g2, const Dropout& d) {
  return cpu_expand_reduce_impl(out, /*write=*/true, row, g, a, scaling, x, g2, d);
}

at::Tensor cpu_dot(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const double v = cpu::dot(cpu_dtype(ac.scalar_type()), ac.data_ptr(), bc.data_ptr(), ac.numel());
  return at::scalar_tensor(v, ac.options());
}

// W + s B A through the expand kernel, reading W and writing a new [N, K] (one pass).
at::Tensor cpu_fold(const at::Tensor& weight, const at::Tensor& B, const at::Tensor& A,
                    const at::Tensor& scaling) {
  const at::Tensor w = unit_column_stride(weight);
  at::Tensor out = at::empty({w.size(0), w.size(1)}, w.options());
  if (A.size(0) == 0) return out.copy_(w);
  // The expand pass with W as its base: out = W + s B A (g = B, a = A, no dropout).
  cpu_expand_reduce_impl(out, /*write=*/true, w, B, A, scaling, at::Tensor(), at::Tensor(),
                         Dropout{0.0, at::Tensor()});
  return out;
}

// The CPU shrink beats MKL's GEMM for U at R = 16 (1.6 ms against 2.1 ms inside a
// training step, M = 4096, K = 1024, one thread, from perf samples), and its result
// does not depend on the thread count by construction.
// bias_after_gemm: with the folded weight (p = 0), at::mm then add_(b) measured 0.5-0.8
// ms less per training step than at::addmm (one thread, M = 4096, K = N = 1024,
// float32; ATen's addmm spends a pass broadcasting b into Y and MKL's beta = 1 kernel
// reads Y back).
const Steps kCpuSteps = [] {
  Steps s{&cpu_shrink, &cpu_expand_reduce, &cpu_dot, &cpu_fold,
          /*shrink_without_dropout=*/true, &cpu_expand_write_reduce, &cpu_grad_pass};
  s.bias_after_gemm = true;
  return s;
}();

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scaling,
    double dropout_p, const at::Tensor& seed) {
  return lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, kCpuSteps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scaling,
    double dropout_p, const at::Tensor& seed, const at::Tensor& u, const at::Tensor& keep_bits,
    bool need_grad_x, bool need_grad_lora, bool need_grad_scaling, bool need_grad_bias) {
  return lora_backward(grad_y, x, weight, lora_A, lora_B, scaling, dropout_p, seed, u,
                       keep_bits, need_grad_x, need_grad_lora, need_grad_scaling,
                       need_grad_bias, kCpuSteps);
}

at::Tensor cpu_keep_mask(const at::Tensor& seed, int64_t M, int64_t K, double dropout_p) {
  check_keep_mask_args(seed, M, K, dropout_p);
  at::Tensor keep = at::empty({M, K}, seed.options().dtype(at::kBool));
  if (M * K > 0) {
    cpu::keep_mask(reinterpret_cast<uint8_t*>(keep.data_ptr<bool>()), M, K,
                   cpu_mask(Dropout{dropout_p, seed}), at::get_num_threads());
  }
  return keep;
}

std::string cpu_isa(c10::string_view request) {
  return cpu::isa(std::string(request).c_str());
}

}  // namespace
}  // namespace lora

// FRAGMENT: the lora_kernels namespace is shared with the ops other backends define
// from Python; the cpp_* schemas below are declared here and only here.
TORCH_LIBRARY_FRAGMENT(lora_kernels, m) {
  m.def(
      "cpp_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor scaling, float dropout_p, Tensor seed) -> (Tensor y, Tensor u, Tensor keep_bits)");
  m.def(
      "cpp_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "Tensor scaling, float dropout_p, Tensor seed, Tensor u, Tensor keep_bits, "
      "bool need_grad_x, bool need_grad_lora, bool need_grad_scaling, bool need_grad_bias) "
      "-> (Tensor grad_x, "
      "Tensor grad_A, Tensor grad_B, Tensor grad_scaling, Tensor grad_bias)");
  // The keep mask [M, K] (bool) the kernels apply, for tests against the reference.
  m.def("cpp_keep_mask(Tensor seed, int M, int K, float dropout_p) -> Tensor");
  // The CPU instruction set in use ("avx512", "avx2", "baseline"); a name selects that
  // build where the CPU supports it, "auto" the automatic choice, "" only asks.
  m.def("cpp_cpu_isa(str request) -> str", &lora::cpu_isa);
}

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("cpp_forward", &lora::cpu_forward);
  m.impl("cpp_backward", &lora::cpu_backward);
  m.impl("cpp_keep_mask", &lora::cpu_keep_mask);
}

// Importable as the Python module lora_kernels._C (importing it registers the ops).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
