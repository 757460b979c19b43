"""`sari-ray eval` never throws finished work away, and fails fast on user errors (issue 12).

The engine is a fake (returned by a patched `evaluate.load_engine`), so these run in seconds; the real-engine
version of the resume path is in tests/integration/test_evaluate.py.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from sari_ray import eval_sweep, evaluate
from sari_ray.data.audio import write_wav
from sari_ray.data.schema import AudioMCQ

pytestmark = pytest.mark.unit

CHOICES = ["high pitch", "low pitch", "a dog", "a cat"]
N = 10


class Processor:
    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "<|audio_bos|><|AUDIO|><|audio_eos|>" + messages[-1]["content"][1]["text"]


class Engine:
    """Answers "high pitch"; records the items of every call; raises `fail` on call number `fail_on` (1-based)."""

    def __init__(self, fail_on: int | None = None, fail: Exception | None = None):
        self.calls: list[int] = []
        self.fail_on, self.fail = fail_on, fail or RuntimeError("engine died")
        self.shut = False

    def generate(self, prompts, audios, *, n, temperature, max_tokens, seed=None, top_p=1.0):
        self.calls.append(len(prompts))
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise self.fail
        return [[SimpleNamespace(text="<answer>high pitch</answer>", finish_reason="stop")] * n for _ in prompts]

    def shutdown(self):
        self.shut = True


@pytest.fixture
def dataset(tmp_path) -> dict:
    """N questions with real wav files (jsonl), a checkpoint-looking model dir, an out dir path."""
    rows = []
    for i in range(N):
        wav = write_wav(tmp_path / "audio" / f"q{i}.wav", 0.2 * np.sin(np.arange(1600) / (3 + i)), 16000)
        rows.append(AudioMCQ(id=f"q{i}", audio=str(wav), question=f"Question {i}?", choices=CHOICES,
                             answer=CHOICES[i % 4], task="sound").to_dict())
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return {"data": data, "model": model, "out": tmp_path / "out", "rows": rows, "root": tmp_path}


def use_engine(monkeypatch, engine: Engine | None) -> list[Engine]:
    """Patch load_engine: return `engine` (None: starting one fails the test); returns the started ones."""
    started: list[Engine] = []

    def load(*args, **kwargs):
        if engine is None:
            pytest.fail("an engine started")
        started.append(engine)
        return engine, Processor()

    monkeypatch.setattr(evaluate, "load_engine", load)
    return started


def run_eval(ds: dict, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    eval_sweep.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--model", str(ds["model"]), "--data", str(ds["data"]), "--out",
                              str(ds["out"]), "--style", "implicit", "--batch-size", "4", "--no-progress", *extra])
    return args.func(args)


def predictions(ds: dict, suffix: str = "") -> list[dict]:
    return [json.loads(x) for x in (ds["out"] / f"predictions{suffix}.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------- audio checked first
def test_corrupt_and_missing_clips_stop_before_the_engine(dataset, monkeypatch, capsys):
    Path(dataset["rows"][6]["audio"]).write_bytes(b"RIFF....WAVEfmt garbage" * 8)  # exists, does not decode
    Path(dataset["rows"][2]["audio"]).unlink()
    use_engine(monkeypatch, None)
    assert run_eval(dataset) == 2
    err = capsys.readouterr().err
    assert "1 of 10 audio files are missing and 1 audio files cannot be decoded (nothing was generated)" in err
    assert f"q2: {dataset['rows'][2]['audio']} (file not found)" in err
    assert f"q6: {dataset['rows'][6]['audio']} (cannot decode:" in err
    assert "Traceback" not in err and not dataset["out"].exists()


def test_a_clip_too_short_for_the_models_stops_before_the_engine(dataset, monkeypatch, capsys):
    """0.01 s (160 samples) makes no audio token; vLLM refused it only after the engine had started."""
    write_wav(Path(dataset["rows"][4]["audio"]), np.zeros(160), 16000)
    use_engine(monkeypatch, None)
    assert run_eval(dataset) == 2
    err = capsys.readouterr().err
    assert f"q4: {dataset['rows'][4]['audio']} (too short for the models: 160 samples" in err
    assert not dataset["out"].exists()


def test_skip_missing_skips_undecodable_clips_and_lists_them(dataset, monkeypatch, capsys):
    Path(dataset["rows"][6]["audio"]).write_bytes(b"")
    engine = Engine()
    use_engine(monkeypatch, engine)
    assert run_eval(dataset, "--skip-missing") == 0
    err = capsys.readouterr().err
    assert "skipping 1 of 10 items (audio missing or undecodable)" in err and f"q6: {dataset['rows'][6]['audio']}" in err
    assert [p["id"] for p in predictions(dataset)] == [f"q{i}" for i in range(N) if i != 6] and sum(engine.calls) == 9
    metrics = json.loads((dataset["out"] / "metrics.json").read_text())
    assert metrics["n_skipped_missing_audio"] == 1 and metrics["skipped_by_problem"] == {"undecodable": 1}
    assert metrics["skipped"][0]["id"] == "q6" and metrics["skipped"][0]["audio"] == dataset["rows"][6]["audio"]
    report = (dataset["out"] / "report.md").read_text()
    assert "1 items skipped (audio undecodable)" in report and f"`q6`: `{dataset['rows'][6]['audio']}`" in report


# ------------------------------------------------------------------------------ incremental writes and resume
def test_a_crash_keeps_finished_predictions_and_resume_continues(dataset, monkeypatch, capsys):
    use_engine(monkeypatch, Engine(fail_on=3))  # batches of 4: 8 predictions made, the third batch dies
    assert run_eval(dataset) == 1
    err = capsys.readouterr().err
    assert "evaluation stopped (RuntimeError: engine died); 8 of 10 predictions are kept in" in err
    assert "rerun the same command with --resume" in err and "Traceback" not in err
    first = predictions(dataset)
    assert [p["id"] for p in first] == [f"q{i}" for i in range(8)] and not (dataset["out"] / "metrics.json").exists()

    use_engine(monkeypatch, None)  # without --resume the finished work is not overwritten (and no engine starts)
    assert run_eval(dataset) == 2
    assert "already holds 8 predictions from an earlier run: pass --resume" in capsys.readouterr().err
    assert predictions(dataset) == first

    engine = Engine()
    use_engine(monkeypatch, engine)
    assert run_eval(dataset, "--resume") == 0
    out = capsys.readouterr()
    assert engine.calls == [2] and engine.shut  # only the 2 items not yet predicted
    preds = predictions(dataset)
    assert preds[:8] == first and [p["id"] for p in preds] == [f"q{i}" for i in range(N)]
    metrics = json.loads((dataset["out"] / "metrics.json").read_text())
    assert metrics["total"]["n"] == N and metrics["total"]["correct"] == 3 and metrics["meta"]["n_resumed"] == 8
    assert "10 items (8 resumed)" in out.out and "resume: 8 of 10 items already predicted" in out.err

    use_engine(monkeypatch, None)  # all predicted: --resume rescores without starting an engine
    assert run_eval(dataset, "--resume") == 0
    assert json.loads((dataset["out"] / "metrics.json").read_text())["total"]["n"] == N


def test_a_data_error_mid_run_is_a_user_error_with_the_resume_hint(dataset, monkeypatch, capsys):
    use_engine(monkeypatch, Engine(fail_on=2, fail=ValueError("cannot decode audio /x.wav: truncated")))
    assert run_eval(dataset) == 2
    err = capsys.readouterr().err
    assert "ValueError: cannot decode audio /x.wav: truncated); 4 of 10 predictions are kept" in err
    assert len(predictions(dataset)) == 4


def test_resume_refuses_other_settings(dataset, monkeypatch, capsys):
    use_engine(monkeypatch, Engine(fail_on=2))
    assert run_eval(dataset, "--max-tokens", "16") == 1
    capsys.readouterr()
    use_engine(monkeypatch, None)
    assert run_eval(dataset, "--resume", "--max-tokens", "32", "--samples", "2") == 2
    err = capsys.readouterr().err
    assert "was made with temperature=0.0, max_tokens=16, num_samples=1" in err
    assert "this run has temperature=1.0, max_tokens=32, num_samples=2" in err
    assert len(predictions(dataset)) == 4


def test_resume_drops_a_line_cut_off_mid_write(dataset, monkeypatch, capsys):
    use_engine(monkeypatch, Engine(fail_on=2))
    assert run_eval(dataset) == 1
    path = dataset["out"] / "predictions.jsonl"
    path.write_text(path.read_text() + '{"id": "q4", "model_out')  # killed while appending q4
    engine = Engine()
    use_engine(monkeypatch, engine)
    assert run_eval(dataset, "--resume") == 0
    assert "dropped its cut-off last line" in capsys.readouterr().err
    assert engine.calls == [4, 2] and [p["id"] for p in predictions(dataset)] == [f"q{i}" for i in range(N)]


def test_resume_reports_every_malformed_line(dataset, monkeypatch, capsys):
    use_engine(monkeypatch, Engine(fail_on=3))
    assert run_eval(dataset) == 1
    path = dataset["out"] / "predictions.jsonl"
    lines = path.read_text().splitlines()
    lines[1], lines[5] = "{oops", json.dumps({"id": "q0", "model_output": "x"})
    path.write_text("\n".join(lines) + "\n")
    use_engine(monkeypatch, None)
    assert run_eval(dataset, "--resume") == 2
    err = capsys.readouterr().err
    assert "2 malformed line(s)" in err and f"{path}:2: invalid JSON" in err and f"{path}:6: id 'q0' appears twice" in err


def test_resume_refuses_predictions_for_other_items(dataset, monkeypatch, capsys):
    use_engine(monkeypatch, Engine(fail_on=3))
    assert run_eval(dataset) == 1
    use_engine(monkeypatch, None)
    assert run_eval(dataset, "--resume", "--limit", "5") == 2  # the file holds q5..q7, not in the first 5
    assert "holds 3 ids that are not among the items to evaluate" in capsys.readouterr().err


def test_generate_predictions_keeps_the_rollout_signature(dataset):
    """sari_ray.actors.rollout calls it with exactly these keywords."""
    samples = [AudioMCQ.from_dict(r) for r in dataset["rows"][:3]]
    got = []
    records = evaluate.generate_predictions(Engine(), Processor(), samples, style="implicit", max_tokens=8,
                                            audio_mode="silence", progress=False)
    assert [r["id"] for r in records] == ["q0", "q1", "q2"] and records[0]["correct"]
    evaluate.generate_predictions(Engine(), Processor(), samples, style="implicit", max_tokens=8, audio_mode="real",
                                  progress=False, on_record=got.append)
    assert [r["id"] for r in got] == ["q0", "q1", "q2"]


# -------------------------------------------------------------------------------------------- user errors
def test_model_directory_that_does_not_exist(dataset, monkeypatch, capsys):
    use_engine(monkeypatch, None)
    missing = dataset["root"] / "runs" / "nope" / "model"
    dataset["model"] = missing
    assert run_eval(dataset) == 2
    err = capsys.readouterr().err
    assert f"model directory {missing} does not exist" in err and "Repo id" not in err
    not_a_checkpoint = dataset["root"] / "audio"
    dataset["model"] = not_a_checkpoint
    assert run_eval(dataset) == 2
    assert "has no config.json: not a Hugging Face checkpoint directory" in capsys.readouterr().err


def test_out_that_is_a_file(dataset, monkeypatch, capsys):
    use_engine(monkeypatch, None)
    dataset["out"].write_text("not a directory")
    assert run_eval(dataset) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_user_errors_end_in_seconds_without_a_traceback(dataset, tmp_path):
    """The installed command, end to end: exit 2, one clear line, no traceback, well before any engine."""
    cases = [
        (["eval", "--model", str(tmp_path / "no-model"), "--data", str(dataset["data"]), "--out", str(tmp_path / "o")],
         "does not exist"),
        (["eval", "--model", str(dataset["model"]), "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")],
         "none.jsonl"),
    ]
    for argv, message in cases:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "sari_ray.cli", *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and time.perf_counter() - t0 < 30


def test_a_sweep_continues_a_checkpoint_only_with_the_same_settings(dataset):
    """`eval_sweep` resumes a checkpoint's stopped evaluation when `resumable` says the settings match."""
    samples = [AudioMCQ.from_dict(r) for r in dataset["rows"]]
    meta = {"model": "ckpt/step_000002/model", "data": "held-out"}
    kwargs = dict(style="implicit", max_tokens=16, batch_size=4, progress=False, out_dir=dataset["out"], meta=meta)
    with pytest.raises(evaluate.EvalInterrupted) as err:
        evaluate.evaluate_samples(Engine(fail_on=2), Processor(), samples, **kwargs)
    assert err.value.kept == 4 and isinstance(err.value.cause, RuntimeError)
    same = evaluate.eval_settings(style="implicit", audio_mode="real", temperature=None, max_tokens=16, seed=0,
                                  num_samples=1, meta=meta)
    assert evaluate.resumable(dataset["out"], "real", same)
    assert not evaluate.resumable(dataset["out"], "real", {**same, "max_tokens": 32})
    assert not evaluate.resumable(dataset["out"], "silence", same)
    engine = Engine()
    m = evaluate.evaluate_samples(engine, Processor(), samples, resume=True, **kwargs)
    assert engine.calls == [4, 2] and m["total"]["n"] == N and m["meta"]["n_resumed"] == 4
