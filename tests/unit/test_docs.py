"""The documentation site: `mkdocs build --strict` passes, the configuration page names every config key (it is
generated from sari_ray/config.py at build time), every config field carries documentation, the generator follows
a change to a field, and a broken link does fail the strict build (so the check can fail)."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "docs" / "hooks" / "config_reference.py"
PAGES = ("index", "concepts", "configuration", "training", "scaling", "failures", "evaluation", "benchmarks",
         "troubleshooting", "changelog")


def load_hook():
    name = "sari_ray_docs_config_reference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HOOK)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def mkdocs_build(config_dir: Path, site: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("mkdocs", reason="pip install -r docker/requirements/docs.txt")
    pytest.importorskip("material", reason="pip install -r docker/requirements/docs.txt")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about MkDocs 2.0 (not a build warning)
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=config_dir,
                          env=env, capture_output=True, text=True, timeout=600)


def config_keys() -> list[str]:
    """Every dotted key of the schema, walked here independently of the generator."""
    from sari_ray.config import TrainConfig

    keys = []
    for section in dataclasses.fields(TrainConfig):
        for f in dataclasses.fields(section.default_factory()):
            keys.append(f"{section.name}.{f.name}")
    return keys


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = mkdocs_build(REPO, out)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{log[-4000:]}"
    assert "WARNING" not in log, log[-4000:]
    return out


def test_the_strict_build_makes_every_page(site):
    missing = [p for p in PAGES if not (site / f"{p}.html").is_file()]
    assert not missing, f"pages not built: {missing}"


def test_the_configuration_page_names_every_config_key(site):
    html = (site / "configuration.html").read_text(encoding="utf-8")
    assert "config-reference" not in html, "the placeholder was not replaced by the generated reference"
    keys = config_keys()
    assert len(keys) > 50
    missing = [k for k in keys if f"<code>{k}</code>" not in html]
    assert not missing, f"docs/configuration.md's generated tables lack these config keys: {missing}"


def test_every_config_field_is_documented_in_the_source():
    """Each field of sari_ray/config.py needs a `# comment` on its line (or the comment-only line below it); the
    reference page shows that text. grpo fields may instead inherit sari_ray.grpo.GRPOSettings' comment."""
    from sari_ray.config import TrainConfig

    hook = load_hook()
    lacking = hook.undocumented(TrainConfig, hook.sari_ray_fallbacks())
    assert not lacking, (f"{len(lacking)} config field(s) have no documentation comment in sari_ray/config.py "
                         f"(add a trailing `# ...` to the field's line): {lacking}")


def test_the_reference_covers_every_section_load_config_accepts():
    from sari_ray.config import TrainConfig

    hook = load_hook()
    sections = list(hook.entries(TrainConfig))
    assert sections == [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(hook.sari_ray_keys()) == sorted(config_keys())
    text = hook.sari_ray_reference()
    for section in sections:
        assert f"## `{section}`" in text, section


SOURCE = '''
from __future__ import annotations
from dataclasses import dataclass, field


@dataclass
class AlphaConfig:
    knob: {knob_type} = {knob_default}  # {knob_doc}
    # {knob_more}
    choice: str = "a"  # one of a | b, <not html>, 2**3 and snake_case
    bare: bool = False
    mapping: dict[str, float] = field(default_factory=lambda: {{"slot": 1.0}})  # custom amounts


@dataclass
class RootConfig:
    alpha: AlphaConfig = field(default_factory=AlphaConfig)
'''


def import_source(tmp_path: Path, name: str, **values: str):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(SOURCE.format(**values)))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and inspect.getsource look the module up there
    spec.loader.exec_module(module)
    return module


def test_the_generator_reads_types_defaults_and_comments_and_follows_a_change(tmp_path):
    hook = load_hook()
    before = import_source(tmp_path, "docs_cfg_before", knob_type="int", knob_default="3",
                           knob_doc="how many widgets", knob_more="continued on the next line")
    after = import_source(tmp_path, "docs_cfg_after", knob_type="float", knob_default="0.5",
                          knob_doc="the widget fraction", knob_more="and its second line")

    rows = {e.key: e for e in hook.entries(before.RootConfig)["alpha"]}
    assert list(rows) == ["alpha.knob", "alpha.choice", "alpha.bare", "alpha.mapping"]
    assert rows["alpha.knob"] == hook.Entry("alpha.knob", "int", "3", "how many widgets continued on the next line")
    assert rows["alpha.mapping"].default == "{slot: 1.0}" and rows["alpha.bare"].default == "false"
    assert hook.undocumented(before.RootConfig) == ["alpha.bare"]

    old, new = hook.reference_markdown(before.RootConfig), hook.reference_markdown(after.RootConfig)
    assert "## `alpha`" in old
    assert "| `alpha.knob` | `int` | `3` | how many widgets continued on the next line |" in old
    assert "| `alpha.knob` | `float` | `0.5` | the widget fraction and its second line |" in new
    assert "how many widgets" not in new
    # Markdown-safe: a `|` would split the row, `<...>` would vanish as HTML, `*` and `_` would emphasise
    assert r"one of a \| b, &lt;not html&gt;, 2\*\*3 and snake\_case" in old
    assert "<code>dict[str, float]</code>" not in old and "`dict[str, float]`" in old


def test_fallback_docs_fill_only_fields_without_their_own(tmp_path):
    hook = load_hook()
    cfg = import_source(tmp_path, "docs_cfg_fallback", knob_type="int", knob_default="1", knob_doc="own text",
                        knob_more="")

    @dataclasses.dataclass
    class Settings:  # same names as the section's fields, as GRPOSettings is for `grpo`
        knob: int = 1  # settings text
        bare: bool = False  # the settings' comment for bare

    rows = {e.key: e.doc for e in hook.entries(cfg.RootConfig, {"alpha": [Settings]})["alpha"]}
    assert rows["alpha.knob"] == "own text" and rows["alpha.bare"] == "the settings' comment for bare"


def test_a_broken_link_fails_the_strict_build(tmp_path):
    """The strict build is a real check: the same docs plus one broken link and one broken anchor fail it."""
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy(REPO / "mkdocs.yml", copy / "mkdocs.yml")
    shutil.copytree(REPO / "docs", copy / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "docs" / "index.md", "a", encoding="utf-8") as f:
        f.write("\nSee [a page](no-such-page.md) and [a section](concepts.md#no-such-section).\n")
    proc = mkdocs_build(copy, tmp_path / "site")
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"a broken link passed mkdocs build --strict:\n{log[-3000:]}"
    assert "no-such-page.md" in log and "no-such-section" in log, log[-3000:]
