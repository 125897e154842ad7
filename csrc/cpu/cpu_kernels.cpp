// CPU kernels: the baseline build (the compiler's default target) and the run-time
// choice between the baseline, AVX2 and AVX-512 builds of cpu_kernels_impl.h.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>

#define LORA_CPU_NS baseline
#include "cpu/cpu_kernels_impl.h"
#undef LORA_CPU_NS

namespace lora {
namespace cpu {

const Kernels* kernels_baseline() { return &baseline::kTable; }

namespace {

bool cpu_has(const char* name) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (strcmp(name, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (strcmp(name, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return strcmp(name, "baseline") == 0;
}

const Kernels* by_name(const char* name) {
  if (strcmp(name, "avx512") == 0) return cpu_has("avx512") ? kernels_avx512() : nullptr;
  if (strcmp(name, "avx2") == 0) return cpu_has("avx2") ? kernels_avx2() : nullptr;
  if (strcmp(name, "baseline") == 0) return kernels_baseline();
  return nullptr;
}

const Kernels* automatic() {
  static const Kernels* chosen = [] {
    const char* order[] = {"avx512", "avx2", "baseline"};
    for (const char* name : order)
      if (const Kernels* k = by_name(name)) return k;
    return kernels_baseline();
  }();
  return chosen;
}

std::atomic<const Kernels*> g_override{nullptr};

const Kernels* active() {
  const Kernels* k = g_override.load(std::memory_order_relaxed);
  return k != nullptr ? k : automatic();
}

}  // namespace

const char* best_isa() { return automatic()->name; }

const char* isa(const char* request) {
  if (request != nullptr && request[0] != '\0') {
    if (strcmp(request, "auto") == 0) {
      g_override.store(nullptr);
    } else if (const Kernels* k = by_name(request)) {
      g_override.store(k);
    }
  }
  return active()->name;
}

void shrink(const ShrinkArgs& args) { active()->shrink(args); }
void expand_reduce(const ExpandReduceArgs& args) { active()->expand_reduce(args); }
void grad_pass(const GradPassArgs& args) { active()->grad_pass(args); }
void keep_mask(uint8_t* keep, int64_t M, int64_t K, const DropoutMask& mask, int num_threads) {
  active()->keep_mask(keep, M, K, mask, num_threads);
}

void dequant_4bit(const Dequant4bitArgs& args) { active()->dequant_4bit(args); }

double dot(DType dtype, const void* a, const void* b, int64_t n) {
  if (dtype == DType::kFloat64) {
    const double* x = static_cast<const double*>(a);
    const double* y = static_cast<const double*>(b);
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
    return s;
  }
  // float32 products summed in float64: M * R terms in one fixed order.
  const float* x = static_cast<const float*>(a);
  const float* y = static_cast<const float*>(b);
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(x[i]) * y[i];
  return s;
}

}  // namespace cpu
}  // namespace lora
