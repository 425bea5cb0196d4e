#include "test_helpers.h"

#include <ampkit/low_precision.h>

#include "optim_lowp_cuda.h"

#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/optim/adamw.h>
#include <torch/serialize.h>

#include <map>
#include <sstream>
#include <utility>
#include <string>
#include <vector>

using ampkit_test::bitwise_equal;
using ampkit_test::error_of;
namespace ao = ampkit::optim;

namespace {

// Multiples of 16 elements: torch's fused Adam takes them all through its vectorized loop, whose
// arithmetic the master kernel reproduces bitwise (tests/python/test_low_precision.py has the rest).
std::vector<at::Tensor> low_params(at::ScalarType dtype, uint64_t seed = 0) {
  torch::manual_seed(seed);
  std::vector<at::Tensor> ps;
  for (auto sizes : {std::vector<int64_t>{16, 8}, {48}, {1024}}) {
    ps.push_back(torch::randn(sizes).to(dtype).requires_grad_());
  }
  return ps;
}

void set_low_grads(std::vector<at::Tensor>& ps, uint64_t seed, double scale = 1.0) {
  torch::manual_seed(seed);
  for (auto& p : ps) p.mutable_grad() = (torch::randn(p.sizes()) * scale).to(p.scalar_type());
}

}  // namespace

TEST_CASE("master AdamW equals torch's fused AdamW on float32 masters, bitwise", "[optim][low_precision]") {
  for (const auto dtype : {at::kBFloat16, at::kHalf}) {
    auto ps = low_params(dtype);
    std::vector<at::Tensor> masters;
    for (const auto& p : ps) masters.push_back(p.detach().to(at::kFloat).requires_grad_());
    ao::AdamW opt(ps, ao::AdamWOptions(1e-2).weight_decay(0.1).master_weights(true));
    ao::AdamW ref(masters, ao::AdamWOptions(1e-2).weight_decay(0.1));  // fused, float32
    for (int it = 0; it < 5; ++it) {
      set_low_grads(ps, 10 + it, 256.0);
      for (size_t i = 0; i < ps.size(); ++i) masters[i].mutable_grad() = ps[i].grad().to(at::kFloat);
      const auto scale = torch::full({1}, 256.0);
      const auto inf = torch::full({1}, it == 2 ? 1.0 : 0.0);
      opt.step_scaled(scale, inf);
      ref.step_scaled(scale, inf);
      for (size_t i = 0; i < ps.size(); ++i) {
        const auto& st = static_cast<ao::AdamParamState&>(*opt.state().at(ps[i].unsafeGetTensorImpl()));
        const auto& rs = static_cast<ao::AdamParamState&>(*ref.state().at(masters[i].unsafeGetTensorImpl()));
        CHECK(st.master().scalar_type() == at::kFloat);
        CHECK(bitwise_equal(st.master(), masters[i].detach()));
        CHECK(bitwise_equal(st.exp_avg(), rs.exp_avg()));
        CHECK(bitwise_equal(st.exp_avg_sq(), rs.exp_avg_sq()));
        CHECK(bitwise_equal(st.step(), rs.step()));
        CHECK(bitwise_equal(ps[i].detach(), masters[i].detach().to(dtype)));
      }
    }
  }
}

TEST_CASE("master and stochastic-rounding optimizers save and load, and continue bitwise", "[optim][low_precision]") {
  auto run = [](auto make) {
    auto a = low_params(at::kBFloat16);
    auto opt_a = make(a);
    for (int it = 0; it < 3; ++it) {
      set_low_grads(a, 20 + it);
      opt_a->step();
    }
    std::stringstream buffer;
    {
      torch::serialize::OutputArchive out;
      opt_a->save(out);
      out.save_to(buffer);
    }
    std::vector<at::Tensor> b;
    for (const auto& p : a) b.push_back(p.detach().clone().requires_grad_());
    auto opt_b = make(b);
    torch::serialize::InputArchive in;
    in.load_from(buffer);
    opt_b->load(in);
    for (int it = 3; it < 6; ++it) {
      set_low_grads(a, 20 + it);
      set_low_grads(b, 20 + it);
      opt_a->step();
      opt_b->step();
    }
    for (size_t i = 0; i < a.size(); ++i) CHECK(bitwise_equal(a[i], b[i]));
  };
  SECTION("AdamW with masters") {
    run([](std::vector<at::Tensor>& ps) {
      return std::make_unique<ao::AdamW>(ps, ao::AdamWOptions(1e-2).master_weights(true));
    });
  }
  SECTION("AdamW with stochastic rounding and bf16 states") {
    run([](std::vector<at::Tensor>& ps) {
      return std::make_unique<ao::AdamW>(
          ps, ao::AdamWOptions(1e-2).stochastic_rounding(true).state_dtype(at::kBFloat16).seed(5));
    });
  }
  SECTION("SGD with momentum and masters") {
    run([](std::vector<at::Tensor>& ps) {
      return std::make_unique<ao::SGD>(ps, ao::SGDOptions(0.1).momentum(0.9).dampening(0.1).master_weights(true));
    });
  }
  SECTION("SGD with stochastic rounding") {
    run([](std::vector<at::Tensor>& ps) {
      return std::make_unique<ao::SGD>(ps, ao::SGDOptions(0.1).momentum(0.9).stochastic_rounding(true).seed(5));
    });
  }
}

