"""Every shipped configuration trains, with its own algorithm, at tiny scale on CPU: each flagship config plus
configs/overlays/tiny_cpu.yaml, run as a user runs it (`sari-ray train ...`), on the shared tiny models and data.

ZeRO-3 with 2 learner ranks, bf16, beta 0.04 with a reference model, truncated importance sampling, SFT where
the config has it; plus mu = 2 with an ablation overlay stacked, and a one-step resume of the ZeRO-3 run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration

SARI_QWEN2 = "configs/sari_qwen2_audio_7b.yaml"
SARI_OMNI = "configs/sari_qwen2_5_omni_7b.yaml"
R1_AQA = "configs/r1_aqa_qwen2_audio_7b.yaml"
OVERLAY = "configs/overlays/tiny_cpu.yaml"
STEPS = "grpo.steps=3"  # the command the issue names: sari-ray train <config> <overlay> grpo.steps=3


def train(out: Path, files: list[str], model: Path, data: Path, *extra: str) -> dict:
    """`sari-ray train` in a subprocess; returns what the run left behind."""
    cmd = [str(Path(sys.executable).parent / "sari-ray"), "train", *(str(REPO / f) for f in files), str(REPO / OVERLAY),
           STEPS, f"model.path={model}", f"data.train={data}", f"run.output_dir={out}", *extra]
    proc = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, timeout=1200)
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return read_run(out)


def read_run(out: Path) -> dict:
    from mlflow.tracking import MlflowClient

    summary = json.loads((out / "summary.json").read_text())
    client = MlflowClient(summary["tracking_uri"])
    run_id = summary["mlflow_run_id"]

    def history(name):
        return {m.step: m.value for m in client.get_metric_history(run_id, name)}

    return {"out": out, "summary": summary, "config": OmegaConf.load(out / "config.yaml"), "history": history,
            "metrics": client.get_run(run_id).data.metrics}


def assert_complete(run: dict, steps: int = 3) -> None:
    out = run["out"]
    final = out / "checkpoints" / f"step_{steps:06d}"
    assert (final / "trainer_state.json").exists() and (final / "learner").is_dir()
    assert (final / "model" / "model.safetensors").exists() and (final / "model" / "config.json").exists()
    assert sorted(run["history"]("reward/mean")) == list(range(1, steps + 1))


def assert_algorithm_kept(run: dict, base: str) -> None:
    """The overlay changed sizes, not the algorithm."""
    shipped, ran = OmegaConf.load(REPO / base), run["config"]
    assert ran.learner.zero_stage == shipped.learner.zero_stage == 3 and ran.learner.num_workers == 2
    assert ran.model.dtype == "bfloat16" and ran.run.device == "cpu"
    for key in ("beta", "kl_estimator", "num_generations", "vllm_importance_sampling_correction"):
        assert ran.grpo[key] == shipped.grpo[key], key
    assert ran.prompt.style == shipped.prompt.style and ran.curriculum.mode == shipped.curriculum.mode
    assert (ran.sft.steps > 0) == (shipped.sft.steps > 0)


@pytest.fixture(scope="module")
def sari_qwen2(tmp_path_factory, tiny_qwen2_audio, synth_data):
    return train(tmp_path_factory.mktemp("matrix") / "sari-qwen2", [SARI_QWEN2], tiny_qwen2_audio, synth_data,
                 "checkpoint.every=2")  # step 2's checkpoint: the resume test below starts from it


def test_sari_qwen2_audio_zero3_bf16_sft_then_grpo(sari_qwen2):
    run = sari_qwen2
    assert_complete(run)
    assert_algorithm_kept(run, SARI_QWEN2)
    assert run["summary"]["sft_steps"] == 2 and (run["out"] / "checkpoints" / "step_000000" / "model").is_dir()
    kl = run["history"]("policy/kl")
    # the reference is the SFT policy: at the first GRPO step the KL to it is ~0 (to the base model it is not)
    assert kl[1] < 1e-6, kl
    assert {"policy/is_ratio_mean", "policy/is_ratio_max", "policy/is_capped_fraction"} <= run["metrics"].keys()
    # ZeRO-3, bf16, gradient checkpointing, a trained encoder: each clip's G=8 rows span micro-batches of 4, and
    # the reference and policy towers still run once per clip per pass (counted by forward hooks)
    forwards = run["history"]("learn/encoder_forwards_per_clip_per_pass")
    assert sorted(forwards) == [1, 2, 3] and set(forwards.values()) == {1.0}, forwards
    state = json.loads((run["out"] / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert state["reference_model"].endswith("step_000000/model")
    # asynchronous as shipped (rollout.max_staleness: 1): step 1 samples with the SFT weights, later steps one behind
    assert run["config"].rollout.max_staleness == 1
    assert run["history"]("rollout/staleness_max") == {1: 0, 2: 1, 3: 1}


def test_sari_qwen2_5_omni(tmp_path, tiny_qwen2_5_omni, synth_data):
    run = train(tmp_path / "sari-omni", [SARI_OMNI], tiny_qwen2_5_omni, synth_data)
    assert_complete(run)
    assert_algorithm_kept(run, SARI_OMNI)
    assert run["history"]("policy/kl")[1] < 1e-6


def test_r1_aqa_no_sft_synchronous(tmp_path, tiny_qwen2_audio, synth_data):
    """Also the synchronous loop (rollout.max_staleness=0; the shipped configs run asynchronous)."""
    run = train(tmp_path / "r1-aqa", [R1_AQA], tiny_qwen2_audio, synth_data, "rollout.max_staleness=0")
    assert_complete(run)
    assert_algorithm_kept(run, R1_AQA)
    assert run["summary"]["sft_steps"] == 0 and not (run["out"] / "checkpoints" / "step_000000").exists()
    assert set(run["history"]("rollout/staleness_max").values()) == {0}


def test_ablation_overlay_with_two_updates_per_batch(tmp_path, tiny_qwen2_audio, synth_data):
    run = train(tmp_path / "free-mu2", [SARI_QWEN2, "configs/ablations/free.yaml"], tiny_qwen2_audio, synth_data,
                "grpo.num_iterations=2")
    assert_complete(run)
    assert run["config"].prompt.style == "free" and run["config"].grpo.num_iterations == 2
    # mu = 2: the second update's ratio is against the first's policy, so some ratios move off 1
    assert any(abs(v - 1.0) > 1e-7 for v in run["history"]("policy/ratio_mean").values())


def test_zero3_resume_of_one_step_serves_the_same_batches_and_weights(sari_qwen2, tmp_path, tiny_qwen2_audio,
                                                                      synth_data):
    """The uninterrupted run, cut back to its step-2 checkpoint and resumed: step 3 trains on the rollouts that
    checkpoint kept in flight (sampled one version behind, as in the uninterrupted run), so the ZeRO-3 weights
    must come out bit for bit the same."""
    import shutil

    from safetensors.torch import load_file

    out = tmp_path / "resumed"
    shutil.copytree(sari_qwen2["out"], out)
    shutil.rmtree(out / "checkpoints" / "step_000003")
    in_flight = json.loads((out / "checkpoints" / "step_000002" / "rollouts_in_flight.json").read_text())
    assert [f["step"] for f in in_flight] == [3]
    resumed = train(out, [SARI_QWEN2], tiny_qwen2_audio, synth_data, "run.resume=true")
    assert_complete(resumed)
    assert resumed["summary"]["mlflow_run_id"] == sari_qwen2["summary"]["mlflow_run_id"]

    def batches(run):
        return {row["step"]: row["ids"] for row in map(json.loads, (run["out"] / "batches.jsonl").open())}

    assert batches(resumed) == batches(sari_qwen2)
    model = "checkpoints/step_000003/model/model.safetensors"
    a, b = load_file(sari_qwen2["out"] / model), load_file(out / model)
    assert a.keys() == b.keys()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert diff == 0.0, f"resumed ZeRO-3 weights differ from the uninterrupted run's by up to {diff}"
