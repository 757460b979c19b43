"""End to end on real components: Ray, vLLM (cpu), DeepSpeed (gloo, 2 ranks), MLflow server, tiny Qwen2-Audio."""
from __future__ import annotations

import json

import pytest

from tests.integration.conftest import REPO, short_run_overrides

pytestmark = pytest.mark.integration


def test_rollout_weights_equal_learner_weights_after_every_sync(short_training_run):
    checks = short_training_run["checks"]
    assert len(checks) == 1 + 4  # after SFT and after each GRPO step
    for check in checks:
        assert check["ranks_agree"], f"learner ranks diverged: {check['label']}"
        assert check["tensors"] == 66, check  # every tensor of the tiny Qwen2-Audio is compared by name
        assert check["mismatches"] == [[]], check
        assert check["versions"] == [check["expected_version"]], check
    versions = [c["expected_version"] for c in checks]
    assert versions == sorted(set(versions)), "every sync bumps the weight version"


def test_vllm_sampling_logprobs_match_learner_after_syncs(short_training_run):
    """A step sampled with the weights the learner holds (staleness 0) gets the same log-probs from the learner.
    Clips repeat across steps (small tier-0 pool), so a stale audio-encoder cache would show here. The short run is
    asynchronous (rollout.max_staleness=1): later steps sample one version behind, by design, and their gap is
    the policy change that truncated IS corrects, so only on-policy steps are compared."""
    on_policy = [c for c in short_training_run["checks"][1:] if c["metrics"]["rollout/staleness_max"] == 0]
    assert on_policy, "no step sampled with the learner's current weights"
    for check in on_policy:
        gap = check["metrics"]["policy/logprob_gap_vllm"]
        assert gap < 1e-3, f"step {check['label']}: |vLLM - learner| log-prob gap {gap}"


