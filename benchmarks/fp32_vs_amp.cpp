// FP32 vs AMP for C++ LibTorch training loops: the stock FP32 loop (torch::optim::AdamW)
// against ampkit's Trainer with its fused, sync-free AdamW, in fp32 and under autocast.
//
//   fp32_vs_amp_cpp [--device cpu|cuda] [--models mlp,transformer,cnn] [--steps N] [--warmup N]
//                   [--chunk N] [--modes fp32,ampkit-fp32,ampkit-bf16,ampkit-fp16] [--json PATH]
//
// Modes run interleaved in chunks (these machines are noisy); each chunk's mean step time is a
// sample, and the table shows the median (p10/p90) of those samples, the speedup over fp32 and
// the final loss's relative difference from fp32. CPU defaults leave fp16 out: CPUs without
// AVX512-FP16 have no fast fp16 matrix product.
#include <ampkit/ampkit.h>

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace {

constexpr int64_t kClasses = 16;

struct Workload {
  std::function<std::shared_ptr<torch::nn::Module>()> build;
  std::function<torch::Tensor(torch::nn::Module&, const torch::Tensor&)> forward;
  std::vector<std::pair<torch::Tensor, torch::Tensor>> data;
  int64_t batch;
};

struct EncoderBlockImpl : torch::nn::Module {
  EncoderBlockImpl(int64_t d, int64_t heads, int64_t ff)
      : block(register_module(
            "block", torch::nn::TransformerEncoderLayer(
                         torch::nn::TransformerEncoderLayerOptions(d, heads).dim_feedforward(ff).dropout(0.0)))),
        norm(register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})))),
        head(register_module("head", torch::nn::Linear(d, kClasses))) {}
  torch::Tensor forward(const torch::Tensor& x) {  // x: (seq, batch, d), the C++ layer's layout
    return head(norm(block(x)).mean(0));
  }
  torch::nn::TransformerEncoderLayer block;
  torch::nn::LayerNorm norm;
  torch::nn::Linear head;
};
TORCH_MODULE(EncoderBlock);

// Labels come from a fixed random teacher so that the task is learnable; the data is fixed by
// the seed and the same in every mode.
Workload make_workload(const std::string& name, torch::Device device) {
  const bool cuda = device.is_cuda();
  torch::manual_seed(1234);
  Workload w;
  const int batches = 8;
  if (name == "mlp") {
    const int64_t batch = cuda ? 8192 : 256, d_in = cuda ? 4096 : 1024, hidden = cuda ? 8192 : 2048;
    auto teacher = torch::randn({d_in, kClasses});
    for (int i = 0; i < batches; ++i) {
      auto x = torch::randn({batch, d_in});
      w.data.emplace_back(x.to(device), (x.matmul(teacher)).argmax(1).to(device));
    }
    w.build = [=] {
      return std::make_shared<torch::nn::SequentialImpl>(torch::nn::Linear(d_in, hidden), torch::nn::GELU(),
                                                         torch::nn::Linear(hidden, hidden), torch::nn::GELU(),
                                                         torch::nn::Linear(hidden, kClasses));
    };
    w.forward = [](torch::nn::Module& m, const torch::Tensor& x) {
      return static_cast<torch::nn::SequentialImpl&>(m).forward(x);
    };
    w.batch = batch;
  } else if (name == "transformer") {
    const int64_t batch = cuda ? 64 : 8, seq = cuda ? 1024 : 128, d = cuda ? 2048 : 512, heads = cuda ? 16 : 8,
                  ff = cuda ? 8192 : 2048;
    auto teacher = torch::randn({d, kClasses});
    for (int i = 0; i < batches; ++i) {
      auto x = torch::randn({seq, batch, d});
      w.data.emplace_back(x.to(device), x.mean(0).matmul(teacher).argmax(1).to(device));
    }
    w.build = [=] { return std::make_shared<EncoderBlockImpl>(d, heads, ff); };
    w.forward = [](torch::nn::Module& m, const torch::Tensor& x) {
      return static_cast<EncoderBlockImpl&>(m).forward(x);
    };
    w.batch = batch;
  } else if (name == "cnn") {
    const int64_t batch = cuda ? 512 : 32, width = cuda ? 128 : 32, image = cuda ? 64 : 32;
    auto teacher = torch::randn({3, kClasses});
    for (int i = 0; i < batches; ++i) {
      auto x = torch::randn({batch, 3, image, image});
      w.data.emplace_back(x.to(device), x.mean({2, 3}).matmul(teacher).argmax(1).to(device));
    }
    w.build = [=] {
      namespace nn = torch::nn;
      auto conv = [](int64_t i, int64_t o) { return nn::Conv2d(nn::Conv2dOptions(i, o, 3).padding(1)); };
      return std::make_shared<nn::SequentialImpl>(conv(3, width), nn::BatchNorm2d(width), nn::ReLU(), nn::MaxPool2d(2),
                                                  conv(width, 2 * width), nn::BatchNorm2d(2 * width), nn::ReLU(),
                                                  nn::MaxPool2d(2), conv(2 * width, 4 * width),
                                                  nn::BatchNorm2d(4 * width), nn::ReLU(), nn::AdaptiveAvgPool2d(1),
                                                  nn::Flatten(), nn::Linear(4 * width, kClasses));
    };
    w.forward = [](torch::nn::Module& m, const torch::Tensor& x) {
      return static_cast<torch::nn::SequentialImpl&>(m).forward(x);
    };
    w.batch = batch;
  } else {
    throw std::invalid_argument("--models: expected names among mlp, transformer, cnn, got '" + name + "'");
  }
  return w;
}

