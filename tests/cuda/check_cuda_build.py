"""Build ampkit's CUDA kernels the way a CUDA LibTorch build would, on a machine whose LibTorch has no CUDA.

ampkit's CMake builds csrc/optim_lowp_cuda.cu only where LibTorch's package config has CUDA
(`TARGET torch_cuda`). That config is not what a CPU LibTorch has: find_package(Torch) then also
includes Caffe2's public/cuda.cmake, which enables CUDA, appends torch's own -gencode flags (on a
machine without a GPU, a list that starts at sm_50, which nvcc 13 refuses), --expt-* flags and
-Xcudafe suppressions to CMAKE_CUDA_FLAGS, sets CMAKE_CUDA_STANDARD to the C++ standard, and links
c10_cuda / torch_cuda. None of that runs on a CPU LibTorch, so CI would first meet a mistake there on
the GPU machine.

This script makes a LibTorch prefix that claims CUDA from the CPU one: its headers and libraries
(links), its own CMake files switched as a CUDA build generates them (Caffe2Config includes
public/cuda.cmake, TorchConfig adds the CUDA libraries, Caffe2Targets defines c10_cuda, torch_cuda
and torch_cuda_library, and torch links torch_cuda_library), and empty libc10_cuda.so /
libtorch_cuda.so. It configures ampkit against it (with CMake's default generator: under Unix
Makefiles, CMake 3.25 refused libampkit for want of a CUDA20 dialect, which Ninja never showed),
builds the kernels' object library with torch's CUDA flags and warnings as errors, and checks that:
  - configured as setup.py configures (no CMAKE_CUDA_COMPILER, no CUDA_TOOLKIT_ROOT_DIR, no CUDA_HOME or
    CUDA_PATH) with the only nvcc on PATH a wrapper script that runs the real one (the machines here
    have /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc), torch's FindCUDA is handed the
    toolkit nvcc reports (cmake/ampkitTorchPrefix.cmake; without it FindCUDA took /usr/local and
    find_package(Torch) failed);
  - CMake reports "ampkit: CUDA kernels: ON";
  - the kernels' compile line has ampkit's architectures and none of torch's -gencode flags;
  - with --link, libampkit links (CUDA::cudart, the torch_cuda interface), its module imports and
    reports cuda_kernels_built(), and tests/python/test_low_precision_cuda.py passes on it (the
    caller's Python, whose torch must be the one the prefix came from, with pytest).

With --cuda-libtorch, --torch-dir is a real CUDA LibTorch: nothing is faked, and --link imports
with the caller's Python, whose torch must be that one. --download-torch VERSION fetches PyPI's
torch==VERSION wheel alone (no CUDA libraries; 2.11.0 is the lent GPU machine's torch, 2.11.0+cu130,
about 510 MB) and uses its LibTorch so; no network: skipped. --all builds every target (the Catch2
tests, examples and benchmarks too) in the C++ standard that LibTorch asks for (C++17 before torch
2.13): ampkit's sources and headers against another release's headers. Without the CUDA libraries
the wheel's libtorch_cuda needs, executables link with --allow-shlib-undefined and nothing runs.

Usage: python tests/cuda/check_cuda_build.py --torch-dir <Torch_DIR> --source <ampkit> --work <dir>
       python tests/cuda/check_cuda_build.py --download-torch 2.11.0 --all --source <ampkit> --work <dir>
Exit 0: passed; 1: a check failed (the output says which); 77: skipped (no nvcc).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import zipfile

SKIP = 77


def replace_once(text, old, new, what):
    if text.count(old) != 1:
        raise SystemExit(f"check_cuda_build: {what}: expected the text {old!r} once in LibTorch's CMake file, "
                         f"found it {text.count(old)} times (a LibTorch whose config differs from 2.13's)")
    return text.replace(old, new)


CUDA_TARGETS = r'''# Create imported target c10_cuda
add_library(c10_cuda SHARED IMPORTED)

set_target_properties(c10_cuda PROPERTIES
  INTERFACE_INCLUDE_DIRECTORIES "${_IMPORT_PREFIX}/include"
  INTERFACE_LINK_LIBRARIES "c10;torch::cudart"
)

# Create imported target torch_cuda
add_library(torch_cuda SHARED IMPORTED)

set_target_properties(torch_cuda PROPERTIES
  INTERFACE_INCLUDE_DIRECTORIES "${_IMPORT_PREFIX}/include"
  INTERFACE_LINK_LIBRARIES "torch::cudart;c10_cuda;torch_cpu_library"
)

# Create imported target torch_cuda_library
add_library(torch_cuda_library INTERFACE IMPORTED)

set_target_properties(torch_cuda_library PROPERTIES
  INTERFACE_COMPILE_DEFINITIONS "\$<TARGET_PROPERTY:torch_cuda,INTERFACE_COMPILE_DEFINITIONS>"
  INTERFACE_INCLUDE_DIRECTORIES "\$<TARGET_PROPERTY:torch_cuda,INTERFACE_INCLUDE_DIRECTORIES>"
  INTERFACE_LINK_LIBRARIES "-Wl,--no-as-needed,\"\$<TARGET_FILE:torch_cuda>\" -Wl,--as-needed;\$<TARGET_PROPERTY:torch_cuda,INTERFACE_LINK_LIBRARIES>"
)

# Create imported target torch
'''

CUDA_IMPORTS = '''set_property(TARGET {lib} APPEND PROPERTY IMPORTED_CONFIGURATIONS RELEASE)
set_target_properties({lib} PROPERTIES
  IMPORTED_LOCATION_RELEASE "${{_IMPORT_PREFIX}}/lib/lib{lib}.so"
  IMPORTED_SONAME_RELEASE "lib{lib}.so"
  )

'''


def make_cuda_prefix(torch_dir, prefix):
    """A LibTorch prefix at `prefix` whose CMake config is the CPU one at `torch_dir` made CUDA's."""
    src = os.path.realpath(os.path.join(torch_dir, "..", "..", ".."))  # <prefix>/share/cmake/Torch
    os.makedirs(os.path.join(prefix, "lib"))
    os.symlink(os.path.join(src, "include"), os.path.join(prefix, "include"))
    for name in os.listdir(os.path.join(src, "lib")):
        os.symlink(os.path.join(src, "lib", name), os.path.join(prefix, "lib", name))
    shutil.copytree(os.path.join(src, "share", "cmake"), os.path.join(prefix, "share", "cmake"))
    stub = os.path.join(prefix, "stub.c")
    with open(stub, "w") as f:
        f.write("void ampkit_cuda_build_check_stub(void) {}\n")
    for lib in ("c10_cuda", "torch_cuda"):
        subprocess.run(["cc", "-shared", "-fPIC", f"-Wl,-soname,lib{lib}.so", "-o",
                        os.path.join(prefix, "lib", f"lib{lib}.so"), stub], check=True)

    caffe2 = os.path.join(prefix, "share", "cmake", "Caffe2")
    edit(os.path.join(caffe2, "Caffe2Config.cmake"), [
        ("if(0)\n  # The file public/cuda.cmake", "if(1)\n  # The file public/cuda.cmake", "include cuda.cmake"),
        ("set(CAFFE2_USE_CUDA 0)", "set(CAFFE2_USE_CUDA 1)", "CAFFE2_USE_CUDA"),
        ("if( AND NOT CAFFE2_USE_CUDA)", "if(1 AND NOT CAFFE2_USE_CUDA)", "the CUDA-not-found check"),
    ])
    edit(os.path.join(caffe2, "Caffe2Targets.cmake"), [
        ("torch_cpu torch_cpu_library torch torch_library)",
         "torch_cpu torch_cpu_library c10_cuda torch_cuda torch_cuda_library torch torch_library)", "target list"),
        ("# Create imported target torch\n", CUDA_TARGETS, "the CUDA targets"),
        ('INTERFACE_LINK_LIBRARIES "torch_cpu_library"\n',
         'INTERFACE_LINK_LIBRARIES "torch_cpu_library;torch_cuda_library"\n', "torch's link interface"),
    ])
    marker = "# Commands beyond this point"
    edit(os.path.join(caffe2, "Caffe2Targets-release.cmake"), [
        (marker, CUDA_IMPORTS.format(lib="c10_cuda") + CUDA_IMPORTS.format(lib="torch_cuda") + marker,
         "the CUDA libraries' locations"),
    ])
    edit(os.path.join(prefix, "share", "cmake", "Torch", "TorchConfig.cmake"), [
        ("if(0)\n  if(MSVC)\n    find_library(CAFFE2_NVRTC_LIBRARY",
         "if(1)\n  if(MSVC)\n    find_library(CAFFE2_NVRTC_LIBRARY", "TORCH_CUDA_LIBRARIES"),
    ])
    return os.path.join(prefix, "share", "cmake", "Torch")


