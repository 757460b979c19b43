"""Config: every shipped config and overlay loads; bad keys and values fail at load, naming the key, the bad
value and the fix; every field of the schema has a rule (or a stated reason for none), every rule a case."""
import dataclasses
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sari_ray import config as config_lib
from sari_ray.config import ConfigError, TrainConfig, load_config, to_flat_dict

pytestmark = pytest.mark.unit
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEMO = CONFIGS / "demo_cpu.yaml"
BASES = sorted(p for p in CONFIGS.glob("*.yaml"))
OVERLAYS = sorted((CONFIGS / "ablations").glob("*.yaml")) + sorted((CONFIGS / "overlays").glob("*.yaml"))


@pytest.mark.parametrize("base", BASES, ids=lambda p: p.name)
@pytest.mark.parametrize("overlay", [None, *OVERLAYS], ids=lambda p: p.name if p else "none")
def test_shipped_configs_and_overlays_load(base, overlay):
    cfg = load_config([base] + ([overlay] if overlay else []))
    if overlay is not None:
        raw = overlay.read_text()
        for section in ("prompt", "curriculum", "sft"):
            if f"{section}:" in raw:
                assert to_flat_dict(cfg)  # resolved and frozen
    with pytest.raises(Exception):
        cfg.grpo.steps = 3  # frozen after validation


def test_r1_aqa_config_has_published_settings():
    g = load_config(CONFIGS / "r1_aqa_qwen2_audio_7b.yaml").grpo
    assert (g.num_generations, g.learning_rate, g.beta, g.kl_estimator, g.max_completion_length,
            g.prompts_per_step, g.steps) == (8, 1e-6, 0.04, "k3", 256, 16, 1000)


def test_overlay_changes_only_its_keys():
    base = to_flat_dict(load_config(CONFIGS / "sari_qwen2_audio_7b.yaml"))
    free = to_flat_dict(load_config([CONFIGS / "sari_qwen2_audio_7b.yaml", CONFIGS / "ablations" / "free.yaml"]))
    assert {k for k in base if base[k] != free[k]} == {"prompt.style", "sft.style"}


@pytest.mark.parametrize("override, key", [
    ("grpo.bogus=1", "grpo.bogus"),
    ("grpo.steps=abc", "grpo.steps"),
    ("grpo.kl_estimator=k9", "kl_estimator"),
])
def test_bad_keys_and_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIGS / "demo_cpu.yaml", [override])


