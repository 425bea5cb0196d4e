#pragma once
// Internal: what the cast-policy registry (cast_policy.cpp) and the autocast kernel
// (autocast.cpp) share. Not installed.

#include <ampkit/cast_policy.h>

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/DispatchKey.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace ampkit::detail {

// The one dispatch key ampkit owns: a standalone autocast functionality key above Autograd
// that PyTorch core registers nothing on (DESIGN.md §2).
constexpr c10::DispatchKey kAutocastKey = c10::DispatchKey::AutocastPrivateUse1;

// The device types with a policy table, each with torch's autocast key for it: the one list of
// them, which every other place reads (policy_device_types(), the indexes of per-device arrays,
// kTorchAutocastKeys, error messages). A higher index wins when an op mixes devices, as
// AutocastCUDA wins over AutocastCPU in torch.
struct PolicyDevice {
  c10::DeviceType type;
  c10::DispatchKey torch_key;
};
inline constexpr std::array<PolicyDevice, 2> kPolicyDevices = {{
    {c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU},
    {c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA},
}};
constexpr int kNumPolicyDevices = static_cast<int>(kPolicyDevices.size());
// The index of \p device_type in kPolicyDevices, or -1. Inline: every kernel call asks it per tensor.
constexpr int policy_device_index(c10::DeviceType device_type) {
  for (int d = 0; d < kNumPolicyDevices; ++d) {
    if (kPolicyDevices[d].type == device_type) return d;
  }
  return -1;
}
constexpr c10::DeviceType policy_device_type(int index) { return kPolicyDevices[index].type; }

// How the kernel treats one schema argument.
enum class ArgKind : std::uint8_t { Tensor, OptionalTensor, TensorList, OptionalScalarType, Other };

constexpr std::int8_t kNoPolicy = -1;

// What the kernel needs to know of an operator's schema: how to treat each argument, and the
// `dtype` overload that fp32_append_dtype calls (when that policy is in some table). Immutable once
// published; a schema change publishes a new one. Never freed: a kernel call on another thread may
// still read an old one.
struct OpSignature {
  std::vector<ArgKind> kinds;
  std::optional<c10::OperatorHandle> append_target;
};

// One operator that has (or had) an entry in some table. Created once, never destroyed:
// its kernel stays registered for the life of the process, because changing the
// dispatcher's tables while other threads dispatch is a data race. Table edits only store
// into `policy`, which the kernel loads once per call.
//
// Everything the kernel reads is published with release stores and read with acquire loads:
// `policy` per device type, and `signature`, which is null while the operator has no schema or its
// schema changed since the signature was built (the operator was deregistered and defined again):
// the kernel then runs the operator without casting until the registry rebuilt it (at the next
// region entry or table call), so that an entry is never used with another schema than its own.
struct OpEntry {
  explicit OpEntry(std::string n, c10::OperatorHandle h) : name(std::move(n)), handle(std::move(h)) {
    for (auto& p : policy) p.store(kNoPolicy, std::memory_order_relaxed);
    signature.store(nullptr, std::memory_order_relaxed);
  }
  const std::string name;
  const c10::OperatorHandle handle;
  std::array<std::atomic<std::int8_t>, kNumPolicyDevices> policy;
  std::atomic<const OpSignature*> signature;
  bool registered = false;  // its kernel is on ampkit's key (guarded by the registry's mutex)
};

// torch's own autocast keys for the device types ampkit has tables for. While ampkit's kernel
// handles an op they are masked (and excluded for the ops the kernel calls), so that torch's
// kernels never cast a second time; torch's "enabled" bits stay as they are, so torch and user
// code that read them see the region (DESIGN.md §6).
inline const c10::DispatchKeySet kTorchAutocastKeys = [] {
  c10::DispatchKeySet keys;
  for (const auto& d : kPolicyDevices) keys = keys | c10::DispatchKeySet(d.torch_key);
  return keys;
}();
inline const c10::DispatchKeySet kKernelExcludedKeys = kTorchAutocastKeys | c10::DispatchKeySet(kAutocastKey);

inline c10::DispatchKey torch_autocast_key(int device) { return kPolicyDevices[device].torch_key; }

// One tensor's vote for the device type whose autocast applies to a call: the policy device index
// of highest priority (CUDA over CPU, as in torch) among the tensors, counting only device types
// whose torch autocast is enabled on this thread (key not in \p excluded, read before the kernel's
// own exclusions). The boxed kernel and the diagnostics decide with it; the unboxed kernels spell
// the same rule out (autocast_unboxed.cpp says why).
inline void vote_policy_device(int& best, const at::Tensor& t, c10::DispatchKeySet excluded) {
  if (!t.defined()) return;
  const int d = policy_device_index(t.device().type());
  if (d > best && !excluded.has(torch_autocast_key(d))) best = d;
}

// The keys a kernel redispatches with: those below ampkit's, without torch's autocast keys.
inline c10::DispatchKeySet after_autocast(c10::DispatchKeySet keys) {
  return (keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, kAutocastKey)) - kTorchAutocastKeys;
}

