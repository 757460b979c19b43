"""Config: every shipped config and overlay loads; bad keys and values fail naming the key."""
from pathlib import Path

import pytest

from sari_ray.config import ConfigError, load_config, to_flat_dict

pytestmark = pytest.mark.unit
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BASES = sorted(p for p in CONFIGS.glob("*.yaml"))
OVERLAYS = sorted((CONFIGS / "ablations").glob("*.yaml"))


@pytest.mark.parametrize("base", BASES, ids=lambda p: p.name)
@pytest.mark.parametrize("overlay", [None, *OVERLAYS], ids=lambda p: p.name if p else "none")
def test_shipped_configs_and_overlays_load(base, overlay):
    cfg = load_config([base] + ([overlay] if overlay else []))
    if overlay is not None:
        raw = overlay.read_text()
        for section in ("prompt", "curriculum", "sft"):
            if f"{section}:" in raw:
                assert to_flat_dict(cfg)  # resolved and frozen
    with pytest.raises(Exception):
        cfg.grpo.steps = 3  # frozen after validation


def test_r1_aqa_config_has_published_settings():
    g = load_config(CONFIGS / "r1_aqa_qwen2_audio_7b.yaml").grpo
    assert (g.num_generations, g.learning_rate, g.beta, g.kl_estimator, g.max_completion_length,
            g.prompts_per_step, g.steps) == (8, 1e-6, 0.04, "k3", 256, 16, 1000)


def test_overlay_changes_only_its_keys():
    base = to_flat_dict(load_config(CONFIGS / "sari_qwen2_audio_7b.yaml"))
    free = to_flat_dict(load_config([CONFIGS / "sari_qwen2_audio_7b.yaml", CONFIGS / "ablations" / "free.yaml"]))
    assert {k for k in base if base[k] != free[k]} == {"prompt.style", "sft.style"}


@pytest.mark.parametrize("override, key", [
    ("grpo.bogus=1", "grpo.bogus"),
    ("grpo.steps=abc", "grpo.steps"),
    ("prompt.style=fancy", "prompt.style"),
    ("rollout.num_workers=0", "rollout.num_workers"),
    ("curriculum.replay_fraction=1.5", "curriculum.replay_fraction"),
    ("grpo.kl_estimator=k9", "kl_estimator"),
    ("learner.resources.learner_slot=0", "learner.resources.learner_slot"),
])
def test_bad_keys_and_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIGS / "demo_cpu.yaml", [override])


def test_missing_required_keys_and_files():
    with pytest.raises(ConfigError, match="model.path"):
        load_config(None, ["data.train=x.jsonl"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no/such.yaml")