def test_rewards_curriculum_and_metrics_in_mlflow(short_training_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(short_training_run["tracking_uri"])
    run = client.get_run(short_training_run["run_id"])
    for name in ("reward/mean", "reward/std", "reward/accuracy", "reward/format", "curriculum/tier",
                 "policy/clip_fraction", "policy/entropy", "completion/length_mean", "policy/grad_norm",
                 "policy/lr", "time/rollout", "time/reward", "time/learn", "time/sync",
                 "throughput/completions_per_s", "sft/loss", "eval/accuracy", "eval_silent/accuracy"):
        assert name in run.data.metrics, f"metric {name} missing; have {sorted(run.data.metrics)}"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "reward/mean")] == [1, 2, 3, 4]
    assert run.data.params["grpo.num_generations"] == "2"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "completions", "report.png"} <= artifacts
    report = short_training_run["output_dir"] / "report.png"  # the run's picture, beside summary.json
    assert short_training_run["summary"]["report"] == str(report)
    assert report.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report.stat().st_size > 10_000
    steps = [json.loads(line)["step"] for line in (short_training_run["output_dir"] / "batches.jsonl").open()]
    assert steps == [1, 2, 3, 4]
    state = json.loads((short_training_run["output_dir"] / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    assert state["curriculum"]["step_index"] == 4  # the data cursor advanced once per GRPO step
    assert state["mlflow_run_id"] == run.info.run_id and state["step"] == 4


def test_resume_continues_same_data_order_and_mlflow_run(short_training_run, tmp_path, tiny_qwen2_audio, synth_data,
                                                         mlflow_server):
    """Interrupted after step 2, resumed to step 4 with 2 rollout workers: the same sample ids per step as the
    uninterrupted run (no replayed, no skipped samples), one MLflow run."""
    from mlflow.tracking import MlflowClient

    from sari_ray.train import run_training

    base = short_run_overrides(tmp_path, synth_data, tiny_qwen2_audio) + [
        f"tracking.tracking_uri={mlflow_server}", "rollout.num_workers=2"]
    config = [str(REPO / "configs" / "demo_cpu.yaml")]
    first = run_training(config, [*base, "grpo.steps=2"])
    second = run_training(config, [*base, "grpo.steps=4", "run.resume=true"])
    assert second["mlflow_run_id"] == first["mlflow_run_id"]

    def ids_by_step(path):
        return {row["step"]: row["ids"] for row in map(json.loads, path.open())}

    reference = ids_by_step(short_training_run["output_dir"] / "batches.jsonl")
    resumed = ids_by_step(tmp_path / "batches.jsonl")
    assert resumed == reference
    history = MlflowClient(mlflow_server).get_metric_history(first["mlflow_run_id"], "reward/mean")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    # and the same policy: the learner's weights after the resumed steps equal the uninterrupted run's
    # (sampling seeds follow a prompt's place in the batch, not the worker that serves it)
    from safetensors.torch import load_file

    final = "checkpoints/step_000004/model/model.safetensors"
    uninterrupted = load_file(short_training_run["output_dir"] / final)
    resumed_weights = load_file(tmp_path / final)
    assert uninterrupted.keys() == resumed_weights.keys()
    diff = max(float((uninterrupted[k] - resumed_weights[k]).abs().max()) for k in uninterrupted)
    assert diff <= 1e-6, f"resumed weights differ from the uninterrupted run's by up to {diff}"


def test_resume_with_a_lower_staleness_bound_generates_the_too_stale_rollouts_again(short_training_run, tmp_path,
                                                                                    tiny_qwen2_audio, synth_data, capsys):
    """The short run is asynchronous (rollout.max_staleness=1): its step-2 checkpoint keeps step 3's completions,
    sampled one weight version back. Resumed with max_staleness=0 they are too stale: step 3 is generated again
    with the same batch, instead of the run dying with "a rollout worker missed a weight sync"."""
    import shutil

    from mlflow.tracking import MlflowClient

    from sari_ray.checkpoints import STATE_FILE, read_in_flight
    from sari_ray.train import run_training

    src, out = short_training_run["output_dir"], tmp_path / "run"
    shutil.copytree(src / "checkpoints" / "step_000002", out / "checkpoints" / "step_000002")
    lines = (src / "batches.jsonl").read_text().splitlines()
    (out / "batches.jsonl").write_text("\n".join(lines[:2]) + "\n")
    state_file = out / "checkpoints" / "step_000002" / STATE_FILE
    state = json.loads(state_file.read_text())
    state["mlflow_run_id"] = state["tracking_uri"] = None  # a run of its own (a local store), not the reference's
    state_file.write_text(json.dumps(state))
    assert [f["step"] for f in read_in_flight(out / "checkpoints" / "step_000002")] == [3]
    summary = run_training([str(REPO / "configs" / "demo_cpu.yaml")],
                           short_run_overrides(out, synth_data, tiny_qwen2_audio)
                           + ["run.resume=true", "rollout.max_staleness=0"])
    assert "checkpoint kept for steps [3] are too stale now and are generated again" in capsys.readouterr().out
    assert (out / "batches.jsonl").read_text().splitlines() == lines  # the same batches, every step once
    history = MlflowClient(summary["tracking_uri"]).get_metric_history(summary["mlflow_run_id"], "rollout/staleness_max")
    assert {m.step: m.value for m in history} == {3: 0.0, 4: 0.0}


def test_a_step_with_nothing_to_learn_keeps_the_weight_version(tmp_path, tiny_qwen2_audio, synth_data):
    """Every group uniform and dropped (format-only reward: the tiny model never writes the structured format):
    no learner update, so no new weight version and no weights shipped."""
    from sari_ray.train import run_training

    summary = run_training([str(REPO / "configs" / "demo_cpu.yaml")],
                           short_run_overrides(tmp_path, synth_data, tiny_qwen2_audio)
                           + ["sft.steps=0", "grpo.steps=2", "reward.accuracy_weight=0", "grpo.drop_uniform_groups=true",
                              "eval.max_samples=2", "eval.silent_audio=false"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["tracking_uri"])

    def values(key):
        return [m.value for m in sorted(client.get_metric_history(summary["mlflow_run_id"], key), key=lambda m: m.step)]

    assert values("learn/records") == [0.0, 0.0]  # the premise: nothing to learn at either step
    assert values("rollout/weight_version") == [0.0, 0.0] and values("sync/bytes") == [0.0, 0.0]
