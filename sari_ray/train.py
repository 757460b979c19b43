"""The training loop: SFT warm-up on the prompt style's reasoning targets, then curriculum-guided GRPO, each GRPO
step a row of named, timed phases (rollout -> reward -> curriculum -> learn -> sync -> log). Run by
`sari-ray train CONFIG [OVERLAY ...] [key=value ...]`, `sari-ray demo`, or `python -m sari_ray.train ...` (what
`ray job submit` runs). Around it: `trainer_state` (checkpoints and resume), `recovery` (an actor that dies),
`stopping` (signals, `ray job stop`), `records` (rollouts -> training records), `actors.wiring` (the actors).
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sari_ray import checkpoints, recovery, trainer_state
from sari_ray import metrics as metrics_lib
from sari_ray.batching import split_evenly, split_padded
from sari_ray.config import load_config, step_timeout_s
from sari_ray.console import make_console, print_summary, progress_bar, progress_line
from sari_ray.data.prepare import prepare_data
from sari_ray.engines.tracking import start_run_tracking
from sari_ray.held_out import HELD_OUT_FILE, evaluate_held_out, held_out_record
from sari_ray.models.tiny import prepare_model
from sari_ray.records import check_staleness, is_truncated, rollout_rows, training_records
from sari_ray.rollout_pipeline import RolloutPipeline
from sari_ray.stopping import Interrupted, StopOnSignal, StopWindow, mark_failed, stop_if_asked

WRITE_BYTES_PER_S = 200e6  # a conservative disk write rate, to estimate a checkpoint's time before the first one


class Trainer:
    def __init__(self, cfg, stop: StopOnSignal | None = None):
        self.cfg = cfg
        self.step_timeout_s = step_timeout_s(cfg)  # every per-step remote call's deadline
        self.stop = stop or StopOnSignal()  # run_training listens for SIGINT / SIGTERM; the loop checks it
        self.out = Path(cfg.run.output_dir).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.console = make_console()
        self.timings: dict[str, float] = {}
        self.train_set, self.eval_set = prepare_data(cfg, self.console)  # fails here, before any actor
        self.by_id = {s.id: s for s in self.train_set}
        self.tiers = {s.id: s.tier or 0 for s in self.train_set}
        self.audio_of = {s.id: s.audio for s in self.train_set}
        self.model_path = prepare_model(cfg)
        checkpoint = trainer_state.open_run_dir(self.out, cfg.run.resume, self.console)
        self.state = trainer_state.state_at(checkpoint, cfg.run.seed)
        OmegaConf.save(cfg, self.out / "config.yaml")
        self.tracker = start_run_tracking(cfg, self.out, self.state["mlflow_run_id"])
        self.state["mlflow_run_id"], self.state["tracking_uri"] = self.tracker.run_id, self.tracker.tracking_uri
        self.console.print(f"MLflow run {self.tracker.run_id} at {self.tracker.tracking_uri}")
        self.stop_window = StopWindow(self.console, cfg.cluster.stop_grace_s)
        self.stop_window.announce()
        self.stop_window.check(0.0, checkpoints.expected_bytes(self.out, self.model_path) / WRITE_BYTES_PER_S)
        self.last_checkpoint = (time.monotonic(), 0.0)  # (when, seconds it took)
        self._start_actors(checkpoint)

    # ------------------------------------------------------------------ setup
    def _start_actors(self, checkpoint: Path | None) -> None:
        from sari_ray.actors import wiring

        cfg = self.cfg
        self.reaper = wiring.connect(cfg)
        self.stop.reclaim()
        wiring.wait_for_resources(cfg)
        wiring.check_plan(cfg, self.model_path, say=self.console.print)  # `sari-ray plan` on this cluster
        with self.phase("startup"):
            self.curriculum = wiring.start_curriculum(cfg, self.tiers)
            self.reward = wiring.start_reward_scorer(cfg)
            self.rollout = wiring.start_rollout_workers(
                cfg, self.model_path, on_restart=lambda *a: recovery.rollout_worker_restarted(self, *a),
                on_pool_change=lambda event: recovery.rollout_pool_changed(self, event))
            self.pipeline = RolloutPipeline(cfg.rollout.max_staleness, cfg.grpo.steps, self._draw_batch,
                                            self._send_rollouts, self._collect_rollouts)
            self.learners = wiring.start_learners(cfg, self.learner_setup_kwargs())
            start_s = wiring.wait_rollout_ready(cfg, self.rollout)
            self.weight_sync = wiring.start_weight_sync(cfg, self.learners, self.rollout, self.console)
            if checkpoint is not None:
                trainer_state.restore(self, checkpoint)
            wiring.ask_autoscaler_for_rollout_pool(cfg)
        self.console.print(f"actors up: {len(self.rollout)} rollout, {len(self.learners)} learner "
                           f"(engine start {max(start_s):.0f} s)")

    def learner_setup_kwargs(self) -> dict[str, Any]:
        from sari_ray.actors.wiring import learner_setup_kwargs

        return learner_setup_kwargs(self.cfg, self.model_path, self.state.get("reference_model"))

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        self.current_phase = name  # named by a deadline's error
        yield
        self.timings[f"time/{name}"] = time.perf_counter() - t0

    def call_service(self, role: str, method: str, *args):
        """A call to the curriculum scheduler or the reward scorer, within the per-step deadline. A reward scorer
        that died is replaced and asked again (it holds no state); a dead curriculum scheduler raises `ActorDied`
        and `fit` goes back to the last checkpoint (recovery.py)."""
        from sari_ray.actors.group import ActorDied, get_one

        actor = self.reward if role == recovery.REWARD_SCORER else self.curriculum
        phase = f"{method} (phase {getattr(self, 'current_phase', '?')} of GRPO step {self.state['step']})"
        try:
            return get_one(getattr(actor, method).remote(*args), self.step_timeout_s, role, phase)
        except ActorDied as err:
            if role != recovery.REWARD_SCORER:
                raise
            recovery.replace_reward_scorer(self, err)
            return self.call_service(role, method, *args)

    def ask_curriculum(self, method: str, *args):
        return self.call_service(recovery.CURRICULUM, method, *args)

    # ------------------------------------------------------------------ training
    def fit(self) -> dict[str, Any]:
        from sari_ray.actors.group import ActorDied

        cfg, t_start = self.cfg, time.perf_counter()
        while self.state["phase"] == "sft":
            try:
                self.sft()
            except ActorDied as err:  # a learner or the curriculum: back to the last checkpoint (others re-raised)
                recovery.back_to_checkpoint(self, err)
        with progress_bar(self.console) as progress:
            task = progress.add_task("grpo", total=cfg.grpo.steps, completed=self.state["step"])
            while self.state["step"] < cfg.grpo.steps:
                self.state["step"] += 1
                try:
                    step_metrics = self.grpo_step(self.state["step"])
                    if trainer_state.checkpoint_due(cfg, self.state["step"], self.last_checkpoint[0]):
                        self.save_checkpoint()
                        self.stop_window.check(step_metrics["time/step"], self.last_checkpoint[1])
                except ActorDied as err:  # a learner or the curriculum: back to the last checkpoint, steps replayed
                    recovery.back_to_checkpoint(self, err)
                    progress.update(task, completed=self.state["step"])
                    continue
                progress.update(task, advance=1, description=progress_line(self.state["step"], step_metrics))
                stop_if_asked(self)
        return self.finish(time.perf_counter() - t_start)

    def sft(self) -> None:
        """SARI's warm-up: imitate the style's reasoning targets before RL. Checkpoints every
        `sft.checkpoint_every` steps; a resumed run continues where it stopped."""
        cfg, s = self.cfg, self.state
        if cfg.sft.steps > 0:
            if s["sft_order"] is None:  # drawn once, then part of the checkpointed state
                rng = trainer_state.rng_of(s)
                s["sft_order"] = [self.train_set[i].id for i in rng.permutation(len(self.train_set))]
                s["rng"] = rng.bit_generator.state
            order = s["sft_order"]
            while s["sft_step"] < cfg.sft.steps:
                start = (s["sft_step"] * cfg.sft.batch_size) % len(order)
                rows = [self.by_id[order[(start + i) % len(order)]].to_dict() for i in range(cfg.sft.batch_size)]
                with self.phase("sft_step"):
                    per_rank = self.learners.call_sharded("sft_step", split_padded(rows, len(self.learners), "_weight"),
                                                          cfg.sft.style, cfg.sft.learning_rate)
                s["sft_step"] += 1
                m = metrics_lib.mean_over(per_rank)
                self.tracker.log_metrics({**m, "time/sft_step": self.timings["time/sft_step"]}, s["sft_step"])
                if s["sft_step"] % 10 == 0 or s["sft_step"] == cfg.sft.steps:
                    self.console.print(f"sft {s['sft_step']}/{cfg.sft.steps} loss {m['sft/loss']:.3f}")
                if (cfg.sft.checkpoint_every and s["sft_step"] % cfg.sft.checkpoint_every == 0
                        and s["sft_step"] < cfg.sft.steps):
                    self.save_checkpoint()
                if s["sft_step"] < cfg.sft.steps:
                    stop_if_asked(self)
            self.sync_weights()
            self.learners.call("reset_reference")  # the KL pulls toward the SFT policy, not the base model
            eval_metrics, s["after_sft_items"] = self.evaluate()  # per item: GRPO's gain is paired on them
            self.tracker.log_metrics({f"after_sft/{k}": v for k, v in eval_metrics.items()}, 0)
            s["history"].append({"step": 0, **eval_metrics})
        s["phase"] = "grpo"
        if cfg.sft.steps > 0:
            s["reference_model"] = str(checkpoints.step_dir(self.out, 0) / "model")  # what a resumed run loads
            self.save_checkpoint()
        stop_if_asked(self)

    def grpo_step(self, step: int) -> dict[str, float]:
        cfg, s, g = self.cfg, self.state, self.cfg.grpo.num_generations
        self.timings = {}  # this step's phases only
        t_step = time.perf_counter()
        self.rollout.reconcile()  # the pool as the cluster offers it: workers joined, nodes gone
        with self.phase("rollout"):  # waiting for them: sent now, or up to rollout.max_staleness steps ago
            batch_ids, rollouts = self.pipeline.take(step)
        samples = [self.by_id[i] for i in batch_ids]
        expanded = [x for x in samples for _ in range(g)]  # one per completion
        completions = [c for r in rollouts for c in r["completions"]]
        staleness = check_staleness(step, completions, s["weight_version"], cfg.rollout.max_staleness)
        self.timings["time/rollout_generate"] = max(r["generate_s"] for r in rollouts)  # the workers' own time
        with self.phase("reward"):
            scores = self.call_service(recovery.REWARD_SCORER, "score", [c["text"] for c in completions],
                                       [x.to_dict() for x in expanded])
        with self.phase("curriculum"):
            per_sample = metrics_lib.per_sample_accuracy([x.id for x in expanded], scores)
            promotion = self.ask_curriculum("update", step, per_sample)
        with self.phase("learn"):
            records = training_records(rollouts, scores, self.audio_of, g, cfg.grpo.scale_rewards,
                                       cfg.grpo.drop_uniform_groups)
            learn = metrics_lib.mean_over(self.learners.call_sharded(
                "grpo_step", split_padded(records, len(self.learners), "weight"),
                cfg.grpo.learning_rate)) if records else {}
        with self.phase("sync"):  # nothing learned (every group uniform and dropped): the weights stay as they are
            sync = self.sync_weights() if records else {"bytes": 0.0, "buckets": 0, "seconds": 0.0}
        extra = {**learn, **self.ask_curriculum("metrics"), "learn/records": len(records),
                 **recovery.pool_metrics(self)}
        m = metrics_lib.grpo_step_metrics(completions, scores, [is_truncated(c) for c in completions],
                                          [x.tier or 0 for x in expanded], staleness, g, time.perf_counter() - t_step,
                                          self.timings, sync, s["weight_version"], extra)
        s["grpo_tiers"] = sorted(set(s.get("grpo_tiers", [])) | {x.tier or 0 for x in samples})
        s["curve"].append([step, m["reward/mean"], m["throughput/completions_per_s"], sync["seconds"],
                           m["reward/accuracy"], int(m.get("curriculum/tier", 0))])
        self._log_step(step, m, promotion, batch_ids, list(zip(expanded, completions, scores)))
        return m

    def _log_step(self, step: int, m: dict, promotion, batch_ids: list[str], scored: list[tuple]) -> None:
        cfg = self.cfg
        if promotion is not None:
            event = promotion.to_dict()
            self.state.setdefault("promotions", []).append(event)
            self.console.print(f"[green]step {step}: tier {event['from_tier']} -> {event['to_tier']} "
                               f"(accuracies {event['accuracies']})")
            self._write_curriculum_history()
        evaluated = bool(cfg.eval.every) and step % cfg.eval.every == 0
        if evaluated:
            held_out = self.evaluate()[0]
            m.update(held_out)
            self.state["history"].append({"step": step, **held_out})  # the held-out curve (held_out.json)
        if metrics_lib.logs_step(step, cfg.tracking.log_every, cfg.grpo.steps, evaluated, promotion is not None):
            self.tracker.log_metrics(m, step)
        with open(self.out / "batches.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "ids": batch_ids}) + "\n")
        if cfg.tracking.completions_table_every and step % cfg.tracking.completions_table_every == 0:
            self.tracker.log_table(metrics_lib.completions_table(step, scored[:32]), f"completions/step_{step:06d}.json")

    def _write_curriculum_history(self) -> None:
        """Every promotion so far (step, from_tier, to_tier, accuracies, steps_at_tier, reason): the run
        directory's `curriculum_history.json` and the MLflow artifact of that name."""
        promotions = self.state.get("promotions", [])
        (self.out / "curriculum_history.json").write_text(json.dumps(promotions, indent=1))
        self.tracker.log_dict(promotions, "curriculum_history.json")

    def _draw_batch(self) -> list[str]:
        return self.ask_curriculum("next_batch").ids

    def _send_rollouts(self, step: int, ids: list[str]):
        """Prompts spread across rollout workers (adding workers raises throughput); collected by the pipeline
        as one list in batch order."""
        cfg = self.cfg
        rows = rollout_rows([self.by_id[i].to_dict() for i in ids], cfg.run.seed, step, cfg.grpo.num_generations)
        return self.rollout.submit_sharded(
            "generate", split_evenly(rows, len(self.rollout)), cfg.prompt.style, n=cfg.grpo.num_generations,
            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, max_tokens=cfg.grpo.max_completion_length)

    def _collect_rollouts(self, pending) -> list[dict]:
        return [r for shard in self.rollout.collect(pending) for r in shard]

    def sync_weights(self, new_version: bool = True) -> dict[str, float]:
        """Learner rank 0 -> every rollout worker, as the next weight version (`new_version=False` re-delivers the
        current one: a resumed run's checkpoint weights). With rollout.max_staleness > 0 (object store) a worker
        loads once its rollouts in flight are done and the driver does not wait (the next collect checks)."""
        if self.cfg.learner.sync_backend == "collective":  # a broadcast waits for the rollouts in flight anyway;
            self.pipeline.collect_in_flight()  # collected first, a lost worker's shard reruns on the weights it was
            # sent under (the collective path keeps no older buckets to give a survivor afterwards)
        self.state["weight_version"] += int(new_version)  # by learner.sync_backend, see actors/weight_sync.py
        return self.weight_sync.sync(self.state["weight_version"], wait=self.cfg.rollout.max_staleness == 0)

    def evaluate(self) -> tuple[dict[str, float], dict[str, dict[str, bool]]]:
        cfg = self.cfg
        return evaluate_held_out(self.rollout, self.eval_set[: cfg.eval.max_samples], cfg.prompt.style,
                                 cfg.grpo.max_completion_length, cfg.eval.silent_audio)

    # ------------------------------------------------------------------ checkpoints, stop, end
    def save_checkpoint(self) -> Path:
        return trainer_state.save(self)

    def finish(self, seconds: float) -> dict[str, Any]:
        from sari_ray.report import write_report

        s = self.state
        final, final_items = self.evaluate()
        self.tracker.log_metrics(final, s["step"])
        self._write_curriculum_history()
        tier_of = {x.id: x.tier or 0 for x in self.eval_set}
        (self.out / HELD_OUT_FILE).write_text(json.dumps(held_out_record(s["history"], s["step"], final, final_items,
                                                                         tier_of)))
        summary = {**metrics_lib.run_summary(s, seconds, final, final_items, tier_of),
                   "mlflow_run_id": self.tracker.run_id, "tracking_uri": self.tracker.tracking_uri,
                   "output_dir": str(self.out)}
        summary["report"] = str(write_report(self.out / "report.png", s["curve"], summary["promotions"],
                                             summary["after_sft_eval"], final, summary["grpo_gain"],
                                             title=f"{self.cfg.run.name}: {self.out.name}"))
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        self.tracker.log_dict(summary, "summary.json")
        self.tracker.log_artifact(summary["report"])
        self.tracker.finish()
        return summary

    def shutdown(self) -> None:
        from sari_ray.actors.wiring import shutdown

        shutdown(self.rollout)


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


if __name__ == "__main__":  # `python -m sari_ray.train CONFIG ...`: what `ray job submit` runs
    from sari_ray.cli import main

    sys.exit(main(["train", *sys.argv[1:]]) if len(sys.argv) > 1 else print(__doc__) or 2)