TEST_CASE("a loaded master keeps float32", "[optim][low_precision]") {
  auto a = low_params(at::kBFloat16);
  ao::AdamW opt(a, ao::AdamWOptions(1e-2).master_weights(true));
  set_low_grads(a, 1);
  opt.step();
  std::stringstream buffer;
  torch::serialize::OutputArchive out;
  opt.save(out);
  out.save_to(buffer);
  ao::AdamW again(a, ao::AdamWOptions(1e-2).master_weights(true));
  torch::serialize::InputArchive in;
  in.load_from(buffer);
  again.load(in);
  const auto& st = static_cast<ao::AdamParamState&>(*again.state().at(a[0].unsafeGetTensorImpl()));
  CHECK(st.master().scalar_type() == at::kFloat);
  CHECK(st.exp_avg().scalar_type() == at::kFloat);
}

TEST_CASE("stochastic rounding is reproducible with a seed and unbiased", "[optim][low_precision]") {
  auto run = [](int64_t seed) {
    auto ps = std::vector<at::Tensor>{torch::ones({100000}, at::kBFloat16).requires_grad_()};
    ao::SGD opt(ps, ao::SGDOptions(1.0).stochastic_rounding(true).seed(seed));
    for (int it = 0; it < 10; ++it) {
      ps[0].mutable_grad() = torch::full({100000}, -std::ldexp(1.0, -10), at::kBFloat16);
      opt.step();
    }
    return ps[0].detach();
  };
  const auto a = run(1), b = run(1), c = run(2);
  CHECK(bitwise_equal(a, b));
  CHECK_FALSE(bitwise_equal(a, c));
  const double mean = a.to(at::kDouble).mean().item<double>();
  CHECK(std::abs(mean - (1.0 + 10 * std::ldexp(1.0, -10))) < 5 * 10 * std::ldexp(1.0, -8) / std::sqrt(100000.0));
}

TEST_CASE("low-precision options are checked", "[optim][low_precision]") {
  auto ps = low_params(at::kBFloat16);
  CHECK_THAT(error_of([&] { ao::AdamW(ps, ao::AdamWOptions().master_weights(true).stochastic_rounding(true)); }),
             Catch::Contains("AdamW: expected at most one of master_weights and stochastic_rounding, got both"));
  CHECK_THAT(error_of([&] { ao::SGD(ps, ao::SGDOptions(0.1).stochastic_rounding(true).state_dtype(at::kHalf)); }),
             Catch::Contains("SGD: expected state_dtype float32 or bfloat16, got Half"));
  auto half = low_params(at::kHalf);
  CHECK_THAT(error_of([&] { ao::Adam(half, ao::AdamOptions().stochastic_rounding(true)); }),
             Catch::Contains("Adam: expected bfloat16 or float32 parameters with stochastic_rounding (fp16 needs "
                             "master_weights), got CPUHalfType of shape [16, 8] on cpu (group 0, index 0)"));
}

