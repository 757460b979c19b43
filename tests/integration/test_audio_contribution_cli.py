"""`sari-ray data audio-contribution` with real vLLM: the tiny model, synthetic clips, k = 2 on 6 items."""
import json

import pytest

from sari_ray.cli import main

pytestmark = pytest.mark.integration


def test_audio_contribution_writes_one_row_per_item(tmp_path, tiny_qwen2_audio, synth_data, capsys):
    out = tmp_path / "contribution.jsonl"
    code = main(["data", "audio-contribution", "--model", str(tiny_qwen2_audio), "--data", str(synth_data),
                 "--format", "jsonl", "--out", str(out), "--k", "2", "--max-tokens", "6", "--temperature", "1.0",
                 "--limit", "6", "--no-progress"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    source = [json.loads(line)["id"] for line in synth_data.read_text().splitlines()][:6]
    assert [r["id"] for r in rows] == source  # one row per item, in the file's order
    for r in rows:
        assert set(r) == {"id", "accuracy_real", "accuracy_silent", "contribution", "k"} and r["k"] == 2
        assert r["accuracy_real"] in (0.0, 0.5, 1.0) and r["accuracy_silent"] in (0.0, 0.5, 1.0)  # of k = 2
        assert r["contribution"] == pytest.approx(r["accuracy_real"] - r["accuracy_silent"])
    assert not (tmp_path / "contribution.jsonl.partial").exists()
    printed = capsys.readouterr().out
    assert "audio contribution over 6 items (k=2 samples per mode, temperature 1)" in printed
    assert f"wrote 6 rows to {out}" in printed
