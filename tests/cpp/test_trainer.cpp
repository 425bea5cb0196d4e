#include "test_helpers.h"

#include "trainer_detail.h"

#include <cmath>
#include <cstdio>
#include <sstream>
#include <limits>

using ampkit_test::bitwise_equal;
using ampkit_test::error_of;
namespace ao = ampkit::optim;

namespace {

torch::nn::Sequential make_model(uint64_t seed) {
  torch::manual_seed(seed);
  return torch::nn::Sequential(torch::nn::Linear(8, 16), torch::nn::ReLU(), torch::nn::Linear(16, 2));
}

std::vector<std::pair<at::Tensor, at::Tensor>> make_data(int n) {
  torch::manual_seed(99);
  std::vector<std::pair<at::Tensor, at::Tensor>> d;
  for (int i = 0; i < n; ++i) d.emplace_back(torch::randn({4, 8}), torch::randn({4, 2}));
  return d;
}

bool same_params(torch::nn::Module& a, torch::nn::Module& b) {
  auto pa = a.parameters(), pb = b.parameters();
  for (size_t i = 0; i < pa.size(); ++i) {
    if (!bitwise_equal(pa[i], pb[i])) return false;
  }
  return true;
}

at::Tensor loss_of(torch::nn::Sequential& m, const at::Tensor& x, const at::Tensor& y) {
  return torch::mse_loss(m->forward(x).to(at::kFloat), y);
}

constexpr float kInf = std::numeric_limits<float>::infinity();

}  // namespace

TEST_CASE("TrainerOptions defaults follow the dtype", "[trainer]") {
  CHECK(ampkit::TrainerOptions(c10::kCPU).dtype(at::kHalf).scaler().has_value());
  CHECK(!ampkit::TrainerOptions(c10::kCPU).dtype(at::kBFloat16).scaler().has_value());
  CHECK(!ampkit::TrainerOptions(c10::kCPU).dtype(at::kHalf).no_scaler().scaler().has_value());
  CHECK(
      ampkit::TrainerOptions(c10::kCPU).dtype(at::kBFloat16).scaler(ampkit::GradScalerOptions()).scaler().has_value());
  CHECK(ampkit::TrainerOptions().accumulation_steps() == 1);
  CHECK(!ampkit::TrainerOptions().max_grad_norm().has_value());
}

TEST_CASE("Trainer equals the hand-written loop bitwise", "[trainer]") {
  for (int64_t accum : {1, 3}) {
    for (bool clip : {false, true}) {
      auto m1 = make_model(1), m2 = make_model(1);
      ao::AdamW o1(m1->parameters(), ao::AdamWOptions(1e-2));
      ao::AdamW o2(m2->parameters(), ao::AdamWOptions(1e-2));
      const auto sopts = ampkit::GradScalerOptions().init_scale(1024).growth_interval(2);
      auto topts = ampkit::TrainerOptions(c10::kCPU).dtype(at::kHalf).scaler(sopts).accumulation_steps(accum);
      if (clip) topts.max_grad_norm(0.5);
      ampkit::Trainer trainer(*m1, o1, topts);
      ampkit::GradScaler s2(sopts);
      const int poisoned = 3 * static_cast<int>(accum) - 1;
      const auto data = make_data(5 * static_cast<int>(accum));
      for (int i = 0; i < static_cast<int>(data.size()); ++i) {
        const auto& [x, y] = data[i];
        std::optional<unsigned> hook;
        auto w = m1->parameters()[0];
        if (i == poisoned)
          hook = w.register_hook([](const at::Tensor& g) { return g.index_fill(1, torch::tensor({0}), kInf); });
        const auto stats = trainer.step([&] { return loss_of(m1, x, y); });
        if (hook) w.remove_hook(*hook);

        at::Tensor loss;
        {
          ampkit::AutocastGuard guard(c10::kCPU, at::kHalf);
          loss = loss_of(m2, x, y);
        }
        s2.scale(accum > 1 ? loss / accum : loss).backward();
        if (i == poisoned) m2->parameters()[0].mutable_grad().index_fill_(1, torch::tensor({0}), kInf);
        if ((i + 1) % accum == 0) {
          if (clip) {
            s2.unscale_(o2);
            // The norm's oracle is torch's own clip_grad_norm_ (max_norm inf: it clips nothing);
            // torch's C++ version sums in another order, hence the tolerance.
            const double ref_norm =
                torch::nn::utils::clip_grad_norm_(m2->parameters(), std::numeric_limits<double>::infinity());
            ampkit::detail::clip_grad_norm_(m2->parameters(), 0.5);
            if (i != poisoned) CHECK(stats.grad_norm().item<double>() == Approx(ref_norm).epsilon(1e-6));
          }
          s2.step(o2);
          s2.update();
          o2.zero_grad();
          CHECK(stats.stepped());
          CHECK(stats.skipped().item<bool>() == (i == poisoned));
        } else {
          CHECK(!stats.stepped());
          CHECK(!stats.skipped().item<bool>());
        }
        CHECK(stats.loss().item<double>() == loss.item<double>());
        REQUIRE(same_params(*m1, *m2));
      }
      CHECK(trainer.scaler()->get_scale() == s2.get_scale());
      CHECK(trainer.scaler()->steps_skipped() == 1);
    }
  }
}

