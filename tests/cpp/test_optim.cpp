#include "test_helpers.h"

#include "optim_detail.h"

#include <torch/serialize.h>

#include <sstream>
#include <string>
#include <type_traits>

using ampkit_test::bitwise_equal;
using ampkit_test::error_of;
namespace ao = ampkit::optim;

namespace {

std::vector<at::Tensor> make_params(uint64_t seed, at::ScalarType dtype = at::kFloat) {
  torch::manual_seed(seed);
  std::vector<at::Tensor> ps;
  for (auto sizes : {std::vector<int64_t>{33, 7}, {7}, {5, 3, 2}}) {
    ps.push_back(torch::randn(sizes).to(dtype).requires_grad_());
  }
  return ps;
}

std::vector<at::Tensor> clone_params(const std::vector<at::Tensor>& ps) {
  std::vector<at::Tensor> out;
  for (const auto& p : ps) out.push_back(p.detach().clone().requires_grad_());
  return out;
}

// Gives every param of every list the same grad (seeded), times \p factor.
void set_grads(std::initializer_list<std::vector<at::Tensor>*> lists, uint64_t seed, double factor = 1.0) {
  torch::manual_seed(seed);
  const auto& first = *lists.begin();
  for (size_t i = 0; i < first->size(); ++i) {
    const auto g = torch::randn((*first)[i].sizes()).to((*first)[i].scalar_type()) * factor;
    for (auto* l : lists) (*l)[i].mutable_grad() = g.clone();
  }
}

bool all_close(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b, double rtol = 1e-5,
               double atol = 1e-6) {
  for (size_t i = 0; i < a.size(); ++i) {
    if (!torch::allclose(a[i].to(at::kFloat), b[i].to(at::kFloat), rtol, atol)) return false;
  }
  return true;
}

bool all_bitwise(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  for (size_t i = 0; i < a.size(); ++i) {
    if (!bitwise_equal(a[i], b[i])) return false;
  }
  return true;
}

template <class Ours, class Theirs>
void check_matches_torch(Ours& ours, std::vector<at::Tensor>& a, Theirs& theirs, std::vector<at::Tensor>& b) {
  for (int it = 0; it < 6; ++it) {
    set_grads({&a, &b}, 100 + it);
    ours.step();
    theirs.step();
    REQUIRE(all_close(a, b));
  }
}

}  // namespace

TEST_CASE("optim options have torch's defaults", "[optim]") {
  CHECK(ao::AdamOptions().lr() == 1e-3);
  CHECK(ao::AdamOptions().weight_decay() == 0);
  CHECK(ao::AdamOptions().betas() == std::make_tuple(0.9, 0.999));
  CHECK(ao::AdamOptions().eps() == 1e-8);
  CHECK(ao::AdamWOptions().weight_decay() == 1e-2);
  CHECK(!ao::AdamWOptions().amsgrad());
  CHECK(ao::SGDOptions().lr() == 1e-3);
  CHECK(ao::SGDOptions().momentum() == 0);
  CHECK(!ao::SGDOptions().nesterov());
}

TEST_CASE("fused optimizers match torch::optim's non-fused ones", "[optim]") {
  auto a = make_params(1);
  auto b = clone_params(a);
  SECTION("Adam with amsgrad and weight decay") {
    ao::Adam ours(a, ao::AdamOptions(1e-2).weight_decay(0.1).amsgrad(true));
    torch::optim::Adam theirs(b, torch::optim::AdamOptions(1e-2).weight_decay(0.1).amsgrad(true));
    check_matches_torch(ours, a, theirs, b);
  }
  SECTION("AdamW") {
    ao::AdamW ours(a, ao::AdamWOptions(1e-2).betas({0.8, 0.95}).weight_decay(0.3));
    torch::optim::AdamW theirs(b, torch::optim::AdamWOptions(1e-2).betas({0.8, 0.95}).weight_decay(0.3));
    check_matches_torch(ours, a, theirs, b);
  }
  SECTION("SGD with Nesterov momentum") {
    ao::SGD ours(a, ao::SGDOptions(0.1).momentum(0.9).nesterov(true).weight_decay(0.01));
    torch::optim::SGD theirs(b, torch::optim::SGDOptions(0.1).momentum(0.9).nesterov(true).weight_decay(0.01));
    check_matches_torch(ours, a, theirs, b);
  }
  SECTION("SGD with dampening") {
    ao::SGD ours(a, ao::SGDOptions(0.1).momentum(0.9).dampening(0.3));
    torch::optim::SGD theirs(b, torch::optim::SGDOptions(0.1).momentum(0.9).dampening(0.3));
    check_matches_torch(ours, a, theirs, b);
  }
  SECTION("plain SGD") {
    ao::SGD ours(a, ao::SGDOptions(0.1));
    torch::optim::SGD theirs(b, torch::optim::SGDOptions(0.1));
    check_matches_torch(ours, a, theirs, b);
  }
}

