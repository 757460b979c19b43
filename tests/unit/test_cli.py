"""Every `sari-ray` command and subcommand renders its help (argparse formats help strings with %); user errors
print one message and exit 2, without a traceback unless asked."""
import argparse
import json
from pathlib import Path

import numpy as np
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


# ---- user errors: `error: <message>`, exit 2, no traceback (unless --debug / SARI_RAY_DEBUG=1) ----------

REPO = Path(__file__).resolve().parents[2]


def _fails_cleanly(capsys, argv, *expected):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and "Traceback" not in captured.err + captured.out, captured.err
    for text in expected:
        assert text in captured.err, captured.err
    return captured.err


def _train(tmp_path, *overrides):
    return ["train", str(REPO / "configs" / "demo_cpu.yaml"), f"run.output_dir={tmp_path / 'run'}", *overrides]


def _broken_rows(tmp_path) -> Path:
    from sari_ray.data.audio import write_wav

    write_wav(tmp_path / "tone.wav", np.full(8000, 0.1, np.float32))
    rows = [dict(id=f"r{i}", audio="tone.wav", question="High or low?", choices=["high", "low"], answer="low", tier=0)
            for i in range(8)]
    rows[2]["answer"], rows[5]["choices"] = "medium", ["low"]
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_bad_cli_argument_is_a_message(tmp_path, capsys):
    err = _fails_cleanly(capsys, ["data", "synth", "--out", str(tmp_path / "s"), "--n", "4", "--num-tiers", "0"],
                         "tiers must be in 1..3")
    assert err.splitlines()[-1] == "(run with --debug or SARI_RAY_DEBUG=1 for the traceback)"
    assert not (tmp_path / "s").exists()  # checked before anything is written
    _fails_cleanly(capsys, ["data", "validate", "--data", str(tmp_path / "nope.jsonl"), "--num-tiers", "0"],
                   "data file not found")


def test_debug_flag_and_env_show_the_traceback(tmp_path, capsys, monkeypatch):
    argv = ["data", "synth", "--out", str(tmp_path / "s"), "--n", "4", "--tiers", "0"]
    with pytest.raises(ValueError, match="tiers must be in 1..3"):
        main(["--debug", *argv])
    with pytest.raises(ValueError, match="tiers must be in 1..3"):
        main([*argv, "--debug"])  # accepted after the command too
    monkeypatch.setenv("SARI_RAY_DEBUG", "1")
    with pytest.raises(ValueError, match="tiers must be in 1..3"):
        main(argv)
    monkeypatch.setenv("SARI_RAY_DEBUG", "0")
    assert main(argv) == 2


def test_unwritable_output_folder_is_a_message(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _fails_cleanly(capsys, ["data", "synth", "--out", str(blocker / "out"), "--n", "2"], "a-file")


def test_train_with_broken_rows_prints_the_list_only(tmp_path, capsys):
    err = _fails_cleanly(capsys, _train(tmp_path, f"data.train={_broken_rows(tmp_path)}"),
                         "broken.jsonl:3: id='r2': answer_not_in_choices", "broken.jsonl:6: id='r5': too_few_choices")
    assert len(err.splitlines()) < 12


def test_train_skip_with_only_malformed_lines_is_a_message(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_bytes(b'{"id": 1}\n{not json\n\xff\n')
    _fails_cleanly(capsys, _train(tmp_path, f"data.train={tmp_path / 'd.jsonl'}", "data.invalid_rows=skip"),
                   "no valid training samples")


def test_train_with_a_mistyped_path_writes_nothing(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("")
    _fails_cleanly(capsys, _train(tmp_path, f"data.train={tmp_path / 'data' / 'trian.jsonl'}"), "does not exist")
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["train.jsonl"]


def test_train_into_an_unwritable_output_folder_is_a_message(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    _fails_cleanly(capsys, ["train", str(REPO / "configs" / "demo_cpu.yaml"),
                            f"run.output_dir={tmp_path / 'a-file' / 'run'}", f"data.train={_broken_rows(tmp_path)}"],
                   "a-file")
