"""KubeRay manifests from the training config: `sari-ray deploy kuberay --config CONFIG --out DIR [k=v ...]`.

    sari-ray deploy kuberay --config configs/sari_qwen2_audio_7b.yaml --out deploy/kuberay
    sari-ray deploy kuberay --config configs/sari_qwen2_audio_7b.yaml --rollout-workers 4 \\
        --image registry.example.com/sari-ray:0.1.0-gpu --out /tmp/k8s grpo.steps=2000

Rendered from the config (not written beside it) so the cluster and the job cannot disagree: worker
groups are sized from `rollout` / `learner` (see ray_groups.py), and `--rollout-workers N` changes the
rollout group *and* becomes `rollout.num_workers=N` in the job's command line. Files written:
  namespace.yaml        Namespace + NetworkPolicy (ingress from the namespace only; the dashboard port also
                        from the KubeRay operator's pods, in --operator-namespace, which poll RayJob status)
  secrets.example.yaml  the two Secrets' shape, values empty; create the real ones with kubectl
  storage.yaml          shared ReadWriteMany volume (/data: models, data, configs, runs) + MLflow's volume
  mlflow.yaml           MLflow tracking server (basic auth, ClusterIP); see mlflow_server.py
  raycluster.yaml       long-lived cluster for `ray job submit` (token auth)
  rayjob.yaml           the same cluster spec, running the training once, then torn down
See deploy/README.md for applying them.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import shlex
import sys
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import yaml

from sari_ray.config import rollout_pool_bounds
from sari_ray.deploy import k8s, mlflow_server
from sari_ray.plan import size_shapes
from sari_ray.deploy.ray_groups import (DASHBOARD_PORT, DATA_CLAIM, DATA_PATH, TOKEN_KEY, TOKEN_SECRET,
                                        DeployError, GroupShape, HeadShape, Shapes, check_groups_apart,
                                        head_group, plan_group, worker_group)

__all__ = ["render_manifests", "render_files", "register_cli", "DeployError", "Shapes", "GroupShape",
           "HeadShape", "Storage"]

PINS = Path(__file__).resolve().parents[2] / "docker" / "requirements" / "common.txt"
MAX_NAME = 40  # RayJob names may have 47 characters (KubeRay); "-job" is appended to the cluster name
OPERATOR_NAMESPACE = "kuberay-system"  # where deploy/README.md installs the operator (helm --namespace)
STOP_MARGIN_S = 30  # a stopped pod's grace beyond the driver's stop window (cluster.stop_grace_s)


@dataclasses.dataclass(frozen=True)
class Storage:
    data_size: str = "1Ti"
    data_class: str | None = None  # must provide ReadWriteMany (NFS, Filestore, EFS, CephFS...); None: default
    mlflow_size: str = "20Gi"
    mlflow_class: str | None = None  # ReadWriteOnce block storage (sqlite); None: the cluster default


# Ray's autoscaler as a sidecar of the head: pods that hold no actor for a minute go (a rollout pod's worker holds
# its slot for the whole run, so only pods the pool never used, or one above a lowered maxReplicas, are removed)
AUTOSCALER_OPTIONS = {"upscalingMode": "Default", "idleTimeoutSeconds": 60,
                      "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                                    "limits": {"cpu": "1", "memory": "1Gi"}}}


def pinned_ray_version() -> str:
    """`spec.rayVersion` must be the Ray in the image (and >= 2.52 for token auth): the pin, read from
    docker/requirements/common.txt, which the images install."""
    if PINS.is_file():
        found = re.search(r"^ray(?:\[[^\]]*\])?==([\w.]+)", PINS.read_text(), re.M)
        if found:
            return found.group(1)
    return metadata.version("ray")


def default_image(cfg: Any) -> str:
    profile = "gpu" if cfg.rollout.num_gpus_per_worker > 0 or cfg.learner.num_gpus_per_worker > 0 else "cpu"
    return f"sari-ray:{metadata.version('sari-ray')}-{profile}"


def cluster_name(run_name: str) -> str:
    """run.name as a DNS-1035 label (what KubeRay requires of RayCluster / RayJob names)."""
    name = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-")[:MAX_NAME].rstrip("-")
    return name if re.match(r"^[a-z]", name) else f"r-{name}"[:MAX_NAME].rstrip("-")


def volume_config_path(config_path: str) -> str:
    """Where the job reads a config: /data/configs/<its path below the local configs/ directory>, so
    copying the whole configs/ directory to the volume serves bases and overlays alike."""
    parts = PurePosixPath(Path(config_path).as_posix()).parts
    configs_dirs = [i for i, part in enumerate(parts[:-1]) if part == "configs"]
    below = parts[configs_dirs[-1] + 1:] if configs_dirs else parts[-1:]
    return str(PurePosixPath(DATA_PATH, "configs", *below))


def run_output_dir(cfg: Any) -> str:
    """Checkpoints must outlive pods: a relative run.output_dir is placed on the shared volume, an
    absolute one must already be there."""
    out = PurePosixPath(cfg.run.output_dir)
    if not out.is_absolute():
        return str(PurePosixPath(DATA_PATH) / out)
    if PurePosixPath(DATA_PATH) not in out.parents:
        raise DeployError(f"run.output_dir={out} is not on the shared volume {DATA_PATH}: checkpoints would die "
                          f"with the pod; set run.output_dir={DATA_PATH}/runs/{cfg.run.name}")
    return str(out)


def job_command(cfg: Any, *, configs: Sequence[str], overrides: Sequence[str], rollout_workers: int,
                learners: int) -> list[str]:
    """The training command line: the config file(s), the user's overrides, then the values the cluster
    was cut for (so the job cannot ask for more actors than the pods provide)."""
    pinned = {"rollout.num_workers": rollout_workers, "learner.num_workers": learners,
              "run.output_dir": run_output_dir(cfg)}
    kept = [o for o in overrides if o.split("=", 1)[0] not in pinned]
    return ["python", "-m", "sari_ray.train", *map(volume_config_path, configs), *kept,
            *(f"{key}={value}" for key, value in pinned.items())]


def stop_runtime_env(stop_grace_s: float) -> dict[str, Any]:
    """The job's runtime environment: how long `ray job stop` waits between SIGTERM and SIGKILL (Ray's default, 3 s,
    is shorter than any checkpoint; the driver finishes its step and checkpoints in that time)."""
    return {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(int(stop_grace_s))}}


def submit_command(entrypoint: list[str], runtime_env: dict[str, Any]) -> str:
    """`ray job submit` for the long-lived cluster, through a port-forward of the head's dashboard."""
    return (f"ray job submit --address http://127.0.0.1:{DASHBOARD_PORT} --no-wait --runtime-env-json "
            f"{shlex.quote(json.dumps(runtime_env))} -- {shlex.join(entrypoint)}")


