#pragma once
// Internal: the records of open autocast regions, shared by AutocastGuard, the Python binding
// (whose regions are left by explicit calls, possibly out of order or on another thread) and the
// tests. Not installed.

#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

#include <atomic>
#include <memory>
#include <optional>
#include <thread>

namespace ampkit::detail {

// One region: what it set, and what it restores when it is left. Lives as long as a handle (a
// guard, a Python region object) or the thread's stack of open regions refers to it.
struct AutocastRegion {
  c10::DeviceType device_type = c10::DeviceType::CPU;
  std::thread::id owner;  // the thread that entered it
  bool open = false;      // owner thread only
  bool sets_key = false;  // an enabled region of a device type with a table: ampkit's key included
  // Saved when entered: the values this region restores, one per piece of state it sets. When an
  // enclosing region is left before this one, its saved values pass to this one (see exit_autocast).
  bool prev_torch_enabled = false;
  c10::ScalarType prev_dtype = c10::ScalarType::Undefined;
  bool prev_cache_enabled = true;
  bool prev_key_included = false;
  bool prev_key_excluded = true;
  // Set by exit_autocast called on another thread; the owner thread closes the region at its next
  // enter or exit, since only it can change its thread-local state.
  std::atomic<bool> abandoned{false};
};

using AutocastRegionPtr = std::shared_ptr<AutocastRegion>;

// Throws c10::Error for a device type torch's autocast does not support and c10::ValueError for
// an enabled region whose dtype is not fp16 / bf16.
void check_autocast_arguments(c10::DeviceType device_type, c10::ScalarType dtype, bool enabled);

// Validates the arguments, then enters a region on the calling thread (nothing changed if it throws).
AutocastRegionPtr enter_autocast(c10::DeviceType device_type, c10::ScalarType dtype, bool enabled,
                                 std::optional<bool> cache_enabled);

// Leaves \p region, in any order: the state each piece of the thread's state would have without
// this region is restored (regions entered after it keep theirs, and restore to what this one
// restored), so that once every region is left the thread is as it was before the first. Throws
// c10::Error, changing nothing, for a region that is not open; called on another thread than the
// one that entered the region, it marks it abandoned (that thread closes it at its next enter or
// exit) and throws.
void exit_autocast(const AutocastRegionPtr& region);

// Number of regions open on this thread.
int open_autocast_regions();

}  // namespace ampkit::detail
