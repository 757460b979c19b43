"""`sari-ray plan`: the arithmetic against hand-computed cases, the verdicts, the CLI and the deploy sizing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sari_ray import model_shapes, plan
from sari_ray.config import load_config

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
FLAGSHIP = str(REPO / "configs" / "sari_qwen2_audio_7b.yaml")
R1AQA = str(REPO / "configs" / "r1_aqa_qwen2_audio_7b.yaml")
DEMO = str(REPO / "configs" / "demo_cpu.yaml")
GIB = 2**30


# ---------------------------------------------------------------------------- weights, gradients, optimizer
@pytest.mark.parametrize("dtype, stage, ranks, expected", [
    # bf16: weights 2, gradients 2, AdamW 12 (fp32 master + m + v) bytes per parameter
    ("bfloat16", 0, 1, (2e9, 2e9, 12e9)),
    ("bfloat16", 0, 8, (2e9, 2e9, 12e9)),  # stage 0 shards nothing
    ("bfloat16", 1, 2, (2e9, 2e9, 6e9)),  # stage 1: the optimizer state
    ("bfloat16", 2, 2, (2e9, 1e9, 6e9)),  # stage 2: and the gradients
    ("bfloat16", 2, 8, (2e9, 0.25e9, 1.5e9)),
    ("bfloat16", 3, 1, (2e9, 2e9, 12e9)),  # one rank: nothing to shard over
    ("bfloat16", 3, 2, (1e9, 1e9, 6e9)),
    ("bfloat16", 3, 8, (0.25e9, 0.25e9, 1.5e9)),  # stage 3: and the weights
    # fp32: weights 4, gradients 4, AdamW 8 (m + v; the weights are their own master copy)
    ("float32", 0, 2, (4e9, 4e9, 8e9)),
    ("float32", 2, 1, (4e9, 4e9, 8e9)),
    ("float32", 2, 2, (4e9, 2e9, 4e9)),
    ("float32", 3, 8, (0.5e9, 0.5e9, 1e9)),
])
def test_learner_state_per_rank(dtype, stage, ranks, expected):
    got = plan.learner_state_bytes(10**9, 10**9, dtype, stage, ranks)
    assert (got["weights"], got["gradients"], got["optimizer"]) == pytest.approx(expected)


def test_frozen_parameters_have_no_gradients_or_optimizer_state():
    got = plan.learner_state_bytes(10, 6, "bfloat16", 1, 2)  # 4 frozen (the audio encoder)
    assert got == {"weights": 20, "gradients": 12, "optimizer": 36}


# ---------------------------------------------------------------------------------------- model shapes
def test_shipped_qwen2_audio_7b_parameters_by_hand():
    h, i, v, layers = 4096, 11008, 156032, 32
    layer = 2 * h + 3 * (h * h + h) + h * h + 3 * h * i  # norms, q/k/v with bias (no GQA), o, SwiGLU MLP
    text = 2 * v * h + layers * layer + h  # untied embedding and LM head, final norm
    params = plan.ModelShape().params()
    assert params["text"] == text == 7_754_878_976
    assert 0.63e9 < params["audio"] < 0.64e9  # the Whisper-large-v3-like encoder, ~0.64 B
    assert params["projector"] == 1280 * 4096 + 4096
    # one bf16 sync of the engine's weights: the "about 16.8 GB"
    assert 2 * sum(params.values()) == pytest.approx(16.8e9, rel=0.01)
    assert plan.ModelShape().kv_bytes_per_token(2) == 2 * 32 * 32 * 128 * 2  # K and V, every layer, 32 KV heads


def test_omni_thinker_shapes_and_kv():
    params = model_shapes.OMNI_7B.params()
    assert 7.0e9 < params["text"] < 7.7e9 and 0.6e9 < params["vision"] < 0.7e9
    assert model_shapes.OMNI_7B.kv_bytes_per_token(2) == 2 * 28 * 4 * 128 * 2  # GQA: 4 KV heads


def test_config_json_formula_matches_the_checkpoint_exactly(tiny_qwen2_audio, tiny_qwen2_5_omni):
    """The formula from config.json against the safetensors headers of the tiny models (every tensor counted)."""
    audio = plan.load_shape(str(tiny_qwen2_audio))
    assert audio.source.endswith("config.json") and audio.hidden == 128
    assert {k: v for k, v in audio.params().items() if v} == plan.checkpoint_params(str(tiny_qwen2_audio))
    omni = plan.load_shape(str(tiny_qwen2_5_omni))
    formula, exact = omni.params(), plan.checkpoint_params(str(tiny_qwen2_5_omni))
    assert omni.arch == "qwen2.5-omni"
    assert formula["text"] == exact["text"] and formula["vision"] == exact["vision"]
    assert formula["audio"] + formula["projector"] == exact["audio"]  # Omni's projector lives in audio_tower.proj


def test_missing_checkpoint_falls_back_to_the_shipped_shapes(tmp_path):
    shape = plan.load_shape(str(tmp_path / "Qwen2.5-Omni-7B"))
    assert shape.hidden == 3584 and "not on disk" in shape.source
    assert plan.load_shape(str(tmp_path / "nothing"), "qwen2-audio").hidden == 4096


# ------------------------------------------------------------------------------------------- activations
def test_activations_by_hand():
    shape = plan.ModelShape(hidden=4, layers=2, intermediate=8, vocab=10, heads=2, kv_heads=1, audio_d=4,
                            audio_layers=1, audio_ffn=8)
    # per layer and token: 6h + 3 kv_dim + 4i = 24 + 6 + 32 = 62 values; 2 sequences x 3 tokens, fp32
    full = plan.activation_bytes(shape, micro_batch=2, seq_len=3, completion_len=2, dtype="float32",
                                 checkpointing=False)
    assert full["decoder"] == 6 * 2 * 62 * 4
    assert full["lm_head"] == 2 * 2 * 10 * (4 + 8)  # the completion slice: logits, fp32 copy, fp32 log-softmax
    assert full["encoder"] == 0  # frozen encoder: no clips
    ckpt = plan.activation_bytes(shape, micro_batch=2, seq_len=3, completion_len=2, dtype="float32",
                                 checkpointing=True, audio_clips=1, audio_positions=5)
    assert ckpt["decoder"] == 6 * (2 * 4 + 62) * 4  # each layer's input, plus one layer recomputed
    assert ckpt["encoder"] == 5 * (1 * 4 + 9 * 4 + 2 * 8) * 4


# ------------------------------------------------------------------------------------------------ verdicts
def kuberay(cfg, *shape_args):
    from sari_ray.deploy.kuberay import parse_shapes

    return plan.kuberay_capacity(cfg, plan.size_shapes(cfg, parse_shapes(list(shape_args), [])))


def test_flagship_on_todays_8_gib_object_store_is_refused_naming_the_fix():
    cfg = load_config(FLAGSHIP, ["learner.sync_backend=object_store"])  # the flagships' sync before the plan
    p = plan.build_plan(cfg, plan.load_shape(cfg.model.path), kuberay(cfg, "learner.object_store_gib=8"))
    with pytest.raises(plan.PlanError) as err:
        p.refuse_if_it_cannot_fit()
    text = str(err.value)
    assert "object store" in text and "needs 31.3 GiB of 8.00 GiB" in text
    for knob in ("learner.object_store_gib", "learner.sync_backend=collective", "rollout.max_staleness=0"):
        assert knob in text
    assert isinstance(err.value, ValueError)  # the CLI prints it as `error:` without a traceback
    shipped = load_config(FLAGSHIP)  # collective: one fresh export for a restarted or joining worker still needs room
    p = plan.build_plan(shipped, plan.load_shape(shipped.model.path), kuberay(shipped, "learner.object_store_gib=8"))
    with pytest.raises(plan.PlanError, match=r"needs 15\.6 GiB of 8\.00 GiB"):
        p.refuse_if_it_cannot_fit()


@pytest.mark.parametrize("config", [FLAGSHIP, R1AQA, str(REPO / "configs" / "sari_qwen2_5_omni_7b.yaml")])
def test_flagships_fit_their_rendered_pods(config):
    cfg = load_config(config)
    p = plan.build_plan(cfg, plan.load_shape(cfg.model.path), kuberay(cfg))
    assert not p.by_level("error"), [c.line() for c in p.by_level("error")]
    assert cfg.learner.sync_backend == "collective"  # NCCL on GPU; the object store keeps no versions
    assert p.sync["versions_kept"] == 1 and p.nodes["learner"]["object_store"] == p.sync["bytes"]


def test_tight_object_store_warns():
    cfg = load_config(FLAGSHIP)
    need = plan.build_plan(cfg, plan.load_shape(cfg.model.path), kuberay(cfg)).sync["object_store_bytes"]
    snug = kuberay(cfg, f"learner.object_store_gib={int(need / GIB) + 1}")
    p = plan.build_plan(cfg, plan.load_shape(cfg.model.path), snug)
    assert [c.level for c in p.checks if c.what.startswith("object store")] == ["warn"]
    p.refuse_if_it_cannot_fit()  # a warning does not refuse


def test_collective_keeps_one_version_and_says_it_serialises():
    cfg = load_config(FLAGSHIP, ["learner.sync_backend=collective"])
    p = plan.build_plan(cfg, plan.load_shape(cfg.model.path), kuberay(cfg, "learner.object_store_gib=20"))
    assert p.sync["versions_kept"] == 1 and not p.by_level("error")
    assert p.sync["seconds"] == pytest.approx(p.sync["bytes"] / 20e9)  # one broadcast at the assumed 20 GB/s
    assert any("serialises" in n for n in p.notes)


def test_learner_that_cannot_fit_names_the_knobs():
    cfg = load_config(FLAGSHIP, ["learner.zero_stage=0", "learner.gradient_checkpointing=false"])
    p = plan.build_plan(cfg, plan.load_shape(cfg.model.path), kuberay(cfg))
    [gpu] = [c for c in p.by_level("error") if c.what.startswith("learner GPU")]
    assert "learner.zero_stage" in gpu.fix and "learner.gradient_checkpointing=true" in gpu.fix
    # ZeRO-0 in bf16: 2 + 2 + 12 bytes per parameter, plus the reference's 2, before activations
    assert gpu.need > 18 * 8.39e9


def test_engine_budget_below_its_weights_is_an_error():
    cfg = load_config(FLAGSHIP, ["rollout.gpu_memory_utilization=0.2"])
    p = plan.build_plan(cfg, plan.load_shape(cfg.model.path), kuberay(cfg))
    assert any(c.what.startswith("vLLM GPU budget") and "rollout.gpu_memory_utilization" in c.fix
               for c in p.by_level("error"))


def test_demo_fits_this_kind_of_machine():
    cfg = load_config(DEMO)
    p = plan.build_plan(cfg, plan.model_shape(cfg), plan.machine_capacity(24 * GIB))
    assert not p.by_level("error") and not p.by_level("warn")
    host = [c for c in p.checks if c.what.startswith("host memory")][0]
    assert 4 * GIB < host.need < 6 * GIB  # measured peak PSS of the demo's tree: 4.74 GiB (docs/benchmarks.md)
    assert p.summary_line().startswith("plan: learner")


def test_capacity_of_an_attached_cluster():
    cfg = load_config(FLAGSHIP)
    nodes = [{"Alive": True, "Resources": {"CPU": 10, "learner_slot": 2, "memory": 90 * GIB,
                                           "object_store_memory": 8 * GIB, "accelerator_type:H200": 1}},
             {"Alive": True, "Resources": {"CPU": 10, "rollout_slot": 1, "memory": 40 * GIB,
                                           "object_store_memory": 8 * GIB}},
             {"Alive": False, "Resources": {"learner_slot": 1, "object_store_memory": 1}}]
    cap = plan.cluster_capacity(cfg, nodes)
    assert cap.gpu_bytes == 141 * GIB and cap.learner.actors == 2 and cap.learner.object_store_bytes == 8 * GIB
    assert cap.rollout.host_bytes == 48 * GIB
    with pytest.raises(plan.PlanError, match="object store"):
        plan.build_plan(cfg, plan.load_shape(cfg.model.path), cap).refuse_if_it_cannot_fit()


# --------------------------------------------------------------------------------------------- CLI, deploy
def test_cli_json_and_refusal(capsys):
    from sari_ray.cli import main

    assert main(["plan", DEMO, "grpo.steps=2", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["verdict"] == "ok" and figures["tokens"]["sequences"] == 16 * 8
    assert main(["plan", FLAGSHIP, "--shape", "learner.object_store_gib=8"]) == 2
    out = capsys.readouterr()
    assert "learner (per GPU)" in out.out and out.err.startswith("error: the plan does not fit")


def test_deploy_sizes_the_learner_object_store_from_the_plan():
    from sari_ray.deploy.kuberay import render_manifests

    cfg = load_config(FLAGSHIP)
    cluster = render_manifests(cfg, configs=["configs/sari_qwen2_audio_7b.yaml"])["raycluster.yaml"][0]
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    store = int(groups["learner"]["rayStartParams"]["object-store-memory"])
    need = plan.build_plan(cfg, plan.load_shape(cfg.model.path), kuberay(cfg)).sync["object_store_bytes"]
    assert need < store <= 1.25 * need + GIB
    assert int(groups["rollout"]["rayStartParams"]["object-store-memory"]) == 2 * GIB  # buckets in transit only


def test_driver_check_passes_the_demo_with_one_line_and_refuses_the_flagship_on_8_gib(tiny_qwen2_audio):
    local = [{"Alive": True, "Resources": {"CPU": 4, "rollout_slot": 1, "learner_slot": 2, "memory": 12 * GIB,
                                           "object_store_memory": 4 * GIB}}]
    said = []
    plan.check_capacity(load_config(DEMO), str(tiny_qwen2_audio), local, say=said.append)
    assert len(said) == 1 and said[0].startswith("plan: learner") and "tightest" in said[0]
    pods = [{"Alive": True, "Resources": {"learner_slot": 1, "memory": 90 * GIB, "object_store_memory": 8 * GIB}},
            {"Alive": True, "Resources": {"rollout_slot": 1, "memory": 40 * GIB, "object_store_memory": 8 * GIB}}]
    cfg = load_config(FLAGSHIP)
    with pytest.raises(plan.PlanError, match="learner.sync_backend=collective"):
        plan.check_capacity(cfg, cfg.model.path, pods, say=said.append)


def test_driver_check_only_warns_on_host_memory():
    """Ray's `memory` resource is what was free when the node started: the driver warns, it does not refuse."""
    cramped = [{"Alive": True, "Resources": {"CPU": 4, "rollout_slot": 1, "learner_slot": 2, "memory": 1 * GIB,
                                             "object_store_memory": 1 * GIB}}]
    said = []
    cfg = load_config(DEMO)
    plan.check_capacity(cfg, cfg.model.path, cramped, say=said.append)
    assert said[0].startswith("warning: host memory") and said[-1].startswith("plan: ")


