"""Curriculum tiers from the current model's pass rates (SARI: order easy -> hard by the base model's pass
rate, drop the questions it never solves).

    sari-ray data difficulty --model PATH --data FILE --out FILE.jsonl [--k 8] [--num-tiers 3] [--keep-unsolved]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def estimate_pass_rates(engine, processor, samples, *, style: str, k: int, temperature: float = 1.0,
                        max_tokens: int = 256, seed: int = 0, batch_size: int = 64) -> dict[str, float]:
    """Fraction of k sampled answers that the MMAU rule judges correct, per sample id."""
    from rich.progress import track

    from sari_ray.answers import listed_choices
    from sari_ray.data.audio import load_audio
    from sari_ray.mmau import judge
    from sari_ray.prompts import PromptStyle, build_messages, render_prompt

    rates: dict[str, float] = {}
    batches = [samples[i: i + batch_size] for i in range(0, len(samples), batch_size)]
    for batch in track(batches, description=f"pass rates (k={k})"):
        prompts = [render_prompt(build_messages(s, PromptStyle(style)), processor) for s in batch]
        audios = [load_audio(s.audio).samples for s in batch]
        outputs = engine.generate(prompts, audios, n=k, temperature=temperature, max_tokens=max_tokens, seed=seed)
        for sample, completions in zip(batch, outputs):
            rates[sample.id] = sum(judge(c.text, listed_choices(sample), sample.answer) for c in completions) / k
    return rates


def run_difficulty(args: argparse.Namespace) -> int:
    from transformers import AutoProcessor

    from sari_ray.curriculum import tiers_from_pass_rates
    from sari_ray.data.readers import read_samples, write_jsonl
    from sari_ray.data.validate import validate_samples
    from sari_ray.engines.vllm_engine import VLLMEngine

    samples = validate_samples(read_samples(args.data, args.format, args.audio_dir), source=args.data).samples
    engine = VLLMEngine(args.model, seed=args.seed, gpu_memory_utilization=args.gpu_memory_utilization)
    try:
        rates = estimate_pass_rates(engine, AutoProcessor.from_pretrained(args.model), samples, style=args.style,
                                    k=args.k, max_tokens=args.max_tokens, seed=args.seed)
    finally:
        engine.shutdown()
    tiers = tiers_from_pass_rates(rates, args.num_tiers, drop_unsolved=not args.keep_unsolved)
    kept = []
    for sample in samples:
        if sample.id in tiers:
            sample.tier = tiers[sample.id]
            sample.extra = {**sample.extra, "pass_rate": rates[sample.id]}
            kept.append(sample)
    write_jsonl(kept, args.out)
    counts = {t: sum(1 for s in kept if s.tier == t) for t in sorted(set(tiers.values()))}
    print(json.dumps({"out": str(Path(args.out)), "kept": len(kept), "dropped_unsolved": len(samples) - len(kept),
                      "per_tier": counts}, indent=1))
    return 0


def add_difficulty_parser(data_commands) -> None:
    parser = data_commands.add_parser("difficulty", help="tiers from the model's pass rates (k samples each)")
    parser.add_argument("--model", required=True, help="HF checkpoint (the base model, as SARI)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--format", default="jsonl", choices=("jsonl", "mmau", "r1aqa"))
    parser.add_argument("--audio-dir", default=None)
    parser.add_argument("--out", required=True, help="jsonl with tiers (and pass_rate in extra)")
    parser.add_argument("--k", type=int, default=8, help="samples per question")
    parser.add_argument("--num-tiers", type=int, default=3)
    parser.add_argument("--style", default="implicit", choices=("implicit", "free", "structured"))
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--keep-unsolved", action="store_true", help="keep items never solved (hardest tier)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.set_defaults(func=run_difficulty)