def ray_cluster_spec(cfg: Any, *, shapes: Shapes, image: str, namespace: str, rollout_workers: int,
                     learners: int) -> dict[str, Any]:
    """The spec the RayCluster and the RayJob share. Token auth names a Secret the user creates (so the
    long-lived cluster, the RayJob's cluster and `ray job submit` share one token) instead of letting
    KubeRay generate one per cluster."""
    pool = rollout_pool_bounds(cfg, rollout_workers)
    if not pool[0] <= rollout_workers <= pool[1]:
        raise DeployError(f"--rollout-workers {rollout_workers} is outside rollout.min_workers={pool[0]} .. "
                          f"rollout.max_workers={pool[1]} (the elastic pool's bounds): choose a start within them, "
                          f"or change the bounds")
    rollout = plan_group("rollout", cfg.rollout, rollout_workers, shapes.rollout, pool=pool)
    learner = plan_group("learner", cfg.learner, learners, shapes.learner)
    check_groups_apart(rollout, learner)
    env = mlflow_server.client_env(namespace)
    elastic = rollout.max_replicas > rollout.min_replicas
    spec = {
        "rayVersion": pinned_ray_version(),
        # an elastic rollout pool: Ray's autoscaler adds rollout pods up to maxReplicas (the driver asks it for
        # rollout.max_workers with request_resources) and honours a patched min/maxReplicas on a live run
        "enableInTreeAutoscaling": elastic,
        **({"autoscalerOptions": AUTOSCALER_OPTIONS} if elastic else {}),
        "authOptions": {"mode": "token", "secretName": TOKEN_SECRET},
        "headGroupSpec": head_group(shapes.head, image=image, env=env),
        "workerGroupSpecs": [worker_group(rollout, image=image, env=env), worker_group(learner, image=image, env=env)],
    }
    # a pod told to stop (eviction, scale-down, a job stopped) keeps its processes while the driver finishes the
    # step and writes the checkpoint (the learners write their part, the head runs the driver)
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        group["template"]["spec"]["terminationGracePeriodSeconds"] = int(cfg.cluster.stop_grace_s) + STOP_MARGIN_S
    return spec


