// FP32 vs AMP for C++ LibTorch training loops, with each gain measured against the loop that
// differs from it in one thing only:
//
//   fp32          the stock loop: forward, backward, torch::optim::AdamW (not fused), zero_grad
//   torch-bf16    the same loop with the forward under LibTorch's own autocast (at::autocast's
//                 free functions, as torch.autocast does them): what a C++ user has today
//   ampkit-fp32   ampkit::Trainer with ampkit::optim::AdamW (fused), autocast off
//   ampkit-bf16   the same trainer under ampkit's autocast; ampkit-fp16 (CUDA default) with its scaler
//   ampkit-bf16-master  bf16 parameters (ampkit::cast_model; norm layers stay float32), the same
//                 trainer under ampkit's autocast, AdamW with master_weights(true) (float32 masters
//                 and states in the optimizer)
//   ampkit-bf16-sr      the same with stochastic_rounding(true).state_dtype(kBFloat16) (no master,
//                 bf16 states; CPU only)
//   X-control     a second, identical copy of mode X: its ratio to X is the noise band
//
// So: AMP gain = ampkit-fp32 / ampkit-bf16 (same optimizer, autocast on or off); the trainer and
// fused optimizer's gain = fp32 / ampkit-fp32; gain over the stock loop = fp32 / ampkit-bf16;
// ampkit-bf16 vs torch-bf16 = what switching from LibTorch's autocast loop to ampkit gives. There
// is no torch-fp16: LibTorch has no C++ GradScaler. The -master and -sr modes are compared with
// torch-bf16 (their peer) and with ampkit-fp32 (their AMP baseline, the same trainer).
//
//   fp32_vs_amp_cpp [--device cpu|cuda] [--models mlp,transformer,cnn] [--modes ...] [--steps N]
//                   [--warmup N] [--chunk N] [--tiny] [--json PATH]
//
// Modes run interleaved in chunks of --chunk steps (these machines are noisy), rotating which goes
// first; each chunk's mean step time is a sample (steps / chunk samples per mode), and the table
// shows the median (p10/p90) of those samples. Every sample has a wall time and a CPU time: the
// process's (CLOCK_PROCESS_CPUTIME_ID, all threads), because torch's CPU ops run on its intra-op
// worker threads and the calling thread's CPU time would leave their share out. CPU defaults leave
// fp16 out: CPUs without AVX512-FP16 have no fast fp16 matrix product; CUDA defaults leave
// ampkit-bf16-sr out (a CPU kernel).
#include <ampkit/ampkit.h>

#include "encoder_block.h"

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr int64_t kClasses = 16;
const std::string kControl = "-control";

struct Workload {
  std::function<std::shared_ptr<torch::nn::Module>()> build;
  std::function<torch::Tensor(torch::nn::Module&, const torch::Tensor&)> forward;
  std::vector<std::pair<torch::Tensor, torch::Tensor>> data;
  int64_t batch;
};

