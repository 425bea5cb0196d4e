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
#include <memory>
#include <optional>

namespace ampkit {

namespace detail {
struct AutocastRegion;  // csrc/autocast_region.h
}  // namespace detail

/// RAII autocast region. Non-copyable and non-movable; nestable (an inner guard may change
/// the dtype or disable autocast); thread-local; exception-safe (the destructor restores
/// the state exactly, also when unwinding). Guards left out of order (heap-allocated ones) still
/// restore the thread's state once all are gone; one destroyed on another thread is closed by
/// its own thread at that thread's next region entry or exit.
///
/// The region is torch's autocast state as well: inside it `at::autocast::is_autocast_enabled`,
/// `get_autocast_dtype` and `is_autocast_cache_enabled` (and their Python spellings) report it,
/// exactly as inside `torch.autocast`, so code that reads them (custom_fwd, checkpointing,
/// torch.compile's guards) works. Which precision an op runs in is decided by ampkit's table for
/// every op it has an entry for (torch's own autocast kernels are kept from casting a second time);
/// a nested `torch.autocast(enabled=false)` or `torch.autocast(dtype=...)` changes that state as it
/// does in torch, and ampkit's table goes on deciding. Leaving the outermost ampkit guard of a
/// thread clears its weight cache.
class AutocastGuard {
 public:
  /// \param device_type c10::kCPU or c10::kCUDA, whose ops follow ampkit's tables; other device types
  ///        that torch's autocast supports (XPU, MPS, HPU, ...) get torch's own autocast and lists
  /// \param dtype c10::kHalf or c10::kBFloat16 (any dtype when \p enabled is false, as in torch)
  /// \param enabled false makes a region in which nothing is autocast on \p device_type
  /// \param cache_enabled cache the lower-precision casts of fp32 leaf weights in the region;
  ///        std::nullopt keeps the thread's current setting (torch's `cache_enabled=None`)
  AutocastGuard(c10::DeviceType device_type, c10::ScalarType dtype, bool enabled = true,
                std::optional<bool> cache_enabled = std::nullopt);
  /// Uses torch's current autocast dtype of the device type (by default CPU bf16, CUDA fp16).
  explicit AutocastGuard(c10::DeviceType device_type, bool enabled = true,
                         std::optional<bool> cache_enabled = std::nullopt);
  ~AutocastGuard();

  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;
  AutocastGuard(AutocastGuard&&) = delete;
  AutocastGuard& operator=(AutocastGuard&&) = delete;

  c10::DeviceType device_type() const { return device_type_; }

 private:
  c10::DeviceType device_type_;
  std::shared_ptr<detail::AutocastRegion> region_;
};

/// Whether ops on \p device_type are autocast by ampkit's table on this thread: an enabled ampkit
/// region is open and torch's autocast state of the device type is on.
bool is_autocast_enabled(c10::DeviceType device_type);

/// torch's autocast dtype of \p device_type on this thread (`at::autocast::get_autocast_dtype`):
/// the innermost region's dtype inside a region, torch's default (CPU bf16, CUDA fp16) outside.
c10::ScalarType get_autocast_dtype(c10::DeviceType device_type);

/// Whether the weight cache is on for this thread (torch's `is_autocast_cache_enabled`).
bool is_autocast_cache_enabled();

/// How many ampkit regions are open on this thread.
int autocast_nesting_depth();

/// Number of weight casts cached on this thread.
std::size_t autocast_cache_size();

/// Drops this thread's cached weight casts (done anyway when the outermost region exits).
void clear_autocast_cache();

}  // namespace ampkit
