"""`sari-ray` command line: one subcommand family per module, each registering its own parser.

Modules keep heavy imports (torch, vLLM, Ray, DeepSpeed) inside their command functions, so
`sari-ray --help` and the pure-logic commands start fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# module -> it defines register_cli(subparsers), which adds parsers with set_defaults(func=callable(args))
COMMAND_MODULES = (
    "sari_ray.models.tiny",  # model tiny
    "sari_ray.data.cli",  # data synth | validate | difficulty
    "sari_ray.mmau",  # score
    "sari_ray.train",  # train, demo
    "sari_ray.evaluate",  # eval
    "sari_ray.deploy.kuberay",  # deploy kuberay
    "sari_ray.benchmarks",  # bench learner-step
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sari-ray", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