def edit(path, replacements):
    with open(path) as f:
        text = f.read()
    for old, new, what in replacements:
        text = replace_once(text, old, new, f"{os.path.basename(path)}: {what}")
    with open(path, "w") as f:
        f.write(text)


def run(cmd, **kwargs):
    print("+", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    print(out.stdout, flush=True)
    if out.returncode != 0:
        raise SystemExit(f"check_cuda_build: `{' '.join(cmd[:3])} ...` failed with exit status {out.returncode}")
    return out.stdout


def download_torch(version, folder):
    """Torch_DIR of PyPI's torch==version wheel unpacked into folder (its include/, lib/ and share/
    only), or None where pip cannot fetch it."""
    os.makedirs(folder)
    tag = f"{sys.version_info.major}{sys.version_info.minor}"
    fetch = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "--python-version", tag, "--platform", "manylinux_2_28_x86_64", "-d", folder,
                            f"torch=={version}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wheels = [n for n in os.listdir(folder) if n.startswith(f"torch-{version}") and n.endswith(".whl")]
    if fetch.returncode != 0 or not wheels:
        print(fetch.stdout)
        return None
    wheel = os.path.join(folder, wheels[0])
    with zipfile.ZipFile(wheel) as z:
        z.extractall(folder, [n for n in z.namelist() if n.split("/")[:2] in (["torch", "include"],
                                                                              ["torch", "lib"], ["torch", "share"])])
    os.remove(wheel)
    return os.path.join(folder, "torch", "share", "cmake", "Torch")


def default_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or "nvcc"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--torch-dir", help="Torch_DIR of a LibTorch without CUDA (with --cuda-libtorch: with)")
    where.add_argument("--download-torch", metavar="VERSION",
                       help="PyPI's torch==VERSION wheel (CUDA), unpacked under --work; implies --cuda-libtorch")
    p.add_argument("--cuda-libtorch", action="store_true", help="--torch-dir has CUDA already: use it as it is")
    p.add_argument("--all", action="store_true", help="build every target (tests, examples, benchmarks)")
    p.add_argument("--source", required=True, help="ampkit's source tree")
    p.add_argument("--work", required=True, help="a folder for the prefix and the build (emptied)")
    p.add_argument("--nvcc", default=default_nvcc(),
                   help="nvcc inside a CUDA toolkit (<toolkit>/bin/nvcc: torch's FindCUDA finds the toolkit "
                        "from it); default: $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc, or nvcc on PATH")
    p.add_argument("--generator", default="Unix Makefiles" if shutil.which("make") else "Ninja",
                   help="CMake generator (default: Unix Makefiles, CMake's own default on Linux, where make exists)")
    p.add_argument("--link", action="store_true", help="also link libampkit and ampkit._C and import it")
    args = p.parse_args(argv)
    args.source, args.work = os.path.abspath(args.source), os.path.abspath(args.work)
    if not os.path.exists(args.nvcc):
        print("check_cuda_build: skipped: no nvcc")
        return SKIP
    if os.path.isdir(args.work) and os.listdir(args.work):
        if not any(os.path.isdir(os.path.join(args.work, mine)) for mine in ("bin", "libtorch-cuda", "wheel")):
            raise SystemExit(f"check_cuda_build: --work: expected an empty folder or one this script made, "
                             f"got {args.work!r}, which holds other files")
        shutil.rmtree(args.work)
    os.makedirs(args.work, exist_ok=True)
    if args.download_torch:
        if args.link:
            raise SystemExit("check_cuda_build: --link: the downloaded torch cannot be imported (no CUDA libraries)")
        args.cuda_libtorch = True
        args.torch_dir = download_torch(args.download_torch, os.path.join(args.work, "wheel"))
        if args.torch_dir is None:
            print(f"check_cuda_build: skipped: torch=={args.download_torch} could not be downloaded")
            return SKIP
    if args.cuda_libtorch:
        torch_dir = os.path.abspath(args.torch_dir)
    else:
        torch_dir = make_cuda_prefix(args.torch_dir, os.path.join(args.work, "libtorch-cuda"))
    # nvcc as these machines have it on PATH: a script that runs the toolkit's nvcc.
    wrapper_dir = os.path.join(args.work, "bin")
    os.makedirs(wrapper_dir)
    with open(os.path.join(wrapper_dir, "nvcc"), "w") as f:
        f.write(f'#!/bin/sh\nexec "{os.path.realpath(args.nvcc)}" "$@"\n')
    os.chmod(os.path.join(wrapper_dir, "nvcc"), 0o755)
    toolkit = os.path.dirname(os.path.dirname(os.path.realpath(args.nvcc)))
    build = os.path.join(args.work, "build")
    # The Python package to import the module from: ampkit's sources, _C and lib/ written by the build.
    package = os.path.join(args.work, "package", "ampkit")
    shutil.copytree(os.path.join(args.source, "python", "ampkit"), package,
                    ignore=shutil.ignore_patterns("_C*.so", "lib", "version.py", "__pycache__"))
    env = dict(os.environ, PATH=wrapper_dir + os.pathsep + os.environ.get("PATH", ""))
    for name in ("CUDA_HOME", "CUDA_PATH", "CUDA_TOOLKIT_ROOT", "CUDA_BIN_PATH", "CUDACXX"):
        env.pop(name, None)
    # No TORCH_CUDA_ARCH_LIST and no GPU: torch's own list, sm_50 first, which nvcc 13 refuses.
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    configure = run(["cmake", "-S", args.source, "-B", build, "-G", args.generator, f"-DTorch_DIR={torch_dir}",
                     "-DCMAKE_CUDA_FLAGS=-Werror all-warnings",
                     *[f"-DAMPKIT_BUILD_{what}={'ON' if args.all else 'OFF'}" for what in ("TESTS", "EXAMPLES",
                                                                                          "BENCHMARKS")],
                     *(["-DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined"] if args.download_torch else []),
                     "-DAMPKIT_INSTALL=OFF", f"-DAMPKIT_BUILD_PYTHON={'ON' if args.link or args.all else 'OFF'}",
                     f"-DAMPKIT_PYTHON_OUTPUT_DIR={package}", f"-DPython3_EXECUTABLE={sys.executable}"], env=env)
    failures = []
    if f"PyTorch: CUDA toolkit directory: {toolkit}" not in configure:
        failures.append(f"torch's FindCUDA was not handed the toolkit {toolkit} that the wrapper's nvcc reports")
    if "ampkit: CUDA kernels: ON" not in configure:
        failures.append("CMake did not report `ampkit: CUDA kernels: ON` against a LibTorch with CUDA")
    if not re.search(r"gencode.*arch=compute_50", configure):
        failures.append("torch's cuda.cmake did not add its -gencode flags (sm_50 first): the check checks nothing")
    commands = run(["cmake", "--build", build, "--target", "ampkit_cuda_kernels", "--verbose"], env=env)
    nvcc_lines = [line for line in commands.splitlines() if "optim_lowp_cuda.cu" in line and " -c " in line]
    if len(nvcc_lines) != 1:
        failures.append(f"expected one nvcc line for optim_lowp_cuda.cu in the build output, found {len(nvcc_lines)}")
    else:
        line = nvcc_lines[0]
        if "-gencode" in line or "compute_50" in line:
            failures.append(f"torch's -gencode flags reached ampkit's kernels: {line}")
        for arch in ("compute_75", "compute_80", "compute_90"):
            if arch not in line:
                failures.append(f"{arch} (AMPKIT_CUDA_ARCHITECTURES' default) missing from the nvcc line: {line}")
    if args.all and not failures:
        run(["cmake", "--build", build, "--parallel", "2"], env=env)
    if args.link and not failures:
        run(["cmake", "--build", build, "--parallel", "2"], env=env)
        # A CUDA torch has loaded libc10_cuda / libtorch_cuda by the time ampkit is imported; the
        # empty stand-ins are loaded the same way (with --cuda-libtorch, torch loads its own).
        stubs = [] if args.cuda_libtorch else [os.path.join(args.work, "libtorch-cuda", "lib", f"lib{n}.so")
                                               for n in ("c10_cuda", "torch_cuda")]
        probe = ("import ctypes, os, sys; import torch\n"
                 "for lib in sys.argv[2:]:\n"
                 "    ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)\n"
                 "sys.path.insert(0, sys.argv[1]); import ampkit, ampkit._C as C\n"
                 "assert ampkit.__file__.startswith(sys.argv[1]), ampkit.__file__\n"
                 "print('cuda_kernels_built', C._testing.cuda_kernels_built())")
        out = run([sys.executable, "-c", probe, os.path.dirname(package), *stubs])
        if "cuda_kernels_built True" not in out:
            failures.append("the module built against a LibTorch with CUDA reports cuda_kernels_built() False")
        else:
            # This build's kernels' block bodies, run on the host (the tests' emulation mode).
            test_env = dict(os.environ, PYTHONPATH=os.path.dirname(package))
            if stubs:
                test_env["LD_PRELOAD"] = " ".join(stubs)
            result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                     os.path.join(args.source, "tests", "python", "test_low_precision_cuda.py")],
                                    env=test_env, cwd=args.work)
            if result.returncode != 0:
                failures.append("tests/python/test_low_precision_cuda.py failed on the build with the CUDA kernels")
    for f in failures:
        print("check_cuda_build: FAILED:", f)
    if not failures:
        print("check_cuda_build: passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
