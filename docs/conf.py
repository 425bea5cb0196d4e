"""Sphinx configuration of ampkit's documentation; scripts/build_docs.sh builds it (with -W)."""
import importlib
import os

import ampkit

project = "ampkit"
author = "the ampkit authors"
release = ampkit.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the docstrings' Google style: Args:, Returns:, Raises:
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "Doxyfile", "doxygen_mainpage.md"]  # the latter is Doxygen's
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# The integrations' pages document their classes where Lightning / accelerate are installed (the
# dev requirements install both); elsewhere the frameworks are mocked so the build still works.
def _missing(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return True
    return False


autodoc_mock_imports = [m for m in ("lightning", "accelerate") if _missing(m)]

html_theme = "alabaster"
html_theme_options = {"page_width": "1240px", "sidebar_width": "220px"}  # room for the code and tables
html_title = f"ampkit {release}"
html_static_path = []
# scripts/build_docs.sh runs Doxygen first and points here: the C++ reference lands in cpp/.
if os.environ.get("AMPKIT_DOXYGEN_DIR"):
    html_extra_path = [os.environ["AMPKIT_DOXYGEN_DIR"]]


def _policy_tables() -> str:
    """The default cast-policy tables of the installed torch, one Markdown table per device type."""
    out = []
    for device in ampkit.policy_device_types():
        table = ampkit.default_policies(device)
        by_policy = {}
        for op, policy in table.items():
            by_policy.setdefault(policy.name, []).append(op)
        out.append(f"### {device} ({len(table)} operators)\n")
        out.append("| policy | operators |\n|---|---|")
        for name, ops in sorted(by_policy.items(), key=lambda item: int(ampkit.CastPolicy.__members__[item[0]])):
            out.append(f"| `{name}` | {', '.join(f'`{op}`' for op in sorted(ops))} |")
        out.append("")
    return "\n".join(out)


def _fill_generated(app, docname, source):
    # cast_policy.md shows the tables of the torch the docs were built with, not a copy.
    if docname == "cast_policy":
        source[0] = source[0].replace("<!-- default-tables -->", _policy_tables())


def setup(app):
    app.connect("source-read", _fill_generated)
