#include "test_helpers.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "autocast_region.h"

#include <atomic>
#include <random>
#include <thread>

using ampkit::AutocastGuard;
using ampkit::CastPolicy;
using ampkit_test::bitwise_equal;
using ampkit_test::error_of;
using ampkit_test::ResetPoliciesOnExit;
using Catch::Matchers::Contains;

// Custom operators that ampkit knows nothing about until a test gives them a policy.
TORCH_LIBRARY(ampkit_test, m) {
  m.def("scale2(Tensor x) -> Tensor", [](const at::Tensor& x) { return x * 2; });
  m.def("scale3(Tensor x) -> Tensor", [](const at::Tensor& x) { return x * 3; });
}

namespace {

at::Tensor call_scale2(const at::Tensor& x) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ampkit_test::scale2", "").typed<at::Tensor(const at::Tensor&)>();
  return op.call(x);
}

bool key_included() { return c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::AutocastPrivateUse1); }
bool key_excluded() { return c10::impl::tls_is_dispatch_key_excluded(c10::DispatchKey::AutocastPrivateUse1); }

}  // namespace

TEST_CASE("each policy casts as torch does, bitwise against casting by hand", "[autocast]") {
  ResetPoliciesOnExit reset;
  torch::manual_seed(0);
  const auto dtype = GENERATE(at::kBFloat16, at::kHalf);
  INFO("autocast dtype " << dtype);
  auto a = torch::randn({16, 16});
  auto b = torch::randn({16, 16});

  SECTION("lower_precision_fp") {
    at::Tensor out;
    {
      AutocastGuard guard(c10::kCPU, dtype);
      out = torch::mm(a, b);
    }
    CHECK(bitwise_equal(out, torch::mm(a.to(dtype), b.to(dtype))));
    // Tensor? arguments are cast too.
    auto bias = torch::randn({16});
    {
      AutocastGuard guard(c10::kCPU, dtype);
      out = torch::linear(a, b, bias);
    }
    CHECK(bitwise_equal(out, torch::linear(a.to(dtype), b.to(dtype), bias.to(dtype))));
  }
  SECTION("fp32") {
    auto x = a.to(dtype), y = b.to(dtype);
    at::Tensor out;
    {
      AutocastGuard guard(c10::kCPU, dtype);
      out = torch::mse_loss(x, y);
    }
    CHECK(bitwise_equal(out, torch::mse_loss(x.to(at::kFloat), y.to(at::kFloat))));
  }
  SECTION("fp32_set_opt_dtype fills an absent dtype only") {
    ampkit::set_policy("aten::softmax.int", c10::kCPU, CastPolicy::fp32_set_opt_dtype);
    auto x = a.to(dtype);
    at::Tensor out, explicit_dtype;
    {
      AutocastGuard guard(c10::kCPU, dtype);
      out = torch::softmax(x, 1);
      explicit_dtype = torch::softmax(x, 1, at::kDouble);
    }
    CHECK(bitwise_equal(out, torch::softmax(x, 1, at::kFloat)));
    CHECK(explicit_dtype.scalar_type() == at::kDouble);
  }
  SECTION("fp32_append_dtype calls the dtype overload") {
    ampkit::set_policy("aten::norm.Scalar", c10::kCPU, CastPolicy::fp32_append_dtype);
    auto x = a.to(dtype);
    at::Tensor out;
    {
      AutocastGuard guard(c10::kCPU, dtype);
      out = at::norm(x, 2);
    }
    CHECK(bitwise_equal(out, at::norm(x, c10::optional<at::Scalar>(2), at::kFloat)));
  }
  SECTION("promote runs in the widest input type") {
    auto low = a.to(dtype);
    at::Tensor mixed, same;
    {
      AutocastGuard guard(c10::kCPU, dtype);
      mixed = torch::cat({low, b});
      same = torch::cat({low, low});
    }
    CHECK(bitwise_equal(mixed, torch::cat({low.to(at::kFloat), b})));
    CHECK(bitwise_equal(same, torch::cat({low, low})));
  }
  SECTION("banned refuses to run") {
    ampkit::set_policy("aten::binary_cross_entropy", c10::kCPU, CastPolicy::banned);
    auto p = torch::rand({4}), t = torch::rand({4});
    AutocastGuard guard(c10::kCPU, dtype);
    CHECK_THAT(error_of([&] { torch::binary_cross_entropy(p, t); }),
               Contains("'aten::binary_cross_entropy' is banned under autocast on cpu") &&
                   Contains("binary_cross_entropy_with_logits"));
  }
}

