"""Rollout worker: a vLLM engine plus the processor that renders prompts; audio is decoded here, next to the
engine, so clips never pass through the driver."""
from __future__ import annotations

import time
from dataclasses import asdict

from sari_ray.data.audio import load_audio
from sari_ray.data.schema import AudioMCQ
from sari_ray.prompts import PromptStyle, build_messages, render_prompt


class RolloutWorker:
    def __init__(self, model_path: str, engine_kwargs: dict, max_audio_seconds: float = 30.0):
        from transformers import AutoProcessor

        from sari_ray.engines.vllm_engine import VLLMEngine

        t0 = time.perf_counter()
        self.engine = VLLMEngine(model_path, **engine_kwargs)
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.max_audio_seconds = max_audio_seconds
        self.start_seconds = time.perf_counter() - t0

    def ready(self) -> float:
        return self.start_seconds

    def pid(self) -> int:
        """Tells a restarted worker (a new process) from one that merely failed a call."""
        import os

        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this worker runs on: the pool drops a worker whose node has left the cluster."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def generate(self, samples: list[dict], style: str, *, n: int, temperature: float, top_p: float,
                 max_tokens: int, seed: int | None = None) -> list[dict]:
        """G completions per sample: ids, sampling log-probs, finish reasons, the weight version used.
        Rows may carry their own `_seed` (the driver's), which wins over `seed`."""
        t0 = time.perf_counter()
        seeds = [row.pop("_seed") for row in samples] if samples and "_seed" in samples[0] else seed
        parsed = [AudioMCQ.from_dict(row) for row in samples]
        prompts = [render_prompt(build_messages(s, PromptStyle(style)), self.processor) for s in parsed]
        audios = [load_audio(s.audio, max_seconds=self.max_audio_seconds).samples for s in parsed]
        outputs = self.engine.generate(prompts, audios, n=n, temperature=temperature, top_p=top_p,
                                       max_tokens=max_tokens, seed=seeds)
        seconds = time.perf_counter() - t0  # the worker's own time: the driver may wait less (async) or more
        return [{"sample_id": s.id, "prompt": p, "completions": [asdict(c) for c in comps], "generate_s": seconds}
                for s, p, comps in zip(parsed, prompts, outputs)]

    def evaluate(self, samples: list[dict], style: str, *, max_tokens: int, audio_mode: str = "real") -> list[dict]:
        """Greedy held-out predictions (id, extracted, correct), the same path as `sari-ray eval`."""
        from sari_ray.evaluate import generate_predictions

        records = generate_predictions(self.engine, self.processor, [AudioMCQ.from_dict(r) for r in samples],
                                       style=style, max_tokens=max_tokens, audio_mode=audio_mode, progress=False)
        return [{**r, "weight_version": self.engine.weight_version} for r in records]

    def load_weights(self, bucket_refs: list, version: int) -> dict:
        """Reload in place from object-store buckets, fetching each as the engine asks for it and applying it
        before fetching the next (about one bucket in memory here and in the engine's worker)."""
        import ray

        t0 = time.perf_counter()
        fetch_s = 0.0

        def fetched():
            nonlocal fetch_s
            for ref in bucket_refs:
                t = time.perf_counter()
                bucket = ray.get(ref)
                fetch_s += time.perf_counter() - t
                yield bucket

        loaded_bytes, load_s = self.engine.load_weights(fetched(), version)
        return {"bytes": loaded_bytes, "fetch_s": fetch_s, "load_s": load_s - fetch_s,
                "total_s": time.perf_counter() - t0, "version": version}

    def join_weight_sync_group(self, host: str, port: int, world_size: int, rank_offset: int,
                               timeout_s: float, op_timeout_s: float | None = None) -> list[int]:
        """The engine's workers join the collective sync group (blocks until every member has)."""
        return self.engine.join_weight_sync_group(host, port, world_size, rank_offset, timeout_s, op_timeout_s)

    def receive_weights(self, plan: list, version: int) -> dict:
        """One collective sync: buckets broadcast by learner rank 0, laid out as `plan`, applied as they arrive."""
        loaded_bytes, seconds = self.engine.receive_weights(plan, version)
        return {"bytes": loaded_bytes, "load_s": seconds, "total_s": seconds, "version": version}

    def engine_ranks(self) -> int:
        """Processes this worker's engine puts in the sync group (one per tensor-parallel rank)."""
        return self.engine.tensor_parallel_size

    def param_sums(self) -> list[dict[str, float]]:
        """Per engine rank {vLLM parameter name: float64 sum} (compare with `weight_buckets.compare_param_sums`)."""
        return self.engine.param_sums()

    def weight_version(self) -> int:
        return self.engine.weight_version

    def shutdown(self) -> None:
        self.engine.shutdown()
