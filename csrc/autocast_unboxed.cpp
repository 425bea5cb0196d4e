// Unboxed kernels for the operators of the default tables. The boxed kernel (autocast.cpp) serves
// any operator, but boxing the arguments costs hundreds of instructions a call: paid by every call
// of a listed op, and by calls on the other device type of ops that only one table lists (sum,
// softmax, exp... on CPU tensors). These kernels take the operator's C++ arguments as torch's own
// autocast kernels do, read the same per-device policy cells, cast with the same function, and
// leave the rare policies (fp32_append_dtype, banned) to the boxed kernel.
#include "autocast_kernel.h"
#include "autocast_lists.h"

#include <ATen/Operators.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/boxing/impl/boxing.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace ampkit::detail {
namespace {

// ---- which device type's policy applies: the enabled one of highest priority among the tensors

struct DeviceVote {
  c10::DispatchKeySet excluded;  // read before the kernel's own exclusions
  int best = -1;
};

// vote_policy_device's rule (autocast_kernel.h), written out here: through the helper, the compiler
// emits about 11 more instructions per mm call (callgrind), on the path every listed op takes.
inline void vote(DeviceVote& v, const at::Tensor& t) {
  if (!t.defined()) return;
  const int d = policy_device_index(t.device().type());
  if (d > v.best && !v.excluded.has(torch_autocast_key(d))) v.best = d;
}
inline void vote(DeviceVote& v, const std::optional<at::Tensor>& t) {
  if (t) vote(v, *t);
}
inline void vote(DeviceVote& v, at::TensorList l) {
  for (const auto& t : l) vote(v, t);
}
inline void vote(DeviceVote& v, const at::ITensorListRef& l) {
  for (const auto& t : l) vote(v, t);
}
inline void vote(DeviceVote& v, const c10::List<std::optional<at::Tensor>>& l) {
  for (const std::optional<at::Tensor> t : l) vote(v, t);
}
template <class T>
inline void vote(DeviceVote&, const T&) {}

// ---- promote: the widest floating type among Tensor and Tensor[] arguments (not Tensor?)

struct TypeVote {
  const OpEntry* entry;
  c10::DeviceType device_type;
  c10::ScalarType lower;
  c10::ScalarType current;
};

inline void widen(TypeVote& v, const at::Tensor& t) {
  if (!t.defined() || t.device().type() != v.device_type || !t.is_floating_point()) return;
  const auto next = t.scalar_type();
  if (next == at::kDouble) return;
  if (v.current == at::kFloat || next == at::kFloat) {
    v.current = at::kFloat;
  } else {
    TORCH_CHECK(v.current == v.lower && next == v.lower, promote_mix_error(v.entry->name, v.lower, next));
  }
}
inline void widen(TypeVote& v, at::TensorList l) {
  for (const auto& t : l) widen(v, t);
}
inline void widen(TypeVote& v, const at::ITensorListRef& l) {
  for (const auto& t : l) widen(v, t);
}
template <class T>
inline void widen(TypeVote&, const T&) {}

// ---- casting each argument: Tensor, Tensor?, Tensor[] and Tensor?[] are cast, others pass

// A cast Tensor[] for parameters of type ITensorListRef, which a vector does not convert to.
struct CastTensorList {
  std::vector<at::Tensor> tensors;
  operator at::ITensorListRef() const { return at::ITensorListRef(at::ArrayRef<at::Tensor>(tensors)); }
};

inline at::Tensor cast_arg(const at::Tensor& t, c10::ScalarType to, const CallState& s) { return cast(t, to, s); }
inline std::optional<at::Tensor> cast_arg(const std::optional<at::Tensor>& t, c10::ScalarType to, const CallState& s) {
  return t ? std::optional<at::Tensor>(cast(*t, to, s)) : std::nullopt;
}
inline std::vector<at::Tensor> cast_arg(at::TensorList l, c10::ScalarType to, const CallState& s) {
  std::vector<at::Tensor> out;
  out.reserve(l.size());
  for (const auto& t : l) out.push_back(cast(t, to, s));
  return out;
}
inline CastTensorList cast_arg(const at::ITensorListRef& l, c10::ScalarType to, const CallState& s) {
  CastTensorList out;
  out.tensors.reserve(l.size());
  for (const auto& t : l) out.tensors.push_back(cast(t, to, s));
  return out;
}
inline c10::List<std::optional<at::Tensor>> cast_arg(const c10::List<std::optional<at::Tensor>>& l, c10::ScalarType to,
                                                     const CallState& s) {
  c10::List<std::optional<at::Tensor>> out;
  out.reserve(l.size());
  for (const std::optional<at::Tensor> t : l) out.push_back(t ? std::optional<at::Tensor>(cast(*t, to, s)) : t);
  return out;
}
template <class T>
inline T&& cast_arg(T&& x, c10::ScalarType, const CallState&) {
  return std::forward<T>(x);
}

// ---- fp32_set_opt_dtype: an absent `ScalarType? dtype` becomes float32

inline std::optional<at::ScalarType> set_opt_dtype(std::optional<at::ScalarType> dtype) {
  return dtype ? dtype : std::optional<at::ScalarType>(at::kFloat);
}
template <class T>
inline T&& set_opt_dtype(T&& x) {
  return std::forward<T>(x);
}

template <class Op, class Schema>
struct UnboxedKernel;

template <class Op, class Ret, class... Args>
struct UnboxedKernel<Op, Ret(Args...)> {
  // Published (release) before the kernel is registered; never changes afterwards.
  static inline std::atomic<const OpEntry*> entry{nullptr};

