#include "test_helpers.h"

#include "autocast_kernel.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <set>

using ampkit::CastPolicy;
using ampkit_test::bitwise_equal;
using ampkit_test::error_of;
using ampkit_test::ResetPoliciesOnExit;
using Catch::Matchers::Contains;

namespace {

// The ops torch's autocast key for \p device has a kernel for, less those torch serves with kernels
// of its own that are no cast policy (ampkit leaves them to torch: _cudnn_rnn in CUDA builds).
std::set<std::string> ops_with_kernel_for(c10::DispatchKey key, c10::DeviceType device) {
  std::set<std::string> out;
  for (const auto& name : c10::Dispatcher::singleton().getAllOpNames()) {
    auto op = c10::Dispatcher::singleton().findOp(name);
    const auto full = name.overload_name.empty() ? name.name : name.name + "." + name.overload_name;
    if (op && op->hasKernelForDispatchKey(key) && !ampkit::detail::torch_own_kernels(device).count(full)) {
      out.insert(full);
    }
  }
  return out;
}

std::set<std::string> keys_of(const ampkit::PolicyMap& m) {
  std::set<std::string> out;
  for (const auto& [k, v] : m) out.insert(k);
  return out;
}

}  // namespace

TEST_CASE("default tables list exactly the ops torch's own autocast registers", "[cast_policy]") {
  SECTION("cpu") {
    CHECK(keys_of(ampkit::default_policies(c10::kCPU)) ==
          ops_with_kernel_for(c10::DispatchKey::AutocastCPU, c10::kCPU));
  }
  SECTION("cuda") {
    CHECK(keys_of(ampkit::default_policies(c10::kCUDA)) ==
          ops_with_kernel_for(c10::DispatchKey::AutocastCUDA, c10::kCUDA));
  }
  SECTION("torch's own kernels stay torch's") {
    CHECK(ampkit::detail::torch_own_kernels(c10::kCUDA) == std::set<std::string>{"aten::_cudnn_rnn"});
    CHECK(ampkit::detail::torch_own_kernels(c10::kCPU).empty());
    CHECK_FALSE(ampkit::get_policy("aten::_cudnn_rnn", c10::kCUDA).has_value());
  }
  SECTION("policies of well-known ops") {
    CHECK(ampkit::get_policy("aten::mm", c10::kCPU) == CastPolicy::lower_precision_fp);
    CHECK(ampkit::get_policy("aten::mse_loss", c10::kCPU) == CastPolicy::fp32);
    CHECK(ampkit::get_policy("aten::cat", c10::kCPU) == CastPolicy::promote);
    CHECK(ampkit::get_policy("aten::softmax.int", c10::kCUDA) == CastPolicy::fp32_set_opt_dtype);
    CHECK(ampkit::get_policy("aten::norm.Scalar", c10::kCUDA) == CastPolicy::fp32_append_dtype);
    CHECK(ampkit::get_policy("aten::binary_cross_entropy", c10::kCUDA) == CastPolicy::banned);
    CHECK(ampkit::get_policy("aten::pow.Tensor_Scalar", c10::kCUDA) == CastPolicy::fp32);
    CHECK_FALSE(ampkit::get_policy("aten::relu", c10::kCPU).has_value());
  }
  SECTION("the live tables start as the defaults") {
    CHECK(ampkit::list_policies(c10::kCPU) == ampkit::default_policies(c10::kCPU));
    CHECK(ampkit::list_policies(c10::kCUDA) == ampkit::default_policies(c10::kCUDA));
  }
}

TEST_CASE("policy names round-trip", "[cast_policy]") {
  for (auto p : ampkit::all_cast_policies()) CHECK(ampkit::cast_policy_from_string(ampkit::to_string(p)) == p);
  CHECK(ampkit::all_cast_policies().size() == 6);
  CHECK_THAT(error_of([] { ampkit::cast_policy_from_string("fp64"); }),
             Contains("expected a cast policy name") && Contains("got 'fp64'"));
}

