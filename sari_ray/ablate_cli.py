"""`sari-ray ablate CONFIG --arm NAME=OVERLAY[,OVERLAY...] ... --seeds 0 1 2 --out DIR [--max-concurrent N]
[key=value ...]`: every arm with every seed, as `sari-ray train CONFIG OVERLAY... key=value... run.seed=S` would run
it, into DIR/runs/ARM/seedS/; then DIR/ablation.json, ablation.md and ablation.png (the statistics:
sari_ray/ablation.py). Runs are started seed by seed.

Locally: one after another in this process, each with its own local Ray cluster. On a cluster (cluster.address or
RAY_ADDRESS): each run its own Ray job (a `sari-ray train` driver process attached to the cluster, its output in
the run directory's console.log), as many at once as the cluster's resources hold, at most --max-concurrent
(sari_ray/ablate_jobs.py).

Resumable: a run whose directory holds its summary.json and held_out.json is skipped; one stopped midway continues
from its last checkpoint (run.resume=true); a run directory made with another config is refused. All runs log to
one MLflow store, each as one run nested under the ablation's parent run. A stop (Ctrl-C, SIGTERM) stops the runs
in flight at a checkpoint and marks the parent run KILLED.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLAN_FILE = "ablation_plan.json"  # the parent MLflow run and what the ablation was asked, kept for a rerun
ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # an arm names a directory and an MLflow run
SET_BY_ABLATE = ("run.seed", "run.output_dir", "run.name", "run.resume", "tracking.parent_run_id")
IGNORED_WHEN_COMPARING = ("run.resume", "tracking.parent_run_id", "tracking.tracking_uri")


@dataclass(frozen=True)
class Arm:
    name: str
    overlays: tuple[str, ...]  # YAML files merged over CONFIG, in order (none: CONFIG alone)


@dataclass(frozen=True)
class RunSpec:
    arm: str
    seed: int
    dir: Path
    configs: tuple[str, ...]
    overrides: tuple[str, ...]


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "ablate", help="train every arm (config overlays) with every seed and compare them with 95%% CIs",
        description="Train every arm (CONFIG plus the arm's overlays) with every seed and compare the arms with 95% "
                    "intervals: DIR/ablation.json, ablation.md, ablation.png. Locally the runs train one after "
                    "another; on a Ray cluster (cluster.address or RAY_ADDRESS) each run is its own Ray job, as many "
                    "at once as the cluster's resources hold. A rerun skips finished runs and resumes a stopped one.")
    p.add_argument("config", metavar="CONFIG.yaml", help="the base config every arm starts from")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides for every run (after the arm's overlays), e.g. grpo.steps=30 eval.every=5; "
                        "they may also come after the options")
    p.add_argument("--arm", action="append", required=True, metavar="NAME=OVERLAY[,OVERLAY...]",
                   help="an arm: a name and the overlay files it adds to CONFIG (NAME= for CONFIG alone); repeat "
                        "for each arm; the first is the baseline of the differences")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="SEED",
                   help="run.seed of each run of every arm (default: 0 1 2)")
    p.add_argument("--out", required=True, metavar="DIR", help="ablation directory (runs/, ablation.json, .md, .png)")
    p.add_argument("--threshold", type=float, default=None,
                   help="held-out accuracy of the hardest tier that `steps to threshold` waits for (default 0.8)")
    p.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                   help="on a Ray cluster: at most N runs at once (default: as many as the cluster's resources hold; "
                        "1: one after another); without a cluster the runs always train one after another")
    p.set_defaults(func=lambda a: ablate_command(a), trailing_overrides=True)


# --------------------------------------------------------------------------------------------- arguments
def parse_arm(spec: str) -> Arm:
    """`NAME=OVERLAY[,OVERLAY...]` (`NAME=`: the base config alone). Every overlay must be an existing YAML file."""
    name, sep, files = spec.partition("=")
    if not sep:
        raise ValueError(f"--arm {spec!r}: expected NAME=OVERLAY[,OVERLAY...] (e.g. shuffled=configs/ablations/"
                         f"shuffled.yaml), or NAME= for the base config alone")
    if not ARM_NAME.match(name):
        raise ValueError(f"--arm {spec!r}: the name {name!r} must start with a letter or digit and hold only letters, "
                         f"digits, '_', '-' and '.' (it names a directory and an MLflow run)")
    overlays = tuple(f.strip() for f in files.split(",") if f.strip())
    for path in overlays:
        if not path.endswith((".yaml", ".yml")):
            raise ValueError(f"--arm {name}: overlay {path!r} is not a .yaml file (key=value overrides go after the "
                             f"options, for every arm)")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--arm {name}: overlay file not found: {path}")
    return Arm(name, overlays)


def parse_arms(specs: list[str]) -> list[Arm]:
    arms = [parse_arm(s) for s in specs]
    names = [a.name for a in arms]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--arm names must differ; repeated: {repeated}")
    return arms


def check_overrides(overrides: list[str]) -> list[str]:
    """key=value overrides for every run; the keys each run gets from the ablation are refused."""
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or item.startswith("-"):
            raise ValueError(f"unrecognized argument {item!r}: after CONFIG come the options (--arm, --seeds, --out, "
                             f"--threshold, --max-concurrent) and key=value overrides")
        if key in SET_BY_ABLATE:
            raise ValueError(f"{item!r}: {key} is set by `sari-ray ablate` for each run ({', '.join(SET_BY_ABLATE)}); "
                             f"choose seeds with --seeds and the directory with --out")
    return overrides


def overlay_keys(path: str) -> set[str]:
    """Dotted keys an overlay file sets (its `caps:` entries by the key they cap)."""
    from omegaconf import OmegaConf

    from sari_ray.config import to_flat_dict

    return {k.removeprefix("caps.") for k in to_flat_dict(OmegaConf.load(path))}


def check_overrides_keep_arms_apart(arms: list[Arm], overrides: list[str]) -> None:
    """A key=value comes after the arms' overlays and wins over them: one that sets a key an arm's overlay sets
    would erase that arm's difference (sft.steps=2 with a no_sft arm), so it is refused."""
    keys = {o.partition("=")[0] for o in overrides}
    for arm in arms:
        for path in arm.overlays:
            if clash := sorted(keys & overlay_keys(path)):
                raise ValueError(f"override(s) {clash} would replace what --arm {arm.name}'s overlay {path} sets "
                                 f"(key=value wins over overlays): put the value in the arms' overlays instead")


