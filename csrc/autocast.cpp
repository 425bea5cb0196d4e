#include <ampkit/autocast.h>

#include "autocast_kernel.h"
#include "autocast_region.h"
#include "diagnostics_hooks.h"

#include <ATen/ATen.h>
#include <ATen/CachedTensorUtils.h>
#include <ATen/autocast_mode.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <atomic>
#include <unordered_map>
#include <vector>

namespace ampkit {
namespace detail {
namespace {

// The weak reference keeps the source TensorImpl allocated, so its address (the key)
// cannot be reused by another tensor while the entry lives.
struct CacheEntry {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> source;
  at::Tensor cast;
};

struct ThreadState {
  std::vector<AutocastRegionPtr> regions;  // open regions, in the order they were entered
  std::uint64_t abandoned_seen = 0;        // the value of `abandonments` last checked
  std::unordered_map<c10::TensorImpl*, CacheEntry> cache;
};

thread_local ThreadState tls;

// Bumped whenever a region is abandoned (left on another thread): threads look for abandoned
// regions of theirs only when it changed.
std::atomic<std::uint64_t> abandonments{0};

}  // namespace

bool eligible(const at::Tensor& t, c10::DeviceType device_type) {
  return t.defined() && t.device().type() == device_type && t.is_floating_point() && t.scalar_type() != at::kDouble;
}

// torch's cached_cast: only lower-precision casts of fp32 leaves that require grad are
// cached (model weights), so each weight is cast once per region, forward and backward.
// The cast is always recorded by autograd, also when made under no_grad: a cast cached during
// an evaluation pass is then reused by the training pass and gradients still reach the weight
// (torch does the same since pytorch#158232). Inference mode caches nothing: its tensors cannot
// join a graph later.
at::Tensor cast(const at::Tensor& t, c10::ScalarType to, const CallState& state) {
  if (!eligible(t, state.device_type) || t.scalar_type() == to) return t;
  const bool cacheable = state.cache_enabled && to == state.dtype && t.scalar_type() == at::kFloat &&
                         t.requires_grad() && t.is_leaf() && !t.is_view() && !c10::InferenceMode::is_enabled() &&
                         !at::caching::is_cached_tensor(t);
  if (!cacheable) {
    at::Tensor casted = t.to(to);
    note_cast(t, casted, /*cached=*/false);
    return casted;
  }
  auto it = tls.cache.find(t.unsafeGetTensorImpl());
  if (it != tls.cache.end()) {
    note_cast(t, it->second.cast, /*cached=*/true);
    return it->second.cast;
  }
  at::Tensor casted;
  {
    c10::AutoGradMode record(true);
    casted = t.to(to);
  }
  tls.cache.emplace(
      t.unsafeGetTensorImpl(),
      CacheEntry{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(t.getIntrusivePtr()), casted});
  note_cast(t, casted, /*cached=*/false);
  return casted;
}

std::string promote_mix_error(const std::string& op, c10::ScalarType lower, c10::ScalarType got) {
  return c10::str("ampkit: policy promote of '", op, "' expects floating inputs of ", dtype_name(lower),
                  " or torch.float32 under autocast with ", dtype_name(lower), ", got ", dtype_name(got));
}

namespace {

void cast_arguments(const OpSignature& sig, torch::jit::Stack* stack, c10::ScalarType to, const CallState& state) {
  const size_t n = sig.kinds.size();
  c10::IValue* args = stack->data() + (stack->size() - n);
  for (size_t i = 0; i < n; ++i) {
    switch (sig.kinds[i]) {
      case ArgKind::Tensor:
      case ArgKind::OptionalTensor:
        if (args[i].isTensor()) {
          at::Tensor c = cast(args[i].toTensor(), to, state);
          if (!c.is_same(args[i].toTensor())) args[i] = std::move(c);
        }
        break;
      case ArgKind::TensorList: {
        // A fresh list: the caller may share the boxed one.
        auto in = args[i].toTensorList();
        c10::List<at::Tensor> out;
        out.reserve(in.size());
        for (const at::Tensor& t : in) out.push_back(cast(t, to, state));
        args[i] = std::move(out);
        break;
      }
      default: break;
    }
  }
}

// torch's at::autocast::prioritize: the widest floating type among Tensor and Tensor[]
// arguments; Tensor? arguments do not vote.
c10::ScalarType promote_type(const OpEntry& e, const OpSignature& sig, const torch::jit::Stack* stack,
                             const CallState& state) {
  const c10::ScalarType lower = state.dtype;
  c10::ScalarType current = lower;
  auto vote = [&](const at::Tensor& t) {
    if (!t.defined() || t.device().type() != state.device_type || !t.is_floating_point()) return;
    const auto next = t.scalar_type();
    if (next == at::kDouble) return;
    if (current == at::kFloat || next == at::kFloat) {
      current = at::kFloat;
    } else {
      TORCH_CHECK(current == lower && next == lower, promote_mix_error(e.name, lower, next));
    }
  };
  const size_t n = sig.kinds.size();
  const c10::IValue* args = stack->data() + (stack->size() - n);
  for (size_t i = 0; i < n; ++i) {
    if (sig.kinds[i] == ArgKind::Tensor && args[i].isTensor()) {
      vote(args[i].toTensor());
    } else if (sig.kinds[i] == ArgKind::TensorList) {
      for (const at::Tensor& t : args[i].toTensorList()) vote(t);
    }
  }
  return current;
}

// The device type whose autocast applies: among the tensor arguments' device types with a
// table, the one of highest priority (CUDA over CPU, as in torch) whose torch autocast is enabled
// on this thread (its key not in \p excluded, read before the kernel's own exclusions), or -1.
int call_device(const OpSignature& sig, const torch::jit::Stack* stack, c10::DispatchKeySet excluded) {
  int best = -1;
  auto consider = [&](const at::Tensor& t) { vote_policy_device(best, t, excluded); };
  const size_t n = sig.kinds.size();
  const c10::IValue* args = stack->data() + (stack->size() - n);
  for (size_t i = 0; i < n; ++i) {
    switch (sig.kinds[i]) {
      case ArgKind::Tensor:
      case ArgKind::OptionalTensor:
        if (args[i].isTensor()) consider(args[i].toTensor());
        break;
      case ArgKind::TensorList:
        for (const at::Tensor& t : args[i].toTensorList()) consider(t);
        break;
      default: break;
    }
  }
  return best;
}

void redispatch(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  op.redispatchBoxed(after_autocast(keys), stack);
}

}  // namespace

const char* const kBinaryCrossEntropyAdvice =
    "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast: many models use a "
    "sigmoid layer right before the binary cross entropy layer; combine the two with "
    "torch.nn.functional.binary_cross_entropy_with_logits or torch.nn.BCEWithLogitsLoss, which are safe to "
    "autocast.";

void run_autocast_kernel(const OpEntry& e, const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                         torch::jit::Stack* stack) {
  const OpSignature* sig = e.signature.load(std::memory_order_acquire);
  // No signature: the operator's schema changed since the entry was built (see OpEntry).
  if (sig == nullptr || sig->kinds.size() > stack->size()) return redispatch(op, keys, stack);
  const int d = call_device(*sig, stack, c10::impl::tls_local_dispatch_key_set().excluded_);
  const std::int8_t raw = d < 0 ? kNoPolicy : e.policy[d].load(std::memory_order_acquire);
  // No policy for this call (an op of the other device type's table, say): run it as if it had no
  // kernel here. Its decomposition, if any, is autocast op by op, as under torch.autocast.
  if (raw == kNoPolicy) return redispatch(op, keys, stack);
  // Casts and the op's own decomposition must reach neither this kernel nor torch's.
  c10::impl::ExcludeDispatchKeyGuard no_reentry(kKernelExcludedKeys);

  const c10::DeviceType device_type = policy_device_type(d);
  const CallState state{device_type, at::autocast::get_autocast_dtype(device_type),
                        at::autocast::is_autocast_cache_enabled()};
  const size_t n = sig->kinds.size();
  switch (static_cast<CastPolicy>(raw)) {
    case CastPolicy::lower_precision_fp: cast_arguments(*sig, stack, state.dtype, state); break;
    case CastPolicy::fp32: cast_arguments(*sig, stack, at::kFloat, state); break;
    case CastPolicy::promote: cast_arguments(*sig, stack, promote_type(e, *sig, stack, state), state); break;
    case CastPolicy::fp32_set_opt_dtype: {
      c10::IValue* args = stack->data() + (stack->size() - n);
      if (args[0].isTensor() && eligible(args[0].toTensor(), device_type)) {
        for (size_t i = 0; i < n; ++i) {
          if (sig->kinds[i] == ArgKind::OptionalScalarType && args[i].isNone()) args[i] = c10::IValue(at::kFloat);
        }
      }
      break;
    }
    case CastPolicy::fp32_append_dtype: {
      // Published before the policy; absent only if this call read an older signature while the
      // policy was being set on another thread.
      if (!sig->append_target) return redispatch(op, keys, stack);
      const at::Tensor& first = (stack->end() - n)->toTensor();
      const auto out_type = eligible(first, device_type) ? at::kFloat : first.scalar_type();
      stack->emplace_back(out_type);
      sig->append_target->callBoxed(stack);
      return;
    }
    case CastPolicy::banned:
      TORCH_CHECK(false, "ampkit: '", e.name, "' is banned under autocast on ",
                  c10::DeviceTypeName(device_type, /*lower_case=*/true), " by its cast policy. ",
                  e.name == "aten::binary_cross_entropy" ? kBinaryCrossEntropyAdvice
                                                         : "Run it outside the autocast region or change its policy.");
  }
  redispatch(op, keys, stack);
}

void check_autocast_arguments(c10::DeviceType device_type, c10::ScalarType dtype, bool enabled) {
  TORCH_CHECK(at::autocast::is_autocast_available(device_type),
              "ampkit.autocast: expected a device type that torch's autocast supports (cpu, cuda, xpu, mps, hpu, "
              "...), got '",
              c10::DeviceTypeName(device_type, /*lower_case=*/true), "'");
  TORCH_CHECK_VALUE(!enabled || dtype == at::kHalf || dtype == at::kBFloat16,
                    "ampkit.autocast: expected dtype torch.float16 or torch.bfloat16 (or enabled=false), got ",
                    dtype_name(dtype));
}

namespace {

// The pieces of thread state a region sets: torch's enabled flag and dtype of its device type,
// torch's cache flag, and (when it sets_key) ampkit's key bits. Leaving a region restores each
// piece unless a region entered after it, still open, set the same piece: then the current
// value is that region's, and that region restores this one's saved value instead.
void restore_device(const AutocastRegion& r) {
  at::autocast::set_autocast_enabled(r.device_type, r.prev_torch_enabled);
  at::autocast::set_autocast_dtype(r.device_type, r.prev_dtype);
}
void restore_cache(const AutocastRegion& r) { at::autocast::set_autocast_cache_enabled(r.prev_cache_enabled); }
void restore_key(const AutocastRegion& r) {
  c10::impl::tls_set_dispatch_key_included(kAutocastKey, r.prev_key_included);
  c10::impl::tls_set_dispatch_key_excluded(kAutocastKey, r.prev_key_excluded);
}

void close_region(size_t index) {
  auto& regions = tls.regions;
  const AutocastRegionPtr r = regions[index];
  AutocastRegion* later_device = nullptr;
  AutocastRegion* later_cache = nullptr;
  AutocastRegion* later_key = nullptr;
  for (size_t j = index + 1; j < regions.size(); ++j) {
    AutocastRegion* later = regions[j].get();
    if (!later_device && later->device_type == r->device_type) later_device = later;
    if (!later_cache) later_cache = later;
    if (!later_key && later->sets_key) later_key = later;
  }
  if (later_device) {
    later_device->prev_torch_enabled = r->prev_torch_enabled;
    later_device->prev_dtype = r->prev_dtype;
  } else {
    restore_device(*r);
  }
  if (later_cache) {
    later_cache->prev_cache_enabled = r->prev_cache_enabled;
  } else {
    restore_cache(*r);
  }
  if (r->sets_key) {
    if (later_key) {
      later_key->prev_key_included = r->prev_key_included;
      later_key->prev_key_excluded = r->prev_key_excluded;
    } else {
      restore_key(*r);
    }
  }
  r->open = false;
  regions.erase(regions.begin() + static_cast<std::ptrdiff_t>(index));
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  if (regions.empty()) tls.cache.clear();
}

// Closes this thread's regions that were left on another thread.
void close_abandoned() {
  const std::uint64_t now = abandonments.load(std::memory_order_acquire);
  if (now == tls.abandoned_seen) return;
  tls.abandoned_seen = now;
  for (size_t i = tls.regions.size(); i-- > 0;) {
    if (tls.regions[i]->abandoned.load(std::memory_order_acquire)) close_region(i);
  }
}

}  // namespace

AutocastRegionPtr enter_autocast(c10::DeviceType device_type, c10::ScalarType dtype, bool enabled,
                                 std::optional<bool> cache_enabled) {
  check_autocast_arguments(device_type, dtype, enabled);
  ensure_initialized();
  close_abandoned();

  auto region = std::make_shared<AutocastRegion>();
  region->device_type = device_type;
  region->owner = std::this_thread::get_id();
  region->prev_torch_enabled = at::autocast::is_autocast_enabled(device_type);
  region->prev_dtype = at::autocast::get_autocast_dtype(device_type);
  region->prev_cache_enabled = at::autocast::is_autocast_cache_enabled();
  region->prev_key_included = c10::impl::tls_is_dispatch_key_included(kAutocastKey);
  region->prev_key_excluded = c10::impl::tls_is_dispatch_key_excluded(kAutocastKey);
  // A disabled region leaves the key as it was: it costs nothing, and an enclosing ampkit region
  // stays in charge. Device types without a table get torch's region alone: torch's lists apply.
  region->sets_key = enabled && policy_device_index(device_type) >= 0;
  if (region->sets_key) ensure_armed(device_type);
  tls.regions.reserve(tls.regions.size() + 1);  // the push below cannot throw after the state changed

  // torch.autocast's __enter__, step by step, so that torch sees the region ...
  at::autocast::set_autocast_enabled(device_type, enabled);
  at::autocast::set_autocast_dtype(device_type, dtype);
  at::autocast::increment_nesting();
  at::autocast::set_autocast_cache_enabled(cache_enabled.value_or(region->prev_cache_enabled));
  // ... and ampkit's key, so that ampkit's table decides what the ops run in.
  if (region->sets_key) {
    c10::impl::tls_set_dispatch_key_included(kAutocastKey, true);
    c10::impl::tls_set_dispatch_key_excluded(kAutocastKey, false);
  }
  region->open = true;
  tls.regions.push_back(region);
  return region;
}

void exit_autocast(const AutocastRegionPtr& region) {
  TORCH_CHECK(region != nullptr, "ampkit.autocast: expected a region to leave, got none");
  if (region->owner != std::this_thread::get_id()) {
    if (!region->abandoned.exchange(true, std::memory_order_acq_rel)) {
      abandonments.fetch_add(1, std::memory_order_acq_rel);
    }
    TORCH_CHECK(false,
                "ampkit.autocast: expected to leave the region on the thread that entered it, got a call from "
                "another thread; autocast state is per thread, so the region stays in effect on its thread until "
                "that thread enters or leaves another region, which closes it");
  }
  close_abandoned();
  TORCH_CHECK(region->open,
              "ampkit.autocast: expected an open region, got one that was already left (each region is left once)");
  const auto it = std::find(tls.regions.begin(), tls.regions.end(), region);
  TORCH_INTERNAL_ASSERT(it != tls.regions.end(), "an open region is on its thread's stack");
  close_region(static_cast<size_t>(it - tls.regions.begin()));
}

int open_autocast_regions() { return static_cast<int>(tls.regions.size()); }

}  // namespace detail

AutocastGuard::AutocastGuard(c10::DeviceType device_type, c10::ScalarType dtype, bool enabled,
                             std::optional<bool> cache_enabled)
    : device_type_(device_type), region_(detail::enter_autocast(device_type, dtype, enabled, cache_enabled)) {}

AutocastGuard::AutocastGuard(c10::DeviceType device_type, bool enabled, std::optional<bool> cache_enabled)
    : AutocastGuard(device_type, at::autocast::get_autocast_dtype(device_type), enabled, cache_enabled) {}

AutocastGuard::~AutocastGuard() {
  // A guard destroyed on another thread (one allocated with new) cannot change its thread's state:
  // it is abandoned, and its thread closes it at its next region entry or exit.
  try {
    detail::exit_autocast(region_);
  } catch (const c10::Error&) {
  }
}

bool is_autocast_enabled(c10::DeviceType device_type) {
  return detail::policy_device_index(device_type) >= 0 &&
         c10::impl::tls_is_dispatch_key_included(detail::kAutocastKey) &&
         !c10::impl::tls_is_dispatch_key_excluded(detail::kAutocastKey) &&
         at::autocast::is_autocast_enabled(device_type);
}

c10::ScalarType get_autocast_dtype(c10::DeviceType device_type) {
  return at::autocast::get_autocast_dtype(device_type);
}

bool is_autocast_cache_enabled() { return at::autocast::is_autocast_cache_enabled(); }

int autocast_nesting_depth() { return static_cast<int>(detail::tls.regions.size()); }

std::size_t autocast_cache_size() { return detail::tls.cache.size(); }

void clear_autocast_cache() { detail::tls.cache.clear(); }

}  // namespace ampkit
