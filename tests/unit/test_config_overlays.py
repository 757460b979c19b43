"""configs/overlays/tiny_cpu.yaml turns each shipped config into a tiny CPU run without changing its algorithm,
and an overlay's `caps:` lowers values without turning on what a config has off."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sari_ray.config import ConfigError, load_config

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
FLAGSHIPS = ["sari_qwen2_audio_7b.yaml", "sari_qwen2_5_omni_7b.yaml", "r1_aqa_qwen2_audio_7b.yaml"]
OVERLAY = REPO / "configs" / "overlays" / "tiny_cpu.yaml"
# What the overlay may change: model, data, device, sizes, step counts (and the lr a tiny model needs).
MAY_CHANGE = {"run.output_dir", "run.device", "cluster.", "model.path", "model.build_tiny_if_missing", "data.",
              "rollout.", "learner.num_workers", "learner.num_cpus_per_worker", "learner.num_gpus_per_worker",
              "sft.steps", "sft.batch_size", "grpo.steps", "grpo.prompts_per_step", "grpo.max_completion_length",
              "grpo.learning_rate", "eval.max_samples"}


def flat(cfg) -> dict:
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


@pytest.mark.parametrize("name", FLAGSHIPS)
def test_tiny_cpu_overlay_keeps_the_algorithm(name):
    shipped = flat(load_config(REPO / "configs" / name))
    tiny = flat(load_config([REPO / "configs" / name, OVERLAY]))
    changed = {k for k in shipped if shipped[k] != tiny[k]}
    assert all(any(k == m or (m.endswith(".") and k.startswith(m)) for m in MAY_CHANGE) for k in changed), \
        sorted(k for k in changed if not any(k == m or (m.endswith(".") and k.startswith(m)) for m in MAY_CHANGE))
    assert tiny["learner.zero_stage"] == shipped["learner.zero_stage"] and tiny["learner.num_workers"] >= 2
    assert tiny["model.arch"] == shipped["model.arch"] and tiny["run.device"] == "cpu"
    assert (tiny["sft.steps"] > 0) == (shipped["sft.steps"] > 0)
    assert tiny["grpo.steps"] == 3 and tiny["model.path"].endswith(shipped["model.arch"])


def test_caps_lower_but_never_raise_and_overrides_still_win(tmp_path):
    overlay = tmp_path / "caps.yaml"
    overlay.write_text("caps:\n  sft.steps: 2\n  grpo.steps: 5\n")
    base = [REPO / "configs" / "sari_qwen2_audio_7b.yaml", overlay]
    cfg = load_config(base)
    assert (cfg.sft.steps, cfg.grpo.steps) == (2, 5)
    assert load_config([REPO / "configs" / "r1_aqa_qwen2_audio_7b.yaml", overlay]).sft.steps == 0
    assert load_config(base, ["grpo.steps=7"]).grpo.steps == 7


def test_caps_must_name_a_numeric_key(tmp_path):
    overlay = tmp_path / "caps.yaml"
    overlay.write_text("caps:\n  prompt.style: 2\n")
    with pytest.raises(ConfigError, match="prompt.style"):
        load_config([REPO / "configs" / "demo_cpu.yaml", overlay])
