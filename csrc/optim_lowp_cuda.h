#pragma once
// Internal: the CUDA one-pass kernels of the low-precision optimizers (bf16/fp16 parameters with
// float32 masters, or bf16 parameters rounded stochastically), seen from the host.
//
// One kernel per (parameter type, state type) walks many tensors at once: the host packs up to
// kMaxTensors whole tensors into a launch table and launches one kernel per table, a block per chunk
// of kChunk elements of one tensor (as torch's multi_tensor_apply does); a block finds its tensor
// from the tensors' cumulative chunk counts, so a launch has as many blocks as its tensors have
// chunks and a large model fills the GPU. Each element is read once and written
// once: grad (never written, the grads stay scaled), master, states, parameter. Sync-free: the
// kernel reads the inf flag, the scale, a tensor lr and the step counters on the device, skips the
// whole step when the flag is 1, and computes the bias corrections and the key of the random bits
// from the step there.
//
// The arithmetic is that of torch's fused CUDA kernels (ATen/native/cuda/fused_adam_utils.cuh and
// FusedSgdKernel.cu, torch 2.13; float32 scalars, torch's op-math type, not double) on float32 values, so a master step
// is torch's fused step on the master with the grad upcast, in one pass instead of three. The stochastic rounding uses
// the bits of optim_lowp_math.h, the same as the CPU kernels.
//
// The block bodies are written once, for nvcc (optim_lowp_cuda.cu) and for the host compiler:
// emulate_adam / emulate_sgd run them block by block on the CPU, which is how the tests check the
// launch tables and the logic on a machine without a GPU.

#include "optim_lowp_math.h"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace ampkit::optim::detail::cuda {

inline constexpr int64_t kChunk = 65536;  ///< elements per block
inline constexpr int kThreads = 512;      ///< threads per block
inline constexpr int kMaxTensors = 36;    ///< tensors per launch table

/// One tensor's memory, contiguous, every pointer at element 0, all on one device.
struct TensorPtrs {
  void* param = nullptr;        ///< param_dtype
  const void* grad = nullptr;   ///< param_dtype; read only
  float* master = nullptr;      ///< the float32 master; null: stochastic rounding
  void* state[3] = {};          ///< Adam: exp_avg, exp_avg_sq, max_exp_avg_sq (null without amsgrad);
                                ///< SGD: the momentum buffer (null with momentum 0). state_dtype.
  const float* step = nullptr;  ///< the step counter, counted already (Adam; SGD with stochastic rounding)
  int64_t numel = 0;
  std::uint32_t index = 0;  ///< the tensor's index in the optimizer's lists (its stream of random bits)
};

/// What one kernel launch walks: blocks [first_block[t], first_block[t + 1]) are the chunks of
/// tensors[t], in order. Passed by value as the kernel's parameter (under the 4 KiB limit).
struct LaunchTable {
  TensorPtrs tensors[kMaxTensors];
  int64_t first_block[kMaxTensors + 1] = {};
  std::int32_t tensor_count = 0;
  int64_t blocks() const { return first_block[tensor_count]; }
};

/// What every kernel reads besides the tensors.
struct Common {
  LowpDtype param_dtype = LowpDtype::bf16;
  LowpDtype state_dtype = LowpDtype::fp32;
  bool stochastic = false;  ///< round the parameter stochastically (no master)
  bool maximize = false;
  float lr = 0;                   ///< used when lr_ptr is null
  const float* lr_ptr = nullptr;  ///< a tensor lr on the device
  float weight_decay = 0;
  const float* grad_scale = nullptr;  ///< on the device; null: the grads are not scaled
  const float* found_inf = nullptr;   ///< on the device, 0 or 1; null: never skip
  std::uint64_t seed = 0;             ///< stochastic rounding: the stream of random bits
  std::uint64_t group_index = 0;
};
struct AdamArgs {
  Common common;
  float beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
  bool decoupled_weight_decay = false;  ///< AdamW
  bool amsgrad = false;
};
struct SgdArgs {
  Common common;
  float momentum = 0, dampening = 0;
  bool nesterov = false;
  bool first_step = false;  ///< the momentum buffers are set to the direction instead of updated
};

/// What adam() and sgd() return for a (parameter, state) type pair that with_dtypes() does not take.
inline constexpr const char* kUnsupportedPair =
    "no kernel for this (parameter, state) type pair: expected (bf16 or fp16, float32) or (bf16, bf16)";

static_assert(sizeof(LaunchTable) + sizeof(AdamArgs) <= 4096 && sizeof(LaunchTable) + sizeof(SgdArgs) <= 4096,
              "a launch table and the scalars must fit in a kernel's 4 KiB of parameters");

