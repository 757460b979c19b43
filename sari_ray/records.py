"""A GRPO step's data on its way between the actors, as pure functions (no Ray): the rows sent to the rollout
workers, and the learners' training records made from the rollouts and their rewards."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from sari_ray import grpo


# vLLM takes a signed 64-bit seed; a prompt's completions add up to 2**40 to its row's base (batch place x G).
SEED_SPACE = 2**63 - 2**40


def rollout_rows(samples: list[dict], seed: int, step: int, num_generations: int) -> list[dict]:
    """The batch's rows, each with the sampling seed of its first completion (`_seed`; completion k uses
    `_seed + k`). A prompt's seeds follow its place in the batch, not the worker it goes to, so a batch gives the
    same completions however many rollout workers share it. The step's base wraps within SEED_SPACE, so every
    accepted run.seed gives seeds vLLM takes (below 2**63); seeds under ~9.2 million never wrap."""
    base = ((seed * 1_000_003 + step) * 1_000_000) % SEED_SPACE
    return [{**row, "_seed": base + i * num_generations} for i, row in enumerate(samples)]


def is_truncated(completion: dict) -> bool:
    """Cut off by max_tokens before it ended (neither right nor wrong: see grpo.mask_truncated)."""
    return completion["finish_reason"] in grpo.TRUNCATED_FINISH_REASONS


def training_records(rollouts: list[dict], scores: list[dict], audio_of: Mapping[str, str], num_generations: int,
                     scale_rewards: bool, drop_uniform_groups: bool) -> list[dict]:
    """One record per completion the learners train on: group-relative advantages over each prompt's
    `num_generations` completions; groups whose rewards are all equal (no signal) dropped if asked.
    rollouts: one per prompt, in batch order, with `completions`; scores: one per completion, in the same order;
    audio_of: sample id -> audio path."""
    g = num_generations
    rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float32)
    advantages = grpo.compute_advantages(rewards, g, scale_rewards=scale_rewards)
    keep = ~grpo.uniform_group_mask(rewards, g) if drop_uniform_groups else torch.ones(len(rollouts), dtype=torch.bool)
    records = []
    for p, rollout in enumerate(rollouts):
        if not keep[p]:
            continue
        for k, c in enumerate(rollout["completions"]):
            records.append({"prompt": rollout["prompt"], "audio": audio_of[rollout["sample_id"]],
                            "completion_ids": c["token_ids"], "sampling_logprobs": c["logprobs"],
                            "advantage": float(advantages[p * g + k]),
                            "truncated": is_truncated(c), "weight": 1.0})
    return records


def check_staleness(step: int, completions: list[dict], weight_version: int, max_staleness: int) -> list[int]:
    """How many weight versions each completion of a step is behind `weight_version` (the weights the step trains
    from): at most `max_staleness`, and never ahead, is what the asynchronous pipeline promises; anything else is
    a lost weight sync."""
    staleness = [weight_version - c["weight_version"] for c in completions]
    if max(staleness) > max_staleness or min(staleness) < 0:
        raise RuntimeError(f"step {step}: completions generated with weight versions "
                           f"{sorted({c['weight_version'] for c in completions})} at version {weight_version}, beyond "
                           f"rollout.max_staleness={max_staleness} (a rollout worker missed a weight sync)")
    return staleness