TEST_CASE("promote refuses fp16 mixed with bf16, as torch does", "[autocast]") {
  auto h = torch::randn({4}, at::kHalf), b = torch::randn({4}, at::kBFloat16);
  AutocastGuard guard(c10::kCPU, at::kBFloat16);
  CHECK_THAT(error_of([&] { torch::cat({b, h}); }), Contains("expects floating inputs of torch.bfloat16"));
}

TEST_CASE("float64, integer and other-device inputs are untouched", "[autocast]") {
  auto d = torch::randn({8, 8}, at::kDouble);
  auto i = torch::randint(0, 5, {8, 8}, at::kLong);
  AutocastGuard guard(c10::kCPU, at::kBFloat16);
  CHECK(torch::mm(d, d).scalar_type() == at::kDouble);
  CHECK(torch::mm(i, i).scalar_type() == at::kLong);
  CHECK(bitwise_equal(torch::mm(d, d), [&] {
    c10::impl::ExcludeDispatchKeyGuard off(c10::DispatchKey::AutocastPrivateUse1);
    return torch::mm(d, d);
  }()));
  // A CUDA-only guard leaves CPU tensors alone.
  AutocastGuard cuda_guard(c10::kCUDA, at::kHalf);
  CHECK(torch::mm(torch::randn({4, 4}), torch::randn({4, 4})).scalar_type() == at::kBFloat16);
}

TEST_CASE("ops outside the table run unchanged", "[autocast]") {
  auto x = torch::randn({8}, at::kBFloat16);
  AutocastGuard guard(c10::kCPU);
  CHECK(torch::relu(x).scalar_type() == at::kBFloat16);
  CHECK(torch::relu(torch::randn({8})).scalar_type() == at::kFloat);
}

TEST_CASE("guards nest and restore the state exactly", "[autocast]") {
  auto a = torch::randn({4, 4}), b = torch::randn({4, 4});
  const bool inc0 = key_included(), exc0 = key_excluded();
  CHECK_FALSE(ampkit::is_autocast_enabled(c10::kCPU));
  {
    AutocastGuard outer(c10::kCPU, at::kBFloat16);
    CHECK(ampkit::is_autocast_enabled(c10::kCPU));
    CHECK(ampkit::autocast_nesting_depth() == 1);
    CHECK(torch::mm(a, b).scalar_type() == at::kBFloat16);
    {
      AutocastGuard inner(c10::kCPU, at::kHalf);
      CHECK(ampkit::get_autocast_dtype(c10::kCPU) == at::kHalf);
      CHECK(torch::mm(a, b).scalar_type() == at::kHalf);
      {
        AutocastGuard off(c10::kCPU, at::kHalf, /*enabled=*/false);
        CHECK_FALSE(ampkit::is_autocast_enabled(c10::kCPU));
        CHECK(torch::mm(a, b).scalar_type() == at::kFloat);
        CHECK(ampkit::autocast_nesting_depth() == 3);
      }
      CHECK(torch::mm(a, b).scalar_type() == at::kHalf);
    }
    CHECK(ampkit::get_autocast_dtype(c10::kCPU) == at::kBFloat16);
    CHECK(torch::mm(a, b).scalar_type() == at::kBFloat16);
  }
  CHECK_FALSE(ampkit::is_autocast_enabled(c10::kCPU));
  CHECK(ampkit::get_autocast_dtype(c10::kCPU) == at::kBFloat16);  // torch's default again
  CHECK(ampkit::autocast_nesting_depth() == 0);
  CHECK(key_included() == inc0);
  CHECK(key_excluded() == exc0);
  CHECK(torch::mm(a, b).scalar_type() == at::kFloat);
}

