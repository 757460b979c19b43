"""KubeRay manifests: the rules they exist to keep.

- Sized from the training config: counts and custom resources match the actors the driver starts, and
  changing one group's count changes that group (and the job's override of it) and nothing else.
- Authentication everywhere: every Ray pod trusts the token Secret; every listening port is Ray's
  (token auth) or MLflow's (basic auth); every Service is ClusterIP; nothing uses the host network.
- Object store in /dev/shm (RAM, sized), MLflow reachable from every Ray pod, runs on the shared volume.
"""
from __future__ import annotations

import json
import shlex

import pytest

from deploy_helpers import all_pod_specs, env_of, example_config, ray_groups, ray_pods, ray_specs, render
from sari_ray.deploy import mlflow_server
from sari_ray.deploy.kuberay import Shapes
from sari_ray.deploy.ray_groups import DATA_PATH, TOKEN_KEY, TOKEN_SECRET, DeployError, GroupShape

pytestmark = pytest.mark.unit
GIB = 1024**3


@pytest.fixture(scope="module")
def cfg():
    return example_config()


@pytest.fixture(scope="module")
def manifests(cfg):
    return render(cfg)


def differences(a, b, path=()):
    """Paths (tuples) where two YAML trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in differences(a.get(k), b.get(k), (*path, k))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, (*path, i))]
    return [] if a == b else [path]


def custom_resources(group):
    return json.loads(group["rayStartParams"].get("resources", "'{}'").strip("'"))


@pytest.mark.parametrize("group, flag, key, count, fields", [
    # the example's rollout pool is elastic (min_workers 1, max_workers 4): a start within it moves replicas only
    ("rollout", "rollout_workers", "rollout.num_workers", 3, ("replicas",)),
    ("learner", "learners", "learner.num_workers", 7, ("replicas", "minReplicas", "maxReplicas"))])
def test_changing_one_groups_count_changes_only_that_group(cfg, manifests, group, flag, key, count, fields):
    other = render(cfg, **{flag: count})
    index = 0 if group == "rollout" else 1
    changed = {d for file in manifests for d in differences(manifests[file], other[file], (file,))}
    groups = {("raycluster.yaml", 0, "spec", "workerGroupSpecs", index),
              ("rayjob.yaml", 0, "spec", "rayClusterSpec", "workerGroupSpecs", index)}
    assert changed == {g + (f,) for g in groups for f in fields} | {("rayjob.yaml", 0, "spec", "entrypoint")}
    entrypoint = shlex.split(other["rayjob.yaml"][0]["spec"]["entrypoint"])
    assert f"{key}={count}" in entrypoint
    assert ray_groups(other["raycluster.yaml"][0]["spec"])[group]["replicas"] == count


def test_the_elastic_rollout_pool_sets_the_groups_bounds_and_turns_the_autoscaler_on(cfg, manifests):
    spec = manifests["raycluster.yaml"][0]["spec"]
    rollout = ray_groups(spec)["rollout"]
    assert (rollout["minReplicas"], rollout["replicas"], rollout["maxReplicas"]) == (1, 2, 4)
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["upscalingMode"] == "Default"
    fixed = render(example_config(["rollout.min_workers=null", "rollout.max_workers=null"]))
    spec = fixed["raycluster.yaml"][0]["spec"]
    assert spec["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in spec
    assert {(g["minReplicas"], g["replicas"], g["maxReplicas"]) for g in spec["workerGroupSpecs"]} == {(2, 2, 2),
                                                                                                      (4, 4, 4)}


def test_a_start_outside_the_pools_bounds_is_refused(cfg):
    with pytest.raises(DeployError, match=r"--rollout-workers 7 is outside rollout.min_workers=1 .. "
                                          r"rollout.max_workers=4"):
        render(cfg, rollout_workers=7)


def test_custom_resources_exist_on_their_own_group_only(cfg, manifests):
    for spec in ray_specs(manifests).values():
        groups = ray_groups(spec)
        for name, other in (("rollout", "learner"), ("learner", "rollout")):
            section = cfg[name]
            assert custom_resources(groups[name]) == dict(section.resources)  # one actor per pod by default
            assert not set(section.resources) & set(custom_resources(groups[other]))
            assert not set(section.resources) & set(custom_resources(groups["head"]))
        assert groups["head"]["rayStartParams"]["num-cpus"] == "0"  # no actor that needs a CPU lands there


@pytest.mark.parametrize("per_pod", [1, 2, 4])
def test_pods_provide_exactly_what_their_actors_request(cfg, per_pod):
    shapes = Shapes(learner=GroupShape(actors_per_pod=per_pod), rollout=GroupShape(actors_per_pod=per_pod % 2 + 1))
    for group in ray_groups(render(cfg, shapes=shapes)["raycluster.yaml"][0]["spec"]).values():
        if "groupName" not in group:
            continue
        section, shape = cfg[group["groupName"]], getattr(shapes, group["groupName"])
        n = shape.actors_per_pod
        params = group["rayStartParams"]
        requests = group["template"]["spec"]["containers"][0]["resources"]["requests"]
        assert group["replicas"] * n == section.num_workers
        assert custom_resources(group) == {k: v * n for k, v in section.resources.items()}
        assert int(params["num-gpus"]) == n * section.num_gpus_per_worker == int(requests["nvidia.com/gpu"])
        assert int(params["num-cpus"]) == int(requests["cpu"]) >= n * section.num_cpus_per_worker


def test_cpu_only_config_requests_no_gpu_and_defaults_to_the_cpu_image():
    from sari_ray.config import load_config
    from deploy_helpers import REPO

    cpu = render(load_config(REPO / "configs" / "demo_cpu.yaml"))
    for where, pod in all_pod_specs(cpu):
        assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"], where
        assert "tolerations" not in pod and pod["containers"][0]["image"].endswith("-cpu")


def test_token_secret_is_trusted_by_the_head_and_every_worker_group(manifests):
    for file, spec in ray_specs(manifests).items():
        assert spec["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}
        assert set(ray_groups(spec)) == {"head", "rollout", "learner"}
    for file, group, pod in ray_pods(manifests):
        env = env_of(pod["containers"][0])
        assert env["RAY_AUTH_MODE"]["value"] == "token", (file, group)
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": TOKEN_SECRET, "key": TOKEN_KEY}


def test_nothing_listens_without_authentication(manifests):
    """The rule: every declared port belongs to a Ray container under token auth or to the MLflow server
    under basic auth; every Service is ClusterIP; no host network or host ports; an ingress policy keeps
    what needs no token (Ray's read-only metrics) inside the namespace; from outside it only the KubeRay operator
    reaches a pod, and only the dashboard port (token-protected; it polls RayJob status there)."""
    objects = [o for f in manifests.values() for o in f]
    for service in (o for o in objects if o["kind"] == "Service"):
        assert service["spec"]["type"] == "ClusterIP"
    for spec in ray_specs(manifests).values():
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP" and spec["authOptions"]["mode"] == "token"
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # behind the token
    for where, pod in all_pod_specs(manifests):
        assert not pod.get("hostNetwork") and pod["securityContext"]["runAsNonRoot"] is True, where
        for container in pod["containers"]:
            assert all("hostPort" not in p for p in container.get("ports", [])), where
            env = env_of(container)
            if where.startswith("mlflow"):
                args = container["command"]
                assert args[args.index("--app-name") + 1] == "basic-auth"
                assert "--disable-security-middleware" not in args
                assert "*" not in args[args.index("--allowed-hosts") + 1].split(",")
                assert [p["containerPort"] for p in container["ports"]] == [mlflow_server.PORT]
                assert "valueFrom" in env["MLFLOW_AUTH_ADMIN_PASSWORD"]
            else:
                assert env["RAY_AUTH_MODE"]["value"] == "token", where
    policy = next(o for o in manifests["namespace.yaml"] if o["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"] == {} and policy["spec"]["policyTypes"] == ["Ingress"]
    operator = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/component": "kuberay-operator"}}}
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {}}]},
                                         {"from": [operator], "ports": [{"protocol": "TCP", "port": 8265}]}]
    for rule in policy["spec"]["ingress"]:  # no rule without a source: nothing is open to the whole cluster
        assert rule.get("from"), rule
        for peer in rule["from"]:
            assert "ipBlock" not in peer and ("namespaceSelector" not in peer
                                              or peer["namespaceSelector"].get("matchLabels")), peer


def test_the_operator_namespace_is_the_only_outside_source_and_follows_the_flag(tmp_path, monkeypatch):
    """KubeRay may be installed elsewhere than deploy/README.md's kuberay-system: --operator-namespace moves
    the one outside rule (and is in the files' header, so the render stays reproducible)."""
    from deploy_helpers import EXAMPLE, REPO
    from sari_ray.cli import main as cli_main

    monkeypatch.chdir(REPO)
    assert cli_main(["deploy", "kuberay", "--config", EXAMPLE, "--operator-namespace", "ray-system",
                     "--out", str(tmp_path)]) == 0
    text = (tmp_path / "namespace.yaml").read_text()
    assert "--operator-namespace ray-system" in text.splitlines()[0]
    policy = [o for o in yaml_objects(text) if o["kind"] == "NetworkPolicy"][0]
    peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"] if "namespaceSelector" in peer]
    assert [p["namespaceSelector"]["matchLabels"] for p in peers] == [{"kubernetes.io/metadata.name": "ray-system"}]
    with pytest.raises(DeployError, match="--operator-namespace 'Ray_System'"):
        render(example_config(), operator_namespace="Ray_System")


def yaml_objects(text: str) -> list:
    import yaml

    return list(yaml.safe_load_all(text))


def test_mlflow_accepts_the_host_the_pods_use_and_only_named_hosts(manifests):
    deployment = next(o for o in manifests["mlflow.yaml"] if o["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    hosts = args[args.index("--allowed-hosts") + 1].split(",")
    uri = mlflow_server.tracking_uri("sari-ray")
    assert uri == "http://mlflow.sari-ray.svc:5000" and uri.removeprefix("http://") in hosts
    assert "localhost:*" in hosts  # kubectl port-forward
    assert "--serve-artifacts" in args and args[args.index("--artifacts-destination") + 1].startswith("/mlflow")
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": "store", "persistentVolumeClaim": {"claimName": mlflow_server.STORE_CLAIM}} in volumes
    ini = next(o for o in manifests["mlflow.yaml"] if o["kind"] == "ConfigMap")["data"]["basic_auth.ini"]
    assert "database_uri = sqlite:////mlflow/" in ini and "password" not in ini


def test_mlflow_tracking_uri_and_credentials_on_every_ray_pod(manifests):
    for file, group, pod in ray_pods(manifests):
        env = env_of(pod["containers"][0])
        assert env["MLFLOW_TRACKING_URI"]["value"] == mlflow_server.tracking_uri("sari-ray"), (file, group)
        assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == mlflow_server.AUTH_SECRET


def test_object_store_lives_in_a_sized_dev_shm(manifests):
    for file, group, pod in ray_pods(manifests):
        params = ray_groups(ray_specs(manifests)[file])[group]["rayStartParams"]
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm")
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])["emptyDir"]
        shm = int(volume["sizeLimit"].removesuffix("Gi")) * GIB
        memory = int(pod["containers"][0]["resources"]["limits"]["memory"].removesuffix("Gi")) * GIB
        assert volume["medium"] == "Memory", (file, group)
        assert int(params["object-store-memory"]) < shm < memory  # shm RAM counts toward the memory limit


def test_shared_volume_holds_configs_and_runs(manifests, cfg):
    data = next(o for o in manifests["storage.yaml"] if o["spec"]["accessModes"] == ["ReadWriteMany"])
    for file, group, pod in ray_pods(manifests):
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == DATA_PATH)
        claim = next(v for v in pod["volumes"] if v["name"] == mount["name"])["persistentVolumeClaim"]
        assert claim["claimName"] == data["metadata"]["name"], (file, group)
    command = shlex.split(manifests["rayjob.yaml"][0]["spec"]["entrypoint"])
    assert command[3].startswith(f"{DATA_PATH}/configs/")
    assert f"run.output_dir={DATA_PATH}/runs/{cfg.run.name}" in command


@pytest.mark.parametrize("overrides, kwargs, message", [
    (["rollout.num_gpus_per_worker=0.5"], {}, "Kubernetes allocates whole GPUs"),
    (["rollout.tensor_parallel_size=2"], {}, "tensor_parallel_size=2 needs rollout.num_gpus_per_worker >= 2"),
    (["learner.resources={rollout_slot: 1}"], {}, "requested by both rollout.resources and learner.resources"),
    (["run.output_dir=/scratch/run"], {}, "not on the shared volume /data"),
    (["tracking.tracking_uri=sqlite:///x.db"], {}, "tracking.tracking_uri=sqlite:///x.db is set"),
    ([], {"learners": 3, "shapes": Shapes(learner=GroupShape(actors_per_pod=2))}, "not a multiple"),
    ([], {"shapes": Shapes(rollout=GroupShape(max_replicas=1))}, "max_replicas=1 is below"),
])
def test_settings_the_cluster_cannot_honour_are_refused_with_the_fix(overrides, kwargs, message):
    with pytest.raises(DeployError, match=message.replace("(", r"\(").replace("[", r"\[")):
        render(example_config(overrides), **kwargs)


def test_a_group_without_custom_resources_is_refused():
    """Without its own custom resource, a group's actors could land on the other group's pods."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(example_config())
    raw["learner"]["resources"] = {}
    with pytest.raises(DeployError, match="'learner.resources' is empty"):
        render(OmegaConf.create(raw))


def test_relative_output_dir_is_placed_on_the_volume():
    command = shlex.split(render(example_config(["run.output_dir=runs/x"]))["rayjob.yaml"][0]["spec"]["entrypoint"])
    assert "run.output_dir=/data/runs/x" in command
