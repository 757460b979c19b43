"""Train: `python -m sari_ray.train configs/demo_cpu.yaml [key=value ...]` (what `ray job submit` runs),
or `sari-ray train CONFIG [key=value ...]`, or `sari-ray demo`.

SFT warm-up on the prompt style's reasoning targets, then curriculum-guided GRPO. One GRPO step is a row of
named, timed phases: sample batch -> generate -> reward -> curriculum update -> learn -> sync weights -> log.
Data is validated before any actor starts; checkpoints hold learner, curriculum, data cursor, RNG, step, MLflow
run id and weight version, so `run.resume=true` continues the same MLflow run with the same data order.
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from sari_ray import checkpoints
from sari_ray import metrics as metrics_lib
from sari_ray.console import make_console, print_summary, progress_bar, progress_line
from sari_ray.config import (ConfigError, actor_resources, grpo_settings, load_config, step_timeout_s,
                             to_flat_dict)
from sari_ray.data.prepare import prepare_data
from sari_ray.batching import split_evenly
from sari_ray.rollout_pipeline import RolloutPipeline
from sari_ray.actors.errors import ActorDied

CHECKPOINTS = checkpoints.CHECKPOINTS


class Trainer:
    def __init__(self, cfg, stop: "StopOnSignal | None" = None):
        self.cfg = cfg
        self.step_timeout_s = step_timeout_s(cfg)  # every per-step remote call's deadline
        self.stop = stop or StopOnSignal()  # run_training listens for SIGINT / SIGTERM; the loop checks it
        self.out = Path(cfg.run.output_dir).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.console = make_console()
        self.timings: dict[str, float] = {}
        self.train_set, self.eval_set = prepare_data(cfg, self.console)  # fails here, before any actor
        self.by_id = {s.id: s for s in self.train_set}
        self.model_path = prepare_model(cfg)
        self.state = self._initial_state()
        stale = checkpoints.drop_stale_staging(self.out)
        if stale:
            self.console.print(f"[yellow]removed {len(stale)} incomplete checkpoint(s) an earlier run left: "
                               f"{', '.join(p.name for p in stale)}")
        checkpoint = checkpoints.latest_checkpoint(self.out) if cfg.run.resume else None
        if cfg.run.resume and checkpoint is None:
            self.console.print(f"[yellow]run.resume=true but no checkpoint in {self.out / CHECKPOINTS}; starting fresh")
        if checkpoint is not None:
            self.state = self._state_at(checkpoint)
        if not cfg.run.resume and (self.out / CHECKPOINTS).exists() and any((self.out / CHECKPOINTS).iterdir()):
            raise ConfigError(f"{self.out} already holds checkpoints; set run.resume=true to continue it "
                              f"or choose another run.output_dir / run.name")
        OmegaConf.save(cfg, self.out / "config.yaml")
        self._start_tracking()
        self._start_actors(checkpoint)

    # ------------------------------------------------------------------ setup
    def _initial_state(self) -> dict[str, Any]:
        rng = np.random.default_rng(self.cfg.run.seed)
        return {"phase": "sft", "sft_step": 0, "step": 0, "weight_version": 0, "mlflow_run_id": None,
                "curriculum": None, "rng": rng.bit_generator.state, "sft_order": None, "history": [], "curve": []}

    def _start_tracking(self) -> None:
        from sari_ray.engines.tracking import Tracker

        t = self.cfg.tracking
        self.tracker = Tracker(t.tracking_uri, t.experiment, self.out, self.cfg.run.name, self.state["mlflow_run_id"],
                               max_outage_s=t.max_outage_s, request_timeout_s=t.request_timeout_s)
        self.state["mlflow_run_id"], self.state["tracking_uri"] = self.tracker.run_id, self.tracker.tracking_uri
        self.tracker.log_params(to_flat_dict(self.cfg))
        self.tracker.log_text(OmegaConf.to_yaml(self.cfg), "config.yaml")
        self.console.print(f"MLflow run {self.tracker.run_id} at {self.tracker.tracking_uri}")

    def _start_actors(self, checkpoint: Path | None) -> None:
        import ray

        from sari_ray.actors import wiring

        cfg = self.cfg
        if not ray.is_initialized():
            init_kwargs = ray_init_kwargs(cfg)
            if init_kwargs["address"] == "local":  # its processes die with this driver, SIGKILL included
                from sari_ray.deploy.local_ray import start_local_cluster

                self.reaper = start_local_cluster(init_kwargs)
            else:
                ray.init(**init_kwargs)
        wiring.wait_for_resources(cfg)
        with self.phase("startup"):
            self.curriculum = wiring.start_curriculum(cfg, {s.id: s.tier or 0 for s in self.train_set})
            self.reward = wiring.start_reward_scorer(cfg)
            engine_kwargs = dict(seed=cfg.run.seed, max_model_len=cfg.rollout.max_model_len, dtype=cfg.model.dtype,
                                 tensor_parallel_size=cfg.rollout.tensor_parallel_size,
                                 gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                                 kv_cache_memory_bytes=(int(cfg.rollout.kv_cache_memory_gb * 2**30)
                                                        if cfg.rollout.kv_cache_memory_gb else None),
                                 enforce_eager=cfg.rollout.enforce_eager, device=cfg.run.device,
                                 max_num_batched_tokens=cfg.rollout.max_num_batched_tokens,
                                 threads=cfg.cluster.torch_threads_per_actor,
                                 kv_cache_sequences=-(-cfg.grpo.prompts_per_step * cfg.grpo.num_generations
                                                      // cfg.rollout.num_workers))
            self.rollout = wiring.start_rollout_workers(cfg, self.model_path, engine_kwargs, self._rollout_restarted)
            self.pipeline = RolloutPipeline(cfg.rollout.max_staleness, cfg.grpo.steps, self._draw_batch,
                                            self._send_rollouts, self._collect_rollouts)
            self.learners = wiring.start_learners(cfg, self._learner_setup_kwargs())
            start_s = wiring.wait_rollout_ready(cfg, self.rollout)
            self.weight_sync = wiring.start_weight_sync(cfg, self.learners, self.rollout)
            if checkpoint is not None:
                self._restore(checkpoint)
        self.console.print(f"actors up: {len(self.rollout)} rollout, {len(self.learners)} learner "
                           f"(engine start {max(start_s):.0f} s)")

    def _learner_setup_kwargs(self) -> dict[str, Any]:
        cfg = self.cfg
        return dict(model_path=self.model_path, zero_stage=cfg.learner.zero_stage, dtype=cfg.model.dtype,
                    micro_batch_size=cfg.learner.micro_batch_size, gradient_clipping=cfg.learner.gradient_clipping,
                    weight_decay=cfg.learner.weight_decay, grpo_settings=grpo_settings(cfg),
                    temperature=cfg.rollout.temperature, seed=cfg.run.seed, device=cfg.run.device,
                    torch_threads=cfg.cluster.torch_threads_per_actor,
                    train_audio_encoder=cfg.learner.train_audio_encoder,
                    gradient_checkpointing=cfg.learner.gradient_checkpointing,
                    max_audio_seconds=cfg.data.max_audio_seconds, reference_path=self.state.get("reference_model"))

    def _state_at(self, checkpoint: Path | None) -> dict[str, Any]:
        """The trainer state a checkpoint holds (the initial state without one)."""
        if checkpoint is None:
            return self._initial_state()
        return json.loads((checkpoint / checkpoints.STATE_FILE).read_text())

    def _restore(self, checkpoint: Path) -> None:
        """Actors back to `checkpoint` (self.state already holds its state): curriculum and data cursor, learner
        and optimizer (the reference model came with the learners' setup), the engines' weights as the version
        they were, the rollouts it kept in flight. What run.resume=true does at startup and a learner restart
        mid-run."""
        if self.state["curriculum"] is not None:
            self._get(self.curriculum.load_state_dict.remote(self.state["curriculum"]))
        self.learners.call("load_checkpoint", str(checkpoint))
        # engines restart from the base model: give them the checkpoint's weights, as the version they were
        self.sync_weights(new_version=False)
        self.pipeline.restore(checkpoints.read_in_flight(checkpoint))

    def _restart_learners_from_checkpoint(self, err: Exception) -> None:
        """A learner rank died (`ActorDied`, role learner): a DeepSpeed group cannot lose a rank, so every
        rank is killed (those blocked in a collective with it too), a new group starts, and the run goes back to
        the last complete checkpoint exactly as run.resume=true would (`_restore`), at most run.max_restarts
        times. Rollouts in flight are discarded; the steps after the checkpoint are trained and logged again
        (same MLflow run; readers take a step's last value). Other actors' deaths are re-raised."""
        from sari_ray.actors import wiring

        if not (isinstance(err, ActorDied) and err.role == "learner"):
            raise err
        cfg, t0 = self.cfg, time.monotonic()
        faults = {**self.state.get("faults", {})}
        faults["learner_restarts"] = faults.get("learner_restarts", 0) + 1
        if faults["learner_restarts"] > cfg.run.max_restarts:
            raise LearnerGroupLost(f"{err}; the learner group was already restarted {cfg.run.max_restarts} time(s) "
                                   f"(run.max_restarts={cfg.run.max_restarts}): stopping. The last complete checkpoint "
                                   f"stays; resume with run.resume=true") from err
        checkpoint = checkpoints.latest_checkpoint(self.out)
        failed_at = self.state["step"] if self.state["phase"] == "grpo" else self.state["sft_step"]
        self.console.print(f"[yellow]{err}; restarting the learner group from "
                           f"{checkpoint.name if checkpoint else 'the start (no checkpoint yet)'} "
                           f"(restart {faults['learner_restarts']} of at most {cfg.run.max_restarts})", soft_wrap=True)
        self.learners.kill()
        self.pipeline.discard()
        kept = {k: self.state[k] for k in ("mlflow_run_id", "tracking_uri") if k in self.state}
        self.state = {**self._state_at(checkpoint), **kept, "faults": faults}
        self.learners = wiring.start_learners(cfg, self._learner_setup_kwargs())
        self.weight_sync = wiring.start_weight_sync(cfg, self.learners, self.rollout)
        if checkpoint is not None:
            self._restore(checkpoint)
        else:  # nothing saved yet: the base model, a fresh curriculum (GRPO without SFT starts in GRPO)
            import ray

            ray.kill(self.curriculum)
            self.curriculum = wiring.start_curriculum(cfg, {s.id: s.tier or 0 for s in self.train_set})
            self.state["phase"] = "sft" if cfg.sft.steps > 0 else "grpo"
            self.sync_weights(new_version=False)
        self.tracker.log_metrics({"faults/learner_restarts": faults["learner_restarts"]}, failed_at)
        where = f"GRPO step {self.state['step'] + 1}" if self.state["phase"] == "grpo" else \
            f"SFT step {self.state['sft_step'] + 1}"
        self.console.print(f"learner group back after {time.monotonic() - t0:.0f} s; continuing at {where}",
                           soft_wrap=True)

    def _rollout_restarted(self, index: int, cause: str, seconds: float) -> None:
        faults = self.state.setdefault("faults", {})
        faults["rollout_restarts"] = faults.get("rollout_restarts", 0) + 1
        self.console.print(f"[yellow]rollout worker {index} failed ({cause}); restarted by Ray and back with weights "
                           f"v{self.state['weight_version']} after {seconds:.0f} s; its prompts are re-issued", soft_wrap=True)

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        self.current_phase = name  # named by a deadline's error
        yield
        self.timings[f"time/{name}"] = time.perf_counter() - t0

    def _get(self, ref):
        """ray.get of a curriculum scheduler / reward scorer call, within the per-step deadline."""
        import ray

        from sari_ray.actors.errors import StepTimeout

        try:
            return ray.get(ref, timeout=self.step_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise StepTimeout(f"the curriculum scheduler / reward scorer did not answer within "
                              f"{self.step_timeout_s:.0f} s "
                              f"(phase {getattr(self, 'current_phase', '?')} of GRPO step {self.state['step']}; "
                              f"cluster.step_timeout_s). The last complete checkpoint stays; resume with "
                              f"run.resume=true") from None

    # ------------------------------------------------------------------ training
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        t_start = time.perf_counter()
        while self.state["phase"] == "sft":
            try:
                self.sft()
            except ActorDied as err:  # a learner: back to the last checkpoint (others re-raised)
                self._restart_learners_from_checkpoint(err)
        with progress_bar(self.console) as progress:
            task = progress.add_task("grpo", total=cfg.grpo.steps, completed=self.state["step"])
            while self.state["step"] < cfg.grpo.steps:
                self.state["step"] += 1
                try:
                    step_metrics = self.grpo_step(self.state["step"])
                    if self.state["step"] % cfg.checkpoint.every == 0 or self.state["step"] == cfg.grpo.steps:
                        self.save_checkpoint()
                except ActorDied as err:  # a learner: back to the last checkpoint, its steps replayed
                    self._restart_learners_from_checkpoint(err)
                    progress.update(task, completed=self.state["step"])
                    continue
                progress.update(task, advance=1, description=progress_line(self.state["step"], step_metrics))
                self._stop_if_asked()
        summary = self.finish(time.perf_counter() - t_start)
        return summary

    def _stop_if_asked(self) -> None:
        """After a finished step: on SIGINT / SIGTERM, checkpoint it (unless just done) and stop."""
        if not self.stop.requested:
            return
        s = self.state
        where = f"SFT step {s['sft_step']}" if s["phase"] == "sft" else f"GRPO step {s['step']}"
        if checkpoints.latest_checkpoint(self.out) != checkpoints.checkpoint_dir(self.out, s):
            self.save_checkpoint()
        raise Interrupted(f"interrupted ({self.stop.requested}) at {where}; checkpoint written. "
                          f"Resume with run.resume=true")

    def sft(self) -> None:
        """SARI's warm-up: imitate the style's reasoning targets before RL. Checkpoints every
        `sft.checkpoint_every` steps; a resumed run continues where it stopped."""
        cfg, s = self.cfg, self.state
        if cfg.sft.steps > 0:
            if s["sft_order"] is None:  # drawn once, then part of the checkpointed state
                rng = self._rng()
                s["sft_order"] = [self.train_set[i].id for i in rng.permutation(len(self.train_set))]
                s["rng"] = rng.bit_generator.state
            order = s["sft_order"]
            while s["sft_step"] < cfg.sft.steps:
                start = (s["sft_step"] * cfg.sft.batch_size) % len(order)
                ids = [order[(start + i) % len(order)] for i in range(cfg.sft.batch_size)]
                rows = [self.by_id[i].to_dict() for i in ids]
                with self.phase("sft_step"):
                    per_rank = self.learners.call_sharded("sft_step", self._shard_for_learners(rows, "_weight"),
                                                          cfg.sft.style, cfg.sft.learning_rate)
                s["sft_step"] += 1
                m = metrics_lib.mean_over_ranks(per_rank)
                self.tracker.log_metrics({**m, "time/sft_step": self.timings["time/sft_step"]}, s["sft_step"])
                if s["sft_step"] % 10 == 0 or s["sft_step"] == cfg.sft.steps:
                    self.console.print(f"sft {s['sft_step']}/{cfg.sft.steps} loss {m['sft/loss']:.3f}")
                if (cfg.sft.checkpoint_every and s["sft_step"] % cfg.sft.checkpoint_every == 0
                        and s["sft_step"] < cfg.sft.steps):
                    self.save_checkpoint()
                if s["sft_step"] < cfg.sft.steps:
                    self._stop_if_asked()
            self.sync_weights()
            self.learners.call("reset_reference")  # the KL pulls toward the SFT policy, not the base model
            eval_metrics, s["after_sft_items"] = self.evaluate()  # per item: GRPO's gain is paired on them
            self.tracker.log_metrics({f"after_sft/{k}": v for k, v in eval_metrics.items()}, 0)
            s["history"].append({"step": 0, **eval_metrics})
        s["phase"] = "grpo"
        if cfg.sft.steps > 0:
            s["reference_model"] = str(checkpoints.step_dir(self.out, 0) / "model")  # what a resumed run loads
            self.save_checkpoint()
        self._stop_if_asked()

    def grpo_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        self.timings = {}  # this step's phases only
        t_step = time.perf_counter()
        with self.phase("rollout"):  # waiting for them: sent now, or up to rollout.max_staleness steps ago
            batch_ids, rollouts = self.pipeline.take(step)
        samples = [self.by_id[i] for i in batch_ids]
        self.state["grpo_tiers"] = sorted(set(self.state.get("grpo_tiers", [])) | {s.tier or 0 for s in samples})
        completions = [c for r in rollouts for c in r["completions"]]
        staleness = [self.state["weight_version"] - c["weight_version"] for c in completions]
        if max(staleness) > cfg.rollout.max_staleness or min(staleness) < 0:
            raise RuntimeError(f"step {step}: completions generated with weight versions "
                               f"{sorted({c['weight_version'] for c in completions})} at version "
                               f"{self.state['weight_version']}, beyond rollout.max_staleness="
                               f"{cfg.rollout.max_staleness} (a rollout worker missed a weight sync)")
        self.timings["time/rollout_generate"] = max(r["generate_s"] for r in rollouts)  # the workers' own time
        expanded = [s for s in samples for _ in range(cfg.grpo.num_generations)]
        with self.phase("reward"):
            scores = self._get(self.reward.score.remote([c["text"] for c in completions], [s.to_dict() for s in expanded]))
        with self.phase("curriculum"):
            per_sample = metrics_lib.per_sample_accuracy([s.id for s in expanded], scores)
            promotion = self._get(self.curriculum.update.remote(step, per_sample))
        with self.phase("learn"):
            records = self.training_records(rollouts, scores)
            learn = metrics_lib.mean_over_ranks(self.learners.call_sharded(
                "grpo_step", self._shard_for_learners(records, "weight"), cfg.grpo.learning_rate)) if records else {}
        with self.phase("sync"):
            sync = self.sync_weights()
        m = metrics_lib.rollout_metrics(scores, [len(c["token_ids"]) for c in completions],
                                        [c["finish_reason"] == "length" for c in completions],
                                        [s.tier or 0 for s in expanded])
        m.update(metrics_lib.group_signal([sc["reward"] for sc in scores], cfg.grpo.num_generations))
        m.update(learn)
        m.update(self._get(self.curriculum.metrics.remote()))
        m.update(self.timings)
        m.update(metrics_lib.throughput(len(completions), sum(len(c["token_ids"]) for c in completions),
                                        time.perf_counter() - t_step, self.timings))
        m["faults/rollout_restarts"] = self.state.get("faults", {}).get("rollout_restarts", 0)
        m.update({"sync/bytes": sync["bytes"], "sync/seconds": sync["seconds"], "learn/records": len(records),
                  "rollout/weight_version": self.state["weight_version"],
                  "rollout/staleness_mean": sum(staleness) / len(staleness), "rollout/staleness_max": max(staleness)})
        self.state["curve"].append([step, m["reward/mean"], m["throughput/completions_per_s"], sync["seconds"],
                                    int(m.get("curriculum/tier", 0))])
        if promotion is not None:
            event = promotion.to_dict()
            self.state.setdefault("promotions", []).append(event)
            self.console.print(f"[green]step {step}: tier {event['from_tier']} -> {event['to_tier']} "
                               f"(accuracies {event['accuracies']})")
            self.tracker.log_dict(self.state["promotions"], "curriculum_history.json")
        if cfg.eval.every and step % cfg.eval.every == 0:
            m.update(self.evaluate()[0])
        self.tracker.log_metrics(m, step)
        self._log_batch(step, batch_ids)
        if cfg.tracking.completions_table_every and step % cfg.tracking.completions_table_every == 0:
            self.tracker.log_table([{"step": step, "sample_id": s.id, "tier": s.tier, "answer": s.answer,
                                     "completion": c["text"], **{k: sc[k] for k in ("reward", "accuracy", "format")}}
                                    for s, c, sc in list(zip(expanded, completions, scores))[:32]],
                                   f"completions/step_{step:06d}.json")
        return m

    def _draw_batch(self) -> list[str]:
        return self._get(self.curriculum.next_batch.remote()).ids

    def _collect_rollouts(self, pending) -> list[dict]:
        return [r for shard in self.rollout.collect(pending) for r in shard]

    def _send_rollouts(self, step: int, ids: list[str]):
        """Prompts spread across rollout workers (adding workers raises throughput); collected by the pipeline
        as one list in batch order."""
        cfg = self.cfg
        g = cfg.grpo.num_generations
        base = (cfg.run.seed * 1_000_003 + step) * 1_000_000  # a prompt's seeds depend on its place, not its worker
        rows = [{**self.by_id[sid].to_dict(), "_seed": base + i * g} for i, sid in enumerate(ids)]
        return self.rollout.submit_sharded(
            "generate", split_evenly(rows, len(self.rollout)), cfg.prompt.style, n=g,
            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, max_tokens=cfg.grpo.max_completion_length)

    def training_records(self, rollouts: list[dict], scores: list[dict]) -> list[dict]:
        """Group advantages, optional dropping of uniform groups; one record per completion."""
        import torch

        from sari_ray import grpo

        cfg = self.cfg
        g = cfg.grpo.num_generations
        rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float32)
        advantages = grpo.compute_advantages(rewards, g, scale_rewards=cfg.grpo.scale_rewards)
        keep = ~grpo.uniform_group_mask(rewards, g) if cfg.grpo.drop_uniform_groups else torch.ones(len(rollouts), dtype=torch.bool)
        records = []
        for p, rollout in enumerate(rollouts):
            if not keep[p]:
                continue
            sample = self.by_id[rollout["sample_id"]]
            for k, c in enumerate(rollout["completions"]):
                records.append({"prompt": rollout["prompt"], "audio": sample.audio, "completion_ids": c["token_ids"],
                                "sampling_logprobs": c["logprobs"], "advantage": float(advantages[p * g + k]),
                                "truncated": c["finish_reason"] == "length", "weight": 1.0})
        return records

    def _shard_for_learners(self, rows: list[dict], weight_key: str) -> list[list[dict]]:
        """Equal-size shards so every rank runs the same number of micro-batches: padding rows repeat real
        ones with `weight_key` = 0 (no loss, no gradient)."""
        n = len(self.learners)
        pad = (-len(rows)) % n
        rows = rows + [{**rows[i % len(rows)], weight_key: 0.0} for i in range(pad)]
        return split_evenly(rows, n)

    def sync_weights(self, new_version: bool = True) -> dict[str, float]:
        """Learner ranks gather (ZeRO-3) -> rank 0 ships buckets (object store, or a broadcast with
        learner.sync_backend=collective) -> every rollout worker reloads each bucket as it arrives. With
        rollout.max_staleness > 0 (object store) a worker loads once its rollouts in flight are done and
        the driver does not wait for it (the next step's collect checks the loads). `new_version=False`
        re-delivers the current version (a resumed run's checkpoint weights)."""
        self.state["weight_version"] += int(new_version)  # by learner.sync_backend, see actors/weight_sync.py
        return self.weight_sync.sync(self.state["weight_version"], wait=self.cfg.rollout.max_staleness == 0)

    def evaluate(self) -> tuple[dict[str, float], dict[str, dict[str, bool]]]:
        """Greedy held-out accuracy by tier, with real and (optionally) silent audio, across rollout workers.
        Returns (metrics, {"eval" | "eval_silent": {sample id: correct}}); `eval/audio_gain` = real - silent
        accuracy (what listening contributes: a text shortcut shows as a small gain)."""
        cfg = self.cfg
        samples = self.eval_set[: cfg.eval.max_samples]
        shards = split_evenly([s.to_dict() for s in samples], len(self.rollout))
        out: dict[str, float] = {}
        items: dict[str, dict[str, bool]] = {}
        modes = [("eval", "real")] + ([("eval_silent", "silence")] if cfg.eval.silent_audio else [])
        for prefix, mode in modes:
            per_worker = self.rollout.sharded("evaluate", shards, cfg.prompt.style,
                                              max_tokens=cfg.grpo.max_completion_length, audio_mode=mode)
            correct = [bool(r["correct"]) for shard in per_worker for r in shard]
            items[prefix] = {s.id: c for s, c in zip(samples, correct)}
            out.update(metrics_lib.accuracy_by_tier(correct, [s.tier or 0 for s in samples], prefix))
        if "eval_silent" in items:
            out["eval/audio_gain"] = out["eval/accuracy"] - out["eval_silent/accuracy"]
        return out, items

    # ------------------------------------------------------------------ checkpoints and end
    def save_checkpoint(self) -> Path:
        """Learners write into a staging directory; trainer_state.json last; then it is renamed into place, so a
        checkpoint is complete or absent (a failure mid-write leaves none). Rotation runs only after that."""
        s = self.state
        final = checkpoints.checkpoint_dir(self.out, s)
        s["curriculum"] = self._get(self.curriculum.state_dict.remote())
        with checkpoints.staged(final, checkpoints.expected_bytes(self.out, self.model_path)) as staging:
            self.learners.call("save_checkpoint", str(staging))
            checkpoints.write_json(staging / checkpoints.IN_FLIGHT_FILE, self.pipeline.in_flight_state())
            checkpoints.write_json(staging / checkpoints.STATE_FILE, s)
        checkpoints.rotate(self.out, self.cfg.checkpoint.keep_last)
        return final

    def _log_batch(self, step: int, ids: list[str]) -> None:
        with open(self.out / "batches.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "ids": ids}) + "\n")

    def _rng(self) -> np.random.Generator:
        rng = np.random.default_rng()
        rng.bit_generator.state = self.state["rng"]
        return rng

    def finish(self, seconds: float) -> dict[str, Any]:
        final, final_items = self.evaluate()
        self.tracker.log_metrics(final, self.state["step"])
        self.tracker.log_dict(self.state.get("promotions", []), "curriculum_history.json")
        curve = self.state["curve"]
        summary = {"seconds": seconds, "grpo_steps": self.state["step"], "sft_steps": self.state["sft_step"],
                   "reward_by_tier": reward_trend_by_tier(curve),
                   "completions_per_s": _mean([c[2] for c in curve]), "sync_seconds": _mean([c[3] for c in curve]),
                   "promotions": self.state.get("promotions", []), "final_eval": final,
                   "after_sft_eval": next((h for h in self.state["history"] if h["step"] == 0), None),
                   "grpo_gain": metrics_lib.grpo_gain(self.state.get("grpo_tiers", []),
                                                      {s.id: s.tier or 0 for s in self.eval_set},
                                                      self.state.get("after_sft_items"), final_items),
                   "mlflow_run_id": self.tracker.run_id, "tracking_uri": self.tracker.tracking_uri,
                   "output_dir": str(self.out)}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        self.tracker.log_dict(summary, "summary.json")
        self.tracker.finish()
        return summary

    def shutdown(self) -> None:
        """Engines first (vLLM's own processes), then Ray. Engines that do not stop within 2 min (after a hang, say)
        are left to ray.shutdown, which ends their actors; a warning says so instead of hiding the run's error."""
        import ray

        from sari_ray.actors.wiring import get_all

        try:
            get_all(self.rollout.call_refs("shutdown"), 120.0, "rollout worker", "shutdown")
        except Exception as err:  # noqa: BLE001 - the run's own error, if any, is the one to report
            print(f"warning: rollout engines did not shut down cleanly ({err}); stopping Ray", file=sys.stderr)
        finally:
            ray.shutdown()


# ---------------------------------------------------------------------- helpers
class LearnerGroupLost(RuntimeError):
    """Learners died more often than run.max_restarts allows; the message names the rank and the cause."""


class Interrupted(Exception):
    """The run stopped on SIGINT / SIGTERM after checkpointing; the message says how to resume."""


class StopOnSignal:
    """First SIGINT / SIGTERM (Ctrl-C, `ray job stop`, a pod eviction): ask the loop to stop after the step in
    flight (it checkpoints, shuts the actors down and exits 130). A second one: stop at once."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, _frame) -> None:
        import signal

        if self.requested:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping now")
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: finishing the step in flight, then checkpoint and stop "
              f"(again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopOnSignal":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def prepare_model(cfg) -> str:
    path = Path(cfg.model.path)
    if not path.exists():
        if not cfg.model.build_tiny_if_missing:
            raise ConfigError(f"model.path={path} does not exist (set model.build_tiny_if_missing=true for a tiny "
                              f"random model, or run `sari-ray model tiny --arch qwen2-audio --out {path}`)")
        from sari_ray.models.tiny import build_tiny

        arch = "qwen2-audio" if cfg.model.arch == "auto" else cfg.model.arch
        build_tiny(arch, path, seed=cfg.run.seed)
    return str(path.resolve())


def ray_init_kwargs(cfg) -> dict[str, Any]:
    """Attach to a cluster if one is named (or we run inside a submitted job), else start a local one whose
    custom resources cover the configured actors, bound to 127.0.0.1."""
    import os

    if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        return {"address": cfg.cluster.address or os.environ["RAY_ADDRESS"], "log_to_driver": True}
    from sari_ray.deploy.local_ray import local_cluster_kwargs

    need = actor_resources(cfg)
    custom = {name: amount for name, amount in need.items() if name not in ("CPU", "GPU")}
    # a fresh single-node cluster, every Ray process bound to 127.0.0.1 (see sari_ray/deploy/local_ray.py)
    return {**local_cluster_kwargs(cfg.cluster.num_cpus or need.get("CPU", 0.0), custom), "log_to_driver": True}


def reward_trend_by_tier(curve: list[list]) -> list[dict[str, Any]]:
    """Mean GRPO reward over the first and last quarter of each stretch of steps at one tier (a promotion
    resets the reward level, so a whole-run trend would mix tiers). curve rows: [step, reward, ..., tier]."""
    segments: list[list[list]] = []
    for row in curve:
        if not segments or segments[-1][-1][-1] != row[-1]:
            segments.append([])
        segments[-1].append(row)
    trend = []
    for rows in segments:
        quarter = max(1, len(rows) // 4)
        trend.append({"tier": rows[0][-1], "steps": [rows[0][0], rows[-1][0]],
                      "first_quarter": _mean([r[1] for r in rows[:quarter]]),
                      "last_quarter": _mean([r[1] for r in rows[-quarter:]])})
    return trend


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run_training(configs: list[str], overrides: list[str]) -> dict[str, Any]:
    cfg = load_config(configs, overrides)
    with StopOnSignal() as stop:  # a signal during startup is acted on after the first step
        trainer = Trainer(cfg, stop)
        try:
            summary = trainer.fit()
        except Interrupted:
            mark_failed(trainer.tracker, None, "KILLED")
            raise
        except BaseException as err:
            mark_failed(trainer.tracker, err)
            raise
        finally:
            trainer.shutdown()
    print_summary(trainer.console, summary)
    return summary


def mark_failed(tracker, err: BaseException | None, status: str = "FAILED") -> None:
    """Mark the MLflow run FAILED (KILLED when interrupted) if the store lets us; a store that fails too (e.g.
    the same full disk) gets a warning, never the place of the error that stopped the run."""
    try:
        tracker.finish(status)
    except Exception as store_err:  # noqa: BLE001 - the run's own error is the one to report
        print(f"warning: could not mark MLflow run {tracker.run_id} {status} ({type(store_err).__name__}: "
              f"{store_err}); the run stopped because of: {type(err).__name__}: {err}", file=sys.stderr)


def register_cli(subparsers) -> None:
    train = subparsers.add_parser("train", help="SFT warm-up + curriculum GRPO from YAML config(s)")
    train.add_argument("args", nargs="+", metavar="CONFIG.yaml [OVERLAY.yaml ...] [key=value ...]",
                       help="base config, optional ablation overlays, then overrides such as grpo.steps=10")
    train.set_defaults(func=lambda a: _cli(a.args))
    demo = subparsers.add_parser("demo", help="train configs/demo_cpu.yaml (tiny model, synthetic data, CPU)")
    demo.add_argument("overrides", nargs="*")
    demo.set_defaults(func=lambda a: _cli([str(demo_config_path()), *a.overrides]))


def demo_config_path() -> Path:
    return Path(__file__).resolve().parent.parent / "configs" / "demo_cpu.yaml"


def _cli(args: list[str]) -> int:
    """`CONFIG.yaml [OVERLAY.yaml ...] [key=value ...]`: files first, then overrides."""
    configs = [a for a in args if a.endswith((".yaml", ".yml")) and "=" not in a]
    overrides = [a for a in args if a not in configs]
    import os

    from sari_ray.cli import DEBUG_ENV, USER_ERROR_EXIT, USER_ERRORS

    try:
        run_training(configs, overrides)
    except Interrupted as err:
        print(f"error: {err}", file=sys.stderr)
        return 130
    except USER_ERRORS as err:  # config, data, files: a message, no traceback (also for `python -m`, ray job submit)
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"error: {err}\n({DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return USER_ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]) if len(sys.argv) > 1 else print(__doc__) or 2)
