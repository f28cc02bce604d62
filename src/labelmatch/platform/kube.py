"""The Kubernetes API client every cluster-facing module uses, and where a pod finds its namespace."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: Where a pod finds its own namespace (the service account's mounted token directory).
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def api_client(host: str | None = None) -> Any:
    """A ``kubernetes.client.ApiClient``: in-cluster service account, else the kubeconfig.

    Args:
        host: An API server URL to talk to without credentials (tests' local API doubles).
    """
    from kubernetes import client, config

    if host is not None:
        configuration = client.Configuration()
        configuration.host = host
        return client.ApiClient(configuration)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        # The client reads $KUBECONFIG once, at import; read it now so a later setting counts.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    return client.ApiClient()


def pod_namespace(default: str = "default") -> str:
    """The namespace this pod runs in, or ``default`` outside a pod."""
    try:
        return NAMESPACE_FILE.read_text().strip() or default
    except OSError:
        return default
