"""Step metrics as pure functions returning `group/name` keys; only the driver sends them to MLflow."""
from __future__ import annotations

from collections import defaultdict
from statistics import fmean, pstdev
from typing import Any


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


def group_signal(rewards: list[float], num_generations: int) -> dict[str, float]:
    """How much learning signal a GRPO batch holds: the fraction of prompts whose G rewards differ (the others
    have zero advantage and add nothing) and the mean within-group reward std."""
    groups = [rewards[i: i + num_generations] for i in range(0, len(rewards), num_generations)]
    return {"reward/signal_groups_frac": fmean(float(max(g) != min(g)) for g in groups),
            "reward/group_std_mean": fmean(pstdev(g) for g in groups)}


def throughput(completions: int, tokens: int, step_s: float, timings: dict[str, float]) -> dict[str, float]:
    """Per wall-second of the whole step (what a user waits for), and of the rollout workers' generation alone
    under its own names; busy fractions say how long each group worked while the step ran (the rest it waited).
    `time/rollout_generate` is the workers' own generation time, `time/rollout` the driver's wait for it: with
    rollout.max_staleness > 0 generation overlaps learning and the wait is shorter."""
    step_s = max(step_s, 1e-9)
    generate_s = timings.get("time/rollout_generate", timings.get("time/rollout", 0.0))
    rollout_s = max(generate_s, 1e-9)
    return {"time/step": step_s,
            "throughput/completions_per_s": completions / step_s, "throughput/tokens_per_s": tokens / step_s,
            "rollout/completions_per_s": completions / rollout_s, "rollout/tokens_per_s": tokens / rollout_s,
            "time/rollout_busy_frac": min(generate_s / step_s, 1.0),
            "time/learner_busy_frac": (timings.get("time/learn", 0.0) + timings.get("time/sync", 0.0)) / step_s}


def grpo_step_metrics(completions: list[dict], scores: list[dict], truncated: list[bool], tiers: list[int],
                      staleness: list[int], num_generations: int, step_s: float, timings: dict[str, float],
                      sync: dict[str, float], weight_version: int, extra: dict[str, float]) -> dict[str, float]:
    """What one GRPO step logs: rewards and lengths (one entry per completion in completions / scores / truncated
    / tiers / staleness, the versions each was behind the weights the step trained from), the group signal,
    throughput and phase timings, the weight sync and the version it shipped; `extra` (learner, curriculum,
    fault counts) is merged in as is."""
    m = rollout_metrics(scores, [len(c["token_ids"]) for c in completions], truncated, tiers)
    m.update(group_signal([sc["reward"] for sc in scores], num_generations))
    m.update(extra)
    m.update(timings)
    m.update(throughput(len(completions), sum(len(c["token_ids"]) for c in completions), step_s, timings))
    m.update({"sync/bytes": sync["bytes"], "sync/seconds": sync["seconds"], "rollout/weight_version": weight_version,
              "rollout/staleness_mean": sum(staleness) / len(staleness), "rollout/staleness_max": max(staleness)})
    return m


def run_summary(state: dict[str, Any], seconds: float, final: dict[str, float],
                final_items: dict[str, dict[str, bool]], eval_tier_of: dict[str, int]) -> dict[str, Any]:
    """What a finished run reports (summary.json, the console's tables): steps, reward trend per tier stretch,
    throughput, promotions, held-out accuracy after SFT and at the end, and what GRPO added per tier."""
    curve = state["curve"]
    return {"seconds": seconds, "grpo_steps": state["step"], "sft_steps": state["sft_step"],
            "reward_by_tier": reward_trend_by_tier(curve),
            "completions_per_s": mean_or_none([c[2] for c in curve]), "sync_seconds": mean_or_none([c[3] for c in curve]),
            "promotions": state.get("promotions", []), "final_eval": final,
            "after_sft_eval": next((h for h in state["history"] if h["step"] == 0), None),
            "grpo_gain": grpo_gain(state.get("grpo_tiers", []), eval_tier_of, state.get("after_sft_items"), final_items)}


