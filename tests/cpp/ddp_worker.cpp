// One rank of the data-parallel tests (tests/python/test_distributed.py starts one or two of these
// on 127.0.0.1 and compares what they write). Without WORLD_SIZE in the environment it trains alone
// on the whole global batch: the single-process reference.
//
// Every micro-step draws a global batch of kRows rows from a generator seeded by the micro-step;
// rank r of n trains on rows [r * kRows / n, (r + 1) * kRows / n). At the optimizer steps listed in
// --inf-steps, the rows that rank --inf-rank holds in a world of two get an infinite loss weight.
#include <ampkit/ampkit.h>

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/torch.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

constexpr int64_t kRows = 8;

// Counts the collectives that reach the process group's CPU backend and forwards them.
class CountingBackend : public c10d::Backend {
 public:
  explicit CountingBackend(c10::intrusive_ptr<c10d::Backend> inner)
      : c10d::Backend(inner->getRank(), inner->getSize()), inner_(std::move(inner)) {}
  const std::string getBackendName() const override { return "counting"; }
  int64_t count() const { return count_.load(); }

  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& t, const c10d::BroadcastOptions& o) override {
    ++count_;
    return inner_->broadcast(t, o);
  }
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& t, const c10d::AllreduceOptions& o) override {
    ++count_;
    return inner_->allreduce(t, o);
  }
  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(std::vector<at::Tensor>& t,
                                                     const c10d::AllreduceCoalescedOptions& o) override {
    ++count_;
    return inner_->allreduce_coalesced(t, o);
  }
  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& out, std::vector<at::Tensor>& in,
                                           const c10d::AllgatherOptions& o) override {
    ++count_;
    return inner_->allgather(out, in, o);
  }
  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions& o) override {
    ++count_;
    return inner_->barrier(o);
  }

 private:
  c10::intrusive_ptr<c10d::Backend> inner_;
  std::atomic<int64_t> count_{0};
};

struct NetImpl : torch::nn::Module {
  NetImpl(int64_t rank, bool with_aux) {
    fc1 = register_module("fc1", torch::nn::Linear(16, 32));
    fc2 = register_module("fc2", torch::nn::Linear(32, 8));
    // A branch that only some ranks use (find_unused_parameters).
    if (with_aux) aux = register_module("aux", torch::nn::Linear(16, 8));
    // Differs per rank until DataParallel broadcasts rank 0's.
    marker = register_buffer("marker", torch::full({2}, static_cast<double>(rank)));
  }
  at::Tensor forward(const at::Tensor& x, bool use_aux) {
    at::Tensor out = fc2->forward(torch::relu(fc1->forward(x)));
    return use_aux ? out + aux->forward(x) : out;
  }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr}, aux{nullptr};
  at::Tensor marker;
};
TORCH_MODULE(Net);

std::map<std::string, std::string> parse(int argc, char** argv) {
  std::map<std::string, std::string> args;
  for (int i = 1; i + 1 < argc; i += 2) args[argv[i]] = argv[i + 1];
  return args;
}

std::string get(const std::map<std::string, std::string>& args, const std::string& key, const std::string& fallback) {
  auto it = args.find(key);
  return it == args.end() ? fallback : it->second;
}

std::set<int64_t> int_set(const std::string& text) {
  std::set<int64_t> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (!item.empty()) out.insert(std::stoll(item));
  }
  return out;
}

void write_floats(std::ostream& out, const at::Tensor& t) {
  const at::Tensor flat = t.detach().to(at::kFloat).contiguous().view(-1);
  out << "[";
  for (int64_t i = 0; i < flat.numel(); ++i) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.9g", flat.data_ptr<float>()[i]);
    out << (i ? "," : "") << buf;
  }
  out << "]";
}

