"""MkDocs hook: the configuration reference, generated from the config dataclasses at build time.

`docs/configuration.md` holds the placeholder below; `on_page_markdown` replaces it with one table per config
section (key, type, default, what it does, what loading checks), read from `sari_ray/config.py`:

- sections, keys, types and defaults from `dataclasses.fields` (the schema `load_config` merges YAML into);
- a field's documentation from its trailing `# comment` and the comment-only lines right below it (the source
  convention of config.py), read with `ast` + `tokenize`; a field without one falls back to the same-named
  field of a settings class that the section feeds (`grpo` -> `sari_ray.grpo.GRPOSettings`);
- the checks from config.py's CHOICES / POSITIVE / NON_NEGATIVE / RULES tables.

`reference_markdown(root, ...)` and `field_docs(cls)` work on any dataclass, so tests can generate from a small
one. Nothing here is hand-maintained: the rendered page always matches the code.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

PLACEHOLDER = "<!-- config-reference -->"
PAGE = "configuration.md"

_REPO = Path(__file__).resolve().parents[2]


def _import_sari_ray() -> None:
    """Make `sari_ray` importable from the checkout this file lives in (MkDocs restores sys.path after
    loading a hook, so this runs at each use, not once at import)."""
    if (_REPO / "sari_ray").is_dir() and str(_REPO) not in sys.path:
        sys.path.insert(0, str(_REPO))


# ---------------------------------------------------------------------------------------------- reading source
def field_docs(cls: type) -> dict[str, str]:
    """`field name -> documentation` for a dataclass, from its source: the `# comment` on the field's line(s)
    and the comment-only lines directly below it (up to a blank line or the next statement)."""
    lines, _ = inspect.getsourcelines(cls)
    source = textwrap.dedent("".join(lines))
    comments: dict[int, str] = {}  # line (1-based, within `source`) -> comment text
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    source_lines = source.splitlines()
    class_node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef))
    docs: dict[str, str] = {}
    for node in class_node.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        parts = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        n = node.end_lineno + 1
        while n <= len(source_lines) and n in comments and n not in code_lines:
            parts.append(comments[n])  # a continuation line: comment only
            n += 1
        docs[node.target.id] = " ".join(p for p in parts if p)
    return docs


# ---------------------------------------------------------------------------------------------- formatting
def _type_name(tp: Any) -> str:
    if isinstance(tp, str):
        return tp
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _default_value(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_yaml_scalar(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
    return str(value)


def _is_required(value: Any) -> bool:
    return value is dataclasses.MISSING or value == "???"  # omegaconf.MISSING is the string "???"


def _code(text: str) -> str:
    """An inline code span that survives a table cell (a `|` inside would split the row)."""
    if "|" in text:
        escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")
        return f"<code>{escaped}</code>"
    fence = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text}{pad}{fence}"


_SPECIAL = re.compile(r"([\\*_\[\]|])")


def _prose(text: str) -> str:
    """Comment text as Markdown in a table cell: `code spans` kept, everything else escaped."""
    out = []
    for i, chunk in enumerate(re.split(r"(`[^`]*`)", text)):
        if i % 2:  # a code span from the comment
            out.append(_code(chunk[1:-1]))
        else:
            chunk = chunk.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            out.append(_SPECIAL.sub(r"\\\1", chunk))
    return "".join(out)


# ---------------------------------------------------------------------------------------------- the model
class Entry(NamedTuple):
    key: str          # dotted, e.g. "grpo.beta"
    type: str
    default: str      # as written in YAML; "required" when the key has no default
    doc: str          # the field's documentation (raw comment text); "" when it has none
    checks: str = ""  # what loading checks beyond the type (raw text)


def _sections(root: type) -> list[tuple[str, type]]:
    """The root's dataclass-valued fields, in order: (section name, dataclass)."""
    out = []
    for f in dataclasses.fields(root):
        value = _default_value(f)
        if dataclasses.is_dataclass(value):
            out.append((f.name, type(value)))
    return out


def entries(root: type, fallbacks: Mapping[str, Iterable[type]] | None = None,
            checks: Callable[[str], str] | None = None) -> dict[str, list[Entry]]:
    """`section -> [Entry]` for every field of every section of `root` (a dataclass of dataclasses). Fields of
    `root` that are not dataclasses are listed under the section "" (top level)."""
    fallbacks = fallbacks or {}
    out: dict[str, list[Entry]] = {}
    sections = _sections(root)
    section_names = {name for name, _ in sections}
    top = [f for f in dataclasses.fields(root) if f.name not in section_names]
    if top:
        out[""] = _entries_of(root, "", top, [], checks)
    for name, cls in sections:
        out[name] = _entries_of(cls, name, dataclasses.fields(cls), list(fallbacks.get(name, ())), checks)
    return out