def logs_step(step: int, every: int, last_step: int, evaluated: bool, promoted: bool) -> bool:
    """Whether GRPO step `step`'s metrics go to MLflow (`tracking.log_every`): every `every`-th step, and always
    the last step and a step that evaluated the held-out set or promoted a tier (those are the curves' points)."""
    return step % every == 0 or step == last_step or evaluated or promoted


def completions_table(step: int, scored: list[tuple]) -> list[dict[str, Any]]:
    """Rows of MLflow's completions table: (sample, completion, score) per row."""
    return [{"step": step, "sample_id": x.id, "tier": x.tier, "answer": x.answer, "completion": c["text"],
             **{k: sc[k] for k in ("reward", "accuracy", "format")}} for x, c, sc in scored]


def reward_trend_by_tier(curve: list[list]) -> list[dict[str, Any]]:
    """Mean GRPO reward over the first and last quarter of each stretch of steps at one tier (a promotion
    resets the reward level, so a whole-run trend would mix tiers). curve rows: [step, reward, ..., tier]."""
    segments: list[list[list]] = []
    for row in curve:
        if not segments or segments[-1][-1][-1] != row[-1]:
            segments.append([])
        segments[-1].append(row)
    trend = []
    for rows in segments:
        quarter = max(1, len(rows) // 4)
        trend.append({"tier": rows[0][-1], "steps": [rows[0][0], rows[-1][0]],
                      "first_quarter": mean_or_none([r[1] for r in rows[:quarter]]),
                      "last_quarter": mean_or_none([r[1] for r in rows[-quarter:]])})
    return trend


def mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def per_sample_accuracy(sample_ids: list[str], scores: list[dict]) -> dict[str, float]:
    """Mean accuracy over each sample's completions (what the curriculum sees)."""
    acc: dict[str, list[float]] = defaultdict(list)
    for sid, score in zip(sample_ids, scores):
        acc[sid].append(score["accuracy"])
    return {sid: fmean(v) for sid, v in acc.items()}


def mean_over(parts: list[dict[str, float]]) -> dict[str, float]:
    """One set of metrics from several (learner ranks, a step's GRPO iterations): the mean of each, the max of
    `*_max` metrics."""
    keys = parts[0].keys()
    return {k: (max if k.endswith("_max") else fmean)(r[k] for r in parts) for k in keys}


def accuracy_by_tier(correct: list[float], tiers: list[int], prefix: str) -> dict[str, float]:
    """`prefix/accuracy` and `prefix/accuracy_tier{k}`; correct: 0/1 (or bools) per item."""
    by_tier: dict[int, list[float]] = defaultdict(list)
    for ok, tier in zip(correct, tiers):
        by_tier[tier].append(float(ok))
    out = {f"{prefix}/accuracy": fmean(float(c) for c in correct) if correct else 0.0}
    out.update({f"{prefix}/accuracy_tier{t}": fmean(v) for t, v in sorted(by_tier.items())})
    return out


def grpo_gain(tiers: list[int], tier_of: dict[str, int], after_sft: dict[str, dict[str, bool]] | None,
              final: dict[str, dict[str, bool]]) -> list[dict]:
    """What GRPO added, per tier it trained on: held-out accuracy after SFT vs at the end on the same items,
    the paired difference with its 95% CI, and the final accuracy with silent audio (a gain that comes from
    listening keeps `final - final_silent` large). after_sft / final: {"eval" | "eval_silent": {id: correct}}.
    Empty without an after-SFT evaluation (no SFT: nothing to compare against)."""
    from sari_ray.eval_stats import paired_difference

    if not after_sft:
        return []
    rows = []
    for tier in tiers:
        ids = [i for i in final["eval"] if tier_of.get(i) == tier and i in after_sft["eval"]]
        if not ids:
            continue
        paired = paired_difference([after_sft["eval"][i] for i in ids], [final["eval"][i] for i in ids])
        row = {"tier": tier, "n": len(ids), "after_sft": paired["before"], "final": paired["after"],
               "diff": paired["diff"], "ci_low": paired["ci_low"], "ci_high": paired["ci_high"]}
        if "eval_silent" in final:
            row["final_silent"] = fmean(float(final["eval_silent"][i]) for i in ids)
        rows.append(row)
    return rows
