"""What an install gives its users: one version, the torch it was built against (and the check of it
at import), the CMake package behind ampkit.cmake_prefix_path, ampkit inside a parent CMake project,
and type information that mypy --strict accepts."""
import glob
import importlib.util
import os
import re
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ampkit

ROOT = Path(__file__).resolve().parents[2]
TORCH_PREFIX = torch.utils.cmake_prefix_path
GENERATOR = ["-G", "Ninja"] if shutil.which("ninja") else []
needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not on PATH")


def _major_minor(version):
    return tuple(version.split("+")[0].split(".")[:2])


def _config_dir():
    hits = glob.glob(os.path.join(ampkit.cmake_prefix_path, "lib*", "cmake", "ampkit", "ampkitConfig.cmake"))
    return os.path.dirname(hits[0]) if hits else None


def _run(cmd, timeout, **kwargs):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def test_one_version():
    version = (ROOT / "VERSION").read_text().strip()
    assert ampkit.__version__ == ampkit.version.__version__ == version
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert "project(ampkit VERSION ${AMPKIT_VERSION}" in cmake and "0.1.0" not in cmake
    assert f"## [{version}]" in (ROOT / "CHANGELOG.md").read_text()


def test_records_the_torch_it_was_built_against():
    assert _major_minor(ampkit.version.torch) == _major_minor(torch.__version__)


def _import_with_recorded_torch(recorded):
    # The real ampkit/__init__.py with only the recorded build version replaced (ampkit.version is
    # put in sys.modules first, so the package's `from . import version` gets it).
    code = textwrap.dedent(f"""
        import sys, types
        fake = types.ModuleType("ampkit.version")
        fake.__version__, fake.torch = "0.1.0", {recorded!r}
        sys.modules["ampkit.version"] = fake
        import ampkit
        print(ampkit.version.torch)
    """)
    return _run([sys.executable, "-c", code], timeout=120)


def test_import_refuses_another_torch_release():
    major, minor = _major_minor(torch.__version__)
    other = f"{major}.{int(minor) - 2}.0"
    run = _import_with_recorded_torch(other)
    assert run.returncode != 0
    message = run.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: ampkit 0.1.0 was built against torch " + other)
    assert f"but torch {torch.__version__} is installed" in message
    assert "pip install --no-build-isolation" in message and f"torch=={major}.{int(minor) - 2}.*" in message


def test_import_accepts_another_patch_release():
    major, minor = _major_minor(torch.__version__)
    run = _import_with_recorded_torch(f"{major}.{minor}.99")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"{major}.{minor}.99"


def test_wheel_metadata_requires_the_torch_release():
    # setup.py's pin as the installed metadata has it (an install from this tree, editable or not).
    from importlib import metadata
    try:
        requires = metadata.requires("ampkit")
    except metadata.PackageNotFoundError:
        pytest.skip("ampkit is not installed (imported from the source tree): no metadata to check")
    major, minor = _major_minor(ampkit.version.torch)
    assert requires == [f"torch=={major}.{minor}.*"]