TEST_CASE("a step with found_inf set changes nothing, step counters included", "[optim]") {
  auto a = make_params(2);
  const auto found = torch::ones({});
  const auto scale = torch::full({}, 8.0);
  SECTION("AdamW") {
    ao::AdamW opt(a, ao::AdamWOptions(0.1).amsgrad(true));
    set_grads({&a}, 3);
    opt.step();
    const auto before = clone_params(a);
    auto& st = static_cast<ao::AdamParamState&>(*opt.state().at(a[0].unsafeGetTensorImpl()));
    const auto m = st.exp_avg().clone(), v = st.exp_avg_sq().clone(), vmax = st.max_exp_avg_sq().clone();
    set_grads({&a}, 4, 8.0);
    opt.step_scaled(scale, found);
    CHECK(all_bitwise(a, before));
    CHECK(st.step().item<float>() == 1.0f);
    CHECK(st.step().scalar_type() == at::kFloat);
    CHECK(bitwise_equal(st.exp_avg(), m));
    CHECK(bitwise_equal(st.exp_avg_sq(), v));
    CHECK(bitwise_equal(st.max_exp_avg_sq(), vmax));
  }
  SECTION("SGD with momentum, skipped first step") {
    for (double dampening : {0.0, 0.5}) {
      auto p = make_params(5);
      auto ref = clone_params(p);
      ao::SGD opt(p, ao::SGDOptions(0.1).momentum(0.9).dampening(dampening));
      torch::optim::SGD theirs(ref, torch::optim::SGDOptions(0.1).momentum(0.9).dampening(dampening));
      for (auto& t : p) t.mutable_grad() = torch::full_like(t, std::numeric_limits<float>::infinity());
      opt.step_scaled(scale, found);
      CHECK(all_bitwise(p, ref));
      for (const auto& t : p) {
        auto it = opt.state().find(t.unsafeGetTensorImpl());
        if (it != opt.state().end()) {
          CHECK(torch::count_nonzero(static_cast<ao::SGDParamState&>(*it->second).momentum_buffer()).item<int64_t>() ==
                0);
        }
      }
      // Afterwards it trains exactly like an optimizer that never saw the skipped step.
      for (int it = 0; it < 3; ++it) {
        set_grads({&p, &ref}, 10 + it);
        for (auto& t : p) t.mutable_grad().mul_(8.0);
        opt.step_scaled(scale, torch::zeros({}));
        theirs.step();
        CHECK(all_close(p, ref));
      }
    }
  }
}

TEST_CASE("GradScaler::step drives the fused optimizers without unscaling first", "[optim]") {
  auto a = make_params(6);
  auto b = clone_params(a);
  ao::AdamW ours(a, ao::AdamWOptions(1e-2));
  torch::optim::AdamW theirs(b, torch::optim::AdamWOptions(1e-2));
  ampkit::GradScaler scaler(ampkit::GradScalerOptions().init_scale(1024).growth_interval(1));
  ampkit::GradScaler control(ampkit::GradScalerOptions().init_scale(1024).growth_interval(1));
  for (int it = 0; it < 5; ++it) {
    for (auto* l : {&a, &b}) {
      std::vector<at::Tensor> outs;
      torch::manual_seed(20 + it);
      at::Tensor loss = torch::zeros({});
      for (const auto& p : *l) loss = loss + (p * torch::randn(p.sizes())).sum();
      (l == &a ? scaler : control).scale(loss).backward();
    }
    if (it == 2) a[1].mutable_grad()[0] = std::numeric_limits<float>::infinity();
    if (it == 2) b[1].mutable_grad()[0] = std::numeric_limits<float>::infinity();
    scaler.step(ours);
    control.step(theirs);
    CHECK(scaler.last_step_skipped().item<bool>() == (it == 2));
    scaler.update();
    control.update();
    ours.zero_grad();
    theirs.zero_grad();
    CHECK(all_close(a, b));
  }
  CHECK(scaler.steps_skipped() == 1);
  CHECK(scaler.get_scale() == control.get_scale());
}