def test_missing_required_keys_and_files():
    with pytest.raises(ConfigError, match="model.path"):
        load_config(None, ["data.train=x.jsonl"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no/such.yaml")


# ------------------------------------------------------------------------------------------ one case per rule
# rule id -> overrides on configs/demo_cpu.yaml that break that rule and no other. Rule ids: the keys of
# CHOICES, POSITIVE, NON_NEGATIVE and RULES, the Ray resource rules, and the names of CROSS_RULES.
RULE_CASES = {
    # CHOICES
    "run.device": ["run.device=tpu"],
    "model.arch": ["model.arch=llama"],
    "model.dtype": ["model.dtype=float16"],
    "data.format": ["data.format=csv", "data.synth_if_missing=0"],
    "data.invalid_rows": ["data.invalid_rows=ignore"],
    "data.synth_set": ["data.synth_set=beeps"],
    "prompt.style": ["prompt.style=fancy", "sft.style=free"],
    "sft.style": ["sft.style=fancy"],
    "curriculum.mode": ["curriculum.mode=random"],
    "learner.zero_stage": ["learner.zero_stage=4"],
    "learner.sync_backend": ["learner.sync_backend=nccl"],
    # POSITIVE: integers >= 1
    "rollout.num_workers": ["rollout.num_workers=0"],
    "rollout.min_workers": ["rollout.min_workers=0"],
    "rollout.max_workers": ["rollout.max_workers=0"],
    "learner.num_workers": ["learner.num_workers=0"],
    "grpo.prompts_per_step": ["grpo.prompts_per_step=0"],
    "grpo.num_generations": ["grpo.num_generations=0"],
    "grpo.max_completion_length": ["grpo.max_completion_length=0"],
    "grpo.num_iterations": ["grpo.num_iterations=0"],
    "sft.batch_size": ["sft.batch_size=0"],
    "curriculum.num_tiers": ["curriculum.num_tiers=0"],
    "curriculum.window": ["curriculum.window=0"],
    "learner.micro_batch_size": ["learner.micro_batch_size=0"],
    "rollout.tensor_parallel_size": ["rollout.tensor_parallel_size=0"],
    "grpo.steps": ["grpo.steps=0"],
    "checkpoint.every": ["checkpoint.every=0"],
    "checkpoint.keep_last": ["checkpoint.keep_last=0"],
    "eval.max_samples": ["eval.max_samples=0"],
    "tracking.log_every": ["tracking.log_every=0"],
    "cluster.torch_threads_per_actor": ["cluster.torch_threads_per_actor=0"],
    "rollout.max_model_len": ["rollout.max_model_len=0"],
    # NON_NEGATIVE: integers >= 0
    "sft.steps": ["sft.steps=-1"],
    "sft.checkpoint_every": ["sft.checkpoint_every=-1"],
    "eval.every": ["eval.every=-1"],
    "run.max_restarts": ["run.max_restarts=-1"],
    "curriculum.min_steps_at_tier": ["curriculum.min_steps_at_tier=-1"],
    "data.synth_if_missing": ["data.synth_if_missing=-1"],
    "tracking.completions_table_every": ["tracking.completions_table_every=-1"],
    # RULES
    "run.name": ["run.name=' '", "run.output_dir=runs/x"],
    "run.output_dir": ["run.output_dir=' '"],
    "run.seed": ["run.seed=-1"],
    "cluster.num_cpus": ["cluster.num_cpus=4.5"],
    "cluster.setup_timeout_s": ["cluster.setup_timeout_s=0"],
    "cluster.stop_grace_s": ["cluster.stop_grace_s=0", "cluster.stop_grace_s=.nan"],
    "checkpoint.every_minutes": ["checkpoint.every_minutes=-1"],
    "cluster.step_timeout_s": ["cluster.step_timeout_s=0"],
    "cluster.resource_wait_s": ["cluster.resource_wait_s=-1"],
    "model.path": ["model.path=' '"],
    "data.train": ["data.train=' '"],
    "data.eval_fraction": ["data.eval_fraction=0"],
    "data.max_audio_seconds": ["data.max_audio_seconds=0"],
    "data.audio_contribution": ["data.audio_contribution=' '"],
    "data.min_audio_contribution": ["data.min_audio_contribution=1.5", "data.audio_contribution=c.jsonl"],
    "reward.accuracy_weight": ["reward.accuracy_weight=-1"],
    "reward.format_weight": ["reward.format_weight=nan"],
    "rollout.num_cpus_per_worker": ["rollout.num_cpus_per_worker=-1"],
    "rollout.num_gpus_per_worker": ["rollout.num_gpus_per_worker=0.00001"],
    "rollout.temperature": ["rollout.temperature=0"],
    "rollout.top_p": ["rollout.top_p=0"],
    "rollout.gpu_memory_utilization": ["rollout.gpu_memory_utilization=1.5"],
    "rollout.kv_cache_memory_gb": ["rollout.kv_cache_memory_gb=0"],
    "rollout.max_num_batched_tokens": ["rollout.max_num_batched_tokens=0"],
    "rollout.max_restarts": ["rollout.max_restarts=-1"],
    "rollout.max_staleness": ["rollout.max_staleness=-1"],
    "learner.num_cpus_per_worker": ["learner.num_cpus_per_worker=-0.5"],
    "learner.num_gpus_per_worker": ["learner.num_gpus_per_worker=-1"],
    "learner.gradient_clipping": ["learner.gradient_clipping=-1"],
    "learner.weight_decay": ["learner.weight_decay=-0.1"],
    "learner.sync_bucket_mb": ["learner.sync_bucket_mb=0"],
    "learner.sync_timeout_s": ["learner.sync_timeout_s=0"],
    "sft.learning_rate": ["sft.learning_rate=0"],
    "grpo.learning_rate": ["grpo.learning_rate=inf"],
    "curriculum.promote_threshold": ["curriculum.promote_threshold=1.5"],
    "curriculum.max_steps_at_tier": ["curriculum.max_steps_at_tier=0", "curriculum.min_steps_at_tier=0"],
    "curriculum.replay_fraction": ["curriculum.replay_fraction=1.0"],
    "tracking.experiment": ["tracking.experiment=' '"],
    "tracking.parent_run_id": ["tracking.parent_run_id=' '"],
    "tracking.max_outage_s": ["tracking.max_outage_s=-1"],
    "tracking.request_timeout_s": ["tracking.request_timeout_s=0.5"],
    # Ray resources
    "resources: reserved name": ["rollout.resources.GPU=1"],
    "resources: amount": ["learner.resources.learner_slot=0"],
    # CROSS_RULES
    "cpu_run_has_no_gpus": ["learner.num_gpus_per_worker=1"],
    "cuda_run_reserves_gpus": ["run.device=cuda"],
    "learner_ranks_own_a_gpu": ["run.device=cuda", "rollout.num_gpus_per_worker=1", "learner.num_gpus_per_worker=0.5"],
    "local_cluster_fits_actors": ["cluster.num_cpus=2"],
    "model_len_fits_a_turn": ["rollout.max_model_len=700"],
    "cpu_token_budget_holds_a_prompt": ["rollout.max_num_batched_tokens=512"],
    "max_steps_after_min_steps": ["curriculum.max_steps_at_tier=2"],
    "pool_bounds_hold_the_start": ["rollout.num_workers=2", "rollout.max_workers=1"],
    "some_reward": ["reward.accuracy_weight=0", "reward.format_weight=0"],
    "stale_rollouts_are_corrected": ["rollout.max_staleness=1", "grpo.vllm_importance_sampling_correction=false"],
    "synth_writes_jsonl": ["data.format=mmau"],
    "synth_has_the_tiers": ["curriculum.num_tiers=4"],  # both sets have 3 tiers
    "contribution_filter_has_its_file": ["data.min_audio_contribution=0.25"],
    # the GRPO math's own check (GRPOSettings.validate) behind the config
    "grpo: GRPOSettings.validate": ["grpo.num_generations=1"],
}
RESOURCE_RULES = {"resources: reserved name", "resources: amount"}
VALIDATED_ELSEWHERE = {"grpo: GRPOSettings.validate"}
# Fields with no rule, and why. Anything else in the schema needs a rule (test below).
NO_RULE = {
    "run.resume": "a bool (the schema types it)",
    "cluster.address": "null, 'auto', 'local' or any address: ray.init judges it, and '' means null",
    "model.build_tiny_if_missing": "a bool",
    "data.audio_dir": "null or a folder: prepare_data checks every clip before anything starts",
    "data.eval": "null or a file: prepare_data reports a missing file before anything starts",
    "data.allow_external_audio": "a bool",
    "rollout.enforce_eager": "a bool",
    "learner.gradient_checkpointing": "a bool",
    "learner.train_audio_encoder": "a bool",
    "tracking.tracking_uri": "null or any MLflow URI: MLflow judges it when tracking starts, before Ray",
    "eval.silent_audio": "a bool",
}


def _problems(message: str) -> list[str]:
    lines = message.splitlines()
    return lines[1:] if re.match(r"\d+ config problems", lines[0]) else lines


def _raw_value(overrides: list[str], key: str):
    """The value the schema makes of an override, before validation (what the message must show)."""
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(DEMO), OmegaConf.from_dotlist(overrides))
    return OmegaConf.select(cfg, key)


@pytest.mark.parametrize("rule", sorted(RULE_CASES))
def test_each_rule_fails_at_load_naming_key_value_and_fix(rule):
    overrides = RULE_CASES[rule]
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, overrides)
    problems = _problems(str(info.value))
    assert len(problems) == 1, f"{overrides} broke more than the rule {rule!r}: {problems}"  # one rule per case
    problem = problems[0]
    cross = {name: keys for name, keys, _ in config_lib.CROSS_RULES}
    if rule in cross:
        named = [o.split("=", 1) for o in overrides if o.split("=", 1)[0] in cross[rule]]
        assert named, overrides
        for key, value in named:  # the keys the rule reads are named, with the values given
            assert key in problem and value in problem, problem
    elif rule in RESOURCE_RULES:
        key = overrides[0].split("=")[0]
        assert problem.startswith(f"config key '{key}' = {_raw_value(overrides, key)!r} is invalid: "), problem
    elif rule in VALIDATED_ELSEWHERE:
        assert problem.startswith("config section 'grpo': grpo.num_generations=1 is invalid: use"), problem
    else:
        assert problem.startswith(f"config key '{rule}' = {_raw_value(overrides, rule)!r} is invalid: "), problem
    assert re.search(r"\b(use|set|raise|give)\b", problem), f"no fix in: {problem}"


