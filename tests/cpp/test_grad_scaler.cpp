#include "test_helpers.h"

#include "grad_scaler_detail.h"

#include <torch/serialize.h>

#include <cfloat>
#include <cmath>
#include <functional>
#include <limits>
#include <sstream>

using ampkit::GradScaler;
using ampkit::GradScalerOptions;
using ampkit_test::bitwise_equal;
using ampkit_test::error_of;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// A two-layer MLP as plain leaf tensors, so that a control copy is one clone away.
struct Net {
  std::vector<at::Tensor> params;

  static Net make(uint64_t seed, int64_t width = 8) {
    torch::manual_seed(seed);
    Net net;
    for (auto sizes : {std::vector<int64_t>{width, width}, {width}, {width, width}, {width}}) {
      net.params.push_back((torch::randn(sizes) * 0.3).requires_grad_());
    }
    return net;
  }
  Net clone() const {
    Net copy;
    for (const auto& p : params) copy.params.push_back(p.detach().clone().requires_grad_());
    return copy;
  }
  at::Tensor forward(const at::Tensor& x) const {
    return torch::relu(x.matmul(params[0]) + params[1]).matmul(params[2]) + params[3];
  }
};

struct Batch {
  at::Tensor x, y;
};

std::vector<Batch> make_data(uint64_t seed, int n = 4, int64_t width = 8) {
  torch::manual_seed(seed);
  std::vector<Batch> data;
  for (int i = 0; i < n; ++i) data.push_back({torch::randn({8, width}), torch::randn({8, width})});
  return data;
}

at::Tensor loss_of(const Net& net, const Batch& b) { return torch::mse_loss(net.forward(b.x), b.y); }

void poison_grad(const at::Tensor& param, double value = kInf) {
  torch::NoGradGuard g;
  param.mutable_grad().view({-1})[0].fill_(value);
}

bool params_equal(const Net& a, const Net& b) {
  for (size_t i = 0; i < a.params.size(); ++i) {
    if (!bitwise_equal(a.params[i], b.params[i])) return false;
  }
  return true;
}

using MakeOptimizer = std::function<std::unique_ptr<torch::optim::Optimizer>(const std::vector<at::Tensor>&)>;

MakeOptimizer sgd(double lr = 1.0, double momentum = 0.0) {
  return [=](const std::vector<at::Tensor>& p) {
    return std::make_unique<torch::optim::SGD>(p, torch::optim::SGDOptions(lr).momentum(momentum));
  };
}
MakeOptimizer adam(double lr = 1e-2) {
  return [=](const std::vector<at::Tensor>& p) {
    return std::make_unique<torch::optim::Adam>(p, torch::optim::AdamOptions(lr));
  };
}

// One training run; with the scaler a grad is poisoned at skip_iter, without it (the control)
// the optimizer step of skip_iter is left out. PyTorch's scaling fixture.
using RunFn = std::function<void(const std::vector<Batch>&, Net&, torch::optim::Optimizer&, GradScaler&, int skip_iter,
                                 bool try_scaling_api)>;

void run_scaling_case(const RunFn& run, const MakeOptimizer& make_opt, int unskipped, int skipped) {
  const auto data = make_data(1);
  Net control = Net::make(7);
  Net scaled = control.clone();
  auto opt_control = make_opt(control.params);
  auto opt_scaled = make_opt(scaled.params);
  GradScaler scaler(GradScalerOptions().init_scale(128.0).growth_factor(2.0).growth_interval(1));
  GradScaler disabled(GradScalerOptions().enabled(false));
  run(data, control, *opt_control, disabled, 2, false);
  run(data, scaled, *opt_scaled, scaler, 2, true);
  CHECK(scaler.get_scale() == 128.0 * std::pow(2.0, unskipped) * std::pow(0.5, skipped));
  CHECK(params_equal(control, scaled));
  CHECK(scaler.steps_skipped() == skipped);
}

// Copies of Adam's per-parameter state (step count, moments), in parameter order.
std::vector<at::Tensor> adam_state(torch::optim::Adam& opt) {
  std::vector<at::Tensor> out;
  for (const auto& group : opt.param_groups()) {
    for (const auto& p : group.params()) {
      const auto& state = static_cast<torch::optim::AdamParamState&>(*opt.state().at(p.unsafeGetTensorImpl()));
      out.push_back(torch::full({}, state.step(), torch::kLong));
      out.push_back(state.exp_avg().clone());
      out.push_back(state.exp_avg_sq().clone());
    }
  }
  return out;
}

bool all_bitwise_equal(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!bitwise_equal(a[i], b[i])) return false;
  }
  return true;
}

// The sync-free test double: SGD whose update is pure tensor arithmetic on the device, gated by
// found_inf, so GradScaler must hand it the scale instead of unscaling and reading found_inf.
class ScaleAwareSGD : public torch::optim::SGD, public ampkit::ScaleAwareOptimizer {
 public:
  ScaleAwareSGD(const std::vector<at::Tensor>& params, double lr)
      : torch::optim::SGD(params, torch::optim::SGDOptions(lr)), lr_(lr) {}

  at::Tensor step(LossClosure closure = nullptr) override {
    ++plain_steps;
    return torch::optim::SGD::step(std::move(closure));
  }