// Labels come from a fixed random teacher so that the task is learnable; the data is fixed by
// the seed and the same in every mode.
// Sizes: CPU defaults finish in about a minute per model on 2 cores, CUDA ones fill a GPU; --tiny
// (a smoke test) runs every mode in seconds anywhere. The same sizes as benchmarks/fp32_vs_amp.py.
Workload make_workload(const std::string& name, torch::Device device, bool tiny) {
  const bool cuda = device.is_cuda() && !tiny;
  torch::manual_seed(1234);
  Workload w;
  const int batches = 8;
  const auto size = [&](int64_t tiny_size, int64_t cuda_size, int64_t cpu_size) {
    return tiny ? tiny_size : cuda ? cuda_size : cpu_size;
  };
  if (name == "mlp") {
    const int64_t batch = size(32, 8192, 256), d_in = size(64, 4096, 1024), hidden = size(64, 8192, 2048);
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
    const int64_t batch = size(4, 64, 8), seq = size(16, 1024, 128), d = size(32, 2048, 512), heads = size(4, 16, 8),
                  ff = size(64, 8192, 2048);
    auto teacher = torch::randn({d, kClasses});
    for (int i = 0; i < batches; ++i) {
      auto x = torch::randn({seq, batch, d});
      w.data.emplace_back(x.to(device), x.mean(0).matmul(teacher).argmax(1).to(device));
    }
    w.build = [=] { return std::make_shared<EncoderBlockImpl>(d, heads, ff, kClasses); };
    w.forward = [](torch::nn::Module& m, const torch::Tensor& x) {
      return static_cast<EncoderBlockImpl&>(m).forward(x);
    };
    w.batch = batch;
  } else if (name == "cnn") {
    const int64_t batch = size(4, 512, 32), width = size(4, 128, 32), image = size(8, 64, 32);
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

// LibTorch's autocast region as a C++ user writes it today: what torch.autocast's __enter__ and
// __exit__ do through the same at::autocast functions (the cast cache is cleared when the
// outermost region exits).
class TorchAutocast {
 public:
  TorchAutocast(c10::DeviceType type, c10::ScalarType dtype)
      : type_(type),
        prev_enabled_(at::autocast::is_autocast_enabled(type)),
        prev_dtype_(at::autocast::get_autocast_dtype(type)) {
    at::autocast::set_autocast_enabled(type_, true);
    at::autocast::set_autocast_dtype(type_, dtype);
    at::autocast::increment_nesting();
  }
  ~TorchAutocast() {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(type_, prev_enabled_);
    at::autocast::set_autocast_dtype(type_, prev_dtype_);
  }
  TorchAutocast(const TorchAutocast&) = delete;
  TorchAutocast& operator=(const TorchAutocast&) = delete;

 private:
  c10::DeviceType type_;
  bool prev_enabled_;
  c10::ScalarType prev_dtype_;
};

std::string base_mode(const std::string& mode) {
  const bool control =
      mode.size() > kControl.size() && mode.compare(mode.size() - kControl.size(), kControl.size(), kControl) == 0;
  return control ? mode.substr(0, mode.size() - kControl.size()) : mode;
}

// The mode whose time this one's is divided by in "vs peer": the torch loop of the same precision
// for ampkit's modes (fp32 for ampkit-fp32, torch-bf16 for ampkit-bf16-master and -sr), the
// original for a control copy; empty for the rest.
std::string peer_mode(const std::string& mode) {
  if (base_mode(mode) != mode) return base_mode(mode);
  if (mode == "ampkit-fp32") return "fp32";
  if (mode.rfind("ampkit-", 0) == 0) {
    const std::string precision =
        mode.substr(7, mode.find('-', 7) == std::string::npos ? std::string::npos : mode.find('-', 7) - 7);
    return "torch-" + precision;
  }
  return "";
}

// The fp32 mode of the same loop, for the AMP gain: fp32 for torch-bf16, ampkit-fp32 for ampkit's.
std::string amp_baseline(const std::string& mode) {
  const std::string base = base_mode(mode);
  if (base == "torch-bf16") return "fp32";
  if (base == "ampkit-bf16" || base == "ampkit-fp16" || base == "ampkit-bf16-master" || base == "ampkit-bf16-sr")
    return "ampkit-fp32";
  return "";
}

// One model trained in one mode.
struct Run {
  std::string mode;
  std::shared_ptr<torch::nn::Module> model;
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  std::unique_ptr<ampkit::Trainer> trainer;       // null for the stock loops
  std::optional<c10::ScalarType> torch_autocast;  // the stock loop's autocast dtype, if any
  std::vector<double> wall_ms, cpu_ms;            // one sample per chunk: mean per step
  std::vector<torch::Tensor> losses;
  int64_t steps = 0;
};

Run make_run(const std::string& mode, const Workload& w, torch::Device device) {
  Run r;
  r.mode = mode;
  torch::manual_seed(0);
  r.model = w.build();
  r.model->to(device);
  const std::string base = base_mode(mode);
  if (base == "fp32" || base == "torch-bf16") {
    r.optimizer = std::make_unique<torch::optim::AdamW>(r.model->parameters(), torch::optim::AdamWOptions(2e-4));
    if (base == "torch-bf16") r.torch_autocast = torch::kBFloat16;
    return r;
  }
  auto adamw = ampkit::optim::AdamWOptions(2e-4);
  ampkit::TrainerOptions opts(device.type());
  if (base == "ampkit-fp32") {
    opts.enabled(false);
  } else if (base == "ampkit-bf16") {
    opts.dtype(torch::kBFloat16);
  } else if (base == "ampkit-fp16") {
    opts.dtype(torch::kHalf);
  } else if (base == "ampkit-bf16-master" || base == "ampkit-bf16-sr") {
    // bf16 parameters (the norm layers stay float32), the optimizer keeps float32 masters or
    // rounds stochastically with bf16 states.
    ampkit::cast_model(*r.model, c10::kBFloat16);
    if (base == "ampkit-bf16-master")
      adamw.master_weights(true);
    else
      adamw.stochastic_rounding(true).state_dtype(c10::kBFloat16).seed(0);
    opts.dtype(torch::kBFloat16);
  } else {
    throw std::invalid_argument(
        "--modes: expected fp32, torch-bf16, ampkit-fp32, ampkit-bf16, ampkit-fp16, ampkit-bf16-master or "
        "ampkit-bf16-sr, each optionally with '" +
        kControl + "' appended, got '" + mode + "'");
  }
  r.optimizer = std::make_unique<ampkit::optim::AdamW>(r.model->parameters(), adamw);
  r.trainer = std::make_unique<ampkit::Trainer>(*r.model, *r.optimizer, opts);
  return r;
}

void train_step(Run& r, const Workload& w, torch::Device device) {
  const auto& [x, y] = w.data[r.steps % w.data.size()];
  if (r.trainer) {
    auto stats = r.trainer->step([&] { return torch::nn::functional::cross_entropy(w.forward(*r.model, x), y); });
    r.losses.push_back(stats.loss());
  } else {
    torch::Tensor loss;
    if (r.torch_autocast) {
      TorchAutocast region(device.type(), *r.torch_autocast);
      loss = torch::nn::functional::cross_entropy(w.forward(*r.model, x), y);
    } else {
      loss = torch::nn::functional::cross_entropy(w.forward(*r.model, x), y);
    }
    loss.backward();
    r.optimizer->step();
    r.optimizer->zero_grad();
    r.losses.push_back(loss.detach());
  }
  ++r.steps;
}

// How busy other processes kept the machine while the benchmark ran, in cores: the machine's busy
// CPU time (/proc/stat) minus this process's own, over the wall time; as benchmarks/_common.py's
// OtherLoad. Resolution: the kernel's tick (10 ms).
class OtherLoad {
 public:
  OtherLoad() : machine0_(machine_busy_s()), own0_(own_cpu_s()), wall0_(std::chrono::steady_clock::now()) {}
  std::optional<double> cores() const {
    const double machine1 = machine_busy_s(), own1 = own_cpu_s();
    const std::chrono::duration<double> wall = std::chrono::steady_clock::now() - wall0_;
    if (std::isnan(machine0_) || std::isnan(machine1) || wall.count() <= 0) return std::nullopt;
    return std::max(0.0, (machine1 - machine0_) - (own1 - own0_)) / wall.count();
  }

 private:
  static double machine_busy_s() {
    std::ifstream f("/proc/stat");
    std::string cpu;
    double v[8];
    f >> cpu;
    for (double& x : v) f >> x;  // user nice system idle iowait irq softirq steal
    if (!f || cpu != "cpu") return NAN;
    double busy = 0;
    for (int i = 0; i < 8; ++i)
      if (i != 3 && i != 4) busy += v[i];
    return busy / static_cast<double>(sysconf(_SC_CLK_TCK));
  }
  static double own_cpu_s() {
    rusage u{};
    getrusage(RUSAGE_SELF, &u);
    return u.ru_utime.tv_sec + u.ru_stime.tv_sec + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) * 1e-6;
  }
  double machine0_, own0_;
  std::chrono::steady_clock::time_point wall0_;
};

double process_cpu_ms() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const double k = (v.size() - 1) * q;
  const size_t lo = static_cast<size_t>(std::floor(k)), hi = static_cast<size_t>(std::ceil(k));
  return v[lo] + (v[hi] - v[lo]) * (k - lo);
}