  static void boxed(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
    run_autocast_kernel(*entry.load(std::memory_order_acquire), op, keys, stack);
  }

  static Ret call(c10::DispatchKeySet keys, Args... args) {
    const OpEntry& e = *entry.load(std::memory_order_acquire);
    DeviceVote device{c10::impl::tls_local_dispatch_key_set().excluded_};
    (vote(device, args), ...);
    const std::int8_t raw = device.best < 0 ? kNoPolicy : e.policy[device.best].load(std::memory_order_acquire);
    // No policy for this call: run the op as if it had no kernel here (its decomposition, if
    // any, is autocast op by op).
    if (raw == kNoPolicy) return Op::redispatch(after_autocast(keys), std::forward<Args>(args)...);
    const auto policy = static_cast<CastPolicy>(raw);
    if (policy == CastPolicy::fp32_append_dtype || policy == CastPolicy::banned) {
      // Rare: the boxed kernel calls the dtype overload or raises.
      return c10::impl::BoxedKernelWrapper<Ret(Args...)>::call(c10::BoxedKernel::makeFromFunction<&boxed>(), e.handle,
                                                               keys, std::forward<Args>(args)...);
    }
    const c10::DeviceType device_type = policy_device_type(device.best);
    const CallState state{device_type, at::autocast::get_autocast_dtype(device_type),
                          at::autocast::is_autocast_cache_enabled()};
    // Casts and the op's own decomposition must reach neither this kernel nor torch's.
    c10::impl::ExcludeDispatchKeyGuard no_reentry(kKernelExcludedKeys);
    const c10::DispatchKeySet next = after_autocast(keys);
    switch (policy) {
      case CastPolicy::lower_precision_fp: return Op::redispatch(next, cast_arg(args, state.dtype, state)...);
      case CastPolicy::fp32: return Op::redispatch(next, cast_arg(args, at::kFloat, state)...);
      case CastPolicy::promote: {
        TypeVote types{&e, device_type, state.dtype, state.dtype};
        (widen(types, args), ...);
        return Op::redispatch(next, cast_arg(args, types.current, state)...);
      }
      case CastPolicy::fp32_set_opt_dtype: {
        const auto& first = std::get<0>(std::forward_as_tuple(args...));
        if constexpr (std::is_same_v<std::decay_t<decltype(first)>, at::Tensor>) {
          if (eligible(first, device_type)) return Op::redispatch(next, set_opt_dtype(std::forward<Args>(args))...);
        }
        return Op::redispatch(next, std::forward<Args>(args)...);
      }
      default: break;
    }
    TORCH_INTERNAL_ASSERT(false, "unhandled cast policy ", static_cast<int>(raw));
  }

  static torch::CppFunction kernel(const OpEntry* e) {
    entry.store(e, std::memory_order_release);
    return torch::CppFunction::makeFromUnboxedFunction(TORCH_FN(call));
  }
};

template <class Op>
torch::CppFunction unboxed_kernel(const OpEntry* e) {
  return UnboxedKernel<Op, typename Op::schema>::kernel(e);
}

using KernelFactory = torch::CppFunction (*)(const OpEntry*);

// `_(op)` or `_(op, overload)` -> the op's at::_ops type and its full name.
#define AMPKIT_PICK3(_1, _2, NAME, ...) NAME
#define AMPKIT_OP(...) AMPKIT_PICK3(__VA_ARGS__, ATEN_OP2, ATEN_OP)(__VA_ARGS__)
#define AMPKIT_NAME1(op) "aten::" #op
#define AMPKIT_NAME2(op, overload) "aten::" #op "." #overload
#define AMPKIT_NAME(...) AMPKIT_PICK3(__VA_ARGS__, AMPKIT_NAME2, AMPKIT_NAME1)(__VA_ARGS__)

const std::unordered_map<std::string, KernelFactory>& factories() {
  static const auto* table = [] {
    auto* m = new std::unordered_map<std::string, KernelFactory>();
#define AMPKIT_ADD(...) m->emplace(AMPKIT_NAME(__VA_ARGS__), &unboxed_kernel<AMPKIT_OP(__VA_ARGS__)>);
#define AMPKIT_ADD_CPU(POLICY, ...) AMPKIT_ADD(__VA_ARGS__)
    AMPKIT_FORALL_CPU_DEFAULTS(AMPKIT_ADD_CPU)
    AT_FORALL_LOWER_PRECISION_FP(AMPKIT_ADD)
    AT_FORALL_FP32(AMPKIT_ADD)
    AT_FORALL_FP32_SET_OPT_DTYPE(AMPKIT_ADD)
    AT_FORALL_PROMOTE(AMPKIT_ADD)
    AMPKIT_ADD(cudnn_convolution)
    AMPKIT_ADD(cudnn_convolution_transpose)
    AMPKIT_ADD(binary_cross_entropy)
#undef AMPKIT_ADD_CPU
#undef AMPKIT_ADD
    return m;
  }();
  return *table;
}

}  // namespace

std::optional<torch::CppFunction> unboxed_kernel_for(const OpEntry& entry) {
  const auto& m = factories();
  auto it = m.find(entry.name);
  if (it == m.end()) return std::nullopt;
  return it->second(&entry);
}

}  // namespace ampkit::detail