TEST_CASE("torch sees a guard as its own autocast region, and restores its state after", "[autocast]") {
  auto a = torch::randn({4, 4}), b = torch::randn({4, 4});
  const auto dtype = GENERATE(at::kBFloat16, at::kHalf);
  const bool cache = GENERATE(true, false);
  CHECK_FALSE(at::autocast::is_autocast_enabled(c10::kCPU));
  {
    AutocastGuard guard(c10::kCPU, dtype, true, cache);
    CHECK(at::autocast::is_autocast_enabled(c10::kCPU));
    CHECK(at::autocast::get_autocast_dtype(c10::kCPU) == dtype);
    CHECK(at::autocast::is_autocast_cache_enabled() == cache);
    CHECK_FALSE(at::autocast::is_autocast_enabled(c10::kCUDA));
    // Cast once, by ampkit: bitwise the hand cast, although torch's kernels are not excluded.
    CHECK(bitwise_equal(torch::mm(a, b), torch::mm(a.to(dtype), b.to(dtype))));
  }
  CHECK_FALSE(at::autocast::is_autocast_enabled(c10::kCPU));
  CHECK(at::autocast::get_autocast_dtype(c10::kCPU) == at::kBFloat16);
  CHECK(at::autocast::is_autocast_cache_enabled());
}

TEST_CASE("torch's own state changed inside a guard is obeyed, and the table still decides", "[autocast]") {
  ResetPoliciesOnExit reset;
  auto a = torch::randn({4, 4}), b = torch::randn({4, 4});
  AutocastGuard guard(c10::kCPU, at::kBFloat16);
  SECTION("torch.autocast(enabled=False) inside: fp32") {
    at::autocast::set_autocast_enabled(c10::kCPU, false);
    CHECK(torch::mm(a, b).scalar_type() == at::kFloat);
    at::autocast::set_autocast_enabled(c10::kCPU, true);
  }
  SECTION("torch.autocast(dtype=float16) inside: fp16, per ampkit's table") {
    at::autocast::set_autocast_dtype(c10::kCPU, at::kHalf);
    CHECK(bitwise_equal(torch::mm(a, b), torch::mm(a.to(at::kHalf), b.to(at::kHalf))));
    ampkit::set_policy("aten::mm", c10::kCPU, CastPolicy::fp32);
    CHECK(torch::mm(a, b).scalar_type() == at::kFloat);
    at::autocast::set_autocast_dtype(c10::kCPU, at::kBFloat16);
  }
}

TEST_CASE("a device type without a table gets torch's own autocast, as under torch.autocast", "[autocast]") {
  auto a = torch::randn({4, 4}), b = torch::randn({4, 4});
  {
    AutocastGuard guard(c10::kXPU, at::kBFloat16);
    CHECK(at::autocast::is_autocast_enabled(c10::kXPU));
    CHECK(at::autocast::get_autocast_dtype(c10::kXPU) == at::kBFloat16);
    CHECK_FALSE(ampkit::is_autocast_enabled(c10::kXPU));  // no ampkit table for it
    CHECK_FALSE(key_included());
    CHECK(torch::mm(a, b).scalar_type() == at::kFloat);  // CPU ops untouched
  }
  CHECK_FALSE(at::autocast::is_autocast_enabled(c10::kXPU));
}

TEST_CASE("a guard inside torch's own autocast region restores it on exit", "[autocast]") {
  auto a = torch::randn({4, 4}), b = torch::randn({4, 4});
  at::autocast::set_autocast_enabled(c10::kCPU, true);
  at::autocast::set_autocast_dtype(c10::kCPU, at::kHalf);
  {
    AutocastGuard guard(c10::kCPU, at::kBFloat16);
    CHECK(at::autocast::get_autocast_dtype(c10::kCPU) == at::kBFloat16);
    CHECK(bitwise_equal(torch::mm(a, b), torch::mm(a.to(at::kBFloat16), b.to(at::kBFloat16))));
  }
  CHECK(at::autocast::is_autocast_enabled(c10::kCPU));
  CHECK(at::autocast::get_autocast_dtype(c10::kCPU) == at::kHalf);
  CHECK(torch::mm(a, b).scalar_type() == at::kHalf);  // torch's own kernel again
  at::autocast::set_autocast_enabled(c10::kCPU, false);
  at::autocast::set_autocast_dtype(c10::kCPU, at::kBFloat16);
}

