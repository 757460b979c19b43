"""README.md stays a short front page whose links resolve and whose commands are the ones that work; the
architecture picture is exactly what its source script draws."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
ARCHITECTURE_SCRIPT = REPO / "docs" / "images" / "architecture.py"
ARCHITECTURE_SVG = REPO / "docs" / "images" / "architecture.svg"
MAX_LINES = 170

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target) and ![alt](target)
HTML_SRC = re.compile(r"""<(?:img|a)\b[^>]*?\b(?:src|href)=["']([^"']+)["']""", re.IGNORECASE)


def _text() -> str:
    return README.read_text(encoding="utf-8")


def _link_targets(text: str) -> list[str]:
    prose = INLINE_CODE.sub("", FENCE.sub("", text))  # a `[x](y)` inside code is not a link
    return LINK.findall(prose) + HTML_SRC.findall(prose)


def _bash_blocks(text: str) -> list[list[str]]:
    return [block.splitlines()[1:-1] for block in FENCE.findall(text) if block.startswith("```bash")]


def test_readme_is_short():
    lines = _text().splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines (at most {MAX_LINES}): move detail to docs/"


def test_every_relative_link_and_image_resolves():
    targets = _link_targets(_text())
    assert targets, "no links found: the link pattern is broken"
    missing = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # http(s)://, mailto:, in-page anchors
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not (REPO / path).exists():
            missing.append(path)
    assert not missing, f"README.md links to files that do not exist: {sorted(set(missing))}"


def test_readme_links_the_pictures_and_the_documentation():
    targets = set(_link_targets(_text()))
    expected = {"docs/images/architecture.svg", "docs/images/demo_report.png"} | {
        f"docs/{page}.md" for page in ("index", "concepts", "configuration", "training", "scaling", "failures",
                                      "evaluation", "benchmarks", "troubleshooting", "changelog")}
    assert expected <= targets, f"README.md does not link {sorted(expected - targets)}"


def test_test_command_is_what_ci_runs():
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    ci_commands = [line for line in ci_lines if "pytest" in line and not line.startswith("#")]
    assert len(ci_commands) == 1, f".ci/run should hold one pytest command, found {ci_commands}"
    readme_commands = [line.strip() for block in _bash_blocks(_text()) for line in block]
    assert ci_commands[0] in readme_commands, (
        f"README.md's test command differs from .ci/run's: {ci_commands[0]!r}")


def test_demo_command_is_in_the_quick_start():
    readme_commands = [line.strip() for block in _bash_blocks(_text()) for line in block]
    assert "bash docker/install.sh cpu && .venv/bin/sari-ray demo" in readme_commands


def test_no_issue_numbers_or_machine_load():
    text = _text()
    issues = re.findall(r"\bissues?\s*#?\s*\d+", text, re.IGNORECASE)
    assert not issues, f"README.md mentions issue numbers: {issues}"
    assert "load average" not in text.lower()


def test_architecture_svg_is_reproduced_by_its_script(tmp_path):
    out = tmp_path / "architecture.svg"
    result = subprocess.run([sys.executable, str(ARCHITECTURE_SCRIPT), str(out)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == ARCHITECTURE_SVG.read_bytes(), (
        "docs/images/architecture.svg is stale: re-render with `python docs/images/architecture.py`")
