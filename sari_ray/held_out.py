"""Held-out accuracy during training (after SFT, every `eval.every` steps, at the end), from the rollout
workers' greedy answers; `sari-ray eval` (sari_ray.evaluate) is the standalone evaluation of a checkpoint."""
from __future__ import annotations

from typing import Any

from sari_ray import metrics as metrics_lib
from sari_ray.batching import split_evenly

HELD_OUT_FILE = "held_out.json"  # a finished run's held-out curve and final verdicts (read by `sari-ray ablate`)


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


def held_out_record(history: list[dict], step: int, final: dict[str, float], final_items: dict[str, dict[str, bool]],
                    tier_of: dict[str, int]) -> dict[str, Any]:
    """held_out.json: the held-out metrics at every evaluated step (0: after SFT, every `eval.every` steps, the end
    at `step`), the final ones, and the final verdicts per item with real audio and each item's tier (what
    `sari-ray ablate` pairs arms on)."""
    curve = [h for h in history if h["step"] != step] + [{"step": step, **final}]
    return {"curve": sorted(curve, key=lambda h: h["step"]), "final": final, "items": final_items["eval"],
            "tiers": {i: tier_of[i] for i in final_items["eval"]}}