double median(const std::vector<double>& v) { return percentile(v, 0.5); }

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

// /proc/cpuinfo's value of \p field on the first processor ("" where there is none).
std::string cpuinfo(const std::string& field) {
  std::ifstream f("/proc/cpuinfo");
  for (std::string line; std::getline(f, line);) {
    const auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string key = line.substr(0, colon);
    key.erase(key.find_last_not_of(" \t") + 1);
    if (key == field) return line.substr(std::min(colon + 2, line.size()));
  }
  return "";
}

// The vector extensions that pick ATen's and ampkit's kernels: benchmarks/_common.py's VECTOR_FLAGS.
std::vector<std::string> cpu_flags() {
  static const char* wanted[] = {"avx2",     "f16c",        "fma",         "avx512f",  "avx512bw",
                                 "avx512vl", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16"};
  std::set<std::string> have;
  std::istringstream ss(cpuinfo("flags"));
  for (std::string f; ss >> f;) have.insert(f);
  std::vector<std::string> out;
  for (const char* w : wanted)
    if (have.count(w)) out.emplace_back(w);
  return out;
}

std::string json_string(const std::string& s) {
  std::ostringstream out;
  out << '"';
  for (const char c : s) {
    if (c == '"' || c == '\\')
      out << '\\' << c;
    else if (static_cast<unsigned char>(c) < 0x20)
      out << "\\u" << std::hex << std::setw(4) << std::setfill('0') << static_cast<int>(c) << std::dec;
    else
      out << c;
  }
  out << '"';
  return out.str();
}

// A JSON number, or null where there is none (a ratio without its peer, a NaN loss).
std::string json_number(std::optional<double> v) {
  if (!v || !std::isfinite(*v)) return "null";
  std::ostringstream out;
  out << std::setprecision(9) << *v;
  return out.str();
}

std::string fmt(std::optional<double> v, int precision, const std::string& suffix = "") {
  if (!v) return "-";
  std::ostringstream out;
  out << std::fixed << std::setprecision(precision) << *v << suffix;
  return out.str();
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> flags;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::cout << "usage: fp32_vs_amp_cpp [--device cpu|cuda] [--models mlp,transformer,cnn] [--modes ...] "
                   "[--steps N] [--warmup N] [--chunk N] [--tiny] [--json PATH]\n"
                   "modes: fp32, torch-bf16, ampkit-fp32, ampkit-bf16, ampkit-fp16, ampkit-bf16-master, "
                   "ampkit-bf16-sr,\neach optionally with '-control' "
                   "appended (a second, identical copy). CPU default: steps 40, chunk 2 (20 samples per mode).\n";
      return 0;
    }
    if (a == "--tiny") {
      flags["tiny"] = "1";
      continue;
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
    const bool tiny = flags.count("tiny") > 0;
    const auto models = split(flag("models", "mlp,transformer,cnn"));
    auto modes = split(flag("modes", cuda ? "fp32,torch-bf16,torch-bf16-control,ampkit-fp32,ampkit-bf16,ampkit-fp16,"
                                            "ampkit-bf16-master"
                                          : "fp32,torch-bf16,torch-bf16-control,ampkit-fp32,ampkit-bf16,"
                                            "ampkit-bf16-master,ampkit-bf16-sr"));
    if (std::find(modes.begin(), modes.end(), "fp32") == modes.end()) modes.insert(modes.begin(), "fp32");
    static const std::set<std::string> known = {"fp32",        "torch-bf16",         "ampkit-fp32",   "ampkit-bf16",
                                                "ampkit-fp16", "ampkit-bf16-master", "ampkit-bf16-sr"};
    for (const auto& m : modes)
      TORCH_CHECK_VALUE(known.count(base_mode(m)), "--modes: expected fp32, torch-bf16, ampkit-fp32, ampkit-bf16, ",
                        "ampkit-fp16, ampkit-bf16-master or ampkit-bf16-sr, each optionally with '", kControl,
                        "' appended, got '", m, "'");
    for (const auto& m : modes)
      TORCH_CHECK_VALUE(!cuda || base_mode(m) != "ampkit-bf16-sr", "--modes: '", m,
                        "' needs --device cpu (ampkit's stochastic rounding is a CPU kernel)");
    for (const auto& m : modes)
      TORCH_CHECK_VALUE(std::count(modes.begin(), modes.end(), m) == 1, "--modes: '", m,
                        "' twice (a second copy of a mode is '", m, kControl, "')");
    const int steps = std::stoi(flag("steps", cuda ? "100" : "40"));
    const int warmup = std::stoi(flag("warmup", cuda ? "10" : "3"));
    const int chunk = std::stoi(flag("chunk", cuda ? "5" : "2"));
    TORCH_CHECK_VALUE(steps >= 1 && warmup >= 0 && chunk >= 1, "expected --steps >= 1, --warmup >= 0, --chunk >= 1");
    const int chunks = (steps + chunk - 1) / chunk;

    std::ostringstream json;
    json << "{\"benchmark\": \"fp32_vs_amp_cpp\", \"device\": " << json_string(cuda ? "cuda" : "cpu")
         << ", \"cpu\": " << json_string(cpuinfo("model name").empty() ? "unknown" : cpuinfo("model name"))
         << ", \"cpu_flags\": [";
    const auto vector_flags = cpu_flags();
    for (size_t i = 0; i < vector_flags.size(); ++i) json << (i ? ", " : "") << json_string(vector_flags[i]);
    json << "], \"cpu_count\": " << std::thread::hardware_concurrency() << ", \"torch\": " << json_string(TORCH_VERSION)
         << ", \"threads\": " << at::get_num_threads() << ", \"cpu_clock\": \"process\", \"cpu_clock_doc\": "
         << json_string("CLOCK_PROCESS_CPUTIME_ID: CPU time of all the process's threads")
         << ", \"tiny\": " << (tiny ? "true" : "false") << ", \"steps\": " << steps << ", \"warmup\": " << warmup
         << ", \"chunk\": " << chunk << ", \"samples\": " << chunks << ", \"modes\": [";
    for (size_t i = 0; i < modes.size(); ++i) json << (i ? ", " : "") << json_string(modes[i]);
    json << "], \"results\": [";
    bool first_row = true;
    std::cout << "FP32 vs AMP, C++ training loops on " << device << " (LibTorch " << TORCH_VERSION << ", "
              << at::get_num_threads() << " threads), " << chunks << " samples of " << chunk
              << " steps per mode; times are medians of wall / process CPU ms per step\n"
              << std::left << std::setw(12) << "model" << std::setw(20) << "mode" << std::right << std::setw(9)
              << "wall ms" << std::setw(9) << "p10" << std::setw(9) << "p90" << std::setw(9) << "cpu ms" << std::setw(9)
              << "vs fp32" << std::setw(9) << "AMP" << std::setw(9) << "vs peer" << std::setw(10) << "loss"
              << std::setw(9) << "dloss"
              << "\n";
    const OtherLoad other_load;
    for (const auto& name : models) {
      const Workload w = make_workload(name, device, tiny);
      std::vector<Run> runs;
      for (const auto& m : modes) runs.push_back(make_run(m, w, device));
      for (auto& r : runs)  // warm-up, untimed
        for (int i = 0; i < warmup; ++i) train_step(r, w, device);
      for (int c = 0; c < chunks; ++c) {
        const int n = std::min(chunk, steps - c * chunk);
        for (size_t k = 0; k < runs.size(); ++k) {
          Run& r = runs[(k + c) % runs.size()];  // rotate who goes first
          if (cuda) torch::cuda::synchronize();
          const double c0 = process_cpu_ms();
          const auto t0 = std::chrono::steady_clock::now();
          for (int i = 0; i < n; ++i) train_step(r, w, device);
          if (cuda) torch::cuda::synchronize();
          const std::chrono::duration<double, std::milli> dt = std::chrono::steady_clock::now() - t0;
          const double c1 = process_cpu_ms();
          r.wall_ms.push_back(dt.count() / n);
          r.cpu_ms.push_back((c1 - c0) / n);
        }
      }
      auto final_loss = [](const Run& r) {
        double s = 0;
        const size_t k = std::min<size_t>(5, r.losses.size());
        for (size_t i = r.losses.size() - k; i < r.losses.size(); ++i) s += r.losses[i].item<double>();
        return s / k;
      };
      std::map<std::string, const Run*> by_mode;
      for (const auto& r : runs) by_mode[r.mode] = &r;
      // time(of) / time(r) on wall and CPU medians: a speed-up of r over `of` (none if `of` did not run).
      auto gain = [&](const std::string& of, const Run& r, bool cpu_time) -> std::optional<double> {
        if (of.empty() || !by_mode.count(of)) return std::nullopt;
        const Run& o = *by_mode[of];
        return cpu_time ? median(o.cpu_ms) / median(r.cpu_ms) : median(o.wall_ms) / median(r.wall_ms);
      };
      auto over = [&](const std::string& of, const Run& r, bool cpu_time) -> std::optional<double> {
        const auto g = gain(of, r, cpu_time);
        if (!g) return std::nullopt;
        return 1.0 / *g;
      };
      const double base_loss = final_loss(*by_mode["fp32"]);
      for (const auto& r : runs) {
        const double loss = final_loss(r);
        const double dloss = std::abs(loss - base_loss) / std::abs(base_loss);
        const std::string peer = by_mode.count(peer_mode(r.mode)) ? peer_mode(r.mode) : "";
        const std::string amp_base = by_mode.count(amp_baseline(r.mode)) ? amp_baseline(r.mode) : "";
        std::cout << std::left << std::setw(12) << name << std::setw(20) << r.mode << std::right << std::setw(9)
                  << fmt(median(r.wall_ms), 2) << std::setw(9) << fmt(percentile(r.wall_ms, 0.1), 2) << std::setw(9)
                  << fmt(percentile(r.wall_ms, 0.9), 2) << std::setw(9) << fmt(median(r.cpu_ms), 2) << std::setw(9)
                  << fmt(gain("fp32", r, false), 2, "x") << std::setw(9) << fmt(gain(amp_base, r, false), 2, "x")
                  << std::setw(9) << fmt(over(peer, r, false), 3) << std::setw(10) << fmt(loss, 4) << std::setw(8)
                  << fmt(dloss * 100, 2) << "%\n";
        json << (first_row ? "" : ", ") << "{\"model\": " << json_string(name) << ", \"mode\": " << json_string(r.mode)
             << ", \"samples\": " << r.wall_ms.size() << ", \"step_ms\": " << json_number(median(r.wall_ms))
             << ", \"p10_ms\": " << json_number(percentile(r.wall_ms, 0.1))
             << ", \"p90_ms\": " << json_number(percentile(r.wall_ms, 0.9))
             << ", \"cpu_ms\": " << json_number(median(r.cpu_ms))
             << ", \"cpu_p10_ms\": " << json_number(percentile(r.cpu_ms, 0.1))
             << ", \"cpu_p90_ms\": " << json_number(percentile(r.cpu_ms, 0.9))
             << ", \"speedup_vs_fp32\": " << json_number(gain("fp32", r, false))
             << ", \"speedup_vs_fp32_cpu\": " << json_number(gain("fp32", r, true))
             << ", \"amp_baseline\": " << (amp_base.empty() ? "null" : json_string(amp_base))
             << ", \"amp_gain\": " << json_number(gain(amp_base, r, false))
             << ", \"amp_gain_cpu\": " << json_number(gain(amp_base, r, true))
             << ", \"peer\": " << (peer.empty() ? "null" : json_string(peer))
             << ", \"ratio_vs_peer\": " << json_number(over(peer, r, false))
             << ", \"ratio_vs_peer_cpu\": " << json_number(over(peer, r, true))
             << ", \"final_loss\": " << json_number(loss) << ", \"loss_rel_diff\": " << json_number(dloss) << "}";
        first_row = false;
      }
    }
    json << "], \"other_load_cores\": " << json_number(other_load.cores());
    json << "}\n";
    if (flags.count("json")) {
      std::ofstream out(flags["json"]);
      out << json.str();
      TORCH_CHECK(out.good(), "could not write ", flags["json"]);
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