@needs_cmake
def test_cmake_prefix_path_serves_a_cpp_project(tmp_path):
    # The README's recipe: CMAKE_PREFIX_PATH=ampkit.cmake_prefix_path;torch.utils.cmake_prefix_path,
    # find_package(ampkit), link ampkit::ampkit, run.
    if _config_dir() is None:
        pytest.skip(f"no CMake package under ampkit.cmake_prefix_path ({ampkit.cmake_prefix_path}): ampkit is "
                    "imported from a tree that no install wrote into (pip install --no-build-isolation [-e] . does)")
    configure = _run(["cmake", "-S", str(ROOT / "tests" / "install"), "-B", str(tmp_path), *GENERATOR,
                      f"-DCMAKE_PREFIX_PATH={ampkit.cmake_prefix_path};{TORCH_PREFIX}", "-DCMAKE_BUILD_TYPE=Release"],
                     timeout=300)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    build = _run(["cmake", "--build", str(tmp_path), "-j", os.environ.get("AMPKIT_JOBS", "2")], timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    run = _run([str(tmp_path / "consumer")], timeout=120)
    assert run.returncode == 0 and "consumer: ok" in run.stdout, run.stdout + run.stderr


def test_cpp_users_share_the_library_with_the_python_module():
    # A C++ extension linked against the install's libampkit, loaded beside `import ampkit`: one copy
    # of ampkit in the process (a second would register the ampkit operators again and abort).
    libs = glob.glob(os.path.join(ampkit.cmake_prefix_path, "lib*", "libampkit.so"))
    if not libs:
        pytest.skip(f"no libampkit.so under ampkit.cmake_prefix_path ({ampkit.cmake_prefix_path})")
    code = f"import ctypes, ampkit; ctypes.CDLL({libs[0]!r}); print(ampkit.get_policy('aten::mm', 'cpu'))"
    run = _run([sys.executable, "-c", code], timeout=120)
    assert run.returncode == 0 and "lower_precision_fp" in run.stdout, run.stderr[-2000:]


@needs_cmake
def test_cmake_package_refuses_another_libtorch(tmp_path):
    # A stand-in LibTorch of another release: find_package(ampkit) must fail naming both versions.
    if _config_dir() is None:
        pytest.skip(f"no CMake package under ampkit.cmake_prefix_path ({ampkit.cmake_prefix_path})")
    major, minor = _major_minor(ampkit.version.torch)
    other = f"{major}.{int(minor) - 2}.1"
    fake = tmp_path / "fake_torch"
    fake.mkdir()
    (fake / "TorchConfig.cmake").write_text("# a LibTorch stand-in: only its version matters here\n")
    (fake / "TorchConfigVersion.cmake").write_text(
        f'set(PACKAGE_VERSION "{other}")\nset(PACKAGE_VERSION_COMPATIBLE TRUE)\n')
    configure = _run(["cmake", "-S", str(ROOT / "tests" / "install"), "-B", str(tmp_path / "build"), *GENERATOR,
                      f"-DCMAKE_PREFIX_PATH={ampkit.cmake_prefix_path}", f"-DTorch_DIR={fake}"], timeout=300)
    out = configure.stdout + configure.stderr
    assert configure.returncode != 0, out
    flat = " ".join(out.split())
    assert f"was built against LibTorch {ampkit.version.torch}, but find_package(Torch) found LibTorch {other}" in flat


@needs_cmake
@pytest.mark.parametrize("via", ["add_subdirectory", "FetchContent"])
def test_parent_project_without_find_package_torch(tmp_path, via):
    # Configure and generate only (a build of ampkit's sources takes minutes): "Target torch_cpu not
    # found" is a generate-time error; linking the library is covered by the install tests.
    args = ["cmake", "-S", str(ROOT / "tests" / "subproject"), "-B", str(tmp_path), *GENERATOR,
            f"-DCMAKE_PREFIX_PATH={TORCH_PREFIX}", f"-DAMPKIT_VIA={via}", f"-DAMPKIT_SOURCE_DIR={ROOT}",
            f"-DFETCHCONTENT_SOURCE_DIR_AMPKIT={ROOT}", f"-DPython3_EXECUTABLE={sys.executable}"]
    configure = _run(args, timeout=300)
    out = configure.stdout + configure.stderr
    assert configure.returncode == 0, out
    assert "Generating done" in out
    # ampkit's options default off below a parent project: the library alone.
    cache = (tmp_path / "CMakeCache.txt").read_text()
    assert re.search(r"^AMPKIT_BUILD_TESTS:BOOL=OFF$", cache, re.M)


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (requirements-dev.txt)")
def test_mypy_strict_accepts_typed_users(tmp_path):
    # As for an installed package, mypy reads ampkit's annotations and stubs but reports errors only in
    # the user's files (follow_imports = silent for ampkit).
    package_root = Path(ampkit.__file__).resolve().parents[1]
    site_dirs = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    # An installed ampkit is found in site-packages; one imported from a source tree, through mypy_path.
    search = "" if package_root in site_dirs else f"mypy_path = {package_root}\n"
    config = tmp_path / "mypy.ini"
    config.write_text(f"[mypy]\n{search}[mypy-ampkit.*]\nfollow_imports = silent\n")
    cache = ROOT / "build" / "mypy_cache"
    run = _run([sys.executable, "-m", "mypy", "--strict", "--config-file", str(config), "--cache-dir", str(cache),
                str(ROOT / "examples" / "train.py"), str(ROOT / "tests" / "typing" / "user_snippet.py")],
               timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr


def test_c_stub_names_what_the_module_has():
    # The stub must not drift from the bindings: same public and private names (dunders aside).
    stub = (Path(ampkit.__file__).parent / "_C.pyi").read_text()
    stubbed = set(re.findall(r"^(?:def|class) (\w+)", stub, re.M)) | set(re.findall(r"^(\w+):", stub, re.M))
    actual = {n for n in dir(ampkit._C) if not n.startswith("__")}
    assert stubbed == actual
    assert (Path(ampkit.__file__).parent / "py.typed").exists()


def test_every_subpackage_goes_into_the_wheel():
    # pyproject.toml lists the packages explicitly (the source tree's python/ampkit also holds build
    # outputs): a new subpackage missing there would be left out of the wheel.
    listed = re.search(r"^packages = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    listed = {name.strip().strip('"') for name in listed.split(",")}
    found = {".".join(p.parent.relative_to(ROOT / "python").parts) for p in (ROOT / "python" / "ampkit").rglob("__init__.py")}
    assert found == listed
