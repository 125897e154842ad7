// The shared torch-side pieces of the lora_kernels::cpp_* ops (op_common.h).
#include "common/op_common.h"

#include <c10/util/Exception.h>

#include <utility>
#include <vector>

#include "common/dropout_mask.h"
#include "common/element_math.h"

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

}  // namespace

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

DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK(false, "lora_kernels: unsupported dtype ", dtype_name(t));
  }
}

void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x, int64_t N) {
  if (!bias.has_value()) return;
  const auto t = x.scalar_type();
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "lora_kernels: bias must be [N] = [", N,
              "], got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == t, "lora_kernels: bias must have x's dtype ",
              dtype_name(t), ", got ", dtype_name(bias->scalar_type()));
  TORCH_CHECK(bias->device() == x.device(), "lora_kernels: bias must be on ", x.device(),
              " (the device of x), got ", bias->device());
}

SavedForBackward check_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                     const at::Tensor& weight, const at::Tensor& lora_A,
                                     double dropout_p, const at::Tensor& u,
                                     const at::Tensor& keep_bits, bool u_may_be_empty) {
  const auto t = x.scalar_type();
  const auto acc = acc_dtype(t);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_A.size(0);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == M && grad_y.size(1) == N,
              "lora_kernels: grad_y must be [M, N] = [", M, ", ", N, "], got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == t, "lora_kernels: grad_y must have x's dtype ",
              dtype_name(t), ", got ", dtype_name(grad_y.scalar_type()));
  // u without rows ([0, R], the forward's output without dropout on the CPU): U is
  // recomputed. (With M = 0 either reading gives the same empty results.)
  const bool u_saved = !(M > 0 && u.dim() == 2 && u.size(0) == 0 && u.size(1) == R);
  if (u_saved) {
    TORCH_CHECK(u.dim() == 2 && u.size(0) == M && u.size(1) == R,
                "lora_kernels: u must be [M, R] = [", M, ", ", R, "] or, without dropout on ",
                "the CPU, [0, R] (the forward's second output), got ", u.sizes());
  } else {
    TORCH_CHECK(dropout_p == 0.0 && u_may_be_empty,
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
  const bool mask_saved = dropout_p > 0.0 && keep_bits.numel() > 0;
  if (mask_saved) {
    TORCH_CHECK(keep_bits.dim() == 2 && keep_bits.size(0) == M &&
                    keep_bits.size(1) == ceil_div(K, 8) && keep_bits.is_contiguous(),
                "lora_kernels: keep_bits must be a contiguous [M, ceil(K / 8)] = [", M, ", ",
                ceil_div(K, 8), "] (the forward's third output), got ", keep_bits.sizes());
  }
  return {u_saved, mask_saved};
}

void check_keep_mask_args(const at::Tensor& seed, int64_t M, int64_t K, double dropout_p) {
  TORCH_CHECK(M >= 0 && K >= 0, "lora_kernels: M and K must be >= 0, got M = ", M, ", K = ", K);
  check_dropout_p(dropout_p);
  check_seed(seed, seed.device());
}

void check_dequantize_4bit_args(const at::Tensor& packed, const at::Tensor& absmax,
                                const at::Tensor& code,
                                const c10::optional<at::Tensor>& absmax_code,
                                const c10::optional<at::Tensor>& absmax2,
                                const c10::optional<at::Tensor>& offset, int64_t blocksize,
                                int64_t blocksize2, const at::Tensor& out) {
  const int64_t n = out.numel();
  const bool nested = absmax2.has_value();
  TORCH_CHECK(out.is_contiguous() && (out.scalar_type() == at::kFloat ||
                                      out.scalar_type() == at::kBFloat16 ||
                                      out.scalar_type() == at::kHalf),
              "cpp_dequantize_4bit: out must be contiguous float32, bfloat16 or float16, got ",
              out.scalar_type());
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 1 && packed.is_contiguous() &&
                  2 * packed.numel() >= n,
              "cpp_dequantize_4bit: packed must be 1-D contiguous uint8 with at least ",
              (n + 1) / 2, " bytes, got ", packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(blocksize >= 2 && blocksize % 2 == 0 && absmax.is_contiguous() &&
                  absmax.numel() == (n + blocksize - 1) / blocksize &&
                  absmax.scalar_type() == (nested ? at::kByte : at::kFloat),
              "cpp_dequantize_4bit: absmax must be one contiguous ",
              nested ? "uint8 code" : "float32", " per block of an even blocksize, got ",
              absmax.numel(), " ", absmax.scalar_type(), " for ", n, " elements, blocksize ",
              blocksize);
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16 && code.is_contiguous(),
              "cpp_dequantize_4bit: code must be 16 contiguous float32, got ", code.sizes());
  std::vector<std::pair<const char*, const at::Tensor*>> operands = {
      {"packed", &packed}, {"absmax", &absmax}, {"code", &code}};
  if (nested) {
    const int64_t blocks = absmax.numel();
    TORCH_CHECK(absmax_code.has_value() && offset.has_value() && blocksize2 >= 1,
                "cpp_dequantize_4bit: double quantization needs absmax_code, absmax2, offset "
                "and blocksize2 >= 1");
    TORCH_CHECK(absmax_code->scalar_type() == at::kFloat && absmax_code->numel() == 256 &&
                    absmax_code->is_contiguous() && absmax2->scalar_type() == at::kFloat &&
                    absmax2->is_contiguous() &&
                    absmax2->numel() == (blocks + blocksize2 - 1) / blocksize2 &&
                    offset->scalar_type() == at::kFloat && offset->numel() == 1,
                "cpp_dequantize_4bit: absmax_code must be 256 float32, absmax2 one float32 per ",
                blocksize2, " blocks and offset one float32");
    operands.push_back({"absmax_code", &*absmax_code});
    operands.push_back({"absmax2", &*absmax2});
    operands.push_back({"offset", &*offset});
  }
  for (const auto& [name, t] : operands) {
    TORCH_CHECK(t->device() == out.device(), "cpp_dequantize_4bit: ", name,
                " must be on out's device ", out.device(), ", got ", t->device());
  }
}

at::Tensor forward_keep_bits(const at::Tensor& x, double dropout_p) {
  const int64_t M = x.size(0), K = x.size(1);
  const at::Tensor keep_bits =
      dropout_p > 0.0 ? at::empty({M, ceil_div(K, 8)}, x.options().dtype(at::kByte))
                      : at::empty({0}, x.options().dtype(at::kByte));
  if (dropout_p > 0.0 && !make_dropout_mask(dropout_p).active) {
    // p below 2^-32: the threshold floors to 0 and every element is kept, so no kernel
    // generates a mask; the packed mask is all ones (padding bits 0).
    keep_bits.fill_(0xFF);
    if (K % 8 != 0) keep_bits.select(1, K / 8).fill_((1 << (K % 8)) - 1);
  }
  return keep_bits;
}

at::Tensor unit_column_stride(const at::Tensor& t) {
  return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous();
}

void addmm_scaled_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                   const at::Tensor& scaling) {
  if (a.numel() <= b.numel()) {
    out.addmm_(a * scaling.to(a.scalar_type()), b);
  } else {
    out.addmm_(a, b * scaling.to(b.scalar_type()));
  }
}

at::Tensor empty_grad(const at::Tensor& like, at::ScalarType dtype) {
  return at::empty({0}, like.options().dtype(dtype));
}

}  // namespace lora
