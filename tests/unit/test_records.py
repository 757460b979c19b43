"""The step's data between the actors (sari_ray.records, batching.split_padded): pure, hand-computed cases."""
from __future__ import annotations

from pathlib import Path

import pytest

from sari_ray.batching import split_padded
from sari_ray.records import SEED_SPACE, is_truncated, rollout_rows, training_records

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def _completion(tokens, reason="stop"):
    return {"token_ids": tokens, "logprobs": [-0.5] * len(tokens), "finish_reason": reason, "text": "x"}


def _rollouts():
    return [{"sample_id": "a", "prompt": "pa", "completions": [_completion([1]), _completion([2, 3], "length")]},
            {"sample_id": "b", "prompt": "pb", "completions": [_completion([4]), _completion([5])]}]


def test_records_carry_group_relative_advantages_in_batch_order():
    scores = [{"reward": 2.0}, {"reward": 0.0}, {"reward": 1.0}, {"reward": 1.0}]
    records = training_records(_rollouts(), scores, {"a": "a.wav", "b": "b.wav"}, 2, scale_rewards=False,
                               drop_uniform_groups=False)
    assert [r["completion_ids"] for r in records] == [[1], [2, 3], [4], [5]]
    assert [r["advantage"] for r in records] == [1.0, -1.0, 0.0, 0.0]  # reward - group mean, unscaled
    assert [r["truncated"] for r in records] == [False, True, False, False]
    assert [r["audio"] for r in records] == ["a.wav", "a.wav", "b.wav", "b.wav"]
    assert {r["prompt"] for r in records[:2]} == {"pa"} and all(r["weight"] == 1.0 for r in records)
    assert records[1]["sampling_logprobs"] == [-0.5, -0.5]


def test_uniform_groups_are_dropped_when_asked():
    scores = [{"reward": 2.0}, {"reward": 0.0}, {"reward": 1.0}, {"reward": 1.0}]
    records = training_records(_rollouts(), scores, {"a": "a.wav", "b": "b.wav"}, 2, scale_rewards=True,
                               drop_uniform_groups=True)
    assert [r["completion_ids"] for r in records] == [[1], [2, 3]]  # group b has no signal
    assert records[0]["advantage"] == pytest.approx(-records[1]["advantage"]) and records[0]["advantage"] > 0


def test_truncation_follows_the_finish_reasons_grpo_names():
    assert is_truncated(_completion([1], "length")) and not is_truncated(_completion([1], "stop"))


def test_rollout_seeds_follow_the_place_in_the_batch():
    rows = rollout_rows([{"id": "a"}, {"id": "b"}, {"id": "c"}], seed=1, step=2, num_generations=4)
    base = (1 * 1_000_003 + 2) * 1_000_000
    assert [r["_seed"] for r in rows] == [base, base + 4, base + 8] and rows[1]["id"] == "b"
    # the same batch cut differently (more workers) keeps every prompt's seeds
    assert rollout_rows([{"id": "a"}, {"id": "b"}], 1, 2, 4)[1]["_seed"] == rows[1]["_seed"]


@pytest.mark.parametrize("n, parts", [(5, 2), (4, 2), (1, 3), (7, 4)])
def test_split_padded_gives_equal_shards_whose_padding_weighs_nothing(n, parts):
    rows = [{"i": i, "weight": 1.0} for i in range(n)]
    shards = split_padded(rows, parts, "weight")
    assert len({len(s) for s in shards}) == 1 and len(shards) == parts
    flat = [r for s in shards for r in s]
    assert flat[:n] == rows and all(r["weight"] == 0.0 for r in flat[n:])
    assert sum(r["weight"] for r in flat) == n


@pytest.mark.parametrize("seed", [0, 9_000_000, 18_446_745, 3_000_000_000, 2**32 - 1])
def test_every_accepted_seed_gives_sampling_seeds_vllm_takes(seed):
    """run.seed < 2**32 is accepted; seeds at or above ~18.4 million overflowed vLLM's 64-bit seed before."""
    from sari_ray.config import load_config

    cfg = load_config(REPO / "configs" / "demo_cpu.yaml", [f"run.seed={seed}"])  # accepted
    g, prompts = 8, 64
    for step in (1, 999_999):
        rows = rollout_rows([{"id": str(i)} for i in range(prompts)], cfg.run.seed, step, g)
        seeds = [r["_seed"] + k for r in rows for k in range(g)]
        assert 0 <= min(seeds) and max(seeds) < 2**63 and len(set(seeds)) == len(seeds)
    if seed < 9_000_000:  # no wrap: the seeds every earlier run sampled with
        assert rollout_rows([{}], seed, 5, g)[0]["_seed"] == (seed * 1_000_003 + 5) * 1_000_000
    assert SEED_SPACE + 2**40 == 2**63


def test_staleness_beyond_the_bound_or_from_the_future_is_a_lost_sync():
    from sari_ray.records import check_staleness

    done = [{"weight_version": 4}, {"weight_version": 5}]
    assert check_staleness(3, done, 5, 1) == [1, 0]  # one version behind at most: fine
    with pytest.raises(RuntimeError, match=r"step 3: completions generated with weight versions \[4, 5\] at version 6, "
                                           r"beyond rollout.max_staleness=1 \(a rollout worker missed a weight sync\)"):
        check_staleness(3, done, 6, 1)
    with pytest.raises(RuntimeError, match="missed a weight sync"):
        check_staleness(3, done, 4, 1)  # a completion newer than the learner's weights