// What a call sees of the thread's autocast state, read once per call (torch's TLS).
struct CallState {
  c10::DeviceType device_type;
  c10::ScalarType dtype;  // the region's lower-precision dtype on that device type
  bool cache_enabled;
};

// A defined floating tensor other than float64 on \p device_type: what autocast casts.
bool eligible(const at::Tensor& t, c10::DeviceType device_type);

// \p t cast to \p to if eligible, through this thread's weight cache (autocast.cpp).
at::Tensor cast(const at::Tensor& t, c10::ScalarType to, const CallState& state);

// The message of the error promote raises for fp16 mixed with bf16.
std::string promote_mix_error(const std::string& op, c10::ScalarType lower, c10::ScalarType got);

extern const char* const kBinaryCrossEntropyAdvice;

// An unboxed kernel for \p entry's operator if it is one of the default tables' (compiled in,
// autocast_unboxed.cpp), else nullopt: the boxed kernel serves it.
std::optional<torch::CppFunction> unboxed_kernel_for(const OpEntry& entry);

// The operators torch's own autocast of \p device_type serves with kernels that are no cast policy
// (autocast_lists.h): the default table leaves them to torch, and the check of the table against
// the running torch's registrations counts them as expected.
const std::set<std::string>& torch_own_kernels(c10::DeviceType device_type);

// Registers the fallthrough fallback and the default tables on first use; throws if another
// library (a PrivateUse1 backend) already owns the key.
void ensure_initialized();

// Registers ampkit's kernels for the operators of \p device_type's table (and of its defaults), once
// per process; called when a region of that device type is entered, and by edits of its table.
// Until then a region of another device type costs nothing for the ops only this table lists: one
// dispatch key serves every device type, so a registered kernel is entered by every call made
// while any ampkit region is open. Unarmed, an op of a default table that torch's own autocast of
// that device type handles (a torch region nested in an ampkit one) gets torch's kernel, which does
// what the default table says.
void ensure_armed(c10::DeviceType device_type);

// The entry of operator \p name ("aten::mm") if ampkit's kernel for it is registered, else nullptr:
// what the diagnostics read to tell which policy a call got. Takes the registry's lock.
const OpEntry* registered_entry(const std::string& name);

// The boxed kernel body of every table op (autocast.cpp).
void run_autocast_kernel(const OpEntry& entry, const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                         torch::jit::Stack* stack);

// Bumped by every table edit (set, remove, reset) that succeeds: lets callers that keep
// something derived from the tables (compiled graphs with the casts baked in) notice a change.
std::uint64_t policy_generation();

// "torch.float16" for error messages.
std::string dtype_name(c10::ScalarType dtype);

}  // namespace ampkit::detail
