"""Both analysis notebooks, executed headless (nbclient) against a real short training run's MLflow record.

Parameters are injected by replacing the cell tagged `parameters`; every figure must land as a non-empty
PNG. `short_training_run` (tests/integration/conftest.py) names the run's tracking URI and run id.
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
RUN_FIGURES = ("rewards", "tier_accuracy", "completion_length", "policy", "phase_times", "eval", "sft_loss")


def execute_notebook(name: str, params: dict, cwd: Path, timeout: int = 300):
    """Run notebooks/<name> with the parameters cell replaced by `params`; return the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name}: expected one cell tagged 'parameters'"
    cells[0].source = "\n".join(f"{key} = {value!r}" for key, value in params.items())
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _run_ref(run) -> tuple[str, str]:
    """(tracking_uri, run_id) from the fixture's dict (or a plain pair)."""
    return (run["tracking_uri"], run["run_id"]) if isinstance(run, dict) else tuple(run)


def _assert_pngs(out_dir: Path, names) -> None:
    for name in names:
        path = out_dir / f"{name}.png"
        assert path.is_file() and path.stat().st_size > 5_000, f"{path} missing or empty"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_analysis_notebook(short_training_run, tmp_path):
    tracking_uri, run_id = _run_ref(short_training_run)
    out = tmp_path / "figures"
    nb = execute_notebook("run_analysis.ipynb", {"TRACKING_URI": tracking_uri, "RUN_ID": run_id,
                                                 "OUT_DIR": str(out), "SMOOTH": 0.0}, tmp_path)
    _assert_pngs(out, RUN_FIGURES)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def test_compare_runs_notebook(short_training_run, tmp_path):
    tracking_uri, run_id = _run_ref(short_training_run)
    out = tmp_path / "figures"
    nb = execute_notebook("compare_runs.ipynb", {"TRACKING_URI": tracking_uri, "RUN_IDS": [run_id, run_id],
                                                 "LABELS": ["a", "b"], "LABEL_PARAMS": [],
                                                 "KEYS": ["reward/accuracy", "reward/mean", "curriculum/tier"],
                                                 "SMOOTH": 0.5, "OUT_DIR": str(out)}, tmp_path)
    _assert_pngs(out, ["compare"])
    table = nb.cells[-1].outputs[0]["data"]["text/plain"]
    assert "reward/accuracy best step" in table
