// The dropout keep mask as every kernel receives it, CPU and CUDA alike: the rule's
// parameters (philox.h), where the seed is, and the packed form of the mask. Plain
// C++ (no torch includes), passed by value to CUDA kernels.
//
// The packed mask (docs/backends.md, keep_bits) holds one bit per element: bit k % 8
// of byte [m, k / 8], rows ldbits bytes apart. The forward's shrink writes it to
// keep_bits_out as it generates the mask; the backward's kernels read it from
// keep_bits instead of running Philox again.
#pragma once

#include <stdint.h>

namespace lora {

struct DropoutMask {
  // threshold > 0: some element may be dropped. When false no kernel generates or
  // reads a mask (every factor is 1), even for p > 0 below 2^-32.
  bool active = false;
  uint32_t threshold = 0;  // floor(p * 2^32): keep when word >= threshold
  float scale = 1.0f;      // float32(1 / (1 - p)), the division done in double
  // The 63-bit seed: its value for the CPU kernels; for the CUDA kernels a device
  // pointer to it (the 0-dim seed tensor), loaded on the device so that the host never
  // waits for the GPU.
  uint64_t seed = 0;
  const int64_t* device_seed = nullptr;
  const uint8_t* keep_bits = nullptr;  // read instead of generating, where not null
  uint8_t* keep_bits_out = nullptr;    // written while generating, where not null
  int64_t ldbits = 0;
};

// The rule's parameters for 0 <= p < 1 (the caller checks the range); the seed and the
// packed mask are the caller's to fill in.
static inline DropoutMask make_dropout_mask(double p) {
  DropoutMask mask;
  // p * 2^32 is exact in double, so the conversion floors exactly; p < 1 keeps it
  // below 2^32.
  mask.threshold = static_cast<uint32_t>(p * 4294967296.0);
  mask.scale = static_cast<float>(1.0 / (1.0 - p));
  mask.active = mask.threshold != 0;
  return mask;
}

}  // namespace lora
