"""Deployment: Kubernetes manifests rendered from the training config (`sari-ray deploy kuberay ...`).

`kuberay` renders the RayCluster / RayJob, `mlflow_server` the tracking server the training pods log to,
`k8s` the small builders for core objects they share. Everything here builds plain dicts: no client
library, no cluster access, no templates; tests validate the dicts against the KubeRay CRDs.
`local_ray` holds the `ray.init` arguments of the local cluster `sari-ray train` starts (bound to 127.0.0.1).
"""
