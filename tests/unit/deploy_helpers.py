"""Shared by the test_deploy_* modules: render the example config, walk the pods of the rendered objects,
and turn the KubeRay CRDs into JSON Schemas that reject what the API server would."""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Iterator

import yaml

from sari_ray.config import load_config
from sari_ray.deploy.kuberay import render_files, render_manifests

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO.parent / "shared" / "data" / "kuberay"
EXAMPLE = "configs/sari_qwen2_audio_7b.yaml"
EXAMPLE_COMMAND = f"sari-ray deploy kuberay --config {EXAMPLE} --out deploy/kuberay"


def example_config(overrides: list[str] | tuple[str, ...] = ()):
    return load_config(REPO / EXAMPLE, list(overrides))


def render(cfg=None, **kwargs) -> dict[str, list[dict[str, Any]]]:
    """Render, then read back the YAML text: tests check what is written, not only the dicts."""
    manifests = render_manifests(cfg if cfg is not None else example_config(), configs=[EXAMPLE], **kwargs)
    return {file: list(yaml.safe_load_all(text)) for file, text in render_files(manifests, command="test").items()}


def ray_specs(manifests) -> dict[str, dict[str, Any]]:
    """The RayCluster spec and the RayJob's embedded cluster spec, by file."""
    return {"raycluster.yaml": manifests["raycluster.yaml"][0]["spec"],
            "rayjob.yaml": manifests["rayjob.yaml"][0]["spec"]["rayClusterSpec"]}


def ray_groups(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """'head', 'rollout', 'learner' -> group spec."""
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}


def ray_pods(manifests) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(file, group, pod spec) for every Ray pod template of the RayCluster and the RayJob."""
    for file, spec in ray_specs(manifests).items():
        for group, group_spec in ray_groups(spec).items():
            yield file, group, group_spec["template"]["spec"]


def all_pod_specs(manifests) -> Iterator[tuple[str, dict[str, Any]]]:
    for file, group, pod in ray_pods(manifests):
        yield f"{file}:{group}", pod
    for obj in manifests["mlflow.yaml"]:
        if obj["kind"] == "Deployment":
            yield "mlflow.yaml:Deployment", obj["spec"]["template"]["spec"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# ----------------------------------------------------------------------------- CRD -> JSON Schema
@functools.lru_cache(maxsize=None)
def crd_json_schema(file: str, version: str = "v1") -> dict[str, Any]:
    crd = yaml.load((CRDS / file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    return to_json_schema(served["schema"]["openAPIV3Schema"])


def to_json_schema(node: Any) -> Any:
    """Kubernetes structural OpenAPI v3 -> JSON Schema (draft 7), keeping what the API server enforces:
    - `x-kubernetes-int-or-string: true` allows an integer or a string (its `anyOf` may be absent);
    - `nullable: true` allows null;
    - an object with `properties` and neither `additionalProperties` nor preserve-unknown-fields rejects
      unknown fields (as `kubectl apply --validate=strict` does; the server would silently prune them,
      which hides a misspelt field);
    - other `x-kubernetes-*` keys (list types, CEL `x-kubernetes-validations`) are dropped: jsonschema
      cannot run CEL, and the CEL rules of these CRDs guard fields the manifests leave unset (tested).
    """
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif not key.startswith("x-kubernetes-") and key != "nullable":
            out[key] = to_json_schema(value)
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def schema_errors(schema: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def mutated(obj: dict[str, Any], path: list, value: Any) -> dict[str, Any]:
    """A deep copy of `obj` with the value at `path` set (the last key may be new)."""
    out = copy.deepcopy(obj)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out
