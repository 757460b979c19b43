"""Held-out accuracy during training (after SFT, every `eval.every` steps, at the end), from the rollout
workers' greedy answers; `sari-ray eval` (sari_ray.evaluate) is the standalone evaluation of a checkpoint."""
from __future__ import annotations

from sari_ray import metrics as metrics_lib
from sari_ray.batching import split_evenly


def evaluate_held_out(rollout, samples: list, style: str, max_tokens: int,
                      silent_audio: bool) -> tuple[dict[str, float], dict[str, dict[str, bool]]]:
    """Greedy held-out accuracy by tier, with real and (optionally) silent audio, across rollout workers.
    Returns (metrics, {"eval" | "eval_silent": {sample id: correct}}); `eval/audio_gain` = real - silent
    accuracy (what listening contributes: a text shortcut shows as a small gain)."""
    shards = split_evenly([x.to_dict() for x in samples], len(rollout))
    out: dict[str, float] = {}
    items: dict[str, dict[str, bool]] = {}
    for prefix, mode in [("eval", "real")] + ([("eval_silent", "silence")] if silent_audio else []):
        per_worker = rollout.sharded("evaluate", shards, style, max_tokens=max_tokens, audio_mode=mode)
        correct = [bool(r["correct"]) for shard in per_worker for r in shard]
        items[prefix] = {x.id: c for x, c in zip(samples, correct)}
        out.update(metrics_lib.accuracy_by_tier(correct, [x.tier or 0 for x in samples], prefix))
    if "eval_silent" in items:
        out["eval/audio_gain"] = out["eval/accuracy"] - out["eval_silent/accuracy"]
    return out, items
