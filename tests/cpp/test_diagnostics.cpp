// ampkit::PrecisionReport, ampkit::OverflowLocator and ampkit::ModuleScope: the cases of
// tests/python/test_diagnostics.py, in C++ (module paths come from ModuleScope here).
#include "test_helpers.h"

#include <algorithm>
#include <atomic>
#include <string>
#include <thread>

using ampkit_test::ResetPoliciesOnExit;

namespace {

using Rows = std::vector<ampkit::PrecisionRecord>;

std::vector<const ampkit::PrecisionRecord*> find_rows(const Rows& rows, const std::string& op, const std::string& phase,
                                                      const std::string& module, bool nested = false) {
  std::vector<const ampkit::PrecisionRecord*> out;
  for (const auto& r : rows) {
    if (r.op == op && r.phase == phase && r.module == module && r.nested == nested) out.push_back(&r);
  }
  return out;
}
// The pointers point into \p rows: a temporary would leave them dangling.
std::vector<const ampkit::PrecisionRecord*> find_rows(Rows&& rows, const std::string& op, const std::string& phase,
                                                      const std::string& module, bool nested = false) = delete;

// Linear -> LayerNorm -> GELU -> Linear, each layer under a ModuleScope of its index.
struct LnModel {
  torch::nn::Linear fc0{16, 32};
  torch::nn::LayerNorm ln{torch::nn::LayerNormOptions({32})};
  torch::nn::GELU gelu;
  torch::nn::Linear fc3{32, 8};
  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor h;
    {
      ampkit::ModuleScope s("0");
      h = fc0->forward(x);
    }
    {
      ampkit::ModuleScope s("1");
      h = ln->forward(h);
    }
    {
      ampkit::ModuleScope s("2");
      h = gelu->forward(h);
    }
    ampkit::ModuleScope s("3");
    return fc3->forward(h);
  }
};

}  // namespace

TEST_CASE("PrecisionReport: Linear-LayerNorm-GELU-Linear under bf16", "[diagnostics]") {
  ResetPoliciesOnExit reset;
  ampkit::set_policy("aten::layer_norm", c10::kCPU, ampkit::CastPolicy::fp32);  // CUDA's default
  torch::manual_seed(0);
  LnModel model;
  const auto x = torch::randn({4, 16});
  Rows rows;
  std::string table;
  {
    ampkit::PrecisionReport report;
    torch::Tensor out;
    {
      ampkit::AutocastGuard guard(c10::kCPU, c10::kBFloat16);
      out = model.forward(x);
    }
    out.to(torch::kFloat).sum().backward();
    rows = report.rows();
    table = report.to_string();
  }
  const auto bf16 = c10::kBFloat16, fp32 = c10::kFloat;
  // The C++ Linear calls addmm(bias, x, weight.t()) itself, where Python's calls linear.
  const auto lin0 = find_rows(rows, "aten::addmm", "forward", "0");
  REQUIRE(lin0.size() == 1);
  CHECK(lin0[0]->policy == ampkit::CastPolicy::lower_precision_fp);
  CHECK(lin0[0]->in_dtypes == std::vector<c10::ScalarType>{bf16, bf16, bf16});
  CHECK(lin0[0]->arg_dtypes == std::vector<c10::ScalarType>{fp32, fp32, fp32});
  CHECK(lin0[0]->out_dtype == bf16);
  CHECK(lin0[0]->casts == 3);
  CHECK(lin0[0]->cast_bytes == 2 * (x.numel() + model.fc0->weight.numel() + model.fc0->bias.numel()));
  const auto t0 = find_rows(rows, "aten::t", "forward", "0");
  REQUIRE(t0.size() == 1);
  CHECK_FALSE(t0[0]->policy.has_value());
  CHECK(t0[0]->out_dtype == fp32);

  const auto ln = find_rows(rows, "aten::layer_norm", "forward", "1");
  REQUIRE(ln.size() == 1);
  CHECK(ln[0]->policy == ampkit::CastPolicy::fp32);
  CHECK(ln[0]->in_dtypes == std::vector<c10::ScalarType>{fp32, fp32, fp32});
  CHECK(ln[0]->arg_dtypes == std::vector<c10::ScalarType>{bf16, fp32, fp32});
  CHECK(ln[0]->out_dtype == fp32);

  const auto gelu = find_rows(rows, "aten::gelu", "forward", "2");
  REQUIRE(gelu.size() == 1);
  CHECK_FALSE(gelu[0]->policy.has_value());
  CHECK(gelu[0]->out_dtype == fp32);

  const auto lin3 = find_rows(rows, "aten::addmm", "forward", "3");
  REQUIRE(lin3.size() == 1);
  CHECK(lin3[0]->casts == 3);

  const auto mm_back = find_rows(rows, "aten::mm", "backward", "3");
  REQUIRE_FALSE(mm_back.empty());
  CHECK(mm_back[0]->in_dtypes == std::vector<c10::ScalarType>{bf16, bf16});
  CHECK_FALSE(find_rows(rows, "aten::native_layer_norm_backward", "backward", "1").empty());
  CHECK(table.find("lower_precision_fp") != std::string::npos);
  CHECK(table.find("aten::_to_copy") == std::string::npos);  // nested rows (the casts' own ops) only on request
}

