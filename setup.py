"""Thin driver of the CMake build: the wheel's ampkit._C, the C++ library and the Catch2
tests all come from the targets in CMakeLists.txt.

Install with `pip install --no-build-isolation .` (or `-e .`): the build needs the torch
that is already installed, not a fresh one in an isolated environment.

Environment variables:
  AMPKIT_BUILD_DIR    CMake build directory (default: build/)
  AMPKIT_BUILD_TESTS  1 to also build the Catch2 tests, examples and C++ benchmarks (default: 0)
  AMPKIT_BUILD_TYPE   CMake build type (default: Release)
  AMPKIT_JOBS         parallel build jobs (default: number of CPUs)
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        try:
            import torch
        except ImportError as e:  # the build links against the installed LibTorch
            raise RuntimeError(
                "ampkit builds against an installed torch: `pip install torch` first, then "
                "`pip install --no-build-isolation .`"
            ) from e
        extdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(os.environ.get("AMPKIT_BUILD_DIR", ROOT / "build")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        extras = os.environ.get("AMPKIT_BUILD_TESTS", "0") == "1"
        cmake_args = [
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('AMPKIT_BUILD_TYPE', 'Release')}",
            f"-DAMPKIT_PYTHON_OUTPUT_DIR={extdir}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            "-DAMPKIT_BUILD_PYTHON=ON",
            f"-DAMPKIT_BUILD_TESTS={'ON' if extras else 'OFF'}",
            f"-DAMPKIT_BUILD_EXAMPLES={'ON' if extras else 'OFF'}",
            f"-DAMPKIT_BUILD_BENCHMARKS={'ON' if extras else 'OFF'}",
        ]
        jobs = os.environ.get("AMPKIT_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *cmake_args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


setup(
    name="ampkit",
    version="0.1.0",
    description="Mixed-precision training for LibTorch: editable autocast policies, GradScaler, fused optimizers",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    package_dir={"": "python"},
    packages=["ampkit"],
    ext_modules=[CMakeExtension("ampkit._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    install_requires=["torch>=2.3"],
    zip_safe=False,
)
