"""Builders for the core Kubernetes objects the deployment shares: one small pure function per kind.

Manifests are data: each function returns the dict `kubectl apply` would read, so tests can walk and
validate exactly what gets written (no template strings to drift from the code that fills them).
"""
from __future__ import annotations

from typing import Any

GIB = 1024**3
USER_ID = 1000  # the images' non-root user (docker/Dockerfile.*: USER 1000:1000)
LABEL_APP = "app.kubernetes.io/name"
LABEL_PART_OF = "app.kubernetes.io/part-of"
PART_OF = "sari-ray"
# On Secrets rendered only to show their shape: their values are empty, so one applied by mistake makes the
# pods that read it fail to start instead of running with a credential published in this repository.
PLACEHOLDER_ANNOTATIONS = {"sari-ray.io/placeholder": "true",
                           "sari-ray.io/create-with": "kubectl create secret generic (see deploy/README.md)"}


def gib(amount: int) -> str:
    """A Kubernetes quantity in GiB ("16Gi")."""
    return f"{int(amount)}Gi"


def labels(app: str) -> dict[str, str]:
    return {LABEL_APP: app, LABEL_PART_OF: PART_OF}


def metadata(name: str, namespace: str | None = None, *, app: str | None = None,
             annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = labels(app or name)
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def namespace_object(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": metadata(name, app=PART_OF)}


def secret(name: str, namespace: str, string_data: dict[str, str], *,
           annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": metadata(name, namespace, annotations=annotations), "stringData": dict(string_data)}


def config_map(name: str, namespace: str, data: dict[str, str], *, app: str | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(name, namespace, app=app),
            "data": dict(data)}


def persistent_volume_claim(name: str, namespace: str, *, size: str, access_mode: str,
                            storage_class: str | None) -> dict[str, Any]:
    """A claim; `storage_class=None` leaves the cluster default (omitting the field, not setting "")."""
    spec: dict[str, Any] = {"accessModes": [access_mode], "resources": {"requests": {"storage": size}}}
    if storage_class is not None:
        spec["storageClassName"] = storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": metadata(name, namespace),
            "spec": spec}


def cluster_ip_service(name: str, namespace: str, *, selector: dict[str, str], port: int,
                       port_name: str) -> dict[str, Any]:
    """Always ClusterIP: nothing of this deployment is exposed outside the cluster (users port-forward)."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(name, namespace),
            "spec": {"type": "ClusterIP", "selector": dict(selector),
                     "ports": [{"name": port_name, "port": port, "targetPort": port_name, "protocol": "TCP"}]}}


def deployment(name: str, namespace: str, *, pod_spec: dict[str, Any]) -> dict[str, Any]:
    """One replica, `Recreate`: the pod owns a ReadWriteOnce volume and a sqlite file, so two must never
    overlap during a rollout (a RollingUpdate would start the new pod while the old one holds both)."""
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(name, namespace),
            "spec": {"replicas": 1, "strategy": {"type": "Recreate"},
                     "selector": {"matchLabels": labels(name)},
                     "template": {"metadata": {"labels": labels(name)}, "spec": pod_spec}}}


# The KubeRay operator's pods, whichever way it was installed: Helm and kustomize disagree on
# app.kubernetes.io/name but both set this (KubeRay's own network isolation selects the operator by it too).
OPERATOR_POD_LABELS = {"app.kubernetes.io/component": "kuberay-operator"}
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by Kubernetes on every namespace, not user-editable


def same_namespace_ingress_policy(namespace: str, *, operator_namespace: str, operator_ports: list[int]
                                  ) -> dict[str, Any]:
    """Pods of the namespace accept connections from the namespace only, plus `operator_ports` from the KubeRay
    operator's pods in `operator_namespace` (it polls a RayJob's status through the dashboard's job API).
    Defence in depth under the auth rule: the Ray metrics port serves read-only metrics without a token; this
    keeps it (and anything else we did not think of) namespace-local. `kubectl port-forward` is unaffected
    (it enters the pod through the kubelet, not the pod network)."""
    operator = {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: operator_namespace}},
                "podSelector": {"matchLabels": dict(OPERATOR_POD_LABELS)}}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": metadata("same-namespace-only", namespace, app=PART_OF),
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {}}]},
                                 {"from": [operator], "ports": [{"protocol": "TCP", "port": p} for p in operator_ports]}]}}


def env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": str(value)}


def secret_env(name: str, secret_name: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}}


def volume_mount(name: str, path: str, *, read_only: bool = False) -> dict[str, Any]:
    mount: dict[str, Any] = {"name": name, "mountPath": path}
    if read_only:
        mount["readOnly"] = True
    return mount


def claim_volume(name: str, claim: str) -> dict[str, Any]:
    return {"name": name, "persistentVolumeClaim": {"claimName": claim}}


def shm_volume(size_gib: int) -> dict[str, Any]:
    """/dev/shm in RAM with a limit: the container runtime's default /dev/shm is 64 MiB, far too small for
    Ray's object store (which then falls back to slow disk). Its use counts toward the container's memory
    limit, which is why callers add `size_gib` to the pod's memory."""
    return {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": gib(size_gib)}}


def resources(*, cpus: int, memory_gib: int, gpus: int = 0) -> dict[str, Any]:
    """Requests equal to limits: the pods get exactly what Ray is told they have (no overcommit, no CPU
    throttling surprises, and the scheduler reserves the whole slice)."""
    amounts: dict[str, Any] = {"cpu": str(cpus), "memory": gib(memory_gib)}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def pod_security_context() -> dict[str, Any]:
    """Run as the images' user; fsGroup makes the shared volume writable by it (only on a root mismatch,
    so a large volume is not re-chowned at every pod start)."""
    return {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID, "fsGroup": USER_ID,
            "fsGroupChangePolicy": "OnRootMismatch"}


def container_security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def gpu_tolerations(gpus: int) -> list[dict[str, Any]]:
    """GPU node pools are commonly tainted `nvidia.com/gpu:NoSchedule`; GPU pods must tolerate it."""
    return [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}] if gpus else []
