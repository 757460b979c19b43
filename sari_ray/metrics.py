"""Step metrics as pure functions returning `group/name` keys; only the driver sends them to MLflow."""
from __future__ import annotations

from collections import defaultdict
from statistics import fmean, pstdev


def rollout_metrics(scores: list[dict], lengths: list[int], truncated: list[bool],
                    tiers: list[int]) -> dict[str, float]:
    """scores/lengths/truncated/tiers: one entry per completion."""
    rewards = [s["reward"] for s in scores]
    out = {
        "reward/mean": fmean(rewards),
        "reward/std": pstdev(rewards),
        "reward/format": fmean(s["format"] for s in scores),
        "completion/length_mean": fmean(lengths),
        "completion/length_max": float(max(lengths)),
        "completion/truncated_frac": fmean(float(t) for t in truncated),
    }
    out.update(accuracy_by_tier([s["accuracy"] for s in scores], tiers, "reward"))
    return out


def per_sample_accuracy(sample_ids: list[str], scores: list[dict]) -> dict[str, float]:
    """Mean accuracy over each sample's completions (what the curriculum sees)."""
    acc: dict[str, list[float]] = defaultdict(list)
    for sid, score in zip(sample_ids, scores):
        acc[sid].append(score["accuracy"])
    return {sid: fmean(v) for sid, v in acc.items()}


def mean_over_ranks(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Mean over learner ranks; `*_max` metrics take the max."""
    keys = per_rank[0].keys()
    return {k: (max if k.endswith("_max") else fmean)(r[k] for r in per_rank) for k in keys}


def accuracy_by_tier(correct: list[float], tiers: list[int], prefix: str) -> dict[str, float]:
    """`prefix/accuracy` and `prefix/accuracy_tier{k}`; correct: 0/1 (or bools) per item."""
    by_tier: dict[int, list[float]] = defaultdict(list)
    for ok, tier in zip(correct, tiers):
        by_tier[tier].append(float(ok))
    out = {f"{prefix}/accuracy": fmean(float(c) for c in correct) if correct else 0.0}
    out.update({f"{prefix}/accuracy_tier{t}": fmean(v) for t, v in sorted(by_tier.items())})
    return out
