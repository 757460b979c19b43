"""Audio contribution without an engine: the rows, reading the file, the training-data filter in prepare_data
(the held-out set untouched), the config rule, and the CLI with a fake engine (same seeds in both modes,
silence of the same length, every check before the engine starts)."""
from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from rich.console import Console

from sari_ray import evaluate
from sari_ray.cli import main
from sari_ray.config import ConfigError, load_config
from sari_ray.data.audio import write_wav
from sari_ray.data.audio_contribution import (ContributionFileError, contribution_row, filter_by_contribution,
                                              measure_contributions, read_contributions, summarize_contributions,
                                              summary_text)
from sari_ray.data.prepare import prepare_data
from sari_ray.data.schema import AudioMCQ

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _user_errors_are_messages(monkeypatch):
    """`main(["--debug", ...])` elsewhere leaves SARI_RAY_DEBUG=1 in os.environ (user errors then raise)."""
    monkeypatch.delenv("SARI_RAY_DEBUG", raising=False)


def _sample(i: int, audio: str = "x.wav") -> AudioMCQ:
    return AudioMCQ(id=f"q{i}", audio=audio, question="High or low?", choices=["high", "low"], answer="high", tier=0)


def _write_rows(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------ rows
def test_contribution_row_and_summary():
    row = contribution_row("a", 6, 2, 8)
    assert row == {"id": "a", "accuracy_real": 0.75, "accuracy_silent": 0.25, "contribution": 0.5, "k": 8}
    with pytest.raises(ValueError, match="out of range"):
        contribution_row("a", 9, 0, 8)
    rows = [contribution_row("a", 6, 2, 8), contribution_row("b", 3, 3, 8), contribution_row("c", 0, 8, 8)]
    s = summarize_contributions(rows)
    assert s == {"n": 3, "mean_real": pytest.approx(9 / 24), "mean_silent": pytest.approx(13 / 24),
                 "mean_contribution": pytest.approx(-4 / 24), "positive": 1, "zero": 1, "negative": 1}
    text = summary_text(s, 8, 1.0)
    assert "mean accuracy real 0.375, silent 0.542" in text and "> 0: 1 items" in text
    assert summarize_contributions([])["n"] == 0 and "no items" in summary_text(summarize_contributions([]), 8, 1.0)


# ------------------------------------------------------------------------------------- reading, filter
def test_read_contributions_reads_rows_and_names_every_bad_line(tmp_path):
    good = _write_rows(tmp_path / "c.jsonl", [contribution_row("a", 1, 0, 2), "", contribution_row("b", 0, 2, 2)])
    assert read_contributions(good) == {"a": 0.5, "b": -1.0}
    bad = _write_rows(tmp_path / "bad.jsonl", [
        contribution_row("a", 1, 0, 2), "{not json", json.dumps([1, 2]), json.dumps({"id": "b"}),
        json.dumps({"id": "c", "contribution": 1.5}), json.dumps({"id": "d", "contribution": True}),
        json.dumps({"id": "a", "contribution": 0.0}), json.dumps({"id": 3, "contribution": 0.0})])
    with pytest.raises(ContributionFileError) as info:
        read_contributions(bad)
    message = str(info.value)
    assert message.startswith(f"7 malformed line(s) in {bad}")
    for line, what in [(2, "invalid JSON"), (3, "not a contribution row"), (4, "None is not a number"),
                       (5, "1.5 is not a number in [-1, 1]"), (6, "True is not a number"),
                       (7, "'a' appears twice"), (8, "not a contribution row")]:
        assert f"{bad}:{line}:" in message and what in message, (line, what, message)
    with pytest.raises(ContributionFileError, match="no contribution rows"):
        read_contributions(_write_rows(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(FileNotFoundError, match="audio-contribution file not found"):
        read_contributions(tmp_path / "nowhere.jsonl")


def test_filter_keeps_items_at_or_above_the_threshold_in_order():
    samples = [_sample(i) for i in range(5)]
    contributions = {"q0": 0.5, "q1": 0.7 - 0.2, "q2": 0.25, "q3": -0.5, "q4": 1.0, "other": 0.0}
    kept, dropped = filter_by_contribution(samples, contributions, 0.5)
    assert [s.id for s in kept] == ["q0", "q1", "q4"]  # 0.7 - 0.2 = 0.49999999999999994 passes 0.5
    assert [s.id for s in dropped] == ["q2", "q3"]
    kept, dropped = filter_by_contribution(samples, contributions, -1.0)
    assert len(kept) == 5 and not dropped


def test_filter_refuses_items_missing_from_the_file_naming_how_many_and_a_few():
    samples = [_sample(i) for i in range(12)]
    with pytest.raises(ContributionFileError) as info:
        filter_by_contribution(samples, {"q0": 1.0, "q1": 0.0}, 0.1, source="c.jsonl")
    message = str(info.value)
    assert "c.jsonl has no contribution for 10 of 12 training items" in message
    assert "'q2', 'q3', 'q4', 'q5', 'q6', ... (5 more)" in message and "sari-ray data audio-contribution" in message


# ------------------------------------------------------------------------------------ prepare_data, config
def _data(folder: Path, n: int, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_wav(folder / "tone.wav", np.full(8000, 0.1, np.float32))
    rows = [dict(id=f"{name}{i}", audio="tone.wav", question="High or low?", choices=["high", "low"],
                 answer="low", tier=i % 3) for i in range(n)]
    return _write_rows(folder / f"{name}.jsonl", rows)


def _cfg(tmp_path, *overrides):
    # tiers 0-2 in these rows; the demo itself is one tier
    return load_config(REPO / "configs" / "demo_cpu.yaml", [f"run.output_dir={tmp_path / 'run'}",
                                                            "curriculum.num_tiers=3", *overrides])


def _prepare(cfg) -> tuple[list, list, str]:
    out = io.StringIO()
    train, held_out = prepare_data(cfg, Console(file=out, width=400))
    return train, held_out, out.getvalue()


def test_prepare_filters_training_items_only_with_a_separate_eval_file(tmp_path):
    train_file, eval_file = _data(tmp_path / "d", 10, "t"), _data(tmp_path / "d", 4, "e")
    contrib = _write_rows(tmp_path / "c.jsonl", [contribution_row(f"t{i}", i % 5, 0, 4) for i in range(10)])
    base = [f"data.train={train_file}", f"data.eval={eval_file}", "data.synth_if_missing=0"]
    cfg = _cfg(tmp_path, *base, f"data.audio_contribution={contrib}", "data.min_audio_contribution=0.5")
    train, held_out, printed = _prepare(cfg)
    assert [s.id for s in train] == ["t2", "t3", "t4", "t7", "t8", "t9"]  # contribution (i % 5) / 4 >= 0.5
    assert [s.id for s in held_out] == [f"e{i}" for i in range(4)]  # not filtered, not required in the file
    assert "kept 6 of 10 training items, dropped 4; held-out set (4 items) not filtered" in printed


def test_prepare_filters_after_the_held_out_split_so_the_held_out_set_is_unchanged(tmp_path):
    train_file = _data(tmp_path / "d", 20, "t")
    base = [f"data.train={train_file}", "data.synth_if_missing=0", "data.eval_fraction=0.25"]
    plain_train, plain_held_out, _ = _prepare(_cfg(tmp_path, *base))
    # the file covers only the training part of the split: held-out items need no contribution
    contrib = _write_rows(tmp_path / "c.jsonl", [contribution_row(s.id, int(s.id[1:]) % 2, 0, 1) for s in plain_train])
    train, held_out, printed = _prepare(_cfg(tmp_path, *base, f"data.audio_contribution={contrib}",
                                             "data.min_audio_contribution=1"))
    assert [s.id for s in held_out] == [s.id for s in plain_held_out]
    assert [s.id for s in train] == [s.id for s in plain_train if int(s.id[1:]) % 2 == 1]
    assert f"kept {len(train)} of {len(plain_train)} training items" in printed


def test_prepare_errors_name_the_problem(tmp_path):
    train_file = _data(tmp_path / "d", 8, "t")
    base = [f"data.train={train_file}", "data.synth_if_missing=0", "data.eval_fraction=0.25"]
    partial = _write_rows(tmp_path / "part.jsonl", [contribution_row("t0", 1, 0, 1)])
    with pytest.raises(ConfigError, match=r"data\.audio_contribution=.*part\.jsonl has no contribution for [56] of 6 "
                                          r"training items \(ids: "):
        _prepare(_cfg(tmp_path, *base, f"data.audio_contribution={partial}", "data.min_audio_contribution=0"))
    with pytest.raises(ConfigError, match=r"data\.audio_contribution=.*nowhere\.jsonl does not exist"):
        _prepare(_cfg(tmp_path, *base, f"data.audio_contribution={tmp_path / 'nowhere.jsonl'}",
                      "data.min_audio_contribution=0"))
    none_pass = _write_rows(tmp_path / "zero.jsonl", [contribution_row(f"t{i}", 0, 0, 1) for i in range(8)])
    with pytest.raises(ConfigError, match=r"data\.min_audio_contribution=0\.5 keeps none of the 6 training items"):
        _prepare(_cfg(tmp_path, *base, f"data.audio_contribution={none_pass}", "data.min_audio_contribution=0.5"))
    malformed = _write_rows(tmp_path / "bad.jsonl", ["{"])
    with pytest.raises(ConfigError, match=r"1 malformed line\(s\) in .*bad\.jsonl"):
        _prepare(_cfg(tmp_path, *base, f"data.audio_contribution={malformed}", "data.min_audio_contribution=0"))
    # the file alone filters nothing, and says so
    train, _, printed = _prepare(_cfg(tmp_path, *base, f"data.audio_contribution={none_pass}"))
    assert len(train) == 6 and "data.min_audio_contribution is null: the training data is not filtered" in printed


def test_config_threshold_needs_the_file_and_a_range():
    demo = REPO / "configs" / "demo_cpu.yaml"
    with pytest.raises(ConfigError, match=r"data\.min_audio_contribution=0\.25 needs data\.audio_contribution.*set "
                                          r"data\.audio_contribution"):
        load_config(demo, ["data.min_audio_contribution=0.25"])
    with pytest.raises(ConfigError, match=r"config key 'data\.min_audio_contribution' = 2\.0 is invalid: use a "
                                          r"threshold in \[-1, 1\]"):
        load_config(demo, ["data.min_audio_contribution=2", "data.audio_contribution=c.jsonl"])
    cfg = load_config(demo, ["data.min_audio_contribution=-0.5", "data.audio_contribution=c.jsonl"])
    assert cfg.data.min_audio_contribution == -0.5
    defaults = load_config(demo)
    assert defaults.data.min_audio_contribution is None and defaults.data.audio_contribution is None


# ------------------------------------------------------------------------------------ fake-engine runs
class FakeProcessor:
    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>" + messages[-1]["content"][1]["text"]


class FakeEngine:
    """Child j of a request seeded s answers right when (s + j) % 4 != 0 with sound, == 0 with silence."""

    def __init__(self):
        self.calls = []
        self.shut = False

    def generate(self, prompts, audios, *, n, temperature, top_p=1.0, max_tokens, seed=None):
        self.calls.append({"prompts": list(prompts), "audios": [np.array(a) for a in audios], "seeds": list(seed),
                           "n": n, "temperature": temperature, "max_tokens": max_tokens})
        out = []
        for audio, s in zip(audios, seed):
            loud = bool(np.abs(audio).sum() > 0)
            out.append([SimpleNamespace(text="<answer>high</answer>" if ((s + j) % 4 != 0) == loud
                                        else "<answer>low</answer>", finish_reason="stop") for j in range(n)])
        return out

    def shutdown(self):
        self.shut = True


@pytest.fixture
def wav_samples(tmp_path):
    samples = []
    for i in range(5):
        path = write_wav(tmp_path / f"q{i}.wav", 0.3 * np.ones(800 + 100 * i, np.float32), 16000)
        samples.append(_sample(i, str(path)))
    return samples


@pytest.mark.parametrize("batch_size", [1, 2, 32])
def test_same_seeds_and_prompts_in_both_modes_whatever_the_batch(wav_samples, batch_size):
    engine = FakeEngine()
    rows = measure_contributions(engine, FakeProcessor(), wav_samples, style="implicit", k=4, temperature=1.0,
                                 max_tokens=7, seed=100, batch_size=batch_size, progress=False)
    assert rows == [contribution_row(f"q{i}", 3, 1, 4) for i in range(5)]  # seeds 100 + 4i: child 0 is the odd one
    seeds, audios = [], []
    for call in engine.calls:
        half = len(call["prompts"]) // 2
        assert call["prompts"][:half] == call["prompts"][half:] and call["seeds"][:half] == call["seeds"][half:]
        assert call["n"] == 4 and call["temperature"] == 1.0 and call["max_tokens"] == 7
        for real, silent in zip(call["audios"][:half], call["audios"][half:]):
            assert real.shape == silent.shape and np.abs(real).sum() > 0 and not silent.any()
        seeds += call["seeds"][:half]
        audios += [a.shape[0] for a in call["audios"][:half]]
    assert seeds == [100 + 4 * i for i in range(5)] and audios == [800 + 100 * i for i in range(5)]


def _model_dir(tmp_path) -> Path:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    return model


def test_cli_with_a_fake_engine_writes_one_row_per_item(tmp_path, monkeypatch, capsys):
    data = _data(tmp_path / "d", 6, "t")
    engine = FakeEngine()
    monkeypatch.setattr(evaluate, "load_engine", lambda *a, **kw: (engine, FakeProcessor()))
    out = tmp_path / "out" / "contrib.jsonl"
    argv = ["data", "audio-contribution", "--model", str(_model_dir(tmp_path)), "--data", str(data), "--out", str(out),
            "--k", "4", "--no-progress", "--batch-size", "4"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # the answer is "low": right exactly when the fake says "low", i.e. once of 4 with sound, 3 times silent
    assert rows == [contribution_row(f"t{i}", 1, 3, 4) for i in range(6)]
    assert engine.shut and not (out.parent / "contrib.jsonl.partial").exists()
    printed = capsys.readouterr().out
    assert "mean accuracy real 0.250, silent 0.750, contribution -0.500" in printed and "> 0: 0 items" in printed
    assert main(argv) == 2  # an existing --out is refused ...
    assert "exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0  # ... unless asked


@pytest.mark.parametrize("extra,message", [
    (["--k", "0"], "--k 0"), (["--temperature", "0"], "--temperature 0 is greedy"),
    (["--max-tokens", "0"], "--max-tokens 0"), (["--limit", "0"], "--limit 0"),
])
def test_cli_refuses_bad_arguments_before_the_engine(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.setattr(evaluate, "load_engine", lambda *a, **kw: pytest.fail("the engine must not start"))
    data = _data(tmp_path / "d", 2, "t")
    assert main(["data", "audio-contribution", "--model", str(_model_dir(tmp_path)), "--data", str(data),
                 "--out", str(tmp_path / "c.jsonl"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_checks_model_data_and_audio_before_the_engine(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "load_engine", lambda *a, **kw: pytest.fail("the engine must not start"))
    data = _data(tmp_path / "d", 3, "t")
    out = tmp_path / "c.jsonl"
    assert main(["data", "audio-contribution", "--model", str(tmp_path / "nomodel"), "--data", str(data),
                 "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "d" / "tone.wav").unlink()  # every row's clip is gone
    assert main(["data", "audio-contribution", "--model", str(_model_dir(tmp_path)), "--data", str(data),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "missing_audio: 3" in err and "t.jsonl:1: id='t0': missing_audio" in err
    assert not out.exists()
