"""Evaluation statistics and the evaluate layer without an engine: Wilson CI, pass@k against brute force,
majority vote, metric sums, the report, audio replacement, missing audio, a fake-engine generation pass."""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from sari_ray import eval_stats, evaluate
from sari_ray.data.schema import AudioMCQ
from sari_ray.eval_stats import k_ladder, majority_vote, pass_at_k, render_report, summarize, wilson_interval

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------------------------------------- Wilson
def _wilson_by_inversion(c: int, n: int, z: float = eval_stats.Z95) -> tuple[float, float]:
    """Definition: the p whose score test accepts c/n, |c/n - p| <= z sqrt(p(1-p)/n), found on a fine grid."""
    grid = np.linspace(0, 1, 200_001)
    ok = np.abs(c / n - grid) <= z * np.sqrt(grid * (1 - grid) / n)
    return float(grid[ok].min()), float(grid[ok].max())


@pytest.mark.parametrize("c,n", [(0, 10), (1, 10), (5, 10), (10, 10), (81, 263), (600, 1000), (3, 20)])
def test_wilson_matches_score_test_inversion(c, n):
    lo, hi = wilson_interval(c, n)
    ref_lo, ref_hi = _wilson_by_inversion(c, n)
    assert lo == pytest.approx(ref_lo, abs=2e-5) and hi == pytest.approx(ref_hi, abs=2e-5)
    assert 0.0 <= lo <= c / n <= hi <= 1.0


def test_wilson_known_value_and_edges():
    lo, hi = wilson_interval(5, 10)  # textbook: 0.2366, 0.7634
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(600, 1000)[1] - wilson_interval(600, 1000)[0] < wilson_interval(6, 10)[1] - wilson_interval(6, 10)[0]
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


