"""The Ray head and worker groups, sized from the training config.

The driver starts `rollout.num_workers` vLLM actors, each asking Ray for `rollout.num_cpus_per_worker`
CPUs, `rollout.num_gpus_per_worker` GPUs and the custom resources `rollout.resources` (`rollout_slot: 1`
by default); the same for `learner`. A worker group is planned from exactly those numbers: its pods
advertise the custom resources of the actors they are cut for and no others, so a rollout actor can only
land on a rollout pod and a learner only on a learner pod, and the group's replicas are the actor count
divided by actors per pod. The head advertises no CPUs, so no actor lands there (the driver runs there).

What the config does not say (how many actors share a pod, node pools) is a `GroupShape`; host memory and
the object store are sized from `sari-ray plan` (sari_ray/plan.py) unless a shape sets them.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from sari_ray.deploy import k8s

DATA_CLAIM = "sari-ray-data"
DATA_PATH = "/data"
TOKEN_SECRET = "ray-auth-token"
TOKEN_KEY = "auth_token"  # the key KubeRay's authOptions.secretName expects
SHM_HEADROOM_GIB = 4  # /dev/shm beyond the object store: NCCL, torch multiprocessing and vLLM use it too
DASHBOARD_PORT = 8265
GROUP_LABEL = "sari-ray.io/group"
POOL_LABEL = "sari-ray.io/pool"


class DeployError(ValueError):
    """A deployment that cannot match the training config; the message names the key and the fix."""


@dataclass(frozen=True)
class GroupShape:
    """How a worker group's pods are cut."""

    actors_per_pod: int = 1  # e.g. 8 learners on one 8-GPU node
    memory_gib_per_actor: int | None = None  # host RAM per actor; None: from `sari-ray plan` (plan.size_shapes)
    object_store_gib: int | None = None  # Ray object store per pod, in /dev/shm; None: from the plan (the sync's
    # bytes x the versions the driver keeps, on the learner pods)
    cpu_headroom: int = 2  # cores beyond the actors' own: raylet, engine helper processes, 0-CPU actors
    max_replicas: int | None = None  # None: = replicas (the driver starts exactly num_workers actors)
    node_selector: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HeadShape:
    cpus: int = 4  # for the driver and Ray's control plane; Ray is told 0, so no actor lands here
    memory_gib: int = 16
    object_store_gib: int = 4
    node_selector: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Shapes:
    head: HeadShape = field(default_factory=HeadShape)
    rollout: GroupShape = field(default_factory=lambda: GroupShape(node_selector={POOL_LABEL: "rollout"}))
    learner: GroupShape = field(default_factory=lambda: GroupShape(node_selector={POOL_LABEL: "learner"}))


@dataclass(frozen=True)
class GroupPlan:
    """One worker group's pods, derived from a config section and its shape."""

    name: str
    replicas: int
    max_replicas: int
    min_replicas: int  # below replicas only for the elastic rollout pool (rollout.min_workers)
    actors_per_pod: int
    cpus: int  # Kubernetes request == Ray num-cpus
    gpus: int  # Kubernetes request == Ray num-gpus
    memory_gib: int
    object_store_gib: int
    resources: dict[str, float]  # Ray custom resources per pod: the actors' requests x actors per pod
    node_selector: dict[str, str]

    @property
    def shm_gib(self) -> int:
        return self.object_store_gib + SHM_HEADROOM_GIB


