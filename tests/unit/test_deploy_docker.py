"""Dockerfiles: what can be checked without a Docker engine (none here; deploy/README.md says what was not
exercised). Each image is built by docker/install.sh with its profile, runs as a numeric non-root user,
has the venv (and so `sari-ray`) on PATH, and pins no Python package itself: any version it mentions is
the one in docker/requirements/*.txt. The images also carry what the manifests run in them."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
PROFILES = ("cpu", "gpu")


def instructions(profile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (DOCKER / f"Dockerfile.{profile}").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip())
            for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)]


def env_of(profile: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in instructions(profile):
        if op == "ENV":
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                env[key] = value.replace("$PATH", env.get("PATH", "$PATH"))
    return env


def pins(profile: str) -> dict[str, str]:
    """Package name (lower case, extras dropped) -> pinned version, from the files the profile installs."""
    found: dict[str, str] = {}
    for path in (DOCKER / "requirements").glob("*.txt"):
        if path.stem not in ("common", profile, f"{profile}-nodeps"):
            continue
        for line in path.read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^,;\s]+)", line.strip())
            if m:
                found[m.group(1).lower()] = m.group(3)
    return found


@pytest.mark.parametrize("profile", PROFILES)
def test_built_by_the_install_script_with_its_profile(profile):
    ops = instructions(profile)
    runs = [args for op, args in ops if op == "RUN"]
    assert any(re.search(rf"\bbash \S*docker/install\.sh {profile}\b", r) for r in runs)
    assert not any(re.search(r"docker/install\.sh (cpu|gpu)\b", r) and f"install.sh {profile}" not in r for r in runs)
    copy = next(args for op, args in ops if op == "COPY")
    assert copy.split()[0] == "."  # the whole repository: install.sh installs sari-ray itself from it
    assert not any(re.search(r"\bpip3? install\b|\bpython3?(\.\d+)? -m pip\b", r) for r in runs), \
        "install Python packages through docker/install.sh only"


@pytest.mark.parametrize("profile", PROFILES)
def test_runs_as_a_numeric_non_root_user(profile):
    users = [args for op, args in instructions(profile) if op == "USER"]
    assert users, "no USER instruction"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and uid != "0"  # numeric, so Kubernetes' runAsNonRoot can verify it
    from sari_ray.deploy.k8s import USER_ID

    assert int(uid) == USER_ID  # the manifests run as this uid and own the volumes with it (fsGroup)


@pytest.mark.parametrize("profile", PROFILES)
def test_the_venv_and_so_sari_ray_are_on_path(profile):
    env = env_of(profile)
    venv = env["SARI_RAY_VENV"]
    assert env["PATH"].split(":")[0] == f"{venv}/bin"
    assert "sari-ray=sari_ray.cli:main" in (REPO / "setup.py").read_text().replace(" ", "")


@pytest.mark.parametrize("profile", PROFILES)
def test_versions_mentioned_are_the_pinned_ones(profile):
    """Any `package==version` or `package version` the Dockerfile names (comments included) matches the
    pins; the base image is pinned to a version tag."""
    text = (DOCKER / f"Dockerfile.{profile}").read_text()
    for name, version in pins(profile).items():
        for mentioned in re.findall(rf"(?<![\w-]){re.escape(name)}(?:==|\s+v?)(\d[\w.+]*)", text, re.I):
            assert mentioned == version, f"Dockerfile.{profile} mentions {name} {mentioned}, pinned {version}"
    base = next(args for op, args in instructions(profile) if op == "FROM").split()[0]
    assert re.search(r":\d+(\.\d+)+", base) and not base.endswith(":latest"), base


def test_python_versions():
    """cpu: 3.11 (what CI and the development machines run); gpu: Ubuntu 24.04's 3.12."""
    assert env_of("cpu")["PYTHON"] == "python3.11"
    assert env_of("gpu")["PYTHON"] == "python3.12"
    assert "python:3.11" in instructions("cpu")[0][1] and "ubuntu24.04" in instructions("gpu")[0][1]


def test_dockerignore_beside_each_dockerfile_keeps_sources_and_drops_local_state():
    """BuildKit reads <Dockerfile>.dockerignore for `-f docker/Dockerfile.X .`; both must agree."""
    def rules(profile):
        text = (DOCKER / f"Dockerfile.{profile}.dockerignore").read_text()
        return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]

    assert rules("cpu") == rules("gpu")
    assert {".venv/", ".git/"} <= set(rules("cpu"))
    needed = ("docker", "setup.py", "sari_ray", "configs")
    assert not [r for r in rules("cpu") if r.rstrip("/").lstrip("!") in needed]


def test_images_carry_what_the_manifests_run():
    """The MLflow server runs `--app-name basic-auth` from the sari-ray image, which needs Flask-WTF:
    the `mlflow[auth]` extra must be in the pins the image installs."""
    from sari_ray.deploy.mlflow_server import server_args

    assert "basic-auth" in server_args("ns")
    common = (DOCKER / "requirements" / "common.txt").read_text()
    assert re.search(r"^mlflow\[[^\]]*\bauth\b[^\]]*\]==", common, re.M), \
        "docker/requirements/common.txt: pin mlflow[auth]==<version> (basic auth needs Flask-WTF)"
