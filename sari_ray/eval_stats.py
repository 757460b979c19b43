"""Evaluation statistics and the readable report: confidence intervals, pass@k, majority vote.

Why intervals everywhere: MMAU test-mini has 1000 items, so a 2-point gap between two checkpoints is inside
the noise (95% CI half-width ~3 points at 60%), and sub-categories of 20 items are far noisier still.
R1-AQA's users chased run-to-run variance; a number without its interval invites that.

Correctness is always the MMAU rule (`sari_ray.mmau.judge` / `score_predictions`), so these numbers agree
with `sari-ray score` on the same predictions.

Pure: no torch, no Ray, no vLLM.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

from sari_ray.answers import listed_choices
from sari_ray.data.schema import AudioMCQ
from sari_ray.mmau import judge, score_predictions

Z95 = 1.959963984540054  # two-sided 95% normal quantile
GROUPS = ("by_task", "by_difficulty", "by_sub_category")
GROUP_KEYS = {"by_task": "task", "by_difficulty": "difficulty", "by_sub_category": "sub_category"}
AUDIO_MODES = ("real", "silence", "noise")  # report column order
SKIP_WORDS = {"missing": "audio file missing", "undecodable": "audio undecodable"}  # problem -> report wording
MAX_SKIPPED_LISTED = 50  # skipped items listed in report.md (metrics.json lists all)


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    Why Wilson and not the normal (Wald) interval: at small n or accuracy near 0 / 1 (small sub-categories,
    tiny models) Wald gives zero-width or out-of-[0, 1] intervals; Wilson stays honest. n = 0 -> (0, 1).
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= correct <= n:
        raise ValueError(f"correct={correct} must be in [0, n={n}]")
    p = correct / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if correct == 0 else lo), (1.0 if correct == n else hi)  # exact ends, no rounding slack


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021).

    Computed as a running product, which stays exact-ish where the binomials overflow floats.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def k_ladder(num_samples: int) -> list[int]:
    """The k values reported for K samples: 1, 2, 4, ... and K itself."""
    ks, k = [], 1
    while k < num_samples:
        ks.append(k)
        k *= 2
    return ks + [num_samples]


def named_choice(output: str | None, choices: Sequence[str]) -> str | None:
    """The one choice the MMAU rule would accept for this output, or None (no answer, or ambiguous).

    `choices` may repeat a text (a published listing, see `answers.listed_choices`): a repeat is one choice.
    """
    hits = list(dict.fromkeys(c for c in choices if judge(output, choices, c)))
    return hits[0] if len(hits) == 1 else None


def majority_vote(outputs: Sequence[str | None], choices: Sequence[str]) -> str | None:
    """Most frequent choice among the outputs (each mapped to a choice by the MMAU rule).

    Outputs naming no single choice abstain; a tie goes to the choice named first, so the vote is
    deterministic. None when every output abstains (then the item counts as wrong).
    """
    named = [c for c in (named_choice(o, choices) for o in outputs) if c is not None]
    if not named:
        return None
    counts = Counter(named)
    best = max(counts.values())
    return next(c for c in named if counts[c] == best)


def add_ci(bucket: dict[str, Any]) -> dict[str, Any]:
    lo, hi = wilson_interval(bucket["correct"], bucket["n"])
    return {**bucket, "ci95": [lo, hi]}


def scored(samples: Sequence[AudioMCQ], predictions: Mapping[str, str | None]) -> dict[str, Any]:
    """`mmau.score_predictions` with a Wilson 95% interval added to the total and every group."""
    metrics = score_predictions(samples, predictions)
    metrics["total"] = add_ci(metrics["total"])
    for group in GROUPS:
        metrics[group] = {name: add_ci(b) for name, b in metrics[group].items()}
    return metrics


def _grouped_means(samples: Sequence[AudioMCQ], values: Sequence[float], key: str) -> dict[str, dict[str, Any]]:
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for sample, v in zip(samples, values):
        raw = getattr(sample, key)
        acc = sums["unknown" if raw in (None, "") else str(raw)]  # same bucket names as mmau._grouped
        acc[0] += v
        acc[1] += 1
    return {name: {"value": s / n, "n": n} for name, (s, n) in sorted(sums.items())}


def pass_at_k_table(samples: Sequence[AudioMCQ], records: Sequence[Mapping[str, Any]], ks: Sequence[int]) -> dict:
    """pass@k for each k: total and per group, from each record's `correct_all` (K verdicts)."""
    by_id = {r["id"]: r for r in records}
    out: dict[str, Any] = {"k": list(ks)}
    for k in ks:
        values = []
        for s in samples:
            verdicts = by_id[s.id]["correct_all"]
            values.append(pass_at_k(len(verdicts), sum(verdicts), k))
        entry = {"total": sum(values) / len(values) if values else 0.0}
        for group in GROUPS:
            entry[group] = _grouped_means(samples, values, GROUP_KEYS[group])
        out[f"pass@{k}"] = entry
    return out


