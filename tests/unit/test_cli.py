"""Every `sari-ray` command and subcommand renders its help (argparse formats help strings with %)."""
import argparse

import pytest

from sari_ray.cli import build_parser, main

pytestmark = pytest.mark.unit


def _all_parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_every_command_renders_help():
    parsers = list(_all_parsers(build_parser()))
    names = {p.prog for p in parsers}
    for command in ("train", "demo", "eval", "score", "data synth", "data difficulty", "model tiny",
                    "deploy kuberay", "bench learner-step"):
        assert f"sari-ray {command}" in names
    for parser in parsers:
        assert parser.format_help()


def test_top_level_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "train" in capsys.readouterr().out
