"""report.png: one picture of a training run, written at its end.

Top: the GRPO reward and the sampled completions' accuracy per step, the curriculum tier as background bands
and each promotion as a dashed line. Bottom: held-out accuracy after SFT and at the end, per tier GRPO trained
on, with the 95% CI of the paired gain and the silent-audio accuracy (what a text-only shortcut would score).

Reads only what summary.json / trainer_state.json hold (plain lists and dicts); matplotlib's Agg canvas and
nothing else, so it imports and draws with Ray, vLLM, DeepSpeed, MLflow and torch unavailable, headless, and
without touching a notebook's pyplot backend. The same inputs give the same bytes (fixed size and dpi, no
Software/date metadata, matplotlib's default style whatever the user's matplotlibrc says).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

DPI = 110
FIGSIZE = (10.0, 8.0)
# Light band colours for tiers 0, 1, 2, ... (cycled); the lines stay readable over any of them.
TIER_BANDS = ("#e8f1fb", "#fdf0e0", "#e9f6e9", "#f6e8f3", "#f3f3e0", "#e6f4f4")
REWARD_COLOR, ACCURACY_COLOR = "tab:blue", "tab:green"
AFTER_SFT_COLOR, FINAL_COLOR, SILENT_COLOR = "#8c8c8c", "tab:blue", "tab:orange"
_TIER_KEY = (re.compile(r"^eval/accuracy_tier(\d+)$"), re.compile(r"^eval/tier_(\d+)/accuracy$"))


def write_report(path: str | Path, curve: Sequence[Sequence[Any]], promotions: Sequence[dict] | None,
                 after_sft_eval: dict[str, Any] | None, final_eval: dict[str, Any] | None,
                 grpo_gain: Sequence[dict] | None, title: str = "") -> Path:
    """Draw the run's report to `path` (PNG) and return it.

    curve: one row per GRPO step, `[step, reward_mean, completions_per_s, sync_seconds, accuracy, tier]`
    (accuracy may be None) or the older `[step, reward, completions_per_s, sync_seconds, tier]`; the tier is
    always last. promotions: `{"step", "from_tier", "to_tier", ...}`. after_sft_eval / final_eval: held-out
    metrics (`eval/accuracy`, `eval/accuracy_tier0`, `eval_silent/accuracy`, ...) or None. grpo_gain: per tier
    `{"tier", "n", "after_sft", "final", "diff", "ci_low", "ci_high", "final_silent"?}` (the CI is the paired
    difference's). An empty curve (an SFT-only run) and no evaluations at all still give a picture.
    """
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [_row(r) for r in curve or []]
    with matplotlib.style.context("default"):
        fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        top, bottom = fig.subplots(2, 1, height_ratios=(1.15, 1))
        _curve_panel(top, rows, list(promotions or []))
        _eval_panel(bottom, after_sft_eval, final_eval, list(grpo_gain or []))
        fig.suptitle(title or "sari-ray run report", fontsize=13, fontweight="bold")
        fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path


# ------------------------------------------------------------------------------------------------ curve
def _row(row: Sequence[Any]) -> dict[str, Any]:
    """A curve row of either form as {step, reward, cps, sync, accuracy, tier}."""
    row = list(row)
    if len(row) < 5:
        raise ValueError(f"curve row {row!r}: expected [step, reward, completions_per_s, sync_s, (accuracy,) tier]")
    return {"step": row[0], "reward": _num(row[1]), "cps": _num(row[2]), "sync": _num(row[3]),
            "accuracy": _num(row[4]) if len(row) >= 6 else None, "tier": int(row[-1] or 0)}


def _num(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _smooth(points: list[tuple[Any, float, int]], half: int) -> list[float]:
    """Centered moving average (window 2 * half + 1, shrinking at the ends) within each stretch of one tier:
    a promotion resets the level, and smoothing across it would blur the drop."""
    out = []
    for i, (_, _, tier) in enumerate(points):
        window = [v for _, v, t in points[max(0, i - half): i + half + 1] if t == tier]
        out.append(sum(window) / len(window))
    return out


def _tier_stretches(rows: list[dict]) -> list[tuple[int, float, float]]:
    """(tier, first step, last step) per run of consecutive rows at one tier."""
    stretches: list[list] = []
    for r in rows:
        if stretches and stretches[-1][0] == r["tier"]:
            stretches[-1][2] = r["step"]
        else:
            stretches.append([r["tier"], r["step"], r["step"]])
    return [tuple(s) for s in stretches]


def _curve_panel(ax, rows: list[dict], promotions: list[dict]) -> None:
    ax.set_title("GRPO: reward and sampled accuracy per step", fontsize=11, loc="left")
    if not rows:
        ax.text(0.5, 0.5, "no GRPO steps (SFT-only run)", transform=ax.transAxes, ha="center", va="center",
                fontsize=12, color="grey")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    steps = [r["step"] for r in rows]
    # tier bands: each stretch spans half a step either side so adjacent bands meet
    for tier, first, last in _tier_stretches(rows):
        ax.axvspan(first - 0.5, last + 0.5, color=TIER_BANDS[tier % len(TIER_BANDS)], zorder=0, lw=0)
        ax.text((first + last) / 2, 0.98, f"tier {tier}", transform=ax.get_xaxis_transform(), ha="center",
                va="top", fontsize=9, color="#555555", zorder=1)
    half = max(1, len(rows) // 30)
    rewarded = [(r["step"], r["reward"], r["tier"]) for r in rows if r["reward"] is not None]
    handles = []
    if rewarded:
        xs, ys, _ = zip(*rewarded)
        ax.plot(xs, ys, color=REWARD_COLOR, lw=0.8, alpha=0.35, zorder=2)
        handles += ax.plot(xs, _smooth(rewarded, half), color=REWARD_COLOR, lw=2, zorder=3,
                           label="reward (batch mean; thick: smoothed)")
    ax.set_ylabel("reward", color=REWARD_COLOR)
    ax.tick_params(axis="y", colors=REWARD_COLOR)
    ax.set_xlabel("GRPO step")
    ax.set_xlim(min(steps) - 0.5, max(steps) + 0.5)
    ax.grid(alpha=0.3, zorder=1)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.12 * (hi - lo))  # headroom for the tier and promotion labels

    accurate = [(r["step"], r["accuracy"], r["tier"]) for r in rows if r["accuracy"] is not None]
    if accurate:
        acc_ax = ax.twinx()
        xs, ys, _ = zip(*accurate)
        acc_ax.plot(xs, [100 * y for y in ys], color=ACCURACY_COLOR, lw=0.8, alpha=0.35)
        handles += acc_ax.plot(xs, [100 * y for y in _smooth(accurate, half)], color=ACCURACY_COLOR, lw=2,
                               label="sampled accuracy")
        acc_ax.set_ylim(0, 112)  # the same headroom
        acc_ax.set_yticks(range(0, 101, 20))
        acc_ax.set_ylabel("sampled accuracy (%)", color=ACCURACY_COLOR)
        acc_ax.tick_params(axis="y", colors=ACCURACY_COLOR)

    promotion_line = None
    for p in sorted((p for p in promotions if p.get("step") is not None), key=lambda p: p["step"]):
        step = p["step"]
        promotion_line = ax.axvline(step, color="black", ls="--", lw=1.2, zorder=4, label="promotion")
        ax.text(step, 0.90, f" tier {p.get('from_tier', '?')} → {p.get('to_tier', '?')}",
                transform=ax.get_xaxis_transform(), ha="left", va="top", fontsize=9, fontweight="bold", zorder=5,
                clip_on=True, bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8})
    if promotion_line is not None:
        handles.append(promotion_line)

    # beside the x label, and the legend above the plot: nothing covers the curves
    ax.text(1.0, -0.085, _throughput(rows), transform=ax.transAxes, fontsize=8.5, color="#444444", ha="right",
            va="top")
    if handles:
        ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(handles), fontsize=8.5,
                  frameon=False, borderaxespad=0.2, handlelength=1.6, columnspacing=1.2)


def _throughput(rows: list[dict]) -> str:
    parts = [f"{len(rows)} steps"]
    cps = [r["cps"] for r in rows if r["cps"] is not None]
    sync = [r["sync"] for r in rows if r["sync"] is not None]
    if cps:
        parts.append(f"{sum(cps) / len(cps):.1f} completions/s")
    if sync:
        parts.append(f"weight sync {sum(sync) / len(sync):.2f} s")
    return " · ".join(parts) + (" (means)" if len(parts) > 1 else "")


# ------------------------------------------------------------------------------------------------ held-out
def _tier_accuracies(metrics: dict[str, Any] | None, prefix: str = "eval") -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (metrics or {}).items():
        key = key.replace(f"{prefix}/", "eval/", 1) if key.startswith(f"{prefix}/") else None
        for pattern in _TIER_KEY:
            m = pattern.match(key or "")
            if m and _num(value) is not None:
                out[int(m.group(1))] = float(value)
    return out


def _overall(metrics: dict[str, Any] | None, key: str) -> float | None:
    return _num((metrics or {}).get(key))


def _eval_panel(ax, after_sft: dict | None, final: dict | None, gain: list[dict]) -> None:
    ax.set_title("Held-out accuracy: after SFT vs final", fontsize=11, loc="left")
    if gain:
        _gain_points(ax, after_sft, final, sorted(gain, key=lambda g: g["tier"]))
    elif _overall(after_sft, "eval/accuracy") is not None or _overall(final, "eval/accuracy") is not None:
        _eval_bars(ax, after_sft, final)
    else:
        ax.text(0.5, 0.5, "no held-out evaluation", transform=ax.transAxes, ha="center", va="center",
                fontsize=12, color="grey")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 109)
    ax.set_yticks(range(0, 101, 20))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, fontsize=8.5, frameon=False, borderaxespad=0.2,
              handlelength=1.6, columnspacing=1.2)


def _gain_points(ax, after_sft: dict | None, final: dict | None, gain: list[dict]) -> None:
    """Per tier: after SFT -> final (arrow), the final point's bar = after SFT + the gain's 95% CI, silent audio."""
    labels = []
    for x, g in enumerate(gain):
        before, after = 100 * float(g["after_sft"]), 100 * float(g["final"])
        # an accuracy's interval cannot leave [0, 100] (a +44 gain on 56% with CI up to +54 still ends at 100%)
        low = min(100.0, max(0.0, before + 100 * float(g["ci_low"])))
        high = min(100.0, max(0.0, before + 100 * float(g["ci_high"])))
        ax.annotate("", xy=(x, after), xytext=(x - 0.18, before),
                    arrowprops={"arrowstyle": "->", "color": "#aaaaaa", "lw": 1.2, "shrinkA": 6, "shrinkB": 6})
        ax.plot([x - 0.18], [before], "o", ms=9, color=AFTER_SFT_COLOR, label="after SFT" if x == 0 else None)
        ax.errorbar([x], [after], yerr=[[max(0.0, after - low)], [max(0.0, high - after)]], fmt="o", ms=9,
                    color=FINAL_COLOR, capsize=6, lw=1.6,
                    label="final (bar: after SFT + gain's 95% CI)" if x == 0 else None)
        if g.get("final_silent") is not None:
            ax.plot([x + 0.18], [100 * float(g["final_silent"])], "X", ms=9, color=SILENT_COLOR,
                    label="final, silent audio" if x == 0 else None)
        labels.append(f"tier {g['tier']} (n = {g['n']})\ngain {100 * float(g['diff']):+.1f} pts\n95% CI "
                      f"[{100 * float(g['ci_low']):+.1f}, {100 * float(g['ci_high']):+.1f}]")
    # all tiers, no CI (the per-item pairing is per tier): the overall numbers of the two evaluations
    before, after = _overall(after_sft, "eval/accuracy"), _overall(final, "eval/accuracy")
    silent = _overall(final, "eval_silent/accuracy")
    if len(gain) > 1 and after is not None:
        x = len(gain)
        if before is not None:
            ax.plot([x - 0.18], [100 * before], "o", ms=9, color=AFTER_SFT_COLOR, mfc="white", mew=2)
            ax.annotate("", xy=(x, 100 * after), xytext=(x - 0.18, 100 * before),
                        arrowprops={"arrowstyle": "->", "color": "#aaaaaa", "lw": 1.2, "shrinkA": 6, "shrinkB": 6})
        ax.plot([x], [100 * after], "o", ms=9, color=FINAL_COLOR, mfc="white", mew=2)
        if silent is not None:
            ax.plot([x + 0.18], [100 * silent], "X", ms=9, color=SILENT_COLOR, alpha=0.6)
        labels.append("all held-out items\n(no paired CI)\n")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlim(-0.6, len(labels) - 0.4)


def _eval_bars(ax, after_sft: dict | None, final: dict | None) -> None:
    """No GRPO gain to pair (no SFT, or no tier trained on): the evaluations' accuracies as bars."""
    groups = [("all", "eval/accuracy", "eval_silent/accuracy")]
    tiers = sorted(set(_tier_accuracies(after_sft)) | set(_tier_accuracies(final)))
    if len(tiers) > 1:
        groups += [(f"tier {t}", t, t) for t in tiers]
    series = [("after SFT", after_sft, "eval", AFTER_SFT_COLOR, None),
              ("final", final, "eval", FINAL_COLOR, None),
              ("final, silent audio", final, "eval_silent", SILENT_COLOR, "//")]
    series = [s for s in series if s[1] and any(_value(s[1], s[2], g) is not None for g in groups)]
    width = 0.8 / max(1, len(series))
    for i, (label, metrics, prefix, color, hatch) in enumerate(series):
        for x, group in enumerate(groups):
            value = _value(metrics, prefix, group)
            if value is None:
                continue
            offset = (i - (len(series) - 1) / 2) * width
            ax.bar(x + offset, 100 * value, width * 0.92, color=color, hatch=hatch, edgecolor="white",
                   label=label if x == 0 or all(_value(metrics, prefix, g) is None for g in groups[:x]) else None)
            ax.text(x + offset, 100 * value + 1.5, f"{100 * value:.1f}", ha="center", va="bottom", fontsize=8.5)
    ax.set_xticks(range(len(groups)), [g[0] for g in groups])
    ax.set_xlim(-0.6, len(groups) - 0.4)


def _value(metrics: dict | None, prefix: str, group: tuple) -> float | None:
    name, real_key, silent_key = group
    if name == "all":
        return _overall(metrics, real_key if prefix == "eval" else silent_key)
    return _tier_accuracies(metrics, prefix).get(real_key)