// One model trained in one mode.
struct Run {
  std::string mode;
  std::shared_ptr<torch::nn::Module> model;
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  std::unique_ptr<ampkit::Trainer> trainer;  // null for the stock fp32 loop
  std::vector<double> samples_ms;
  std::vector<torch::Tensor> losses;
  int64_t steps = 0;
};

Run make_run(const std::string& mode, const Workload& w, torch::Device device) {
  Run r;
  r.mode = mode;
  torch::manual_seed(0);
  r.model = w.build();
  r.model->to(device);
  if (mode == "fp32") {
    r.optimizer = std::make_unique<torch::optim::AdamW>(r.model->parameters(), torch::optim::AdamWOptions(2e-4));
    return r;
  }
  r.optimizer = std::make_unique<ampkit::optim::AdamW>(r.model->parameters(), ampkit::optim::AdamWOptions(2e-4));
  ampkit::TrainerOptions opts(device.type());
  if (mode == "ampkit-fp32")
    opts.enabled(false);
  else if (mode == "ampkit-bf16")
    opts.dtype(torch::kBFloat16);
  else if (mode == "ampkit-fp16")
    opts.dtype(torch::kHalf);
  else
    throw std::invalid_argument("--modes: expected fp32, ampkit-fp32, ampkit-bf16 or ampkit-fp16, got '" + mode + "'");
  r.trainer = std::make_unique<ampkit::Trainer>(*r.model, *r.optimizer, opts);
  return r;
}

void train_step(Run& r, const Workload& w) {
  const auto& [x, y] = w.data[r.steps % w.data.size()];
  if (r.trainer) {
    auto stats = r.trainer->step([&] { return torch::nn::functional::cross_entropy(w.forward(*r.model, x), y); });
    r.losses.push_back(stats.loss());
  } else {
    auto loss = torch::nn::functional::cross_entropy(w.forward(*r.model, x), y);
    loss.backward();
    r.optimizer->step();
    r.optimizer->zero_grad();
    r.losses.push_back(loss.detach());
  }
  ++r.steps;
}

