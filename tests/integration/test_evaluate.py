"""Evaluation end to end with real vLLM on the REAL MMAU test-mini metadata (1000 items) and the tiny model.

The MMAU clips are not distributable, so each item gets a synthetic 0.5 s stand-in wav (written once per
session); what is tested is the pipeline: every item predicted, sums by task / difficulty / sub-category,
missing audio, silence mode, the checkpoint sweep with MLflow. Greedy, 16 tokens, to bound CI time; the
time for the 1000 items is printed (run with -s to see it). One vLLM engine at a time.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

MMAU_TEST_MINI = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mmau" / "mmau-test-mini.json"
MAX_TOKENS = "16"
SUBSET = 100  # items for the skip-missing / silence / sweep checks
MISSING = 3


def cli(argv: list[str]) -> int:
    from sari_ray.cli import main

    return main(argv)


@pytest.fixture(scope="session")
def mmau_audio_dir(tmp_path_factory) -> Path:
    """A stand-in `test-mini-audios/<id>.wav` for every test-mini item (0.5 s tones); --audio-dir for MMAU."""
    from sari_ray.data.audio import write_wav

    root = tmp_path_factory.mktemp("mmau-audio")
    t = np.arange(8000) / 16000
    for i, item in enumerate(json.loads(MMAU_TEST_MINI.read_text())):
        write_wav(root / item["audio_id"], 0.3 * np.sin(2 * np.pi * (200 + 20 * (i % 50)) * t), 16000)
    return root


@pytest.fixture(scope="session")
def subset_with_missing(tmp_path_factory, mmau_audio_dir) -> tuple[Path, Path, list[str]]:
    """(data json, audio dir, ids whose audio is missing): the first SUBSET items, MISSING of them without audio."""
    root = tmp_path_factory.mktemp("mmau-subset")
    items = json.loads(MMAU_TEST_MINI.read_text())[:SUBSET]
    (root / "subset.json").write_text(json.dumps(items))
    missing = [items[i]["id"] for i in (5, 50, 99)]
    for item in items:
        if item["id"] not in missing:
            dst = root / "audio" / item["audio_id"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(mmau_audio_dir / item["audio_id"])
    return root / "subset.json", root / "audio", missing


@pytest.fixture(scope="module")
def full_eval(tiny_qwen2_audio, mmau_audio_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval-full")
    t0 = time.perf_counter()
    rc = cli(["eval", "--model", str(tiny_qwen2_audio), "--data", str(MMAU_TEST_MINI), "--format", "mmau",
              "--audio-dir", str(mmau_audio_dir), "--out", str(out), "--max-tokens", MAX_TOKENS, "--style", "implicit",
              "--no-progress"])
    wall = time.perf_counter() - t0
    assert rc == 0
    meta = json.loads((out / "metrics.json").read_text())["meta"]
    print(f"\nMMAU test-mini, 1000 items, tiny Qwen2-Audio, greedy, {MAX_TOKENS} tokens: generation "
          f"{meta['elapsed_s']:.1f} s ({meta['items_per_s']:.1f} items/s); with engine start {wall:.1f} s")
    return out


def _assert_sums(metrics: dict) -> None:
    total = metrics["total"]
    for group in ("by_task", "by_difficulty", "by_sub_category"):
        assert sum(b["n"] for b in metrics[group].values()) == total["n"], group
        assert sum(b["correct"] for b in metrics[group].values()) == total["correct"], group
        assert all(len(b["ci95"]) == 2 and b["ci95"][0] <= b["accuracy"] <= b["ci95"][1]
                   for b in metrics[group].values())


def test_full_test_mini_every_item_predicted(full_eval):
    from sari_ray.mmau import read_predictions, score_predictions
    from sari_ray.data.readers import read_samples

    samples = read_samples(MMAU_TEST_MINI, format="mmau")
    preds = [json.loads(line) for line in (full_eval / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [s.id for s in samples]
    assert all({"id", "model_output", "extracted", "correct"} <= set(p) and p["model_output"] for p in preds)
    metrics = json.loads((full_eval / "metrics.json").read_text())
    assert metrics["total"]["n"] == 1000 and metrics["n_missing"] == 0 and metrics["n_skipped_missing_audio"] == 0
    assert set(metrics["by_task"]) == {"sound", "music", "speech"} and len(metrics["by_sub_category"]) >= 27
    assert metrics["revision"].startswith("v05.15.25")
    _assert_sums(metrics)
    # the same predictions through `sari-ray score`'s scorer give the same numbers
    rescored = score_predictions(samples, read_predictions(full_eval / "predictions.jsonl"))
    assert rescored["total"]["correct"] == metrics["total"]["correct"]
    report = (full_eval / "report.md").read_text()
    for heading in ("## Total", "## By task", "## By difficulty", "## By sub-category", "v05.15.25"):
        assert heading in report
    assert "| all | 1000 |" in report


def test_missing_audio_stops_before_generating(subset_with_missing, tiny_qwen2_audio, tmp_path, monkeypatch, capsys):
    import sari_ray.evaluate as evaluate

    data, audio_dir, missing = subset_with_missing
    monkeypatch.setattr(evaluate, "load_engine", lambda *a, **k: pytest.fail("an engine started"))
    rc = cli(["eval", "--model", str(tiny_qwen2_audio), "--data", str(data), "--format", "mmau",
              "--audio-dir", str(audio_dir), "--out", str(tmp_path / "out"), "--max-tokens", MAX_TOKENS])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{MISSING} of {SUBSET} audio files are missing" in err
    assert all(f"{i}.wav" in err for i in missing)  # every missing file, at once
    assert not (tmp_path / "out").exists()


def test_skip_missing_and_silence_side_by_side(subset_with_missing, tiny_qwen2_audio, tmp_path):
    """Engine-level API (as a Ray rollout actor calls it): real then silent audio, one engine, one out dir."""
    from sari_ray.evaluate import evaluate_samples, load_engine, read_eval_samples

    data, audio_dir, missing = subset_with_missing
    samples = read_eval_samples(data, "mmau", audio_dir)
    engine, processor = load_engine(tiny_qwen2_audio)
    try:
        runs = {mode: evaluate_samples(engine, processor, samples, style="implicit", max_tokens=int(MAX_TOKENS),
                                       audio_mode=mode, skip_missing=True, progress=False, out_dir=tmp_path,
                                       meta={"model": str(tiny_qwen2_audio), "data": str(data)})
                for mode in ("real", "silence")}
    finally:
        engine.shutdown()
    for metrics in runs.values():
        assert metrics["n_items"] == SUBSET and metrics["n_evaluated"] == SUBSET - MISSING
        assert metrics["n_skipped_missing_audio"] == MISSING and metrics["total"]["n"] == SUBSET - MISSING
        assert sorted(s["id"] for s in metrics["skipped"]) == sorted(missing)
        _assert_sums(metrics)
    real = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    silent = [json.loads(x) for x in (tmp_path / "predictions.silence.jsonl").read_text().splitlines()]
    assert [r["id"] for r in real] == [r["id"] for r in silent] and len(real) == SUBSET - MISSING
    assert any(r["model_output"] != s["model_output"] for r, s in zip(real, silent))  # the audio did change
    report = (tmp_path / "report.md").read_text()
    assert "real acc % [95% CI] | silence acc % [95% CI] | Δ real − silence" in report
    assert f"{MISSING} items skipped (audio file missing)" in report
    assert f"over {SUBSET - MISSING} of {SUBSET} items" in report


def _fake_run(root: Path, tiny: Path, data: Path, audio_dir: Path) -> tuple[Path, str, str]:
    """RUN_DIR as the trainer lays it out: config.yaml, two checkpoints (different weights), an MLflow run."""
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from sari_ray.config import load_config
    from sari_ray.models.tiny import build_tiny

    run_dir = root / "run"
    cfg = load_config(None, [f"model.path={tiny}", f"data.train={data}", "data.format=mmau",
                             f"data.audio_dir={audio_dir}", "data.eval_fraction=0.25", "prompt.style=implicit",
                             "grpo.max_completion_length=16", "rollout.max_model_len=1024",
                             f"run.output_dir={run_dir}"])
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweep-test", artifact_location=(root / "artifacts").as_uri())
    run_id = client.create_run(experiment, run_name="fake").info.run_id
    client.set_terminated(run_id)  # a finished run still takes the sweep's metrics
    for step, seed in ((1, None), (2, 1)):
        ckpt = run_dir / "checkpoints" / f"step_{step:06d}"
        if seed is None:
            shutil.copytree(tiny, ckpt / "model")
        else:
            build_tiny("qwen2-audio", ckpt / "model", seed=seed)
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "mlflow_run_id": run_id,
                                                             "tracking_uri": uri}))
    return run_dir, uri, run_id


def test_sweep_over_checkpoints_logs_to_mlflow(tiny_qwen2_audio, mmau_audio_dir, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    data = tmp_path / "sweep.json"
    data.write_text(json.dumps(json.loads(MMAU_TEST_MINI.read_text())[:60]))
    run_dir, uri, run_id = _fake_run(tmp_path, tiny_qwen2_audio, data, mmau_audio_dir)
    assert cli(["eval", "--run", str(run_dir), "--no-progress"]) == 0  # data: the trainer's held-out split
    sweep = run_dir / "eval_sweep"
    rows = (sweep / "sweep.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("1,") and rows[2].startswith("2,")
    assert (sweep / "accuracy_vs_step.png").stat().st_size > 5000
    for step in (1, 2):
        metrics = json.loads((sweep / f"step_{step:06d}" / "metrics.json").read_text())
        assert metrics["total"]["n"] == 15  # 25% of 60, as the trainer split it
        assert "held-out split" in metrics["meta"]["data"]
    outs = [[json.loads(x)["model_output"] for x in (sweep / f"step_{s:06d}/predictions.jsonl").read_text().splitlines()]
            for s in (1, 2)]
    assert outs[0] != outs[1]  # step 2's weights really were loaded into the engine
    client = MlflowClient(uri)
    history = client.get_metric_history(run_id, "sweep/accuracy")
    assert sorted(m.step for m in history) == [1, 2]
    assert "sweep.best_step" in client.get_run(run_id).data.tags
    assert "eval_sweep/accuracy_vs_step.png" in [a.path for a in client.list_artifacts(run_id, "eval_sweep")]
    # a second sweep reuses the evaluated checkpoints (no engine start) and logs the same numbers again
    import sari_ray.evaluate as evaluate

    monkeypatch.setattr(evaluate, "load_engine", lambda *a, **k: pytest.fail("an engine started"))
    assert cli(["eval", "--run", str(run_dir), "--no-progress"]) == 0


def test_corrupt_clip_skipped_and_run_resumed_with_a_real_engine(tiny_qwen2_audio, mmau_audio_dir, tmp_path, capsys):
    """A corrupt clip is found before the engine starts and skipped (listed by id and file); a later run with a
    larger --limit and --resume predicts only the new items and keeps the earlier predictions as they were."""
    items = json.loads(MMAU_TEST_MINI.read_text())[:24]
    (tmp_path / "data.json").write_text(json.dumps(items))
    audio = tmp_path / "audio"
    for i, item in enumerate(items):
        dst = audio / item["audio_id"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        if i == 5:
            dst.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 40)  # a header and no audio
        else:
            dst.symlink_to(mmau_audio_dir / item["audio_id"])
    bad = os.path.normpath(audio / items[5]["audio_id"])
    out = tmp_path / "out"
    argv = ["eval", "--model", str(tiny_qwen2_audio), "--data", str(tmp_path / "data.json"), "--format", "mmau",
            "--audio-dir", str(audio), "--out", str(out), "--max-tokens", MAX_TOKENS, "--style", "implicit",
            "--no-progress", "--skip-missing"]
    assert cli(argv + ["--limit", "12"]) == 0
    err = capsys.readouterr().err
    assert "skipping 1 of 12 items" in err and f"{items[5]['id']}: {bad} (cannot decode:" in err
    first = (out / "predictions.jsonl").read_text().splitlines()
    assert len(first) == 11 and items[5]["id"] not in "".join(first)

    assert cli(argv + ["--limit", "24"]) == 2  # would overwrite finished work: refused
    assert "already holds 11 predictions" in capsys.readouterr().err

    assert cli(argv + ["--limit", "24", "--resume"]) == 0
    preds = (out / "predictions.jsonl").read_text().splitlines()
    assert preds[:11] == first and [json.loads(p)["id"] for p in preds] == [x["id"] for i, x in enumerate(items) if i != 5]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["meta"]["n_resumed"] == 11 and metrics["total"]["n"] == 23 and metrics["n_items"] == 24
    assert metrics["skipped"] == [{"id": items[5]["id"], "audio": bad, "problem": "undecodable",
                                   "detail": metrics["skipped"][0]["detail"]}]
    _assert_sums(metrics)