TEST_CASE("tables are edited at run time", "[cast_policy]") {
  ResetPoliciesOnExit reset;
  ampkit::set_policy("aten::relu", c10::kCPU, CastPolicy::fp32);
  CHECK(ampkit::get_policy("aten::relu", c10::kCPU) == CastPolicy::fp32);
  CHECK_FALSE(ampkit::get_policy("aten::relu", c10::kCUDA).has_value());
  CHECK(ampkit::list_policies(c10::kCPU).at("aten::relu") == CastPolicy::fp32);

  ampkit::set_policy("aten::mm", c10::kCPU, CastPolicy::fp32);
  CHECK(ampkit::get_policy("aten::mm", c10::kCPU) == CastPolicy::fp32);

  CHECK(ampkit::remove_policy("aten::relu", c10::kCPU));
  CHECK_FALSE(ampkit::remove_policy("aten::relu", c10::kCPU));
  CHECK_FALSE(ampkit::get_policy("aten::relu", c10::kCPU).has_value());

  ampkit::reset_policies(c10::kCPU);
  CHECK(ampkit::list_policies(c10::kCPU) == ampkit::default_policies(c10::kCPU));

  ampkit::set_policy("aten::mm", c10::kCUDA, CastPolicy::fp32);
  ampkit::set_policy("aten::mm", c10::kCPU, CastPolicy::fp32);
  ampkit::reset_policies();
  CHECK(ampkit::list_policies(c10::kCPU) == ampkit::default_policies(c10::kCPU));
  CHECK(ampkit::list_policies(c10::kCUDA) == ampkit::default_policies(c10::kCUDA));
}

TEST_CASE("refused edits name the problem and leave the table unchanged", "[cast_policy]") {
  ResetPoliciesOnExit reset;
  ampkit::set_policy("aten::relu", c10::kCPU, CastPolicy::fp32);
  const auto before_cpu = ampkit::list_policies(c10::kCPU);
  const auto before_cuda = ampkit::list_policies(c10::kCUDA);

  SECTION("malformed names") {
    for (const char* bad : {"mm", "aten::", "::mm", "aten:mm", "aten::mm.", "aten::mm.a.b", "aten::m m", ""}) {
      INFO(bad);
      CHECK_THAT(error_of([&] { ampkit::set_policy(bad, c10::kCPU, CastPolicy::fp32); }),
                 Contains("expected op as 'namespace::name'") && Contains(std::string("got '") + bad + "'"));
      CHECK_THAT(error_of([&] { ampkit::get_policy(bad, c10::kCPU); }), Contains("expected op as"));
      CHECK_THAT(error_of([&] { ampkit::remove_policy(bad, c10::kCPU); }), Contains("expected op as"));
    }
  }
  SECTION("unknown operators") {
    CHECK_THAT(error_of([] { ampkit::set_policy("aten::no_such_op", c10::kCPU, CastPolicy::fp32); }),
               Contains("expected an operator registered with the PyTorch dispatcher, got 'aten::no_such_op'"));
    CHECK_THAT(error_of([] { ampkit::set_policy("nons::thing", c10::kCPU, CastPolicy::fp32); }),
               Contains("got 'nons::thing'"));
    // An overloaded name without its overload lists the overloads.
    CHECK_THAT(error_of([] { ampkit::set_policy("aten::pow", c10::kCPU, CastPolicy::fp32); }),
               Contains("aten::pow.Tensor_Scalar"));
    CHECK_THAT(error_of([] { ampkit::remove_policy("aten::no_such_op", c10::kCPU); }),
               Contains("got 'aten::no_such_op'"));
  }
  SECTION("in-place and out= operators") {
    CHECK_THAT(error_of([] { ampkit::set_policy("aten::add_.Tensor", c10::kCPU, CastPolicy::fp32); }),
               Contains("expected an out-of-place operator, got 'aten::add_.Tensor'") && Contains("'self'"));
    CHECK_THAT(error_of([] { ampkit::set_policy("aten::mm.out", c10::kCPU, CastPolicy::lower_precision_fp); }),
               Contains("got 'aten::mm.out'") && Contains("'out' is mutable"));
  }
  SECTION("operators without tensor arguments") {
    CHECK_THAT(error_of([] { ampkit::set_policy("aten::scalar_tensor", c10::kCPU, CastPolicy::fp32); }),
               Contains("expected an operator with a Tensor") && Contains("'aten::scalar_tensor'"));
  }
  SECTION("policies that do not fit the schema") {
    CHECK_THAT(error_of([] { ampkit::set_policy("aten::mm", c10::kCPU, CastPolicy::fp32_set_opt_dtype); }),
               Contains("fp32_set_opt_dtype expects") && Contains("'aten::mm'"));
    CHECK_THAT(error_of([] { ampkit::set_policy("aten::mm", c10::kCPU, CastPolicy::fp32_append_dtype); }),
               Contains("fp32_append_dtype expects an overload of 'aten::mm'"));
    CHECK_THAT(error_of([] { ampkit::set_policy("aten::mm", c10::kCPU, static_cast<CastPolicy>(42)); }),
               Contains("expected a CastPolicy, got the value 42"));
  }
  SECTION("device types without a table") {
    CHECK_THAT(error_of([] { ampkit::set_policy("aten::mm", c10::kMeta, CastPolicy::fp32); }),
               Contains("expected device_type 'cpu' or 'cuda'") && Contains("got 'meta'"));
    CHECK_THAT(error_of([] { ampkit::list_policies(c10::kXLA); }), Contains("got 'xla'"));
    CHECK_THAT(error_of([] { ampkit::reset_policies(c10::kMPS); }), Contains("got 'mps'"));
    CHECK_FALSE(ampkit::has_policy_table(c10::kMeta));
  }
  CHECK(ampkit::list_policies(c10::kCPU) == before_cpu);
  CHECK(ampkit::list_policies(c10::kCUDA) == before_cuda);
}

