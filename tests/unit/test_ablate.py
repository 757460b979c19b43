"""`sari-ray ablate`: the statistics (sari_ray/ablation.py) against hand-computed cases, the skip / resume logic on
fake run directories (training replaced by a fake), and the argument errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sari_ray import ablate_cli, ablation
from sari_ray.ablation import (auc_window, curve_auc, mean_ci, median_steps, paired_to_first, steps_to_threshold,
                               summarize, t_quantile)
from sari_ray.cli import main
from sari_ray.eval_stats import paired_difference

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo_cpu.yaml")
SHUFFLED = str(REPO / "configs" / "ablations" / "shuffled.yaml")


# ------------------------------------------------------------------------------------------------ intervals
@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622),
                                          (30, 2.0423), (1000, 1.9623)])
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


def test_t_quantile_refuses_nonsense():
    with pytest.raises(ValueError, match="df >= 1"):
        t_quantile(0.975, 0)


def test_mean_ci_by_hand():
    # mean 2, sd 1, se 1/sqrt(3), t(0.975, 2) = 4.302653: half-width 2.484138
    m = mean_ci([1.0, 2.0, 3.0])
    assert m["mean"] == 2.0 and m["n"] == 3
    assert m["ci_low"] == pytest.approx(2 - 2.484138, abs=1e-6) and m["ci_high"] == pytest.approx(2 + 2.484138, abs=1e-6)
    # an accuracy's interval is cut to [0, 1]: 0.6, 0.8, 1.0 -> 0.8 +- 0.4968275
    acc = mean_ci([0.6, 0.8, 1.0], bounds=(0.0, 1.0))
    assert acc["ci_low"] == pytest.approx(0.8 - 0.4968275, abs=1e-6) and acc["ci_high"] == 1.0
    one = mean_ci([0.7])
    assert one["mean"] == 0.7 and one["ci_low"] is None and one["ci_high"] is None
    same = mean_ci([0.5, 0.5])
    assert same["ci_low"] == same["ci_high"] == 0.5
    with pytest.raises(ValueError, match="no values"):
        mean_ci([])


# --------------------------------------------------------------------------------------------------- curves
def test_auc_is_the_mean_accuracy_under_the_trapezoids():
    assert curve_auc([(0, 0.5), (10, 1.0)], 0, 10) == pytest.approx(0.75)
    assert curve_auc([(0, 0.5), (10, 1.0)], 5, 10) == pytest.approx(0.875)  # interpolated 0.75 at step 5
    assert curve_auc([(0, 0.0), (2, 1.0), (4, 1.0)], 0, 4) == pytest.approx(0.75)  # (1 + 2) / 4
    assert curve_auc([(0, 0.2), (5, 0.4), (10, 0.9)], 5, 5) == pytest.approx(0.4)  # a one-step window: the value
    with pytest.raises(ValueError, match="not within"):
        curve_auc([(5, 0.5), (10, 1.0)], 0, 10)


def test_auc_window_is_the_stretch_every_run_evaluated():
    assert auc_window([[(0, 0.5), (10, 0.6), (20, 0.7)], [(5, 0.5), (15, 0.9)]]) == (5, 15)
    with pytest.raises(ValueError, match="do not overlap"):
        auc_window([[(0, 0.5), (4, 0.6)], [(5, 0.5), (15, 0.9)]])


def test_steps_to_threshold_and_the_median_over_seeds():
    points = [(0, 0.5), (5, 0.79), (10, 0.8), (15, 0.9)]
    assert steps_to_threshold(points, 0.8) == 10
    assert steps_to_threshold(points, 0.95) is None
    assert steps_to_threshold(points, 0.5) == 0
    assert median_steps([5, None, 10]) == 10  # never reaching counts as later than every other seed
    assert median_steps([5, None, None]) is None
    assert median_steps([4, 6]) == 5
    assert median_steps([4, None]) is None


# ------------------------------------------------------------------------------------------ fake runs, summary
def fake_run(final_by_tier: dict[int, float], curve: list[tuple[int, dict[int, float]]], items: dict[str, bool],
             tiers: dict[str, int]) -> dict:
    """A held_out.json: accuracies per tier (overall: their mean), a curve of (step, per-tier accuracies)."""
    def metrics(by_tier):
        return {"eval/accuracy": sum(by_tier.values()) / len(by_tier),
                **{f"eval/accuracy_tier{t}": v for t, v in by_tier.items()}}
    return {"curve": [{"step": s, **metrics(acc)} for s, acc in curve], "final": metrics(final_by_tier),
            "items": items, "tiers": tiers}


TIERS = {"a": 0, "b": 0, "c": 1, "d": 1}


def test_paired_difference_by_seed_and_item_by_hand():
    first = {0: {"items": dict(zip("abcd", [1, 0, 0, 1])), "tiers": TIERS},
             1: {"items": dict(zip("abcd", [1, 1, 0, 0])), "tiers": TIERS}}
    other = {0: {"items": dict(zip("abcd", [1, 1, 0, 1])), "tiers": TIERS},
             1: {"items": dict(zip("abcd", [1, 1, 1, 1])), "tiers": TIERS},
             2: {"items": dict(zip("abcd", [0, 0, 0, 0])), "tiers": TIERS}}  # seed 2: no partner, left out
    d = paired_to_first(first, other, None)
    assert d["n_seeds"] == 2 and d["per_seed"] == {"0": 0.25, "1": 0.5}
    assert d["diff"] == pytest.approx(0.375)
    half = 12.706205 * math.sqrt(0.03125) / math.sqrt(2)  # t(0.975, 1) * sd / sqrt(n): 1.588, cut to [-1, 1]
    assert d["ci_low"] == pytest.approx(max(-1.0, 0.375 - half)) and d["ci_high"] == pytest.approx(min(1.0, 0.375 + half))
    pooled = paired_difference([1, 0, 0, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 1, 1, 1])  # every (seed, item) pair
    assert d["items"]["n"] == 8 and d["items"]["diff"] == pytest.approx(0.375)
    assert (d["items"]["ci_low"], d["items"]["ci_high"]) == (pooled["ci_low"], pooled["ci_high"])
    hard = paired_to_first(first, other, 1)  # tier 1: items c, d
    assert hard["per_seed"] == {"0": 0.0, "1": 1.0} and hard["items"]["n"] == 4
    assert paired_to_first(first, {5: other[0]}, None) is None  # no seed in common


def two_arm_ablation():
    items0 = dict(zip("abcd", [True, False, True, False]))
    base = {s: fake_run({0: 0.8, 1: 0.4 + 0.1 * s}, [(0, {0: 0.5, 1: 0.2}), (10, {0: 0.7, 1: 0.4}),
                                                     (20, {0: 0.8, 1: 0.4 + 0.1 * s})], items0, TIERS)
            for s in (0, 1)}
    better = {s: fake_run({0: 0.9, 1: 0.8}, [(0, {0: 0.5, 1: 0.2}), (10, {0: 0.9, 1: 0.8}), (20, {0: 0.9, 1: 0.8})],
                          {**items0, "b": True, "d": True}, TIERS) for s in (0, 1)}
    return {"curriculum": base, "shuffled": better}


def test_summary_by_hand():
    s = summarize(two_arm_ablation(), threshold=0.8)
    assert s["baseline"] == "curriculum" and s["hardest_tier"] == 1 and s["tiers"] == [0, 1] and s["auc_steps"] == [0, 20]
    base, better = s["arms"]["curriculum"], s["arms"]["shuffled"]
    assert base["final"]["tier1"]["mean"] == pytest.approx(0.45) and base["final"]["tier1"]["values"] == [0.4, 0.5]
    assert base["final"]["overall"]["mean"] == pytest.approx((0.6 + 0.65) / 2)
    # tier 1 curve of seed 0: 0.2, 0.4, 0.4 -> (0.6 * 10 / 2 + 0.8 * 10 / 2) / 20 = 0.35; seed 1: 0.2, 0.4, 0.5 -> 0.375
    assert base["auc_hardest"]["values"] == pytest.approx([0.35, 0.375])
    assert better["auc_hardest"]["values"] == pytest.approx([0.65, 0.65])  # (0.5 * 10 + 0.8 * 10) / 20
    assert base["steps_to_threshold"] == {"per_seed": [None, None], "reached": 0, "median": None}
    assert better["steps_to_threshold"] == {"per_seed": [10, 10], "reached": 2, "median": 10}
    assert "diff_to_baseline" not in base
    overall, hard = better["diff_to_baseline"]["overall"], better["diff_to_baseline"]["tier1"]
    assert overall["diff"] == pytest.approx(0.5) and overall["per_seed"] == {"0": 0.5, "1": 0.5}
    assert overall["ci_low"] == overall["ci_high"] == pytest.approx(0.5)  # the same difference in both seeds
    assert overall["items"]["ci_low"] < 0.5 < overall["items"]["ci_high"]  # 8 pairs leave item noise
    assert hard["diff"] == pytest.approx(0.5) and hard["items"]["n"] == 4
    assert [r["step"] for r in better["curve_hardest"]] == [0, 10, 20]
    assert base["curve_hardest"][-1] == {"step": 20, "mean": pytest.approx(0.45), "min": 0.4, "max": 0.5}


def test_summary_refuses_an_arm_without_runs():
    arms = two_arm_ablation()
    arms["shuffled"] = {}
    with pytest.raises(ValueError, match="shuffled"):
        summarize(arms)


def test_markdown_and_plot(tmp_path):
    s = summarize(two_arm_ablation(), threshold=0.8)
    md = ablation.render_markdown(s, "sari-ray ablate x.yaml --arm ...")
    assert "| `curriculum` | 2 | 62.5 [" in md and "not reached (0/2)" in md and "| 10 (2/2) |" in md
    assert "## Difference to `curriculum`" in md and "| `shuffled` | all | +50.0 | [+50.0, +50.0] | 2 |" in md
    assert "| `shuffled` | tier 1 | +50.0 |" in md
    png = ablation.write_plot(tmp_path / "ablation.png", s)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------- arguments
def test_arm_specs(tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text("sft:\n  steps: 0\n")
    assert ablate_cli.parse_arm(f"nosft={overlay}") == ablate_cli.Arm("nosft", (str(overlay),))
    assert ablate_cli.parse_arm(f"two={overlay},{overlay}").overlays == (str(overlay), str(overlay))
    assert ablate_cli.parse_arm("base=") == ablate_cli.Arm("base", ())
    with pytest.raises(ValueError, match="expected NAME=OVERLAY"):
        ablate_cli.parse_arm(str(overlay))
    with pytest.raises(ValueError, match="the name 'a/b'"):
        ablate_cli.parse_arm(f"a/b={overlay}")
    with pytest.raises(FileNotFoundError, match="overlay file not found: nowhere/missing.yaml"):
        ablate_cli.parse_arm("x=nowhere/missing.yaml")
    with pytest.raises(ValueError, match="not a .yaml file"):
        ablate_cli.parse_arm("x=grpo.steps=3")
    with pytest.raises(ValueError, match=r"repeated: \['a'\]"):
        ablate_cli.parse_arms([f"a={overlay}", "a="])
    with pytest.raises(ValueError, match="set by `sari-ray ablate`"):
        ablate_cli.check_overrides(["grpo.steps=2", "run.seed=3"])
    with pytest.raises(ValueError, match="unrecognized argument '--sedes'"):
        ablate_cli.check_overrides(["--sedes"])
    with pytest.raises(ValueError, match="seed is repeated"):
        ablate_cli.check_seeds([0, 1, 0])


def _fails_cleanly(capsys, argv, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in err, err


def test_cli_errors_name_the_problem(tmp_path, capsys):
    out = str(tmp_path / "abl")
    _fails_cleanly(capsys, ["ablate", DEMO, "--arm", "a=nowhere/missing.yaml", "--out", out],
                   "overlay file not found: nowhere/missing.yaml")
    _fails_cleanly(capsys, ["ablate", DEMO, "--arm", "a", "--out", out], "expected NAME=OVERLAY")
    _fails_cleanly(capsys, ["ablate", DEMO, "--arm", "a=", "--out", out, "run.seed=4"], "run.seed=4")
    _fails_cleanly(capsys, ["ablate", DEMO, "--arm", "a=", "--out", out, "grpo.stepz=4"], "grpo.stepz")
    _fails_cleanly(capsys, ["ablate", "nope.yaml", "--arm", "a=", "--out", out], "config file not found: nope.yaml")
    no_sft = str(REPO / "configs" / "ablations" / "no_sft.yaml")
    _fails_cleanly(capsys, ["ablate", DEMO, "--arm", "a=", "--arm", f"b={no_sft}", "--out", out, "sft.steps=2"],
                   "override(s) ['sft.steps'] would replace what --arm b's overlay", "no_sft.yaml")
    curriculum = str(REPO / "configs" / "ablations" / "curriculum.yaml")  # the demo's mode already
    _fails_cleanly(capsys, ["ablate", DEMO, "--arm", "a=", "--arm", f"b={curriculum}", "--out", out],
                   "arms a and b train the same config")
    assert not Path(out).exists()  # checked before anything is written
    with pytest.raises(SystemExit):
        main(["ablate", DEMO, "--out", out])  # --arm is required: argparse's usage error
    with pytest.raises(SystemExit):
        main(["train", DEMO, "--no-such-option"])  # other commands still refuse what they do not know


# ---------------------------------------------------------------------------------------- skip and resume
class FakeParent:
    run_id = "parent123"

    def __init__(self):
        self.status, self.artifacts, self.metrics = None, [], {}

    def log_artifact(self, path):
        self.artifacts.append(Path(path).name)

    def log_metrics(self, metrics, step):
        self.metrics.update(metrics)

    def finish(self, status="FINISHED"):
        self.status = status


def write_finished(path: Path, seed: int, accuracy: float) -> None:
    path.mkdir(parents=True, exist_ok=True)
    run = fake_run({0: accuracy}, [(0, {0: 0.5}), (4, {0: accuracy})], {"a": True, "b": accuracy > 0.7}, {"a": 0, "b": 0})
    (path / "held_out.json").write_text(json.dumps(run))
    (path / "summary.json").write_text(json.dumps({"mlflow_run_id": f"run-{path.parent.name}-{seed}", "seconds": 1.0}))


@pytest.fixture
def fake_training(monkeypatch):
    """Training replaced: each call records its overrides and writes a finished run (or fails, for `fail`)."""
    import sari_ray.train

    calls, parent, fail = [], FakeParent(), set()

    def run_training(configs, overrides):
        kv = dict(o.split("=", 1) for o in overrides)
        calls.append({"configs": configs, **kv})
        if kv["run.name"] in fail:
            raise RuntimeError("engine died")
        write_finished(Path(kv["run.output_dir"]), int(kv["run.seed"]), 0.9 if "shuffled" in kv["run.name"] else 0.6)

    monkeypatch.setattr(sari_ray.train, "run_training", run_training)
    monkeypatch.setattr(ablate_cli, "open_parent_run", lambda *a, **k: parent)
    return calls, parent, fail


def test_finished_runs_are_skipped_and_a_stopped_one_resumes(tmp_path, fake_training, capsys):
    calls, parent, _ = fake_training
    out = tmp_path / "abl"
    write_finished(out / "runs" / "base" / "seed0", 0, 0.6)  # finished earlier: skipped
    (out / "runs" / "base" / "seed1" / "checkpoints" / "step_000002").mkdir(parents=True)  # stopped midway
    half = out / "runs" / "shuffled" / "seed0"
    half.mkdir(parents=True)
    (half / "summary.json").write_text("{")  # cut short: not finished
    argv = ["ablate", DEMO, "--arm", "base=", "--arm", f"shuffled={SHUFFLED}", "--seeds", "0", "1", "--out", str(out),
            "grpo.steps=4", "eval.every=2"]
    assert main(argv) == 0
    ran = [(c["run.name"], c["run.resume"]) for c in calls]
    assert ran == [("shuffled-seed0", "false"), ("base-seed1", "true"), ("shuffled-seed1", "false")]  # seed by seed
    assert all(c["grpo.steps"] == "4" and c["tracking.parent_run_id"] == "parent123" for c in calls)
    assert calls[0]["configs"] == [DEMO, SHUFFLED]
    assert calls[0]["tracking.tracking_uri"] == f"sqlite:///{out.resolve() / 'mlflow.db'}"  # one store for all
    assert "[1/4] arm base, seed 0: finished earlier, skipped" in capsys.readouterr().out
    summary = json.loads((out / "ablation.json").read_text())
    diff = summary["arms"]["shuffled"]["diff_to_baseline"]["overall"]
    assert diff["diff"] == pytest.approx(0.5)  # on the items: "b" is right only in shuffled
    assert [r["mlflow_run_id"] for r in summary["runs"]] == ["run-base-0", "run-shuffled-0", "run-base-1",
                                                             "run-shuffled-1"]
    assert (out / "ablation.md").is_file() and (out / "ablation.png").is_file()
    assert parent.status == "FINISHED" and parent.artifacts == ["ablation.json", "ablation.md", "ablation.png"]
    assert parent.metrics["ablation/shuffled/final_accuracy"] == pytest.approx(0.9)
    calls.clear()
    assert main(argv) == 0  # everything finished: nothing runs again
    assert calls == []


def test_a_failed_run_is_reported_and_the_others_run(tmp_path, fake_training, capsys):
    calls, parent, fail = fake_training
    fail.add("base-seed0")
    out = tmp_path / "abl"
    assert main(["ablate", DEMO, "--arm", "base=", "--arm", f"shuffled={SHUFFLED}", "--seeds", "0", "1",
                 "--out", str(out)]) == 1
    assert len(calls) == 4 and parent.status == "FAILED"
    assert "arm base, seed 0: FAILED" in capsys.readouterr().err
    summary = json.loads((out / "ablation.json").read_text())
    assert summary["failed"][0]["arm"] == "base" and summary["arms"]["base"]["seeds"] == [1]
    assert "## Failed runs" in (out / "ablation.md").read_text()


def test_a_stop_ends_the_ablation_and_a_rerun_continues(tmp_path, fake_training, capsys, monkeypatch):
    import sari_ray.train
    from sari_ray.stopping import Interrupted

    calls, parent, _ = fake_training
    finish_run = sari_ray.train.run_training

    def stopped_at_the_second(configs, overrides):
        if len(calls) == 1:
            calls.append({"run.name": "stopped"})
            raise Interrupted("stopped after step 1 (checkpointed); resume with run.resume=true")
        finish_run(configs, overrides)

    monkeypatch.setattr(sari_ray.train, "run_training", stopped_at_the_second)
    out = tmp_path / "abl"
    argv = ["ablate", DEMO, "--arm", "base=", "--seeds", "0", "1", "2", "--out", str(out)]
    assert main(argv) == 130
    assert parent.status == "KILLED" and "rerun the same command to continue" in capsys.readouterr().err
    assert [c["run.name"] for c in calls] == ["base-seed0", "stopped"] and not (out / "ablation.json").exists()
    monkeypatch.setattr(sari_ray.train, "run_training", finish_run)
    assert main(argv) == 0
    assert [c["run.name"] for c in calls][2:] == ["base-seed1", "base-seed2"]


def test_a_run_directory_from_another_config_is_refused(tmp_path, fake_training, capsys):
    calls, _, _ = fake_training
    out = tmp_path / "abl"
    assert main(["ablate", DEMO, "--arm", "base=", "--seeds", "0", "--out", str(out), "grpo.steps=4"]) == 0
    from omegaconf import OmegaConf

    from sari_ray.config import load_config

    cfg = load_config([DEMO], ["grpo.steps=4", f"run.output_dir={out / 'runs' / 'base' / 'seed0'}"])
    OmegaConf.save(cfg, out / "runs" / "base" / "seed0" / "config.yaml")  # what a real run leaves
    _fails_cleanly(capsys, ["ablate", DEMO, "--arm", "base=", "--seeds", "0", "--out", str(out), "grpo.steps=5"],
                   "holds a run made with another config", "grpo.steps: 4 there, 5 now")


# ------------------------------------------------------------------------------- what a training run leaves
def test_held_out_record_holds_the_curve_the_final_and_the_items():
    from sari_ray.held_out import held_out_record

    history = [{"step": 0, "eval/accuracy": 0.5}, {"step": 5, "eval/accuracy": 0.7}, {"step": 10, "eval/accuracy": 0.8}]
    final = {"eval/accuracy": 0.9}
    record = held_out_record(history, 10, final, {"eval": {"a": True, "b": False}, "eval_silent": {}},
                             {"a": 0, "b": 1, "c": 2})
    assert record["curve"] == [history[0], history[1], {"step": 10, "eval/accuracy": 0.9}]  # the end replaces step 10
    assert record["items"] == {"a": True, "b": False} and record["tiers"] == {"a": 0, "b": 1}


def test_a_run_with_a_parent_is_created_nested_under_it(tmp_path):
    from types import SimpleNamespace

    from sari_ray.engines.tracking import Tracker

    class Client:
        def __init__(self):
            self.created = []

        def get_experiment_by_name(self, name):
            return SimpleNamespace(experiment_id="1")

        def create_run(self, experiment_id, run_name, tags=None):
            self.created.append((run_name, tags))
            return SimpleNamespace(info=SimpleNamespace(run_id=f"id-{len(self.created)}"))

    client = Client()
    Tracker("http://fake", "exp", tmp_path, "arm-seed0", parent_run_id="parent123", client=client)
    Tracker("http://fake", "exp", tmp_path, "plain", client=client)
    assert client.created == [("arm-seed0", {"mlflow.parentRunId": "parent123"}), ("plain", None)]