def ray_cluster(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": k8s.metadata(name, namespace, app="ray"),
            "spec": spec}


def ray_job(name: str, namespace: str, spec: dict[str, Any], entrypoint: list[str],
            runtime_env: dict[str, Any]) -> dict[str, Any]:
    """One-shot: KubeRay starts a cluster from `spec`, submits the entrypoint, and deletes the cluster a few
    minutes after the job ends. No retries: a rerun is an explicit `run.resume=true`."""
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": k8s.metadata(f"{name}-job", namespace, app="ray"),
            "spec": {"entrypoint": shlex.join(entrypoint), "runtimeEnvYAML": yaml.safe_dump(runtime_env),
                     "rayClusterSpec": spec, "submissionMode": "K8sJobMode",
                     "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 600, "backoffLimit": 0}}


def check_tracking(cfg: Any) -> None:
    if cfg.tracking.tracking_uri:
        raise DeployError(f"tracking.tracking_uri={cfg.tracking.tracking_uri} is set: on the cluster the driver "
                          f"logs to the in-cluster MLflow server (MLFLOW_TRACKING_URI); "
                          f"pass tracking.tracking_uri=null")


def render_manifests(cfg: Any, *, configs: Sequence[str], overrides: Sequence[str] = (),
                     rollout_workers: int | None = None, learners: int | None = None, image: str | None = None,
                     namespace: str = "sari-ray", name: str | None = None, shapes: Shapes | None = None,
                     storage: Storage | None = None, operator_namespace: str = OPERATOR_NAMESPACE
                     ) -> dict[str, list[dict[str, Any]]]:
    """File name -> Kubernetes objects, for the loaded (validated) training config `cfg`.

    `configs` are the config file(s) `cfg` was loaded from, as the user named them (the job reads them
    from /data/configs/...); `overrides` the key=value overrides it was loaded with, passed on to the job.
    `rollout_workers` / `learners` replace the config's counts (`cfg` need not hold them yet).
    `operator_namespace`: where the KubeRay operator runs; the NetworkPolicy lets its pods reach the dashboard.
    """
    if isinstance(configs, (str, Path)):
        raise TypeError("configs is a list of config files")
    rollout_workers = cfg.rollout.num_workers if rollout_workers is None else rollout_workers
    learners = cfg.learner.num_workers if learners is None else learners
    image = image or default_image(cfg)
    shapes, storage = size_shapes(cfg, shapes or Shapes()), storage or Storage()  # unset sizes: from the plan
    name = name or cluster_name(cfg.run.name)
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > MAX_NAME:
        raise DeployError(f"--name {name!r} must be a DNS-1035 label of at most {MAX_NAME} characters")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", operator_namespace):
        raise DeployError(f"--operator-namespace {operator_namespace!r} must be a namespace name (DNS-1123 label)")
    check_tracking(cfg)
    spec = ray_cluster_spec(cfg, shapes=shapes, image=image, namespace=namespace,
                            rollout_workers=rollout_workers, learners=learners)
    entrypoint = job_command(cfg, configs=configs, overrides=overrides, rollout_workers=rollout_workers,
                             learners=learners)
    return {
        "namespace.yaml": [k8s.namespace_object(namespace),
                           k8s.same_namespace_ingress_policy(namespace, operator_namespace=operator_namespace,
                                                             operator_ports=[DASHBOARD_PORT])],
        "secrets.example.yaml": [
            k8s.secret(TOKEN_SECRET, namespace, {TOKEN_KEY: ""}, annotations=k8s.PLACEHOLDER_ANNOTATIONS),
            mlflow_server.auth_secret_placeholder(namespace)],
        "storage.yaml": [
            k8s.persistent_volume_claim(DATA_CLAIM, namespace, size=storage.data_size, access_mode="ReadWriteMany",
                                        storage_class=storage.data_class),
            k8s.persistent_volume_claim(mlflow_server.STORE_CLAIM, namespace, size=storage.mlflow_size,
                                        access_mode="ReadWriteOnce", storage_class=storage.mlflow_class)],
        "mlflow.yaml": mlflow_server.server_objects(namespace, image),
        "raycluster.yaml": [ray_cluster(name, namespace, spec)],
        "rayjob.yaml": [ray_job(name, namespace, copy.deepcopy(spec), entrypoint,
                                stop_runtime_env(cfg.cluster.stop_grace_s))],
    }


class _Dumper(yaml.SafeDumper):
    """Plain YAML: no anchors for objects used twice, multi-line strings (the MLflow auth config) as blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(str, lambda dumper, s: dumper.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def render_files(manifests: dict[str, list[dict[str, Any]]], *, command: str) -> dict[str, str]:
    """File name -> YAML text, each headed by the command that rendered it."""
    header = (f"# Rendered by: {command}\n"
              "# Do not edit by hand: change the config or the flags and re-render (deploy/README.md).\n")
    return {file: header + yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, explicit_start=True, width=110)
            for file, objects in manifests.items()}


# ---------------------------------------------------------------------------------------------- CLI
def register_cli(subparsers) -> None:
    deploy = subparsers.add_parser("deploy", help="render deployment manifests from a training config")
    targets = deploy.add_subparsers(dest="target", required=True)
    p = targets.add_parser("kuberay", help="RayCluster, RayJob, MLflow, volumes and Secrets for KubeRay v1.7",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, action="append", metavar="CONFIG.yaml",
                   help="training config; repeat for overlays (the job reads them from /data/configs/...)")
    p.add_argument("--rollout-workers", type=int, help="rollout actors (default: rollout.num_workers); "
                                                       "also passed to the job as rollout.num_workers")
    p.add_argument("--learners", type=int, help="learner actors (default: learner.num_workers); also passed on")
    p.add_argument("--image", help="sari-ray image (default: sari-ray:<version>-gpu, or -cpu for a CPU config)")
    p.add_argument("--namespace", default="sari-ray")
    p.add_argument("--operator-namespace", default=OPERATOR_NAMESPACE,
                   help="namespace of the KubeRay operator, the only source outside --namespace that the "
                        f"NetworkPolicy admits (to the dashboard port {DASHBOARD_PORT}; default: %(default)s)")
    p.add_argument("--name", help=f"RayCluster name (default: run.name as a DNS label, <= {MAX_NAME} chars)")
    p.add_argument("--shape", action="append", default=[], metavar="GROUP.FIELD=N",
                   help="pod shape, e.g. learner.actors_per_pod=8, rollout.memory_gib_per_actor=64, "
                        "head.cpus=8 (fields: ray_groups.GroupShape / HeadShape)")
    p.add_argument("--node-selector", action="append", default=[], metavar="GROUP:KEY=VALUE",
                   help="replaces GROUP's default node selector (sari-ray.io/pool=GROUP); 'GROUP:' clears it")
    p.add_argument("--storage-class", help="storage class of the shared ReadWriteMany volume (default: cluster's)")
    p.add_argument("--data-size", default=Storage.data_size, help="size of the shared volume")
    p.add_argument("--out", required=True, help="directory to write the YAML files to")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides (passed to the job)")
    p.set_defaults(func=_cli)


def parse_shapes(shape_args: Sequence[str], selector_args: Sequence[str]) -> Shapes:
    """`--shape group.field=N` and `--node-selector group:key=value` on top of the default shapes."""
    groups: dict[str, Any] = dataclasses.asdict(Shapes())
    cleared: set[str] = set()
    for arg in selector_args:
        group, _, pair = arg.partition(":")
        if group not in groups:
            raise DeployError(f"--node-selector {arg!r}: group must be one of {sorted(groups)}")
        if group not in cleared:  # the first selector given for a group replaces its default
            groups[group]["node_selector"] = {}
            cleared.add(group)
        if pair:
            key, sep, value = pair.partition("=")
            if not sep:
                raise DeployError(f"--node-selector {arg!r}: expected GROUP:KEY=VALUE")
            groups[group]["node_selector"][key] = value
    for arg in shape_args:
        key, sep, value = arg.partition("=")
        group, _, name = key.partition(".")
        if not sep or group not in groups or name not in groups[group] or name == "node_selector":
            fields = {g: sorted(f for f in v if f != "node_selector") for g, v in groups.items()}
            raise DeployError(f"--shape {arg!r}: expected GROUP.FIELD=N with fields {fields}")
        try:
            groups[group][name] = int(value)
        except ValueError:
            raise DeployError(f"--shape {arg!r}: {value!r} is not a whole number") from None
    return Shapes(head=HeadShape(**groups["head"]), rollout=GroupShape(**groups["rollout"]),
                  learner=GroupShape(**groups["learner"]))


def canonical_command(args: argparse.Namespace) -> str:
    """The command line that reproduces the files (for their header), whatever order flags were given in."""
    words = ["sari-ray", "deploy", "kuberay", *(w for c in args.config for w in ("--config", c))]
    for flag in ("rollout_workers", "learners", "image", "namespace", "operator_namespace", "name",
                 "storage_class", "data_size"):
        value = getattr(args, flag)
        if value is not None and value != _DEFAULTS.get(flag):
            words += [f"--{flag.replace('_', '-')}", str(value)]
    words += [w for s in args.shape for w in ("--shape", s)]
    words += [w for s in args.node_selector for w in ("--node-selector", s)]
    return shlex.join([*words, "--out", "DIR", *args.overrides])


_DEFAULTS = {"namespace": "sari-ray", "operator_namespace": OPERATOR_NAMESPACE, "data_size": Storage.data_size}


def _cli(args: argparse.Namespace) -> int:
    from sari_ray.config import ConfigError, load_config

    counts = [f"rollout.num_workers={args.rollout_workers}"] * (args.rollout_workers is not None)
    counts += [f"learner.num_workers={args.learners}"] * (args.learners is not None)
    try:
        cfg = load_config(args.config, [*args.overrides, *counts])
        manifests = render_manifests(
            cfg, configs=args.config, overrides=args.overrides, rollout_workers=args.rollout_workers,
            learners=args.learners, image=args.image, namespace=args.namespace, name=args.name,
            shapes=parse_shapes(args.shape, args.node_selector),
            storage=Storage(data_size=args.data_size, data_class=args.storage_class),
            operator_namespace=args.operator_namespace)
    except (ConfigError, DeployError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for file, text in render_files(manifests, command=canonical_command(args)).items():
        (out / file).write_text(text)
    print(summary(manifests, out))
    return 0


def summary(manifests: dict[str, list[dict[str, Any]]], out: Path) -> str:
    cluster = manifests["raycluster.yaml"][0]
    job = manifests["rayjob.yaml"][0]
    lines = [f"wrote {', '.join(manifests)} to {out}/"]
    for group in cluster["spec"]["workerGroupSpecs"]:
        res = group["template"]["spec"]["containers"][0]["resources"]["requests"]
        lines.append(f"  {group['groupName']}: {group['replicas']} pod(s) x {res.get('nvidia.com/gpu', 0)} GPU, "
                     f"{res['cpu']} CPU, {res['memory']}; Ray resources {group['rayStartParams']['resources']}")
    lines += ["one-shot:     kubectl apply -f " + str(out / "rayjob.yaml"),
              "long-lived:   kubectl apply -f " + str(out / "raycluster.yaml") + ", port-forward "
              f"svc/{cluster['metadata']['name']}-head-svc {DASHBOARD_PORT}, then",
              "  " + submit_command(shlex.split(job["spec"]["entrypoint"]), yaml.safe_load(job["spec"]["runtimeEnvYAML"])),
              "(deploy/README.md: Secrets, volumes and MLflow first)"]
    return "\n".join(lines)
