"""Pure pieces of the driver: sharding, step metrics, local-cluster resources."""
from pathlib import Path

import pytest

from sari_ray import metrics
from sari_ray.batching import split_evenly
from sari_ray.config import load_config
from sari_ray.actors.wiring import ray_init_kwargs

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("n, parts", [(10, 3), (3, 3), (2, 4), (0, 2), (17, 1)])
def test_split_evenly_keeps_order_and_balances(n, parts):
    shards = split_evenly(list(range(n)), parts)
    assert len(shards) == parts and [x for s in shards for x in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_rollout_metrics_and_per_sample_accuracy():
    scores = [{"reward": 2.0, "accuracy": 1.0, "format": 1.0}, {"reward": 0.0, "accuracy": 0.0, "format": 0.0},
              {"reward": 1.0, "accuracy": 0.0, "format": 1.0}, {"reward": 1.0, "accuracy": 1.0, "format": 0.0}]
    m = metrics.rollout_metrics(scores, [4, 6, 8, 10], [False, False, True, False], [0, 0, 1, 1])
    assert m["reward/mean"] == 1.0 and m["reward/accuracy"] == 0.5 and m["reward/format"] == 0.5
    assert m["completion/length_mean"] == 7.0 and m["completion/truncated_frac"] == 0.25
    assert m["reward/accuracy_tier0"] == 0.5 and m["reward/accuracy_tier1"] == 0.5
    assert metrics.per_sample_accuracy(["a", "a", "b", "b"], scores) == {"a": 0.5, "b": 0.5}
    assert metrics.mean_over([{"x": 1.0}, {"x": 3.0}]) == {"x": 2.0}
    by_tier = metrics.accuracy_by_tier([True, False, True], [0, 0, 2], "eval")
    assert by_tier == {"eval/accuracy": pytest.approx(2 / 3), "eval/accuracy_tier0": 0.5, "eval/accuracy_tier2": 1.0}


def test_local_cluster_offers_the_custom_resources_the_actors_request(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo_cpu.yaml", ["rollout.num_workers=3", "learner.num_workers=2", "cluster.num_cpus=5"])
    kwargs = ray_init_kwargs(cfg)
    assert kwargs["address"] == "local"
    assert kwargs["resources"] == {"rollout_slot": 3.0, "learner_slot": 2.0}
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert ray_init_kwargs(cfg)["address"] == "http://127.0.0.1:8265"


def test_reward_trend_is_reported_per_tier_stretch():
    from sari_ray.metrics import reward_trend_by_tier

    curve = [[1, 1.8, 0, 0, 0], [2, 1.9, 0, 0, 0], [3, 1.0, 0, 0, 1], [4, 1.2, 0, 0, 1], [5, 1.4, 0, 0, 1],
             [6, 1.6, 0, 0, 1]]
    trend = reward_trend_by_tier(curve)
    assert [t["tier"] for t in trend] == [0, 1] and trend[1]["steps"] == [3, 6]
    assert trend[1]["first_quarter"] == 1.0 and trend[1]["last_quarter"] == 1.6
    assert reward_trend_by_tier([]) == []


def test_group_signal_counts_groups_with_differing_rewards():
    from sari_ray.metrics import group_signal

    m = group_signal([1, 1, 1, 1, 0, 1, 0, 1, 2, 2, 2, 2], 4)
    assert m["reward/signal_groups_frac"] == pytest.approx(1 / 3)
    assert m["reward/group_std_mean"] == pytest.approx(0.5 / 3)


def test_missing_resources_names_what_the_cluster_lacks():
    from sari_ray.actors.wiring import missing_resources
    from sari_ray.config import actor_resources

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo_cpu.yaml")
    need = actor_resources(cfg)
    assert need == {"CPU": 3.0, "rollout_slot": 1.0, "learner_slot": 2.0}
    assert missing_resources(need, {"CPU": 4.0, "rollout_slot": 1.0}) == {"learner_slot": (2.0, 0.0)}
    assert missing_resources(need, {"CPU": 4.0, "rollout_slot": 1.0, "learner_slot": 2.0}) == {}


def test_throughput_is_per_wall_second_of_the_step_with_rollout_figures_apart():
    from sari_ray.metrics import throughput

    m = throughput(64, 1024, 8.0, {"time/rollout": 2.0, "time/learn": 5.0, "time/sync": 0.5})
    assert m["throughput/completions_per_s"] == 8.0 and m["throughput/tokens_per_s"] == 128.0
    assert m["rollout/completions_per_s"] == 32.0 and m["rollout/tokens_per_s"] == 512.0
    assert m["time/rollout_busy_frac"] == 0.25 and m["time/learner_busy_frac"] == pytest.approx(5.5 / 8)
    # async (rollout.max_staleness > 0): the driver waited 0.1 s, the workers generated for 4 s of the step
    m = throughput(64, 1024, 8.0, {"time/rollout": 0.1, "time/rollout_generate": 4.0, "time/learn": 5.0})
    assert m["rollout/completions_per_s"] == 16.0 and m["time/rollout_busy_frac"] == 0.5


def test_step_deadline_is_derived_from_the_step_size_unless_set():
    from sari_ray.config import step_timeout_s

    demo = Path(__file__).resolve().parents[2] / "configs" / "demo_cpu.yaml"
    large = ["grpo.prompts_per_step=64", "grpo.max_completion_length=1024", "rollout.max_model_len=4096"]
    small = step_timeout_s(load_config(demo, ["grpo.prompts_per_step=4", "grpo.max_completion_length=24"]))
    big = step_timeout_s(load_config(demo, large))
    assert 600 <= small < big  # 10 min at least, more for a bigger step
    spread = step_timeout_s(load_config(demo, large + ["rollout.num_workers=8", "learner.num_workers=8",
                                                       "cluster.num_cpus=16"]))
    assert 600 <= spread < big  # per actor: more workers, less each
    assert step_timeout_s(load_config(demo, ["cluster.step_timeout_s=42"])) == 42.0


def test_step_metrics_log_the_staleness_measured_before_the_sync_and_the_version_shipped():
    completions = [{"token_ids": [1, 2], "weight_version": 4}, {"token_ids": [3], "weight_version": 5}]
    scores = [{"reward": 2.0, "accuracy": 1.0, "format": 1.0}, {"reward": 0.0, "accuracy": 0.0, "format": 0.0}]
    m = metrics.grpo_step_metrics(completions, scores, [False, True], [0, 0], [1, 0], 2, 2.0, {"time/learn": 1.0},
                                  {"bytes": 8.0, "seconds": 0.5}, 6, {"learn/records": 2})
    assert m["rollout/staleness_max"] == 1 and m["rollout/staleness_mean"] == 0.5  # as given, not against v6
    assert m["rollout/weight_version"] == 6 and m["sync/bytes"] == 8.0 and m["learn/records"] == 2
    assert m["completion/truncated_frac"] == 0.5 and m["throughput/completions_per_s"] == 1.0


def test_log_every_keeps_the_last_step_and_those_that_evaluate_or_promote():
    logged = [s for s in range(1, 24) if metrics.logs_step(s, 5, 23, evaluated=s % 10 == 0, promoted=s == 7)]
    assert logged == [5, 7, 10, 15, 20, 23]
    assert [s for s in range(1, 5) if metrics.logs_step(s, 1, 4, False, False)] == [1, 2, 3, 4]  # the default
