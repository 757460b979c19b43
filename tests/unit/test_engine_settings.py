"""Rollout engine settings that are pure arithmetic or environment: the KV cache sized from the batch, and the
threads every actor (and any vLLM worker process under it) gets."""
from __future__ import annotations

import json

from omegaconf import OmegaConf

from sari_ray.config import TrainConfig


def write_config(path, text: dict, nest: str) -> str:
    config = {"text_config": text} if nest == "qwen2-audio" else {"thinker_config": {"text_config": text}}
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_kv_cache_holds_the_batch_and_no_more(tmp_path):
    from sari_ray.engines.vllm_engine import kv_cache_bytes_for

    tiny = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}
    path = write_config(tmp_path, tiny, "qwen2-audio")
    per_token = 2 * 2 * 1 * 64 * 4  # K and V x layers x kv heads x head_dim x fp32
    assert kv_cache_bytes_for(path, 64, 1024) == int(per_token * 64 * 1024 * 1.1)
    assert kv_cache_bytes_for(path, 64, 1024, "bfloat16") == int(per_token // 2 * 64 * 1024 * 1.1)
    assert kv_cache_bytes_for(path, 0, 1024) == int(per_token * 1024 * 1.1)  # at least one full sequence
    omni = {**tiny, "head_dim": 32}
    assert kv_cache_bytes_for(write_config(tmp_path, omni, "omni"), 1, 100) == int(2 * 2 * 32 * 4 * 100 * 1.1)


def test_actor_env_gives_every_actor_its_threads_and_leaves_cores_unpinned():
    from sari_ray.actors.wiring import actor_env

    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"cluster": {"torch_threads_per_actor": 2},
                                                              "run": {"device": "cpu"}})
    env = actor_env(cfg)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and env["DS_ACCELERATOR"] == "cpu"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"  # spinning threads stall each other on shared cores
