"""Runs PyTorch's own AMP test files under torch and under ampkit, and compares the outcomes.

    python scripts/run_pytorch_amp_tests.py PATH/TO/pytorch/test/test_autocast.py [more files] [-k EXPR]

Each file runs twice with pytest: as it is (torch's autocast and GradScaler), and with
tests/pytorch_suites/ampkit_swap.py loaded, which points torch's public AMP names at ampkit's.
A test that passes under torch and fails under ampkit is an ampkit bug; the script lists them and
exits with 1 if there are any. PyTorch's test files are not part of this repository: take them from
a checkout of pytorch/pytorch matching the installed torch (``git checkout v2.13.0``).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def outcomes(files, swap, extra):
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "report.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", tmp, f"--junitxml={xml}",
               *files, *extra]
        env = dict(os.environ)
        if swap:
            cmd[3:3] = ["-p", "ampkit_swap"]
            env["PYTHONPATH"] = os.pathsep.join(
                [os.path.join(ROOT, "tests", "pytorch_suites"), env.get("PYTHONPATH", "")])
        subprocess.run(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            kinds = {child.tag for child in case}
            if kinds & {"failure", "error"}:
                result[name] = "failed"
            elif "skipped" in kinds:
                result[name] = "skipped"
            else:
                result[name] = "passed"
        return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="PyTorch test files")
    p.add_argument("-k", help="pytest -k expression")
    args = p.parse_args()
    files = [os.path.abspath(f) for f in args.files]
    extra = ["-k", args.k] if args.k else []
    under_torch = outcomes(files, False, extra)
    under_ampkit = outcomes(files, True, extra)
    names = sorted(set(under_torch) | set(under_ampkit))
    count = {}
    regressions = []
    for n in names:
        pair = (under_torch.get(n, "absent"), under_ampkit.get(n, "absent"))
        count[pair] = count.get(pair, 0) + 1
        if pair[0] == "passed" and pair[1] != "passed":
            regressions.append(n)
    print(f"{len(names)} tests in {', '.join(os.path.basename(f) for f in files)}")
    print(f"{'under torch':>12s} {'under ampkit':>13s} {'tests':>6s}")
    for (t, a), c in sorted(count.items()):
        print(f"{t:>12s} {a:>13s} {c:6d}")
    for n in regressions:
        print("passes under torch, not under ampkit:", n)
    sys.exit(1 if regressions else 0)


if __name__ == "__main__":
    main()
