// The one-pass CPU kernel of fp16/bf16 SGD with momentum (optim.cpp's sgd_lowp_cpu_): float32
// arithmetic in the order of torch's fused SGD, rounded to the parameter dtype on store.
//
// Speed comes from three things. The pass works on blocks of kBlock elements held in float32 on the
// stack, one loop per arithmetic step, so no loop has a branch and each vectorizes. The body is
// compiled once per instruction set (AVX-512, AVX2, baseline) and the one the CPU supports is
// chosen at run time, as ATen compiles its kernels per CPU capability. float16 goes through the
// F16C conversion instructions where the CPU has them (ATen's vectorized Half does the same).
//
// Built with -ffp-contract=off (CMakeLists.txt): no fused multiply-adds, so each product and sum is
// rounded to float32 as torch's kernel rounds it, whichever instruction set runs.
#include "optim_detail.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AMPKIT_X86_DISPATCH 1
#include <immintrin.h>
#define AMPKIT_INLINE inline __attribute__((always_inline))
#else
#define AMPKIT_INLINE inline
#endif

namespace ampkit::optim::detail {
namespace {

constexpr int64_t kBlock = 256;

// bfloat16 <-> float32: c10::BFloat16's round to nearest even (NaN stays a quiet NaN), written
// branchless so that the loops over a block vectorize.
AMPKIT_INLINE float load(const c10::BFloat16& v) {
  const std::uint32_t bits = static_cast<std::uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
AMPKIT_INLINE void store(c10::BFloat16& v, float f) {
  std::uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const auto rounded = static_cast<std::uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  v.x = std::isnan(f) ? static_cast<std::uint16_t>(0x7fc0) : rounded;
}
// float16 <-> float32 without F16C: c10::Half's own conversions (IEEE round to nearest even).
AMPKIT_INLINE float load(const c10::Half& v) { return static_cast<float>(v); }
AMPKIT_INLINE void store(c10::Half& v, float f) { v = c10::Half(f); }

#if defined(AMPKIT_X86_DISPATCH)
// float16 <-> float32 over a block with F16C, 8 lanes at a time; the tail goes through a padded
// copy so that every element is converted by the same instruction.
__attribute__((target("avx,f16c"))) void half_to_float_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  if (i < n) {
    alignas(16) std::uint16_t h[8] = {};
    alignas(32) float f[8];
    std::memcpy(h, src + i, (n - i) * sizeof(std::uint16_t));
    _mm256_store_ps(f, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(h))));
    std::memcpy(dst + i, f, (n - i) * sizeof(float));
  }
}
__attribute__((target("avx,f16c"))) void float_to_half_f16c(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  if (i < n) {
    alignas(32) float f[8] = {};
    alignas(16) std::uint16_t h[8];
    std::memcpy(f, src + i, (n - i) * sizeof(float));
    _mm_store_si128(reinterpret_cast<__m128i*>(h), _mm256_cvtps_ph(_mm256_load_ps(f), _MM_FROUND_TO_NEAREST_INT));
    std::memcpy(dst + i, h, (n - i) * sizeof(std::uint16_t));
  }
}
#endif

// A block of T to float32 and back. F16C: float16 through the conversion instructions.
template <bool F16C, class T>
AMPKIT_INLINE void to_float(const T* __restrict__ src, float* __restrict__ dst, int64_t n) {
#if defined(AMPKIT_X86_DISPATCH)
  if constexpr (F16C && std::is_same_v<T, c10::Half>) return half_to_float_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = load(src[i]);
}
template <bool F16C, class T>
AMPKIT_INLINE void from_float(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
#if defined(AMPKIT_X86_DISPATCH)
  if constexpr (F16C && std::is_same_v<T, c10::Half>) return float_to_half_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) store(dst[i], src[i]);
}

