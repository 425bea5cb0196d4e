// How much of the gradient all-reduce ampkit::dist::DataParallel (c10d::Reducer) hides behind
// backward, for the transformer model of fp32_vs_amp.cpp (one encoder block, d 512, 8 heads,
// ff 2048, batch 8 x 128 tokens; bf16 autocast). One process per rank (bench_ddp_overlap.py starts
// them); per iteration, interleaved, after a barrier that aligns the ranks:
//   backward alone:   backward with the reducer disarmed (no_sync), no communication;
//   all-reduce alone: then the same grads all-reduced in buckets of --bucket-cap-mb, not overlapped;
//   overlapped:       backward with the reducer armed, until the averaged grads are in place.
// hidden = (backward + all-reduce - overlapped) / all-reduce. Rank 0 prints medians (and --json).
//
//   MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 WORLD_SIZE=2 RANK=r ddp_overlap_cpp [--steps N] [--warmup N]
//       [--bucket-cap-mb MB] [--tiny] [--json PATH]
#include <ampkit/ampkit.h>

#include "encoder_block.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <vector>

namespace {

constexpr int64_t kClasses = 10;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> flags;
  bool tiny = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--tiny") {
      tiny = true;
    } else if (a.rfind("--", 0) == 0 && i + 1 < argc) {
      flags[a.substr(2)] = argv[++i];
    } else {
      std::cerr << "expected --flag VALUE pairs or --tiny, got '" << a << "'\n";
      return 2;
    }
  }
  const int steps = std::stoi(flags.count("steps") ? flags["steps"] : "20");
  const int warmup = std::stoi(flags.count("warmup") ? flags["warmup"] : "3");
  const double cap_mb = std::stod(flags.count("bucket-cap-mb") ? flags["bucket-cap-mb"] : "25");

  auto group = ampkit::dist::init_process_group();
  const int64_t batch = tiny ? 2 : 8, seq = tiny ? 8 : 128, d = tiny ? 32 : 512, heads = tiny ? 4 : 8,
                ff = tiny ? 64 : 2048;
  torch::manual_seed(1234 + group->getRank());
  EncoderBlock model(d, heads, ff, kClasses);
  const auto x = torch::randn({seq, batch, d});
  const auto y = torch::randint(kClasses, {batch});
  ampkit::dist::DataParallel ddp(*model, group, ampkit::dist::DataParallelOptions().bucket_cap_mb(cap_mb));
  const auto params = model->parameters();

  auto forward_loss = [&] {
    ampkit::AutocastGuard guard(c10::kCPU, at::kBFloat16);
    return torch::cross_entropy_loss(model->forward(x).to(at::kFloat), y);
  };
  auto zero_grads = [&] {
    for (auto& p : params) p.mutable_grad() = at::Tensor();
  };
  auto barrier = [&] { group->barrier()->wait(); };
  // The grads all-reduced as the reducer would, in buckets of the cap (flattened, averaged).
  const auto cap_bytes = static_cast<int64_t>(cap_mb * 1024 * 1024);
  auto all_reduce_grads = [&] {
    std::vector<std::vector<at::Tensor>> buckets(1);
    int64_t bytes = 0;
    for (auto it = params.rbegin(); it != params.rend(); ++it) {
      if (bytes > 0 && bytes + it->grad().nbytes() > static_cast<size_t>(cap_bytes)) {
        buckets.emplace_back();
        bytes = 0;
      }
      buckets.back().push_back(it->grad());
      bytes += static_cast<int64_t>(it->grad().nbytes());
    }
    std::vector<at::Tensor> flats;
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    for (auto& b : buckets) {
      std::vector<at::Tensor> views;
      for (auto& g : b) views.push_back(g.view(-1));
      std::vector<at::Tensor> flat{torch::cat(views).div_(group->getSize())};
      works.push_back(group->allreduce(flat));
      flats.push_back(flat[0]);
    }
    for (auto& w : works) w->wait();
  };

  std::vector<double> backward_alone, all_reduce_alone, overlapped;
  for (int it = 0; it < warmup + steps; ++it) {
    {
      auto no_sync = ddp.no_sync();
      ddp.pre_forward();
      auto loss = forward_loss();
      ddp.post_forward({loss});
      barrier();
      const double t0 = now_ms();
      loss.backward();
      const double t1 = now_ms();
      barrier();
      const double t2 = now_ms();
      all_reduce_grads();
      const double t3 = now_ms();
      if (it >= warmup) {
        backward_alone.push_back(t1 - t0);
        all_reduce_alone.push_back(t3 - t2);
      }
      zero_grads();
    }
    {
      ddp.pre_forward();
      auto loss = forward_loss();
      ddp.post_forward({loss});
      barrier();
      const double t0 = now_ms();
      loss.backward();  // returns once the reducer's buckets are reduced and copied back
      const double t1 = now_ms();
      if (it >= warmup) overlapped.push_back(t1 - t0);
      zero_grads();
    }
  }

  if (group->getRank() == 0) {
    const double b = median(backward_alone), a = median(all_reduce_alone), o = median(overlapped);
    const double hidden = a > 0 ? (b + a - o) / a : 0.0;
    int64_t numel = 0;
    for (const auto& p : params) numel += p.numel();
    std::printf("world size %lld, %lld parameters (%.1f MB fp32 grads), bucket cap %.0f MB, %d steps (medians):\n",
                static_cast<long long>(group->getSize()), static_cast<long long>(numel), numel * 4.0 / 1e6, cap_mb,
                steps);
    std::printf(
        "  backward alone      %8.1f ms\n  all-reduce alone    %8.1f ms\n  sum                 %8.1f ms\n"
        "  backward+all-reduce %8.1f ms (overlapped)\n  hidden              %7.0f %% of the all-reduce\n",
        b, a, b + a, o, 100.0 * hidden);
    if (flags.count("json")) {
      std::ofstream out(flags["json"]);
      out << "{\"world_size\": " << group->getSize() << ", \"parameters\": " << numel
          << ", \"bucket_cap_mb\": " << cap_mb << ", \"steps\": " << steps << ", \"backward_ms\": " << b
          << ", \"all_reduce_ms\": " << a << ", \"overlapped_ms\": " << o << ", \"hidden_fraction\": " << hidden
          << "}\n";
    }
  }
  barrier();
  return 0;
}
