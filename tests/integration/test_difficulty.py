"""`sari-ray data difficulty`: pass rates from the model's own samples (real vLLM), tiers easy -> hard."""
import json

import pytest

from sari_ray.cli import main

pytestmark = pytest.mark.integration


def test_difficulty_writes_tiers_ordered_by_pass_rate(tmp_path, tiny_qwen2_audio, synth_data):
    out = tmp_path / "tiered.jsonl"
    code = main(["data", "difficulty", "--model", str(tiny_qwen2_audio), "--data", str(synth_data), "--out", str(out),
                 "--k", "4", "--num-tiers", "3", "--max-tokens", "6", "--keep-unsolved"])
    assert code == 0
    rows = [json.loads(line) for line in out.open()]
    source = [json.loads(line) for line in synth_data.open()]
    assert [r["id"] for r in rows] == [r["id"] for r in source]  # --keep-unsolved keeps every question
    rates = {r["id"]: r["extra"]["pass_rate"] for r in rows}
    assert all(rate in (0.0, 0.25, 0.5, 0.75, 1.0) for rate in rates.values())  # k = 4 samples each
    for a in rows:
        for b in rows:
            if rates[a["id"]] > rates[b["id"]]:
                assert a["tier"] <= b["tier"], "an easier question (higher pass rate) must not sit in a harder tier"