TEST_CASE("a throw inside a guard restores the state", "[autocast]") {
  const bool inc0 = key_included(), exc0 = key_excluded();
  try {
    AutocastGuard outer(c10::kCPU, at::kBFloat16);
    AutocastGuard inner(c10::kCPU, at::kHalf);
    throw std::runtime_error("boom");
  } catch (const std::runtime_error&) {
  }
  CHECK(ampkit::autocast_nesting_depth() == 0);
  CHECK_FALSE(ampkit::is_autocast_enabled(c10::kCPU));
  CHECK(key_included() == inc0);
  CHECK(key_excluded() == exc0);
  CHECK(ampkit::autocast_cache_size() == 0);
  CHECK_FALSE(at::autocast::is_autocast_enabled(c10::kCPU));
  CHECK(torch::mm(torch::randn({2, 2}), torch::randn({2, 2})).scalar_type() == at::kFloat);
}

TEST_CASE("bad guard arguments are refused and change nothing", "[autocast]") {
  CHECK_THAT(error_of([] { AutocastGuard g(c10::kCPU, at::kFloat); }),
             Contains("expected dtype torch.float16 or torch.bfloat16 (or enabled=false), got torch.float32"));
  CHECK_THAT(error_of([] { AutocastGuard g(c10::kCPU, at::kDouble); }), Contains("got torch.float64"));
  CHECK_THAT(error_of([] { AutocastGuard g(c10::kMeta, at::kHalf); }),
             Contains("expected a device type that torch's autocast supports") && Contains("got 'meta'"));
  CHECK(ampkit::autocast_nesting_depth() == 0);
  CHECK_FALSE(ampkit::is_autocast_enabled(c10::kCPU));
  CHECK_FALSE(at::autocast::is_autocast_enabled(c10::kCPU));
  // As in torch, any dtype goes when the region is disabled (the enabled=use_amp idiom).
  AutocastGuard off(c10::kCPU, at::kFloat, /*enabled=*/false);
  CHECK(torch::mm(torch::randn({2, 2}), torch::randn({2, 2})).scalar_type() == at::kFloat);
}

namespace {

// The thread state a region can change, as torch and ampkit report it.
struct ThreadAutocastState {
  bool cpu_enabled, cuda_enabled, cache, key_included, key_excluded;
  c10::ScalarType cpu_dtype, cuda_dtype;
  bool operator==(const ThreadAutocastState& o) const {  // C++17: no defaulted comparison
    return cpu_enabled == o.cpu_enabled && cuda_enabled == o.cuda_enabled && cache == o.cache &&
           key_included == o.key_included && key_excluded == o.key_excluded && cpu_dtype == o.cpu_dtype &&
           cuda_dtype == o.cuda_dtype;
  }
};

ThreadAutocastState thread_state() {
  return {at::autocast::is_autocast_enabled(c10::kCPU),
          at::autocast::is_autocast_enabled(c10::kCUDA),
          at::autocast::is_autocast_cache_enabled(),
          key_included(),
          key_excluded(),
          at::autocast::get_autocast_dtype(c10::kCPU),
          at::autocast::get_autocast_dtype(c10::kCUDA)};
}

struct RegionArgs {
  c10::DeviceType device;
  c10::ScalarType dtype;
  bool enabled;
  std::optional<bool> cache;
};

// The oracle: the state with the given regions open, whatever order others were left in, is the
// original state with each open region's settings applied in the order they were entered.
ThreadAutocastState expected_state(ThreadAutocastState s, const std::vector<RegionArgs>& open) {
  for (const auto& r : open) {
    (r.device == c10::kCPU ? s.cpu_enabled : s.cuda_enabled) = r.enabled;
    (r.device == c10::kCPU ? s.cpu_dtype : s.cuda_dtype) = r.dtype;
    s.cache = *r.cache;
    if (r.enabled) {
      s.key_included = true;
      s.key_excluded = false;
    }
  }
  return s;
}

}  // namespace