TEST_CASE("clip_grad_norm_ agrees with torch::nn::utils::clip_grad_norm_", "[trainer]") {
  auto a = make_model(2), b = make_model(2);
  const auto data = make_data(1);
  loss_of(a, data[0].first, data[0].second).mul(100).backward();
  loss_of(b, data[0].first, data[0].second).mul(100).backward();
  const auto norm = ampkit::detail::clip_grad_norm_(a->parameters(), 0.1);
  const double ref = torch::nn::utils::clip_grad_norm_(b->parameters(), 0.1);
  CHECK(norm.item<double>() == Approx(ref).epsilon(1e-6));
  for (size_t i = 0; i < a->parameters().size(); ++i) {
    CHECK(torch::allclose(a->parameters()[i].grad(), b->parameters()[i].grad(), 1e-5, 1e-7));
  }
}

TEST_CASE("bf16 trains without a scaler and with a plain torch::optim optimizer", "[trainer]") {
  auto m1 = make_model(3), m2 = make_model(3);
  torch::optim::SGD o1(m1->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  torch::optim::SGD o2(m2->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  ampkit::Trainer trainer(*m1, o1, ampkit::TrainerOptions(c10::kCPU).dtype(at::kBFloat16));
  CHECK(trainer.scaler() == nullptr);
  for (const auto& [x, y] : make_data(4)) {
    const auto stats = trainer.step([&] { return loss_of(m1, x, y); });
    at::Tensor loss;
    {
      ampkit::AutocastGuard guard(c10::kCPU, at::kBFloat16);
      loss = loss_of(m2, x, y);
    }
    loss.backward();
    o2.step();
    o2.zero_grad();
    CHECK(!stats.skipped().item<bool>());
    CHECK(!stats.scale().defined());  // no scaler
    CHECK(!stats.grad_norm().defined());
    REQUIRE(same_params(*m1, *m2));
  }
  CHECK(trainer.optimizer_steps() == 4);
}

TEST_CASE("fp16 with a non-fused torch::optim optimizer equals the hand loop", "[trainer]") {
  auto m1 = make_model(7), m2 = make_model(7);
  torch::optim::Adam o1(m1->parameters(), torch::optim::AdamOptions(1e-2));
  torch::optim::Adam o2(m2->parameters(), torch::optim::AdamOptions(1e-2));
  const auto sopts = ampkit::GradScalerOptions().init_scale(512);
  ampkit::Trainer trainer(*m1, o1, ampkit::TrainerOptions(c10::kCPU).dtype(at::kHalf).scaler(sopts));
  ampkit::GradScaler s2(sopts);
  for (const auto& [x, y] : make_data(4)) {
    trainer.step([&] { return loss_of(m1, x, y); });
    at::Tensor loss;
    {
      ampkit::AutocastGuard guard(c10::kCPU, at::kHalf);
      loss = loss_of(m2, x, y);
    }
    s2.scale(loss).backward();
    s2.step(o2);
    s2.update();
    o2.zero_grad();
    REQUIRE(same_params(*m1, *m2));
  }
}

TEST_CASE("a skipped trainer step leaves params and fused SGD momentum untouched", "[trainer]") {
  auto m = make_model(4);
  ao::SGD opt(m->parameters(), ao::SGDOptions(0.1).momentum(0.9));
  ampkit::Trainer trainer(*m, opt, ampkit::TrainerOptions(c10::kCPU).dtype(at::kHalf));
  const auto data = make_data(3);
  auto poison = [&](const at::Tensor& x, const at::Tensor& y) {
    auto b = m->parameters()[3];
    const auto h = b.register_hook([](const at::Tensor& g) { return g * std::numeric_limits<float>::quiet_NaN(); });
    const auto stats = trainer.step([&] { return loss_of(m, x, y); });
    b.remove_hook(h);
    return stats;
  };
  // A skipped first step: no garbage in the buffers afterwards.
  const auto before = m->parameters();
  std::vector<at::Tensor> saved;
  for (const auto& p : before) saved.push_back(p.detach().clone());
  CHECK(poison(data[0].first, data[0].second).skipped().item<bool>());
  for (size_t i = 0; i < saved.size(); ++i) CHECK(bitwise_equal(m->parameters()[i], saved[i]));
  for (const auto& p : m->parameters()) {
    auto it = opt.state().find(p.unsafeGetTensorImpl());
    if (it != opt.state().end()) {
      CHECK(torch::count_nonzero(static_cast<ao::SGDParamState&>(*it->second).momentum_buffer()).item<int64_t>() == 0);
    }
  }
  // A skipped later step.
  CHECK(!trainer.step([&] { return loss_of(m, data[1].first, data[1].second); }).skipped().item<bool>());
  saved.clear();
  std::vector<at::Tensor> bufs;
  for (const auto& p : m->parameters()) {
    saved.push_back(p.detach().clone());
    bufs.push_back(static_cast<ao::SGDParamState&>(*opt.state().at(p.unsafeGetTensorImpl())).momentum_buffer().clone());
  }
  CHECK(poison(data[2].first, data[2].second).skipped().item<bool>());
  for (size_t i = 0; i < saved.size(); ++i) {
    const auto p = m->parameters()[i];
    CHECK(bitwise_equal(p, saved[i]));
    CHECK(bitwise_equal(static_cast<ao::SGDParamState&>(*opt.state().at(p.unsafeGetTensorImpl())).momentum_buffer(),
                        bufs[i]));
  }
  CHECK(trainer.scaler()->steps_skipped() == 2);
}

TEST_CASE("a resumed trainer continues bitwise", "[trainer]") {
  const auto data = make_data(8);
  const auto opts = ampkit::TrainerOptions(c10::kCPU)
                        .dtype(at::kHalf)
                        .scaler(ampkit::GradScalerOptions().init_scale(256).growth_interval(1))
                        .accumulation_steps(2)
                        .max_grad_norm(1.0);
  auto run = [&](torch::nn::Sequential& m, ampkit::Trainer& t, int from, int to) {
    for (int i = from; i < to; ++i) t.step([&] { return loss_of(m, data[i].first, data[i].second); });
  };
  auto full = make_model(5);
  ao::Adam o_full(full->parameters(), ao::AdamOptions(1e-2).amsgrad(true));
  ampkit::Trainer t_full(*full, o_full, opts);
  run(full, t_full, 0, 8);

  auto first = make_model(5);
  ao::Adam o_first(first->parameters(), ao::AdamOptions(1e-2).amsgrad(true));
  ampkit::Trainer t_first(*first, o_first, opts);
  run(first, t_first, 0, 3);
  CHECK_THAT(error_of([&] { t_first.save(std::string("/dev/null")); }), Catch::Contains("middle of an accumulation"));
  run(first, t_first, 3, 4);
  const std::string path = "ampkit_test_trainer_resume.pt";
  t_first.save(path);

  auto resumed = make_model(123);  // other weights: all must come from the file
  ao::Adam o_res(resumed->parameters(), ao::AdamOptions(1e-2).amsgrad(true));
  ampkit::Trainer t_res(*resumed, o_res, opts);
  t_res.load(path);
  std::remove(path.c_str());
  CHECK(t_res.micro_steps() == 4);
  run(resumed, t_res, 4, 8);
  CHECK(same_params(*full, *resumed));
  CHECK(t_full.scaler()->get_scale() == t_res.scaler()->get_scale());
}

TEST_CASE("Trainer misuse gets clear errors", "[trainer]") {
  auto m = make_model(6);
  ao::AdamW opt(m->parameters());
  {
    auto p = torch::zeros({2}).requires_grad_();
    torch::optim::SGD empty(std::vector<at::Tensor>{p}, torch::optim::SGDOptions(0.1));
    empty.param_groups()[0].params().clear();
    CHECK_THAT(error_of([&] { ampkit::Trainer t{empty}; }),
               Catch::Contains("Trainer: expected an optimizer with at least one parameter, got none"));
  }
  {
    auto meta = torch::zeros({2}, torch::TensorOptions().device(c10::kMeta)).requires_grad_();
    torch::optim::SGD other(std::vector<at::Tensor>{meta}, torch::optim::SGDOptions(0.1));
    CHECK_THAT(error_of([&] { ampkit::Trainer t{other}; }),
               Catch::Contains("expected every parameter on cpu (options.device_type), got parameter 0 on meta"));
  }
  CHECK_THAT(error_of([&] { ampkit::Trainer(opt, ampkit::TrainerOptions().accumulation_steps(0)); }),
             Catch::Contains("expected accumulation_steps >= 1, got 0"));
  CHECK_THAT(error_of([&] { ampkit::Trainer(opt, ampkit::TrainerOptions().max_grad_norm(-1.0)); }),
             Catch::Contains("expected max_grad_norm to be finite and > 0"));
  CHECK_THROWS_AS(ampkit::Trainer(opt, ampkit::TrainerOptions().dtype(at::kDouble)), c10::Error);

  ampkit::Trainer trainer(*m, opt, ampkit::TrainerOptions(c10::kCPU).dtype(at::kBFloat16));
  const auto x = torch::randn({4, 8});
  CHECK_THAT(error_of([&] { trainer.step([&] { return m->forward(x); }); }),
             Catch::Contains("expected the closure to return a floating-point scalar loss, got"));
  CHECK_THAT(error_of([&] { trainer.step([] { return at::Tensor(); }); }),
             Catch::Contains("expected the closure to return the loss, got an undefined tensor"));
  CHECK_THAT(error_of([&] { trainer.step([] { return torch::ones({}); }); }), Catch::Contains("to require grad"));
  CHECK_THAT(error_of([&] { trainer.step(nullptr); }), Catch::Contains("expected a closure"));
  CHECK(trainer.micro_steps() == 0);
  for (const auto& p : m->parameters()) CHECK(!p.grad().defined());
  CHECK(!ampkit::is_autocast_enabled(c10::kCPU));  // the guard was left on the throw
}

namespace {

// Everything a load could change, in a comparable form.
struct TrainerSnapshot {
  std::vector<at::Tensor> params;
  std::string optimizer;
  std::optional<ampkit::GradScalerState> scaler;
  int64_t micro_steps;
};

TrainerSnapshot snapshot(torch::nn::Module& m, torch::optim::Optimizer& o, ampkit::Trainer& t) {
  TrainerSnapshot s;
  for (const auto& p : m.parameters()) s.params.push_back(p.detach().clone());
  torch::serialize::OutputArchive archive;
  o.save(archive);
  std::ostringstream out;
  archive.save_to(out);
  s.optimizer = out.str();
  s.scaler = t.scaler() ? t.scaler()->state_dict() : std::nullopt;
  s.micro_steps = t.micro_steps();
  return s;
}

bool same(const TrainerSnapshot& a, const TrainerSnapshot& b) {
  if (a.params.size() != b.params.size() || a.optimizer != b.optimizer || a.scaler != b.scaler ||
      a.micro_steps != b.micro_steps) {
    return false;
  }
  for (size_t i = 0; i < a.params.size(); ++i) {
    if (!bitwise_equal(a.params[i], b.params[i])) return false;
  }
  return true;
}

// An archive as Trainer::save writes it, with parts replaced to test the checks.
struct ArchiveParts {
  int64_t micro_steps = 4;
  double scale = 256.0;
};

torch::serialize::OutputArchive trainer_archive(torch::nn::Module& m, torch::optim::Optimizer& o,
                                                const ArchiveParts& parts) {
  torch::serialize::OutputArchive archive;
  archive.write("ampkit_trainer_version", c10::IValue(int64_t{1}));
  archive.write("micro_steps", c10::IValue(parts.micro_steps));
  archive.write("accumulation_steps", c10::IValue(int64_t{2}));
  torch::serialize::OutputArchive model(archive.compilation_unit()), opt(archive.compilation_unit()),
      scaler(archive.compilation_unit());
  m.save(model);
  o.save(opt);
  ampkit::GradScaler source(ampkit::GradScalerOptions().init_scale(256));
  source.save(scaler);
  if (parts.scale != 256.0) {  // overwrite the scale entry
    scaler.write("scale", parts.scale);
  }
  archive.write("model", model);
  archive.write("optimizer", opt);
  archive.write("scaler", scaler);
  return archive;
}

torch::serialize::InputArchive reread(torch::serialize::OutputArchive& out) {
  std::ostringstream bytes;
  out.save_to(bytes);
  std::istringstream in(bytes.str());
  torch::serialize::InputArchive archive;
  archive.load_from(in);
  return archive;
}

}  // namespace

TEST_CASE("a failed Trainer::load changes nothing", "[trainer]") {
  const auto data = make_data(4);
  const auto opts = ampkit::TrainerOptions(c10::kCPU).dtype(at::kHalf).accumulation_steps(2);
  auto src = make_model(1);
  ao::AdamW src_opt(src->parameters(), ao::AdamWOptions(1e-2));
  ampkit::Trainer src_t(*src, src_opt, opts);
  for (const auto& [x, y] : data) src_t.step([&] { return loss_of(src, x, y); });

  auto m = make_model(2);
  ao::AdamW opt(m->parameters(), ao::AdamWOptions(1e-3));
  ampkit::Trainer t(*m, opt, opts);
  for (int i = 0; i < 2; ++i) t.step([&] { return loss_of(m, data[i].first, data[i].second); });
  const auto before = snapshot(*m, opt, t);

  SECTION("a NaN scale") {
    auto out = trainer_archive(*src, src_opt, ArchiveParts{4, std::nan("")});
    auto in = reread(out);
    CHECK_THAT(error_of([&] { t.load(in); }), Catch::Contains("expected 'scale' to be > 0 and finite in float32"));
  }
  SECTION("micro_steps inside an accumulation window, or negative") {
    for (int64_t bad : {3, -2}) {
      auto out = trainer_archive(*src, src_opt, ArchiveParts{bad, 256.0});
      auto in = reread(out);
      CHECK_THAT(error_of([&] { t.load(in); }),
                 Catch::Contains("expected micro_steps >= 0 and a multiple of accumulation_steps (2), got"));
    }
  }
  SECTION("a model of another shape (torch's Module::load would take the saved shape)") {
    auto wide = torch::nn::Sequential(torch::nn::Linear(8, 32), torch::nn::ReLU(), torch::nn::Linear(32, 2));
    ao::AdamW wide_opt(wide->parameters(), ao::AdamWOptions(1e-2));
    auto out = trainer_archive(*wide, wide_opt, ArchiveParts{});
    auto in = reread(out);
    CHECK_THAT(error_of([&] { t.load(in); }),
               Catch::Contains("expected the model's parameter '0.weight' of shape [16, 8], got [32, 8]"));
  }
  SECTION("an optimizer that refuses its part after the model was loaded: the model is put back") {
    torch::optim::SGD sgd(m->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    ampkit::Trainer t_sgd(*m, sgd, opts);
    const auto sgd_before = snapshot(*m, sgd, t_sgd);
    auto out = trainer_archive(*src, src_opt, ArchiveParts{});  // AdamW's state: SGD cannot read it
    auto in = reread(out);
    CHECK_THROWS(t_sgd.load(in));
    CHECK(same(snapshot(*m, sgd, t_sgd), sgd_before));
  }
  CHECK(same(snapshot(*m, opt, t), before));
}
