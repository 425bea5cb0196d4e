#pragma once
// Internal: what the cast-policy registry (cast_policy.cpp) and the autocast kernel
// (autocast.cpp) share. Not installed.

#include <ampkit/cast_policy.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/DispatchKey.h>
#include <c10/core/ScalarType.h>

#include <array>
#include <atomic>
#include <optional>
#include <string>
#include <vector>

namespace ampkit::detail {

// The one dispatch key ampkit owns: a standalone autocast functionality key above Autograd
// that PyTorch core registers nothing on (DESIGN.md §2).
constexpr c10::DispatchKey kAutocastKey = c10::DispatchKey::AutocastPrivateUse1;

// Device types with a policy table; indexes of per-device arrays. A higher index wins
// when an op mixes devices, as AutocastCUDA wins over AutocastCPU in torch.
constexpr int kNumPolicyDevices = 2;
int policy_device_index(c10::DeviceType device_type);
c10::DeviceType policy_device_type(int index);

// How the kernel treats one schema argument.
enum class ArgKind : std::uint8_t { Tensor, OptionalTensor, TensorList, OptionalScalarType, Other };

constexpr std::int8_t kNoPolicy = -1;

// One operator that has (or had) an entry in some table. Created once, never destroyed:
// its kernel stays registered for the life of the process, because changing the
// dispatcher's tables while other threads dispatch is a data race. Table edits only store
// into `policy`, which the kernel loads once per call.
struct OpEntry {
  OpEntry(std::string n, c10::OperatorHandle h, std::vector<ArgKind> k)
      : name(std::move(n)), handle(std::move(h)), kinds(std::move(k)) {
    for (auto& p : policy) p.store(kNoPolicy, std::memory_order_relaxed);
  }
  const std::string name;
  const c10::OperatorHandle handle;
  const std::vector<ArgKind> kinds;
  std::array<std::atomic<std::int8_t>, kNumPolicyDevices> policy;
  // The `dtype` overload that fp32_append_dtype calls. Written once, before the first release
  // store of that policy; read only after an acquire load has seen it.
  std::optional<c10::OperatorHandle> append_target;
};

// Registers the fallthrough fallback and the default tables on first use; throws if another
// library (a PrivateUse1 backend) already owns the key.
void ensure_initialized();

// The boxed kernel body of every table op (autocast.cpp).
void run_autocast_kernel(const OpEntry& entry, const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                         torch::jit::Stack* stack);

// Bumped by every table edit (set, remove, reset) that succeeds: lets callers that keep
// something derived from the tables (compiled graphs with the casts baked in) notice a change.
std::uint64_t policy_generation();

// "torch.float16" for error messages.
std::string dtype_name(c10::ScalarType dtype);

}  // namespace ampkit::detail
