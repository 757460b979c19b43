"""Console output of a training run: a rich progress bar and the end-of-run summary table."""
from __future__ import annotations

from typing import Any


def make_console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def progress_bar(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def progress_line(step: int, m: dict[str, float]) -> str:
    return (f"grpo step {step} | reward {m['reward/mean']:.2f} | acc {m['reward/accuracy']:.2f} | "
            f"tier {int(m.get('curriculum/tier', 0))} | {m['throughput/completions_per_s']:.1f} compl/s")


def promotions_table(promotions: list[dict[str, Any]]):
    """The curriculum's promotions (as in `curriculum_history.json`): step, from, to, why, the running accuracy
    per tier at that step."""
    from rich.table import Table

    table = Table(title="curriculum promotions (running accuracy of the sampled completions per tier)")
    for column in ("step", "from tier", "to tier", "steps at tier", "why", "accuracies"):
        table.add_column(column)
    for p in promotions:
        accs = ", ".join(f"tier {t}: {a:.2f}" for t, a in sorted(p["accuracies"].items(), key=lambda kv: int(kv[0])))
        table.add_row(str(p["step"]), str(p["from_tier"]), str(p["to_tier"]), str(p.get("steps_at_tier", "-")),
                      str(p.get("reason", "-")), accs)
    return table


def print_summary(console, summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="sari-ray run summary")
    table.add_column("figure")
    table.add_column("value")
    table.add_row("wall time", f"{summary['seconds']:.0f} s")
    table.add_row("steps", f"SFT {summary['sft_steps']}, GRPO {summary['grpo_steps']}")
    table.add_row("promotions", f"{len(summary['promotions'])} (table below; curriculum_history.json)")
    for t in summary["reward_by_tier"]:
        table.add_row(f"GRPO reward, tier {t['tier']}", f"steps {t['steps'][0]}-{t['steps'][1]}: first quarter "
                                                         f"{t['first_quarter']:.3f} -> last quarter {t['last_quarter']:.3f}")
    if summary["completions_per_s"] is not None:
        table.add_row("throughput", f"{summary['completions_per_s']:.1f} completions/s (per wall-second of a GRPO step)")
        table.add_row("weight sync", f"{summary['sync_seconds']:.3f} s per step")
    evals = [("after SFT", summary["after_sft_eval"] or {}), ("final", summary["final_eval"])]
    for label, figures in evals:
        for name, value in sorted(figures.items()):
            if name != "step":
                table.add_row(f"{label} {name}", f"{value:.3f}")
    table.add_row("MLflow", f"run {summary['mlflow_run_id']} ({summary['tracking_uri']})")
    if summary.get("report"):
        table.add_row("report", f"{summary['report']} (reward, accuracy, tiers, held-out gain)")
    console.print(table)
    if summary["promotions"]:
        console.print(promotions_table(summary["promotions"]))
    if summary.get("grpo_gain"):
        gain = Table(title="what GRPO added (held-out, same items; 95% CI of the paired difference)")
        for column in ("tier", "n", "after SFT", "final", "diff", "95% CI", "final, silent audio"):
            gain.add_column(column)
        for g in summary["grpo_gain"]:
            silent = f"{g['final_silent']:.3f}" if "final_silent" in g else "-"
            gain.add_row(str(g["tier"]), str(g["n"]), f"{g['after_sft']:.3f}", f"{g['final']:.3f}",
                         f"{g['diff']:+.3f}", f"[{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]", silent)
        console.print(gain)