def _schema_keys() -> set[str]:
    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                yield from walk(type(default), f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"
    return set(walk(TrainConfig, ""))


def _ruled_keys() -> set[str]:
    from sari_ray.grpo import GRPOSettings

    keys = set(config_lib.CHOICES) | set(config_lib.POSITIVE) | set(config_lib.NON_NEGATIVE) | set(config_lib.RULES)
    keys |= {k for _, ks, _ in config_lib.CROSS_RULES for k in ks}
    keys |= {"rollout.resources", "learner.resources"}  # the Ray resource rules
    keys |= {f"grpo.{f.name}" for f in dataclasses.fields(GRPOSettings)}  # GRPOSettings.validate
    return keys


def test_every_field_has_a_rule_or_a_reason_for_none():
    schema = _schema_keys()
    missing = sorted(schema - _ruled_keys() - set(NO_RULE))
    assert not missing, f"schema fields without a rule in sari_ray/config.py (or a reason in NO_RULE): {missing}"
    assert set(NO_RULE) <= schema and not set(NO_RULE) & (_ruled_keys() - {"rollout.resources", "learner.resources"})


def test_every_rule_has_a_case_and_names_a_real_key():
    rules = (set(config_lib.CHOICES) | set(config_lib.POSITIVE) | set(config_lib.NON_NEGATIVE)
             | set(config_lib.RULES) | {name for name, _, _ in config_lib.CROSS_RULES})
    assert set(RULE_CASES) == rules | RESOURCE_RULES | VALIDATED_ELSEWHERE
    schema = _schema_keys()
    assert not (rules - {name for name, _, _ in config_lib.CROSS_RULES}) - schema  # no rule for a removed key
    assert not {k for _, ks, _ in config_lib.CROSS_RULES for k in ks} - schema


@pytest.mark.parametrize("overrides", [
    ["curriculum.promote_threshold=1.0", "curriculum.replay_fraction=0", "curriculum.min_steps_at_tier=0"],
    ["sft.steps=0", "eval.every=0", "tracking.completions_table_every=0", "learner.gradient_clipping=0"],
    ["curriculum.max_steps_at_tier=5", "rollout.kv_cache_memory_gb=null", "rollout.top_p=1",
     "rollout.gpu_memory_utilization=1"],
    ["cluster.num_cpus=3", "rollout.max_model_len=767", "rollout.max_num_batched_tokens=1024"],  # exact fits
    ["cluster.num_cpus=null", "rollout.num_cpus_per_worker=0.5", "learner.num_cpus_per_worker=0"],
    ["data.synth_if_missing=0", "data.format=mmau", "curriculum.num_tiers=5"],
    ["data.max_audio_seconds=10", "rollout.max_model_len=300"],  # 250 audio tokens + 16 + prompt
    ["reward.accuracy_weight=0"],
    ["run.device=cuda", "rollout.num_gpus_per_worker=0.5", "learner.num_gpus_per_worker=1"],
], ids=lambda o: " ".join(o)[:60])
def test_values_at_the_edges_of_the_rules_load(overrides):
    load_config(DEMO, overrides)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, ["checkpoint.every=0", "curriculum.promote_threshold=1.5", "cluster.num_cpus=2"])
    message = str(info.value)
    assert message.startswith("3 config problems (nothing was started):")
    assert "'checkpoint.every' = 0" in message and "'curriculum.promote_threshold' = 1.5" in message
    assert "cluster.num_cpus=2" in message