  void step_scaled(const at::Tensor& grad_scale, const at::Tensor& found_inf) override {
    ++scaled_steps;
    last_grad_scale_defined = grad_scale.defined();
    torch::NoGradGuard no_grad;
    const at::Tensor keep = found_inf.eq(0).to(at::kFloat);  // 1 applies the update, 0 skips it
    for (auto& group : param_groups()) {
      for (auto& p : group.params()) {
        if (!p.grad().defined()) continue;
        at::Tensor g = grad_scale.defined() ? p.grad() / grad_scale : p.grad();
        // where() rather than multiplying by keep: inf * 0 would be NaN.
        p.sub_(at::where(keep.to(at::kBool), g * lr_, at::zeros_like(g)));
      }
    }
  }

  int plain_steps = 0;
  int scaled_steps = 0;
  bool last_grad_scale_defined = false;

 private:
  double lr_;
};

}  // namespace

TEST_CASE("GradScalerOptions: torch's defaults and chained setters", "[grad_scaler]") {
  const GradScalerOptions o;
  CHECK(o.init_scale() == 65536.0);
  CHECK(o.growth_factor() == 2.0);
  CHECK(o.backoff_factor() == 0.5);
  CHECK(o.growth_interval() == 2000);
  CHECK(o.enabled());
  CHECK(o.min_scale() == static_cast<double>(FLT_MIN));
  CHECK(ampkit::kDefaultMinScale == static_cast<double>(FLT_MIN));
  CHECK(std::isinf(o.max_scale()));
  CHECK(o.hysteresis() == 1);

  const auto c = GradScalerOptions()
                     .init_scale(8)
                     .growth_factor(4)
                     .backoff_factor(0.25)
                     .growth_interval(3)
                     .enabled(false)
                     .min_scale(1)
                     .max_scale(1024)
                     .hysteresis(2);
  CHECK(c.init_scale() == 8);
  CHECK(c.growth_factor() == 4);
  CHECK(c.backoff_factor() == 0.25);
  CHECK(c.growth_interval() == 3);
  CHECK_FALSE(c.enabled());
  CHECK(c.min_scale() == 1);
  CHECK(c.max_scale() == 1024);
  CHECK(c.hysteresis() == 2);
}

TEST_CASE("GradScalerOptions: bad options throw ValueError naming the option", "[grad_scaler]") {
  const auto message = [](const GradScalerOptions& o) { return error_of([&] { GradScaler s(o); }); };
  const auto value_error = [](const GradScalerOptions& o) {
    try {
      GradScaler s(o);
    } catch (const c10::ValueError&) {
      return true;
    } catch (...) {
    }
    return false;
  };
  CHECK(message(GradScalerOptions().growth_factor(1.0)) ==
        "GradScaler: expected growth_factor to be finite and > 1, got 1");
  CHECK(message(GradScalerOptions().growth_factor(kInf)) ==
        "GradScaler: expected growth_factor to be finite and > 1, got inf");
  CHECK(message(GradScalerOptions().backoff_factor(1.0)) == "GradScaler: expected backoff_factor in (0, 1), got 1");
  CHECK(message(GradScalerOptions().backoff_factor(0.0)) == "GradScaler: expected backoff_factor in (0, 1), got 0");
  CHECK(message(GradScalerOptions().growth_interval(0)) ==
        "GradScaler: expected growth_interval in [1, 2**31 - 1], got 0");
  CHECK(message(GradScalerOptions().hysteresis(0)) == "GradScaler: expected hysteresis in [1, 2**31 - 1], got 0");
  CHECK(message(GradScalerOptions().min_scale(0.0)) ==
        "GradScaler: expected min_scale to be > 0 and finite in float32 (the scale's type: 1.4013e-45 to "
        "3.40282e+38), got 0");
  // Checked in float32, the scale's type: 1e-50 rounds to 0, the collapse min_scale exists to prevent.
  CHECK_THAT(message(GradScalerOptions().min_scale(1e-50)), Catch::Contains("got 1e-50"));
  CHECK(message(GradScalerOptions().min_scale(4).max_scale(2).init_scale(3)) ==
        "GradScaler: expected max_scale >= min_scale (4) and finite in float32 (<= 3.40282e+38) or inf, got 2");
  CHECK_THAT(message(GradScalerOptions().max_scale(1e39)), Catch::Contains("or inf, got 1e+39"));
  CHECK(message(GradScalerOptions().init_scale(0)) ==
        "GradScaler: expected init_scale to be > 0 and finite in float32 (<= 3.40282e+38), got 0");
  CHECK_THAT(message(GradScalerOptions().init_scale(std::nan(""))), Catch::EndsWith("got nan"));
  CHECK_THAT(message(GradScalerOptions().init_scale(kInf)), Catch::EndsWith("got inf"));
  CHECK_THAT(message(GradScalerOptions().init_scale(1e39)), Catch::EndsWith("got 1e+39"));
  CHECK(message(GradScalerOptions().init_scale(2048).max_scale(1024)) ==
        "GradScaler: expected init_scale in [min_scale, max_scale] = [1.17549e-38, 1024], got 2048");
  CHECK(value_error(GradScalerOptions().growth_factor(0.5)));
  CHECK(value_error(GradScalerOptions().hysteresis(-1)));
  // Validated also when disabled: a bad option is a bug either way.
  CHECK(value_error(GradScalerOptions().enabled(false).backoff_factor(2)));
  CHECK_NOTHROW(GradScalerOptions().validate());
}