# ---------------------------------------------------------------------------------------------- pass@k
def _pass_at_k_brute(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of the n samples that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_equals_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edges_and_ladder():
    assert pass_at_k(100, 0, 10) == 0.0 and pass_at_k(100, 100, 1) == 1.0
    assert pass_at_k(100, 37, 1) == pytest.approx(0.37)
    assert 0.0 < pass_at_k(200, 1, 100) <= 1.0  # no overflow where C(200, 100) is astronomically large
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    assert k_ladder(1) == [1] and k_ladder(8) == [1, 2, 4, 8] and k_ladder(5) == [1, 2, 4, 5]


# ----------------------------------------------------------------------------------------- majority vote
CHOICES = ["high pitch", "low pitch", "a dog", "a cat"]


def test_majority_vote_maps_outputs_to_choices():
    outs = ["<answer>low pitch</answer>", "<answer>(B)</answer>", "<answer>high pitch</answer>", "B"]
    assert majority_vote(outs, CHOICES) == "low pitch"  # letters map to the choice's text


def test_majority_vote_abstentions_and_ties():
    assert majority_vote(["<answer>a cat</answer>", "I don't know", None, ""], CHOICES) == "a cat"
    assert majority_vote(["no idea", None], CHOICES) is None
    # tie: the choice named first wins, whatever the order of choices
    assert majority_vote(["a dog", "a cat", "a cat", "a dog"], CHOICES) == "a dog"
    assert majority_vote(["a cat", "a dog"], CHOICES) == "a cat"
    # naming two choices at once is ambiguous: abstains
    assert majority_vote(["a dog or a cat", "low pitch"], CHOICES) == "low pitch"


# ------------------------------------------------------------------------------------ metrics and report
def _samples(n=30):
    tasks, diffs, subs = ["sound", "music", "speech"], ["easy", "medium", "hard"], ["s1", "s2", "s3", None, "s5"]
    return [AudioMCQ(id=f"q{i}", audio=f"/nowhere/{i}.wav", question="?", choices=CHOICES, answer=CHOICES[i % 4],
                     task=tasks[i % 3], difficulty=diffs[(i // 3) % 3], sub_category=subs[i % 5]) for i in range(n)]


def _records(samples, k=1, seed=0):
    rng = np.random.default_rng(seed)
    recs = []
    for s in samples:
        outs = [f"<answer>{CHOICES[rng.integers(4)]}</answer>" for _ in range(k)]
        correct = [o == f"<answer>{s.answer}</answer>" for o in outs]
        rec = {"id": s.id, "model_output": outs[0], "extracted": outs[0][8:-9], "correct": correct[0],
               "finish_reason": "stop"}
        if k > 1:
            rec.update(outputs=outs, extracted_all=[o[8:-9] for o in outs], correct_all=correct)
        recs.append(rec)
    return recs


def test_summarize_groups_sum_to_total_and_skips_are_reported():
    samples = _samples()
    recs = _records(samples)
    skipped = [{"id": "gone1", "audio": "/x/1.wav"}, {"id": "gone2", "audio": "/x/2.wav"}]
    m = summarize(samples, recs, skipped=skipped, meta={"model": "m"})
    total = m["total"]
    assert total["n"] == 30 and total["correct"] == sum(r["correct"] for r in recs)
    for group in eval_stats.GROUPS:
        assert sum(b["n"] for b in m[group].values()) == total["n"]
        assert sum(b["correct"] for b in m[group].values()) == total["correct"]
        for b in m[group].values():
            assert b["ci95"][0] <= b["accuracy"] <= b["ci95"][1]
    assert "unknown" in m["by_sub_category"]  # None sub-category is a bucket, not dropped
    assert m["n_items"] == 32 and m["n_evaluated"] == 30 and m["n_skipped_missing_audio"] == 2
    assert m["accuracy_if_skipped_wrong"] == pytest.approx(total["correct"] / 32)
    assert json.loads(json.dumps(m)) == m  # JSON-able


def test_summarize_with_k_samples():
    samples = _samples(24)
    recs = _records(samples, k=4)
    m = summarize(samples, recs, num_samples=4)
    p1 = np.mean([sum(r["correct_all"]) / 4 for r in recs])
    assert m["pass_at_k"]["k"] == [1, 2, 4]
    assert m["pass_at_k"]["pass@1"]["total"] == pytest.approx(p1)
    assert m["pass_at_k"]["pass@4"]["total"] == pytest.approx(np.mean([any(r["correct_all"]) for r in recs]))
    by_task = m["pass_at_k"]["pass@2"]["by_task"]
    assert sum(v["n"] for v in by_task.values()) == 24
    votes = [majority_vote(r["outputs"], CHOICES) == s.answer for s, r in zip(samples, recs)]
    assert m["majority_vote"]["total"]["correct"] == sum(votes)
    assert sum(b["n"] for b in m["majority_vote"]["by_difficulty"].values()) == 24


def test_report_side_by_side_with_skips_and_sampling():
    samples = _samples()
    real = summarize(samples, _records(samples, seed=1), meta={"model": "ckpt", "temperature": 0.0})
    silent = summarize(samples[:28], _records(samples[:28], seed=2), skipped=[{"id": "q28", "audio": "a"},
                       {"id": "q29", "audio": "b"}], meta={"model": "ckpt", "temperature": 0.0})
    sampled = summarize(samples, _records(samples, k=4), num_samples=4, meta={"temperature": 1.0})
    text = render_report({"silence": silent, "real": real, "noise": sampled})
    for heading in ("## Total", "## By task", "## By difficulty", "## By sub-category", "## Sampling (noise"):
        assert heading in text
    assert "real acc % [95% CI] | silence acc % [95% CI] | noise acc % [95% CI] | Δ real − silence" in text
    assert "2 items skipped (audio file missing)" in text and "over 28 of 30 items" in text
    delta = 100 * (real["total"]["accuracy"] - silent["total"]["accuracy"])
    assert f"{delta:+.1f}" in text
    assert "pass@4" in text and "majority vote" in text


# ------------------------------------------------------------------------------------------------ audio
def test_replace_audio_modes():
    x = np.sin(np.linspace(0, 200, 8000)).astype(np.float32) * 0.3
    assert evaluate.replace_audio(x, "real", "a") is x
    s = evaluate.replace_audio(x, "silence", "a")
    assert s.shape == x.shape and s.dtype == np.float32 and not s.any()
    n1, n2 = evaluate.replace_audio(x, "noise", "a"), evaluate.replace_audio(x, "noise", "a")
    assert n1.shape == x.shape and np.array_equal(n1, n2)  # seeded by id: reruns identical
    assert np.sqrt(np.mean(n1 ** 2)) == pytest.approx(np.sqrt(np.mean(x ** 2)), rel=0.1)
    assert not np.array_equal(n1, evaluate.replace_audio(x, "noise", "b"))
    with pytest.raises(ValueError, match="valid: real, silence, noise"):
        evaluate.replace_audio(x, "mute", "a")


def test_missing_audio_lists_every_file_or_skips(tmp_path):
    from sari_ray.data.audio import write_wav

    samples = _samples(6)
    for s in samples[::2]:
        s.audio = str(write_wav(tmp_path / f"{s.id}.wav", 0.1 * np.ones(800, np.float32), 16000))
    with pytest.raises(evaluate.AudioCheckError) as err:
        evaluate.split_missing(samples, skip_missing=False)
    assert [i for i, _ in err.value.missing] == ["q1", "q3", "q5"] and err.value.undecodable == []
    assert all(f"/nowhere/{i}.wav" in str(err.value) for i in (1, 3, 5)) and "3 of 6" in str(err.value)
    present, skipped = evaluate.split_missing(samples, skip_missing=True)
    assert [s.id for s in present] == ["q0", "q2", "q4"] and [d["id"] for d in skipped] == ["q1", "q3", "q5"]
    assert {d["problem"] for d in skipped} == {"missing"}


def test_undecodable_audio_is_found_before_generating(tmp_path):
    """A clip that exists but does not decode (empty, garbage) is caught by the check, not mid-run."""
    from sari_ray.data.audio import write_wav

    samples = _samples(4)
    for s in samples:
        s.audio = str(write_wav(tmp_path / f"{s.id}.wav", 0.1 * np.ones(800, np.float32), 16000))
    Path(samples[1].audio).write_bytes(b"")
    Path(samples[3].audio).write_bytes(b"RIFF\x00\x01garbage, not a wav file" * 10)
    with pytest.raises(evaluate.AudioCheckError) as err:
        evaluate.split_missing(samples, skip_missing=False)
    assert [u[0] for u in err.value.undecodable] == ["q1", "q3"] and err.value.missing == []
    assert "2 of 4 audio files cannot be decoded" in str(err.value)
    assert samples[1].audio in str(err.value) and samples[3].audio in str(err.value)
    present, skipped = evaluate.split_missing(samples, skip_missing=True)
    assert [s.id for s in present] == ["q0", "q2"]
    assert [(d["id"], d["audio"], d["problem"]) for d in skipped] == [
        ("q1", samples[1].audio, "undecodable"), ("q3", samples[3].audio, "undecodable")]
    Path(samples[3].audio).unlink()  # a file changed on disk is checked again, not taken from the cache
    with pytest.raises(evaluate.AudioCheckError) as err:
        evaluate.split_missing(samples, skip_missing=False)
    assert err.value.missing == [("q3", samples[3].audio)] and "are missing and 1 audio files cannot" in str(err.value)


# --------------------------------------------------------------------------------- fake-engine generation
class FakeProcessor:
    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>" + messages[-1]["content"][1]["text"]


class FakeEngine:
    """Answers the loudest-clip rule: sum of |audio| > 0 -> the first choice's text, else option (B)."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, audios, *, n, temperature, top_p=1.0, max_tokens, seed=None):
        self.calls.append((len(prompts), [a.shape for a in audios], n, temperature))
        out = []
        for a in audios:
            text = "<answer>high pitch</answer>" if np.abs(a).sum() > 0 else "<answer>(B)</answer>"
            out.append([SimpleNamespace(text=text, finish_reason="stop", token_ids=[1]) for _ in range(n)])
        return out


@pytest.fixture
def wav_samples(tmp_path):
    from sari_ray.data.audio import write_wav

    samples = _samples(10)
    for s in samples:
        s.audio = str(write_wav(tmp_path / f"{s.id}.wav", 0.3 * np.ones(800, np.float32), 16000))
    return samples


def test_generate_and_evaluate_with_fake_engine(wav_samples, tmp_path):
    engine = FakeEngine()
    m = evaluate.evaluate_samples(engine, FakeProcessor(), wav_samples, style="implicit", batch_size=4,
                                  progress=False, out_dir=tmp_path / "out", meta={"model": "fake"})
    assert [c[0] for c in engine.calls] == [4, 4, 2] and engine.calls[0][3] == 0.0  # batches, greedy
    assert m["total"]["correct"] == sum(s.answer == "high pitch" for s in wav_samples)
    silent = evaluate.evaluate_samples(engine, FakeProcessor(), wav_samples, style="implicit", audio_mode="silence",
                                       num_samples=3, progress=False, out_dir=tmp_path / "out")
    assert engine.calls[-1][2:] == (3, 1.0) and engine.calls[-1][1][0] == (800,)  # same duration, sampled
    assert silent["total"]["correct"] == sum(s.answer == "low pitch" for s in wav_samples)  # (B) -> low pitch
    preds = [json.loads(x) for x in (tmp_path / "out/predictions.silence.jsonl").read_text().splitlines()]
    assert preds[0]["extracted"] == "low pitch" and len(preds[0]["outputs"]) == 3
    assert {"id", "model_output", "extracted", "correct"} <= set(preds[0])
    report = (tmp_path / "out/report.md").read_text()
    assert "real acc" in report and "silence acc" in report and (tmp_path / "out/metrics.json").is_file()


def _eval_parser():
    from sari_ray import eval_sweep  # owns the `eval` command line (evaluate must not import it)

    parser = argparse.ArgumentParser()
    eval_sweep.register_cli(parser.add_subparsers(dest="command"))
    return parser


def test_cli_missing_audio_stops_before_engine(wav_samples, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data.jsonl"
    rows = [s.to_dict() for s in wav_samples]
    rows[3]["audio"] = str(tmp_path / "missing_a.wav")
    rows[7]["audio"] = str(tmp_path / "missing_b.wav")
    data.write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.setattr(evaluate, "load_engine", lambda *a, **k: pytest.fail("engine started"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    args = _eval_parser().parse_args(["eval", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "o")])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "2 of 10 audio files are missing" in err and "missing_a.wav" in err and "missing_b.wav" in err
    assert not (tmp_path / "o").exists()


def test_sweep_table_and_plot(tmp_path):
    from sari_ray.eval_sweep import write_sweep

    rows = [{"step": s, "accuracy": a, "ci_low": a - 0.05, "ci_high": a + 0.05, "correct": int(a * 100), "n": 100,
             "n_skipped": 0, "n_no_answer": 0, "acc_sound": a} for s, a in ((10, 0.4), (20, 0.6), (30, 0.6), (40, 0.57))]
    best = write_sweep(rows, tmp_path)
    assert best["step"] == 20  # ties go to the earlier checkpoint
    assert [r["within_best_ci"] for r in rows] == [False, True, True, True]
    assert (tmp_path / "accuracy_vs_step.png").stat().st_size > 5000
    assert len((tmp_path / "sweep.csv").read_text().splitlines()) == 5 and "**best**" in (tmp_path / "sweep.md").read_text()


def test_imports_without_heavy_packages():
    code = ("import sys\nfor m in ('ray', 'vllm', 'deepspeed', 'mlflow', 'torch', 'transformers'): sys.modules[m] = None\n"
            "import sari_ray.eval_stats, sari_ray.evaluate, sari_ray.eval_sweep\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("argv,message", [
    (["--run", "r", "--model", "m"], "drop --model / --out"),
    (["--model", "m", "--data", "d"], "give --model, --data and --out"),
    (["--model", "m", "--data", "d", "--out", "o", "--samples", "0"], "--samples must be >= 1"),
    (["--run", "r", "--resume"], "drop --resume"),
])
def test_cli_usage_errors(argv, message, capsys):
    args = _eval_parser().parse_args(["eval", *argv])
    assert args.func(args) == 2 and message in capsys.readouterr().err