def test_the_curriculum_schedulers_own_checks_run_at_load(monkeypatch):
    """Whatever the scheduler actor would refuse fails at load, not at GRPO step 1."""
    import sari_ray.curriculum

    def refuse(self, *args, **kwargs):
        raise ValueError("curriculum.window=64 is invalid: a new rule")

    monkeypatch.setattr(sari_ray.curriculum.CurriculumScheduler, "__init__", refuse)
    with pytest.raises(ConfigError, match=r"config section 'curriculum': curriculum.window=64 is invalid"):
        load_config(DEMO)


def test_train_fails_before_anything_starts(tmp_path, monkeypatch, capsys):
    """`sari-ray train configs/demo_cpu.yaml curriculum.promote_threshold=1.5`: exit 2 with the fix, and no
    data, model, tracking or Ray (the Trainer is never built; the run directory is never made)."""
    import sari_ray.train as train
    from sari_ray.cli import main

    def never(*args, **kwargs):
        raise AssertionError("the Trainer started on a bad config")

    monkeypatch.setattr(train, "Trainer", never)
    out = tmp_path / "run"
    assert main(["train", str(DEMO), "curriculum.promote_threshold=1.5", f"run.output_dir={out}"]) == 2
    assert "curriculum.promote_threshold' = 1.5 is invalid: use a running accuracy in (0, 1]" in capsys.readouterr().err
    assert not out.exists()