TEST_CASE("GradScaler: setters validate and leave the scaler unchanged on error", "[grad_scaler]") {
  GradScaler s(GradScalerOptions().init_scale(16));
  s.set_growth_factor(3);
  s.set_backoff_factor(0.25);
  s.set_growth_interval(5);
  s.set_hysteresis(2);
  CHECK(s.get_growth_factor() == 3);
  CHECK(s.get_backoff_factor() == 0.25);
  CHECK(s.get_growth_interval() == 5);
  CHECK(s.get_hysteresis() == 2);
  // The bounds may move past the initial scale: it only matters at construction.
  s.set_min_scale(32);
  CHECK(s.get_min_scale() == 32);
  CHECK_THROWS_AS(s.set_growth_factor(1), c10::ValueError);
  CHECK_THROWS_AS(s.set_backoff_factor(-1), c10::ValueError);
  CHECK_THROWS_AS(s.set_growth_interval(-3), c10::ValueError);
  CHECK_THROWS_AS(s.set_max_scale(8), c10::ValueError);
  CHECK_THROWS_AS(s.set_hysteresis(0), c10::ValueError);
  CHECK(s.get_growth_factor() == 3);
  CHECK(s.get_backoff_factor() == 0.25);
  CHECK(s.get_growth_interval() == 5);
  CHECK(std::isinf(s.get_max_scale()));
  CHECK(s.get_hysteresis() == 2);
}

TEST_CASE("GradScaler: the scaling fixture with SGD and Adam", "[grad_scaler]") {
  const RunFn run = [](const std::vector<Batch>& data, Net& net, torch::optim::Optimizer& opt, GradScaler& scaler,
                       int skip_iter, bool try_scaling_api) {
    for (int i = 0; i < static_cast<int>(data.size()); ++i) {
      opt.zero_grad();
      const at::Tensor loss = loss_of(net, data[i]);
      if (try_scaling_api) {
        scaler.scale(loss).backward();
        if (i == skip_iter) poison_grad(net.params[2]);
        const bool applied = scaler.step(opt);
        CHECK(applied == (i != skip_iter));
        scaler.update();
      } else {
        loss.backward();
        if (i != skip_iter) opt.step();
      }
    }
  };
  SECTION("SGD lr=1") { run_scaling_case(run, sgd(1.0), 3, 1); }
  SECTION("SGD with momentum") { run_scaling_case(run, sgd(0.1, 0.9), 3, 1); }
  SECTION("Adam") { run_scaling_case(run, adam(), 3, 1); }
}

TEST_CASE("GradScaler: clipping after unscale_", "[grad_scaler]") {
  // The inf goes in before unscale_, which is where found_inf is computed (as in PyTorch's test).
  const RunFn run = [](const std::vector<Batch>& data, Net& net, torch::optim::Optimizer& opt, GradScaler& scaler,
                       int skip_iter, bool try_scaling_api) {
    const double max_norm = 0.2;
    for (int i = 0; i < static_cast<int>(data.size()); ++i) {
      opt.zero_grad();
      const at::Tensor loss = loss_of(net, data[i]);
      if (try_scaling_api) {
        scaler.scale(loss).backward();
        if (i == skip_iter) poison_grad(net.params[2]);
        scaler.unscale_(opt);
        torch::nn::utils::clip_grad_norm_(net.params, max_norm, 2.0, /*error_if_nonfinite=*/false);
        scaler.step(opt);
        scaler.update();
      } else {
        loss.backward();
        torch::nn::utils::clip_grad_norm_(net.params, max_norm);
        if (i != skip_iter) opt.step();
      }
    }
  };
  SECTION("SGD") { run_scaling_case(run, sgd(1.0), 3, 1); }
  SECTION("Adam") { run_scaling_case(run, adam(), 3, 1); }
}

TEST_CASE("GradScaler: gradient accumulation", "[grad_scaler]") {
  const RunFn run = [](const std::vector<Batch>& data, Net& net, torch::optim::Optimizer& opt, GradScaler& scaler,
                       int skip_iter, bool try_scaling_api) {
    const int iters_to_accumulate = 2;
    for (int i = 0; i < static_cast<int>(data.size()); ++i) {
      const at::Tensor loss = loss_of(net, data[i]) / iters_to_accumulate;
      if (try_scaling_api) {
        scaler.scale(loss).backward();
      } else {
        loss.backward();
      }
      if ((i + 1) % iters_to_accumulate == 0) {
        if (try_scaling_api) {
          if (i == skip_iter + 1) poison_grad(net.params[0]);
          scaler.step(opt);
          scaler.update();
        } else if (i != skip_iter + 1) {
          opt.step();
        }
        opt.zero_grad();
      }
    }
  };
  // 4 batches, 2 optimizer steps: the one at batch 3 is skipped.
  SECTION("SGD") { run_scaling_case(run, sgd(1.0), 1, 1); }
  SECTION("Adam") { run_scaling_case(run, adam(), 1, 1); }
}

TEST_CASE("GradScaler: gradient penalty", "[grad_scaler]") {
  const RunFn run = [](const std::vector<Batch>& data, Net& net, torch::optim::Optimizer& opt, GradScaler& scaler,
                       int skip_iter, bool try_scaling_api) {
    for (int i = 0; i < static_cast<int>(data.size()); ++i) {
      opt.zero_grad();
      const at::Tensor loss = loss_of(net, data[i]);
      std::vector<at::Tensor> grads;
      if (try_scaling_api) {
        // Grads of the scaled loss, unscaled by hand (autograd.grad bypasses the optimizer).
        const auto scaled = torch::autograd::grad({scaler.scale(loss)}, net.params, {}, true, true);
        const double inv_scale = 1.0 / scaler.get_scale();
        for (const auto& g : scaled) grads.push_back(g * inv_scale);
      } else {
        grads = torch::autograd::grad({loss}, net.params, {}, true, true);
      }
      at::Tensor norm = torch::zeros({});
      for (const auto& g : grads) norm = norm + g.pow(2).sum();
      const at::Tensor total = loss + norm.sqrt();
      if (try_scaling_api) {
        scaler.scale(total).backward();
        if (i == skip_iter) poison_grad(net.params[1]);
        scaler.step(opt);
        scaler.update();
      } else {
        total.backward();
        if (i != skip_iter) opt.step();
      }
    }
  };
  SECTION("SGD") { run_scaling_case(run, sgd(0.1), 3, 1); }
  SECTION("Adam") { run_scaling_case(run, adam(), 3, 1); }
}