double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const double k = (v.size() - 1) * q;
  const size_t lo = static_cast<size_t>(std::floor(k)), hi = static_cast<size_t>(std::ceil(k));
  return v[lo] + (v[hi] - v[lo]) * (k - lo);
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> flags;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::cout << "usage: fp32_vs_amp_cpp [--device cpu|cuda] [--models mlp,transformer,cnn] [--modes ...] "
                   "[--steps N] [--warmup N] [--chunk N] [--json PATH]\n";
      return 0;
    }
    if (a.rfind("--", 0) != 0 || i + 1 >= argc) {
      std::cerr << "expected --flag VALUE pairs, got '" << a << "'\n";
      return 2;
    }
    flags[a.substr(2)] = argv[++i];
  }
  auto flag = [&](const std::string& k, const std::string& d) { return flags.count(k) ? flags[k] : d; };
  try {
    const bool cuda = flag("device", torch::cuda::is_available() ? "cuda" : "cpu") == "cuda";
    TORCH_CHECK_VALUE(!cuda || torch::cuda::is_available(), "--device cuda: no CUDA device here");
    const torch::Device device(cuda ? torch::kCUDA : torch::kCPU);
    const auto models = split(flag("models", "mlp,transformer,cnn"));
    auto modes =
        split(flag("modes", cuda ? "fp32,ampkit-fp32,ampkit-bf16,ampkit-fp16" : "fp32,ampkit-fp32,ampkit-bf16"));
    if (std::find(modes.begin(), modes.end(), "fp32") == modes.end()) modes.insert(modes.begin(), "fp32");
    const int steps = std::stoi(flag("steps", cuda ? "100" : "16"));
    const int warmup = std::stoi(flag("warmup", cuda ? "10" : "3"));
    const int chunk = std::stoi(flag("chunk", cuda ? "20" : "4"));
    TORCH_CHECK_VALUE(steps >= 1 && warmup >= 0 && chunk >= 1, "expected --steps >= 1, --warmup >= 0, --chunk >= 1");

    std::ostringstream json;
    json << "{\"device\": \"" << (cuda ? "cuda" : "cpu") << "\", \"torch\": \"" << TORCH_VERSION
         << "\", \"results\": [";
    bool first_row = true;
    std::cout << "FP32 vs AMP, C++ training loops on " << device << " (LibTorch " << TORCH_VERSION << ")\n"
              << std::left << std::setw(12) << "model" << std::setw(13) << "mode" << std::right << std::setw(9)
              << "step ms" << std::setw(9) << "p10" << std::setw(9) << "p90" << std::setw(9) << "vs fp32"
              << std::setw(10) << "loss" << std::setw(9) << "dloss"
              << "\n";
    for (const auto& name : models) {
      const Workload w = make_workload(name, device);
      std::vector<Run> runs;
      for (const auto& m : modes) runs.push_back(make_run(m, w, device));
      for (auto& r : runs)  // warm-up, untimed
        for (int i = 0; i < warmup; ++i) train_step(r, w);
      const int chunks = (steps + chunk - 1) / chunk;
      for (int c = 0; c < chunks; ++c) {
        const int n = std::min(chunk, steps - c * chunk);
        for (size_t k = 0; k < runs.size(); ++k) {
          Run& r = runs[(k + c) % runs.size()];  // rotate who goes first
          if (cuda) torch::cuda::synchronize();
          const auto t0 = std::chrono::steady_clock::now();
          for (int i = 0; i < n; ++i) train_step(r, w);
          if (cuda) torch::cuda::synchronize();
          const std::chrono::duration<double, std::milli> dt = std::chrono::steady_clock::now() - t0;
          r.samples_ms.push_back(dt.count() / n);
        }
      }
      auto final_loss = [](const Run& r) {
        double s = 0;
        const size_t k = std::min<size_t>(5, r.losses.size());
        for (size_t i = r.losses.size() - k; i < r.losses.size(); ++i) s += r.losses[i].item<double>();
        return s / k;
      };
      const double base_ms = percentile(runs[0].samples_ms, 0.5), base_loss = final_loss(runs[0]);
      for (const auto& r : runs) {
        const double med = percentile(r.samples_ms, 0.5), loss = final_loss(r);
        const double dloss = std::abs(loss - base_loss) / std::abs(base_loss);
        std::cout << std::left << std::setw(12) << name << std::setw(13) << r.mode << std::right << std::fixed
                  << std::setprecision(2) << std::setw(9) << med << std::setw(9) << percentile(r.samples_ms, 0.1)
                  << std::setw(9) << percentile(r.samples_ms, 0.9) << std::setw(8) << base_ms / med << "x"
                  << std::setprecision(4) << std::setw(10) << loss << std::setprecision(2) << std::setw(8)
                  << dloss * 100 << "%\n";
        json << (first_row ? "" : ", ") << "{\"model\": \"" << name << "\", \"mode\": \"" << r.mode
             << "\", \"step_ms\": " << med << ", \"p10_ms\": " << percentile(r.samples_ms, 0.1)
             << ", \"p90_ms\": " << percentile(r.samples_ms, 0.9) << ", \"speedup_vs_fp32\": " << base_ms / med
             << ", \"final_loss\": " << loss << ", \"loss_rel_diff\": " << dloss << "}";
        first_row = false;
      }
    }
    json << "]}\n";
    if (flags.count("json")) {
      std::ofstream(flags["json"]) << json.str();
      std::cout << "wrote " << flags["json"] << "\n";
    }
  } catch (const c10::Error& e) {
    std::cerr << e.what_without_backtrace() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 2;
  }
  return 0;
}
