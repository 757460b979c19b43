"""The DeepSpeed learner where it used to go wrong quietly: metrics of a multi-iteration GRPO step, a rank-0
failure in the middle of a ZeRO-3 export / broadcast / save (the other ranks waited forever in the next
gather), and the Omni HF export (an Omni config over thinker-only weights).

Real learners on the tiny models, each rank its own process (gloo, no Ray), started with the spawn method and
bounded by deadlines: a hang fails the test instead of blocking it. One file for the single-rank and the
two-rank cases (a second `test_learner_failures.py` under tests/unit would collide with this one: the test
directories are not packages)."""
from __future__ import annotations

import json
import multiprocessing
import socket
import sys
import time
import types
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

STARTUP_S = 420  # both learners built (two DeepSpeed ranks on 2 shared cores)
FAILURE_S = 90  # from both ranks ready to both ranks having raised: a hang fails here


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(target, nprocs: int, *args) -> list:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, *args), daemon=True) for rank in range(nprocs)]
    for p in procs:
        p.start()
    return procs


def _wait_for(paths: list[Path], procs: list, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(p.is_file() for p in paths):
            return
        dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode is not None and not paths[i].is_file()]
        if dead:
            raise AssertionError(f"{what}: rank(s) {dead} exited (rank, exit code) without reporting")
        time.sleep(0.5)
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    raise AssertionError(f"{what}: rank(s) {missing} did not report within {seconds:.0f} s (hung)")


def _stop(procs: list) -> None:
    for p in procs:  # only the processes this test started
        if p.is_alive():
            p.kill()
        p.join(10)


def _records(rows, render, lengths=(3, 6, 2, 5)) -> list[dict]:
    return [{"prompt": render(rows[i % 2]), "audio": rows[i % 2]["audio"],
             "completion_ids": [20 + (i + t) % 50 for t in range(n)],
             "sampling_logprobs": [-4.0 - 0.1 * t for t in range(n)], "advantage": (-1.0) ** i * (1 + i / 4),
             "truncated": False, "weight": 1.0} for i, n in enumerate(lengths)]


def _sample_rows(synth_data, n: int = 2) -> list[dict]:
    from sari_ray.data.readers import read_samples

    return [s.to_dict() for s in read_samples(str(synth_data), "jsonl")[:n]]


# ---------------------------------------------------------------- 1. metrics of num_iterations > 1
def _grpo_iterations_rank(rank, port, model, rows, out):
    from sari_ray.data.schema import AudioMCQ
    from sari_ray.engines.learner import DeepSpeedLearner
    from sari_ray.grpo import GRPOSettings

    settings = GRPOSettings(beta=0.0, num_generations=2, num_iterations=3, epsilon=0.02, max_completion_length=8,
                            vllm_importance_sampling_correction=True)
    learner = DeepSpeedLearner(model, rank=rank, world_size=1, master_port=port, zero_stage=0, micro_batch_size=2,
                               grpo_settings=settings, device="cpu", torch_threads=1)
    per_iteration = []
    accumulate = learner._accumulate  # one iteration's optimizer step: its metrics

    def capture(*args, **kwargs):
        metrics = accumulate(*args, **kwargs)
        per_iteration.append(dict(metrics))
        return metrics

    learner._accumulate = capture
    records = _records(rows, lambda r: learner.render(AudioMCQ.from_dict(r), "implicit"))
    metrics = learner.grpo_step(records, 1e-2)  # a large step: the iterations differ
    Path(out).write_text(json.dumps({"metrics": metrics, "per_iteration": per_iteration}))


def test_grpo_metrics_are_the_mean_over_iterations(tiny_qwen2_audio, synth_data, tmp_path):
    out = tmp_path / "metrics.json"
    procs = _start(_grpo_iterations_rank, 1, _free_port(), str(tiny_qwen2_audio), _sample_rows(synth_data), str(out))
    try:
        _wait_for([out], procs, STARTUP_S, "a 3-iteration GRPO step")
    finally:
        _stop(procs)
    result = json.loads(out.read_text())
    metrics, per_iteration = result["metrics"], result["per_iteration"]
    assert len(per_iteration) == 3
    losses = [m["loss"] for m in per_iteration]
    assert max(losses) - min(losses) > 1e-6, f"the iterations should differ (else the test shows nothing): {losses}"
    clip = [m["clip_fraction"] for m in per_iteration]
    assert clip[0] == 0.0 and max(clip) > 0.0, clip  # on-policy first pass clips nothing; later ones do
    keys = set(per_iteration[0])
    assert {"loss", "grad_norm", "clip_fraction", "ratio_mean", "is_ratio_max", "entropy"} <= keys
    for key in sorted(keys, key=lambda k: (k not in ("loss", "grad_norm", "clip_fraction"), k)):
        values = [m[key] for m in per_iteration]
        expected = max(values) if key.endswith("_max") else sum(values) / len(values)
        assert metrics[f"policy/{key}"] == pytest.approx(expected, rel=1e-9, abs=1e-12), (
            f"policy/{key} = {metrics[f'policy/{key}']}, per iteration {values}")


