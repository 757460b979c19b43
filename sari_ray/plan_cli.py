"""`sari-ray plan CONFIG [OVERLAY ...] [key=value ...] [--json]`: the preflight's figures (sari_ray/plan.py).

    sari-ray plan configs/sari_qwen2_audio_7b.yaml                                  # its KubeRay pods
    sari-ray plan configs/sari_qwen2_audio_7b.yaml --shape learner.object_store_gib=8   # today's 8 GiB: refused
    sari-ray plan configs/demo_cpu.yaml                                             # this machine
"""
from __future__ import annotations

import json
import sys

from sari_ray import plan as plan_lib


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("plan", help="preflight: memory, object store, sync and tokens per actor vs what "
                                           "the cluster gives (nothing is started)", description=__doc__,
                              formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="+", metavar="CONFIG.yaml [OVERLAY.yaml ...] [key=value ...]",
                   help="as for `sari-ray train`")
    p.add_argument("--json", action="store_true", help="the same figures as one JSON object")
    p.add_argument("--gpu-gib", type=float, default=plan_lib.DEFAULT_GPU_GIB, help="memory of one GPU (default: "
                   "%(default)s, an H100 / A100-80GB)")
    p.add_argument("--bandwidth-gbs", type=float, help="sync bandwidth in GB/s (default by backend: "
                   f"{plan_lib.BANDWIDTH_GBS})")
    p.add_argument("--layout", choices=("auto", "kuberay", "machine"), default="auto",
                   help="what the run gets: the pods `sari-ray deploy kuberay` renders (auto for run.device "
                        "cuda), or this machine (auto for cpu)")
    p.add_argument("--shape", action="append", default=[], metavar="GROUP.FIELD=N",
                   help="KubeRay pod shape, as for `sari-ray deploy kuberay` (e.g. learner.object_store_gib=8)")
    p.set_defaults(func=plan_command)


def plan_command(args) -> int:
    from sari_ray.config import load_config

    configs = [a for a in args.args if a.endswith((".yaml", ".yml")) and "=" not in a]
    cfg = load_config(configs, [a for a in args.args if a not in configs])
    plan = make_plan(cfg, layout=args.layout, shape_args=args.shape, gpu_gib=args.gpu_gib,
                     bandwidth_gbs=args.bandwidth_gbs)
    if args.json:
        print(json.dumps(plan.to_json(), default=float))
    else:
        print_plan(plan)
    for check in plan.by_level("warn"):
        print(f"warning: {check.line()}", file=sys.stderr)
    plan.refuse_if_it_cannot_fit()
    return 0


def make_plan(cfg, *, layout: str = "auto", shape_args=(), gpu_gib: float = plan_lib.DEFAULT_GPU_GIB,
              bandwidth_gbs: float | None = None) -> plan_lib.Plan:
    if layout == "auto":
        layout = "machine" if cfg.run.device == "cpu" else "kuberay"
    if layout == "kuberay":
        from sari_ray.deploy.kuberay import parse_shapes

        capacity = plan_lib.kuberay_capacity(cfg, plan_lib.size_shapes(cfg, parse_shapes(shape_args, [])), gpu_gib)
    else:
        import psutil

        capacity = plan_lib.machine_capacity(psutil.virtual_memory().total, gpu_gib=gpu_gib)
    return plan_lib.build_plan(cfg, plan_lib.model_shape(cfg), capacity,
                               params=plan_lib.checkpoint_params(cfg.model.path),
                               bandwidth_gbs=bandwidth_gbs)


def print_plan(plan: plan_lib.Plan) -> None:
    from rich.console import Console
    from rich.table import Table

    g = plan_lib.gib
    m, where = plan.model, "GPU" if plan.model["device"] == "cuda" else "process"
    table = Table(title=f"sari-ray plan: {m['arch']} {m['total_params'] / 1e9:.3g} B params ({m['source']}), "
                        f"{m['dtype']} on {plan.capacity['source']}")
    for col in ("actor", "item", "size"):
        table.add_column(col)
    for item, n in plan.learner.items():
        table.add_row(f"learner (per {where})", item, g(n))
    table.add_row(f"learner (per {where})", "total", g(sum(plan.learner.values())))
    for item, n in plan.rollout.items():
        table.add_row(f"vLLM engine (per {where})", item, g(n))
    for group, need in plan.nodes.items():
        table.add_row(f"{group} node", "host per actor / object store", f"{g(need['host_per_actor'])} / "
                                                                        f"{g(need['object_store'])}")
    s = plan.sync
    table.add_row("sync", f"{s['backend']}, per step", f"{g(s['bytes'])}, ~{s['seconds']:.1f} s at "
                                                        f"{s['bandwidth_gbs']:g} GB/s (assumed)")
    t = plan.tokens
    table.add_row("tokens per step", f"{t['sequences']} sequences of <= {t['sequence_tokens']}",
                  f"rollout {t['rollout_tokens_max']}, learner {t['learner_tokens_per_rank']} per rank")
    for c in plan.checks:
        style = {"ok": "green", "warn": "yellow", "error": "red"}[c.level]
        table.add_row(f"[{style}]{c.level}", c.what, f"{g(c.need)} of {g(c.have)}")
    console = Console(highlight=False)
    console.print(table)
    for note in plan.notes:
        console.print(f"note: {note}")
