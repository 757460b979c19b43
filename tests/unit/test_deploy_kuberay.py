"""KubeRay manifests: valid against the KubeRay v1.7.0 CRDs and the Kubernetes object schemas, every
reference resolvable, the committed examples equal to a fresh render, the CLI reproducible.

No cluster here: this is what can be checked without one (deploy/README.md, "What was not exercised").
The sizing and security rules are in test_deploy_kuberay_rules.py.
"""
from __future__ import annotations

import re
import shlex

import pytest
import yaml

from deploy_helpers import (EXAMPLE, EXAMPLE_COMMAND, REPO, all_pod_specs, crd_json_schema, example_config,
                            mutated, ray_groups, ray_specs, render, schema_errors)
from sari_ray.cli import main as cli_main
from sari_ray.config import load_config
from sari_ray.deploy.kuberay import render_manifests, volume_config_path
from sari_ray.deploy.ray_groups import DeployError

pytestmark = pytest.mark.unit

CRD_OF = {"raycluster.yaml": "ray.io_rayclusters.yaml", "rayjob.yaml": "ray.io_rayjobs.yaml"}
EXPECTED_FILES = {"namespace.yaml", "secrets.example.yaml", "storage.yaml", "mlflow.yaml", "raycluster.yaml",
                  "rayjob.yaml"}


@pytest.fixture(scope="module")
def manifests():
    return render()


def renders():
    """The example, a CPU config, and a pod shape with several actors per pod and custom node selectors."""
    from sari_ray.deploy.kuberay import Shapes
    from sari_ray.deploy.ray_groups import GroupShape

    cpu = load_config(REPO / "configs" / "demo_cpu.yaml")
    packed = Shapes(learner=GroupShape(actors_per_pod=4, node_selector={"gpu": "h100"}),
                    rollout=GroupShape(actors_per_pod=2, max_replicas=3))
    return {"example": lambda: render(), "cpu": lambda: render(cpu), "packed": lambda: render(shapes=packed)}


@pytest.mark.parametrize("variant", ["example", "cpu", "packed"])
@pytest.mark.parametrize("file", sorted(CRD_OF))
def test_ray_objects_validate_against_the_kuberay_crds(variant, file):
    obj = renders()[variant]()[file][0]
    assert obj["apiVersion"] == "ray.io/v1" and obj["kind"] == {"raycluster.yaml": "RayCluster",
                                                               "rayjob.yaml": "RayJob"}[file]
    assert schema_errors(crd_json_schema(CRD_OF[file]), obj) == []


@pytest.mark.parametrize("path, value, expected", [
    (["spec", "headGroupSpec", "template", "spec", "nodeSelctor"], {}, "nodeSelctor"),  # misspelt field
    (["spec", "workerGroupSpecs", 0, "replicas"], "two", "'two' is not of type 'integer'"),
    (["spec", "authOptions", "mode"], "tokens", "is not one of"),
    (["spec", "workerGroupSpecs", 0, "rayStartParams", "num-cpus"], 4, "4 is not of type 'string'"),
])
def test_the_crd_check_catches_what_the_api_server_would(manifests, path, value, expected):
    """The converted schema is not vacuous: typos, wrong types and bad enum values fail."""
    bad = mutated(manifests["raycluster.yaml"][0], path, value)
    assert any(expected in e for e in schema_errors(crd_json_schema(CRD_OF["raycluster.yaml"]), bad))


def test_int_or_string_fields_accept_both(manifests):
    """`x-kubernetes-int-or-string` (e.g. a probe's port) takes a number or a port name."""
    schema = crd_json_schema(CRD_OF["raycluster.yaml"])
    probe_path = ["spec", "headGroupSpec", "template", "spec", "containers", 0, "readinessProbe"]
    for port in (8265, "dashboard"):
        ok = mutated(manifests["raycluster.yaml"][0], probe_path, {"httpGet": {"path": "/", "port": port}})
        assert schema_errors(schema, ok) == []
    bad = mutated(manifests["raycluster.yaml"][0], probe_path, {"httpGet": {"path": "/", "port": 1.5}})
    assert schema_errors(schema, bad)


def test_what_the_operator_validates_beyond_the_schema(manifests):
    """KubeRay v1.7.0's Go-side checks (ValidateRayClusterSpec / metadata): DNS-1035 names within its
    length limits, rayVersion >= 2.52.0 with token auth, resources in rayStartParams *or* the top-level
    field (never both), no rayStartParams labels, and no field that a CEL rule of the CRD guards."""
    cluster, job = manifests["raycluster.yaml"][0], manifests["rayjob.yaml"][0]
    for obj, limit in ((cluster, 53), (job, 47)):
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
        assert len(obj["metadata"]["name"]) <= limit
    for spec in ray_specs(manifests).values():
        assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0)
        for group in ray_groups(spec).values():
            assert "resources" not in group and "labels" not in group and "labels" not in group["rayStartParams"]
        assert not {"managedBy", "gcsFaultToleranceOptions"} & set(spec)
    assert "deletionStrategy" not in job["spec"] and "managedBy" not in job["spec"]