TEST_CASE("OverflowLocator: a forward mm that overflows in fp16, and its fix", "[diagnostics]") {
  ResetPoliciesOnExit reset;
  const auto x = torch::full({4, 8}, 100.0);
  const auto w = torch::full({8, 8}, 300.0).requires_grad_();  // |x w| = 240000 > 65504
  auto run = [&] {
    ampkit::ModuleScope scope("block.proj");
    ampkit::AutocastGuard guard(c10::kCPU, c10::kHalf);
    return torch::mm(x, w);
  };
  std::optional<ampkit::OverflowEvent> first;
  {
    ampkit::OverflowLocator locator;
    const auto out = run();
    CHECK_FALSE(torch::isfinite(out).all().item<bool>());
    first = locator.first();
    CHECK_FALSE(locator.first_nonfinite_input().has_value());
  }
  REQUIRE(first.has_value());
  CHECK(first->op == "aten::mm");
  CHECK(first->phase == "forward");
  CHECK(first->module == "block.proj");
  CHECK(first->in_dtypes == std::vector<c10::ScalarType>{c10::kHalf, c10::kHalf});
  CHECK(first->input_absmax == std::vector<double>{100.0, 300.0});
  CHECK(first->cause == "precision");
  REQUIRE(first->suggestion.has_value());
  CHECK(first->suggestion->op == "aten::mm");
  CHECK(first->suggestion->device == c10::kCPU);
  CHECK(first->suggestion->policy == ampkit::CastPolicy::fp32);
  CHECK(first->to_string().find("ampkit::set_policy(\"aten::mm\", c10::DeviceType::CPU, ampkit::CastPolicy::fp32);") !=
        std::string::npos);

  ampkit::set_policy(first->suggestion->op, first->suggestion->device, first->suggestion->policy);
  ampkit::OverflowLocator locator;
  const auto fixed = run();
  CHECK(torch::isfinite(fixed).all().item<bool>());
  CHECK_FALSE(locator.first().has_value());
}

TEST_CASE("OverflowLocator: a backward overflow that exists only because of the loss scale", "[diagnostics]") {
  torch::manual_seed(0);
  torch::nn::Linear fc1(8, 64), fc2(64, 8);
  {
    torch::NoGradGuard no_grad;
    fc2->weight.fill_(1.0);  // fc2's input gradient: 8 x the loss scale
  }
  const auto x = torch::randn({4, 8});
  for (double scale : {1.0, 16384.0}) {
    ampkit::GradScaler scaler(ampkit::GradScalerOptions().init_scale(scale));
    ampkit::OverflowLocator locator;
    torch::Tensor loss;
    {
      ampkit::AutocastGuard guard(c10::kCPU, c10::kHalf);
      torch::Tensor h;
      {
        ampkit::ModuleScope s("fc1");
        h = fc1->forward(x);
      }
      ampkit::ModuleScope s("fc2");
      loss = fc2->forward(h).to(torch::kFloat).sum();
    }
    scaler.scale(loss).backward();  // ampkit's GradScaler tells the locator its scale
    fc1->zero_grad();
    fc2->zero_grad();
    const auto first = locator.first();
    if (scale == 1.0) {
      CHECK_FALSE(first.has_value());
      continue;
    }
    REQUIRE(first.has_value());
    CHECK(first->op == "aten::mm");
    CHECK(first->phase == "backward");
    CHECK(first->module == "fc2");
    CHECK(first->grad_fn == "AddmmBackward0");
    CHECK(first->cause == "loss_scale");
    CHECK(first->loss_scale == scale);
    CHECK_FALSE(first->suggestion.has_value());
  }
}

