// The argument checks of <ampkit/distributed.h> and of the process_group option, which need no
// peer. Training across processes is tested by tests/python/test_distributed.py, which starts
// tests/cpp/ddp_worker.cpp on 127.0.0.1 (sockets and gloo's threads stay out of the sanitizer stage).
#include "test_helpers.h"

#include <cstdlib>
#include <optional>
#include <string>

using ampkit_test::error_of;
namespace dist = ampkit::dist;

namespace {

// Sets (or, with nullopt, unsets) an environment variable for the scope, restoring it after.
class EnvGuard {
 public:
  EnvGuard(const char* name, std::optional<std::string> value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value) {
      setenv(name, value->c_str(), 1);
    } else {
      unsetenv(name);
    }
  }
  ~EnvGuard() {
    if (old_) {
      setenv(name_, old_->c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

dist::ProcessGroupOptions valid() {
  return dist::ProcessGroupOptions().master_addr("127.0.0.1").master_port(29500).rank(0).world_size(2);
}

template <class F>
void require_value_error(F&& fn, const std::string& text) {
  try {
    fn();
  } catch (const c10::ValueError& e) {
    CHECK_THAT(e.what_without_backtrace(), Catch::Contains(text));
    return;
  }
  FAIL("expected c10::ValueError containing: " << text);
}

}  // namespace

TEST_CASE("init_process_group names the missing or bad option", "[distributed]") {
  EnvGuard world("WORLD_SIZE", std::nullopt), rank("RANK", std::nullopt), port("MASTER_PORT", std::nullopt),
      addr("MASTER_ADDR", std::nullopt);
  require_value_error([] { dist::init_process_group(); },
                      "expected ProcessGroupOptions::world_size or environment variable WORLD_SIZE, got neither");
  require_value_error([] { dist::init_process_group(dist::ProcessGroupOptions().world_size(2)); },
                      "expected ProcessGroupOptions::rank or environment variable RANK, got neither");
  require_value_error([] { dist::init_process_group(dist::ProcessGroupOptions().world_size(2).rank(0)); },
                      "expected ProcessGroupOptions::master_port or environment variable MASTER_PORT, got neither");
  require_value_error(
      [] { dist::init_process_group(dist::ProcessGroupOptions().world_size(2).rank(0).master_port(29500)); },
      "expected ProcessGroupOptions::master_addr or environment variable MASTER_ADDR, got neither");
  require_value_error([] { dist::init_process_group(valid().world_size(0)); }, "expected world_size >= 1, got 0");
  require_value_error([] { dist::init_process_group(valid().rank(2)); }, "expected rank in [0, world_size 2), got 2");
  require_value_error([] { dist::init_process_group(valid().master_port(70000)); },
                      "expected master_port in [1, 65535], got 70000");
  require_value_error([] { dist::init_process_group(valid().master_addr("")); },
                      "expected a non-empty master_addr, got ''");
  require_value_error([] { dist::init_process_group(valid().timeout(std::chrono::milliseconds(0))); },
                      "expected timeout > 0 ms, got 0");
  require_value_error([] { dist::init_process_group(valid().backend("mpi")); },
                      "expected backend 'gloo' or 'nccl', got 'mpi'");
}

TEST_CASE("init_process_group reads the environment and names a bad variable", "[distributed]") {
  EnvGuard world("WORLD_SIZE", std::string("2")), rank("RANK", std::string("x"));
  require_value_error([] { dist::init_process_group(); },
                      "expected environment variable RANK to be an integer, got 'x'");
  EnvGuard rank_ok("RANK", std::string("5"));
  require_value_error([] { dist::init_process_group(dist::ProcessGroupOptions().master_port(1).master_addr("h")); },
                      "expected rank in [0, world_size 2), got 5");
}

TEST_CASE("local_rank", "[distributed]") {
  {
    EnvGuard unset("LOCAL_RANK", std::nullopt);
    CHECK(dist::local_rank() == 0);
    CHECK(dist::local_rank(3) == 3);
  }
  {
    EnvGuard set("LOCAL_RANK", std::string("1"));
    CHECK(dist::local_rank() == 1);
  }
  EnvGuard bad("LOCAL_RANK", std::string("-1"));
  require_value_error([] { dist::local_rank(); },
                      "expected environment variable LOCAL_RANK to be an integer >= 0, got '-1'");
}

TEST_CASE("DataParallel and the helpers refuse a null group or bad options", "[distributed]") {
  torch::nn::Linear model(2, 2);
  require_value_error([&] { dist::DataParallel(*model, nullptr); }, "DataParallel: expected a process group");
  require_value_error([] { dist::DataParallelOptions().bucket_cap_mb(0).validate(); },
                      "expected bucket_cap_mb to be finite and > 0, got 0");
  std::vector<at::Tensor> found{torch::zeros({})};
  require_value_error([&] { dist::all_reduce_found_infs(nullptr, found); },
                      "all_reduce_found_infs: expected a process group");
  require_value_error([] { dist::broadcast_coalesced(nullptr, {torch::zeros({1})}); },
                      "broadcast_coalesced: expected a process group");
  CHECK(dist::DataParallelOptions().bucket_cap_mb() == 25.0);  // DDP's default
}

TEST_CASE("Trainer with a process_group needs the model", "[distributed][trainer]") {
  torch::nn::Linear model(2, 2);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1));
  // A group that never communicates: the check comes first.
  auto group = c10::make_intrusive<c10d::ProcessGroup>(0, 1);
  require_value_error([&] { ampkit::Trainer(opt, ampkit::TrainerOptions().process_group(group)); },
                      "Trainer: expected the model with options.process_group");
  CHECK(!ampkit::TrainerOptions().process_group());
  ampkit::Trainer plain(*model, opt);
  CHECK(plain.data_parallel() == nullptr);
}

TEST_CASE("GradScaler without a process group decides locally", "[distributed][grad_scaler]") {
  ampkit::GradScaler scaler;
  CHECK(!scaler.process_group());
  auto group = c10::make_intrusive<c10d::ProcessGroup>(0, 1);
  scaler.set_process_group(group);
  CHECK(scaler.process_group().get() == group.get());
  scaler.set_process_group(nullptr);
  CHECK(!scaler.process_group());
}
