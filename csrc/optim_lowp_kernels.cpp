// The one-pass CPU kernels of optim.cpp for fp16/bf16 parameters, in float32 arithmetic:
// - SGD with momentum on fp16/bf16 buffers, in the order of torch's fused SGD (torch's own CPU kernel
//   is wrong for them);
// - SGD, Adam and AdamW with float32 master weights (the master and the states in float32, the
//   parameter rewritten from the master), in the order of torch's fused float32 kernels, so that a
//   master step equals torch's fused step on the master with the grad upcast;
// - the same without a master, the update rounded stochastically into bf16 parameters, with the
//   states in float32 or bf16.
// Each reads every tensor once and writes it once per step.
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

// bfloat16 <-> float32: c10::BFloat16's round to nearest even (optim_lowp_math.h, branchless so
// that the loops over a block vectorize).
AMPKIT_INLINE float load(const c10::BFloat16& v) { return bf16_to_float(v.x); }
AMPKIT_INLINE void store(c10::BFloat16& v, float f) { v.x = bf16_bits_nearest(f); }
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

// Stores a block of float32 results into the parameter: round to nearest, or (bf16 only)
// stochastically with the random bits of elements [start, start + n).
template <bool F16C, class T>
AMPKIT_INLINE void store_param(const float* __restrict__ src, T* __restrict__ dst, int64_t start, int64_t n,
                               const LowpTensors& t) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (t.stochastic) {
      for (int64_t i = 0; i < n; ++i) {
        const auto index = static_cast<std::uint32_t>(start + i);
        dst[i].x = bf16_bits_stochastic(src[i], rounding_bits(index, t.rounding_key));
      }
      return;
    }
  }
  from_float<F16C>(src, dst, n);
}

// A block of a state (float32 or the low-precision type) as float32, and back.
template <bool F16C, class S>
AMPKIT_INLINE void load_state(const S* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<S, float>) {
    std::copy(src, src + n, dst);
  } else {
    to_float<F16C>(src, dst, n);
  }
}
template <bool F16C, class S>
AMPKIT_INLINE void store_state(const float* src, S* dst, int64_t n) {
  if constexpr (std::is_same_v<S, float>) {
    std::copy(src, src + n, dst);
  } else {
    from_float<F16C>(src, dst, n);
  }
}

// The parameter's value in float32: the master's, or the parameter's own.
template <bool F16C, class T>
AMPKIT_INLINE void load_param(const T* param, const float* master, float* dst, int64_t n) {
  if (master != nullptr) {
    std::copy(master, master + n, dst);
  } else {
    to_float<F16C>(param, dst, n);
  }
}

// SGD. Per element the operations and their order are those of one scalar pass of torch's fused
// SGD:
//   g = grad / scale (written back only if write_grad); g = -g if maximize; g = g + p * wd if wd != 0;
//   b = first step ? g : b * momentum + g * (1 - dampening); d = nesterov ? g + b * momentum : b;
//   p = p - d * lr.
// p is the master's value where there is one (then written back to it), b the momentum buffer
// (float32 or T; absent with momentum 0). The flags are tested once per block.
template <bool F16C, class T, class S>
AMPKIT_INLINE void sgd_range(const LowpTensors& t, int64_t begin, int64_t end, const SgdLowpArgs& a) {
  auto* __restrict__ param = static_cast<T*>(t.param);
  auto* __restrict__ grad = static_cast<T*>(t.grad);
  float* __restrict__ master = t.master;
  auto* __restrict__ buf = static_cast<S*>(t.state[0]);
  const float lr = a.lr, momentum = a.momentum, keep = a.keep, weight_decay = a.weight_decay;
  const float grad_scale = a.grad_scale;
  alignas(64) float g[kBlock], p[kBlock], b[kBlock];
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t n = std::min(kBlock, end - start);
    to_float<F16C>(grad + start, g, n);
    if (a.unscale) {
      for (int64_t i = 0; i < n; ++i) g[i] = g[i] / grad_scale;
      if (a.write_grad) from_float<F16C>(g, grad + start, n);  // torch's fused kernels leave grads unscaled
    }
    if (a.maximize) {
      for (int64_t i = 0; i < n; ++i) g[i] = -g[i];
    }
    load_param<F16C>(param + start, master == nullptr ? nullptr : master + start, p, n);
    if (weight_decay != 0.0f) {
      for (int64_t i = 0; i < n; ++i) g[i] = g[i] + p[i] * weight_decay;
    }
    const float* d = g;  // the direction
    if (buf != nullptr) {
      if (a.first_step) {
        std::copy(g, g + n, b);
      } else {
        load_state<F16C>(buf + start, b, n);
        for (int64_t i = 0; i < n; ++i) b[i] = b[i] * momentum + g[i] * keep;
      }
      store_state<F16C>(b, buf + start, n);
      if (a.nesterov) {
        for (int64_t i = 0; i < n; ++i) b[i] = g[i] + b[i] * momentum;
      }
      d = b;
    }
    for (int64_t i = 0; i < n; ++i) p[i] = p[i] - d[i] * lr;
    if (master != nullptr) std::copy(p, p + n, master + start);
    store_param<F16C>(p, param + start, start, n, t);
  }
}

