#pragma once
// Shared by the Catch2 tests.

#include <ampkit/ampkit.h>

#include <torch/torch.h>
// c10's glog-style CHECK would otherwise shadow Catch's (and abort instead of reporting).
#undef CHECK
#include <catch2/catch.hpp>

#include <string>

namespace ampkit_test {

// Bitwise equality: same dtype, shape and bits (NaNs included).
inline bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() && at::equal(a, b);
}

// Restores the policy tables when a test that edits them ends, also on failure.
struct ResetPoliciesOnExit {
  ~ResetPoliciesOnExit() { ampkit::reset_policies(); }
};

// The text of the c10::Error that `fn` throws ("" if none).
template <class F>
std::string error_of(F&& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

}  // namespace ampkit_test
