// The lora_kernels::cpp_* ops: their schemas, declared here and only here, and the
// module init that makes the extension importable as lora_kernels._C. Each device's
// implementation is its own file, ending in its registration:
//   cpu/lora_cpu.cpp    TORCH_LIBRARY_IMPL(lora_kernels, CPU, m)
//   cuda/lora_cuda.cpp  TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m)   (CUDA builds only)
// Both check their arguments with common/op_common.h and generate the dropout mask by
// the one rule of common/philox.h.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/cpu_kernels.h"

namespace lora {
namespace {

// The CPU kernel build in use (cpu_kernels.h, isa()).
std::string cpu_isa(c10::string_view request) { return cpu::isa(std::string(request).c_str()); }

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
  // The dense weight of a bitsandbytes 4-bit weight into out (lora_kernels/quant4bit.py);
  // absmax_code, absmax2 and offset only with double quantization.
  m.def(
      "cpp_dequantize_4bit(Tensor packed, Tensor absmax, Tensor code, Tensor? absmax_code, "
      "Tensor? absmax2, Tensor? offset, int blocksize, int blocksize2, Tensor(a!) out) -> ()");
  // The CPU instruction set in use ("avx512", "avx2", "baseline"); a name selects that
  // build where the CPU supports it, "auto" the automatic choice, "" only asks.
  m.def("cpp_cpu_isa(str request) -> str", &lora::cpu_isa);
}

// Importable as the Python module lora_kernels._C (importing it registers the ops).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