/// Whether this build has the CUDA kernels (ampkit built against a CUDA LibTorch).
bool kernels_built();
/// Launches the kernels for \p tensors on \p stream (a cudaStream_t) of the current device. Returns
/// null, or a message saying what failed (an unsupported type pair, a launch error).
const char* adam(const TensorPtrs* tensors, std::size_t count, const AdamArgs& args, void* stream);
const char* sgd(const TensorPtrs* tensors, std::size_t count, const SgdArgs& args, void* stream);
/// The same bodies run on the CPU, block by block, over CPU memory (tests).
const char* emulate_adam(const TensorPtrs* tensors, std::size_t count, const AdamArgs& args);
const char* emulate_sgd(const TensorPtrs* tensors, std::size_t count, const SgdArgs& args);

/// Packs \p tensors, whole and in order, into launch tables of at most kMaxTensors and calls
/// launch(table) for each; empty tensors are left out.
template <class Launch>
void for_each_table(const TensorPtrs* tensors, std::size_t count, Launch&& launch) {
  LaunchTable table;
  for (std::size_t k = 0; k < count; ++k) {
    const TensorPtrs& t = tensors[k];
    if (t.numel <= 0) continue;
    table.tensors[table.tensor_count] = t;
    table.first_block[table.tensor_count + 1] = table.first_block[table.tensor_count] + (t.numel + kChunk - 1) / kChunk;
    if (++table.tensor_count == kMaxTensors) {
      launch(static_cast<const LaunchTable&>(table));
      table.tensor_count = 0;
    }
  }
  if (table.tensor_count > 0) launch(static_cast<const LaunchTable&>(table));
}

/// Calls run(P, S) with std::integral_constant<LowpDtype, ...> for the (parameter, state) type
/// pairs the kernels are built for: bf16 or fp16 parameters with float32 states (masters; stochastic
/// rounding), bf16 parameters with bf16 states (stochastic rounding). False for any other pair.
template <class Run>
bool with_dtypes(LowpDtype param, LowpDtype state, Run&& run) {
  using D = LowpDtype;
  if (param == D::bf16 && state == D::fp32) {
    run(std::integral_constant<D, D::bf16>{}, std::integral_constant<D, D::fp32>{});
  } else if (param == D::fp16 && state == D::fp32) {
    run(std::integral_constant<D, D::fp16>{}, std::integral_constant<D, D::fp32>{});
  } else if (param == D::bf16 && state == D::bf16) {
    run(std::integral_constant<D, D::bf16>{}, std::integral_constant<D, D::bf16>{});
  } else {
    return false;
  }
  return true;
}

// ---- the block bodies (Half: the float16 conversions of the device or of the host) ----

