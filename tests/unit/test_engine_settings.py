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


def test_threads_follow_the_cpus_each_actor_reserves_unless_set(monkeypatch):
    from sari_ray.actors.wiring import actor_env, threads_per_actor

    def cfg(**cluster):
        return OmegaConf.merge(OmegaConf.structured(TrainConfig), {
            "cluster": cluster, "rollout": {"num_cpus_per_worker": 8, "num_workers": 2},
            "learner": {"num_cpus_per_worker": 2.5, "num_workers": 4}})

    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a cluster: the actors' own CPUs
    assert threads_per_actor(cfg(), "rollout") == 8 and threads_per_actor(cfg(), "learner") == 2
    assert actor_env(cfg(), "rollout")["OMP_NUM_THREADS"] == "8"
    assert threads_per_actor(cfg(torch_threads_per_actor=3), "rollout") == 3  # set: it wins
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr("os.cpu_count", lambda: 2)  # a local cluster on 2 cores, 6 actors: 1 thread each
    assert threads_per_actor(cfg(), "rollout") == threads_per_actor(cfg(), "learner") == 1
    fractional = OmegaConf.merge(cfg(), {"learner": {"num_cpus_per_worker": 0.5}})
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert threads_per_actor(fractional, "learner") == 1  # a fraction of a CPU: still one thread