def _entries_of(cls: type, section: str, fields: Iterable[dataclasses.Field], fallbacks: list[type],
                checks: Callable[[str], str] | None) -> list[Entry]:
    docs = field_docs(cls)
    fallback_docs = [field_docs(fb) for fb in fallbacks]
    rows = []
    for f in fields:
        key = f"{section}.{f.name}" if section else f.name
        doc = docs.get(f.name, "") or next((d[f.name] for d in fallback_docs if d.get(f.name)), "")
        value = _default_value(f)
        default = "required" if _is_required(value) else _yaml_scalar(value)
        rows.append(Entry(key, _type_name(f.type), default, doc, checks(key) if checks else ""))
    return rows


def undocumented(root: type, fallbacks: Mapping[str, Iterable[type]] | None = None) -> list[str]:
    """Dotted keys whose field has no documentation text (neither its own comment nor a fallback's)."""
    return [e.key for rows in entries(root, fallbacks).values() for e in rows if not e.doc.strip()]


def markdown_tables(table: Mapping[str, list[Entry]], heading: str = "##",
                    intros: Mapping[str, str] | None = None) -> str:
    """One heading and table per section."""
    intros = intros or {}
    parts = []
    for section, rows in table.items():
        title = f"`{section}`" if section else "top level"
        parts.append(f"{heading} {title}\n")
        if intros.get(section):
            parts.append(intros[section].strip() + "\n")
        with_checks = any(e.checks for e in rows)
        head = "| key | type | default | what it does |" + (" checked at load |" if with_checks else "")
        rule = "|---|---|---|---|" + ("---|" if with_checks else "")
        parts += [head, rule]
        for e in rows:
            default = "*required*" if e.default == "required" else _code(e.default)
            cells = [_code(e.key), _code(e.type), default, _prose(e.doc) or "&mdash;"]
            if with_checks:
                cells.append(_prose(e.checks) if e.checks else "")
            parts.append("| " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def reference_markdown(root: type, fallbacks: Mapping[str, Iterable[type]] | None = None,
                       checks: Callable[[str], str] | None = None, heading: str = "##",
                       intros: Mapping[str, str] | None = None) -> str:
    """The whole reference for `root`: one section per dataclass field of it."""
    return markdown_tables(entries(root, fallbacks, checks), heading, intros)


# ---------------------------------------------------------------------------------------------- sari_ray's config
def sari_ray_fallbacks() -> dict[str, list[type]]:
    """Sections whose fields feed a settings class with its own field comments (same names)."""
    _import_sari_ray()
    from sari_ray.grpo import GRPOSettings

    return {"grpo": [GRPOSettings]}


def sari_ray_checks() -> Callable[[str], str]:
    """`key -> what load_config checks`, from config.py's own rule tables (empty when a table is absent)."""
    _import_sari_ray()
    from sari_ray import config

    choices: Mapping[str, tuple] = getattr(config, "CHOICES", {})
    positive: Iterable[str] = getattr(config, "POSITIVE", ())
    non_negative: Iterable[str] = getattr(config, "NON_NEGATIVE", ())
    rules: Mapping[str, tuple] = getattr(config, "RULES", {})

    def check(key: str) -> str:
        found = []
        if key in choices:
            found.append("one of " + ", ".join(f"`{_yaml_scalar(c)}`" for c in choices[key]))
        if key in positive:
            found.append("integer >= 1")
        if key in non_negative:
            found.append("integer >= 0 (0: off)")
        if key in rules:
            found.append(str(rules[key][1]))
        return "; ".join(found)

    return check


def sari_ray_intros() -> dict[str, str]:
    """Each section's dataclass docstring, when it has one of its own (not dataclass's generated signature)."""
    _import_sari_ray()
    from sari_ray.config import TrainConfig

    intros = {}
    for name, cls in _sections(TrainConfig):
        doc = cls.__dict__.get("__doc__") or ""
        if doc and not doc.startswith(cls.__name__ + "("):
            intros[name] = inspect.cleandoc(doc)
    return intros


def sari_ray_reference(heading: str = "##") -> str:
    """The configuration reference of `sari_ray.config.TrainConfig`, as Markdown."""
    _import_sari_ray()
    from sari_ray.config import TrainConfig

    return reference_markdown(TrainConfig, sari_ray_fallbacks(), sari_ray_checks(), heading, sari_ray_intros())


def sari_ray_keys() -> list[str]:
    """Every dotted config key of `TrainConfig`."""
    _import_sari_ray()
    from sari_ray.config import TrainConfig

    return [e.key for rows in entries(TrainConfig).values() for e in rows]


# ---------------------------------------------------------------------------------------------- the MkDocs hook
def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if PLACEHOLDER not in markdown:
        raise ValueError(f"docs/{PAGE} lost its placeholder {PLACEHOLDER!r}: the configuration reference "
                         f"has nowhere to go")
    return markdown.replace(PLACEHOLDER, sari_ray_reference(heading="###"))
