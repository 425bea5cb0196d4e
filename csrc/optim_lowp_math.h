#pragma once
// Internal: the element-level pieces of the one-pass low-precision optimizer kernels that the CPU
// kernels (optim_lowp_kernels.cpp), the CUDA kernels (optim_lowp_cuda.cu) and the launch code share,
// so that a bfloat16 rounding or a random bit of stochastic rounding is the same on every device.
// No ATen, c10 or CUDA header: nvcc compiles it as it is.

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define AMPKIT_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define AMPKIT_HD inline __attribute__((always_inline))
#else
#define AMPKIT_HD inline
#endif

namespace ampkit::optim::detail {

/// The element types of the one-pass kernels.
enum class LowpDtype : std::uint8_t { bf16, fp16, fp32 };

AMPKIT_HD std::uint32_t float_bits(float f) {
  std::uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}
AMPKIT_HD float bits_float(std::uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

/// bfloat16 bits -> float32 (exact).
AMPKIT_HD float bf16_to_float(std::uint16_t bits) { return bits_float(static_cast<std::uint32_t>(bits) << 16); }

/// float32 -> bfloat16 bits rounded to nearest even, as c10::BFloat16 rounds (a NaN becomes the quiet
/// NaN 0x7fc0). Branchless, so that a CPU loop over a block vectorizes.
AMPKIT_HD std::uint16_t bf16_bits_nearest(float f) {
  const std::uint32_t bits = float_bits(f);
  const auto rounded = static_cast<std::uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  return (bits & 0x7fffffffu) > 0x7f800000u ? static_cast<std::uint16_t>(0x7fc0) : rounded;
}

/// float32 -> bfloat16 bits rounded stochastically: the 16 bits below the bfloat16 are added to 16
/// random ones, which carries into the kept bits with probability equal to the dropped fraction, so
/// the expected value is the float32 one. A NaN becomes the quiet NaN 0x7fc0.
AMPKIT_HD std::uint16_t bf16_bits_stochastic(float f, std::uint32_t random) {
  const std::uint32_t bits = float_bits(f);
  const auto rounded = static_cast<std::uint16_t>((bits + (random & 0xffffu)) >> 16);
  return (bits & 0x7fffffffu) > 0x7f800000u ? static_cast<std::uint16_t>(0x7fc0) : rounded;
}

/// lowbias32 (Chris Wellons' integer hash), branchless.
AMPKIT_HD std::uint32_t mix32(std::uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

/// The random bits of stochastic rounding for element \p index of a tensor whose stream is \p key: a
/// counter-based hash, so the result depends on neither the thread split, the instruction set nor
/// the device, and a seed reproduces it.
AMPKIT_HD std::uint32_t rounding_bits(std::uint32_t index, std::uint32_t key) {
  return mix32(index * 0x9e3779b1u + key);
}

AMPKIT_HD std::uint64_t splitmix64(std::uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/// The key of the random bits of stochastic rounding of one tensor at one step: splitmix64 over
/// the three, so that neighbouring seeds, steps and tensors draw unrelated bits.
AMPKIT_HD std::uint32_t rounding_key(std::uint64_t seed, std::uint64_t step, std::uint64_t tensor_index) {
  return static_cast<std::uint32_t>(splitmix64(splitmix64(splitmix64(seed) ^ step) ^ tensor_index));
}

/// The tensor's identity in its stream of random bits: its group and its index in the lists.
AMPKIT_HD std::uint64_t rounding_tensor_index(std::uint64_t group_index, std::uint64_t index) {
  return (group_index << 32) | index;
}

}  // namespace ampkit::optim::detail
