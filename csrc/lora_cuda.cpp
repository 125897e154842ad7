// The CUDA implementation of the lora_kernels::cpp_* ops: the orchestration of
// lora_ops.cpp with the CUDA kernels of lora_cuda.cu as its custom steps. Compiled
// only where torch is a CUDA build and nvcc is present. Nothing here reads a device
// scalar on the host: the seed and the scaling go to the kernels as pointers, and
// the ATen GEMMs get s through small [M, R] / [R, K] tensor ops.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "lora_cuda.h"
#include "lora_math.h"
#include "lora_ops.h"

namespace lora {
namespace {

cuda::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kDouble:
      return cuda::DType::kFloat64;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    case at::kHalf:
      return cuda::DType::kFloat16;
    default:
      TORCH_CHECK(false, "lora_kernels: unsupported dtype ", c10::toString(t));
  }
}

cuda::DeviceMask device_mask(const Dropout& d) {
  cuda::DeviceMask mask{false, nullptr, 0u, 1.0f};
  if (d.active()) {
    const DropoutParams params = make_dropout_params(d.p);
    mask.active = params.active;
    mask.seed = d.seed.data_ptr<int64_t>();
    mask.threshold = params.threshold;
    mask.scale = params.scale;
  }
  return mask;
}

at::Tensor cuda_shrink(const at::Tensor& x, const at::Tensor& a, const Dropout& d) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), R = a.size(0);
  TORCH_CHECK(R <= cuda::kMaxRank, "lora_kernels: the CUDA backend takes ranks up to ",
              cuda::kMaxRank, ", got R = ", R);
  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor u = at::empty({M, R}, x.options().dtype(acc));
  const at::Tensor a_acc = a.to(acc).contiguous();
  // The shrink generates the mask and, for the forward's keep_bits, packs it.
  cuda::DeviceMask mask = device_mask(d);
  if (mask.active && d.keep_bits.defined()) {
    mask.bits_out = d.keep_bits.data_ptr<uint8_t>();
    mask.ldbits = d.keep_bits.stride(0);
  }
  C10_CUDA_CHECK(cuda::launch_shrink(cuda_dtype(x.scalar_type()), M, K, R, x.data_ptr(),
                                     x.stride(0), a_acc.data_ptr(), u.data_ptr(), mask,
                                     at::cuda::getCurrentCUDAStream()));
  return u;
}

at::Tensor cuda_expand_reduce(const at::Tensor& out, const at::Tensor& g, const at::Tensor& a,
                              const at::Tensor& scaling, const at::Tensor& x,
                              const at::Tensor& g2, const Dropout& d) {
  const at::Tensor& ref = out.defined() ? out : x;
  const c10::cuda::CUDAGuard guard(ref.device());
  const int64_t M = ref.size(0), K = ref.size(1);
  const auto dtype = cuda_dtype(ref.scalar_type());
  const auto acc = acc_dtype(ref.scalar_type());
  const auto opts = ref.options().dtype(acc);
  cuda::DeviceMask mask = device_mask(d);
  if (mask.active && d.keep_bits.defined()) {
    // The forward's packed mask: read, not generated again.
    mask.bits = d.keep_bits.data_ptr<uint8_t>();
    mask.ldbits = d.keep_bits.stride(0);
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (out.defined() && g.size(1) > 0) {
    const int64_t R = g.size(1);
    const at::Tensor g_acc = g.to(acc).contiguous();
    const at::Tensor a_acc = a.to(acc).contiguous();
    const at::Tensor s_acc = scaling.to(acc).contiguous();
    C10_CUDA_CHECK(cuda::launch_expand(dtype, M, K, R, out.data_ptr(), out.stride(0),
                                       g_acc.data_ptr(), a_acc.data_ptr(), s_acc.data_ptr(), mask,
                                       stream));
  }
  at::Tensor sums;
  if (x.defined()) {
    TORCH_CHECK(M <= cuda::kMaxRows, "lora_kernels: the CUDA backend takes up to ",
                cuda::kMaxRows, " rows (tokens), got M = ", M);
    const int64_t R2 = g2.size(1);
    const at::Tensor g2_acc = g2.to(acc).contiguous();
    sums = at::empty({R2, K}, opts);
    const int64_t ws_elements = cuda::reduce_workspace_elements(M, K, R2);
    const at::Tensor workspace = at::empty({ws_elements > 0 ? ws_elements : 1}, opts);
    C10_CUDA_CHECK(cuda::launch_reduce(dtype, M, K, R2, x.data_ptr(), x.stride(0),
                                       g2_acc.data_ptr(), sums.data_ptr(), workspace.data_ptr(),
                                       mask, stream));
  }
  return sums;
}

at::Tensor cuda_dot(const at::Tensor& a, const at::Tensor& b) { return (a * b).sum(); }

// W + s B A with cuBLAS (s on the small operand: no host read).
at::Tensor cuda_fold(const at::Tensor& weight, const at::Tensor& B, const at::Tensor& A,
                     const at::Tensor& scaling) {
  const auto t = weight.scalar_type();
  return at::addmm(weight, B.to(t) * scaling.to(t), A.to(t));
}

const Steps kCudaSteps{&cuda_shrink, &cuda_expand_reduce, &cuda_dot, &cuda_fold};

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scaling,
    double dropout_p, const at::Tensor& seed) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, kCudaSteps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scaling,
    double dropout_p, const at::Tensor& seed, const at::Tensor& u, const at::Tensor& keep_bits,
    bool need_grad_x, bool need_grad_lora, bool need_grad_scaling, bool need_grad_bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lora_backward(grad_y, x, weight, lora_A, lora_B, scaling, dropout_p, seed, u,
                       keep_bits, need_grad_x, need_grad_lora, need_grad_scaling,
                       need_grad_bias, kCudaSteps);
}

at::Tensor cuda_keep_mask(const at::Tensor& seed, int64_t M, int64_t K, double dropout_p) {
  check_keep_mask_args(seed, M, K, dropout_p);
  const c10::cuda::CUDAGuard guard(seed.device());
  at::Tensor keep = at::empty({M, K}, seed.options().dtype(at::kBool));
  C10_CUDA_CHECK(cuda::launch_keep_mask(reinterpret_cast<uint8_t*>(keep.data_ptr<bool>()), M, K,
                                        device_mask(Dropout{dropout_p, seed}),
                                        at::cuda::getCurrentCUDAStream()));
  return keep;
}

}  // namespace
}  // namespace lora

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("cpp_forward", &lora::cuda_forward);
  m.impl("cpp_backward", &lora::cuda_backward);
  m.impl("cpp_keep_mask", &lora::cuda_keep_mask);
}
