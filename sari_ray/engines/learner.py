"""DeepSpeed learner: one data-parallel rank of SFT warm-up and GRPO updates, usable without Ray.

The Ray learner actor is a thin shell around `DeepSpeedLearner`; a single process with world_size 1 runs it
too (benchmarks, debugging). Each step receives this rank's shard of the batch; every rank runs the same
number of micro-batches (the driver pads with zero-weight records) so ZeRO's gradient reductions line up.
Gradient accumulation is managed here (variable batch sizes): each micro-batch loss is normalised by the whole
step's counts (all micro-batches of all ranks, `grpo.StepNormalizer`), DeepSpeed's own 1/gas scaling is switched
off, and the boundary is set by hand. Methods that touch the weights (export, checksum, save, reference reset)
are collectives under ZeRO-3: call them on every rank.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from sari_ray import grpo
from sari_ray.data.audio import file_identity, load_audio
from sari_ray.data.schema import AudioMCQ
from sari_ray.engines.weight_buckets import (bucket_layout, frozen_audio_prefixes, group_by_layer,
                                             hf_to_checkpoint_names, iter_tensor_buckets, iter_weight_buckets,
                                             tensors_checksum)
from sari_ray.engines.weight_sync_group import backend_for, join_group, open_store, release_group, send_buckets
from sari_ray.metrics import mean_over
from sari_ray.models import policy as policy_lib
from sari_ray.prompts import PromptStyle, build_messages, render_prompt, sft_target

_T = TypeVar("_T")


class Rank0Failed(RuntimeError):
    """Raised on learner ranks 1..N when rank 0 failed in a method they took part in (a weight export, broadcast or
    save): rank 0 raises its own error at the same point, and every rank is ready for the next call."""


@dataclass
class _StepInputs:
    """A step's rows with their processor outputs and clips, built once and read by every pass."""

    rows: list[dict]
    encoded: list[dict]  # per row: `policy.encode_prompt_audio` output
    clip_keys: list[tuple]  # per row: its clip (file identity, max seconds)
    clips: list[tuple]  # distinct clips, in first-row order
    clip_number: dict[tuple, int]
    features: torch.Tensor  # (clips, mels, frames)
    feature_mask: torch.Tensor  # (clips, frames)


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
        reference_path: str | None = None,
        feature_cache_bytes: int = 512 * 2**20,
    ):
        self.device = resolve_device(device)
        if self.device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            prebuilt = Path(sys.prefix) / "torch_extensions"  # docker/install.sh builds DeepSpeed's CPU op there
            if prebuilt.is_dir():
                os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(prebuilt))
        if torch_threads:
            torch.set_num_threads(torch_threads)
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        import deepspeed  # after DS_ACCELERATOR is set

        backend = "nccl" if self.device == "cuda" else "gloo"
        if master_addr in ("127.0.0.1", "localhost") and world_size > 1:
            self._store_socket = _init_loopback_process_group(backend, rank, world_size, master_port)
        deepspeed.init_distributed(dist_backend=backend)  # adopts a process group that already exists
        torch.manual_seed(seed)
        self.rank, self.world_size = rank, world_size
        self.grpo = grpo_settings or grpo.GRPOSettings()
        self.temperature = temperature
        self.max_audio_seconds = max_audio_seconds
        self.micro_batch_size = micro_batch_size
        model, self.processor = policy_lib.load_policy(model_path, dtype=dtype, device=self.device)
        self.arch = policy_lib.detect_arch(model_path)
        self.model_path = model_path
        self.train_audio_encoder = train_audio_encoder
        self.features = policy_lib.PromptAudioCache(self.processor, feature_cache_bytes)
        if not train_audio_encoder:
            for name, param in model.named_parameters():
                if "audio_tower" in name:
                    param.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.reference = None
        if self.grpo.beta > 0:  # beta 0 loads no reference model
            # The policy GRPO starts from: the base model, or after SFT the SFT checkpoint (`reset_reference`
            # copies it in; a resumed run passes that checkpoint's model here, never the base).
            self.reference, _ = policy_lib.load_policy(reference_path or model_path, dtype=dtype, device=self.device)
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
        if zero_stage == 3:
            _register_direct_weight_reads(self.engine.module)
        self.tower_clips = 0  # clips encoded by the policy's and the reference's audio towers (forward hooks)
        for m in (self.engine.module, self.reference):
            if m is not None:
                policy_lib.audio_tower(m).register_forward_hook(self._count_tower_call, with_kwargs=True)

    def _count_tower_call(self, _module, args, kwargs, _output) -> None:
        self.tower_clips += policy_lib.clips_in_tower_call(args, kwargs)

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
        local_tokens = sum(len(r["completion_ids"]) for r in rows if r["weight"] > 0)
        total_tokens, _ = self._all_reduce_sum(local_tokens, 0)

        def micro_loss(batch_rows, batch, _index):
            logprobs, _ = policy_lib.completion_logprobs(self.engine.module, batch)
            weights = torch.tensor([r["weight"] for r in batch_rows], device=logprobs.device)[:, None]
            mask = batch["completion_mask"] * weights
            # token mean over the whole step (all ranks); x world_size undoes DeepSpeed's gradient averaging
            return -(logprobs * mask).sum() / max(total_tokens, 1.0) * self.world_size, {}

        metrics = self._accumulate(rows, micro_loss, learning_rate)
        return {"sft/loss": metrics["loss"], "sft/grad_norm": metrics["grad_norm"], "sft/lr": learning_rate,
                "time/sft_step": time.perf_counter() - t0}

    def grpo_step(self, records: list[dict], learning_rate: float) -> dict[str, float]:
        """`num_iterations` clipped policy-gradient updates on this rank's shard of rollouts.

        records: prompt (rendered text), audio (path), completion_ids, sampling_logprobs, advantage,
        truncated, weight (0 for padding).

        Returns this rank's metrics. Each `policy/*` metric that every iteration measures (loss, grad_norm,
        clip fractions, ratio and importance-weight means, kl, entropy, logprob_gap_vllm) is its mean over the
        step's `num_iterations` updates, and `policy/*_max` metrics their max over them (within an update:
        token-weighted means over this rank's micro-batches, see `_accumulate`); the driver then combines ranks
        the same way (`metrics.mean_over`).
        """
        t0 = time.perf_counter()
        settings = self.grpo
        inputs = self._inputs(records)  # decoded and feature-extracted once for every pass
        self.tower_clips = 0
        # A frozen tower gives the same outputs all step: computed once, read by every pass of the policy.
        frozen = None if self.train_audio_encoder else self._tower_states(self.engine.module, inputs)
        old_logprobs = None
        if settings.num_iterations > 1:  # ratio against the policy that generated, recomputed once
            old_logprobs = self._logprobs_no_grad(self.engine.module, inputs, frozen)
        ref_logprobs = self._logprobs_no_grad(self.reference, inputs) if self.reference is not None else None
        passes = settings.num_iterations + (old_logprobs is not None) + (ref_logprobs is not None)
        # Every loss_type is defined over the whole optimizer step (all micro-batches of all ranks): the step's
        # active tokens and sequences are counted once and all-reduced (padding rows and masked truncated
        # completions count nowhere), and each micro-batch loss is scaled by world_size because DeepSpeed
        # averages gradients over ranks. Then splitting a batch never changes the gradient.
        active = [r for r in records if r["weight"] > 0
                  and not (settings.mask_truncated_completions and r["truncated"])]
        local_tokens = float(sum(len(r["completion_ids"]) for r in active))
        tokens, seqs = self._all_reduce_sum(local_tokens, sum(1 for r in active if r["completion_ids"]))
        normalizer = grpo.StepNormalizer(num_tokens=tokens, num_sequences=seqs)
        per_iteration: list[dict[str, float]] = []
        for _ in range(settings.num_iterations):
            def micro_loss(batch_rows, batch, index):
                logprobs, entropy = policy_lib.completion_logprobs(self.engine.module, batch, temperature=self.temperature,
                                                                   with_entropy=True)
                mask = batch["completion_mask"].float()
                if settings.mask_truncated_completions:
                    mask = grpo.mask_truncated(mask, torch.tensor([r["truncated"] for r in batch_rows]))
                w = torch.tensor([r["weight"] for r in batch_rows], device=mask.device)
                mask = mask * w[:, None]
                width = logprobs.shape[1]
                old = old_logprobs[index].to(logprobs.device)[:, :width] if old_logprobs is not None else None
                ref = ref_logprobs[index].to(logprobs.device)[:, :width] if ref_logprobs is not None else None
                adv = torch.tensor([r["advantage"] for r in batch_rows], device=mask.device, dtype=torch.float32)
                sampling = _pad([r["sampling_logprobs"] for r in batch_rows], width).to(logprobs.device)
                loss, stats = grpo.policy_loss(
                    logprobs, old, adv, mask, epsilon=settings.epsilon, epsilon_high=settings.epsilon_high,
                    beta=settings.beta, ref_logprobs=ref, kl_estimator=settings.kl_estimator,
                    loss_type=settings.loss_type, max_completion_length=settings.max_completion_length,
                    normalizer=normalizer,
                    sampling_logprobs=sampling if settings.vllm_importance_sampling_correction else None,
                    importance_sampling_cap=settings.vllm_importance_sampling_cap)
                share = float(mask.sum()) / (local_tokens or 1.0)  # metrics: token-weighted means over this rank
                gap = ((logprobs.detach() - sampling).abs() * mask).sum() / mask.sum().clamp(min=1)
                ent = (entropy.detach() * mask).sum() / mask.sum().clamp(min=1) if entropy is not None else torch.tensor(0.0)
                extra = {k.split("/", 1)[-1]: float(v) if k.endswith("_max") else float(v) * share
                         for k, v in stats.items() if k != "grpo/loss"}
                extra.update({"logprob_gap_vllm": float(gap) * share, "entropy": float(ent) * share})
                return loss * self.world_size, extra

            per_iteration.append(self._accumulate(records, micro_loss, learning_rate, inputs, frozen))
        accum = mean_over(per_iteration)
        out = {f"policy/{k}": v for k, v in accum.items() if k not in ("loss", "grad_norm")}
        out.update({"policy/loss": accum["loss"], "policy/grad_norm": accum["grad_norm"],
                    "policy/lr": learning_rate, "time/learn_rank": time.perf_counter() - t0,
                    # audio tower forwards (policy and reference, counted in clips) per distinct clip per pass
                    "learn/encoder_forwards_per_clip_per_pass": self.tower_clips / (len(inputs.clips) * passes)})
        return out

    def _all_reduce_sum(self, *values: float) -> tuple[float, ...]:
        """Sum of each value over all ranks (one collective)."""
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        if self.world_size > 1:
            t = t.to(self.device)
            dist.all_reduce(t)
        return tuple(float(v) for v in t.cpu())

    def _micro_batches(self, n: int) -> list[list[int]]:
        return [list(range(i, min(i + self.micro_batch_size, n))) for i in range(0, n, self.micro_batch_size)]

    def _accumulate(self, rows, micro_loss, learning_rate, inputs: _StepInputs | None = None,
                    tower_states: list[torch.Tensor] | None = None) -> dict[str, float]:
        """Micro-batches of `rows` -> one optimizer step; returns summed metrics and the grad norm.
        micro_loss(batch_rows, batch, row_indices) -> (loss already weighted by its share, metrics).
        The pass's clips are encoded once and shared by its micro-batches (`policy.SharedAudio`: the encoder's
        backward rides on the last micro-batch's, on every rank)."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = learning_rate
        inputs = inputs or self._inputs(rows)
        chunks = self._micro_batches(len(rows))
        self.engine.set_train_batch_size(self.micro_batch_size * len(chunks) * self.world_size)
        self.engine.train()
        self._zero_stale_zero3_grads()
        audio = self._shared_audio(self.engine.module, inputs, tower_states)
        totals: dict[str, float] = {"loss": 0.0}
        for i, index in enumerate(chunks):
            last = i == len(chunks) - 1
            batch_rows = [rows[j] for j in index]
            batch = self._batch(inputs, index, audio, last)
            self.engine.set_gradient_accumulation_boundary(last)
            self._start_micro_step()
            loss, extra = micro_loss(batch_rows, batch, index)
            self.engine.backward(loss + audio.backward_term() if last else loss, scale_wrt_gas=False)
            totals["loss"] += float(loss.detach())
            for k, v in extra.items():  # `*_max` metrics combine by max, the others are pre-weighted shares
                totals[k] = max(totals.get(k, v), v) if k.endswith("_max") else totals.get(k, 0.0) + v
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        totals["grad_norm"] = float(norm) if norm is not None else 0.0
        return totals

    def _zero_stale_zero3_grads(self) -> None:
        """ZeRO-3 copies a parameter's reduced gradient into its partition at micro-step 0 and adds at later ones,
        without zeroing in between steps: a parameter first used after micro-step 0 (the audio encoder, whose
        backward runs with the last micro-batch, `policy.SharedAudio`) would add onto the last step's gradient."""
        buffer = getattr(self.engine.optimizer, "grad_partitions_flat_buffer", None)
        if self.zero_stage == 3 and isinstance(buffer, torch.Tensor):
            buffer.zero_()

    def _start_micro_step(self) -> None:
        """What `engine.forward` does first; the model is called directly here (sliced LM head, shared audio), and
        ZeRO optimizers count micro-steps there: without it ZeRO-3 overwrote each micro-batch's reduced gradient
        with the next one's, so only the last micro-batch's gradient reached the step."""
        from deepspeed.runtime.base_optimizer import ZeROOptimizer

        if isinstance(self.engine.optimizer, ZeROOptimizer):
            self.engine.optimizer.clear_backward_seen_flag()

    @torch.no_grad()
    def _logprobs_no_grad(self, model, inputs: _StepInputs, tower_states: list[torch.Tensor] | None = None
                          ) -> torch.Tensor:
        """(len(rows), max_len) log-probs of each completion under `model`, zero-padded."""
        records = inputs.rows
        width = max(len(r["completion_ids"]) for r in records)
        out = torch.zeros(len(records), width)
        audio = self._shared_audio(model, inputs, tower_states)
        for index in self._micro_batches(len(records)):
            batch = self._batch(inputs, index, audio, last=True)
            logprobs, _ = policy_lib.completion_logprobs(model, batch, temperature=self.temperature)
            out[index, : logprobs.shape[1]] = logprobs.float().cpu()
        return out

    @torch.no_grad()
    def _tower_states(self, model, inputs: _StepInputs) -> list[torch.Tensor]:
        return policy_lib.tower_states_in_chunks(model, inputs.features, inputs.feature_mask, self.micro_batch_size)

    def _shared_audio(self, model, inputs: _StepInputs, tower_states) -> policy_lib.SharedAudio:
        return policy_lib.SharedAudio(model, inputs.features, inputs.feature_mask, chunk=self.micro_batch_size,
                                      tower_states=tower_states)

    def _inputs(self, rows: list[dict]) -> _StepInputs:
        """The rows' processor outputs (through the cache, keyed by prompt and the file's path, size, mtime)
        and their clips, for every pass of a step."""
        keys = [file_identity(r["audio"]) + (self.max_audio_seconds,) for r in rows]
        encoded = [self.features.get(r["prompt"], key, lambda path=r["audio"]: load_audio(
                       path, max_seconds=self.max_audio_seconds).samples) for r, key in zip(rows, keys)]
        first = {key: i for i, key in reversed(list(enumerate(keys)))}  # each clip's first row
        clips = sorted(first, key=first.get)
        return _StepInputs(
            rows=rows, encoded=encoded, clip_keys=keys, clips=clips, clip_number={c: j for j, c in enumerate(clips)},
            features=torch.stack([encoded[first[c]]["input_features"] for c in clips]).to(self.device),
            feature_mask=torch.stack([encoded[first[c]]["feature_attention_mask"] for c in clips]).to(self.device))

    def _batch(self, inputs: _StepInputs, index: list[int], audio: policy_lib.SharedAudio, last: bool) -> dict:
        """Micro-batch `index` of the step's rows, with its clips' shared audio embeddings."""
        batch = policy_lib.assemble_batch([inputs.encoded[j] for j in index], [inputs.clip_keys[j] for j in index],
                                          [inputs.rows[j]["completion_ids"] for j in index],
                                          self.processor.tokenizer.pad_token_id)
        batch["audio_embeds"] = audio.embeds([inputs.clip_number[c] for c in batch["clip_ids"]], last)
        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def render(self, sample: AudioMCQ, style: str) -> str:
        return render_prompt(build_messages(sample, PromptStyle(style)), self.processor)

    # ---------------------------------------------------------------- weights
    # Under ZeRO-3 each parameter lives in shards across ranks, and gathering one is a collective: EVERY rank
    # must run every method below (the driver calls them on the whole group), or rank 0 waits forever.
    # Gathering goes layer group by layer group (the sync's bucket boundaries), so a 7B model is never
    # materialised whole on one rank; rank 0 keeps what it needs, the others only take part.
    def _layer_groups(self, *, engine_only: bool = False, all_ranks: bool = False, skip_frozen: bool = False,
                      to_cpu: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        """{published name: tensor} per layer group, in order; empty dicts on ranks that keep nothing.
        engine_only: what the rollout engines hold (an Omni engine serves audio only: no vision tower).
        skip_frozen: leave out a frozen audio encoder (it never changes). to_cpu=False keeps tensors on the
        learner's device (a copy under ZeRO-3: gathered parameters are released after their group)."""
        keep = all_ranks or self.rank == 0
        state = self.engine.module.state_dict(keep_vars=True)
        for members in group_by_layer(state, self.arch, self._skipped_prefixes(engine_only, skip_frozen)).values():
            with self._gathered(list(members.values())):
                yield ({name: (t.detach().to("cpu", copy=self.zero_stage == 3) if to_cpu
                               else t.detach().clone() if self.zero_stage == 3 else t.detach())
                        for name, t in members.items()} if keep else {})

    def _skipped_prefixes(self, engine_only: bool, skip_frozen: bool) -> tuple[str, ...]:
        skip = ("thinker.visual.",) if engine_only and self.arch == "qwen2.5-omni" else ()
        if skip_frozen and not any(p.requires_grad for n, p in self.engine.module.named_parameters()
                                   if "audio_tower" in n):
            skip += frozen_audio_prefixes(self.arch)
        return skip

    def _on_rank0(self, what: str, groups: Iterator[dict[str, torch.Tensor]],
                  work: Callable[[Iterator[dict[str, torch.Tensor]]], _T]) -> _T | None:
        """Rank 0 runs `work` over the layer groups (it sends or writes them; returns work's result); the other
        ranks only take part in the gathers (return None). After each group, and once more when `work` is done,
        every rank agrees that rank 0 is still fine: one all-reduce of one number over the learners' group.

        Why: under ZeRO-3 each group's gather is a collective. Had rank 0 failed while sending or writing (the
        object store, the engines' broadcast, a full disk), the other ranks would have gone on to the next
        group's gather and waited there forever. Now rank 0 raises its own error and the others `Rank0Failed`,
        all at the same group, with every gather released: the learners stay usable (e.g. for the object-store
        fallback of a failed collective sync). Done at every ZeRO stage, so all ranks always end alike."""
        if self.world_size == 1:
            return work(groups)
        with contextlib.closing(groups):
            if self.rank != 0:
                index = 0
                for index, _ in enumerate(groups, 1):
                    self._raise_if_rank0_failed(what, f"at layer group {index}")
                self._raise_if_rank0_failed(what, f"after the last layer group ({index})")
                return None
            agreeing = False

            def agreed() -> Iterator[dict[str, torch.Tensor]]:
                nonlocal agreeing
                for group in groups:
                    yield group
                    agreeing = True
                    self._all_ok(True)  # cannot fail: only rank 0 says no
                    agreeing = False

            checked = agreed()
            try:
                result = work(checked)
                for _ in checked:  # groups `work` left unread: the others still take part in each
                    pass
            except BaseException:
                if not agreeing:  # else the collective itself broke: nothing more can be said
                    with contextlib.suppress(Exception):  # rank 0's own error is the one to raise
                        self._all_ok(False)
                raise
            finally:
                checked.close()
            self._all_ok(True)
            return result

    def _all_ok(self, ok: bool) -> bool:
        """Whether every learner rank says ok (one all-reduce of one number)."""
        import torch.distributed as dist

        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _raise_if_rank0_failed(self, what: str, where: str) -> None:
        if not self._all_ok(True):
            raise Rank0Failed(f"{what}: learner rank 0 failed {where} and raised the error (see rank 0's result or "
                              f"log); rank {self.rank} stopped there too")

    def _gathered(self, tensors: list[torch.Tensor]):
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters([t for t in tensors if hasattr(t, "ds_id")], modifier_rank=None)

    def export_weight_buckets(self, bucket_bytes: int, include_frozen: bool = True,
                              put: Callable[[bytes], Any] | None = None) -> list:
        """The model as safetensors buckets in the published checkpoint layout (for the engines), each handed to
        `put` as soon as it is full (e.g. `ray.put`; default: kept as bytes). Rank 0 returns what `put` returned,
        bucket by bucket; the other ranks only take part in the gathers and return []. include_frozen=False
        leaves out a frozen audio encoder. If rank 0 fails (in `put` too), every rank raises (`_on_rank0`)."""
        groups = self._layer_groups(engine_only=True, skip_frozen=not include_frozen)
        keep = put or (lambda bucket: bucket)
        result = self._on_rank0("weight export", groups,
                                lambda checked: [keep(bucket) for bucket in iter_weight_buckets(checked, bucket_bytes)])
        return result if self.rank == 0 else []

    # The collective path (`weight_sync_group`): rank 0 broadcasts each bucket as one flat tensor to the engines.
    def weight_sync_plan(self, bucket_bytes: int, include_frozen: bool = True) -> list[list[tuple]]:
        """The bucket layouts (names, dtypes, shapes, offsets) the next `broadcast_weights` sends, from the
        parameters' shapes alone (no gathering, no copy): receivers allocate from it."""
        state = self.engine.module.state_dict(keep_vars=True)
        groups = group_by_layer(state, self.arch, self._skipped_prefixes(True, not include_frozen))
        meta = ({name: torch.empty(tuple(getattr(t, "ds_shape", t.shape)), dtype=t.dtype, device="meta")
                 for name, t in members.items()} for members in groups.values())
        return [bucket_layout(bucket) for bucket in iter_tensor_buckets(meta, bucket_bytes, device=None)]

    def open_weight_sync_store(self, host: str, world_size: int, timeout_s: float) -> int:
        """Rank 0 hosts the sync group's rendezvous store; returns its port. A group formed before (formed again
        after an engine's restart) is aborted and dropped first, with its store."""
        self.leave_weight_sync_group()
        self._sync_store = open_store(host, world_size, timeout_s)
        return self._sync_store[1]

    def join_weight_sync_group(self, host: str, port: int, world_size: int, timeout_s: float,
                               op_timeout_s: float | None = None) -> None:
        """Rank 0 joins the sync group as its rank 0 (blocks until every engine worker has joined, within
        `timeout_s`); each broadcast then times out after `op_timeout_s`."""
        self._drop_sync_group()
        store = self._sync_store[0] if getattr(self, "_sync_store", None) and self._sync_store[1] == port else None
        self._sync_group = join_group(host, port, 0, world_size, backend=backend_for(self.device),
                                      timeout_s=timeout_s, op_timeout_s=op_timeout_s, store=store)

    def leave_weight_sync_group(self) -> None:
        """Abort and drop the sync group, then its store (which closes its port; nothing held: nothing to do)."""
        self._drop_sync_group()
        self._sync_store = None

    def _drop_sync_group(self) -> None:
        group = getattr(self, "_sync_group", None)
        self._sync_group = None
        if group is not None:
            release_group(group)

    def broadcast_weights(self, plan: list[list[tuple]], bucket_bytes: int, include_frozen: bool = True) -> int:
        """Rank 0 broadcasts the buckets `plan` lays out over the sync group (returns bytes sent); the other
        ranks only take part in the gathers (ZeRO-3) and return 0. Call on every rank. If rank 0 fails (the
        broadcast too), every rank raises (`_on_rank0`), and rank 0 drops the broken group (the driver forms a
        new one)."""
        groups = self._layer_groups(engine_only=True, skip_frozen=not include_frozen, to_cpu=self.device == "cpu")

        def send(checked):
            try:
                return send_buckets(self._sync_group, iter_tensor_buckets(checked, bucket_bytes, device=None), plan,
                                    self.device)
            except BaseException:
                self._drop_sync_group()
                raise

        sent = self._on_rank0("weight broadcast", groups, send)
        return sent if self.rank == 0 else 0

    def param_sums(self) -> dict[str, float]:
        """{published name: float64 sum} of what the engines hold, on every rank (ranks must agree), to compare
        tensor by tensor with `VLLMEngine.param_sums` (see `weight_buckets.fuse_param_sums`)."""
        sums: dict[str, float] = {}
        for group in self._layer_groups(engine_only=True, all_ranks=True):
            sums.update({name: tensors_checksum([t]) for name, t in group.items()})
        return sums

    def reset_reference(self) -> None:
        """The KL reference becomes the current policy (end of SFT: GRPO is pulled toward the policy it starts
        from, as in TRL and verl, not toward the base model)."""
        if self.reference is None:
            return
        target = {hf_to_checkpoint_names(k, self.arch): v for k, v in self.reference.state_dict().items()}
        for group in self._layer_groups(all_ranks=True):
            for name, tensor in group.items():
                target[name].copy_(tensor)

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, directory: str, client_state: dict[str, Any] | None = None) -> None:
        """DeepSpeed state (optimizer partitions, all ranks) and an HF model in safetensors (written by rank 0;
        every rank takes part in gathering it)."""
        self.engine.save_checkpoint(str(Path(directory) / "learner"), tag="state", client_state=client_state or {})
        self.save_model(str(Path(directory) / "model"))

    def load_checkpoint(self, directory: str) -> dict[str, Any]:
        _, client_state = self.engine.load_checkpoint(str(Path(directory) / "learner"), tag="state")
        return client_state or {}

    def save_model(self, directory: str, shard_bytes: int = 4 * 2**30) -> None:
        """A checkpoint that vLLM and `sari-ray eval` load: published layout, safetensors (sharded with an
        index above `shard_bytes`, as published checkpoints are), processor. Call on every rank; rank 0 writes.
        If rank 0 fails, every rank raises (`_on_rank0`).

        Qwen2.5-Omni: the learner holds the thinker only, so only the thinker's weights are written, and the
        Omni config.json is written with `enable_audio_output: false` (`_omni_config_for_thinker`): transformers
        then builds exactly the thinker those weights fill, and vLLM still loads it as the Omni model."""
        from safetensors.torch import save_file

        out = Path(directory)

        def write(groups: Iterator[dict[str, torch.Tensor]]) -> None:
            shards: list[dict[str, torch.Tensor]] = [{}]
            files: list[str] = []
            out.mkdir(parents=True, exist_ok=True)

            def flush() -> None:
                files.append(f"model-{len(files) + 1:05d}.safetensors")
                save_file(shards[0], str(out / files[-1]), metadata={"format": "pt"})
                shards[0] = {}

            for group in groups:
                if shards[0] and _nbytes(shards[0]) + _nbytes(group) > shard_bytes:
                    flush()
                shards[0].update({name: t.contiguous() for name, t in group.items()})
            flush()
            _name_shards(out, files)
            source = Path(self.model_path)
            for item in source.iterdir():  # config, tokenizer, processor, generation config, chat template
                if (item.is_file() and not item.name.endswith((".safetensors", ".bin"))
                        and item.name != "model.safetensors.index.json"):
                    (out / item.name).write_bytes(item.read_bytes())
            if self.arch == "qwen2.5-omni":
                _omni_config_for_thinker(out / "config.json")

        self._on_rank0("model save", self._layer_groups(), write)