TEST_CASE("regions left in any order restore the thread's state", "[autocast]") {
  using ampkit::detail::enter_autocast;
  using ampkit::detail::exit_autocast;
  const auto original = thread_state();
  auto a = torch::randn({4, 4}), b = torch::randn({4, 4});
  SECTION("the outer region left first: the inner one stays in effect, then all is restored") {
    auto outer = enter_autocast(c10::kCPU, at::kBFloat16, true, std::nullopt);
    auto inner = enter_autocast(c10::kCPU, at::kHalf, true, false);
    exit_autocast(outer);
    CHECK(torch::mm(a, b).scalar_type() == at::kHalf);
    CHECK(ampkit::autocast_nesting_depth() == 1);
    exit_autocast(inner);
    CHECK(thread_state() == original);
    CHECK(torch::mm(a, b).scalar_type() == at::kFloat);
  }
  SECTION("regions of two device types: leaving one ends exactly its own effect") {
    auto cpu = enter_autocast(c10::kCPU, at::kBFloat16, true, std::nullopt);
    auto cuda = enter_autocast(c10::kCUDA, at::kHalf, true, std::nullopt);
    exit_autocast(cpu);
    CHECK_FALSE(at::autocast::is_autocast_enabled(c10::kCPU));
    CHECK(torch::mm(a, b).scalar_type() == at::kFloat);
    CHECK(at::autocast::is_autocast_enabled(c10::kCUDA));
    exit_autocast(cuda);
    CHECK(thread_state() == original);
  }
  SECTION("a region is left once") {
    auto r = enter_autocast(c10::kCPU, at::kBFloat16, true, std::nullopt);
    exit_autocast(r);
    CHECK_THAT(error_of([&] { exit_autocast(r); }), Contains("expected an open region, got one that was already left"));
    CHECK(thread_state() == original);
  }
  SECTION("random orders, checked against the oracle after every step") {
    std::mt19937 rng(1234);
    for (int round = 0; round < 200; ++round) {
      std::vector<std::pair<ampkit::detail::AutocastRegionPtr, RegionArgs>> open;
      const int n = 1 + static_cast<int>(rng() % 5);
      for (int i = 0; i < n; ++i) {
        RegionArgs args{rng() % 2 ? c10::kCPU : c10::kCUDA, rng() % 2 ? at::kHalf : at::kBFloat16, rng() % 4 != 0,
                        rng() % 3 == 0 ? std::optional<bool>() : std::optional<bool>(rng() % 2 == 0)};
        auto region = enter_autocast(args.device, args.dtype, args.enabled, args.cache);
        // cache_enabled unset means the flag as it was on entry (torch's None), a value of its own.
        if (!args.cache) args.cache = at::autocast::is_autocast_cache_enabled();
        open.emplace_back(region, args);
        std::vector<RegionArgs> now;
        for (auto& [r, a2] : open) now.push_back(a2);
        REQUIRE(thread_state() == expected_state(original, now));
      }
      while (!open.empty()) {
        const size_t k = rng() % open.size();
        exit_autocast(open[k].first);
        open.erase(open.begin() + static_cast<std::ptrdiff_t>(k));
        std::vector<RegionArgs> now;
        for (auto& [r, a2] : open) now.push_back(a2);
        REQUIRE(thread_state() == expected_state(original, now));
      }
      REQUIRE(ampkit::autocast_nesting_depth() == 0);
      REQUIRE(ampkit::autocast_cache_size() == 0);
    }
  }
}