def check_max_concurrent(max_concurrent: int | None, address: str | None) -> int | None:
    """--max-concurrent: N >= 1; above 1 only on a cluster (locally the runs share one machine, in this process)."""
    if max_concurrent is None:
        return None
    if max_concurrent < 1:
        raise ValueError(f"--max-concurrent {max_concurrent}: use N >= 1 (1: one run after another)")
    if max_concurrent > 1 and not address:
        raise ValueError(f"--max-concurrent {max_concurrent} needs a Ray cluster (cluster.address or RAY_ADDRESS): "
                         f"without one the runs train one after another in this process; leave the option out")
    return max_concurrent


def check_seeds(seeds: list[int]) -> list[int]:
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {' '.join(map(str, seeds))}: a seed is repeated (each seed is one run per arm)")
    return seeds


# ------------------------------------------------------------------------------------------- run folders
def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / "runs" / arm / f"seed{seed}"


def is_finished(path: Path) -> bool:
    """A finished run: its summary.json and held_out.json are there and readable (they are written last)."""
    from sari_ray.held_out import HELD_OUT_FILE

    try:
        json.loads((path / "summary.json").read_text())
        json.loads((path / HELD_OUT_FILE).read_text())
    except (OSError, ValueError):
        return False
    return True


def has_checkpoints(path: Path) -> bool:
    from sari_ray.checkpoints import CHECKPOINTS

    root = path / CHECKPOINTS
    return root.is_dir() and any(root.iterdir())


def plan_runs(config: str, arms: list[Arm], seeds: list[int], out: Path, overrides: list[str],
              tracking_uri: str, parent_run_id: str | None) -> list[RunSpec]:
    """Every (arm, seed), seed by seed: an ablation stopped midway has every arm at its first seeds."""
    runs = []
    for seed in seeds:
        for arm in arms:
            path = run_dir(out, arm.name, seed)
            mine = [f"run.seed={seed}", f"run.output_dir={path}", f"run.name={arm.name}-seed{seed}",
                    f"run.resume={str(has_checkpoints(path)).lower()}", f"tracking.tracking_uri={tracking_uri}"]
            if parent_run_id:
                mine.append(f"tracking.parent_run_id={parent_run_id}")
            runs.append(RunSpec(arm.name, seed, path, (config, *arm.overlays), (*overrides, *mine)))
    return runs


def config_mismatch(cfg, path: Path) -> list[str]:
    """Keys whose values differ between `cfg` and the config.yaml an earlier run left in `path` (none there: [])."""
    from omegaconf import OmegaConf

    from sari_ray.config import to_flat_dict

    saved_file = path / "config.yaml"
    if not saved_file.is_file():
        return []
    saved, now = to_flat_dict(OmegaConf.load(saved_file)), to_flat_dict(cfg)
    keys = sorted((set(saved) | set(now)) - set(IGNORED_WHEN_COMPARING))
    return [f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in keys if saved.get(k) != now.get(k)]


