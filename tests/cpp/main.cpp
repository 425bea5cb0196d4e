// Catch2's main, plus a skip that Catch2 v2 lacks: the CUDA cases (tagged [cuda]) are a CTest test
// of their own, which exits with kSkipped when no CUDA device is present, so that CTest reports
// them as skipped rather than passed (tests/cpp/CMakeLists.txt).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <torch/cuda.h>

#include <cstring>
#include <iostream>

namespace {
constexpr int kSkipped = 77;
}

int main(int argc, char* argv[]) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "[cuda]") == 0 && !torch::cuda::is_available()) {
      std::cout << "no CUDA device: the [cuda] cases are skipped\n";
      return kSkipped;
    }
  }
  return Catch::Session().run(argc, argv);
}
