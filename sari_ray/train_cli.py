"""`sari-ray train` and `sari-ray demo` (`python -m sari_ray.train` goes through the same command)."""
from __future__ import annotations

import sys
from pathlib import Path


def register_cli(subparsers) -> None:
    train = subparsers.add_parser("train", help="SFT warm-up + curriculum GRPO from YAML config(s)")
    train.add_argument("args", nargs="+", metavar="CONFIG.yaml [OVERLAY.yaml ...] [key=value ...]",
                       help="base config, optional ablation overlays, then overrides such as grpo.steps=10")
    train.set_defaults(func=lambda a: train_command(a.args))
    demo = subparsers.add_parser("demo", help="train configs/demo_cpu.yaml (tiny model, synthetic data, CPU)")
    demo.add_argument("overrides", nargs="*")
    demo.set_defaults(func=lambda a: train_command([str(demo_config_path()), *a.overrides]))


def demo_config_path() -> Path:
    return Path(__file__).resolve().parent.parent / "configs" / "demo_cpu.yaml"


def train_command(args: list[str]) -> int:
    """`CONFIG.yaml [OVERLAY.yaml ...] [key=value ...]`: files first, then overrides. A stop on a signal exits 130
    saying how to resume; user errors (config, data, files) are `sari_ray.cli.main`'s: a message, no traceback."""
    from sari_ray import train
    from sari_ray.stopping import Interrupted

    configs = [a for a in args if a.endswith((".yaml", ".yml")) and "=" not in a]
    try:
        train.run_training(configs, [a for a in args if a not in configs])
    except Interrupted as err:
        print(f"error: {err}", file=sys.stderr)
        return 130
    return 0