// Adam and AdamW in the arithmetic of torch's fused float32 CPU kernel (FusedAdamKernel.cpp):
//   g = grad / scale; g = -g if maximize; Adam: g = g + p * wd, AdamW: p = p * (1 - lr * wd);
//   m = lerp(m, g, 1 - beta1), as torch's vectorized lerp: w < 0.5 ? m + w * (g - m)
//       : g + (w - 1) * (g - m); v = v * beta2 + ((1 - beta2) * g) * g;
//   vmax = max(vmax, v) if amsgrad; p = p + (-step_size * m) / (sqrt(v or vmax) / bc2_sqrt + eps).
// Where torch's kernel runs with FMA (its AVX2 and AVX-512 builds) three of these are fused
// multiply-adds: its lerp calls vec::fmadd, and the compiler contracts g + p * wd into fma(p, wd, g)
// and the second moment into fma((1 - beta2) * g, g, v * beta2) (found by comparing candidates
// with torch's results bitwise; tests/python/test_low_precision.py keeps checking). a.fma says
// which; without it every product and sum is rounded on its own (its baseline build).
template <bool F16C, class T, class S>
AMPKIT_INLINE void adam_range(const LowpTensors& t, int64_t begin, int64_t end, const AdamLowpArgs& a) {
  auto* __restrict__ param = static_cast<T*>(t.param);
  auto* __restrict__ grad = static_cast<T*>(t.grad);
  float* __restrict__ master = t.master;
  auto* __restrict__ exp_avg = static_cast<S*>(t.state[0]);
  auto* __restrict__ exp_avg_sq = static_cast<S*>(t.state[1]);
  auto* __restrict__ max_exp_avg_sq = static_cast<S*>(t.state[2]);
  constexpr bool kFloatStates = std::is_same_v<S, float>;
  const float w = a.lerp_weight, w1 = a.lerp_weight - 1.0f, beta2 = a.beta2, sq_coeff = a.sq_coeff;
  const float bc2_sqrt = a.bc2_sqrt, eps = a.eps, neg_step_size = a.neg_step_size;
  const float weight_decay = a.weight_decay, decay_keep = a.decay_keep, grad_scale = a.grad_scale;
  // torch's lerp: w < 0.5 ? m + w * (g - m) : g + (w - 1) * (g - m), one coefficient and one base.
  const bool small_weight = std::abs(w) < 0.5f;
  const float coeff = small_weight ? w : w1;
  alignas(64) float g[kBlock], pb[kBlock], mb[kBlock], vb[kBlock], vmb[kBlock];
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t n = std::min(kBlock, end - start);
    to_float<F16C>(grad + start, g, n);
    if (a.unscale) {
      for (int64_t i = 0; i < n; ++i) g[i] = g[i] / grad_scale;
    }
    if (a.maximize) {
      for (int64_t i = 0; i < n; ++i) g[i] = -g[i];
    }
    // float32 masters and states are worked on where they are; others through a float32 block.
    float* __restrict__ p = master != nullptr ? master + start : pb;
    if (master == nullptr) to_float<F16C>(param + start, pb, n);
    float* __restrict__ m = mb;
    float* __restrict__ v = vb;
    float* __restrict__ vm = vmb;
    if constexpr (kFloatStates) {
      m = exp_avg + start;
      v = exp_avg_sq + start;
      if (max_exp_avg_sq != nullptr) vm = max_exp_avg_sq + start;
    } else {
      to_float<F16C>(exp_avg + start, mb, n);
      to_float<F16C>(exp_avg_sq + start, vb, n);
      if (max_exp_avg_sq != nullptr) to_float<F16C>(max_exp_avg_sq + start, vmb, n);
    }
    if (weight_decay != 0.0f) {
      if (a.decoupled) {
        for (int64_t i = 0; i < n; ++i) p[i] = p[i] * decay_keep;
      } else if (a.fma) {
        for (int64_t i = 0; i < n; ++i) g[i] = std::fma(p[i], weight_decay, g[i]);
      } else {
        for (int64_t i = 0; i < n; ++i) g[i] = g[i] + p[i] * weight_decay;
      }
    }
    if (a.fma) {
      for (int64_t i = 0; i < n; ++i) {
        m[i] = std::fma(coeff, g[i] - m[i], small_weight ? m[i] : g[i]);
        v[i] = std::fma(sq_coeff * g[i], g[i], v[i] * beta2);
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        m[i] = (small_weight ? m[i] : g[i]) + coeff * (g[i] - m[i]);
        v[i] = v[i] * beta2 + sq_coeff * g[i] * g[i];
      }
    }
    const float* second = v;
    if (max_exp_avg_sq != nullptr) {
      for (int64_t i = 0; i < n; ++i) vm[i] = std::max(vm[i], v[i]);
      second = vm;
    }
    for (int64_t i = 0; i < n; ++i) p[i] = p[i] + neg_step_size * m[i] / (std::sqrt(second[i]) / bc2_sqrt + eps);
    if constexpr (!kFloatStates) {
      from_float<F16C>(mb, exp_avg + start, n);
      from_float<F16C>(vb, exp_avg_sq + start, n);
      if (max_exp_avg_sq != nullptr) from_float<F16C>(vmb, max_exp_avg_sq + start, n);
    }
    store_param<F16C>(p, param + start, start, n, t);
  }
}

