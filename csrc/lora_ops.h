// The torch-facing side of the LoRA op, shared by the CPU (lora_ops.cpp) and CUDA
// (lora_cuda.cpp) registrations: argument checks and the forward/backward
// orchestration, written once over ATen GEMMs plus three device-specific steps.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace lora {

// Dropout as the ops receive it: p (0 <= p < 1) and the 0-dim int64 seed tensor on the
// input's device (read on the host only by the CPU steps), and the mask packed one bit
// per element, uint8 [M, ceil(K / 8)] (docs/backends.md, keep_bits): in forward the
// shrink step fills it when defined; in backward the steps may read it instead of
// generating the mask again (undefined: generate it from the seed).
struct Dropout {
  double p;
  at::Tensor seed;
  at::Tensor keep_bits = at::Tensor();
  bool active() const { return p > 0.0; }
};

// The custom kernels of one device. `a` operands are [R, K] in any float dtype and any
// strides (the steps pack them, they are small); x, out are [M, K] with unit column
// stride; the result dtypes are the accumulation dtype of x (float32, or float64).
struct Steps {
  // U [M, R] = D(x) a^T, D with the mask of `d` (none when d.p == 0).
  at::Tensor (*shrink)(const at::Tensor& x, const at::Tensor& a, const Dropout& d);
  // One pass over [M, K]:
  //   if out is defined:  out += scaling * D(g a)         (g [M, R], in place)
  //   if x is defined:    returns sums [R2, K] = g2^T D(x)  (g2 [M, R2]); else undefined
  at::Tensor (*expand_reduce)(const at::Tensor& out, const at::Tensor& g, const at::Tensor& a,
                              const at::Tensor& scaling, const at::Tensor& x,
                              const at::Tensor& g2, const Dropout& d);
  // sum(a * b) of two [M, R] accumulation-dtype tensors, 0-dim, deterministic.
  at::Tensor (*dot)(const at::Tensor& a, const at::Tensor& b);
  // W + s B A [N, K] in W's dtype (float32/float64): the LoRA update folded into W.
  at::Tensor (*fold)(const at::Tensor& weight, const at::Tensor& B, const at::Tensor& A,
                     const at::Tensor& scaling);
  // U = x A^T without dropout through the shrink step rather than a BLAS GEMM (where the
  // step is the faster of the two for a rank-R product).
  bool shrink_without_dropout = false;
  // Optional fused forms; nullptr: the orchestration composes the steps above instead.
  // One pass over out [M, K] that writes it without reading it:
  //   out = row + scaling * D(g a)   (row [K] broadcast over the rows, or undefined: 0)
  // and, when x and g2 are defined, returns sums = g2^T D(x) (else undefined). A GEMM
  // then accumulates onto out (beta = 1), so the LoRA term (and the bias) cost no
  // read-modify-write pass of their own.
  at::Tensor (*expand_write_reduce)(const at::Tensor& out, const at::Tensor& row,
                                    const at::Tensor& g, const at::Tensor& a,
                                    const at::Tensor& scaling, const at::Tensor& x,
                                    const at::Tensor& g2, const Dropout& d) = nullptr;
  // Without dropout the forward does not save U when this is set (it returns u empty,
  // [0, R]); backward recomputes it in its one pass over the rows of x and dy:
  //   {U = x A^T (if want_u), G = dy B (if want_g), dy_sums = c^T dy with c = [U 1]
  //    (U if u_sums, the ones if ones), x_sums = G^T x (if x_sums)}
  // U needs no pass over x of its own: the pass that gives dA reads x anyway. With
  // u_given defined (U saved by the forward, with dropout) U is read, not computed, and
  // without x_sums x is not read: the pass over dy alone gives G and the dy sums, one
  // load of dy feeding both.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*grad_pass)(
      const at::Tensor& x, const at::Tensor& dy, const at::Tensor& A, const at::Tensor& B,
      const at::Tensor& u_given, bool want_u, bool want_g, bool u_sums, bool ones,
      bool x_sums) = nullptr;
  // For float32/float64 x (Y in the accumulation dtype, so adding b after the GEMM
  // rounds no more than addmm does): Y = X W^T + b as a GEMM without b (beta = 0), then
  // one pass adding b, rather than ATen's addmm, which broadcasts b into Y and runs the
  // GEMM with beta = 1 (so BLAS reads Y back inside its kernel). Set where it measures
  // faster (the CPU); cuBLAS adds b in its epilogue.
  bool bias_after_gemm = false;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_forward(const at::Tensor& x,
                                                            const at::Tensor& weight,
                                                const c10::optional<at::Tensor>& bias,
                                                const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                const at::Tensor& scaling, double dropout_p,
                                                const at::Tensor& seed, const Steps& steps);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scaling,
    double dropout_p, const at::Tensor& seed, const at::Tensor& u, const at::Tensor& keep_bits,
    bool need_grad_x, bool need_grad_lora, bool need_grad_scaling, bool need_grad_bias,
    const Steps& steps);

// Checks for the keep-mask op (seed 0-dim int64, M, K >= 0, 0 <= p < 1).
void check_keep_mask_args(const at::Tensor& seed, int64_t M, int64_t K, double dropout_p);

// The accumulation dtype of storage dtype `t`: float64 for float64, else float32.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace lora