# ---------------------------------------------------------------- 2. a rank-0 failure under ZeRO-3
class InjectedFailure(RuntimeError):
    pass


def _counting(fail_at: int, real, message: str):
    calls = [0]

    def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == fail_at:
            raise InjectedFailure(message)
        return real(*args, **kwargs)
    return call


class _FakeSyncGroup:
    """Stands in for the engines' sync group on rank 0: each broadcast completes at once."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at

    def broadcast(self, tensors, options):
        self.calls += 1
        if self.calls == self.fail_at:
            raise InjectedFailure("broadcast to the engines failed (injected)")
        return types.SimpleNamespace(wait=lambda: None)


BUCKET_BYTES = 64 * 1024  # the tiny model (~2.4 MB) in many buckets


def _operation(learner, what: str, directory: Path, fail: bool):
    """One export / save / broadcast on this rank; rank 0's sender or writer fails at its 2nd bucket if `fail`."""
    fail_at = 2 if fail and learner.rank == 0 else None
    if what == "export":  # through the actor, as the trainer calls it: ray.put per bucket on rank 0
        from sari_ray.actors.learner import LearnerActor

        stub = types.ModuleType("ray")
        stub.put = _counting(fail_at, lambda value: ("ref", len(value)), "object store refused the bucket (injected)")
        sys.modules["ray"] = stub
        actor = LearnerActor()
        actor.learner = learner
        refs, nbytes = actor.export_weight_bucket_refs(BUCKET_BYTES)
        return {"refs": len(refs), "bytes": nbytes}
    if what == "save":
        import safetensors.torch

        real = getattr(safetensors.torch.save_file, "real", safetensors.torch.save_file)
        safetensors.torch.save_file = _counting(fail_at, real, "disk full (injected)")
        safetensors.torch.save_file.real = real
        learner.save_model(str(directory), shard_bytes=BUCKET_BYTES)
        return {"files": sorted(p.name for p in directory.glob("*.safetensors"))}
    if what == "broadcast":
        if learner.rank == 0:
            learner._sync_group = _FakeSyncGroup(fail_at)
        plan = learner.weight_sync_plan(BUCKET_BYTES)
        return {"sent": learner.broadcast_weights(plan, BUCKET_BYTES), "buckets": len(plan)}
    raise ValueError(what)


def _zero3_failure_rank(rank, port, model, what, out):
    from sari_ray.engines.learner import DeepSpeedLearner
    from sari_ray.grpo import GRPOSettings

    out = Path(out)
    learner = DeepSpeedLearner(model, rank=rank, world_size=2, master_port=port, zero_stage=3, micro_batch_size=2,
                               grpo_settings=GRPOSettings(beta=0.0), device="cpu", torch_threads=1)
    (out / f"ready{rank}").write_text("")
    t0 = time.monotonic()
    try:
        first = {"returned": _operation(learner, what, out / "failed", fail=True)}
    except Exception as error:  # noqa: BLE001 - what each rank raised is the result
        first = {"raised": type(error).__name__, "message": str(error)}
    first["seconds"] = time.monotonic() - t0
    (out / f"first{rank}.json").write_text(json.dumps(first))
    deadline = time.monotonic() + FAILURE_S + 30  # idle, as a Ray actor would be, until both have reported
    while not all((out / f"first{r}.json").is_file() for r in (0, 1)):
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)
    # the ranks are still in step: the same operation then succeeds on both
    (out / f"second{rank}.json").write_text(json.dumps(_operation(learner, what, out / "saved", fail=False)))


