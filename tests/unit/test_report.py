"""sari_ray/report.py: the report.png every training run leaves."""
import math
import random
import subprocess
import sys

import pytest

from sari_ray.report import write_report

pytestmark = pytest.mark.unit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
AFTER_SFT = {"step": 0, "eval/accuracy": 0.48, "eval/accuracy_tier0": 0.56, "eval/accuracy_tier1": 0.40,
             "eval_silent/accuracy": 0.42, "eval_silent/accuracy_tier0": 0.44, "eval/audio_gain": 0.06}
FINAL = {"eval/accuracy": 0.71, "eval/accuracy_tier0": 0.80, "eval/accuracy_tier1": 0.62,
         "eval_silent/accuracy": 0.45, "eval_silent/accuracy_tier0": 0.47, "eval/audio_gain": 0.26}
GAIN = [{"tier": 0, "n": 100, "after_sft": 0.56, "final": 0.80, "diff": 0.24, "ci_low": 0.14, "ci_high": 0.34,
         "final_silent": 0.47},
        {"tier": 1, "n": 80, "after_sft": 0.40, "final": 0.62, "diff": 0.22, "ci_low": 0.11, "ci_high": 0.33}]
PROMOTIONS = [{"step": 22, "from_tier": 0, "to_tier": 1, "accuracies": {"0": 0.82}},
              {"step": 44, "from_tier": 1, "to_tier": 2, "accuracies": {"0": 0.9, "1": 0.8}}]


def realistic_curve(steps=60, seed=0):
    """[step, reward_mean, completions_per_s, sync_seconds, accuracy, tier]: the reward climbs within a tier
    and drops at each promotion (steps 22 and 44)."""
    rng, rows = random.Random(seed), []
    for step in range(1, steps + 1):
        tier = (step > 22) + (step > 44)
        acc = min(1.0, max(0.0, 0.3 + 0.6 * (1 - math.exp(-((step - 1) % 22) / 8)) - 0.15 * tier
                           + rng.gauss(0, 0.05)))
        rows.append([step, acc + 0.9 + rng.gauss(0, 0.05), 150 + rng.gauss(0, 10), 0.012, acc, tier])
    return rows


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 0 and data[:8] == PNG_SIGNATURE
    return data


def test_a_full_grpo_run_with_promotions_and_a_two_tier_gain(tmp_path):
    out = write_report(tmp_path / "report.png", realistic_curve(), PROMOTIONS, AFTER_SFT, FINAL, GAIN,
                       title="test run")
    assert out == tmp_path / "report.png"
    data = assert_png(out)
    assert len(data) > 20_000  # a real picture, not a blank canvas
    assert b"Software" not in data and b"matplotlib" not in data.lower()  # no version/date metadata


def test_the_same_inputs_give_the_same_bytes(tmp_path):
    args = (realistic_curve(), PROMOTIONS, AFTER_SFT, FINAL, GAIN)
    a, b = write_report(tmp_path / "a.png", *args), write_report(tmp_path / "b.png", *args)
    assert a.read_bytes() == b.read_bytes()


def test_an_sft_only_run_has_an_empty_curve(tmp_path):
    """No GRPO steps, no promotions, no gain: the evaluations as bars (and a nested output folder is made)."""
    assert_png(write_report(tmp_path / "out" / "report.png", [], [], AFTER_SFT, FINAL, []))
    assert_png(write_report(tmp_path / "bare.png", [], None, None, None, None))  # nothing at all still draws


def test_old_five_column_rows_without_accuracy(tmp_path):
    old = [[r[0], r[1], r[2], r[3], r[5]] for r in realistic_curve()]  # [step, reward, cps, sync_s, tier]
    assert_png(write_report(tmp_path / "report.png", old, PROMOTIONS, None, FINAL, []))


def test_rows_with_a_missing_accuracy_and_a_single_step(tmp_path):
    curve = realistic_curve(10)
    for row in curve[:4]:
        row[4] = None  # rows written before accuracy was recorded
    assert_png(write_report(tmp_path / "a.png", curve, [], AFTER_SFT, FINAL, GAIN[:1]))
    assert_png(write_report(tmp_path / "b.png", curve[:1], [], None, FINAL, []))


def test_the_brief_key_spelling_of_tier_accuracies(tmp_path):
    final = {"eval/accuracy": 0.6, "eval/tier_0/accuracy": 0.7, "eval/tier_1/accuracy": 0.5}
    from sari_ray.report import _tier_accuracies

    assert _tier_accuracies(final) == {0: 0.7, 1: 0.5}
    assert _tier_accuracies(FINAL, "eval_silent") == {0: 0.47}
    assert_png(write_report(tmp_path / "report.png", [], [], None, final, []))


def test_a_malformed_row_is_refused(tmp_path):
    with pytest.raises(ValueError, match="curve row"):
        write_report(tmp_path / "report.png", [[1, 0.5, 3.0]], [], None, None, None)


def test_report_imports_and_draws_without_engines(tmp_path):
    """report must import (and draw) with ray / vllm / deepspeed / mlflow / torch unimportable."""
    code = ("import sys\nfor m in ('ray', 'vllm', 'deepspeed', 'mlflow', 'torch'): sys.modules[m] = None\n"
            "from sari_ray.report import write_report\n"
            f"write_report({str(tmp_path / 'r.png')!r}, [[1, 0.5, 10.0, 0.1, 0.4, 0]], [], None, None, None)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert_png(tmp_path / "r.png")