TEST_CASE("a region left on another thread is closed by its own thread", "[autocast][concurrency]") {
  const auto original = thread_state();
  auto r = ampkit::detail::enter_autocast(c10::kCPU, at::kBFloat16, true, std::nullopt);
  std::string error;
  std::thread([&] { error = error_of([&] { ampkit::detail::exit_autocast(r); }); }).join();
  CHECK_THAT(error, Contains("expected to leave the region on the thread that entered it"));
  CHECK(at::autocast::is_autocast_enabled(c10::kCPU));  // that thread could not change this one's state
  {
    AutocastGuard fresh(c10::kCPU, at::kHalf);  // entering closes the abandoned region first
    CHECK(ampkit::autocast_nesting_depth() == 1);
    CHECK(torch::mm(torch::randn({2, 2}), torch::randn({2, 2})).scalar_type() == at::kHalf);
  }
  CHECK(thread_state() == original);
  SECTION("a heap guard destroyed on another thread does not throw, and is closed the same way") {
    auto* guard = new AutocastGuard(c10::kCPU, at::kBFloat16);
    std::thread([&] { delete guard; }).join();
    CHECK(ampkit::autocast_nesting_depth() == 1);
    {
      AutocastGuard fresh(c10::kCPU);
    }
    CHECK(thread_state() == original);
    CHECK(ampkit::autocast_nesting_depth() == 0);
  }
}

TEST_CASE("the default dtype is torch's autocast dtype of the device", "[autocast]") {
  AutocastGuard cpu(c10::kCPU);
  CHECK(ampkit::get_autocast_dtype(c10::kCPU) == at::kBFloat16);
  AutocastGuard cuda(c10::kCUDA);
  CHECK(ampkit::get_autocast_dtype(c10::kCUDA) == at::kHalf);
}

TEST_CASE("guards are thread-local: two threads with different guards at once", "[autocast][concurrency]") {
  auto a = torch::randn({16, 16}), b = torch::randn({16, 16});
  const auto want_bf16 = torch::mm(a.to(at::kBFloat16), b.to(at::kBFloat16));
  const auto want_fp16 = torch::mm(a.to(at::kHalf), b.to(at::kHalf));
  const auto want_fp32 = torch::mm(a, b);
  std::atomic<int> ready{0};
  std::atomic<int> failures{0};
  auto worker = [&](std::optional<c10::ScalarType> dtype, const at::Tensor& want) {
    std::optional<AutocastGuard> guard;
    if (dtype) guard.emplace(c10::kCPU, *dtype);
    ready++;
    while (ready.load() < 3) std::this_thread::yield();
    for (int i = 0; i < 200; ++i) {
      if (!bitwise_equal(torch::mm(a, b), want)) failures++;
    }
  };
  std::thread t1(worker, at::kBFloat16, want_bf16);
  std::thread t2(worker, at::kHalf, want_fp16);
  std::thread t3(worker, std::nullopt, want_fp32);
  t1.join();
  t2.join();
  t3.join();
  CHECK(failures.load() == 0);
  CHECK_FALSE(ampkit::is_autocast_enabled(c10::kCPU));  // nothing leaked into this thread
}

TEST_CASE("table edits take effect while guards are alive, alongside other threads", "[autocast][concurrency]") {
  ResetPoliciesOnExit reset;
  auto x = torch::randn({8}, at::kBFloat16);
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0};
  const auto as_listed = torch::relu(x.to(at::kFloat));  // fp32 policy
  const auto as_unlisted = torch::relu(x);               // no entry: runs in bf16
  std::thread runner([&] {
    AutocastGuard g(c10::kCPU);
    while (!stop) {
      const auto y = torch::relu(x);
      if (!bitwise_equal(y, as_listed) && !bitwise_equal(y, as_unlisted)) bad++;
    }
  });
  AutocastGuard g(c10::kCPU);
  for (int i = 0; i < 200; ++i) {
    ampkit::set_policy("aten::relu", c10::kCPU, CastPolicy::fp32);
    CHECK(torch::relu(x).scalar_type() == at::kFloat);
    ampkit::remove_policy("aten::relu", c10::kCPU);
    CHECK(torch::relu(x).scalar_type() == at::kBFloat16);
  }
  stop = true;
  runner.join();
  CHECK(bad.load() == 0);
}