@pytest.mark.parametrize("what", ["export", "save", "broadcast"])
def test_a_rank0_failure_mid_zero3_gather_raises_on_every_rank(what, tiny_qwen2_audio, tmp_path):
    procs = _start(_zero3_failure_rank, 2, _free_port(), str(tiny_qwen2_audio), what, str(tmp_path))
    try:
        _wait_for([tmp_path / f"ready{r}" for r in (0, 1)], procs, STARTUP_S, "learner start")
        _wait_for([tmp_path / f"first{r}.json" for r in (0, 1)], procs, FAILURE_S, f"{what} with rank 0 failing")
        first = [json.loads((tmp_path / f"first{r}.json").read_text()) for r in (0, 1)]
        assert first[0].get("raised") == "InjectedFailure", first  # rank 0: its own error, unchanged
        assert first[1].get("raised") and "rank 0" in first[1]["message"], first  # rank 1: names rank 0's failure
        _wait_for([tmp_path / f"second{r}.json" for r in (0, 1)], procs, FAILURE_S, f"{what} again")
        second = [json.loads((tmp_path / f"second{r}.json").read_text()) for r in (0, 1)]
    finally:
        _stop(procs)
    if what == "export":
        assert second[0]["refs"] > 2 and second[0]["bytes"] > 2 * 10**6 and second[1] == {"refs": 0, "bytes": 0}
    elif what == "save":
        assert len(second[0]["files"]) > 2 and (tmp_path / "saved" / "model.safetensors.index.json").is_file()
    else:
        assert second[0]["sent"] > 2 * 10**6 and second[0]["buckets"] > 2 and second[1]["sent"] == 0


# ---------------------------------------------------------------- 3. the Omni HF export
def _omni_with_talker(tiny_omni: Path, out: Path) -> Path:
    """The tiny Omni as published: audio output enabled, talker and token2wav weights beside the thinker's."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    shutil.copytree(tiny_omni, out)
    config = json.loads((out / "config.json").read_text())
    config["enable_audio_output"] = True
    config["token2wav_config"] = {  # a tiny codec (the defaults are ~300 M parameters)
        "dit_config": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, emb_dim=16,
                           num_embeds=64, look_ahead_layers=[1], look_backward_layers=[0], enc_emb_dim=16,
                           enc_dim=16, enc_channels=[16, 16, 32], enc_kernel_sizes=[3, 3, 1], enc_dilations=[1, 2, 1],
                           enc_attention_channels=8, enc_se_channels=8, block_size=4),
        "bigvgan_config": dict(upsample_initial_channel=16, resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3, 5]],
                               upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4])}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    full = Qwen2_5OmniForConditionalGeneration(Qwen2_5OmniConfig.from_pretrained(out))
    state = load_file(str(out / "model.safetensors"))
    for part in ("talker", "token2wav"):
        state.update({f"{part}.{k}": v.contiguous() for k, v in getattr(full, part).state_dict().items()})
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _save_model_rank(rank, port, model, out):
    from sari_ray.engines.learner import DeepSpeedLearner
    from sari_ray.grpo import GRPOSettings

    learner = DeepSpeedLearner(model, rank=rank, world_size=1, master_port=port, zero_stage=0, micro_batch_size=2,
                               grpo_settings=GRPOSettings(beta=0.0), device="cpu", torch_threads=1)
    learner.save_model(out)
    (Path(out) / "done").write_text("")


def _loading_info(cls, path: Path) -> dict:
    # transformers 5.19's Qwen2_5OmniForConditionalGeneration.from_pretrained breaks with output_loading_info
    # (it calls load_speakers on the returned tuple): the generic loader reports the same keys
    from transformers import PreTrainedModel

    model, info = PreTrainedModel.from_pretrained.__func__(cls, str(path), output_loading_info=True)
    return {"model": model, **{k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys")}}


def test_omni_export_loads_with_no_missing_or_unexpected_weight(tiny_qwen2_5_omni, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniThinkerForConditionalGeneration

    from sari_ray.models.policy import detect_arch

    source = _omni_with_talker(tiny_qwen2_5_omni, tmp_path / "source")
    assert _loading_info(Qwen2_5OmniForConditionalGeneration, source)["missing_keys"] == []  # a whole source
    out = tmp_path / "export"
    procs = _start(_save_model_rank, 1, _free_port(), str(source), str(out))
    try:
        _wait_for([out / "done"], procs, STARTUP_S, "save_model")
    finally:
        _stop(procs)
    config = json.loads((out / "config.json").read_text())
    # vLLM and `sari-ray eval` load the export as an Omni model (vLLM wants the Omni config's thinker_config)
    assert config["model_type"] == "qwen2_5_omni" and detect_arch(out) == "qwen2.5-omni"
    saved = load_file(str(out / "model.safetensors"))
    assert saved and all(k.startswith("thinker.") for k in saved)
    for cls in (Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniThinkerForConditionalGeneration):
        info = _loading_info(cls, out)
        assert info["missing_keys"] == [] and info["unexpected_keys"] == [], (
            cls.__name__, {k: (len(v), v[:3]) for k, v in info.items() if k != "model"})
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(out))  # the full path (speakers included)
    assert not model.has_talker
    loaded = {f"thinker.{k}": v for k, v in model.thinker.state_dict().items()}
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
