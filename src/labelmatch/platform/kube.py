"""The Kubernetes API client every cluster-facing module uses, and what a pod knows of itself
(its namespace; its name and UID through the downward API)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
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


#: The variables a step's pod gets from the downward API (``pipelines.platform.expose_pod``):
#: its own name (``metadata.name``) and UID (``metadata.uid``).
POD_NAME_VAR, POD_UID_VAR = "POD_NAME", "POD_UID"


@dataclass(frozen=True)
class PodIdentity:
    """The pod this process runs in, as the downward API names it.

    Attributes:
        name: ``metadata.name``.
        uid: ``metadata.uid``.
        namespace: The pod's namespace (:func:`pod_namespace`).
    """

    name: str
    uid: str
    namespace: str

    def owner_reference(self) -> dict[str, Any]:
        """An ``ownerReference`` to this pod: what it owns is garbage-collected when the pod is deleted.

        Neither ``controller`` (the object's controller is its operator, e.g. KubeRay) nor
        ``blockOwnerDeletion`` (with the ``OwnerReferencesPermissionEnforcement`` admission plugin,
        setting it needs ``update`` on ``pods/finalizers``; it only matters for a foreground
        deletion of the pod) is set. Valid only for an object in the pod's namespace.
        """
        return {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid}


def own_pod(env: Mapping[str, str] | None = None) -> PodIdentity | None:
    """This pod's name, UID and namespace, or ``None`` unless both ``POD_NAME`` and ``POD_UID`` are set."""
    env = os.environ if env is None else env
    name, uid = env.get(POD_NAME_VAR, "").strip(), env.get(POD_UID_VAR, "").strip()
    return PodIdentity(name, uid, pod_namespace()) if name and uid else None