TEST_CASE("GradScaler: several models, optimizers and losses share one scaler", "[grad_scaler]") {
  const auto data = make_data(3);
  Net c0 = Net::make(11), c1 = Net::make(12);
  Net s0 = c0.clone(), s1 = c1.clone();
  torch::optim::SGD oc0(c0.params, torch::optim::SGDOptions(1.0));
  torch::optim::Adam oc1(c1.params, torch::optim::AdamOptions(1e-2));
  torch::optim::SGD os0(s0.params, torch::optim::SGDOptions(1.0));
  torch::optim::Adam os1(s1.params, torch::optim::AdamOptions(1e-2));
  GradScaler scaler(GradScalerOptions().init_scale(128).growth_interval(1));
  const int skip_iter = 2;
  for (int i = 0; i < static_cast<int>(data.size()); ++i) {
    for (bool scaled : {false, true}) {
      Net& n0 = scaled ? s0 : c0;
      Net& n1 = scaled ? s1 : c1;
      torch::optim::Optimizer& o0 = scaled ? static_cast<torch::optim::Optimizer&>(os0) : oc0;
      torch::optim::Optimizer& o1 = scaled ? static_cast<torch::optim::Optimizer&>(os1) : oc1;
      o0.zero_grad();
      o1.zero_grad();
      const at::Tensor y0 = n0.forward(data[i].x);
      const at::Tensor y1 = n1.forward(data[i].x);
      const at::Tensor loss0 = torch::mse_loss(0.3 * y0 + 0.7 * y1, data[i].y);
      const at::Tensor loss1 = torch::mse_loss(0.6 * y0 - 0.4 * y1, data[i].y);
      if (scaled) {
        const auto losses = scaler.scale(std::vector<at::Tensor>{loss0, loss1});
        losses[0].backward({}, /*retain_graph=*/true);
        losses[1].backward();
        if (i == skip_iter) poison_grad(n1.params[1]);
        // Only the optimizer whose grads overflowed skips; the scale backs off for both.
        CHECK(scaler.step(o0));
        CHECK(scaler.step(o1) == (i != skip_iter));
        scaler.update();
      } else {
        loss0.backward({}, true);
        loss1.backward();
        o0.step();
        if (i != skip_iter) o1.step();
      }
    }
  }
  CHECK(scaler.get_scale() == 128.0 * std::pow(2.0, 3) * std::pow(0.5, 1));
  CHECK(params_equal(c0, s0));
  CHECK(params_equal(c1, s1));
  CHECK(scaler.steps_applied() == 7);
  CHECK(scaler.steps_skipped() == 1);
}

TEST_CASE("GradScaler: skipped steps leave params and optimizer state bitwise unchanged", "[grad_scaler]") {
  Net net = Net::make(5);
  torch::optim::Adam opt(net.params, torch::optim::AdamOptions(1e-2));
  GradScaler scaler(GradScalerOptions().init_scale(64));
  const auto data = make_data(4, 2);
  // One good step creates Adam's state (exp_avg, step count), then an overflowing one.
  opt.zero_grad();
  scaler.scale(loss_of(net, data[0])).backward();
  REQUIRE(scaler.step(opt));
  scaler.update();
  const Net before = net.clone();
  const auto state_before = adam_state(opt);
  opt.zero_grad();
  scaler.scale(loss_of(net, data[1])).backward();
  poison_grad(net.params[3], -kInf);
  CHECK_FALSE(scaler.step(opt));
  scaler.update();
  CHECK(params_equal(before, net));
  CHECK(all_bitwise_equal(adam_state(opt), state_before));
  CHECK(scaler.get_scale() == 32);
  CHECK(scaler.last_step_skipped().item<bool>());
}

