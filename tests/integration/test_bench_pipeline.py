"""`sari-ray bench pipeline --json` as a user runs it, shortened: both runs (synchronous, then asynchronous) on real
Ray, vLLM and DeepSpeed, and the one JSON object its last line promises. Figures only, no timing asserted (the
README and the issue notes carry the measured ones)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_bench_pipeline_json_reports_both_modes(tmp_path, tiny_qwen2_audio, synth_data):
    cmd = [str(Path(sys.executable).parent / "sari-ray"), "bench", "pipeline", "--steps", "3", "--warmup", "1",
           "--json", "--workdir", str(tmp_path), f"model.path={tiny_qwen2_audio}", f"data.train={synth_data}",
           "curriculum.num_tiers=3"]  # synth_data has tiers 0-2
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    assert set(result) == {"sync", "async", "speedup", "encoder_forwards_per_clip_per_pass"}
    for mode in ("sync", "async"):
        r = result[mode]
        assert r["steps"] == 2  # 3 steps, the first left out
        assert r["completions_per_s"] > 0 and r["tokens_per_s"] > 0 and r["step_s"] > 0
        assert {"learn", "rollout", "rollout_generate", "sync", "step"} <= r["phases"].keys()
        assert 0 < r["rollout_busy_frac"] <= 1 and 0 < r["learner_busy_frac"] <= 1
        assert r["peak_pss_gib"] > 0.5  # a Ray cluster with a vLLM engine and a DeepSpeed learner
    assert result["speedup"] == pytest.approx(result["sync"]["step_s"] / result["async"]["step_s"])
    assert result["encoder_forwards_per_clip_per_pass"] == 1.0
    assert "speedup" in proc.stdout and "peak memory" in proc.stdout  # the human-readable lines