TEST_CASE("a custom operator gets a policy at run time", "[autocast]") {
  ResetPoliciesOnExit reset;
  auto x = torch::randn({8});
  auto low = x.to(at::kBFloat16);
  {
    AutocastGuard g(c10::kCPU);
    CHECK(call_scale2(x).scalar_type() == at::kFloat);  // no entry yet
  }
  ampkit::set_policy("ampkit_test::scale2", c10::kCPU, CastPolicy::lower_precision_fp);
  {
    AutocastGuard g(c10::kCPU);
    CHECK(bitwise_equal(call_scale2(x), low * 2));
  }
  ampkit::set_policy("ampkit_test::scale2", c10::kCPU, CastPolicy::fp32);
  {
    AutocastGuard g(c10::kCPU);
    CHECK(bitwise_equal(call_scale2(low), low.to(at::kFloat) * 2));
  }
  CHECK(call_scale2(low).scalar_type() == at::kBFloat16);  // outside the guard
}

TEST_CASE("grads reach fp32 leaves in fp32", "[autocast]") {
  auto w = torch::randn({8, 8}, torch::requires_grad());
  auto x = torch::randn({4, 8});
  at::Tensor y;
  {
    AutocastGuard g(c10::kCPU);
    y = torch::mm(x, w);
    CHECK(y.scalar_type() == at::kBFloat16);
  }
  y.to(at::kFloat).sum().backward();
  REQUIRE(w.grad().defined());
  CHECK(w.grad().scalar_type() == at::kFloat);
  // The same as autograd through a hand-made cast.
  auto w2 = w.detach().clone().requires_grad_();
  torch::mm(x.to(at::kBFloat16), w2.to(at::kBFloat16)).to(at::kFloat).sum().backward();
  CHECK(bitwise_equal(w.grad(), w2.grad()));
}

TEST_CASE("the weight cache: once per region, cleared on exit, no growth", "[autocast]") {
  auto w = torch::randn({8, 8}, torch::requires_grad());
  auto x = torch::randn({4, 8});
  SECTION("a weight is cast once per region, across forward and backward") {
    at::Tensor y1, y2;
    {
      AutocastGuard g(c10::kCPU);
      y1 = torch::mm(x, w);
      y2 = torch::mm(x, w);
      CHECK(ampkit::autocast_cache_size() == 1);
      // Both products hang off the same cast node of w.
      auto cast1 = y1.grad_fn()->next_edges().at(1).function;
      auto cast2 = y2.grad_fn()->next_edges().at(1).function;
      CHECK(cast1.get() == cast2.get());
      // Inputs that are not leaf weights are not cached.
      auto h = torch::mm(torch::mm(x, w), w.t());
      CHECK(ampkit::autocast_cache_size() == 1);  // w.t() is a view: cast anew, not cached
      (void)h;
    }
    CHECK(ampkit::autocast_cache_size() == 0);
    (y1 + y2).to(at::kFloat).sum().backward();
    CHECK(w.grad().scalar_type() == at::kFloat);
  }
  SECTION("nested regions share the cache until the outermost exits") {
    AutocastGuard outer(c10::kCPU);
    torch::mm(x, w);
    {
      AutocastGuard inner(c10::kCPU);
      torch::mm(x, w);
      CHECK(ampkit::autocast_cache_size() == 1);
    }
    CHECK(ampkit::autocast_cache_size() == 1);
  }
  SECTION("cache_enabled=false caches nothing") {
    AutocastGuard g(c10::kCPU, at::kBFloat16, true, /*cache_enabled=*/false);
    torch::mm(x, w);
    CHECK(ampkit::autocast_cache_size() == 0);
  }
  SECTION("torch's cache_enabled flag set inside a region is obeyed") {
    AutocastGuard g(c10::kCPU);
    at::autocast::set_autocast_cache_enabled(false);
    torch::mm(x, w);
    CHECK(ampkit::autocast_cache_size() == 0);
    at::autocast::set_autocast_cache_enabled(true);
  }
  SECTION("no growth over 1000 iterations") {
    std::size_t peak = 0;
    for (int i = 0; i < 1000; ++i) {
      AutocastGuard g(c10::kCPU);
      auto y = torch::mm(x, w);
      peak = std::max(peak, ampkit::autocast_cache_size());
      y.to(at::kFloat).sum().backward();
    }
    CHECK(peak == 1);
    CHECK(ampkit::autocast_cache_size() == 0);
  }
}

