#pragma once
/// \file autocast.h
/// AutocastGuard: while it lives, ops on tensors of its device type run in the precision
/// that ampkit's cast-policy table (cast_policy.h) gives them. The guard works through the
/// PyTorch dispatcher (the AutocastPrivateUse1 key), so it covers every caller of an op, the
/// casts are recorded by autograd, and ops without a table entry cost nothing.

#include <ampkit/cast_policy.h>

#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

#include <cstddef>
#include <cstdint>

namespace ampkit {

namespace detail {
/// What entering an autocast region changed, so that leaving it restores exactly that.
/// Used by AutocastGuard and by the Python binding, whose regions are not C++ scopes.
struct AutocastRegion {
  c10::DeviceType device_type = c10::DeviceType::CPU;
  int depth = 0;              ///< nesting depth on this thread once entered
  bool prev_enabled = false;  ///< ampkit state of the device before entering
  c10::ScalarType prev_dtype = c10::ScalarType::Undefined;
  bool prev_cache_enabled = true;
  bool prev_key_included = false;  ///< AutocastPrivateUse1 bits in the thread-local sets
  bool prev_key_excluded = true;
  bool prev_torch_enabled = false;  ///< torch's native autocast for the device
};

/// Throws c10::ValueError unless \p device_type has a policy table and \p dtype is fp16 or bf16.
void check_autocast_arguments(c10::DeviceType device_type, c10::ScalarType dtype);

/// Validates the arguments, then enters a region on the calling thread. Throws c10::Error
/// (nothing changed) for a device type without a table or a dtype other than fp16 / bf16.
AutocastRegion enter_autocast(c10::DeviceType device_type, c10::ScalarType dtype, bool enabled, bool cache_enabled);

/// Leaves \p region. Regions must be left innermost first on the thread that entered them:
/// otherwise throws c10::Error and changes nothing.
void exit_autocast(const AutocastRegion& region);
}  // namespace detail

/// RAII autocast region. Non-copyable and non-movable; nestable (an inner guard may change
/// the dtype or disable autocast); thread-local; exception-safe (the destructor restores
/// the state exactly, also when unwinding). While any ampkit guard for a device type is alive,
/// torch's native autocast for that device type is switched off so that ops are not cast twice,
/// and it is restored on exit. Leaving the outermost guard of a thread clears its weight cache.
class AutocastGuard {
 public:
  /// \param device_type c10::kCPU or c10::kCUDA
  /// \param dtype c10::kHalf or c10::kBFloat16
  /// \param enabled false makes a region in which ampkit casts nothing on \p device_type
  /// \param cache_enabled cache the lower-precision casts of fp32 leaf weights in the region
  AutocastGuard(c10::DeviceType device_type, c10::ScalarType dtype, bool enabled = true, bool cache_enabled = true);
  /// Uses torch's autocast dtype of the device type (by default CPU bf16, CUDA fp16).
  explicit AutocastGuard(c10::DeviceType device_type, bool enabled = true, bool cache_enabled = true);
  ~AutocastGuard();

  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;
  AutocastGuard(AutocastGuard&&) = delete;
  AutocastGuard& operator=(AutocastGuard&&) = delete;

  c10::DeviceType device_type() const { return region_.device_type; }

 private:
  detail::AutocastRegion region_;
};

/// Whether ampkit's autocast is on for \p device_type on this thread.
bool is_autocast_enabled(c10::DeviceType device_type);

/// The dtype of the innermost region of \p device_type on this thread (Undefined if none).
c10::ScalarType get_autocast_dtype(c10::DeviceType device_type);

/// Whether the weight cache is on for \p device_type on this thread.
bool is_autocast_cache_enabled(c10::DeviceType device_type);

/// How many ampkit regions are open on this thread.
int autocast_nesting_depth();

/// Number of weight casts cached on this thread.
std::size_t autocast_cache_size();

/// Drops this thread's cached weight casts (done anyway when the outermost region exits).
void clear_autocast_cache();

}  // namespace ampkit
