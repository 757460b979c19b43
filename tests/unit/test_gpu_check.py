"""`sari-ray check gpu` on a machine without CUDA: every GPU step says it was skipped and why."""
from __future__ import annotations

import json

import pytest

from sari_ray import gpu_check

pytestmark = pytest.mark.unit


def test_on_cpu_the_gpu_steps_say_what_they_skipped(monkeypatch):
    monkeypatch.setattr(gpu_check, "cuda_device", lambda: None)
    monkeypatch.setattr(gpu_check, "check_patch", lambda: gpu_check.step("filled-frames patch", "ok"))
    results = {r["step"]: r for r in gpu_check.run_checks(packages=("json",))}
    assert results["imports"]["status"] == "ok"
    assert results["CUDA"] == {"step": "CUDA", "status": "skipped", "detail": "no CUDA device"}
    assert results["bench learner-step 7B"]["status"] == "skipped"
    assert results["tiny flagship on CUDA"] == {"step": "tiny flagship on CUDA", "status": "skipped",
                                                "detail": "no CUDA device"}
    assert "7B broadcast skipped" in results["bench sync"]["detail"] and results["bench sync"]["gb_per_s"] > 0
    assert results["plan (flagship, KubeRay pods)"]["verdict"] == "ok"
    assert "80 GiB assumed" in results["plan (flagship, KubeRay pods)"]["detail"]
    assert all(r["status"] != "failed" for r in results.values())


def test_a_missing_package_or_a_failing_step_is_reported_and_the_rest_run(monkeypatch):
    monkeypatch.setattr(gpu_check, "cuda_device", lambda: None)
    monkeypatch.setattr(gpu_check, "check_patch", lambda: 1 / 0)
    results = {r["step"]: r for r in gpu_check.run_checks(packages=("json", "no_such_package_here"))}
    assert results["imports"]["status"] == "failed" and "no_such_package_here" in results["imports"]["detail"]
    assert results["filled-frames patch"] == {"step": "filled-frames patch", "status": "failed",
                                              "detail": "ZeroDivisionError: division by zero"}
    assert results["bench sync"]["status"] == "skipped"  # still ran


def test_budget_spent_skips_the_remaining_steps(monkeypatch):
    monkeypatch.setattr(gpu_check, "cuda_device", lambda: None)
    results = gpu_check.run_checks(packages=("json",), budget_s=-1)
    assert [r["detail"] for r in results[2:]] == ["the -1 s budget is spent"] * 5


def test_learner_step_prediction_follows_the_plan_arithmetic():
    tiny = gpu_check.learner_step_prediction("tiny", "float32", gradient_checkpointing=False)
    assert gpu_check.learner_step_prediction("tiny", "float32", gradient_checkpointing=True) < tiny
    big = gpu_check.learner_step_prediction()  # 7B, bf16, checkpointing: 8.4 B x 2 bytes x 4 + activations
    assert 8.39e9 * 8 < big < 8.39e9 * 8 + 20 * 2**30


def test_cli_prints_a_table_and_one_json_line(monkeypatch, capsys):
    from sari_ray.cli import main

    monkeypatch.setattr(gpu_check, "PACKAGES", ("json",))
    monkeypatch.setattr(gpu_check, "cuda_device", lambda: None)
    monkeypatch.setattr(gpu_check, "check_patch", lambda: gpu_check.step("filled-frames patch", "ok"))
    monkeypatch.setattr(gpu_check, "run_checks", lambda budget_s, _run=gpu_check.run_checks:
                        _run(packages=("json",), budget_s=budget_s))
    assert main(["check", "gpu"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "sari-ray check gpu" in out[0] and json.loads(out[-1])["check"] == "gpu"


@pytest.mark.parametrize("gpus, learners, backend", [(1, 1, "object_store"), (2, 1, "collective"),
                                                     (8, 2, "collective")])
def test_the_tiny_flagship_fits_the_gpus_of_the_box(gpus, learners, backend):
    """The overrides compose into a valid config whose actors fit `gpus` devices; NCCL only across devices."""
    from sari_ray.config import load_config

    cfg = load_config([str(gpu_check.FLAGSHIP), str(gpu_check.TINY_OVERLAY)], gpu_check.tiny_flagship_overrides(gpus))
    assert cfg.run.device == "cuda" and cfg.learner.zero_stage == 3 and cfg.model.dtype == "bfloat16"
    assert cfg.learner.num_workers == learners and cfg.learner.sync_backend == backend
    used = cfg.learner.num_workers * cfg.learner.num_gpus_per_worker + cfg.rollout.num_workers * \
        cfg.rollout.num_gpus_per_worker
    assert used <= gpus and cfg.grpo.steps == gpu_check.TINY_GRPO_STEPS
    if backend == "collective":  # every member of the NCCL group on a device of its own
        assert cfg.learner.num_gpus_per_worker == 1 and cfg.rollout.num_gpus_per_worker == 1


def test_the_tiny_flagship_passes_only_when_every_grpo_step_ran():
    overrides = gpu_check.tiny_flagship_overrides(2)
    ok = gpu_check.tiny_flagship_result("t", {"grpo_steps": 3, "sync_seconds": 0.5, "completions_per_s": 40.0},
                                        overrides, 95.0)
    assert ok["status"] == "ok" and ok["detail"] == ("3 of 3 GRPO steps with 1 learner rank(s), collective sync "
                                                     "(0.50 s per sync), 40 completions/s; 95 s in all")
    short = gpu_check.tiny_flagship_result("t", {"grpo_steps": 1}, overrides, 95.0)
    assert short["status"] == "failed"
