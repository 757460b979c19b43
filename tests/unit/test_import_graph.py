"""The package's import graph: no cycle anywhere, the actor-group plumbing below the wiring, the logic layer free
of Ray, vLLM, DeepSpeed and MLflow; and `sari-ray eval` still offers both paths: one checkpoint (evaluate) and
`--run` (eval_sweep).

Imports are read from the source (lazy ones inside functions included), because cycles made of lazy imports
are ones a plain `import` would never show.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "sari_ray"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package: str = "sari_ray") -> set[str]:
    """Modules a file imports anywhere (top level or inside functions) whose names start with `package`
    ("": all of them)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from sari_ray import evaluate`
    return {name for name in found if name.startswith(package)}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {i for i in imports_of(path) if i in modules} for name, path in modules.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[name] = 2
        path.pop()
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def test_the_package_has_no_import_cycle(graph):
    graph = {name: deps - {name, "sari_ray"} for name, deps in graph.items()}  # the package itself is no edge
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_actor_group_plumbing_imports_nothing_of_actors_and_nothing_imports_the_wiring_back(graph):
    assert not {m for m in graph["sari_ray.actors.group"] if m.startswith("sari_ray.actors")}
    upward = {name for name, deps in graph.items()
              if name.startswith("sari_ray.actors.") and "sari_ray.actors.wiring" in deps}
    assert upward == set(), f"modules of actors/ that import the wiring: {upward}"


# Layer 1 (pure logic): no Ray, vLLM, DeepSpeed or MLflow, however deep the import goes.
LOGIC_MODULES = ("sari_ray.data.schema", "sari_ray.data.validate", "sari_ray.prompts", "sari_ray.answers",
                 "sari_ray.rewards", "sari_ray.curriculum", "sari_ray.grpo", "sari_ray.metrics", "sari_ray.records",
                 "sari_ray.batching", "sari_ray.rollout_pipeline", "sari_ray.checkpoints", "sari_ray.eval_stats",
                 "sari_ray.mmau", "sari_ray.config", "sari_ray.report", "sari_ray.ablation", "sari_ray.plan",
                 "sari_ray.model_shapes")
ENGINE_PACKAGES = ("ray", "vllm", "deepspeed", "mlflow")


def test_logic_layer_reaches_no_engine_package_in_the_source(graph):
    """Every module the logic layer reaches, lazily or not, is read for imports of the engine packages."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    for name in LOGIC_MODULES:
        for reached in {name} | reachable(graph, name):
            heavy = {i.split(".")[0] for i in imports_of(modules[reached], "")} & set(ENGINE_PACKAGES)
            assert not heavy, f"{name} reaches {reached}, which imports {sorted(heavy)}"


def test_logic_layer_imports_with_the_engine_packages_unimportable():
    code = (f"import sys\nfor m in {ENGINE_PACKAGES!r}: sys.modules[m] = None\n"
            + "".join(f"import {name}\n" for name in LOGIC_MODULES))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_evaluate_imports_neither_eval_sweep_nor_train(graph):
    assert "sari_ray.eval_sweep" not in graph["sari_ray.evaluate"]
    assert not {"sari_ray.eval_sweep", "sari_ray.train"} & reachable(graph, "sari_ray.evaluate")


def test_no_import_cycle_through_the_evaluation_modules(graph):
    for name in ("sari_ray.evaluate", "sari_ray.eval_sweep", "sari_ray.eval_stats", "sari_ray.mmau",
                 "sari_ray.answers", "sari_ray.actors.rollout"):
        assert name not in reachable(graph, name), f"{name} imports itself through a cycle"


def test_eval_sweep_takes_prepare_data_from_the_data_package(graph):
    assert "sari_ray.data.prepare" in graph["sari_ray.eval_sweep"]
    assert "sari_ray.train" not in reachable(graph, "sari_ray.eval_sweep")


def test_importing_evaluate_loads_no_sweep_or_trainer():
    code = ("import sys, sari_ray.evaluate, sari_ray.actors.rollout\n"
            "bad = [m for m in ('sari_ray.eval_sweep', 'sari_ray.train', 'sari_ray.actors.wiring') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sari_ray_eval_dispatches_run_to_the_sweep_and_model_to_evaluate(monkeypatch, capsys):
    from sari_ray import eval_sweep, evaluate
    from sari_ray.cli import COMMAND_MODULES, main

    assert "sari_ray.eval_sweep" in COMMAND_MODULES and "sari_ray.evaluate" not in COMMAND_MODULES
    calls = []
    monkeypatch.setattr(eval_sweep, "sweep_run", lambda run, **kw: calls.append(("sweep", run, kw)) or [
        {"step": 5, "accuracy": 0.5, "ci_low": 0.4, "ci_high": 0.6}])
    monkeypatch.setattr(evaluate, "checkpoint_command", lambda args: calls.append(("one", args.model)) or 0)
    assert main(["eval", "--run", "runs/x", "--limit", "3", "--no-mlflow"]) == 0
    assert calls[0][:2] == ("sweep", "runs/x") and calls[0][2]["limit"] == 3 and calls[0][2]["log_mlflow"] is False
    assert "swept 1 checkpoints; best: step 5" in capsys.readouterr().out
    assert main(["eval", "--model", "m", "--data", "d.json", "--out", "o"]) == 0
    assert calls[1] == ("one", "m")


def test_eval_help_keeps_every_option(capsys):
    from sari_ray.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: sari-ray eval")
    assert "Evaluate a checkpoint on MMAU-style multiple-choice audio questions, or sweep" in text
    for option in ("--model", "--data", "--out", "--run", "--format", "--audio-dir", "--style", "--samples",
                   "--temperature", "--audio ", "--skip-missing", "--resume", "--batch-size", "--max-tokens", "--limit",
                   "--seed", "--max-model-len", "--dtype", "--gpu-memory-utilization", "--fresh-engine", "--no-mlflow",
                   "--no-progress"):
        assert option in text, option