def test_core_objects_are_well_formed(manifests):
    """Focused structural checks for the non-Ray objects (the full schemas: next test, when installed)."""
    kinds = {("v1", "Namespace"), ("v1", "Secret"), ("v1", "PersistentVolumeClaim"), ("v1", "ConfigMap"),
             ("v1", "Service"), ("apps/v1", "Deployment"), ("networking.k8s.io/v1", "NetworkPolicy")}
    quantity = re.compile(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|m)?$")
    for file, objects in manifests.items():
        for obj in objects:
            if obj["apiVersion"] == "ray.io/v1":
                continue
            assert (obj["apiVersion"], obj["kind"]) in kinds, (file, obj["kind"])
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
            assert obj["kind"] == "Namespace" or obj["metadata"]["namespace"] == "sari-ray"
            if obj["kind"] == "Secret":
                assert obj["type"] == "Opaque" and all(isinstance(v, str) for v in obj["stringData"].values())
            if obj["kind"] == "PersistentVolumeClaim":
                assert obj["spec"]["accessModes"][0] in {"ReadWriteOnce", "ReadWriteMany"}
                assert quantity.match(obj["spec"]["resources"]["requests"]["storage"])
            if obj["kind"] == "Deployment":
                template = obj["spec"]["template"]
                assert obj["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
                assert all(c["name"] and c["image"] for c in template["spec"]["containers"])
    for where, pod in all_pod_specs(manifests):
        for container in pod["containers"]:
            for amounts in container["resources"].values():
                assert all(quantity.match(v) for v in amounts.values()), where


def test_core_objects_validate_against_the_kubernetes_schemas(manifests):
    """Full Kubernetes 1.33 schemas, strict (unknown fields fail); Ray pod templates are checked as Pods."""
    import kubernetes_validate as kv
    for file, objects in manifests.items():
        for obj in objects:
            if obj["apiVersion"] != "ray.io/v1":
                kv.validate(obj, "1.33", strict=True)
    for where, pod in all_pod_specs(manifests):
        kv.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": pod}, "1.33", strict=True)


def test_every_reference_resolves(manifests):
    """Each Secret key, ConfigMap, claim and mounted volume a pod names is rendered (or, for Secrets,
    shown in secrets.example.yaml), and each Service selects a pod and one of its named ports."""
    secrets = {o["metadata"]["name"]: set(o["stringData"]) for o in manifests["secrets.example.yaml"]}
    config_maps = {o["metadata"]["name"] for f in manifests.values() for o in f if o["kind"] == "ConfigMap"}
    claims = {o["metadata"]["name"] for o in manifests["storage.yaml"]}
    for where, pod in all_pod_specs(manifests):
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get(ref["name"], ()), (where, var["name"])
            assert {m["name"] for m in container["volumeMounts"]} <= set(volumes), where
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
    for spec in ray_specs(manifests).values():
        assert spec["authOptions"]["secretName"] in secrets
    by_kind = {o["kind"]: o for o in manifests["mlflow.yaml"]}
    deployment, service = by_kind["Deployment"], by_kind["Service"]
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    port_names = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


def test_placeholder_secrets_hold_no_credential(manifests):
    """Shape only: empty values, so one applied by mistake fails closed (Ray / MLflow refuse to start)."""
    for secret in manifests["secrets.example.yaml"]:
        assert secret["metadata"]["annotations"]["sari-ray.io/placeholder"] == "true"
        assert all(v == "" for k, v in secret["stringData"].items() if k != "username")


def test_committed_examples_equal_a_fresh_render(tmp_path, monkeypatch):
    """deploy/kuberay/ holds exactly what the documented command renders now (no drift, no stale files)."""
    monkeypatch.chdir(REPO)
    args = shlex.split(EXAMPLE_COMMAND)[1:]
    assert cli_main([*args[:-1], str(tmp_path)]) == 0
    committed = REPO / "deploy" / "kuberay"
    assert {p.name for p in committed.glob("*.yaml")} == EXPECTED_FILES == {p.name for p in tmp_path.iterdir()}
    for name in EXPECTED_FILES:
        assert (committed / name).read_text() == (tmp_path / name).read_text(), (
            f"deploy/kuberay/{name} is stale: re-render with `{EXAMPLE_COMMAND}` (deploy/kuberay/README.md)")
    assert EXAMPLE_COMMAND in (committed / "README.md").read_text()


def test_cli_flag_becomes_the_jobs_override_and_re_rendering_from_the_job_agrees(tmp_path, monkeypatch):
    """`--rollout-workers 3` sets the group *and* the job's rollout.num_workers; loading the config the way
    the job will (its own command line) and rendering again gives the same cluster: nothing can drift."""
    monkeypatch.chdir(REPO)
    assert cli_main(["deploy", "kuberay", "--config", EXAMPLE, "--rollout-workers", "3", "--learners", "2",
                     "--out", str(tmp_path), "grpo.steps=10"]) == 0
    job = yaml.safe_load_all((tmp_path / "rayjob.yaml").read_text())
    job = next(job)
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:4] == ["python", "-m", "sari_ray.train", volume_config_path(EXAMPLE)]
    assert {"rollout.num_workers=3", "learner.num_workers=2", "grpo.steps=10"} <= set(command)
    assert ray_groups(job["spec"]["rayClusterSpec"])["rollout"]["replicas"] == 3
    overrides = command[4:]
    again = render_manifests(load_config(REPO / EXAMPLE, overrides), configs=[EXAMPLE], overrides=overrides)
    assert again["rayjob.yaml"][0]["spec"]["rayClusterSpec"] == job["spec"]["rayClusterSpec"]
    cluster = next(yaml.safe_load_all((tmp_path / "raycluster.yaml").read_text()))
    assert cluster["spec"] == job["spec"]["rayClusterSpec"]