TEST_CASE("policies that fit: dtype overloads are found", "[cast_policy]") {
  ResetPoliciesOnExit reset;
  ampkit::set_policy("aten::norm.Scalar", c10::kCPU, CastPolicy::fp32_append_dtype);
  ampkit::set_policy("aten::norm.ScalarOpt_dim", c10::kCPU, CastPolicy::fp32_append_dtype);
  ampkit::set_policy("aten::sum", c10::kCPU, CastPolicy::fp32_set_opt_dtype);
  ampkit::set_policy("aten::softmax.int", c10::kCPU, CastPolicy::fp32_set_opt_dtype);
  CHECK(ampkit::get_policy("aten::norm.Scalar", c10::kCPU) == CastPolicy::fp32_append_dtype);
  CHECK(ampkit::get_policy("aten::sum", c10::kCPU) == CastPolicy::fp32_set_opt_dtype);
  // Which overload was found shows in what runs: each call equals its dtype overload, by hand.
  const auto x = torch::randn({4, 5}).to(at::kBFloat16);
  at::Tensor scalar, dim, sum;
  {
    ampkit::AutocastGuard g(c10::kCPU);
    scalar = at::norm(x, 2);                                     // norm.Scalar -> norm.ScalarOpt_dtype
    dim = at::norm(x, std::optional<at::Scalar>(3), {1}, true);  // norm.ScalarOpt_dim -> .ScalarOpt_dim_dtype
    sum = at::sum(x);                                            // sum: dtype filled with float32
  }
  CHECK(bitwise_equal(scalar, at::norm(x, std::optional<at::Scalar>(2), at::kFloat)));
  CHECK(bitwise_equal(dim, at::norm(x, std::optional<at::Scalar>(3), {1}, true, at::kFloat)));
  CHECK(bitwise_equal(sum, at::sum(x, at::kFloat)));
  CHECK(scalar.scalar_type() == at::kFloat);
}

