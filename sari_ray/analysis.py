"""Plotting helpers for the analysis notebooks: one training run's dashboard, and several runs overlaid.

    from sari_ray import analysis
    hist = analysis.load_history(TRACKING_URI, RUN_ID)
    analysis.plot_rewards(hist)

The notebooks (notebooks/run_analysis.ipynb, notebooks/compare_runs.ipynb) stay a few lines per figure by
calling these; the same functions work from a script. Everything is read back from MLflow (metric history,
the `curriculum_history.json` artifact), so a figure can be redrawn for any run, finished or running,
without the run directory. Metric names are the trainer's (`reward/mean`, `curriculum/acc_tier0`, ...);
a metric a run did not log is left out of its figure, and an empty figure says "not logged".
"""
from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

History = dict[str, tuple[np.ndarray, np.ndarray]]  # metric name -> (steps, values), sorted by step
PHASE_ORDER = ("time/sample", "time/rollout", "time/reward", "time/curriculum", "time/learn", "time/sync")
NOT_PHASES = ("time/startup", "time/sft_step", "time/learn_rank")  # once, SFT-only, or inside time/learn
EVAL_KEYS = ("eval/accuracy", "eval_silent/accuracy", "eval/accuracy_silent", "sweep/accuracy")
TIER_RE = re.compile(r"^curriculum/acc_tier(\d+)$")


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def load_history(tracking_uri: str | None, run_id: str, keys: Iterable[str] | None = None) -> History:
    """Full history of each metric (all of the run's metrics when `keys` is None).

    A step logged twice (a resumed run re-logs the step it restarted at) keeps the latest value.
    """
    client = _client(tracking_uri)
    keys = sorted(client.get_run(run_id).data.metrics) if keys is None else list(keys)
    history: History = {}
    for key in keys:
        points = client.get_metric_history(run_id, key)
        if not points:
            continue
        latest: dict[int, tuple[int, float]] = {}
        for p in points:
            if p.step not in latest or p.timestamp >= latest[p.step][0]:
                latest[p.step] = (p.timestamp, p.value)
        steps = np.array(sorted(latest))
        history[key] = (steps, np.array([latest[s][1] for s in steps], dtype=float))
    return history