def test_cli_reports_config_and_shape_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    base = ["deploy", "kuberay", "--config", EXAMPLE, "--out", str(tmp_path)]
    assert cli_main([*base, "rollout.num_wokers=2"]) == 2
    assert cli_main([*base, "--shape", "learner.actors_per_pod=3"]) == 2  # 4 learners do not split into 3s
    assert cli_main([*base, "--shape", "rollout.colour=3"]) == 2
    err = capsys.readouterr().err
    assert "rollout.num_wokers" in err and "learner.actors_per_pod=3" in err and "GROUP.FIELD=N" in err
    assert not any(tmp_path.iterdir())


def test_node_selector_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli_main(["deploy", "kuberay", "--config", EXAMPLE, "--out", str(tmp_path),
                     "--node-selector", "learner:cloud.google.com/gke-accelerator=nvidia-h100-80gb",
                     "--node-selector", "rollout:"]) == 0
    groups = ray_groups(next(yaml.safe_load_all((tmp_path / "raycluster.yaml").read_text()))["spec"])
    assert groups["learner"]["template"]["spec"]["nodeSelector"] == {
        "cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert "nodeSelector" not in groups["rollout"]["template"]["spec"]
    assert "# Rendered by: sari-ray deploy kuberay" in (tmp_path / "raycluster.yaml").read_text()


@pytest.mark.parametrize("path, expected", [
    ("configs/sari_qwen2_audio_7b.yaml", "/data/configs/sari_qwen2_audio_7b.yaml"),
    ("configs/ablations/free.yaml", "/data/configs/ablations/free.yaml"),
    ("/home/me/exp/my.yaml", "/data/configs/my.yaml"),
])
def test_config_path_on_the_volume(path, expected):
    assert volume_config_path(path) == expected


def test_configs_must_be_a_list():
    with pytest.raises(TypeError):
        render_manifests(example_config(), configs=EXAMPLE)
    with pytest.raises(DeployError, match="DNS-1035"):
        render_manifests(example_config(), configs=[EXAMPLE], name="Sari_Ray")


def test_a_stopped_job_and_its_pods_get_the_time_to_finish_a_step_and_checkpoint(tmp_path, monkeypatch):
    """`ray job stop` waits RAY_JOB_STOP_WAIT_TIME_S (3 s by default) before SIGKILL: the RayJob's runtime env and
    the long-lived cluster's submit command set it from cluster.stop_grace_s; every pod waits 30 s longer."""
    monkeypatch.chdir(REPO)
    assert cli_main(["deploy", "kuberay", "--config", EXAMPLE, "--out", str(tmp_path), "cluster.stop_grace_s=900"]) == 0
    job = next(yaml.safe_load_all((tmp_path / "rayjob.yaml").read_text()))
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"]) == {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "900"}}
    cluster = next(yaml.safe_load_all((tmp_path / "raycluster.yaml").read_text()))
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        assert [g["template"]["spec"]["terminationGracePeriodSeconds"] for g in groups] == [930] * 3