namespace {

// Boxed kernels (as Python's torch.library registers): an operator defined with typed C++ kernels
// cannot be defined again with another C++ signature while any library still registers a kernel
// for it, ampkit's included (torch keeps the first signature).
void add_first_two(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  auto args = torch::jit::last(*stack, 4);
  at::Tensor out = args[0].toTensor() + args[1].toTensor();
  torch::jit::drop(*stack, 4);
  torch::jit::push(*stack, std::move(out));
}
void twice(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  at::Tensor out = torch::jit::pop(*stack).toTensor() * 2;
  torch::jit::push(*stack, std::move(out));
}

std::unique_ptr<torch::Library> define_redef(bool four_args) {
  auto lib = std::make_unique<torch::Library>(torch::Library::DEF, "ampkit_redef", std::nullopt, __FILE__, __LINE__);
  if (four_args) {
    lib->def("f(Tensor a, Tensor b, Tensor[] c, ScalarType? dtype=None) -> Tensor",
             torch::CppFunction::makeFromBoxedFunction<&add_first_two>());
  } else {
    lib->def("f(Tensor a) -> Tensor", torch::CppFunction::makeFromBoxedFunction<&twice>());
  }
  return lib;
}

at::Tensor call_redef(const std::vector<c10::IValue>& args) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("ampkit_redef::f", "");
  torch::jit::Stack stack(args.begin(), args.end());
  op.callBoxed(&stack);
  return stack.back().toTensor();
}

}  // namespace

TEST_CASE("an operator defined again with other arguments is never run with its old entry", "[cast_policy]") {
  ResetPoliciesOnExit reset;
  using ampkit::AutocastGuard;
  auto x = torch::randn({8});
  auto lib = define_redef(true);
  ampkit::set_policy("ampkit_redef::f", c10::kCPU, CastPolicy::lower_precision_fp);
  ampkit::set_policy("ampkit_redef::f", c10::kCUDA, CastPolicy::fp32_set_opt_dtype);
  {
    AutocastGuard g(c10::kCPU);
    CHECK(bitwise_equal(call_redef({x, x, c10::List<at::Tensor>({x}), c10::IValue()}),
                        x.to(at::kBFloat16) + x.to(at::kBFloat16)));
  }
  SECTION("called before ampkit rebuilt the entry: runs uncast, reads nothing of the old schema") {
    AutocastGuard g(c10::kCPU);  // entered before the redefinition; the entry is rebuilt at the next entry
    lib.reset();                 // the definition is gone; ampkit's kernel stays registered under the name
    lib = define_redef(false);
    CHECK(bitwise_equal(call_redef({x}), x * 2));
  }
  SECTION("rebuilt at the next region: the fitting policy applies, the other is dropped with a reason") {
    lib.reset();
    lib = define_redef(false);
    AutocastGuard g(c10::kCPU);
    CHECK(bitwise_equal(call_redef({x}), x.to(at::kBFloat16) * 2));
    CHECK(ampkit::get_policy("ampkit_redef::f", c10::kCPU) == CastPolicy::lower_precision_fp);
    CHECK_FALSE(ampkit::get_policy("ampkit_redef::f", c10::kCUDA).has_value());  // needs a dtype argument
  }
  lib.reset();
}

TEST_CASE("the device types with a table come from one list", "[cast_policy]") {
  using ampkit::detail::kPolicyDevices;
  CHECK(ampkit::policy_device_types() == std::vector<c10::DeviceType>{c10::kCPU, c10::kCUDA});
  for (int d = 0; d < ampkit::detail::kNumPolicyDevices; ++d) {
    CHECK(ampkit::policy_device_types()[d] == kPolicyDevices[d].type);
    CHECK(ampkit::detail::policy_device_index(kPolicyDevices[d].type) == d);
    CHECK(ampkit::detail::policy_device_type(d) == kPolicyDevices[d].type);
    CHECK(ampkit::has_policy_table(kPolicyDevices[d].type));
  }
  CHECK(ampkit::detail::policy_device_index(c10::kXPU) == -1);
  CHECK(ampkit::detail::torch_autocast_key(ampkit::detail::policy_device_index(c10::kCPU)) ==
        c10::DispatchKey::AutocastCPU);
  CHECK(ampkit::detail::torch_autocast_key(ampkit::detail::policy_device_index(c10::kCUDA)) ==
        c10::DispatchKey::AutocastCUDA);
  CHECK(ampkit::detail::kTorchAutocastKeys ==
        c10::DispatchKeySet({c10::DispatchKey::AutocastCPU, c10::DispatchKey::AutocastCUDA}));
}