TEST_CASE("GradScaler: misuse errors name the call and the state", "[grad_scaler]") {
  Net net = Net::make(1);
  torch::optim::SGD opt(net.params, torch::optim::SGDOptions(0.1));
  GradScaler scaler;
  const auto batch = make_data(2, 1)[0];
  const std::string fix =
      "() but the scale is not initialized yet. This may indicate your script did not use scaler.scale(loss or "
      "outputs) earlier in the iteration.";

  SECTION("before scale()") {
    CHECK(error_of([&] { scaler.unscale_(opt); }) == "Attempted unscale_" + fix);
    CHECK(error_of([&] { scaler.step(opt); }) == "Attempted step" + fix);
    CHECK(error_of([&] { scaler.update(); }) == "Attempted update" + fix);
    CHECK(error_of([&] { scaler.update(2.0); }) == "Attempted update" + fix);
    CHECK(scaler.get_scale() == 65536.0);
    CHECK_FALSE(scaler.scale_tensor().defined());
  }
  SECTION("in the wrong order") {
    scaler.scale(loss_of(net, batch)).backward();
    scaler.unscale_(opt);
    CHECK(error_of([&] { scaler.unscale_(opt); }) ==
          "unscale_() has already been called on this optimizer since the last update().");
    scaler.step(opt);
    CHECK(error_of([&] { scaler.unscale_(opt); }) == "unscale_() is being called after step().");
    CHECK(error_of([&] { scaler.step(opt); }) == "step() has already been called since the last update().");
    CHECK(scaler.stage(opt) == ampkit::OptimizerStage::Stepped);
    scaler.update();
    CHECK(scaler.stage(opt) == ampkit::OptimizerStage::Ready);
    CHECK(error_of([&] { scaler.update(); }) ==
          "No inf checks were recorded prior to update(). Call step(optimizer) (or unscale_(optimizer)) for at "
          "least one optimizer first.");
  }
  SECTION("without grads") {
    (void)scaler.scale(loss_of(net, batch));
    const std::string no_grads =
        "step(): no inf checks were recorded for this optimizer: none of its parameters has a gradient. Call "
        "backward() on the scaled loss before step().";
    CHECK(error_of([&] { scaler.step(opt); }) == no_grads);
    // The failed call changed nothing: still Ready, nothing recorded.
    CHECK(scaler.stage(opt) == ampkit::OptimizerStage::Ready);
    CHECK(scaler.found_inf_per_device(opt).empty());
    CHECK(scaler.steps_applied() == 0);
    scaler.unscale_(opt);  // allowed, as in torch: nothing to unscale
    CHECK(error_of([&] { scaler.step(opt); }) == no_grads);
    CHECK(scaler.stage(opt) == ampkit::OptimizerStage::Unscaled);
  }
  SECTION("without grads, a scale-aware optimizer steps as under torch.amp.GradScaler") {
    // torch passes found_inf = sum([]) = 0 to such an optimizer, steps it, and its update() then
    // raises for want of inf checks.
    ampkit::optim::Adam aware(net.params, ampkit::optim::AdamOptions(1e-2));
    (void)scaler.scale(loss_of(net, batch));
    CHECK(scaler.step(aware));
    CHECK(scaler.stage(aware) == ampkit::OptimizerStage::Stepped);
    CHECK_FALSE(scaler.last_step_skipped().item<bool>());
    CHECK_THAT(error_of([&] { scaler.update(); }),
               Catch::Matchers::Contains("No inf checks were recorded prior to update()"));
  }
  SECTION("fp16 grads") {
    at::Tensor w = torch::ones({3}, torch::kHalf).requires_grad_();
    torch::optim::SGD half_opt({w}, torch::optim::SGDOptions(0.1));
    scaler.scale((w.to(torch::kFloat) * 2).sum()).backward();
    REQUIRE(w.grad().scalar_type() == torch::kHalf);
    const at::Tensor grad_before = w.grad().clone();
    CHECK_THROWS_AS(scaler.unscale_(half_opt), c10::ValueError);
    CHECK(error_of([&] { scaler.step(half_opt); }) == "Attempting to unscale FP16 gradients.");
    CHECK(bitwise_equal(w.grad(), grad_before));
    CHECK(scaler.stage(half_opt) == ampkit::OptimizerStage::Ready);
  }
  SECTION("bad new_scale") {
    (void)scaler.scale(loss_of(net, batch));
    CHECK_THROWS_AS(scaler.update(0.0), c10::ValueError);
    CHECK_THROWS_AS(scaler.update(kInf), c10::ValueError);
    CHECK_THROWS_AS(scaler.update(torch::ones({2})), c10::ValueError);
    CHECK_THROWS_AS(scaler.update(torch::ones({1}).requires_grad_()), c10::ValueError);
    CHECK_THROWS_AS(scaler.update(at::Tensor()), c10::ValueError);
    CHECK_THROWS_AS(scaler.update(torch::ones({1}, torch::kInt)), c10::ValueError);
    CHECK(error_of([&] { scaler.update(-1.0); }) ==
          "GradScaler.update: expected new_scale to be finite and in [min_scale, max_scale] = [1.17549e-38, inf], "
          "got -1");
    CHECK(scaler.get_scale() == 65536.0);
  }
  SECTION("undefined outputs") {
    CHECK_THROWS_AS(scaler.scale(at::Tensor()), c10::ValueError);
    CHECK_THROWS_AS(scaler.scale(std::vector<at::Tensor>{torch::ones({1}), at::Tensor()}), c10::ValueError);
    CHECK_FALSE(scaler.scale_tensor().defined());
  }
}

TEST_CASE("GradScaler: update(new_scale) sets the scale", "[grad_scaler]") {
  GradScaler scaler(GradScalerOptions().min_scale(2).max_scale(1024).init_scale(8));
  (void)scaler.scale(torch::ones({1}));
  scaler.update(16.0);
  CHECK(scaler.get_scale() == 16);
  scaler.update(torch::full({}, 100.0, torch::kDouble));
  CHECK(scaler.get_scale() == 100);
  CHECK_THROWS_AS(scaler.update(4096.0), c10::ValueError);
  // A tensor is read once and checked as a float (torch copies NaN, inf or negatives unchecked;
  // after a NaN every later step would be skipped).
  for (double bad : {4096.0, 0.5, -1.0, std::nan(""), kInf}) {
    CHECK_THAT(error_of([&] { scaler.update(torch::full({1}, bad)); }),
               Catch::StartsWith("GradScaler.update: expected new_scale to be finite and in [min_scale, max_scale] = "
                                 "[2, 1024], got"));
  }
  CHECK(scaler.get_scale() == 100);
}