TEST_CASE("params of several dtypes are grouped", "[optim]") {
  auto a = make_params(7);
  a.push_back(torch::randn({17}).to(at::kHalf).requires_grad_());
  a.push_back(torch::randn({9}).to(at::kBFloat16).requires_grad_());
  auto b = clone_params(a);
  ao::Adam ours(a, ao::AdamOptions(1e-2));
  torch::optim::Adam theirs(b, torch::optim::AdamOptions(1e-2));
  for (int it = 0; it < 3; ++it) {
    set_grads({&a, &b}, 30 + it);
    ours.step();
    theirs.step();
  }
  CHECK(all_close(a, b, 1e-2, 1e-2));
  for (size_t i = 0; i < a.size(); ++i) CHECK(a[i].scalar_type() == b[i].scalar_type());
}

TEST_CASE("save and load continue bitwise", "[optim]") {
  auto run = [](auto& opt, std::vector<at::Tensor>& ps, int from, int to) {
    for (int it = from; it < to; ++it) {
      set_grads({&ps}, 40 + it);
      opt.step();
    }
  };
  auto full = make_params(8);
  auto half = clone_params(full);
  ao::SGD o_full(full, ao::SGDOptions(0.1).momentum(0.9));
  ao::SGD o_half(half, ao::SGDOptions(0.1).momentum(0.9));
  run(o_full, full, 0, 6);
  run(o_half, half, 0, 3);
  std::stringstream buf;
  torch::save(o_half, buf);
  auto resumed = clone_params(half);
  ao::SGD o_res(resumed, ao::SGDOptions(0.5).momentum(0.1));
  torch::load(o_res, buf);
  CHECK(static_cast<const ao::SGDOptions&>(o_res.param_groups()[0].options()).lr() == 0.1);
  run(o_res, resumed, 3, 6);
  CHECK(all_bitwise(full, resumed));

  auto fa = make_params(9);
  auto ha = clone_params(fa);
  ao::AdamW a_full(fa, ao::AdamWOptions(1e-2).amsgrad(true));
  ao::AdamW a_half(ha, ao::AdamWOptions(1e-2).amsgrad(true));
  run(a_full, fa, 0, 5);
  run(a_half, ha, 0, 2);
  std::stringstream abuf;
  torch::save(a_half, abuf);
  auto ra = clone_params(ha);
  ao::AdamW a_res(ra, ao::AdamWOptions(1e-2).amsgrad(true));
  torch::load(a_res, abuf);
  run(a_res, ra, 2, 5);
  CHECK(all_bitwise(fa, ra));

  SECTION("a mismatched archive changes nothing") {
    std::stringstream again;
    torch::save(a_half, again);
    auto other = make_params(9);
    other.pop_back();
    ao::AdamW wrong(other, ao::AdamWOptions(0.5));
    CHECK_THAT(error_of([&] { torch::load(wrong, again); }),
               Catch::Contains("expected param group 0 to hold 2 parameters, got 3"));
    CHECK(wrong.state().empty());
    CHECK(static_cast<const ao::AdamWOptions&>(wrong.param_groups()[0].options()).lr() == 0.5);
  }
}

namespace {

// Checks that \p path, an archive written by commit 5f986b7 (before Adam and AdamW shared one
// template), loads into today's \p Opt: the recipe below is the one that wrote it (two groups with
// options \p o0 and \p o1, three steps from seeded params and grads, the params added under
// "test_params"), rerun here and compared bitwise with what was loaded.
template <class Opt, class Options>
void check_old_archive_loads(const std::string& path, Options o0, Options o1, uint64_t seed) {
  torch::manual_seed(seed);
  std::vector<at::Tensor> ps;
  for (auto sizes : {std::vector<int64_t>{33, 7}, {7}, {5, 3, 2}}) ps.push_back(torch::randn(sizes).requires_grad_());
  auto groups_of = [&](const std::vector<at::Tensor>& t) {
    std::vector<torch::optim::OptimizerParamGroup> groups;
    groups.emplace_back(std::vector<at::Tensor>{t[0], t[1]}, std::make_unique<Options>(o0));
    groups.emplace_back(std::vector<at::Tensor>{t[2]}, std::make_unique<Options>(o1));
    return groups;
  };
  auto loaded_ps = clone_params(ps);
  Opt rerun(groups_of(ps), Options());
  for (int it = 0; it < 3; ++it) {
    torch::manual_seed(seed * 100 + it);
    for (auto& p : ps) p.mutable_grad() = torch::randn(p.sizes());
    rerun.step();
  }

  Opt loaded(groups_of(loaded_ps), Options(0.5));
  torch::serialize::InputArchive archive;
  archive.load_from(path);
  loaded.load(archive);
  torch::serialize::InputArchive saved_params;
  archive.read("test_params", saved_params);
  for (size_t i = 0; i < ps.size(); ++i) {
    at::Tensor saved;
    saved_params.read("p" + std::to_string(i), saved);
    CHECK(bitwise_equal(saved, ps[i]));
  }
  for (size_t g = 0; g < 2; ++g) {
    CHECK(static_cast<const Options&>(loaded.param_groups()[g].options()) ==
          static_cast<const Options&>(rerun.param_groups()[g].options()));
  }
  for (size_t i = 0; i < ps.size(); ++i) {
    const auto& want = static_cast<ao::AdamParamState&>(*rerun.state().at(ps[i].unsafeGetTensorImpl()));
    const auto& got = static_cast<ao::AdamParamState&>(*loaded.state().at(loaded_ps[i].unsafeGetTensorImpl()));
    CHECK(bitwise_equal(got.step(), want.step()));
    CHECK(bitwise_equal(got.exp_avg(), want.exp_avg()));
    CHECK(bitwise_equal(got.exp_avg_sq(), want.exp_avg_sq()));
    CHECK(got.max_exp_avg_sq().defined() == want.max_exp_avg_sq().defined());
    if (want.max_exp_avg_sq().defined()) CHECK(bitwise_equal(got.max_exp_avg_sq(), want.max_exp_avg_sq()));
  }
}

}  // namespace