def summarize(samples: Sequence[AudioMCQ], records: Sequence[Mapping[str, Any]], *, num_samples: int = 1,
              skipped: Sequence[Mapping[str, str]] = (), meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Metrics for the evaluated `samples` (skipped ones excluded, and said so).

    `records` come from `evaluate.generate_predictions`. The headline accuracy is the first output per item
    (the greedy one when K = 1). With K > 1 also pass@k and majority vote. `skipped` lists the items left
    out because their audio is missing or does not decode (`evaluate.audio_problems`: id, audio, problem,
    detail); the totals are over the rest, and `accuracy_if_skipped_wrong` is the pessimistic number over
    every item of the file. `n_skipped_missing_audio` counts all of them (the name predates undecodable
    clips; `skipped_by_problem` splits it).
    """
    metrics = scored(samples, {r["id"]: r["model_output"] for r in records})
    n_skipped = len(skipped)
    total = metrics["total"]
    metrics.update({
        "n_items": len(samples) + n_skipped,
        "n_evaluated": len(samples),
        "n_skipped_missing_audio": n_skipped,
        "skipped": list(skipped),
        "skipped_by_problem": dict(sorted(Counter(s.get("problem", "missing") for s in skipped).items())),
        "accuracy_if_skipped_wrong": total["correct"] / (total["n"] + n_skipped) if total["n"] + n_skipped else 0.0,
        "n_no_answer": sum(r["extracted"] is None for r in records),
        "n_length_cut": sum(r.get("finish_reason") == "length" for r in records),
        "num_samples": num_samples,
    })
    if num_samples > 1:
        by_id = {r["id"]: r for r in records}
        votes = {s.id: majority_vote(by_id[s.id]["outputs"], listed_choices(s)) for s in samples}
        vote_metrics = scored(samples, votes)
        metrics["majority_vote"] = {key: vote_metrics[key] for key in ("total", *GROUPS)}
        metrics["pass_at_k"] = pass_at_k_table(samples, records, k_ladder(num_samples))
    metrics["meta"] = dict(meta or {})
    return metrics


# ----------------------------------------------------------------------------------------------- report
def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _cell(bucket: Mapping[str, Any] | None, n_ref: int | None) -> str:
    if bucket is None:
        return "—"
    lo, hi = bucket["ci95"]
    text = f"{_pct(bucket['accuracy'])} [{_pct(lo)}, {_pct(hi)}]"
    return text if bucket["n"] == n_ref else f"{text} (n={bucket['n']})"


def _table(title: str, label: str, rows: Mapping[str, Mapping[str, Mapping[str, Any] | None]],
           modes: Sequence[str]) -> list[str]:
    """rows: name -> mode -> bucket. Columns: n (of the first mode), one per mode, and real − silence."""
    delta = "real" in modes and "silence" in modes
    head = [label, "n", *(f"{m} acc % [95% CI]" for m in modes)] + (["Δ real − silence (pts)"] if delta else [])
    lines = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, per_mode in rows.items():
        first = next((b for b in per_mode.values() if b is not None), None)
        n_ref = first["n"] if first else None
        cells = [name, str(n_ref if n_ref is not None else 0)] + [_cell(per_mode.get(m), n_ref) for m in modes]
        if delta:
            r, s = per_mode.get("real"), per_mode.get("silence")
            cells.append(f"{100 * (r['accuracy'] - s['accuracy']):+.1f}" if r and s else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _describe(mode: str, m: Mapping[str, Any]) -> list[str]:
    meta = m.get("meta", {})
    sampling = (f"{m['num_samples']} samples at temperature {meta.get('temperature')}" if m["num_samples"] > 1
                else f"1 sample, temperature {meta.get('temperature')}")
    lines = [
        f"- **{mode}** audio: model `{meta.get('model')}`, data `{meta.get('data')}`, style "
        f"`{meta.get('style')}`, {sampling}, max_tokens {meta.get('max_tokens')}; "
        f"{m['n_evaluated']} of {m['n_items']} items evaluated; {m['n_no_answer']} gave no answer, "
        f"{m['n_length_cut']} hit max_tokens; {meta.get('elapsed_s', 0):.0f} s ({meta.get('created', '')})."
    ]
    if m["n_skipped_missing_audio"]:
        by_problem = m.get("skipped_by_problem") or {"missing": m["n_skipped_missing_audio"]}
        why = (SKIP_WORDS.get(next(iter(by_problem)), "audio unusable") if len(by_problem) == 1 else
               "audio: " + ", ".join(f"{n} {problem}" for problem, n in by_problem.items()))
        lines.append(
            f"  > **{m['n_skipped_missing_audio']} items skipped ({why})**: the {mode} totals are "
            f"over {m['n_evaluated']} of {m['n_items']} items. Counting the skipped items as wrong gives "
            f"{_pct(m['accuracy_if_skipped_wrong'])}%. Skipped items:")
        for s in m.get("skipped", [])[:MAX_SKIPPED_LISTED]:
            lines.append(f"  > - `{s['id']}`: `{s['audio']}` ({s.get('detail', 'file not found')})")
        if len(m.get("skipped", [])) > MAX_SKIPPED_LISTED:
            lines.append(f"  > - ... and {len(m['skipped']) - MAX_SKIPPED_LISTED} more (all are in the metrics file)")
    return lines


def render_report(by_mode: Mapping[str, Mapping[str, Any]]) -> str:
    """report.md for one out dir: every audio mode evaluated there (real / silence / noise) side by side."""
    modes = [m for m in AUDIO_MODES if m in by_mode] + [m for m in by_mode if m not in AUDIO_MODES]
    first = by_mode[modes[0]]
    lines = ["# Evaluation report", ""]
    for mode in modes:
        lines += _describe(mode, by_mode[mode])
    lines += [
        "",
        f"Scoring: {first.get('rule', 'MMAU rule')}. Items without a usable answer count as wrong. "
        f"Answer revision: {first.get('revision', 'unknown')} ({first.get('revision_note', '')}). "
        "Intervals: Wilson 95%. The headline accuracy uses the first output per item.",
        "",
    ]
    if "real" in by_mode and ("silence" in by_mode or "noise" in by_mode):
        lines += ["The silence / noise columns replace every clip by silence or noise of the same duration: the "
                  "accuracy that survives comes from the text alone; Δ is what the audio contributes.", ""]
    lines += _table("Total", "", {"all": {m: by_mode[m]["total"] for m in modes}}, modes)
    for group, title, label in (("by_task", "By task", "task"), ("by_difficulty", "By difficulty", "difficulty"),
                                ("by_sub_category", "By sub-category", "sub-category")):
        names = sorted({name for m in modes for name in by_mode[m][group]})
        rows = {name: {m: by_mode[m][group].get(name) for m in modes} for name in names}
        lines += _table(title, label, rows, modes)
    for mode in modes:
        m = by_mode[mode]
        if m.get("num_samples", 1) > 1 and "pass_at_k" in m:
            lines += [f"## Sampling ({mode} audio, K = {m['num_samples']})", "",
                      "| metric | all | " + " | ".join(m["by_task"]) + " |",
                      "|" + "---|" * (2 + len(m["by_task"]))]
            for k in m["pass_at_k"]["k"]:
                e = m["pass_at_k"][f"pass@{k}"]
                tasks = [_pct(e["by_task"][t]["value"]) if t in e["by_task"] else "—" for t in m["by_task"]]
                lines.append(f"| pass@{k} | {_pct(e['total'])} | " + " | ".join(tasks) + " |")
            mv = m["majority_vote"]
            tasks = [_cell(mv["by_task"].get(t), m["by_task"][t]["n"]) for t in m["by_task"]]
            lines += [f"| majority vote [95% CI] | {_cell(mv['total'], mv['total']['n'])} | " + " | ".join(tasks)
                      + " |", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ paired accuracy difference
PAIRED_METHOD = "newcombe-square-and-add"  # Newcombe (1998) method 10


def _as_verdicts(name: str, values: Sequence[Any]) -> list[bool]:
    """Per-item correct / incorrect: bools or 0 / 1 (numpy's too); anything else is refused, not read as truthy."""
    out = []
    for i, v in enumerate(values):
        if isinstance(v, (str, bytes)) or v is None or not (v == 0 or v == 1):
            raise ValueError(f"{name}[{i}] = {v!r}: use True/False (or 1/0), one verdict per item")
        out.append(bool(v == 1))
    return out


def paired_difference(before: Sequence[bool], after: Sequence[bool], confidence: float = 0.95) -> dict[str, Any]:
    """Accuracy after minus accuracy before, on the SAME items, with a confidence interval for paired data.

    `before[i]` and `after[i]` are the verdicts on item i (e.g. held-out accuracy after SFT and at the end of
    GRPO). Returns {n, before, after, diff, ci_low, ci_high, method, confidence, counts} where `counts` is
    the paired table: both / before_only / after_only / neither correct.

    Method: Newcombe's square-and-add interval (Newcombe 1998, Stat Med 17:2635, method 10): the Wilson
    intervals of the two accuracies combined with the estimated correlation between them (the phi
    coefficient of the paired table, continuity-corrected toward 0 when positive).
    Why this one: two accuracies on the same items are strongly correlated (most items are right or
    wrong both times), so the unpaired interval is far too wide, and the Wald interval on the discordant
    pairs collapses to zero width when there are none, or few, (a tiny or unchanged model) and leaves
    [-1, 1]. Newcombe's interval is closed-form, stays in [-1, 1], never has zero width, and is among the
    intervals recommended for paired proportions by Fagerland, Lydersen & Laake (2014, Stat Med 33:2850),
    with coverage close to nominal down to small n. Checked in the tests against their published example
    (Cavo et al. 2012: diff -0.0621, 95% CI -0.1186 to -0.0046) and by exact coverage enumeration.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r}: use a level in (0, 1), e.g. 0.95")
    if len(before) != len(after):
        raise ValueError(f"paired verdicts need one before and one after per item: got {len(before)} before "
                         f"and {len(after)} after (the same items, in the same order)")
    if len(before) == 0:
        raise ValueError("paired_difference: no items (n = 0); an accuracy difference needs at least one "
                         "item evaluated both times")
    b_v, a_v = _as_verdicts("before", before), _as_verdicts("after", after)
    both = sum(x and y for x, y in zip(b_v, a_v))
    before_only = sum(x and not y for x, y in zip(b_v, a_v))
    after_only = sum(y and not x for x, y in zip(b_v, a_v))
    n = len(b_v)
    neither = n - both - before_only - after_only
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p_before, p_after = (both + before_only) / n, (both + after_only) / n
    diff = (after_only - before_only) / n
    lo_b, hi_b = wilson_interval(both + before_only, n, z)
    lo_a, hi_a = wilson_interval(both + after_only, n, z)
    # phi: correlation of the two verdicts; 0 when a margin is empty. Continuity-corrected as in Newcombe
    # (1998): a positive ad - bc is reduced by n / 2 (to no less than 0); a negative one is kept.
    margins = (both + before_only) * (after_only + neither) * (both + after_only) * (before_only + neither)
    phi = 0.0
    if margins > 0:
        cross = both * neither - before_only * after_only
        corrected = cross - n / 2 if cross > n / 2 else (0.0 if cross >= 0 else cross)
        phi = corrected / math.sqrt(margins)
    down_a, up_b = p_after - lo_a, hi_b - p_before  # how far the lower limit can move
    up_a, down_b = hi_a - p_after, p_before - lo_b  # how far the upper limit can move
    ci_low = diff - math.sqrt(max(0.0, down_a ** 2 + up_b ** 2 - 2 * phi * down_a * up_b))
    ci_high = diff + math.sqrt(max(0.0, up_a ** 2 + down_b ** 2 - 2 * phi * up_a * down_b))
    return {"n": n, "before": p_before, "after": p_after, "diff": diff,
            "ci_low": max(-1.0, ci_low), "ci_high": min(1.0, ci_high), "method": PAIRED_METHOD,
            "confidence": confidence,
            "counts": {"both": both, "before_only": before_only, "after_only": after_only, "neither": neither}}
