// The CPU kernels' shared ground, compiled once per instruction set (see
// cpu_kernels_impl.h): the vector type of the target, loads and stores, scratch
// buffers, and the blocking every pass uses.
//
// Loops are written for the auto-vectorizer: GCC vector types one native register wide
// (64 bytes with AVX-512, 32 with AVX2, 16 otherwise) in register-tiled multiply-add
// micro-kernels, plain element loops for loads, conversions and stores.
//
// Everything lives in an anonymous namespace inside lora::cpu::LORA_CPU_NS (internal
// linkage), so the AVX-512 build of a function can never be merged by the linker into
// the baseline path.
#pragma once

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
// LORA_CPU_AVX2 / LORA_CPU_AVX512: set by the including file for its target (GCC's
// target pragma does not define the __AVX2__ family of macros).
#if defined(LORA_CPU_AVX2) || defined(LORA_CPU_AVX512)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

#include "common/element_math.h"
#include "cpu/cpu_kernels.h"

#ifndef LORA_CPU_NS
#error "define LORA_CPU_NS (the instruction-set namespace) before including the CPU kernels"
#endif

#define LORA_ALWAYS_INLINE inline __attribute__((always_inline))

namespace lora {
namespace cpu {
namespace LORA_CPU_NS {
namespace {

// Columns per block: a multiple of kPadK (so of every tile width), of 4 and of 8 (a
// block's packed mask starts on a byte).
constexpr int64_t kChunk = 256;

// One native vector register: 64 bytes with AVX-512, 32 with AVX2, 16 otherwise.
#if defined(LORA_CPU_AVX512)
constexpr int kVecBytes = 64;
#elif defined(LORA_CPU_AVX2)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <class acc>
struct Vec {
  typedef acc type __attribute__((vector_size(kVecBytes)));
  static constexpr int n = kVecBytes / static_cast<int>(sizeof(acc));
};

template <class V, class acc>
LORA_ALWAYS_INLINE V vload(const acc* p) {
  V v;
  memcpy(&v, p, sizeof v);
  return v;
}

template <class V, class acc>
LORA_ALWAYS_INLINE void vstore(acc* p, V v) {
  memcpy(p, &v, sizeof v);
}

// vstore() with a non-temporal (streaming) store where the instruction set has one: for
// a large output written once and not read back soon, it skips the read for ownership of
// each line (on a one-thread DRAM-bound pass that read costs as much as the write). p
// must be aligned to the vector size. Callers issue store_fence() before the output is
// read by another thread.
template <class V, class acc>
LORA_ALWAYS_INLINE void vstore_stream(acc* p, V v) {
#if defined(LORA_CPU_AVX512)
  __m512i r;  // the bits of v, float or double alike
  memcpy(&r, &v, sizeof r);
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), r);
#elif defined(LORA_CPU_AVX2)
  __m256i r;
  memcpy(&r, &v, sizeof r);
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), r);
#else
  vstore(p, v);
#endif
}

LORA_ALWAYS_INLINE void store_fence() {
#if defined(LORA_CPU_AVX2) || defined(LORA_CPU_AVX512)
  _mm_sfence();
#endif
}

template <class A, class B>
struct Same {
  static constexpr bool value = false;
};
template <class A>
struct Same<A, A> {
  static constexpr bool value = true;
};

// A per-thread scratch buffer (malloc/free: no library templates in this file).
template <class E>
struct Buffer {
  E* p;
  explicit Buffer(int64_t n) : p(static_cast<E*>(malloc(sizeof(E) * (n > 0 ? n : 1)))) {}
  ~Buffer() { free(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

template <class E>
void fill(E* p, int64_t n, E v) {
  for (int64_t e = 0; e < n; ++e) p[e] = v;
}

inline int num_threads_for(int requested) { return requested > 0 ? requested : 1; }

// ---- Blocking ------------------------------------------------------------------------
// The kernels walk [M, K] in blocks of kBlockRows rows x kChunk columns: the block's
// scratch (keep factors, D(X) rows) stays in L1 and every step of the pass (expand,
// reduce, shrink) reads it from there. Each block row is read left to right, so the
// hardware prefetcher sees kBlockRows sequential streams.
constexpr int64_t kBlockRows = 16;

// Outputs of at least this many bytes are written with streaming stores.
constexpr int64_t kStreamBytes = int64_t{4} << 20;

// Row chunks of a reduction: a function of M alone, never of the thread count, so the
// order of the sums over m (within a block, then block by block, then chunk by chunk)
// is the same for any number of threads.
inline int64_t reduce_rows_per_chunk(int64_t M) {
  const int64_t nchunks = max64(1, min64(16, M / 256));
  return round_up(ceil_div(M, nchunks), kBlockRows);
}

}  // namespace
}  // namespace LORA_CPU_NS
}  // namespace cpu
}  // namespace lora