TEST_CASE("archives written before Adam and AdamW shared their code still load", "[optim]") {
  const std::string dir = AMPKIT_TEST_DATA_DIR;
  check_old_archive_loads<ao::Adam>(dir + "/adam_5f986b7.pt", ao::AdamOptions(1e-2).amsgrad(true).weight_decay(0.1),
                                    ao::AdamOptions(5e-3).betas({0.8, 0.95}).eps(1e-6).maximize(true), 21);
  check_old_archive_loads<ao::AdamW>(dir + "/adamw_5f986b7.pt", ao::AdamWOptions(1e-2).amsgrad(true),
                                     ao::AdamWOptions(5e-3).betas({0.8, 0.95}).weight_decay(0.3), 22);
}

TEST_CASE("Adam and AdamW options stay distinct types with their own defaults", "[optim]") {
  STATIC_REQUIRE_FALSE(std::is_same_v<ao::AdamOptions, ao::AdamWOptions>);
  STATIC_REQUIRE(std::is_base_of_v<ao::FusedOptimizer, ao::Adam>);
  STATIC_REQUIRE_FALSE(std::is_base_of_v<ao::Adam, ao::AdamW>);
  CHECK(ao::AdamOptions(0.1).weight_decay() == 0.0);
  CHECK(ao::AdamWOptions(0.1).weight_decay() == 1e-2);
  // An AdamW group with Adam's options is refused by name.
  auto p = make_params(12);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(p, std::make_unique<ao::AdamOptions>(1e-2));
  CHECK_THAT(error_of([&] { ao::AdamW(groups, ao::AdamWOptions()); }),
             Catch::Contains("AdamW: expected the options of param group 0 to be ampkit::optim::AdamWOptions"));
}

TEST_CASE("a bad gradient is named by its group and its index, and changes nothing", "[optim]") {
  auto q = make_params(13);
  const auto before = clone_params(q);
  auto groups = [&] {
    std::vector<torch::optim::OptimizerParamGroup> two;
    two.emplace_back(std::vector<at::Tensor>{q[0]});
    two.emplace_back(std::vector<at::Tensor>{q[1], q[2]});
    return two;
  };
  for (auto& t : q) t.mutable_grad() = torch::ones_like(t);
  q[2].mutable_grad() = torch::ones({4});
  const std::string expected_sgd =
      "SGD: expected each gradient to match its parameter's dtype, device and shape (CPUFloatType of shape [5, 3, 2] "
      "on cpu), got CPUFloatType of shape [4] on cpu (group 1, index 1)";
  SECTION("SGD") {
    ao::SGD sgd(groups(), ao::SGDOptions(0.1).momentum(0.9));
    CHECK_THAT(error_of([&] { sgd.step(); }), Catch::Contains(expected_sgd));
    CHECK(sgd.state().empty());  // not even group 0's buffer
    CHECK(all_bitwise(q, before));
  }
  SECTION("AdamW") {
    ao::AdamW adamw(groups());
    CHECK_THAT(error_of([&] { adamw.step(); }),
               Catch::Contains("AdamW: expected each gradient to match") && Catch::Contains("(group 1, index 1)"));
    CHECK(adamw.state().empty());
    CHECK(all_bitwise(q, before));
  }
  SECTION("the flat lists of fused_sgd_ / fused_adam_ know no groups: the index in the list") {
    ao::detail::SGDHyper h;
    const std::string msg = error_of([&] {
      ao::detail::fused_sgd_({q[0], q[2]}, {q[0].grad(), q[2].grad()}, {}, {}, {}, h, false, at::Tensor(),
                             at::Tensor());
    });
    CHECK_THAT(msg, Catch::EndsWith("got CPUFloatType of shape [4] on cpu (index 1)"));
    CHECK_THAT(msg, !Catch::Contains("group"));
    const std::string adam_msg = error_of([&] {
      ao::detail::fused_adam_({q[2]}, {q[2].grad()}, {}, {}, {}, {}, {}, ao::detail::AdamHyper(), at::Tensor(),
                              at::Tensor());
    });
    CHECK_THAT(adam_msg, Catch::StartsWith("Adam: expected each gradient to match") &&
                             Catch::EndsWith("got CPUFloatType of shape [4] on cpu (index 0)"));
    CHECK(all_bitwise(q, before));
  }
}