TEST_CASE("the weight cache and grad mode: a cast cached under no_grad keeps the gradient path", "[autocast]") {
  // torch's cached_cast since pytorch#158232: the cached cast is always made with grad mode on,
  // so a metrics pass under no_grad does not cut the weight off the next training pass.
  auto w = torch::randn({8, 8}, torch::requires_grad());
  auto x = torch::randn({4, 8});
  const auto want = torch::mm(x.to(at::kBFloat16), w.detach().to(at::kBFloat16));
  SECTION("no_grad first, then grad") {
    at::Tensor y;
    {
      AutocastGuard g(c10::kCPU);
      {
        torch::NoGradGuard no_grad;
        CHECK_FALSE(torch::mm(x, w).requires_grad());
      }
      CHECK(ampkit::autocast_cache_size() == 1);
      y = torch::mm(x, w);
    }
    REQUIRE(y.requires_grad());
    CHECK(bitwise_equal(y, want));
    y.to(at::kFloat).sum().backward();
    REQUIRE(w.grad().defined());
    auto w2 = w.detach().clone().requires_grad_();
    torch::mm(x.to(at::kBFloat16), w2.to(at::kBFloat16)).to(at::kFloat).sum().backward();
    CHECK(bitwise_equal(w.grad(), w2.grad()));
  }
  SECTION("grad first, then the cached cast reused under no_grad") {
    AutocastGuard g(c10::kCPU);
    auto y1 = torch::mm(x, w);
    torch::NoGradGuard no_grad;
    auto y2 = torch::mm(x, w);
    CHECK(ampkit::autocast_cache_size() == 1);
    CHECK(y1.requires_grad());
    CHECK_FALSE(y2.requires_grad());
    CHECK(bitwise_equal(y2, want));
  }
  SECTION("inference mode caches nothing, and the next pass still trains") {
    at::Tensor y;
    {
      AutocastGuard g(c10::kCPU);
      {
        c10::InferenceMode inference;
        CHECK(bitwise_equal(torch::mm(x, w), want));
      }
      CHECK(ampkit::autocast_cache_size() == 0);
      y = torch::mm(x, w);
    }
    REQUIRE(y.requires_grad());
    y.to(at::kFloat).sum().backward();
    CHECK(w.grad().defined());
  }
}

TEST_CASE("an op's first policy is set while other threads call it", "[autocast][concurrency]") {
  // The first set_policy of an op builds its entry and registers ampkit's kernel while callers run:
  // each call sees the op either without or with its policy, never a half-built entry (TSan job).
  ResetPoliciesOnExit reset;
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ampkit_test::scale3", "").typed<at::Tensor(const at::Tensor&)>();
  auto x = torch::randn({16});
  const auto plain = x * 3;
  const auto cast = x.to(at::kBFloat16) * 3;
  std::atomic<bool> start{false}, stop{false};
  std::atomic<int> bad{0}, calls{0};
  std::vector<std::thread> callers;
  for (int t = 0; t < 3; ++t) {
    callers.emplace_back([&] {
      AutocastGuard g(c10::kCPU);
      while (!start) std::this_thread::yield();
      while (!stop) {
        const auto y = op.call(x);
        if (!bitwise_equal(y, plain) && !bitwise_equal(y, cast)) bad++;
        calls++;
      }
    });
  }
  start = true;
  while (calls.load() < 50) std::this_thread::yield();
  ampkit::set_policy("ampkit_test::scale3", c10::kCPU, CastPolicy::lower_precision_fp);
  for (int i = 0; i < 50; ++i) {
    ampkit::set_policy("ampkit_test::scale3", c10::kCPU, i % 2 ? CastPolicy::fp32 : CastPolicy::lower_precision_fp);
  }
  const int seen = calls.load();
  while (calls.load() < seen + 50) std::this_thread::yield();
  stop = true;
  for (auto& t : callers) t.join();
  CHECK(bad.load() == 0);
  AutocastGuard g(c10::kCPU);
  ampkit::set_policy("ampkit_test::scale3", c10::kCPU, CastPolicy::lower_precision_fp);
  CHECK(bitwise_equal(op.call(x), cast));
}
