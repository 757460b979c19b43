"""`sari-ray ablate` on a 2-arm x 2-seed miniature of the demo (with and without the SFT warm-up): real Ray, vLLM
(cpu), DeepSpeed and MLflow, the smallest settings that still evaluate the held-out set at every GRPO step. Checks
the files it writes, the MLflow nesting (4 runs under the ablation's run), and that a rerun skips every finished
run. The figures themselves are not checked (2 GRPO steps teach nothing): the statistics have unit tests."""
from __future__ import annotations

import json
import time

import pytest

from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration

MINIATURE = ["data.eval_fraction=0.2", "sft.batch_size=4", "sft.checkpoint_every=0", "grpo.steps=2",
             "grpo.prompts_per_step=4", "grpo.num_generations=2", "learner.num_workers=1", "learner.micro_batch_size=4",
             "eval.every=1", "eval.max_samples=8", "eval.silent_audio=false", "checkpoint.every=2",
             "tracking.completions_table_every=0"]


def test_two_arms_two_seeds_end_to_end_and_a_rerun_skips_them(tmp_path, tiny_qwen2_audio, capsys):
    from mlflow.tracking import MlflowClient

    from sari_ray.cli import main
    from sari_ray.data.synth import synthesize

    data = synthesize(tmp_path / "pitch", n=40, seed=0, tiers=1)  # the demo's question, fewer items
    out = tmp_path / "ablation"
    short_sft = tmp_path / "short_sft.yaml"  # an overlay: a key=value sft.steps would override no_sft's too
    short_sft.write_text("sft:\n  steps: 2\n")
    argv = ["ablate", str(REPO / "configs" / "demo_cpu.yaml"), "--arm", f"sft={short_sft}",
            "--arm", f"no_sft={REPO / 'configs' / 'ablations' / 'no_sft.yaml'}", "--seeds", "0", "1",
            "--out", str(out), f"model.path={tiny_qwen2_audio}", f"data.train={data}", *MINIATURE]
    t0 = time.monotonic()
    assert main(argv) == 0
    print(f"miniature ablation: {time.monotonic() - t0:.0f} s")

    summary = json.loads((out / "ablation.json").read_text())
    assert list(summary["arms"]) == ["sft", "no_sft"] and summary["baseline"] == "sft"
    assert all(arm["seeds"] == [0, 1] for arm in summary["arms"].values())
    assert [r["step"] for r in summary["arms"]["sft"]["curve"]] == [0, 1, 2]  # after SFT, then every step
    assert [r["step"] for r in summary["arms"]["no_sft"]["curve"]] == [1, 2]  # no SFT: no step-0 evaluation
    assert summary["auc_steps"] == [1, 2]  # the stretch both arms evaluated
    diff = summary["arms"]["no_sft"]["diff_to_baseline"]["overall"]
    assert diff["n_seeds"] == 2 and diff["items"]["n"] == 16  # 8 held-out items x 2 seeds, paired
    assert (out / "ablation.md").read_text().startswith("# Ablation")
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent_id = json.loads((out / "ablation_plan.json").read_text())["parent_run_id"]
    children = {r["mlflow_run_id"] for r in summary["runs"]}
    assert len(children) == 4
    for run_id in children:
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent_id and run.info.status == "FINISHED"
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and "ablation/no_sft/diff_to_baseline" in parent.data.metrics

    capsys.readouterr()
    assert main(argv) == 0  # everything finished: nothing trains again
    assert capsys.readouterr().out.count("finished earlier, skipped") == 4