def test_frozen_encoder_ships_once_and_the_first_version_may_still_be_kept():
    cfg = load_config(FLAGSHIP, ["learner.train_audio_encoder=false", "learner.sync_backend=object_store"])
    p = plan.build_plan(cfg, plan.load_shape(cfg.model.path), kuberay(cfg))
    params = plan.ModelShape().params()
    engine = sum(params.values())
    assert p.sync["first_sync_bytes"] == 2 * engine and p.sync["bytes"] == 2 * (engine - params["audio"])
    assert p.sync["object_store_bytes"] == 2 * engine + 2 * (engine - params["audio"])  # first + one newer
    assert p.model["trainable_params"] == engine - params["audio"]  # no gradients or AdamW state for it
    assert p.learner["activations_encoder"] == 0


def test_kv_cache_set_outright_must_fit_beside_the_weights():
    cfg = load_config(FLAGSHIP, ["rollout.kv_cache_memory_gb=70"])
    p = plan.build_plan(cfg, plan.load_shape(cfg.model.path), kuberay(cfg))
    [budget] = [c for c in p.checks if c.what.startswith("vLLM GPU budget")]
    assert budget.level == "error" and budget.need > 70 * GIB + 15 * GIB and budget.have == 80 * GIB


def test_the_run_says_a_collective_sync_serialises_with_asynchronous_generation():
    pods = [{"Alive": True, "Resources": {"learner_slot": 1, "memory": 90 * GIB, "object_store_memory": 40 * GIB}},
            {"Alive": True, "Resources": {"rollout_slot": 1, "memory": 40 * GIB, "object_store_memory": 8 * GIB}}]
    cfg = load_config(FLAGSHIP, ["learner.sync_backend=collective"])
    said = []
    plan.check_capacity(cfg, cfg.model.path, pods, say=said.append)
    assert said[0].startswith("plan: ") and said[1].startswith("note: collective sync") and "serialises" in said[1]
