"""Draw sari-ray's actors and data flow: `python docs/images/architecture.py [OUT.svg]`.

Writes docs/images/architecture.svg next to this file by default. The output is deterministic (fixed SVG id
salt, no date, text kept as text), so the committed picture is exactly what this script produces;
tests/unit/test_readme.py checks that.
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "architecture.svg"

# colours: one per kind of component
DRIVER = ("#fff4d6", "#b7791f")
ACTOR = ("#e6f0ff", "#2b6cb0")
ENGINE = ("#e8f7ee", "#2f855a")
LEARNER = ("#fdecec", "#c53030")
STORE = ("#f1f1f4", "#4a5568")
FLOW = "#2d3748"
SYNC = "#c53030"


def box(ax, cx, cy, w, h, title, body, colours, stack=0):
    """A rounded box centred at (cx, cy); `stack` > 0 draws that many copies behind it (N actors)."""
    face, edge = colours
    for i in range(stack, 0, -1):
        ax.add_patch(FancyBboxPatch((cx - w / 2 + 0.9 * i, cy - h / 2 + 0.9 * i), w, h,
                                    boxstyle="round,pad=0.3,rounding_size=1.2", fc=face, ec=edge, lw=1.2))
    ax.add_patch(FancyBboxPatch((cx - w / 2, cy - h / 2), w, h, boxstyle="round,pad=0.3,rounding_size=1.2",
                                fc=face, ec=edge, lw=1.8))
    ax.text(cx, cy + h / 2 - 2.2, title, ha="center", va="center", fontsize=11.5, fontweight="bold", color=edge)
    ax.text(cx, cy - 1.2, body, ha="center", va="center", fontsize=9, color="#1a202c", linespacing=1.35)


def arrow(ax, start, end, label="", colour=FLOW, label_at=0.5, offset=(0.0, 0.0), ha="center", style="-|>",
          lw=1.6, rad=0.0, fontsize=8.8):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=14, lw=lw, color=colour,
                                 connectionstyle=f"arc3,rad={rad}", shrinkA=0, shrinkB=0))
    if label:
        x = start[0] + (end[0] - start[0]) * label_at + offset[0]
        y = start[1] + (end[1] - start[1]) * label_at + offset[1]
        ax.text(x, y, label, ha=ha, va="center", fontsize=fontsize, color=colour, linespacing=1.3,
                bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="none", alpha=0.9))


def draw() -> plt.Figure:
    fig = plt.figure(figsize=(13.0, 8.2))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 130)
    ax.set_ylim(0, 82)
    ax.axis("off")

    ax.text(65, 79, "sari-ray: one GRPO step on a Ray cluster", ha="center", va="center", fontsize=14,
            fontweight="bold", color="#1a202c")
    ax.text(65, 75.3, "SFT warm-up first (on the learners), then per step: batch -> rollouts -> rewards -> "
                      "curriculum update -> GRPO update -> weight sync -> log", ha="center", va="center",
            fontsize=9.5, color="#4a5568")

    # centre: the driver
    box(ax, 65, 41, 30, 15, "Driver (train loop)",
        "sari_ray/train.py, one Ray job\nschedules the step's phases,\nchecks deadlines, restarts actors",
        DRIVER)

    # left: curriculum (top) and reward (bottom)
    box(ax, 17, 60, 28, 11, "Curriculum scheduler actor",
        "difficulty tiers, promotions,\ndata cursor (seeded order)", ACTOR)
    box(ax, 17, 22, 28, 11, "Reward scorer actor",
        "format reward + accuracy\n(MMAU answer rule)", ACTOR)

    # right: rollout workers (top) and learners (bottom)
    box(ax, 110, 60, 30, 12, "Rollout workers  x N",
        "one vLLM engine each (scalable)\nG completions per prompt,\naudio clip in every prompt", ENGINE, stack=2)
    box(ax, 110, 22, 30, 12, "DeepSpeed learner ranks  x M",
        "SFT warm-up, then GRPO update\nZeRO-2 / ZeRO-3, data parallel\n(rank 0 .. M-1)", LEARNER, stack=2)

    # bottom: MLflow and checkpoints
    box(ax, 45, 7.5, 28, 10, "MLflow tracking", "params, per-step metrics,\nsample tables, artifacts", STORE)
    box(ax, 85, 7.5, 30, 10, "Checkpoints", "learner state + HF model,\ntrainer_state (cursor, RNG,\n"
        "in-flight rollouts)", STORE)

    # driver <-> curriculum
    arrow(ax, (31.8, 58.0), (49.6, 47.0), "batch ids", label_at=0.45, offset=(3.2, 2.6))
    arrow(ax, (49.6, 43.5), (31.8, 55.0), "rewards per id\n(tier accuracy)", label_at=0.5, offset=(-3.5, -3.2))
    # driver <-> rollout workers
    arrow(ax, (80.4, 47.0), (94.6, 57.0), "prompts + audio,\nsampling seeds", label_at=0.42, offset=(-6.5, 3.6))
    arrow(ax, (94.6, 54.0), (80.4, 44.0), "G completions,\nlog-probs, weight version", label_at=0.58,
          offset=(7.5, -3.6))
    # driver <-> reward scorer
    arrow(ax, (49.6, 36.0), (31.8, 25.0), "completions", label_at=0.45, offset=(-3.5, 2.6))
    arrow(ax, (31.8, 22.0), (49.6, 33.5), "rewards", label_at=0.55, offset=(3.5, -2.6))
    # driver -> learners
    arrow(ax, (80.4, 36.0), (94.6, 26.0), "groups + advantages\n(SFT: target batches)", label_at=0.58,
          offset=(7.5, 3.8))
    arrow(ax, (94.6, 22.5), (80.4, 33.5), "loss, KL,\ngrad norm", label_at=0.42, offset=(-5.5, -3.2))

    # weight sync: learner rank 0 -> rollout workers
    arrow(ax, (121.0, 28.8), (121.0, 53.2), "", colour=SYNC, lw=2.6)
    ax.text(120.0, 41.0, "weight sync\nlearner rank 0 -> every\nrollout worker:\nobject store buckets\nor "
            "collective broadcast", ha="right", va="center", fontsize=8.8, color=SYNC, linespacing=1.3)

    # logging and checkpoints
    arrow(ax, (58.0, 33.2), (48.0, 13.2), "metrics, params,\nartifacts", label_at=0.6, offset=(6.5, 0.0),
          colour=STORE[1])
    arrow(ax, (72.0, 33.2), (80.0, 13.2), "trainer state", label_at=0.5, offset=(-5.0, 0.0), colour=STORE[1])
    arrow(ax, (104.0, 15.7), (96.0, 13.2), "", colour=STORE[1])
    ax.text(102.0, 13.6, "learner state", ha="left", va="center", fontsize=8.8, color=STORE[1])
    ax.text(2.0, 6.5, "Asynchronous rollouts:\nrollout.max_staleness = k keeps\nthe next k steps' rollouts in "
            "flight\nwhile the learners train", ha="left", va="center", fontsize=8.8, color="#4a5568",
            linespacing=1.3)
    return fig


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else DEFAULT_OUT
    plt.rcParams["svg.hashsalt"] = "sari-ray-architecture"
    plt.rcParams["svg.fonttype"] = "none"  # text stays text: smaller, searchable, no font-file dependence
    plt.rcParams["font.family"] = ["DejaVu Sans", "sans-serif"]  # the SVG also names fallbacks
    fig = draw()
    fig.savefig(out, format=out.suffix.lstrip(".") or "svg", dpi=100,
                metadata={"Date": None, "Creator": "docs/images/architecture.py"} if out.suffix == ".svg" else None)
    plt.close(fig)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
