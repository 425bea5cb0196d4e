"""Thin driver of the CMake build: the wheel's ampkit._C, the C++ library and its CMake package, and
the Catch2 tests all come from the targets in CMakeLists.txt. The metadata is in pyproject.toml; the
version in VERSION.

Install with `pip install --no-build-isolation .` (or `-e .`): the build compiles against the torch
that is already installed, which an isolated build environment hides.

Environment variables:
  AMPKIT_BUILD_DIR    CMake build directory (default: build/)
  AMPKIT_BUILD_TESTS  1 to also build the Catch2 tests, examples and C++ benchmarks (default: 0)
  AMPKIT_BUILD_TYPE   CMake build type (default: Release)
  AMPKIT_JOBS         parallel build jobs (default: number of CPUs)
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import setuptools
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
MIN_SETUPTOOLS = (77, 0)  # pyproject.toml's build-system.requires: SPDX licence, bdist_wheel built in

if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) < MIN_SETUPTOOLS:
    # With --no-build-isolation pip does not install build-system.requires; without this check an old
    # setuptools fails with "invalid command 'bdist_wheel'" or a pyproject.toml schema error.
    sys.exit(f"ampkit's build needs setuptools>={'.'.join(map(str, MIN_SETUPTOOLS))}, got {setuptools.__version__} "
             f": run `{sys.executable} -m pip install 'setuptools>=77'` first")


def _import_torch():
    try:
        import torch
    except ImportError as e:
        isolated = any("pip-build-env" in p or "build-env-" in p for p in [sys.prefix, *sys.path])
        if isolated:
            raise RuntimeError(
                "ampkit builds against the torch you run it with, and this build runs in an isolated build "
                "environment, which hides the installed torch: build with `pip install --no-build-isolation .` "
                "(or `python -m build --no-isolation`), after `pip install 'setuptools>=77'`") from e
        raise RuntimeError(f"ampkit builds against an installed torch, and {sys.executable} cannot import torch: "
                           "install torch first, then `pip install --no-build-isolation .`") from e
    return torch


def _torch_requirement():
    # The binary works with the torch release it is compiled against only; an sdist built without
    # torch leaves the pin to the wheel built from it.
    try:
        import torch
    except ImportError:
        return ["torch"]
    major, minor = torch.__version__.split(".")[:2]
    return [f"torch=={major}.{minor}.*"]


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        # --inplace or an editable install (setuptools sets inplace for both).
        self._into_source = bool(self.inplace)
        super().run()

    def build_extension(self, ext):
        torch = _import_torch()
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("ampkit's build needs CMake >= 3.18 on PATH, and none was found: "
                               "install it (`apt-get install cmake` or `pip install cmake`)")
        # The package folder: the wheel's staging folder, or python/ampkit for --inplace and editable
        # installs (so that a later `cmake --build build` updates the module in place).
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        package_dir = ROOT / "python" / "ampkit" if self._into_source else ext_path.parent
        build_dir = Path(os.environ.get("AMPKIT_BUILD_DIR", ROOT / "build")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        extras = "ON" if os.environ.get("AMPKIT_BUILD_TESTS", "0") == "1" else "OFF"
        cmake_args = [
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('AMPKIT_BUILD_TYPE', 'Release')}",
            f"-DAMPKIT_PYTHON_OUTPUT_DIR={package_dir}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            "-DAMPKIT_BUILD_PYTHON=ON",
            "-DAMPKIT_INSTALL=ON",
            "-DAMPKIT_VERSIONED_SONAME=OFF",  # a wheel cannot hold the libampkit.so.N symlinks
            f"-DAMPKIT_BUILD_TESTS={extras}",
            f"-DAMPKIT_BUILD_EXAMPLES={extras}",
            f"-DAMPKIT_BUILD_BENCHMARKS={extras}",
        ]
        jobs = os.environ.get("AMPKIT_JOBS", str(os.cpu_count() or 1))
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *cmake_args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)
        # Headers, libampkit and the CMake package inside the Python package: ampkit.cmake_prefix_path.
        subprocess.run([cmake, "--install", str(build_dir), "--prefix", str(package_dir)], check=True)
        if self._into_source:  # where setuptools expects the module, to copy it to the source folder
            ext_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(package_dir / ext_path.name, ext_path)


setup(
    ext_modules=[CMakeExtension("ampkit._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=_torch_requirement(),
)