def check_arms_differ(runs: list[RunSpec], cfgs: list) -> None:
    """Two arms whose runs would train the same config (an overlay that sets what the base already has) are refused."""
    from sari_ray.config import to_flat_dict

    seen: dict[str, str] = {}
    for run, cfg in zip(runs, cfgs):
        if run.seed != runs[0].seed:
            continue
        flat = to_flat_dict(cfg)
        key = repr(sorted((k, repr(v)) for k, v in flat.items() if k not in SET_BY_ABLATE))
        if key in seen:
            raise ValueError(f"arms {seen[key]} and {run.arm} train the same config; check their overlays")
        seen[key] = run.arm


def load_runs(runs: list[RunSpec]) -> dict[str, dict[int, dict]]:
    """arm -> seed -> held_out.json of the finished runs, arms in order."""
    from sari_ray.held_out import HELD_OUT_FILE

    found: dict[str, dict[int, dict]] = {}
    for run in runs:
        found.setdefault(run.arm, {})
        if is_finished(run.dir):
            found[run.arm][run.seed] = json.loads((run.dir / HELD_OUT_FILE).read_text())
    return found


# ------------------------------------------------------------------------------------------------ command
def ablate_command(args) -> int:
    from sari_ray.ablation import DEFAULT_THRESHOLD
    from sari_ray.config import cluster_address, load_config
    from sari_ray.engines.tracking import default_tracking_uri
    from sari_ray.stopping import Interrupted

    arms, seeds = parse_arms(args.arm), check_seeds(args.seeds)
    overrides = check_overrides(list(args.overrides))
    check_overrides_keep_arms_apart(arms, overrides)
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"--threshold {threshold}: use a held-out accuracy in (0, 1], e.g. 0.8")
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"config file not found: {args.config}")
    out = Path(args.out).resolve()
    base = load_config([args.config], overrides)  # a bad override fails here, before anything is written
    address = cluster_address(base)
    max_concurrent = check_max_concurrent(args.max_concurrent, address)
    uri = base.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(out)
    runs = plan_runs(args.config, arms, seeds, out, overrides, uri, None)
    cfgs = [load_config(list(r.configs), list(r.overrides)) for r in runs]  # every run's config checked first
    check_arms_differ(runs, cfgs)
    for run, cfg in zip(runs, cfgs):
        if differ := config_mismatch(cfg, run.dir):
            raise ValueError(f"{run.dir} holds a run made with another config ({'; '.join(differ[:5])}); use "
                             f"another --out, or remove that directory to run it again")
    if address:  # how many runs at once, asked before anything is written (none fits: an error naming the resource)
        from sari_ray.ablate_jobs import runs_the_cluster_holds, train_on_cluster

        todo = [cfg for run, cfg in zip(runs, cfgs) if not is_finished(run.dir)]
        at_once = runs_the_cluster_holds(todo, address, max_concurrent) if todo else 1
    out.mkdir(parents=True, exist_ok=True)
    parent = open_parent_run(out, base, uri, args, arms, seeds, overrides)
    runs = plan_runs(args.config, arms, seeds, out, overrides, uri, parent.run_id)
    try:
        failed = train_on_cluster(pending_runs(runs), address, at_once) if address else train_all(runs)
    except Interrupted as err:
        parent.finish("KILLED")
        print(f"error: {err}\nablation stopped; rerun the same command to continue (finished runs are skipped)",
              file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C, before the run could checkpoint
        parent.finish("KILLED")
        raise
    except BaseException:
        parent.finish("FAILED")
        raise
    found = load_runs(runs)
    if not all(found.values()):
        parent.finish("FAILED")
        print(f"error: arms without a finished run: {[a for a, r in found.items() if not r]}", file=sys.stderr)
        return 1
    files = write_outputs(out, runs, found, failed, threshold, command_line(args, overrides))
    for path in files:
        parent.log_artifact(path)
    log_arm_metrics(parent, json.loads(files[0].read_text()))
    parent.finish("FAILED" if failed else "FINISHED")
    print(f"ablation: {len(runs) - len(failed)} of {len(runs)} runs finished; {', '.join(str(f) for f in files)}")
    return 1 if failed else 0


def pending_runs(runs: list[RunSpec]) -> list[tuple[str, RunSpec]]:
    """The runs not finished yet, each with its label (`[2/4] arm base, seed 0`); a finished one is said skipped."""
    pending = []
    for i, run in enumerate(runs, 1):
        label = f"[{i}/{len(runs)}] arm {run.arm}, seed {run.seed}"
        if is_finished(run.dir):
            print(f"{label}: finished earlier, skipped ({run.dir})")
        else:
            pending.append((label, run))
    return pending


def train_all(runs: list[RunSpec]) -> list[dict[str, Any]]:
    """Each run not finished yet, in order, in this process; a run that fails is reported and the others go on. A
    stop (signal, Ctrl-C) ends the ablation: rerun the same command to continue."""
    from sari_ray.stopping import Interrupted
    from sari_ray.train import run_training

    failed = []
    for label, run in pending_runs(runs):
        print(f"{label}: {'resuming' if has_checkpoints(run.dir) else 'training'} into {run.dir}", flush=True)
        t0 = time.monotonic()
        try:
            run_training(list(run.configs), list(run.overrides))
        except (Interrupted, KeyboardInterrupt):
            print(f"{label}: stopped", file=sys.stderr)
            raise
        except Exception as err:  # noqa: BLE001 - one run's failure is reported, the others still run
            print(f"{label}: FAILED after {time.monotonic() - t0:.0f} s: {type(err).__name__}: {err}", file=sys.stderr)
            failed.append({"arm": run.arm, "seed": run.seed, "dir": str(run.dir),
                           "error": f"{type(err).__name__}: {err}"})
            continue
        print(f"{label}: done in {time.monotonic() - t0:.0f} s", flush=True)
    return failed


def command_line(args, overrides: list[str]) -> str:
    """The command as a user would type it again (ablation.md shows it)."""
    parts = ["sari-ray ablate", args.config, *(f"--arm {a}" for a in args.arm), "--seeds", *map(str, args.seeds),
             "--out", args.out, *(["--threshold", str(args.threshold)] if args.threshold is not None else []),
             *(["--max-concurrent", str(args.max_concurrent)] if args.max_concurrent is not None else []),
             *overrides]
    return " ".join(parts)


def open_parent_run(out: Path, base, uri: str, args, arms: list[Arm], seeds: list[int], overrides: list[str]):
    """The ablation's MLflow run (reopened by a rerun into the same DIR and store), with what was asked as params."""
    from sari_ray.engines.tracking import Tracker

    plan_path = out / PLAN_FILE
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
    run_id = plan.get("parent_run_id") if plan.get("tracking_uri") == uri else None
    t = base.tracking
    parent = Tracker(uri, t.experiment, out, f"ablation-{out.name}", run_id, max_outage_s=t.max_outage_s,
                     request_timeout_s=t.request_timeout_s)
    asked = {"config": args.config, "arms": {a.name: list(a.overlays) for a in arms}, "seeds": seeds,
             "overrides": overrides}
    plan_path.write_text(json.dumps({"parent_run_id": parent.run_id, "tracking_uri": uri, **asked}, indent=1))
    parent.log_params({"ablation/config": args.config, "ablation/seeds": seeds, "ablation/overrides": overrides,
                       **{f"ablation/arm/{a.name}": ",".join(a.overlays) for a in arms}})
    return parent


def write_outputs(out: Path, runs: list[RunSpec], found: dict, failed: list[dict], threshold: float,
                  command: str) -> list[Path]:
    """ablation.json (the figures, every run and its MLflow run, failures), ablation.md, ablation.png."""
    from sari_ray import ablation

    summary = ablation.summarize(found, threshold)
    listing = []
    for run in runs:
        entry = {"arm": run.arm, "seed": run.seed, "dir": str(run.dir), "finished": is_finished(run.dir)}
        if entry["finished"]:
            s = json.loads((run.dir / "summary.json").read_text())
            entry.update({"mlflow_run_id": s.get("mlflow_run_id"), "seconds": s.get("seconds")})
        listing.append(entry)
    summary.update({"command": command, "runs": listing, "failed": failed})
    json_path, md_path = out / "ablation.json", out / "ablation.md"
    json_path.write_text(json.dumps(summary, indent=1))
    md = ablation.render_markdown(summary, command)
    if failed:
        md += "\n## Failed runs\n\n" + "".join(f"- `{f['arm']}` seed {f['seed']}: {f['error']}\n" for f in failed)
    md_path.write_text(md)
    png = ablation.write_plot(out / "ablation.png", summary, f"sari-ray ablate: {out.name}")
    return [json_path, md_path, png]


def log_arm_metrics(parent, summary: dict) -> None:
    """Each arm's means to the parent run (`ablation/<arm>/...`), for MLflow's compare view."""
    metrics = {}
    for name, arm in summary["arms"].items():
        metrics[f"ablation/{name}/final_accuracy"] = arm["final"]["overall"]["mean"]
        metrics[f"ablation/{name}/auc_hardest"] = arm["auc_hardest"]["mean"]
        diff = arm.get("diff_to_baseline", {}).get("overall")
        if diff:
            metrics[f"ablation/{name}/diff_to_baseline"] = diff["diff"]
    parent.log_metrics(metrics, 0)