def plan_group(name: str, section: Any, num_workers: int, shape: GroupShape,
               pool: tuple[int, int] | None = None) -> GroupPlan:
    """Pods for `num_workers` actors of config section `name` (rollout | learner). `pool`: the elastic rollout
    pool's (min_workers, max_workers): the group's minReplicas and maxReplicas follow them."""
    per_pod = shape.actors_per_pod
    low, high = pool or (num_workers, num_workers)
    if num_workers < 1 or per_pod < 1:
        raise DeployError(f"{name}: num_workers ({num_workers}) and actors_per_pod ({per_pod}) must be >= 1")
    if num_workers % per_pod:
        raise DeployError(f"{name}.num_workers={num_workers} is not a multiple of {name}.actors_per_pod="
                          f"{per_pod}: every pod is cut for exactly actors_per_pod actors; change either")
    if not section.resources:
        raise DeployError(f"config key '{name}.resources' is empty: without a custom resource the {name} actors "
                          f"could land on the other group's pods; set e.g. {name}.resources.{name}_slot=1")
    gpus = per_pod * section.num_gpus_per_worker
    if gpus != int(gpus):
        raise DeployError(f"{name}: {per_pod} actor(s) per pod x {name}.num_gpus_per_worker="
                          f"{section.num_gpus_per_worker} = {gpus} GPUs; Kubernetes allocates whole GPUs, so "
                          f"raise {name}.actors_per_pod (--shape {name}.actors_per_pod=N)")
    tp = section.get("tensor_parallel_size", 1)
    if 0 < section.num_gpus_per_worker < tp:
        raise DeployError(f"{name}.tensor_parallel_size={tp} needs {name}.num_gpus_per_worker >= {tp}: Ray shows "
                          f"an actor only the GPUs it requested, so the engine could not see its other shards")
    replicas = num_workers // per_pod
    # whole pods: at least min_workers, at most max_workers
    max_replicas = max(high // per_pod, replicas) if shape.max_replicas is None else shape.max_replicas
    if max_replicas < replicas:
        raise DeployError(f"{name}.max_replicas={max_replicas} is below the {replicas} pods that "
                          f"{name}.num_workers={num_workers} needs")
    shm_gib = shape.object_store_gib + SHM_HEADROOM_GIB
    return GroupPlan(
        name=name, replicas=replicas, max_replicas=max_replicas, min_replicas=min(-(-low // per_pod), replicas),
        actors_per_pod=per_pod,
        cpus=math.ceil(per_pod * section.num_cpus_per_worker) + shape.cpu_headroom, gpus=int(gpus),
        # /dev/shm is RAM charged to the container: the pod's memory covers the actors and the shm volume.
        memory_gib=per_pod * shape.memory_gib_per_actor + shm_gib, object_store_gib=shape.object_store_gib,
        resources={k: float(v) * per_pod for k, v in sorted(section.resources.items())},
        node_selector=dict(shape.node_selector))


def check_groups_apart(*plans: GroupPlan) -> None:
    """Each group's custom resources must be its own, or actors of one group could land on the other."""
    seen: dict[str, str] = {}
    for plan in plans:
        for resource in plan.resources:
            if resource in seen:
                raise DeployError(f"custom resource '{resource}' is requested by both {seen[resource]}.resources "
                                  f"and {plan.name}.resources; give each group its own")
            seen[resource] = plan.name


def ray_env(extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Token auth on every Ray container. KubeRay's authOptions injects the same two variables into Ray
    containers it builds; they are set here too so each pod template says which Secret it trusts (and
    the operator, finding them present, leaves them as they are)."""
    return [k8s.env("RAY_AUTH_MODE", "token"), k8s.secret_env("RAY_AUTH_TOKEN", TOKEN_SECRET, TOKEN_KEY), *extra]


def ray_pod_template(*, group: str, image: str, cpus: int, memory_gib: int, gpus: int, shm_gib: int,
                     node_selector: dict[str, str], env: list[dict[str, Any]],
                     ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "ray-head" if group == "head" else "ray-worker", "image": image, "imagePullPolicy": "IfNotPresent",
        "env": ray_env(env),
        "resources": k8s.resources(cpus=cpus, memory_gib=memory_gib, gpus=gpus),
        "volumeMounts": [k8s.volume_mount("data", DATA_PATH), k8s.volume_mount("dshm", "/dev/shm")],
        "securityContext": k8s.container_security_context(),
    }
    if ports:
        container["ports"] = ports
    spec: dict[str, Any] = {
        "securityContext": k8s.pod_security_context(),
        "containers": [container],
        "volumes": [k8s.claim_volume("data", DATA_CLAIM), k8s.shm_volume(shm_gib)],
    }
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if gpus:
        spec["tolerations"] = k8s.gpu_tolerations(gpus)
    return {"metadata": {"labels": {**k8s.labels("ray"), GROUP_LABEL: group}}, "spec": spec}


def head_group(shape: HeadShape, *, image: str, env: list[dict[str, Any]]) -> dict[str, Any]:
    """The head: GCS, dashboard / job API (token-protected) and the driver; `num-cpus: 0` keeps actors off."""
    shm_gib = shape.object_store_gib + SHM_HEADROOM_GIB
    ports = [{"name": "gcs-server", "containerPort": 6379, "protocol": "TCP"},
             {"name": "dashboard", "containerPort": DASHBOARD_PORT, "protocol": "TCP"},
             {"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    return {
        "serviceType": "ClusterIP",
        "rayStartParams": {"num-cpus": "0", "num-gpus": "0", "dashboard-host": "0.0.0.0",
                           "object-store-memory": str(shape.object_store_gib * k8s.GIB)},
        "template": ray_pod_template(group="head", image=image, cpus=shape.cpus, memory_gib=shape.memory_gib + shm_gib,
                                     gpus=0, shm_gib=shm_gib, node_selector=shape.node_selector, env=env,
                                     ports=ports),
    }


def ray_resources_param(resources: dict[str, float]) -> str:
    """`ray start --resources` value, single-quoted for the shell line KubeRay builds from rayStartParams."""
    amounts = {k: int(v) if float(v).is_integer() else v for k, v in sorted(resources.items())}
    return f"'{json.dumps(amounts)}'"


def worker_group(plan: GroupPlan, *, image: str, env: list[dict[str, Any]]) -> dict[str, Any]:
    """minReplicas: the pods the run cannot go on without (the learners: all of them; the rollout pool:
    rollout.min_workers), so neither the operator nor a stray patch shrinks the group below that; maxReplicas:
    as many as the config lets the driver use (rollout.max_workers)."""
    return {
        "groupName": plan.name,
        "replicas": plan.replicas,
        "minReplicas": plan.min_replicas,
        "maxReplicas": plan.max_replicas,
        "rayStartParams": {"num-cpus": str(plan.cpus), "num-gpus": str(plan.gpus),
                           "resources": ray_resources_param(plan.resources),
                           "object-store-memory": str(plan.object_store_gib * k8s.GIB)},
        "template": ray_pod_template(group=plan.name, image=image, cpus=plan.cpus, memory_gib=plan.memory_gib,
                                     gpus=plan.gpus, shm_gib=plan.shm_gib, node_selector=plan.node_selector,
                                     env=env),
    }