// Every (parameter, state) type pair the optimizers use: the state in the parameter's type (SGD's
// momentum without a master) or in float32 (master weights, stochastic rounding), or bf16 states
// for bf16 parameters. Written as plain branches, not through a generic lambda: a lambda's body
// is a function of its own, compiled without the target attributes of the per-ISA copies below
// (so unvectorized, and std::fma a library call).
template <bool F16C>
AMPKIT_INLINE void sgd_any(const LowpTensors& t, int64_t begin, int64_t end, const SgdLowpArgs& a) {
  const bool half = t.param_dtype == LowpDtype::fp16;
  if (t.state_dtype == LowpDtype::fp32) {
    if (half) return sgd_range<F16C, c10::Half, float>(t, begin, end, a);
    return sgd_range<F16C, c10::BFloat16, float>(t, begin, end, a);
  }
  if (half) return sgd_range<F16C, c10::Half, c10::Half>(t, begin, end, a);
  return sgd_range<F16C, c10::BFloat16, c10::BFloat16>(t, begin, end, a);
}
template <bool F16C>
AMPKIT_INLINE void adam_any(const LowpTensors& t, int64_t begin, int64_t end, const AdamLowpArgs& a) {
  const bool half = t.param_dtype == LowpDtype::fp16;
  if (t.state_dtype == LowpDtype::fp32) {
    if (half) return adam_range<F16C, c10::Half, float>(t, begin, end, a);
    return adam_range<F16C, c10::BFloat16, float>(t, begin, end, a);
  }
  if (half) return adam_range<F16C, c10::Half, c10::Half>(t, begin, end, a);
  return adam_range<F16C, c10::BFloat16, c10::BFloat16>(t, begin, end, a);
}

#if defined(AMPKIT_X86_DISPATCH)
// One copy of each pass per instruction set; the passes are inlined into each, so each copy is
// compiled and vectorized for its target (fma: std::fma becomes one instruction).
#define AMPKIT_DEFINE_TARGET(suffix, features)                                                     \
  __attribute__((target(features))) void sgd_##suffix(const LowpTensors& t, int64_t b, int64_t e,  \
                                                      const SgdLowpArgs& a) {                      \
    sgd_any<true>(t, b, e, a);                                                                     \
  }                                                                                                \
  __attribute__((target(features))) void adam_##suffix(const LowpTensors& t, int64_t b, int64_t e, \
                                                       const AdamLowpArgs& a) {                    \
    adam_any<true>(t, b, e, a);                                                                    \
  }
AMPKIT_DEFINE_TARGET(avx512, "avx512f,avx512bw,avx512vl,avx2,fma,f16c")
AMPKIT_DEFINE_TARGET(avx2, "avx2,fma,f16c")
#undef AMPKIT_DEFINE_TARGET

enum class Isa { avx512, avx2, baseline };

// Chosen by CPU features (not CPU model), once per process. ATEN_CPU_CAPABILITY, ATen's own
// switch, lowers the choice as it lowers ATen's ("default", "avx2"; never above what the CPU has),
// which is how the tests run each copy on one machine.
Isa cpu_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
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

}  // namespace

void sgd_lowp_range(const LowpTensors& tensors, int64_t begin, int64_t end, const SgdLowpArgs& args) {
#if defined(AMPKIT_X86_DISPATCH)
  switch (cpu_isa()) {
    case Isa::avx512: return sgd_avx512(tensors, begin, end, args);
    case Isa::avx2: return sgd_avx2(tensors, begin, end, args);
    case Isa::baseline: break;
  }
#endif
  sgd_any<false>(tensors, begin, end, args);
}

void adam_lowp_range(const LowpTensors& tensors, int64_t begin, int64_t end, const AdamLowpArgs& args) {
#if defined(AMPKIT_X86_DISPATCH)
  switch (cpu_isa()) {
    case Isa::avx512: return adam_avx512(tensors, begin, end, args);
    case Isa::avx2: return adam_avx2(tensors, begin, end, args);
    case Isa::baseline: break;
  }
#endif
  adam_any<false>(tensors, begin, end, args);
}

}  // namespace ampkit::optim::detail