TEST_CASE("cast_model keeps norm layers in float32, decides before casting", "[low_precision]") {
  torch::nn::Sequential model(torch::nn::Linear(4, 8), torch::nn::LayerNorm(torch::nn::LayerNormOptions({8})),
                              torch::nn::BatchNorm1d(8), torch::nn::Linear(8, 2));
  const auto before = model->parameters();
  ampkit::cast_model(*model);
  const auto params = model->named_parameters();
  CHECK(params["0.weight"].scalar_type() == at::kBFloat16);
  CHECK(params["3.bias"].scalar_type() == at::kBFloat16);
  CHECK(params["1.weight"].scalar_type() == at::kFloat);
  CHECK(params["2.weight"].scalar_type() == at::kFloat);
  CHECK(model->named_buffers()["2.running_mean"].scalar_type() == at::kFloat);
  for (size_t i = 0; i < before.size(); ++i) CHECK(before[i].is_same(model->parameters()[i]));

  torch::nn::Sequential other(torch::nn::Linear(4, 4), torch::nn::Linear(4, 4));
  CHECK_THAT(error_of([&] { ampkit::cast_model(*other, at::kDouble); }),
             Catch::Contains("cast_model: expected dtype BFloat16 or Half, got Double"));
  CHECK_THROWS(ampkit::cast_model(*other, at::kHalf, [](const std::string& name, const torch::nn::Module&) -> bool {
    if (name == "1") throw std::runtime_error("predicate failed");
    return false;
  }));
  for (const auto& p : other->parameters()) CHECK(p.scalar_type() == at::kFloat);
  ampkit::cast_model(*other, at::kHalf, [](const std::string& name, const torch::nn::Module&) { return name == "1"; });
  CHECK(other->named_parameters()["0.weight"].scalar_type() == at::kHalf);
  CHECK(other->named_parameters()["1.weight"].scalar_type() == at::kFloat);
}

TEST_CASE("the Trainer trains fp16 parameters with masters, the GradScaler and clipping", "[trainer][low_precision]") {
  torch::manual_seed(0);
  torch::nn::Sequential model(torch::nn::Linear(16, 32), torch::nn::LayerNorm(torch::nn::LayerNormOptions({32})),
                              torch::nn::Linear(32, 4));
  ampkit::cast_model(*model, at::kHalf);
  ao::AdamW opt(model->parameters(), ao::AdamWOptions(1e-2).master_weights(true));
  ampkit::Trainer trainer(*model, opt, ampkit::TrainerOptions(c10::kCPU).dtype(at::kHalf).max_grad_norm(0.5));
  REQUIRE(trainer.scaler() != nullptr);
  const auto x = torch::randn({64, 16}).to(at::kHalf);
  const auto y = torch::randn({64, 4});
  double first = 0, last = 0;
  for (int it = 0; it < 30; ++it) {
    const auto stats = trainer.step([&] { return torch::mse_loss(model->forward(x).to(at::kFloat), y); });
    REQUIRE(stats.grad_norm().defined());
    CHECK(std::isfinite(stats.grad_norm().item<double>()));
    (it == 0 ? first : last) = stats.loss().item<double>();
  }
  CHECK(last < first);
}

TEST_CASE("the CUDA kernels' launch tables cover every chunk of every tensor once, within the limits",
          "[low_precision]") {
  namespace kc = ampkit::optim::detail::cuda;
  // Empty tensors, chunk boundaries, more tensors than a table holds, and a large tensor.
  std::vector<int64_t> sizes = {0, 1, kc::kChunk, kc::kChunk + 1, 0};
  for (int i = 0; i < 2 * kc::kMaxTensors; ++i) sizes.push_back(5 + i);
  sizes.push_back(int64_t{1000} * kc::kChunk + 7);
  sizes.push_back(3);
  std::vector<kc::TensorPtrs> tensors(sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    tensors[i].numel = sizes[i];
    tensors[i].index = static_cast<std::uint32_t>(i);
  }
  std::map<std::pair<std::uint32_t, int64_t>, int> seen;
  int tables = 0;
  std::uint32_t last_tensor = 0;
  kc::for_each_table(tensors.data(), tensors.size(), [&](const kc::LaunchTable& table) {
    ++tables;
    REQUIRE(table.tensor_count > 0);
    REQUIRE(table.tensor_count <= kc::kMaxTensors);
    REQUIRE(table.first_block[0] == 0);
    for (int64_t b = 0; b < table.blocks(); ++b) {
      // The mapping block_of() makes on the device.
      const kc::Block block = kc::block_of(table, kc::Common{}, b);
      REQUIRE_FALSE(block.skip);
      REQUIRE(block.begin < block.end);
      REQUIRE(block.end <= block.t.numel);
      REQUIRE(block.end - block.begin <= kc::kChunk);
      REQUIRE(block.begin % kc::kChunk == 0);
      REQUIRE(block.t.index >= last_tensor);  // in order
      last_tensor = block.t.index;
      ++seen[{block.t.index, block.begin / kc::kChunk}];
    }
  });
  size_t expected = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const int64_t chunks = (sizes[i] + kc::kChunk - 1) / kc::kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      CHECK(seen[{static_cast<std::uint32_t>(i), c}] == 1);
      ++expected;
    }
  }
  CHECK(seen.size() == expected);
  CHECK(tables == 3);  // 2 * kMaxTensors + 5 non-empty tensors
}
