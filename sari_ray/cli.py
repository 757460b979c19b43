"""`sari-ray` command line: one subcommand family per module, each registering its own parser.

Modules keep heavy imports (torch, vLLM, Ray, DeepSpeed) inside their command functions, so
`sari-ray --help` and the pure-logic commands start fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# module -> it defines register_cli(subparsers), which adds parsers with set_defaults(func=callable(args))
COMMAND_MODULES = (
    "sari_ray.models.tiny",  # model tiny
    "sari_ray.data.cli",  # data synth | validate | difficulty
    "sari_ray.mmau",  # score
    "sari_ray.train_cli",  # train, demo
    "sari_ray.ablate_cli",  # ablate (arms x seeds of train, compared with CIs)
    "sari_ray.eval_sweep",  # eval (one checkpoint via sari_ray.evaluate, or --run sweeps)
    "sari_ray.deploy.kuberay",  # deploy kuberay
    "sari_ray.benchmarks",  # bench learner-step
    "sari_ray.plan_cli",  # plan (preflight: memory, object store, sync, tokens)
    "sari_ray.gpu_check",  # check gpu
)


DEBUG_ENV = "SARI_RAY_DEBUG"  # =1: full tracebacks, as --debug
# User errors: a bad config (ConfigError), bad data (DataValidationError, DataFormatError, AudioDecodeError),
# a missing file, an unwritable output folder (OSError: FileNotFoundError, PermissionError, ...), a bad argument
# value (ValueError). All of these are ValueError or OSError; the message says what to fix, so the CLI prints it
# without a traceback and exits 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)
USER_ERROR_EXIT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sari-ray", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help=f"show full tracebacks for user errors (also: {DEBUG_ENV}=1); accepted anywhere")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command. User errors print `error: <message>` on stderr and return 2 (traceback: --debug)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    parser = build_parser()
    args, extra = parser.parse_known_args([a for a in argv if a != "--debug"])  # `sari-ray train x.yaml --debug` too
    if extra:  # argparse takes positionals in one stretch: `ablate CONFIG --out DIR k=v` leaves `k=v` over
        if not getattr(args, "trailing_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]  # the command checks each is key=value
    previous = os.environ.get(DEBUG_ENV)
    if debug:
        os.environ[DEBUG_ENV] = "1"  # commands that catch user errors themselves (train) read it too
    try:
        result = args.func(args)
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        print(f"(run with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = previous
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