TEST_CASE("GradScaler: scale() of one or several tensors", "[grad_scaler]") {
  GradScaler scaler(GradScalerOptions().init_scale(4));
  const at::Tensor a = torch::ones({2});
  CHECK(bitwise_equal(scaler.scale(a), torch::full({2}, 4.0)));
  CHECK(scaler.scale_tensor().dim() == 0);
  CHECK(scaler.scale_tensor().scalar_type() == torch::kFloat);
  CHECK(scaler.growth_tracker_tensor().scalar_type() == torch::kInt);
  const auto outs = scaler.scale(std::vector<at::Tensor>{a, torch::full({3}, 2.0, torch::kDouble)});
  REQUIRE(outs.size() == 2);
  CHECK(bitwise_equal(outs[1], torch::full({3}, 8.0, torch::kDouble)));
  CHECK(scaler.scale(std::vector<at::Tensor>{}).empty());
}

TEST_CASE("GradScaler: a disabled scaler is a pass-through", "[grad_scaler]") {
  GradScaler scaler(GradScalerOptions().enabled(false));
  Net net = Net::make(2);
  torch::optim::SGD opt(net.params, torch::optim::SGDOptions(0.1));
  const Net before = net.clone();
  const at::Tensor loss = loss_of(net, make_data(1, 1)[0]);
  CHECK(scaler.scale(loss).is_same(loss));
  loss.backward();
  scaler.unscale_(opt);
  poison_grad(net.params[0]);  // inf: a disabled scaler does not skip, as torch's
  CHECK(scaler.step(opt));
  CHECK(scaler.step(opt));  // no stages when disabled, as in torch
  scaler.update();
  CHECK_FALSE(torch::isfinite(net.params[0]).all().item<bool>());
  CHECK(scaler.get_scale() == 1.0);
  CHECK_FALSE(scaler.is_enabled());
  CHECK_FALSE(scaler.state_dict().has_value());
  CHECK_NOTHROW(scaler.load_state_dict(std::nullopt));
  CHECK(scaler.steps_applied() == 2);
}

TEST_CASE("GradScaler: state dict round trip, with torch's keys", "[grad_scaler]") {
  GradScaler a(GradScalerOptions().init_scale(256).growth_interval(3).hysteresis(2).max_scale(1e6));
  Net net = Net::make(3);
  torch::optim::SGD opt(net.params, torch::optim::SGDOptions(0.01));
  for (int i = 0; i < 2; ++i) {
    opt.zero_grad();
    a.scale(loss_of(net, make_data(i, 1)[0])).backward();
    a.step(opt);
    a.update();
  }
  opt.zero_grad();
  a.scale(loss_of(net, make_data(9, 1)[0])).backward();
  poison_grad(net.params[0]);
  a.step(opt);
  a.update();  // first overflow of a streak: held by hysteresis 2

  const auto sd = a.state_dict();
  REQUIRE(sd.has_value());
  CHECK(sd->scale == 256);
  CHECK(sd->growth_factor == 2);
  CHECK(sd->backoff_factor == 0.5);
  CHECK(sd->growth_interval == 3);
  CHECK(sd->growth_tracker == 0);
  CHECK(sd->min_scale == static_cast<double>(FLT_MIN));
  CHECK(sd->max_scale == 1e6);
  CHECK(sd->hysteresis == 2);
  CHECK(sd->overflow_streak == 1);

  SECTION("load_state_dict before and after the first scale()") {
    GradScaler b;
    b.load_state_dict(sd);
    CHECK(b.state_dict() == sd);
    GradScaler c;
    (void)c.scale(torch::ones({1}));
    c.load_state_dict(sd);
    CHECK(c.state_dict() == sd);
    CHECK(c.get_growth_interval() == 3);
  }
  SECTION("torch's dict (no ampkit fields) keeps ampkit's options") {
    ampkit::GradScalerState torch_sd{1024.0, 3.0, 0.25, 7, 4};
    GradScaler b(GradScalerOptions().hysteresis(3).min_scale(1));
    b.load_state_dict(torch_sd);
    CHECK(b.get_scale() == 1024);
    CHECK(b.get_growth_factor() == 3);
    CHECK(b.get_backoff_factor() == 0.25);
    CHECK(b.get_growth_interval() == 7);
    CHECK(b.get_growth_tracker() == 4);
    CHECK(b.get_hysteresis() == 3);
    CHECK(b.get_min_scale() == 1);
  }
  SECTION("archives: save/load and torch::save/torch::load") {
    std::stringstream ss;
    torch::serialize::OutputArchive out;
    a.save(out);
    out.save_to(ss);
    torch::serialize::InputArchive in;
    in.load_from(ss);
    GradScaler b;
    b.load(in);
    CHECK(b.state_dict() == sd);

    std::stringstream ss2;
    torch::save(a, ss2);
    GradScaler c;
    torch::load(c, ss2);
    CHECK(c.state_dict() == sd);
  }
  SECTION("bad dicts throw and change nothing") {
    GradScaler b(GradScalerOptions().init_scale(8));
    const auto before = b.state_dict();
    CHECK(error_of([&] { b.load_state_dict(std::nullopt); }) ==
          "The source state dict is empty, possibly because it was saved from a disabled instance of GradScaler.");
    auto bad = *sd;
    bad.growth_factor = 0.5;
    CHECK_THROWS_AS(b.load_state_dict(bad), c10::ValueError);
    bad = *sd;
    bad.scale = 0;
    CHECK(error_of([&] { b.load_state_dict(bad); }) ==
          "GradScaler.load_state_dict: expected 'scale' to be > 0 and finite in float32, got 0");
    bad = *sd;
    bad.overflow_streak = 5;
    CHECK(error_of([&] { b.load_state_dict(bad); }) ==
          "GradScaler.load_state_dict: expected '_overflow_streak' in [0, hysteresis = 2], got 5");
    bad = *sd;
    bad.growth_tracker = -1;
    CHECK_THROWS_AS(b.load_state_dict(bad), c10::ValueError);
    CHECK(b.state_dict() == before);
  }
  SECTION("an archive of a disabled scaler loads like an empty dict") {
    GradScaler disabled(GradScalerOptions().enabled(false));
    std::stringstream ss;
    torch::save(disabled, ss);
    GradScaler b;
    CHECK_THROWS_WITH(torch::load(b, ss), Catch::Contains("The source state dict is empty"));
  }
}

