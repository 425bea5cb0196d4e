"""The documentation stays in step with the code: the README's first C++ snippet is the example
that the build compiles and CTest runs, and the API reference lists every public name.
(scripts/build_docs.sh builds the pages themselves, warnings as errors, as a stage of
scripts/run_tests.sh.)"""
import os
import re

import ampkit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read(*path):
    with open(os.path.join(ROOT, *path), encoding="utf-8") as f:
        return f.read()


def test_readme_first_cpp_snippet_is_the_compiled_example():
    first = re.search(r"```cpp\n(.*?)```", read("README.md"), re.S).group(1)
    assert first == read("examples", "readme_quickstart.cpp")


def test_python_api_page_lists_every_public_name():
    page = read("docs", "api", "python.rst")
    documented = set(re.findall(r"^\.\. auto(?:class|function|module|data):: ampkit\.(\w+)", page, re.M))
    assert set(ampkit.__all__) - documented == set()