// found_inf of a scaler whose only grad is inf on rank 1 and finite on rank 0: {local, collective}.
std::pair<float, float> rank_local_inf(const c10::intrusive_ptr<c10d::ProcessGroup>& group) {
  std::pair<float, float> out;
  for (int collective = 0; collective < 2; ++collective) {
    at::Tensor p = torch::ones({3}, torch::requires_grad());
    p.mutable_grad() = group->getRank() == 1 ? torch::full({3}, INFINITY) : torch::ones({3});
    torch::optim::SGD opt({p}, torch::optim::SGDOptions(0.1));
    ampkit::GradScaler scaler;
    if (collective) scaler.set_process_group(group);
    scaler.scale(torch::ones({}));
    scaler.unscale_(opt);
    (collective ? out.second : out.first) = scaler.found_inf_per_device(opt).at(0).item<float>();
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const auto args = parse(argc, argv);
  const int64_t steps = std::stoll(get(args, "--steps", "6"));
  const int64_t start = std::stoll(get(args, "--start", "0"));
  const int64_t accum = std::stoll(get(args, "--accum", "1"));
  const std::string dtype = get(args, "--dtype", "half");
  const std::set<int64_t> inf_steps = int_set(get(args, "--inf-steps", ""));
  const int64_t inf_rank = std::stoll(get(args, "--inf-rank", "1"));
  const int64_t save_at = std::stoll(get(args, "--save-at", "-1"));
  const std::string checkpoint = get(args, "--checkpoint", "");
  const std::string resume = get(args, "--resume", "");
  const bool count = get(args, "--count", "0") == "1";
  const std::string out_path = get(args, "--out", "");
  // Rank 1 alone uses the aux branch (reducer with find_unused_parameters).
  const bool unused = get(args, "--unused", "0") == "1";

  c10::intrusive_ptr<c10d::ProcessGroup> group;
  CountingBackend* counter = nullptr;
  if (std::getenv("WORLD_SIZE") != nullptr) {
    if (!ampkit::dist::gloo_available()) return 77;  // built without gloo's headers: the tests skip
    group = ampkit::dist::init_process_group(ampkit::dist::ProcessGroupOptions().timeout(std::chrono::seconds(60)));
    if (count) {
      auto counting = c10::make_intrusive<CountingBackend>(group->getBackend(c10::kCPU));
      counter = counting.get();
      group->setDefaultBackend(c10d::ProcessGroup::BackendType::CUSTOM);
      group->setBackend(c10::kCPU, c10d::ProcessGroup::BackendType::CUSTOM, counting);
    }
  }
  const int64_t rank = group ? group->getRank() : 0;
  const int64_t world = group ? group->getSize() : 1;

  torch::manual_seed(1234 + rank);  // DataParallel must replace ranks > 0's initial values
  Net model(rank, unused);
  ampkit::optim::SGD opt(model->parameters(), ampkit::optim::SGDOptions(0.05).momentum(0.9));
  auto options = ampkit::TrainerOptions(c10::kCPU)
                     .scaler(ampkit::GradScalerOptions().init_scale(1024.0).growth_interval(2))
                     .accumulation_steps(accum)
                     .max_grad_norm(get(args, "--clip", "1") == "1" ? std::optional<double>(5.0) : std::nullopt);
  if (dtype == "half") {
    options.dtype(at::kHalf);
  } else {
    options.enabled(false);  // fp32 forward, the scaler still scales: only reduction order differs
  }
  if (group)
    options.process_group(group).data_parallel(ampkit::dist::DataParallelOptions().find_unused_parameters(unused));
  ampkit::Trainer trainer(*model, opt, options);
  if (!resume.empty()) trainer.load(resume);

  std::vector<int> skipped;
  std::vector<double> scales;
  std::vector<int64_t> collectives;  // per micro-step
  const int64_t rows = kRows / world;
  for (int64_t step = start; step < steps; ++step) {
    for (int64_t micro = 0; micro < accum; ++micro) {
      const at::Generator gen = at::detail::createCPUGenerator(static_cast<uint64_t>(1000 * step + micro));
      const at::Tensor x_all = torch::randn({kRows, 16}, gen);
      const at::Tensor y_all = torch::randn({kRows, 8}, gen);
      at::Tensor w_all = torch::ones({kRows});
      if (inf_steps.count(step) && micro == 0)
        w_all.slice(0, inf_rank * kRows / 2, (inf_rank + 1) * kRows / 2).fill_(INFINITY);
      const at::Tensor x = x_all.slice(0, rank * rows, (rank + 1) * rows);
      const at::Tensor y = y_all.slice(0, rank * rows, (rank + 1) * rows);
      const at::Tensor w = w_all.slice(0, rank * rows, (rank + 1) * rows);
      const int64_t before = counter ? counter->count() : 0;
      const auto stats = trainer.step([&] {
        const at::Tensor per_row = (model->forward(x, unused && rank == 1).to(at::kFloat) - y).pow(2).mean(1);
        return (per_row * w).mean();
      });
      if (counter) collectives.push_back(counter->count() - before);
      if (stats.stepped()) {
        skipped.push_back(stats.skipped().item<bool>() ? 1 : 0);
        scales.push_back(stats.scale().item<double>());
      }
    }
    if (step + 1 == save_at) trainer.save(checkpoint);
  }

  std::ofstream out(out_path);
  out.precision(17);
  out << "{\"rank\": " << rank << ", \"world\": " << world << ", \"skipped\": [";
  for (size_t i = 0; i < skipped.size(); ++i) out << (i ? "," : "") << skipped[i];
  out << "], \"scales\": [";
  for (size_t i = 0; i < scales.size(); ++i) out << (i ? "," : "") << scales[i];
  out << "], \"collectives\": [";
  for (size_t i = 0; i < collectives.size(); ++i) out << (i ? "," : "") << collectives[i];
  out << "], \"final_scale\": " << (trainer.scaler() ? trainer.scaler()->get_scale() : 1.0);
  if (group && world == 2) {
    const auto [local, collective] = rank_local_inf(group);
    out << ", \"found_inf_local\": " << local << ", \"found_inf_collective\": " << collective;
  }
  out << ", \"state\": {";
  bool first = true;
  for (const auto& p : model->named_parameters()) {
    out << (first ? "" : ", ") << "\"" << p.key() << "\": ";
    write_floats(out, p.value());
    first = false;
  }
  for (const auto& b : model->named_buffers()) {
    out << ", \"" << b.key() << "\": ";
    write_floats(out, b.value());
  }
  out << "}}\n";
  return out.good() ? 0 : 1;
}