TEST_CASE("GradScaler: min_scale, max_scale and hysteresis", "[grad_scaler]") {
  Net net = Net::make(4);
  torch::optim::SGD opt(net.params, torch::optim::SGDOptions(0.01));
  const auto batch = make_data(5, 1)[0];
  // One iteration; overflow poisons a grad.
  const auto iterate = [&](GradScaler& s, bool overflow) {
    opt.zero_grad();
    s.scale(loss_of(net, batch)).backward();
    if (overflow) poison_grad(net.params[1]);
    s.step(opt);
    s.update();
    return s.get_scale();
  };

  SECTION("max_scale clamps growth") {
    GradScaler s(GradScalerOptions().init_scale(16).growth_interval(1).max_scale(40));
    CHECK(iterate(s, false) == 32);
    CHECK(iterate(s, false) == 40);
    CHECK(iterate(s, false) == 40);
    CHECK(iterate(s, true) == 20);
  }
  SECTION("min_scale clamps backoff") {
    GradScaler s(GradScalerOptions().init_scale(16).min_scale(5));
    CHECK(iterate(s, true) == 8);
    CHECK(iterate(s, true) == 5);
    CHECK(iterate(s, true) == 5);
  }
  SECTION("hysteresis backs off only after n overflows in a row") {
    GradScaler s(GradScalerOptions().init_scale(64).growth_interval(2).hysteresis(3));
    CHECK(iterate(s, true) == 64);
    CHECK(s.get_overflow_streak() == 1);
    CHECK(iterate(s, true) == 64);
    CHECK(iterate(s, true) == 32);
    CHECK(iterate(s, true) == 16);  // the streak goes on: every further overflow backs off
    CHECK(s.get_overflow_streak() == 3);
    CHECK(iterate(s, false) == 16);
    CHECK(s.get_overflow_streak() == 0);
    CHECK(s.get_growth_tracker() == 1);
    CHECK(iterate(s, true) == 16);  // a new streak starts, and resets the growth tracker
    CHECK(s.get_growth_tracker() == 0);
    CHECK(iterate(s, false) == 16);
    CHECK(iterate(s, false) == 32);
    CHECK(s.steps_skipped() == 5);  // held backoffs still skip the step
  }
  SECTION("set_hysteresis restarts the streak") {
    GradScaler s(GradScalerOptions().init_scale(64).hysteresis(2));
    CHECK(iterate(s, true) == 64);
    s.set_hysteresis(2);
    CHECK(iterate(s, true) == 64);
    CHECK(iterate(s, true) == 32);
  }
  SECTION("hysteresis 1 follows torch's update rule, checked against its closed form") {
    // torch's _amp_update_scale_: the scale is float32, multiplied by a double factor and rounded
    // back; a growth to a non-finite value is not applied; the tracker counts clean updates.
    GradScaler s(GradScalerOptions().init_scale(3.0).growth_factor(1.7).backoff_factor(0.3).growth_interval(2));
    float scale = 3.0f;
    int tracker = 0;
    for (int i = 0; i < 12; ++i) {
      const bool overflow = i % 5 == 3;
      iterate(s, overflow);
      if (overflow) {
        scale = static_cast<float>(static_cast<double>(scale) * 0.3);
        tracker = 0;
      } else if (++tracker == 2) {
        const auto grown = static_cast<float>(static_cast<double>(scale) * 1.7);
        if (std::isfinite(grown)) scale = grown;
        tracker = 0;
      }
      CHECK(s.scale_tensor().item<float>() == scale);
      CHECK(s.growth_tracker_tensor().item<int>() == tracker);
    }
  }
}

TEST_CASE("GradScaler: the scale never reaches inf, 0 or a denormal by default", "[grad_scaler]") {
  Net net = Net::make(6);
  torch::optim::SGD opt(net.params, torch::optim::SGDOptions(0.0));
  const auto batch = make_data(6, 1)[0];
  SECTION("growth stops below inf") {
    GradScaler s(GradScalerOptions().init_scale(std::ldexp(1.0, 126)).growth_interval(1));
    for (int i = 0; i < 3; ++i) {
      opt.zero_grad();
      // The loss itself is tiny enough that the scaled grads stay finite.
      s.scale(loss_of(net, batch) * 1e-30).backward();
      s.step(opt);
      s.update();
    }
    CHECK(s.get_scale() == std::ldexp(1.0, 127));
  }
  SECTION("backoff stops at the smallest normal float") {
    GradScaler s(GradScalerOptions().init_scale(1e-36).backoff_factor(0.01));
    for (int i = 0; i < 3; ++i) {
      opt.zero_grad();
      s.scale(loss_of(net, batch)).backward();
      poison_grad(net.params[0]);
      s.step(opt);
      s.update();
    }
    CHECK(s.get_scale() == static_cast<double>(FLT_MIN));
    CHECK(std::isnormal(s.get_scale()));
  }
}