def _init_loopback_process_group(backend: str, rank: int, world_size: int, port: int):
    """On a local cluster (rank 0 at 127.0.0.1) the rendezvous store listens on 127.0.0.1 only: torch's TCPStore
    binds all interfaces whatever host it is given, unless it is handed a socket that is already bound.
    Returns rank 0's listening socket (keep it: closing it would close the store's)."""
    import datetime
    import socket

    import torch.distributed as dist

    listener = None
    if rank == 0:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0, timeout=datetime.timedelta(minutes=30),
                          master_listen_fd=listener.fileno() if listener else None)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    return listener


def _register_direct_weight_reads(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters around that module's own forward. The Whisper-style audio encoder
    reads `self.embed_positions.weight` directly instead of calling the embedding, so that shard would stay
    empty ("size of tensor a (128) must match ... b (0)"): register it as an external parameter of the
    encoder, which gathers it for the encoder's forward."""
    import deepspeed

    for module in model.modules():
        positions = getattr(module, "embed_positions", None)
        if isinstance(positions, torch.nn.Embedding):
            deepspeed.zero.register_external_parameter(module, positions.weight)


def _omni_config_for_thinker(path: Path) -> None:
    """An Omni config.json (the base checkpoint's, copied) made to describe the thinker-only weights written
    beside it: `enable_audio_output` false, so `Qwen2_5OmniForConditionalGeneration` builds no talker and no
    token2wav (the published config enables them: loading the export would initialise them at random).

    Why not the thinker's own config (`qwen2_5_omni_thinker`): vLLM loads these checkpoints (`sari-ray eval`,
    the checkpoint sweep) and its Qwen2.5-Omni model needs the Omni config (it reads `thinker_config`; the
    thinker architecture is not in its registry). The talker and token2wav sections stay, as a description of
    the base model's (`enable_talker()` would build them); a thinker-only config is copied unchanged."""
    config = json.loads(path.read_text())
    if config.get("model_type") == "qwen2_5_omni" and config.get("enable_audio_output", True):
        config["enable_audio_output"] = False
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _name_shards(out: Path, files: list[str]) -> None:
    """One shard -> model.safetensors; several -> model-0000i-of-0000n.safetensors + the HF index."""
    from safetensors import safe_open

    if len(files) == 1:
        (out / files[0]).rename(out / "model.safetensors")
        return
    weight_map = {}
    for i, name in enumerate(files, 1):
        final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        (out / name).rename(out / final)
        with safe_open(str(out / final), "pt") as f:
            weight_map.update({key: final for key in f.keys()})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))


def _pad(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        n = min(len(row), width)
        out[i, :n] = torch.tensor(row[:n])
    return out

