"""Typed training configuration: OmegaConf structured dataclasses, one per layer.

Load with `load_config(["configs/sari_qwen2_audio_7b.yaml", "configs/ablations/free.yaml"], ["grpo.beta=0"])`:
later files (ablation overlays) and then `key=value` overrides win. An unknown key, an ill-typed value or a
value outside its choices fails at start, naming the key, the bad value and the fix; the result is frozen.
GRPO knob names follow TRL's GRPOConfig where one exists (num_generations, epsilon, epsilon_high, beta,
scale_rewards, loss_type, num_iterations, mask_truncated_completions, max_completion_length).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

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
    name: str = "sari-ray"
    output_dir: str = "runs/${run.name}"  # checkpoints, MLflow sqlite store, logs
    seed: int = 0
    resume: bool = False  # continue the last checkpoint in output_dir (same MLflow run, same data order)
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class ClusterConfig:
    address: str | None = None  # None: attach to RAY_ADDRESS / a submitted job's cluster, else start a local one
    num_cpus: float | None = None  # logical CPUs for a local cluster (may exceed cores; see README)
    torch_threads_per_actor: int = 1  # torch / OMP threads in each learner and rollout actor


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
    audio_dir: str | None = None
    eval: str | None = None  # held-out file; None: split `eval_fraction` off `train`
    eval_fraction: float = 0.1
    invalid_rows: str = "error"  # error: stop before training listing all problems | skip: drop and count
    synth_if_missing: int = 0  # demo/tests: synthesise this many at `train` if absent (only as <new folder>/data.jsonl)
    allow_external_audio: bool = False  # audio may lie outside the data folder (audio_dir, else the file's folder)
    max_audio_seconds: float = 30.0  # the models' audio window; longer clips are truncated and counted


@dataclass
class PromptConfig:
    style: str = "structured"  # implicit | free | structured (SARI)


@dataclass
class RewardConfig:
    accuracy_weight: float = 1.0  # R1-AQA: equal weights; later work 2:1
    format_weight: float = 1.0


@dataclass
class RolloutConfig:
    num_workers: int = 1  # vLLM engines; scale independently of learners
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    resources: dict[str, float] = field(default_factory=lambda: {"rollout_slot": 1.0})  # custom Ray resources
    tensor_parallel_size: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_model_len: int = 2048
    gpu_memory_utilization: float = 0.3  # on CPU: fraction of RAM for the KV cache
    kv_cache_memory_gb: float | None = None  # KV cache size outright (wins over gpu_memory_utilization); on CPU
    # vLLM counts other processes' memory against the fraction, so several engines + learners need this
    enforce_eager: bool = True
    max_num_batched_tokens: int | None = None  # scheduler token budget; None: vLLM's default (CPU: 65536, see engine)


@dataclass
class LearnerConfig:
    num_workers: int = 1  # DeepSpeed data-parallel ranks
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    resources: dict[str, float] = field(default_factory=lambda: {"learner_slot": 1.0})
    zero_stage: int = 2
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    gradient_clipping: float = 1.0
    weight_decay: float = 0.0
    sync_bucket_mb: float = 64.0  # weight sync: one call per bucket of this size
    gradient_checkpointing: bool = False
    train_audio_encoder: bool = True


@dataclass
class SFTConfig:
    steps: int = 0  # 0: no SFT warm-up
    batch_size: int = 16  # samples per step (all ranks)
    learning_rate: float = 2e-5
    style: str = "${prompt.style}"  # which reasoning target to imitate: structured | free | implicit


@dataclass
class GRPOConfig:
    steps: int = 100
    prompts_per_step: int = 16  # R1-AQA: 16 prompts x 8 completions per step
    learning_rate: float = 1e-6
    num_generations: int = 8
    max_completion_length: int = 256
    scale_rewards: bool = True  # False: Dr. GRPO (no std division)
    epsilon: float = 0.2
    epsilon_high: float | None = None  # DAPO clip-higher; None = epsilon
    beta: float = 0.04  # KL to a frozen reference; 0 loads no reference model
    kl_estimator: str = "k3"
    loss_type: str = "grpo"  # grpo (seq-mean of token-means) | bnpo (token-mean) | dr_grpo
    num_iterations: int = 1  # mu: updates per rollout batch
    drop_uniform_groups: bool = False
    mask_truncated_completions: bool = False


@dataclass
class CurriculumConfig:
    mode: str = "curriculum"  # curriculum (easy -> hard) | shuffled | hard_first
    num_tiers: int = 3
    window: int = 64  # samples in the running accuracy per tier
    promote_threshold: float = 0.7
    min_steps_at_tier: int = 5
    max_steps_at_tier: int | None = None  # promote anyway after this many steps (lets hard_first move on)
    replay_fraction: float = 0.0


@dataclass
class TrackingConfig:
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite under run.output_dir
    experiment: str = "sari-ray"
    log_every: int = 1
    completions_table_every: int = 10  # sample completions logged as an MLflow table


@dataclass
class CheckpointConfig:
    every: int = 50  # GRPO steps; a checkpoint is also written at the end of SFT and of training
    keep_last: int = 3


@dataclass
class EvalConfig:
    every: int = 0  # GRPO steps between held-out evaluations; 0: only at the end
    max_samples: int = 200
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
    "prompt.style": ("implicit", "free", "structured"),
    "sft.style": ("implicit", "free", "structured"),
    "curriculum.mode": ("curriculum", "shuffled", "hard_first"),
    "learner.zero_stage": (0, 1, 2, 3),
}
POSITIVE = ("rollout.num_workers", "learner.num_workers", "grpo.prompts_per_step", "grpo.num_generations",
            "grpo.max_completion_length", "grpo.num_iterations", "sft.batch_size", "curriculum.num_tiers",
            "curriculum.window", "learner.micro_batch_size", "rollout.tensor_parallel_size")


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
        cfg = OmegaConf.merge(schema, *(OmegaConf.load(p) for p in paths))
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


def _check_values(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' = {value!r} is not one of {list(allowed)}")
    for key in POSITIVE:
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {OmegaConf.select(cfg, key)}")
    if not 0.0 <= cfg.curriculum.replay_fraction < 1.0:
        raise ConfigError(f"config key 'curriculum.replay_fraction' must be in [0, 1), got {cfg.curriculum.replay_fraction}")
    if not 0.0 < cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"config key 'data.eval_fraction' must be in (0, 1), got {cfg.data.eval_fraction}")
    for group in ("rollout", "learner"):
        for name, amount in cfg[group].resources.items():
            if amount <= 0:
                raise ConfigError(f"config key '{group}.resources.{name}' must be > 0, got {amount}")
    try:
        grpo_settings(cfg).validate()
    except ValueError as err:
        raise ConfigError(f"config section 'grpo': {err}") from None


def grpo_settings(cfg: DictConfig) -> GRPOSettings:
    """The GRPO math's own settings object, from the `grpo` section (one source for the knob names)."""
    g = cfg.grpo
    return GRPOSettings(
        num_generations=g.num_generations, scale_rewards=g.scale_rewards, epsilon=g.epsilon,
        epsilon_high=g.epsilon_high, beta=g.beta, kl_estimator=g.kl_estimator, loss_type=g.loss_type,
        num_iterations=g.num_iterations, drop_uniform_groups=g.drop_uniform_groups,
        mask_truncated_completions=g.mask_truncated_completions, max_completion_length=g.max_completion_length,
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