TEST_CASE("GradScaler: sparse, bf16 and mixed-dtype grads", "[grad_scaler]") {
  SECTION("fp32 sparse grads are unscaled through their values") {
    torch::nn::Embedding emb(torch::nn::EmbeddingOptions(10, 4).sparse(true));
    torch::optim::SGD opt(emb->parameters(), torch::optim::SGDOptions(0.1));
    GradScaler scaler(GradScalerOptions().init_scale(8));
    scaler.scale(emb->forward(torch::tensor({1, 1, 3}, torch::kLong)).sum()).backward();
    REQUIRE(emb->weight.grad().is_sparse());
    scaler.unscale_(opt);
    CHECK(bitwise_equal(emb->weight.grad().to_dense().sum(), torch::full({}, 12.0f)));
    CHECK(scaler.step(opt));
  }
  SECTION("fp16 sparse grads are coalesced before the check") {
    // Two entries at one index, each finite in fp16, whose sum (80000) overflows fp16.
    const at::Tensor indices = torch::tensor({0, 0}, torch::kLong).view({1, 2});
    const at::Tensor values = torch::full({2, 2}, 40000.0, torch::kHalf);
    at::Tensor p = torch::zeros({3, 2}, torch::kHalf).requires_grad_();
    p.mutable_grad() = torch::sparse_coo_tensor(indices, values, {3, 2});
    REQUIRE_FALSE(p.grad().is_coalesced());
    const auto found = ampkit::detail::unscale_grads_({p}, torch::ones({}), /*allow_fp16=*/true);
    REQUIRE(found.size() == 1);
    CHECK(found[0].item<float>() == 1.0f);
    CHECK(p.grad().is_coalesced());
  }
  SECTION("bf16 and fp32 grads in one optimizer") {
    at::Tensor a = torch::full({4}, 1.0, torch::kBFloat16).requires_grad_();
    at::Tensor b = torch::full({4}, 1.0).requires_grad_();
    torch::optim::SGD opt({a, b}, torch::optim::SGDOptions(1.0));
    GradScaler scaler(GradScalerOptions().init_scale(1024));
    scaler.scale((a.to(torch::kFloat) * 3 + b * 5).sum()).backward();
    scaler.unscale_(opt);
    CHECK(bitwise_equal(a.grad(), torch::full({4}, 3.0, torch::kBFloat16)));
    CHECK(bitwise_equal(b.grad(), torch::full({4}, 5.0)));
    CHECK(scaler.found_inf_per_device(opt).size() == 1);
  }
}

TEST_CASE("GradScaler: the sync-free path of a ScaleAwareOptimizer", "[grad_scaler]") {
  const auto data = make_data(8, 5);
  Net control = Net::make(9);
  Net scaled = control.clone();
  torch::optim::SGD opt_control(control.params, torch::optim::SGDOptions(1.0));
  ScaleAwareSGD opt_scaled(scaled.params, 1.0);
  GradScaler ref_scaler(GradScalerOptions().init_scale(128).growth_interval(1));
  GradScaler scaler(GradScalerOptions().init_scale(128).growth_interval(1));
  for (int i = 0; i < static_cast<int>(data.size()); ++i) {
    opt_control.zero_grad();
    opt_scaled.zero_grad();
    ref_scaler.scale(loss_of(control, data[i])).backward();
    scaler.scale(loss_of(scaled, data[i])).backward();
    if (i == 2) {
      poison_grad(control.params[2]);
      poison_grad(scaled.params[2]);
    }
    const bool unscale_first = i == 3;
    if (unscale_first) {
      ref_scaler.unscale_(opt_control);
      scaler.unscale_(opt_scaled);
    }
    ref_scaler.step(opt_control);
    CHECK(scaler.step(opt_scaled));  // handed over; the skip happens on the device
    CHECK(opt_scaled.last_grad_scale_defined == !unscale_first);
    CHECK(scaler.last_step_skipped().item<bool>() == (i == 2));
    ref_scaler.update();
    scaler.update();
    CHECK(scaler.get_scale() == ref_scaler.get_scale());
  }
  CHECK(opt_scaled.plain_steps == 0);
  CHECK(opt_scaled.scaled_steps == 5);
  // Dividing by a power-of-two scale is exact: the same params as unscale-then-step.
  CHECK(params_equal(control, scaled));
  CHECK(scaler.steps_skipped() == 1);
  CHECK(scaler.steps_applied() == 4);
  CHECK(scaler.get_scale() == 128.0 * std::pow(2.0, 4) * 0.5);
}

TEST_CASE("GradScaler: grads on two devices (CUDA)", "[grad_scaler][cuda]") {
  at::Tensor on_cuda = torch::ones({4}, torch::kCUDA).requires_grad_();
  at::Tensor on_cpu = torch::ones({4}).requires_grad_();
  torch::optim::SGD opt({on_cuda, on_cpu}, torch::optim::SGDOptions(1.0));
  GradScaler scaler(GradScalerOptions().init_scale(256).growth_interval(1));
  scaler.scale((on_cuda * 2).sum() + (on_cpu * 3).sum().to(torch::kCUDA)).backward();
  scaler.unscale_(opt);
  const auto found = scaler.found_inf_per_device(opt);
  REQUIRE(found.size() == 2);
  CHECK(found[0].device() != found[1].device());
  CHECK(bitwise_equal(on_cpu.grad(), torch::full({4}, 3.0)));
  CHECK(scaler.step(opt));
  scaler.update();
  CHECK(scaler.scale_tensor().is_cuda());
  CHECK(scaler.get_scale() == 512);

  opt.zero_grad();
  scaler.scale((on_cuda * 2).sum() + (on_cpu * 3).sum().to(torch::kCUDA)).backward();
  poison_grad(on_cpu);  // an overflow on the CPU backs off the scale on CUDA
  CHECK_FALSE(scaler.step(opt));
  scaler.update();
  CHECK(scaler.get_scale() == 256);
}
