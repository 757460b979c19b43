"""The statistics of `sari-ray ablate` (sari_ray/ablate_cli.py runs the arms): per arm, over seeds, the final
held-out accuracy overall and per tier with a 95% CI, the area under the hardest tier's held-out accuracy curve,
the steps to reach a threshold, and each arm's paired difference to the first arm; ablation.md and ablation.png.

Input per run (arm x seed): the run directory's held_out.json (sari_ray/held_out.py `held_out_record`):
`{"curve": [{"step", "eval/accuracy", "eval/accuracy_tier{k}", ...}], "final": {...}, "items": {id: correct},
"tiers": {id: tier}}`.

Which interval where:
- a mean over seeds: Student's t on the per-seed values (runs are the unit; 3 seeds give t = 4.30, a wide
  interval, which is the honest width of 3 runs);
- an arm minus the first arm, paired by seed: Student's t on the per-seed differences, each taken on the same
  held-out items (the same seed gives both arms the same split), so its spread holds the item noise and the
  run-to-run noise; and, items only, Newcombe's paired interval (`eval_stats.paired_difference`, the one used
  for `grpo_gain`) over every (seed, item) pair, which leaves the run-to-run noise out and is narrower.

Pure: no Ray, vLLM, DeepSpeed, MLflow; matplotlib only inside `write_plot`.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from statistics import fmean, stdev
from typing import Any, Mapping, Sequence

from sari_ray.eval_stats import paired_difference

OVERALL = "eval/accuracy"
_TIER_KEY = re.compile(r"^eval/accuracy_tier(\d+)$")
DEFAULT_THRESHOLD = 0.8  # held-out accuracy of the hardest tier that `steps_to_threshold` waits for
UNIT = (0.0, 1.0)  # an accuracy's interval stays within it
DPI, FIGSIZE = 110, (10.0, 4.6)


# --------------------------------------------------------------------------------------------- intervals
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t (bisection on `t_cdf`): t_quantile(0.975, 2) = 4.303."""
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p!r} df={df!r}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2.0