// Per element the operations and their order are those of one scalar pass of torch's fused SGD:
//   g = grad / scale (written back); g = -g if maximize; g = g + p * wd if wd != 0;
//   b = first step ? g : b * momentum + g * (1 - dampening); d = nesterov ? g + b * momentum : b;
//   p = p - d * lr.
// The flags are tested once per block.
template <bool F16C, class T>
AMPKIT_INLINE void sgd_lowp_range(T* __restrict__ param, T* __restrict__ grad, T* __restrict__ buf, int64_t begin,
                                  int64_t end, const SgdLowpArgs& a) {
  const float lr = a.lr, momentum = a.momentum, keep = a.keep, weight_decay = a.weight_decay;
  const float grad_scale = a.grad_scale;
  alignas(64) float g[kBlock], p[kBlock], b[kBlock];
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t n = std::min(kBlock, end - start);
    to_float<F16C>(grad + start, g, n);
    if (a.unscale) {
      for (int64_t i = 0; i < n; ++i) g[i] = g[i] / grad_scale;
      from_float<F16C>(g, grad + start, n);  // the fused kernels leave the grads unscaled
    }
    if (a.maximize) {
      for (int64_t i = 0; i < n; ++i) g[i] = -g[i];
    }
    to_float<F16C>(param + start, p, n);
    if (weight_decay != 0.0f) {
      for (int64_t i = 0; i < n; ++i) g[i] = g[i] + p[i] * weight_decay;
    }
    if (a.first_step) {
      std::copy(g, g + n, b);
    } else {
      to_float<F16C>(buf + start, b, n);
      for (int64_t i = 0; i < n; ++i) b[i] = b[i] * momentum + g[i] * keep;
    }
    from_float<F16C>(b, buf + start, n);
    if (a.nesterov) {
      for (int64_t i = 0; i < n; ++i) b[i] = g[i] + b[i] * momentum;  // b now holds the direction
    }
    for (int64_t i = 0; i < n; ++i) p[i] = p[i] - b[i] * lr;
    from_float<F16C>(p, param + start, n);
  }
}

#if defined(AMPKIT_X86_DISPATCH)
// One copy of the pass per instruction set; sgd_lowp_range is inlined into each, so each copy is
// compiled and vectorized for its target.
// The copies are overloads (one name per instruction set, one overload per dtype), so that
// sgd_lowp_for_cpu below picks among them for either dtype.
#define AMPKIT_DEFINE_TARGET(suffix, features, T)                                                        \
  __attribute__((target(features))) void sgd_lowp_##suffix(T* p, T* g, T* b, int64_t begin, int64_t end, \
                                                           const SgdLowpArgs& a) {                       \
    sgd_lowp_range<true>(p, g, b, begin, end, a);                                                        \
  }
AMPKIT_DEFINE_TARGET(avx512, "avx512f,avx512bw,avx512vl,avx2,f16c", c10::BFloat16)
AMPKIT_DEFINE_TARGET(avx512, "avx512f,avx512bw,avx512vl,avx2,f16c", c10::Half)
AMPKIT_DEFINE_TARGET(avx2, "avx2,f16c", c10::BFloat16)
AMPKIT_DEFINE_TARGET(avx2, "avx2,f16c", c10::Half)
#undef AMPKIT_DEFINE_TARGET

enum class Isa { avx512, avx2, baseline };

// Chosen by CPU features (not CPU model), once per process. ATEN_CPU_CAPABILITY, ATen's own
// switch, lowers the choice as it lowers ATen's ("default", "avx2"; never above what the CPU has),
// which is how the tests run each copy on one machine.
Isa cpu_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl");
    const char* env = std::getenv("ATEN_CPU_CAPABILITY");
    const std::string cap = env ? env : "";
    if (cap == "default") return Isa::baseline;
    if (cap == "avx2") return avx2 ? Isa::avx2 : Isa::baseline;
    return avx512 ? Isa::avx512 : avx2 ? Isa::avx2 : Isa::baseline;
  }();
  return isa;
}
#endif

// The copy of the pass that this CPU runs, for either dtype.
template <class T>
void sgd_lowp_for_cpu(T* param, T* grad, T* buf, int64_t begin, int64_t end, const SgdLowpArgs& args) {
#if defined(AMPKIT_X86_DISPATCH)
  switch (cpu_isa()) {
    case Isa::avx512: return sgd_lowp_avx512(param, grad, buf, begin, end, args);
    case Isa::avx2: return sgd_lowp_avx2(param, grad, buf, begin, end, args);
    case Isa::baseline: break;
  }
#endif
  sgd_lowp_range<false>(param, grad, buf, begin, end, args);
}

}  // namespace

// One dispatcher per dtype (the same switch twice): each ISA copy is its own symbol per dtype.
void sgd_lowp_range_bf16(c10::BFloat16* param, c10::BFloat16* grad, c10::BFloat16* buf, int64_t begin, int64_t end,
                         const SgdLowpArgs& args) {
  sgd_lowp_for_cpu(param, grad, buf, begin, end, args);
}

void sgd_lowp_range_fp16(c10::Half* param, c10::Half* grad, c10::Half* buf, int64_t begin, int64_t end,
                         const SgdLowpArgs& args) {
  sgd_lowp_for_cpu(param, grad, buf, begin, end, args);
}

}  // namespace ampkit::optim::detail