TEST_CASE("fused optimizers reject bad arguments clearly", "[optim]") {
  auto p = make_params(11);
  CHECK_THAT(error_of([] { ao::Adam(std::vector<at::Tensor>{}); }),
             Catch::Contains("Adam: expected at least one parameter, got an empty parameter list"));
  CHECK_THAT(error_of([&] { ao::AdamW(p, ao::AdamWOptions(-1.0)); }),
             Catch::Contains("AdamW: expected lr >= 0, got -1"));
  CHECK_THAT(error_of([&] { ao::Adam(p, ao::AdamOptions().betas({0.9, 1.0})); }),
             Catch::Contains("expected betas[1] in [0, 1), got 1"));
  CHECK_THAT(error_of([&] { ao::Adam(p, ao::AdamOptions().eps(-1)); }), Catch::Contains("expected eps >= 0, got -1"));
  CHECK_THAT(error_of([&] { ao::SGD(p, ao::SGDOptions(0.1).nesterov(true)); }),
             Catch::Contains("expected momentum > 0 and dampening == 0 with nesterov=true"));
  CHECK_THROWS_AS(ao::SGD(p, ao::SGDOptions(0.1).momentum(0.9).dampening(0.1).nesterov(true)), c10::ValueError);
  CHECK_THROWS_AS(ao::SGD(p, ao::SGDOptions(-0.1)), c10::ValueError);

  {
    // Per-group options of our type are kept (torch only merges its own option types).
    std::vector<torch::optim::OptimizerParamGroup> groups;
    groups.emplace_back(std::vector<at::Tensor>{p[0]}, std::make_unique<ao::AdamOptions>(0.5));
    groups.emplace_back(std::vector<at::Tensor>{p[1]});
    ao::Adam grouped(groups, ao::AdamOptions(0.25));
    CHECK(grouped.param_groups()[0].options().get_lr() == 0.5);
    CHECK(grouped.param_groups()[1].options().get_lr() == 0.25);
    grouped.param_groups()[1].set_options(std::make_unique<torch::optim::AdamOptions>(1e-2));
    CHECK_THAT(error_of([&] { grouped.step(); }),
               Catch::Contains("expected the options of param group 1 to be ampkit::optim::AdamOptions"));
    std::vector<torch::optim::OptimizerParamGroup> foreign;
    foreign.emplace_back(p, std::make_unique<torch::optim::AdamOptions>(1e-2));
    CHECK_THAT(error_of([&] { ao::Adam(foreign, ao::AdamOptions()); }),
               Catch::Contains("expected the options of param group 0 to be ampkit::optim::AdamOptions"));
  }

  ao::Adam opt(p);
  auto sparse = torch::zeros({10, 3}).requires_grad_();
  ao::Adam sparse_opt(std::vector<at::Tensor>{sparse});
  sparse.mutable_grad() = torch::sparse_coo_tensor(torch::tensor({{1}}), torch::ones({1, 3}), {10, 3});
  CHECK_THAT(error_of([&] { sparse_opt.step(); }), Catch::Contains("expected dense gradients, got a sparse one"));
  CHECK(sparse_opt.state().empty());

  for (auto& t : p) t.mutable_grad() = torch::ones_like(t);
  CHECK_THAT(error_of([&] { opt.step_scaled(torch::ones({2}), at::Tensor()); }),
             Catch::Contains("expected grad_scale to be None/undefined or a 1-element float32 tensor"));
  CHECK(opt.state().empty());
  opt.param_groups()[0].options().set_lr(-3);
  CHECK_THAT(error_of([&] { opt.step(); }), Catch::Contains("expected lr >= 0, got -3"));
  CHECK(opt.state().empty());
}
