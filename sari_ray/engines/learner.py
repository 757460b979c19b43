"""DeepSpeed learner: one data-parallel rank of SFT warm-up and GRPO updates, usable without Ray.

The Ray learner actor is a thin shell around `DeepSpeedLearner`; a single process with world_size 1 runs it
too (benchmarks, debugging). Each step receives this rank's shard of the batch; every rank runs the same
number of micro-batches (the driver pads with zero-weight records) so ZeRO's gradient reductions line up.
Gradient accumulation is managed here (variable batch sizes): each micro-batch loss is pre-weighted by its
share of the rank's batch, DeepSpeed's own 1/gas scaling is switched off, and the boundary is set by hand.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from sari_ray import grpo
from sari_ray.data.audio import load_audio
from sari_ray.data.schema import AudioMCQ
from sari_ray.engines.weight_buckets import export_weight_buckets, hf_to_checkpoint_names, tensors_checksum
from sari_ray.models import policy as policy_lib
from sari_ray.prompts import PromptStyle, build_messages, render_prompt, sft_target


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class DeepSpeedLearner:
    def __init__(
        self,
        model_path: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int = 29500,
        zero_stage: int = 2,
        dtype: str = "float32",
        micro_batch_size: int = 8,
        gradient_clipping: float = 1.0,
        weight_decay: float = 0.0,
        grpo_settings: grpo.GRPOSettings | None = None,
        temperature: float = 1.0,
        seed: int = 0,
        device: str = "auto",
        torch_threads: int | None = None,
        train_audio_encoder: bool = True,
        gradient_checkpointing: bool = False,
        max_audio_seconds: float = 30.0,
    ):
        self.device = resolve_device(device)
        if self.device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if torch_threads:
            torch.set_num_threads(torch_threads)
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        import deepspeed  # after DS_ACCELERATOR is set

        deepspeed.init_distributed(dist_backend="nccl" if self.device == "cuda" else "gloo")
        torch.manual_seed(seed)
        self.rank, self.world_size = rank, world_size
        self.grpo = grpo_settings or grpo.GRPOSettings()
        self.temperature = temperature
        self.max_audio_seconds = max_audio_seconds
        self.micro_batch_size = micro_batch_size
        model, self.processor = policy_lib.load_policy(model_path, dtype=dtype, device=self.device)
        self.arch = policy_lib.detect_arch(model_path)
        self.model_path = model_path
        if not train_audio_encoder:
            for name, param in model.named_parameters():
                if "audio_tower" in name:
                    param.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.reference = None
        if self.grpo.beta > 0:  # beta 0 loads no reference model
            self.reference, _ = policy_lib.load_policy(model_path, dtype=dtype, device=self.device)
            self.reference.eval().requires_grad_(False)
        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": 1,
            "train_batch_size": micro_batch_size * world_size,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-6, "weight_decay": weight_decay, "torch_adam": True}},
            "zero_optimization": {"stage": zero_stage},
            "gradient_clipping": gradient_clipping,
            "bf16": {"enabled": dtype == "bfloat16"},
            "steps_per_print": 10**9,
        }
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config)
        self.zero_stage = zero_stage

    # ---------------------------------------------------------------- steps
    def sft_step(self, samples: list[dict], style: str, learning_rate: float) -> dict[str, float]:
        """One optimizer step of cross-entropy on the style's reasoning targets (SARI's warm-up)."""
        t0 = time.perf_counter()
        eos = self.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        rows = []
        for row in samples:
            row = dict(row)
            weight = row.pop("_weight", 1.0)  # 0 for the driver's padding rows
            sample = AudioMCQ.from_dict(row)
            target = self.processor.tokenizer(sft_target(sample, PromptStyle(style)), add_special_tokens=False)
            rows.append({"prompt": self.render(sample, style), "audio": sample.audio,
                         "completion_ids": target["input_ids"] + [eos], "weight": weight})
        total_tokens = sum(len(r["completion_ids"]) * r["weight"] for r in rows) or 1.0

        def micro_loss(batch_rows, batch, _index):
            logprobs, _ = policy_lib.completion_logprobs(self.engine.module, batch)
            weights = torch.tensor([r["weight"] for r in batch_rows], device=logprobs.device)[:, None]
            mask = batch["completion_mask"] * weights
            return -(logprobs * mask).sum() / total_tokens, {}

        metrics = self._accumulate(rows, micro_loss, learning_rate)
        return {"sft/loss": metrics["loss"], "sft/grad_norm": metrics["grad_norm"], "sft/lr": learning_rate,
                "time/sft_step": time.perf_counter() - t0}

    def grpo_step(self, records: list[dict], learning_rate: float) -> dict[str, float]:
        """`num_iterations` clipped policy-gradient updates on this rank's shard of rollouts.

        records: prompt (rendered text), audio (path), completion_ids, sampling_logprobs, advantage,
        truncated, weight (0 for padding).
        """
        t0 = time.perf_counter()
        settings = self.grpo
        old_logprobs = None
        if settings.num_iterations > 1:  # ratio against the policy that generated, recomputed once
            old_logprobs = self._logprobs_no_grad(self.engine.module, records)
        ref_logprobs = self._logprobs_no_grad(self.reference, records) if self.reference is not None else None
        weights = torch.tensor([r["weight"] for r in records])
        lengths = torch.tensor([len(r["completion_ids"]) for r in records], dtype=torch.float32)
        total_seqs = float(weights.sum()) or 1.0
        total_tokens = float((weights * lengths).sum()) or 1.0
        accum: dict[str, float] = {}
        for _ in range(settings.num_iterations):
            def micro_loss(batch_rows, batch, index):
                logprobs, entropy = policy_lib.completion_logprobs(self.engine.module, batch, temperature=self.temperature,
                                                                   with_entropy=True)
                mask = batch["completion_mask"].float()
                if settings.mask_truncated_completions:
                    mask = grpo.mask_truncated(mask, torch.tensor([r["truncated"] for r in batch_rows]))
                w = torch.tensor([r["weight"] for r in batch_rows], device=mask.device)
                mask = mask * w[:, None]
                old = (old_logprobs[index].to(logprobs.device)[:, : logprobs.shape[1]]
                       if old_logprobs is not None else logprobs.detach())
                ref = ref_logprobs[index].to(logprobs.device)[:, : logprobs.shape[1]] if ref_logprobs is not None else None
                adv = torch.tensor([r["advantage"] for r in batch_rows], device=mask.device, dtype=torch.float32)
                loss, stats = grpo.policy_loss(
                    logprobs, old, adv, mask, epsilon=settings.epsilon, epsilon_high=settings.epsilon_high,
                    beta=settings.beta, ref_logprobs=ref, kl_estimator=settings.kl_estimator,
                    loss_type=settings.loss_type, max_completion_length=settings.max_completion_length)
                share = (float(mask.sum()) / total_tokens if settings.loss_type == "bnpo"
                         else float(w.sum()) / total_seqs)
                sampling = _pad([r["sampling_logprobs"] for r in batch_rows], logprobs.shape[1]).to(logprobs.device)
                gap = ((logprobs.detach() - sampling).abs() * mask).sum() / mask.sum().clamp(min=1)
                ent = (entropy.detach() * mask).sum() / mask.sum().clamp(min=1) if entropy is not None else torch.tensor(0.0)
                extra = {k.split("/", 1)[-1]: float(v) * share for k, v in stats.items() if k != "grpo/loss"}
                extra.update({"logprob_gap_vllm": float(gap) * share, "entropy": float(ent) * share})
                return loss * share, extra

            accum = self._accumulate(records, micro_loss, learning_rate)
        out = {f"policy/{k}": v for k, v in accum.items() if k not in ("loss", "grad_norm")}
        out.update({"policy/loss": accum["loss"], "policy/grad_norm": accum["grad_norm"], "policy/lr": learning_rate,
                    "time/learn_rank": time.perf_counter() - t0})
        return out

    def _micro_batches(self, n: int) -> list[list[int]]:
        return [list(range(i, min(i + self.micro_batch_size, n))) for i in range(0, n, self.micro_batch_size)]

    def _accumulate(self, rows, micro_loss, learning_rate) -> dict[str, float]:
        """Micro-batches of `rows` -> one optimizer step; returns summed metrics and the grad norm.
        micro_loss(batch_rows, batch, row_indices) -> (loss already weighted by its share, metrics)."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = learning_rate
        chunks = self._micro_batches(len(rows))
        self.engine.set_train_batch_size(self.micro_batch_size * len(chunks) * self.world_size)
        self.engine.train()
        totals: dict[str, float] = {"loss": 0.0}
        for i, index in enumerate(chunks):
            batch_rows = [rows[j] for j in index]
            batch = self._batch(batch_rows)
            self.engine.set_gradient_accumulation_boundary(i == len(chunks) - 1)
            loss, extra = micro_loss(batch_rows, batch, index)
            self.engine.backward(loss, scale_wrt_gas=False)
            totals["loss"] += float(loss.detach())
            for k, v in extra.items():
                totals[k] = totals.get(k, 0.0) + v
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        totals["grad_norm"] = float(norm) if norm is not None else 0.0
        return totals

    @torch.no_grad()
    def _logprobs_no_grad(self, model, records) -> torch.Tensor:
        """(len(records), max_len) log-probs of each completion under `model`, zero-padded."""
        width = max(len(r["completion_ids"]) for r in records)
        out = torch.zeros(len(records), width)
        for index in self._micro_batches(len(records)):
            rows = [records[j] for j in index]
            logprobs, _ = policy_lib.completion_logprobs(model, self._batch(rows), temperature=self.temperature)
            out[index, : logprobs.shape[1]] = logprobs.float().cpu()
        return out

    def _batch(self, rows: list[dict]) -> dict:
        clips = {path: load_audio(path, max_seconds=self.max_audio_seconds).samples  # G completions share a clip
                 for path in {r["audio"] for r in rows}}
        audios = [clips[r["audio"]] for r in rows]
        batch = policy_lib.build_batch(self.processor, [r["prompt"] for r in rows], audios,
                                       [r["completion_ids"] for r in rows])
        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def render(self, sample: AudioMCQ, style: str) -> str:
        return render_prompt(build_messages(sample, PromptStyle(style)), self.processor)

    # ---------------------------------------------------------------- weights
    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        module = self.engine.module
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters())):
                return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    def _engine_state_dict(self) -> dict[str, torch.Tensor]:
        """What the rollout engines hold: an Omni engine serves audio only and builds no vision tower."""
        state = self._full_state_dict()
        if self.arch == "qwen2.5-omni":
            state = {k: v for k, v in state.items()
                     if not hf_to_checkpoint_names(k, self.arch).startswith("thinker.visual.")}
        return state

    def export_weight_buckets(self, bucket_bytes: int) -> list[bytes]:
        """The model as safetensors buckets in the published checkpoint layout (for the engines)."""
        return export_weight_buckets(self._engine_state_dict(), bucket_bytes, arch=self.arch)

    def weights_checksum(self) -> float:
        """Comparable with `VLLMEngine.weights_checksum` (same tensors, float64 sum)."""
        return tensors_checksum(self._engine_state_dict().values())

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, directory: str, client_state: dict[str, Any] | None = None) -> None:
        """DeepSpeed state (optimizer partitions, all ranks) and, on rank 0, an HF model in safetensors."""
        self.engine.save_checkpoint(str(Path(directory) / "learner"), tag="state", client_state=client_state or {})
        if self.rank == 0:
            self.save_model(str(Path(directory) / "model"))

    def load_checkpoint(self, directory: str) -> dict[str, Any]:
        _, client_state = self.engine.load_checkpoint(str(Path(directory) / "learner"), tag="state")
        return client_state or {}

    def save_model(self, directory: str) -> None:
        """A checkpoint that vLLM and `sari-ray eval` load: published layout, safetensors, processor."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {hf_to_checkpoint_names(k, self.arch): v.contiguous() for k, v in self._full_state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        source = Path(self.model_path)
        for item in source.iterdir():  # config, tokenizer, processor, generation config, chat template
            if item.is_file() and not item.name.endswith((".safetensors", ".bin")) and item.name != "model.safetensors.index.json":
                (out / item.name).write_bytes(item.read_bytes())


def _pad(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        n = min(len(row), width)
        out[i, :n] = torch.tensor(row[:n])
    return out