def mean_ci(values: Sequence[float], confidence: float = 0.95,
            bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    """Mean of `values` (one per seed) with Student's t interval, cut to `bounds` (an accuracy's (0, 1)); one
    value: no interval (None)."""
    if not values:
        raise ValueError("mean_ci: no values (no finished run for this arm)")
    n, mean = len(values), fmean(values)
    if n < 2:
        return {"n": n, "mean": mean, "ci_low": None, "ci_high": None, "values": list(values)}
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * stdev(values) / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(bounds[0], low), min(bounds[1], high)
    return {"n": n, "mean": mean, "ci_low": low, "ci_high": high, "values": list(values)}


# ------------------------------------------------------------------------------------------------ curves
def tier_key(tier: int) -> str:
    return f"eval/accuracy_tier{tier}"


def tiers_of(metrics: Mapping[str, Any]) -> list[int]:
    """Tiers an evaluation reports (`eval/accuracy_tier{k}` keys), sorted."""
    return sorted(int(m.group(1)) for key in metrics if (m := _TIER_KEY.match(key)))


def curve_points(curve: Sequence[Mapping[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric along a run's held-out curve, by step; a step evaluated twice keeps the last."""
    points = {int(row["step"]): float(row[key]) for row in curve if row.get(key) is not None}
    return sorted(points.items())


def _at(points: Sequence[tuple[int, float]], step: float) -> float:
    """The piecewise-linear curve through `points` at `step` (within their range)."""
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if s0 <= step <= s1:
            return v0 if s1 == s0 else v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    if points and step == points[0][0]:
        return points[0][1]
    raise ValueError(f"step {step} is outside the curve's steps {points[0][0]}..{points[-1][0]}")


def curve_auc(points: Sequence[tuple[int, float]], start: int, end: int) -> float:
    """Area under the piecewise-linear curve between steps `start` and `end`, divided by `end - start`: the mean
    accuracy over those steps (in [0, 1]; at start == end, the value there). Trapezoids between evaluations."""
    if not points or start < points[0][0] or end > points[-1][0] or end < start:
        raise ValueError(f"AUC window {start}..{end} is not within the curve's steps "
                         f"{points[0][0] if points else None}..{points[-1][0] if points else None}")
    if end == start:
        return _at(points, start)
    knots = [(start, _at(points, start))] + [p for p in points if start < p[0] < end] + [(end, _at(points, end))]
    area = sum((s1 - s0) * (v0 + v1) / 2.0 for (s0, v0), (s1, v1) in zip(knots, knots[1:]))
    return area / (end - start)


def steps_to_threshold(points: Sequence[tuple[int, float]], threshold: float) -> int | None:
    """The first evaluated step whose accuracy is >= threshold; None if none is."""
    return next((step for step, value in points if value >= threshold), None)


def auc_window(curves: Sequence[Sequence[tuple[int, float]]]) -> tuple[int, int]:
    """The steps every run evaluated across: (latest first step, earliest last step), so that every arm's AUC is
    over the same stretch (a run without SFT has no step-0 evaluation)."""
    if not curves or any(not c for c in curves):
        raise ValueError("AUC: a run has no held-out evaluation on the hardest tier")
    start, end = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
    if end < start:
        raise ValueError(f"AUC: the runs' evaluated steps do not overlap (latest first step {start}, earliest last "
                         f"step {end}); give every arm the same grpo.steps and eval.every")
    return start, end


def median_steps(values: Sequence[int | None]) -> float | None:
    """Median over seeds of steps-to-threshold, a seed that never reached it counting as later than all the others
    (None when the median falls on one)."""
    ranked = sorted(values, key=lambda v: math.inf if v is None else v)
    n = len(ranked)
    mid = ranked[(n - 1) // 2: n // 2 + 1]
    return None if any(v is None for v in mid) else fmean(mid)


# -------------------------------------------------------------------------------------------- the summary
def paired_to_first(first: Mapping[int, Mapping], other: Mapping[int, Mapping], tier: int | None,
                    confidence: float = 0.95) -> dict[str, Any] | None:
    """`other` minus `first` in final held-out accuracy, paired by seed and by item. first / other: seed -> run
    (held_out.json). tier: only that tier's items (None: all). Seeds and items both arms have; None if none."""
    per_seed, before, after = {}, [], []
    for seed in sorted(set(first) & set(other)):
        a, b = first[seed]["items"], other[seed]["items"]
        ids = sorted(i for i in set(a) & set(b) if tier is None or first[seed]["tiers"].get(i) == tier)
        if not ids:
            continue
        per_seed[seed] = fmean(float(b[i]) - float(a[i]) for i in ids)
        before += [bool(a[i]) for i in ids]
        after += [bool(b[i]) for i in ids]
    if not per_seed:
        return None
    seeds = mean_ci(list(per_seed.values()), confidence, (-1.0, 1.0))
    items = paired_difference(before, after, confidence)
    return {"diff": seeds["mean"], "ci_low": seeds["ci_low"], "ci_high": seeds["ci_high"],
            "per_seed": {str(s): d for s, d in per_seed.items()}, "n_seeds": len(per_seed),
            "items": {k: items[k] for k in ("n", "diff", "ci_low", "ci_high", "method")}}


def summarize(arms: Mapping[str, Mapping[int, Mapping]], threshold: float = DEFAULT_THRESHOLD,
              confidence: float = 0.95) -> dict[str, Any]:
    """ablation.json's figures. arms: name -> seed -> run (held_out.json), in the order given (the first arm is
    the baseline of the differences); an arm may lack seeds (an unfinished ablation), not all of them."""
    empty = [name for name, runs in arms.items() if not runs]
    if empty:
        raise ValueError(f"arms without a finished run: {empty}")
    runs = [run for by_seed in arms.values() for run in by_seed.values()]
    tiers = sorted({t for run in runs for t in tiers_of(run["final"])})
    hardest = tiers[-1] if tiers else None
    key = tier_key(hardest) if hardest is not None else OVERALL
    window = auc_window([curve_points(run["curve"], key) for run in runs])
    names = list(arms)
    out: dict[str, Any] = {"arms": {}, "baseline": names[0], "hardest_tier": hardest, "tiers": tiers,
                           "threshold": threshold, "confidence": confidence, "auc_steps": list(window)}
    for name, by_seed in arms.items():
        seeds = sorted(by_seed)
        final = {"overall": mean_ci([by_seed[s]["final"][OVERALL] for s in seeds], confidence, UNIT)}
        for t in tiers:
            values = [by_seed[s]["final"][tier_key(t)] for s in seeds if tier_key(t) in by_seed[s]["final"]]
            if values:
                final[f"tier{t}"] = mean_ci(values, confidence, UNIT)
        points = {s: curve_points(by_seed[s]["curve"], key) for s in seeds}
        reached = [steps_to_threshold(points[s], threshold) for s in seeds]
        arm = {"seeds": seeds, "final": final,
               "auc_hardest": mean_ci([curve_auc(points[s], *window) for s in seeds], confidence, UNIT),
               "steps_to_threshold": {"per_seed": reached, "reached": sum(r is not None for r in reached),
                                      "median": median_steps(reached)},
               "curve": mean_curve([by_seed[s]["curve"] for s in seeds], OVERALL),
               "curve_hardest": mean_curve([by_seed[s]["curve"] for s in seeds], key)}
        if name != names[0]:
            arm["diff_to_baseline"] = {"overall": paired_to_first(arms[names[0]], by_seed, None, confidence)}
            if hardest is not None and len(tiers) > 1:
                arm["diff_to_baseline"][f"tier{hardest}"] = paired_to_first(arms[names[0]], by_seed, hardest,
                                                                            confidence)
        out["arms"][name] = arm
    return out


def mean_curve(curves: Sequence[Sequence[Mapping]], key: str) -> list[dict[str, float]]:
    """Per step that every seed evaluated: the mean over seeds, and the lowest and highest seed (the plot's band)."""
    points = [dict(curve_points(c, key)) for c in curves]
    steps = sorted(set.intersection(*(set(p) for p in points))) if points else []
    return [{"step": s, "mean": fmean(p[s] for p in points), "min": min(p[s] for p in points),
             "max": max(p[s] for p in points)} for s in steps]


# ------------------------------------------------------------------------------------------- ablation.md
def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _ci(m: Mapping[str, Any], signed: bool = False) -> str:
    fmt = "{:+.1f}" if signed else "{:.1f}"
    if m.get("ci_low") is None:
        return "—"
    return f"[{fmt.format(100 * m['ci_low'])}, {fmt.format(100 * m['ci_high'])}]"


def render_markdown(summary: Mapping[str, Any], command: str = "") -> str:
    """ablation.md: one table of arms (means over seeds, 95% CIs), one of differences to the first arm."""
    arms, tiers, hardest = summary["arms"], summary["tiers"], summary["hardest_tier"]
    conf = round(100 * summary["confidence"])
    start, end = summary["auc_steps"]
    hard = f"tier {hardest}" if hardest is not None else "all tiers"
    lines = ["# Ablation", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [f"Accuracies in %, held-out, greedy, at the end of each run; mean over seeds with a {conf}% Student-t "
              f"interval over seeds (— with one seed). AUC: mean held-out accuracy of {hard} (the hardest) over "
              f"GRPO steps {start}-{end}, trapezoids between evaluations. Steps to {_pct(summary['threshold'])}%: the "
              f"first evaluated step where {hard} reaches it, median over seeds (seeds that reached it / seeds).", ""]
    tier_cols = [f"tier {t}" for t in tiers] if len(tiers) > 1 else []
    head = ["arm", "seeds", "final", *tier_cols, f"AUC {hard}", f"steps to {_pct(summary['threshold'])}%"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, arm in arms.items():
        cells = [f"`{name}`", str(len(arm["seeds"]))]
        for group in ["overall"] + ([f"tier{t}" for t in tiers] if tier_cols else []):
            m = arm["final"].get(group)
            cells.append("—" if m is None else f"{_pct(m['mean'])} {_ci(m)}")
        cells.append(f"{_pct(arm['auc_hardest']['mean'])} {_ci(arm['auc_hardest'])}")
        st = arm["steps_to_threshold"]
        median = "not reached" if st["median"] is None else f"{st['median']:g}"
        cells.append(f"{median} ({st['reached']}/{len(arm['seeds'])})")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    diffs = [(name, group, d) for name, arm in arms.items() for group, d in arm.get("diff_to_baseline", {}).items()]
    if diffs:
        lines += [f"## Difference to `{summary['baseline']}`", "",
                  f"Points, final held-out accuracy, paired by seed (same held-out items). Over seeds: {conf}% "
                  f"Student-t interval on the per-seed differences (run-to-run and item noise). Items only: "
                  f"Newcombe's paired interval over every (seed, item) pair (item noise only).", "",
                  "| arm | items | diff | over seeds | seeds | items only | pairs |", "|---|---|---|---|---|---|---|"]
        for name, group, d in diffs:
            if d is None:
                lines.append(f"| `{name}` | {group} | — | — | 0 | — | 0 |")
                continue
            what = "all" if group == "overall" else group.replace("tier", "tier ")
            lines.append(f"| `{name}` | {what} | {100 * d['diff']:+.1f} | {_ci(d, signed=True)} | {d['n_seeds']} | "
                         f"{_ci(d['items'], signed=True)} | {d['items']['n']} |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ ablation.png
def write_plot(path: str | Path, summary: Mapping[str, Any], title: str = "") -> Path:
    """ablation.png: held-out accuracy per step per arm (mean over seeds, band: lowest to highest seed), all tiers
    and, with several tiers, the hardest one beside it. matplotlib's Agg canvas, default style (as report.py)."""
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    panels = [("curve", "held-out accuracy, all tiers")]
    if len(summary["tiers"]) > 1:
        panels.append(("curve_hardest", f"held-out accuracy, tier {summary['hardest_tier']} (hardest)"))
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(FIGSIZE[0], FIGSIZE[1]) if len(panels) == 1 else (FIGSIZE[0] * 1.4, FIGSIZE[1]),
                     dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (key, label) in zip(axes, panels):
            for i, (name, arm) in enumerate(summary["arms"].items()):
                rows = arm[key]
                if not rows:
                    continue
                color = f"C{i % 10}"
                steps = [r["step"] for r in rows]
                ax.fill_between(steps, [100 * r["min"] for r in rows], [100 * r["max"] for r in rows], color=color,
                                alpha=0.18, lw=0)
                ax.plot(steps, [100 * r["mean"] for r in rows], "o-", color=color, lw=2, ms=4,
                        label=f"{name} (n = {len(arm['seeds'])})")
            ax.set_title(label, fontsize=11, loc="left")
            ax.set_xlabel("GRPO step (0: after SFT)")
            ax.set_ylabel("accuracy (%)")
            ax.set_ylim(0, 105)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8.5, frameon=False, loc="lower right")
        fig.suptitle(title or "sari-ray ablation: mean over seeds, band: lowest to highest seed", fontsize=12)
        fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path
