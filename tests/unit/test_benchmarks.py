"""The GPU benchmark's code path, on CPU at the tiny shape (the figures themselves are taken on a GPU)."""
import pytest

from sari_ray.benchmarks import learner_step_benchmark, model_flops, build_random_model

pytestmark = pytest.mark.unit


def test_learner_step_benchmark_runs_and_reports_figures():
    result = learner_step_benchmark(shape="tiny", device="cpu", dtype="float32", prompts=2, num_generations=2,
                                    completion_len=8, audio_seconds=2.0, steps=1, warmup=0)
    assert result["rows"] == 4 and result["seconds_per_step"] > 0
    assert result["tokens_per_s"] == pytest.approx(result["rows"] * result["seq_len"] / result["seconds_per_step"])
    assert 0 < result["mfu"] < 1


def test_7b_shape_has_qwen2_audio_7b_parameter_count():
    import torch

    model, config = build_random_model("7b", torch.bfloat16, "meta")
    params = sum(p.numel() for p in model.parameters())
    assert 8.0e9 < params < 8.8e9  # Qwen2-Audio-7B-Instruct: 8.4 B with its audio encoder
    flops = model_flops(config, 6.4e8, params - 6.4e8, {"rows": 1, "seq_len": 1}, prompts=0)
    assert flops == pytest.approx(6 * (params - 6.4e8) + 6 * 32 * 4096, rel=1e-6)
