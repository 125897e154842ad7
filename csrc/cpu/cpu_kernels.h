// The CPU kernels of the LoRA op: plain launchers over pointers, sizes and strides (no
// torch includes). Implemented in cpu_kernels_impl.h (and the cpu_*.h headers it
// includes), compiled once per instruction set (cpu_kernels.cpp: baseline;
// cpu_kernels_avx2.cpp; cpu_kernels_avx512.cpp) and chosen at run time from what the
// CPU supports.
//
// Operand conventions (M tokens, K the reduced/expanded width, R rank):
// - x, out: storage dtype (float32, float64, bfloat16, float16), rows of unit stride,
//   row stride ld*.
// - packed operands: accumulation dtype (float32, or float64 for float64 storage),
//   zero-padded as described at each argument (the op builds them; they are small).
// - g, u, sums: accumulation dtype, row-major with the given row strides.
#pragma once

#include <stdint.h>

#include "common/dropout_mask.h"
#include "common/kernel_dtype.h"

namespace lora {
namespace cpu {

// Padding of the packed operands: K to a multiple of kPadK, R to a multiple of kPadR.
constexpr int64_t kPadK = 64;
constexpr int64_t kPadR = 16;

// One pass over [M, K]:
//   U[m, r] = sum_k D(X)[m, k] * a_t[k, r] for m < M, r < R
// With an active mask whose keep_bits_out is set, the mask is also written there
// packed (mask.keep_bits is not read: the shrink generates the mask).
struct ShrinkArgs {
  DType dtype;  // of x
  int64_t M, K, R;
  const void* x;
  int64_t ldx;
  const void* a_t;  // A^T [round_up(K, kPadK), round_up(R, kPadR)] contiguous, zero-padded
  void* u;          // accumulation dtype [M, ldu]
  int64_t ldu;
  DropoutMask mask;
  int num_threads;
};

// One pass over [M, K] that does either step or both, sharing the mask:
//   expand (out != nullptr): out[m, k] = in[m, k] + s * keep * scale * sum_{r<R} g[m, r] a[r, k]
//     with a [R, lda], lda >= round_up(K, kPadK), zero past column K; in = out (in
//     place) when in is null; ldi may be 0 (one row broadcast, e.g. the bias); with
//     overwrite, out = s * keep * scale * sum_r g[m, r] a[r, k] and in is not read
//   reduce (sums != nullptr): sums[r, k] = sum_m g2[m, r] * D(X)[m, k] for r < R2
// The reduction order over m is fixed by M alone, so the sums are identical for any
// number of threads. The mask is read from mask.keep_bits where set (the forward's
// packed mask), else generated; keep_bits_out is not written.
struct ExpandReduceArgs {
  DType dtype;  // of x and out
  int64_t M, K;
  // expand
  void* out;
  int64_t ldo;
  const void* in;  // nullptr: out itself
  int64_t ldi;
  const void* g;
  int64_t ldg;
  const void* a;
  int64_t lda;
  int64_t R;
  const void* s;  // accumulation dtype, one element
  bool overwrite;
  // reduce
  const void* x;
  int64_t ldx;
  const void* g2;
  int64_t ldg2;
  int64_t R2;
  void* sums;  // accumulation dtype [R2, ldsums]
  int64_t ldsums;
  DropoutMask mask;
  int num_threads;
};

// The backward's walk over the rows of X [M, K] and dY [M, N] (storage dtype, unit
// column stride). Per block of rows, in three passes over the block (X, dY, then X
// again from cache):
//   U = X a_t                                 (when u != nullptr; or U given as u_in,
//                                             then no pass over X for it)
//   G = dY b                                  (when g != nullptr)
//   dy_sums[r, n] = sum_m c[m, r] dY[m, n]    c = [U 1] (U only with u_sums, the column
//                                             of ones only with ones; R2 of them); the
//                                             U part shares the pass over dY with G
//   x_sums[r, k] = sum_m G[m, r] X[m, k]      (when x_sums != nullptr)
// U is bit-identical to the shrink's U = X a_t (same tiles, same order), and the sums do
// not depend on the number of threads (the order over m is fixed by M, as in
// expand_reduce).
struct GradPassArgs {
  DType dtype;  // of x and dy
  int64_t M, K, N, R;
  const void* x;
  int64_t ldx;
  const void* dy;
  int64_t lddy;
  const void* a_t;  // A^T [round_up(K, kPadK), round_up(R, kPadR)] contiguous, zero-padded
  const void* b;    // B [round_up(N, kPadK), round_up(R, kPadR)] contiguous, zero-padded
  void* u;         // accumulation dtype [M, R], or nullptr (U not returned)
  const void* u_in;  // accumulation dtype [M, ldu_in]: U saved by the forward (D(X) A^T
                     // with dropout), read instead of computed; or nullptr
  int64_t ldu_in;
  void* g;         // accumulation dtype [M, R], or nullptr (G not returned)
  bool u_sums;     // dy_sums holds U^T dY (dB's sums) in its first R rows
  bool ones;       // dy_sums holds 1^T dY (db) in its last row
  void* dy_sums;   // accumulation dtype [R2, N] contiguous, or nullptr
  void* x_sums;   // accumulation dtype [R, K] contiguous, or nullptr
  int num_threads;
};

// The 4-bit dequantize (bitsandbytes NF4 / FP4, cpu_dequant.h): the n elements of the
// flattened weight, out[i] = code[c_i] * scale[i / blocksize], c_{2j} the high nibble of
// packed[j]; scale = absmax, or with absmax_q (double quantization) scale[b] =
// absmax_code[absmax_q[b]] * absmax2[b / blocksize2] + offset.
struct Dequant4bitArgs {
  DType dtype;  // of out: float32, bfloat16 or float16
  int64_t n;
  const uint8_t* packed;       // [ceil(n / 2)]
  const float* code;           // [16]
  int64_t blocksize;           // even
  const float* absmax;         // [ceil(n / blocksize)], or nullptr with absmax_q
  const uint8_t* absmax_q;     // [ceil(n / blocksize)], or nullptr
  const float* absmax_code;    // [256] (with absmax_q)
  const float* absmax2;        // [ceil(blocks / blocksize2)] (with absmax_q)
  int64_t blocksize2;
  float offset;
  void* out;                   // [n] contiguous
  int num_threads;
};

void shrink(const ShrinkArgs& args);
void expand_reduce(const ExpandReduceArgs& args);
void grad_pass(const GradPassArgs& args);

// keep[m, k] (1 or 0) for a [M, K] row-major uint8 buffer: the mask the kernels apply.
void keep_mask(uint8_t* keep, int64_t M, int64_t K, const DropoutMask& mask, int num_threads);

void dequant_4bit(const Dequant4bitArgs& args);

// sum_i a[i] * b[i] of two float32 or float64 arrays (`dtype`), summed in float64 in
// a fixed order, single-threaded.
double dot(DType dtype, const void* a, const void* b, int64_t n);

// The instruction set used: "avx512", "avx2" or "baseline". `request` "" keeps the
// automatic choice; a name selects that variant if the CPU supports it (for tests).
// Returns the variant in use after the call.
const char* isa(const char* request);
const char* best_isa();

// Per-instruction-set entry points (cpu_kernels_impl.h).
struct Kernels {
  const char* name;
  void (*shrink)(const ShrinkArgs&);
  void (*expand_reduce)(const ExpandReduceArgs&);
  void (*grad_pass)(const GradPassArgs&);
  void (*keep_mask)(uint8_t*, int64_t, int64_t, const DropoutMask&, int);
  void (*dequant_4bit)(const Dequant4bitArgs&);
};
const Kernels* kernels_baseline();
const Kernels* kernels_avx2();    // nullptr where not compiled
const Kernels* kernels_avx512();  // nullptr where not compiled

}  // namespace cpu
}  // namespace lora