template <LowpDtype D, class Half>
AMPKIT_HD float load(const void* base, int64_t i) {
  if constexpr (D == LowpDtype::fp32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (D == LowpDtype::bf16) {
    return bf16_to_float(static_cast<const std::uint16_t*>(base)[i]);
  } else {
    return Half::to_float(static_cast<const std::uint16_t*>(base)[i]);
  }
}

/// Rounded to nearest.
template <LowpDtype D, class Half>
AMPKIT_HD void store(void* base, int64_t i, float v) {
  if constexpr (D == LowpDtype::fp32) {
    static_cast<float*>(base)[i] = v;
  } else if constexpr (D == LowpDtype::bf16) {
    static_cast<std::uint16_t*>(base)[i] = bf16_bits_nearest(v);
  } else {
    static_cast<std::uint16_t*>(base)[i] = Half::from_float(v);
  }
}

/// The parameter's float32 value: its master, or the parameter itself.
template <LowpDtype P, class Half>
AMPKIT_HD float load_param(const TensorPtrs& t, int64_t i) {
  return t.master != nullptr ? t.master[i] : load<P, Half>(t.param, i);
}

/// The parameter from its float32 value: into the master and rounded to nearest, or rounded
/// stochastically (bf16) with the bits of element \p i under \p key.
template <LowpDtype P, class Half>
AMPKIT_HD void store_param(const TensorPtrs& t, int64_t i, float value, bool stochastic, std::uint32_t key) {
  if (t.master != nullptr) t.master[i] = value;
  if constexpr (P == LowpDtype::bf16) {
    if (stochastic) {
      static_cast<std::uint16_t*>(t.param)[i] =
          bf16_bits_stochastic(value, rounding_bits(static_cast<std::uint32_t>(i), key));
      return;
    }
  }
  store<P, Half>(t.param, i, value);
}

/// std::max's NaN behaviour (torch's kernels call std::max), not fmaxf's.
AMPKIT_HD float max_as_std(float a, float b) { return a < b ? b : a; }

/// The key of the tensor's random bits at this step (stochastic rounding), else 0.
AMPKIT_HD std::uint32_t block_key(const Common& c, const TensorPtrs& t, float step) {
  return c.stochastic
             ? rounding_key(c.seed, static_cast<std::uint64_t>(step), rounding_tensor_index(c.group_index, t.index))
             : 0u;
}

/// What a block walks: elements [begin, end) of tensor t, with the step's lr; skip when the inf flag
/// is 1 (torch's kernels compare with 1).
struct Block {
  const TensorPtrs& t;
  int64_t begin, end;
  float lr;
  bool skip;
};
AMPKIT_HD Block block_of(const LaunchTable& table, const Common& c, int64_t block) {
  int k = 0;  // the block's tensor: at most kMaxTensors comparisons, against kChunk elements of work
  while (block >= table.first_block[k + 1]) ++k;
  const TensorPtrs& t = table.tensors[k];
  const int64_t begin = (block - table.first_block[k]) * kChunk;
  const bool skip = c.found_inf != nullptr && *c.found_inf == 1.0f;
  return {t, begin, begin + kChunk < t.numel ? begin + kChunk : t.numel, skip || c.lr_ptr == nullptr ? c.lr : *c.lr_ptr,
          skip};
}

/// Adam/AdamW over one block (one chunk of one tensor); \p thread of \p threads.
template <class Half, LowpDtype P, LowpDtype S>
AMPKIT_HD void adam_block(const LaunchTable& table, const AdamArgs& a, int64_t block, int thread, int threads) {
  const Common& c = a.common;
  const Block b = block_of(table, c, block);
  if (b.skip) return;
  const TensorPtrs& t = b.t;
  const float lr = b.lr;
  // As torch's functor: the scalars in float32, the bias corrections from the step on the device.
  const float beta1 = a.beta1, beta2 = a.beta2, weight_decay = c.weight_decay, eps = a.eps;
  const float step = *t.step;
  const float bias_correction1 = 1 - std::pow(beta1, step);
  const float bias_correction2_sqrt = std::sqrt(1 - std::pow(beta2, step));
  const std::uint32_t key = block_key(c, t, step);
  for (int64_t i = b.begin + thread; i < b.end; i += threads) {
    float param = load_param<P, Half>(t, i);
    float grad = load<P, Half>(t.grad, i);
    float exp_avg = load<S, Half>(t.state[0], i);
    float exp_avg_sq = load<S, Half>(t.state[1], i);
    // torch's adam_math, operation for operation.
    if (c.grad_scale != nullptr) grad /= *c.grad_scale;
    if (c.maximize) grad = -grad;
    if (weight_decay != 0) {
      if (a.decoupled_weight_decay) {
        param -= lr * weight_decay * param;
      } else {
        grad += param * weight_decay;
      }
    }
    exp_avg = std::fma(beta1, exp_avg, std::fma(-beta1, grad, grad));
    exp_avg_sq = std::fma(beta2, exp_avg_sq, std::fma(-beta2, grad * grad, grad * grad));
    const float step_size = lr / bias_correction1;
    float denom;
    if (a.amsgrad) {
      const float max_exp_avg_sq = max_as_std(load<S, Half>(t.state[2], i), exp_avg_sq);
      store<S, Half>(t.state[2], i, max_exp_avg_sq);
      denom = (std::sqrt(max_exp_avg_sq) / bias_correction2_sqrt) + eps;
    } else {
      denom = (std::sqrt(exp_avg_sq) / bias_correction2_sqrt) + eps;
    }
    param -= step_size * exp_avg / denom;
    store<S, Half>(t.state[0], i, exp_avg);
    store<S, Half>(t.state[1], i, exp_avg_sq);
    store_param<P, Half>(t, i, param, c.stochastic, key);
  }
}

/// SGD over one block; the step counter is read only with stochastic rounding.
template <class Half, LowpDtype P, LowpDtype S>
AMPKIT_HD void sgd_block(const LaunchTable& table, const SgdArgs& a, int64_t block, int thread, int threads) {
  const Common& c = a.common;
  const Block b = block_of(table, c, block);
  if (b.skip) return;
  const TensorPtrs& t = b.t;
  const float lr = b.lr;
  const float weight_decay = c.weight_decay, momentum = a.momentum, dampening = a.dampening;
  const std::uint32_t key = c.stochastic ? block_key(c, t, *t.step) : 0u;
  for (int64_t i = b.begin + thread; i < b.end; i += threads) {
    float p = load_param<P, Half>(t, i);
    float g = load<P, Half>(t.grad, i);
    // torch's sgd_math, operation for operation.
    if (c.grad_scale != nullptr) g /= *c.grad_scale;
    if (c.maximize) g *= -1.0f;
    if (weight_decay != 0) g += weight_decay * p;
    if (t.state[0] != nullptr) {
      const float momentum_buffer = a.first_step ? g : (momentum * load<S, Half>(t.state[0], i) + (1 - dampening) * g);
      store<S, Half>(t.state[0], i, momentum_buffer);
      g = a.nesterov ? g + momentum * momentum_buffer : momentum_buffer;
    }
    p -= lr * g;
    store_param<P, Half>(t, i, p, c.stochastic, key);
  }
}

}  // namespace ampkit::optim::detail::cuda