def load_curriculum_history(tracking_uri: str | None, run_id: str) -> list[dict[str, Any]]:
    """The run's `curriculum_history.json` artifact (one entry per promotion), or [] when it has none."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="curriculum_history.json",
                                                       dst_path=tmp, tracking_uri=tracking_uri)
        except Exception:  # MlflowException / OSError: the artifact is absent (no promotion logged yet)
            return []
        return json.loads(Path(path).read_text())


def promotion_steps(curriculum_history: Sequence[dict[str, Any]], history: History | None = None) -> list[tuple[int, int]]:
    """(step, new tier) per promotion: from the artifact, else from rises of the `curriculum/tier` metric."""
    if curriculum_history:
        return [(int(e["step"]), int(e["to_tier"])) for e in curriculum_history]
    if history and "curriculum/tier" in history:
        steps, tiers = history["curriculum/tier"]
        return [(int(s), int(t)) for s, t, prev in zip(steps[1:], tiers[1:], tiers[:-1]) if t > prev]
    return []


def _smoothable(key: str) -> bool:
    """Per-step noisy metrics; sparse evals and the (discrete) tier are drawn as logged."""
    return not key.startswith(("eval/", "sweep/", "curriculum/tier"))


def ema(values: np.ndarray, alpha: float) -> np.ndarray:
    """Exponential moving average (alpha = weight of the past, 0 = none): GRPO rewards are noisy per step."""
    if not alpha:
        return values
    out = np.empty_like(values, dtype=float)
    acc = values[0]
    for i, v in enumerate(values):
        acc = alpha * acc + (1 - alpha) * v
        out[i] = acc
    return out


def _axes(ax, title: str, ylabel: str, figsize=(7, 4)):
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return ax.figure, ax


def _lines(ax, history: History, keys: Iterable[str], smooth: float = 0.0, **kw) -> int:
    drawn = 0
    for key in keys:
        if key in history:
            steps, values = history[key]
            ax.plot(steps, ema(values, smooth if _smoothable(key) else 0.0), label=key, **kw)
            drawn += 1
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="grey")
    return drawn


def plot_rewards(history: History, ax=None, smooth: float = 0.0):
    """Mean reward with a ±1 std band, and its components (accuracy, format)."""
    fig, ax = _axes(ax, "Reward and components", "reward")
    if "reward/mean" in history and "reward/std" in history:
        steps, mean = history["reward/mean"]
        std_steps, std = history["reward/std"]
        if np.array_equal(steps, std_steps):
            ax.fill_between(steps, mean - std, mean + std, alpha=0.15, color="tab:blue", label="reward ± std")
    _lines(ax, history, ("reward/mean", "reward/accuracy", "reward/format"), smooth)
    return fig


def plot_tier_accuracy(history: History, promotions: Sequence[tuple[int, int]] = (), ax=None, smooth: float = 0.0):
    """Running accuracy per curriculum tier, promotions as vertical lines, current tier on a right axis."""
    fig, ax = _axes(ax, "Accuracy per curriculum tier", "running accuracy")
    tiers = sorted((k for k in history if TIER_RE.match(k)), key=lambda k: int(TIER_RE.match(k).group(1)))
    _lines(ax, history, tiers, smooth)
    for i, (step, tier) in enumerate(promotions):
        ax.axvline(step, color="black", ls="--", lw=0.8, alpha=0.7, label="promotion" if i == 0 else None)
        ax.annotate(f"→ tier {tier}", (step, 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                    rotation=90, va="top", ha="right")
    if "curriculum/tier" in history:
        right = ax.twinx()
        steps, tier = history["curriculum/tier"]
        right.step(steps, tier, where="post", color="grey", alpha=0.5, lw=1)
        right.set_ylabel("tier", color="grey")
        right.set_yticks(range(int(tier.max()) + 1))
    if promotions:
        ax.legend(fontsize=8)
    return fig


def plot_completion_length(history: History, ax=None, smooth: float = 0.0):
    fig, ax = _axes(ax, "Completion length", "tokens (mean)")
    _lines(ax, history, ("completion/length_mean",), smooth)
    return fig


def plot_policy(history: History, smooth: float = 0.0):
    """KL to the reference, clip fraction, entropy, gradient norm: one panel each (different scales)."""
    import matplotlib.pyplot as plt

    keys = ("policy/kl", "policy/clip_fraction", "policy/entropy", "policy/grad_norm")
    fig, axes = plt.subplots(1, len(keys), figsize=(14, 3.5))
    for ax, key in zip(axes, keys):
        _axes(ax, key, key.split("/")[1])
        _lines(ax, history, (key,), smooth)
    fig.tight_layout()
    return fig


def plot_phase_times(history: History, ax=None):
    """Seconds per step in each phase, stacked: where the wall time goes (rollout is usually 70-90%)."""
    fig, ax = _axes(ax, "Time per step by phase", "seconds")
    present = [k for k in PHASE_ORDER if k in history]
    present += sorted(k for k in history if k.startswith("time/") and k not in present and k not in NOT_PHASES)
    if not present:
        ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="grey")
        return fig
    steps = np.unique(np.concatenate([history[k][0] for k in present]))
    stacked = [np.interp(steps, *history[k], left=0.0, right=0.0) for k in present]
    ax.stackplot(steps, stacked, labels=[k.split("/")[1] for k in present], alpha=0.8)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the stack fills the axes
    return fig


def plot_eval(history: History, ax=None):
    """Held-out accuracy during training, with silent audio (what text alone earns), and sweep results.

    Silent-audio accuracy is read under either name (`eval_silent/accuracy`, `eval/accuracy_silent`)."""
    fig, ax = _axes(ax, "Held-out accuracy", "accuracy")
    _lines(ax, history, EVAL_KEYS, marker="o", ms=3)
    return fig


def plot_sft(history: History, ax=None):
    fig, ax = _axes(ax, "SFT warm-up loss", "loss")
    _lines(ax, history, ("sft/loss",))
    return fig


FIGURES = {
    "rewards": lambda h, p: plot_rewards(h), "tier_accuracy": lambda h, p: plot_tier_accuracy(h, p),
    "completion_length": lambda h, p: plot_completion_length(h), "policy": lambda h, p: plot_policy(h),
    "phase_times": lambda h, p: plot_phase_times(h), "eval": lambda h, p: plot_eval(h),
    "sft_loss": lambda h, p: plot_sft(h),
}


def save_figure(fig, out_dir: str | Path, name: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def run_dashboard(tracking_uri: str | None, run_id: str, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Every figure of one run (name -> Figure); saved as PNGs in `out_dir` when given."""
    history = load_history(tracking_uri, run_id)
    promotions = promotion_steps(load_curriculum_history(tracking_uri, run_id), history)
    figures = {name: make(history, promotions) for name, make in FIGURES.items()}
    if out_dir is not None:
        for name, fig in figures.items():
            save_figure(fig, out_dir, name)
    return figures


def run_label(tracking_uri: str | None, run_id: str, params: Sequence[str] = ()) -> str:
    """Run name plus the given params (e.g. `curriculum.mode`), for legends of overlaid runs."""
    run = _client(tracking_uri).get_run(run_id)
    extra = ", ".join(f"{p}={run.data.params.get(p, '?')}" for p in params)
    name = run.info.run_name or run_id[:8]
    return f"{name} ({extra})" if extra else name


def compare_runs(tracking_uri: str | None, run_ids: Sequence[str], keys: Sequence[str],
                 labels: Sequence[str] | None = None, smooth: float = 0.0, ncols: int = 2):
    """One panel per metric, one line per run on shared axes (ablation overlays)."""
    import matplotlib.pyplot as plt

    labels = list(labels) if labels else [run_label(tracking_uri, r) for r in run_ids]
    histories = [load_history(tracking_uri, r, keys) for r in run_ids]
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3.6 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        _axes(ax, key, key.split("/")[-1])
        for label, hist in zip(labels, histories):
            if key in hist:
                style = {"drawstyle": "steps-post"} if key == "curriculum/tier" else {}
                ax.plot(hist[key][0], ema(hist[key][1], smooth if _smoothable(key) else 0.0), label=label, **style)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="grey")
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def summary_table(tracking_uri: str | None, run_ids: Sequence[str], keys: Sequence[str] = ("eval/accuracy",),
                  labels: Sequence[str] | None = None):
    """pandas DataFrame, one row per run: last value, best value and the step of the best, per key.

    Why the step of the best: on these runs the best held-out accuracy is often reached early.
    """
    import pandas as pd

    labels = list(labels) if labels else [run_label(tracking_uri, r) for r in run_ids]
    rows = []
    for label, run_id in zip(labels, run_ids):
        hist = load_history(tracking_uri, run_id, keys)
        row: dict[str, Any] = {"run": label, "run_id": run_id}
        for key in keys:
            if key in hist:
                steps, values = hist[key]
                best = int(np.argmax(values))
                row.update({f"{key} last": values[-1], f"{key} best": values[best], f"{key} best step": steps[best]})
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")