TEST_CASE("OverflowLocator: nothing in a finite run; reset; non-finite state it did not produce", "[diagnostics]") {
  torch::manual_seed(0);
  torch::nn::Linear fc(4, 4);
  {
    ampkit::OverflowLocator locator;
    fc->forward(torch::randn({2, 4})).sum().backward();
    CHECK_FALSE(locator.first().has_value());
    CHECK_FALSE(locator.first_nonfinite_input().has_value());
  }
  {
    torch::NoGradGuard no_grad;
    fc->weight[0][0] = std::numeric_limits<float>::quiet_NaN();  // before the locator: not its business
  }
  ampkit::OverflowLocator locator;
  fc->forward(torch::randn({2, 4}));
  CHECK_FALSE(locator.first().has_value());
  const auto entry = locator.first_nonfinite_input();
  REQUIRE(entry.has_value());
  CHECK(entry->op == "aten::addmm");
  CHECK(entry->cause == "input");
  locator.reset();
  CHECK_FALSE(locator.first_nonfinite_input().has_value());
  CHECK(ampkit_test::error_of([&] { locator.set_loss_scale(torch::ones({2})); }) ==
        "OverflowLocator::set_loss_scale: expected scale to be a one-element floating-point tensor, got Float tensor "
        "of 2 elements");
  CHECK(ampkit_test::error_of([&] { locator.set_loss_scale(at::Tensor()); }).find("got an undefined tensor") !=
        std::string::npos);
}

TEST_CASE("Diagnostics: stop() on another thread is refused; at most eight at once", "[diagnostics]") {
  ampkit::PrecisionReport report;
  std::string error;
  std::thread([&] { error = ampkit_test::error_of([&] { report.stop(); }); }).join();
  CHECK(error.find("expected stop() on the thread that created the report or locator") != std::string::npos);
  std::vector<std::unique_ptr<ampkit::OverflowLocator>> more;
  for (int i = 0; i < 7; ++i) more.push_back(std::make_unique<ampkit::OverflowLocator>());
  CHECK(ampkit_test::error_of([] {
          ampkit::OverflowLocator one_too_many;
        }).find("expected at most 8 PrecisionReport / OverflowLocator objects alive at once") != std::string::npos);
  more.clear();
  report.stop();
  report.stop();                  // a second stop does nothing
  ampkit::OverflowLocator again;  // slots are free again
  CHECK_FALSE(again.first().has_value());
}

TEST_CASE("Diagnostics: reports and locators on several threads while the tables are edited",
          "[diagnostics][concurrency]") {
  ResetPoliciesOnExit reset;
  constexpr int kThreads = 3;
  constexpr int kCalls = 20;
  std::vector<std::int64_t> mm_calls(kThreads, -1);
  std::vector<int> found(kThreads, -1);
  std::atomic<bool> done{false};
  std::thread editor([&] {
    while (!done.load()) {
      ampkit::set_policy("aten::exp", c10::kCPU, ampkit::CastPolicy::lower_precision_fp);
      ampkit::remove_policy("aten::exp", c10::kCPU);
    }
  });
  std::vector<std::thread> workers;
  for (int i = 0; i < kThreads; ++i) {
    workers.emplace_back([&, i] {
      const auto x = torch::full({4, 8}, 100.0);
      const auto w = torch::full({8, 8}, i == 0 ? 300.0 : 1.0);  // only thread 0 overflows fp16
      ampkit::PrecisionReport report;
      ampkit::OverflowLocator locator;
      for (int c = 0; c < kCalls; ++c) {
        ampkit::ModuleScope scope("worker" + std::to_string(i));
        ampkit::AutocastGuard guard(c10::kCPU, c10::kHalf);
        torch::exp(torch::mm(x, w) * 1e-6);
      }
      const Rows all = report.rows();  // find_rows points into it
      const auto rows = find_rows(all, "aten::mm", "forward", "worker" + std::to_string(i));
      mm_calls[i] = rows.size() == 1 ? rows[0]->calls : -1;
      found[i] = locator.first().has_value() ? 1 : 0;
    });
  }
  for (auto& t : workers) t.join();
  done.store(true);
  editor.join();
  for (int i = 0; i < kThreads; ++i) {
    CHECK(mm_calls[i] == kCalls);  // each report saw its own thread's calls, all of them
    CHECK(found[i] == (i == 0 ? 1 : 0));
  }
}
