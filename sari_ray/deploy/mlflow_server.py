"""The MLflow tracking server the training pods log to, and what the pods need to reach it.

Why it looks like this:
- Authentication: MLflow's basic-auth app (`--app-name basic-auth`), admin credentials from a Secret the
  user creates. MLflow must bind 0.0.0.0 inside its pod for the Service to reach it, and the rule of this
  deployment is that nothing listens on 0.0.0.0 without authentication. Unauthenticated requests get 401;
  `/health` alone is open (kubelet probes). The app needs Flask-WTF, which the `mlflow[auth]` pin brings.
- Exposure: a ClusterIP Service only; users `kubectl port-forward` it. `--allowed-hosts` lists the
  Service's DNS names and localhost (port-forward) and nothing else, so a request with any other Host
  header is refused (403) even from inside the cluster (DNS-rebinding protection).
- Storage: sqlite backend and proxied artifacts (`--serve-artifacts`) on one ReadWriteOnce volume. sqlite
  must not live on the shared ReadWriteMany volume (NFS-style locking corrupts it); for a Postgres
  backend see deploy/README.md.
- Image: the sari-ray image itself, so the server's MLflow is the exact pin the client uses.
"""
from __future__ import annotations

import configparser
import io
from typing import Any

from sari_ray.deploy import k8s

NAME = "mlflow"
PORT = 5000
AUTH_SECRET = "mlflow-auth"  # keys: username, password, flask-secret-key
STORE_CLAIM = "mlflow-store"
STORE_PATH = "/mlflow"
AUTH_CONFIG_PATH = "/etc/mlflow/basic_auth.ini"


def tracking_uri(namespace: str) -> str:
    return f"http://{NAME}.{namespace}.svc:{PORT}"


def allowed_hosts(namespace: str) -> list[str]:
    """Host headers MLflow accepts: the Service's names (with and without the port) and localhost for
    port-forwarding. No wildcard host: that would switch the DNS-rebinding check off."""
    names = [NAME, f"{NAME}.{namespace}", f"{NAME}.{namespace}.svc", f"{NAME}.{namespace}.svc.cluster.local"]
    return [*(h for n in names for h in (n, f"{n}:{PORT}")), "localhost:*", "127.0.0.1:*"]


def auth_config_ini() -> str:
    """basic_auth.ini: only where the user database lives (on the volume, not in the container's cwd).
    The admin name and password come from the Secret through MLFLOW_AUTH_ADMIN_* (never in a ConfigMap)."""
    parser = configparser.ConfigParser()
    parser["mlflow"] = {
        "default_permission": "READ",
        "database_uri": f"sqlite:///{STORE_PATH}/basic_auth.db",
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    out = io.StringIO()
    parser.write(out)
    return out.getvalue().strip() + "\n"


def server_args(namespace: str) -> list[str]:
    return ["mlflow", "server", "--app-name", "basic-auth", "--host", "0.0.0.0", "--port", str(PORT),
            "--backend-store-uri", f"sqlite:///{STORE_PATH}/mlflow.db",
            "--serve-artifacts", "--artifacts-destination", f"{STORE_PATH}/artifacts",
            "--allowed-hosts", ",".join(allowed_hosts(namespace))]


def client_env(namespace: str) -> list[dict[str, Any]]:
    """What a training pod needs to log: the URI and the credentials (MLflow's client reads these)."""
    return [k8s.env("MLFLOW_TRACKING_URI", tracking_uri(namespace)),
            k8s.secret_env("MLFLOW_TRACKING_USERNAME", AUTH_SECRET, "username"),
            k8s.secret_env("MLFLOW_TRACKING_PASSWORD", AUTH_SECRET, "password")]


def server_container(namespace: str, image: str) -> dict[str, Any]:
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10}
    return {
        "name": NAME, "image": image, "imagePullPolicy": "IfNotPresent",
        "command": server_args(namespace),
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": [k8s.env("MLFLOW_AUTH_CONFIG_PATH", AUTH_CONFIG_PATH),
                k8s.secret_env("MLFLOW_AUTH_ADMIN_USERNAME", AUTH_SECRET, "username"),
                k8s.secret_env("MLFLOW_AUTH_ADMIN_PASSWORD", AUTH_SECRET, "password"),
                k8s.secret_env("MLFLOW_FLASK_SERVER_SECRET_KEY", AUTH_SECRET, "flask-secret-key")],
        "volumeMounts": [k8s.volume_mount("store", STORE_PATH),
                         k8s.volume_mount("auth-config", "/etc/mlflow", read_only=True)],
        "resources": k8s.resources(cpus=2, memory_gib=4),
        "startupProbe": {**probe, "failureThreshold": 30},
        "readinessProbe": probe,
        "securityContext": k8s.container_security_context(),
    }


def server_objects(namespace: str, image: str) -> list[dict[str, Any]]:
    """ConfigMap (auth config), Deployment and ClusterIP Service; the volume claim is in storage.yaml."""
    pod_spec = {
        "securityContext": k8s.pod_security_context(),
        "containers": [server_container(namespace, image)],
        "volumes": [k8s.claim_volume("store", STORE_CLAIM),
                    {"name": "auth-config", "configMap": {"name": f"{NAME}-auth-config"}}],
    }
    return [k8s.config_map(f"{NAME}-auth-config", namespace, {"basic_auth.ini": auth_config_ini()}, app=NAME),
            k8s.deployment(NAME, namespace, pod_spec=pod_spec),
            k8s.cluster_ip_service(NAME, namespace, selector=k8s.labels(NAME), port=PORT, port_name="http")]


def auth_secret_placeholder(namespace: str) -> dict[str, Any]:
    """The Secret's shape, with empty values: applied by mistake, MLflow refuses to start (no admin
    password) rather than run with a password published in this repository."""
    return k8s.secret(AUTH_SECRET, namespace, {"username": "admin", "password": "", "flask-secret-key": ""},
                      annotations=k8s.PLACEHOLDER_ANNOTATIONS)
