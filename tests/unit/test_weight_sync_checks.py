"""The learner-vs-engine weight check compares tensor by tensor, so it fails for the faults a whole-model sum
misses: two tensors swapped, one small tensor left unsynced, a tensor the engine never receives."""
from __future__ import annotations

import pytest

from sari_ray.engines.weight_buckets import compare_param_sums, fuse_param_sums

pytestmark = pytest.mark.unit

LEARNER = {  # published checkpoint names (per-tensor sums)
    "language_model.model.layers.0.self_attn.q_proj.weight": 1.5,
    "language_model.model.layers.0.self_attn.k_proj.weight": -0.25,
    "language_model.model.layers.0.self_attn.v_proj.weight": 0.5,
    "language_model.model.layers.0.mlp.gate_proj.weight": 2.0,
    "language_model.model.layers.0.mlp.up_proj.weight": 3.0,
    "language_model.model.layers.0.input_layernorm.weight": 128.0,
    "audio_tower.layers.0.self_attn.q_proj.weight": 0.75,  # the audio tower keeps q/k/v apart in vLLM
    "audio_tower.layers.0.self_attn.k_proj.weight": -0.5,
    "language_model.lm_head.weight": 4.0,
}
ENGINE = {  # vLLM's names: fused q/k/v and gate/up in the language model
    "language_model.model.layers.0.self_attn.qkv_proj.weight": 1.75,
    "language_model.model.layers.0.mlp.gate_up_proj.weight": 5.0,
    "language_model.model.layers.0.input_layernorm.weight": 128.0,
    "audio_tower.layers.0.self_attn.q_proj.weight": 0.75,
    "audio_tower.layers.0.self_attn.k_proj.weight": -0.5,
    "language_model.lm_head.weight": 4.0,
}


def test_fused_sums_add_up_and_agree():
    assert fuse_param_sums(LEARNER, ENGINE) == ENGINE
    assert compare_param_sums(LEARNER, ENGINE) == []


def test_omni_wrappers_are_matched_by_name():
    learner = {"thinker.model.layers.0.self_attn.q_proj.weight": 1.0, "thinker.lm_head.weight": 2.0}
    engine = {"language_model.model.layers.0.self_attn.qkv_proj.weight": 1.0, "language_model.lm_head.weight": 2.0}
    assert compare_param_sums(learner, engine) == []


def test_swapped_tensors_are_caught_though_the_total_agrees():
    swapped = dict(ENGINE)
    a, b = "audio_tower.layers.0.self_attn.q_proj.weight", "audio_tower.layers.0.self_attn.k_proj.weight"
    swapped[a], swapped[b] = swapped[b], swapped[a]
    assert sum(swapped.values()) == sum(ENGINE.values())
    problems = compare_param_sums(LEARNER, swapped)
    assert len(problems) == 2 and all(("q_proj" in p) or ("k_proj" in p) for p in problems)


def test_one_small_unsynced_tensor_is_caught():
    stale = dict(ENGINE)
    stale["language_model.model.layers.0.input_layernorm.weight"] = 128.01  # one layernorm kept old weights
    assert compare_param_sums(LEARNER, stale) == [
        "language_model.model.layers.0.input_layernorm.weight: learner 128 != engine 128.01"]


def test_a_tensor_the_engine_never_gets_is_an_error():
    with pytest.raises(KeyError, match="audio_tower.layers.0.fc1.weight"):
        fuse_param_sums({**LEARNER, "audio_tower.layers.0.fc1.weight": 1.0}, ENGINE)
    assert compare_param_sums({k: v for k, v in LEARNER.items() if "lm_head" not in k}, ENGINE) == [
        "language_model.lm_head.weight: learner has no value"]
