"""Benchmarks that print figures (not timed tests).

    sari-ray bench learner-step --shape 7b --device cuda --batch 16 --num-generations 8 --completion-len 256

A learner-only GRPO step (the engine layer, no Ray, one device) on a randomly initialised model of the chosen
shape: the completion log-prob forward of `sari_ray.models.policy` (each clip encoded once per prompt), the
clipped GRPO loss of `sari_ray.grpo`, backward and an AdamW step. Prints tokens/s and model FLOPs utilisation
(MFU = model FLOPs per second / the device's peak; FLOPs counted as 6 * params * tokens for the decoder plus
the causal attention term, and 6 * encoder params * encoder frames for the audio tower).
"""
from __future__ import annotations

import argparse
import json
import time

SHAPES = {
    # Qwen2-Audio-7B-Instruct: Qwen-7B decoder + Whisper-large-v3-sized audio encoder.
    "7b": dict(text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=156032, max_position_embeddings=8192),
               audio=dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                          num_mel_bins=128, max_source_positions=1500)),
    # Same code path on CPU in seconds (a test runs it).
    "tiny": dict(text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=1024, max_position_embeddings=4096),
                 audio=dict(d_model=64, encoder_layers=2, encoder_attention_heads=1, encoder_ffn_dim=128,
                            num_mel_bins=128, max_source_positions=1500)),
}
AUDIO_TOKEN_ID = 151646  # Qwen2-Audio's <|AUDIO|>; kept inside the vocab for the tiny shape below


def build_random_model(shape: str, dtype, device):
    import torch
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    spec = SHAPES[shape]
    audio_token = AUDIO_TOKEN_ID if spec["text"]["vocab_size"] > AUDIO_TOKEN_ID else spec["text"]["vocab_size"] - 1
    config = Qwen2AudioConfig(audio_config={**spec["audio"], "model_type": "qwen2_audio_encoder"},
                              text_config={**spec["text"], "model_type": "qwen2"}, audio_token_id=audio_token)
    config.text_config.head_dim = spec["text"]["hidden_size"] // spec["text"]["num_attention_heads"]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2AudioForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model, config


def synthetic_batch(config, *, prompts: int, num_generations: int, prompt_text_len: int, completion_len: int,
                    audio_seconds: float, device):
    """A GRPO batch in the layout `policy.build_batch` produces: `prompts` clips, G completions each."""
    import torch

    frames = 3000  # Qwen2-Audio's feature extractor pads every clip to 30 s
    valid = int(audio_seconds * 100)
    audio_tokens = ((valid - 1) // 2 + 1 - 2) // 2 + 1
    rows = prompts * num_generations
    P = prompt_text_len + audio_tokens
    vocab = config.text_config.vocab_size
    text = torch.randint(0, min(vocab, 150000) - 1, (rows, P + completion_len), device=device)
    text[:, prompt_text_len // 2: prompt_text_len // 2 + audio_tokens] = config.audio_token_id
    features = torch.randn(prompts, config.audio_config.num_mel_bins, frames, device=device)
    feature_mask = torch.zeros(prompts, frames, dtype=torch.long, device=device)
    feature_mask[:, :valid] = 1
    return {
        "input_ids": text, "attention_mask": torch.ones_like(text),
        "completion_ids": text[:, P:], "completion_mask": torch.ones(rows, completion_len, dtype=torch.bool, device=device),
        "logits_slice": (P - 1, P - 1 + completion_len), "input_features": features,
        "feature_attention_mask": feature_mask,
        "audio_index": torch.arange(prompts, device=device).repeat_interleave(num_generations),
    }, {"rows": rows, "seq_len": P + completion_len, "audio_frames": valid // 2}


def model_flops(config, audio_params: int, decoder_params: int, info: dict, prompts: int) -> float:
    t = config.text_config
    tokens = info["rows"] * info["seq_len"]
    decoder = 6 * decoder_params * tokens + 6 * t.num_hidden_layers * t.hidden_size * info["seq_len"] * tokens
    encoder = 6 * audio_params * prompts * 1500  # the encoder runs over the padded 30 s window
    return float(decoder + encoder)


def learner_step_benchmark(shape="tiny", device="cpu", dtype="bfloat16", prompts=2, num_generations=8,
                           prompt_text_len=64, completion_len=256, audio_seconds=10.0, steps=3, warmup=1,
                           gradient_checkpointing=False, peak_tflops=989.0) -> dict:
    import torch

    from sari_ray import grpo
    from sari_ray.models.policy import completion_logprobs

    torch_dtype = getattr(torch, dtype)
    model, config = build_random_model(shape, torch_dtype, device)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    audio_params = sum(p.numel() for n, p in model.named_parameters() if "audio_tower" in n)
    decoder_params = sum(p.numel() for n, p in model.named_parameters() if "audio_tower" not in n)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
    batch, info = synthetic_batch(config, prompts=prompts, num_generations=num_generations,
                                  prompt_text_len=prompt_text_len, completion_len=completion_len,
                                  audio_seconds=audio_seconds, device=device)
    advantages = torch.randn(info["rows"], device=device)

    def step():
        logprobs, _ = completion_logprobs(model, batch)
        loss, _ = grpo.policy_loss(logprobs, None, advantages, batch["completion_mask"].float(), loss_type="grpo")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    flops = model_flops(config, audio_params, decoder_params, info, prompts)
    result = {
        "shape": shape, "device": device, "dtype": dtype, "params": audio_params + decoder_params,
        "rows": info["rows"], "seq_len": info["seq_len"], "seconds_per_step": seconds,
        "tokens_per_s": info["rows"] * info["seq_len"] / seconds,
        "completion_tokens_per_s": info["rows"] * completion_len / seconds,
        "model_tflops_per_s": flops / seconds / 1e12, "mfu": flops / seconds / (peak_tflops * 1e12),
        "peak_tflops": peak_tflops,
    }
    if device.startswith("cuda"):
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["gpu"] = torch.cuda.get_device_name()
    return result


def register_cli(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks that print figures")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    step = kinds.add_parser("learner-step", help="learner-only GRPO step on a random model (tokens/s, MFU)")
    step.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    step.add_argument("--device", default="cuda")
    step.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    step.add_argument("--prompts", type=int, default=2, help="distinct clips per step")
    step.add_argument("--num-generations", type=int, default=8)
    step.add_argument("--prompt-text-len", type=int, default=64)
    step.add_argument("--completion-len", type=int, default=256)
    step.add_argument("--audio-seconds", type=float, default=10.0)
    step.add_argument("--steps", type=int, default=3)
    step.add_argument("--warmup", type=int, default=1)
    step.add_argument("--gradient-checkpointing", action="store_true")
    step.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    step.set_defaults(func=_run_learner_step)


def _run_learner_step(args: argparse.Namespace) -> int:
    result = learner_step_benchmark(
        shape=args.shape, device=args.device, dtype=args.dtype, prompts=args.prompts,
        num_generations=args.num_generations, prompt_text_len=args.prompt_text_len,
        completion_len=args.completion_len, audio_seconds=args.audio_seconds, steps=args.steps, warmup=args.warmup,
        gradient_checkpointing=args.gradient_checkpointing, peak_tflops=args.peak_tflops)
    print(json.dumps(result, indent=1))
    return 0
