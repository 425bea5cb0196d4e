#pragma once
// Internal: the two places outside diagnostics.cpp that tell a live PrecisionReport or
// OverflowLocator something only they know. Each costs a relaxed load and a branch when no tool
// is alive, on paths that already do much more (a cast, a GradScaler::scale call).

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <atomic>
#include <cstddef>
#include <string>

namespace ampkit::detail {

// How many diagnostic sessions (reports and locators) are alive in the process.
extern std::atomic<int> live_diagnostic_sessions;

void note_cast_slow(const at::Tensor& from, const at::Tensor& to, bool cached);
void note_loss_scale_slow(const at::Tensor& scale);

// autocast's cast() made \p to from \p from (or took it from the weight cache): counted for the op
// whose kernel is running on this thread.
inline void note_cast(const at::Tensor& from, const at::Tensor& to, bool cached) {
  if (C10_UNLIKELY(live_diagnostic_sessions.load(std::memory_order_relaxed) > 0)) note_cast_slow(from, to, cached);
}

// A GradScaler multiplied outputs by \p scale: gradients of this backward pass carry it.
inline void note_loss_scale(const at::Tensor& scale) {
  if (C10_UNLIKELY(live_diagnostic_sessions.load(std::memory_order_relaxed) > 0)) note_loss_scale_slow(scale);
}

// ModuleScope's two halves, for the Python bindings (module hooks push and pop).
void push_module_scope(std::string name);
// Ends the innermost scope, if it is \p expected (any when null); returns whether it did.
bool pop_module_scope(const std::string* expected);
// How many scopes are open on this thread; ends those above \p depth (scopes a KeyboardInterrupt left).
std::size_t module_scope_depth();
void truncate_module_scopes(std::size_t depth);

}  // namespace ampkit::detail
