"""Pod Security Standards: every pod spec labelmatch ships passes the "restricted" profile.

**The rules.** :data:`CONTROLS` holds one JSON Schema per control of the Pod Security Standards as
documented for Kubernetes v1.35, https://kubernetes.io/docs/concepts/security/pod-security-standards/
("Baseline" and "Restricted"; the page's tables are generated from the doc comments of the checks in
k8s.io/pod-security-admission ``policy/check_*.go``, tag v0.35.0, which is where each rule's
``fields`` and allowed values were copied from). Restricted is everything of baseline plus its own
controls. Where the page allows a container-level field to stay undefined because the pod-level one
is set (runAsNonRoot, seccomp), the schema says exactly that; the user-namespace exceptions
(``hostUsers: false``) are not modelled, so these rules are stricter than the admission plugin there.
Each rule is shown to reject its documented violation (:func:`test_each_control_rejects_its_violation`).

**The pod specs** (every one we ship, as the cluster will run it):

* every workload every ``ci/`` values file of both charts renders (the predictor of the
  InferenceService, the ``helm test`` Pod; a kind the check does not know fails the test);
* the InferenceService the deploy step creates (``labelmatch.platform.kserve.inference_service``);
* with KServe's ``storage-initializer`` init container as KServe v0.20's webhook injects it from its
  ``default`` ClusterStorageContainer: without a security context, so the cluster must give it one
  (docs/kubernetes.md, Pod Security, has the patch; this test reads it from there);
* the RayJob's pods (``labelmatch.platform.kuberay.build_rayjob``, the production shape: the tune
  step's RayJob with the training IR's defaults, and the batch RayJob): the head, the workers with
  the ``wait-gcs-ready`` init container KubeRay v1.7.0 adds (a copy of the Ray container's security
  context), and the submitter Job's pod (``submitterPodTemplate``; without one, KubeRay's default
  submitter has no security context at all);
* every step of every compiled pipeline (``pipelines/compiled/*.yaml``).

**What the KFP IR can express, and what only the cluster applies.** The IR's ``platforms.kubernetes``
section per executor (kfp-kubernetes' ``KubernetesExecutorConfig``) can set ``runAsUser``,
``runAsGroup`` and ``runAsNonRoot`` (``securityContext``), pod labels and annotations, and volumes of
the kinds secret, configMap, PVC, generic ephemeral and emptyDir; it has no field for privileged,
capabilities, allowPrivilegeEscalation, seccomp, host namespaces, host ports, hostPath, sysctls,
SELinux or procMount (:data:`IR_FIELDS` lists every field and what it can do; a new field fails
the test). The IR check therefore asserts what is ours: every container step runs as non-root with
a non-zero user. The rest is filled by the KFP backend (>= 2.16; read from the 2.17.0 source,
``backend/src/v2/compiler/argocompiler/security_context.go`` and ``backend/src/v2/driver/k8s.go``):
the executor pod gets a pod-level seccomp RuntimeDefault, the user container allowPrivilegeEscalation
false, capabilities drop ALL and seccomp RuntimeDefault, then the IR's identity fields; the
``kfp-launcher`` init container the full restricted context. :func:`kfp_executor_pod` models that
and the full policy runs on the model. Not modelled, so applied by the cluster only: Argo's own
``init``/``wait`` containers (their security context is the workflow controller's ``executor``
setting) and an older KFP backend, which adds none of the above.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from test_chart import CI_VALUES, helm, render  # noqa: F401 (helm: the fixture)

from labelmatch import __version__

ROOT = Path(__file__).resolve().parents[1]
COMPILED = sorted((ROOT / "pipelines" / "compiled").glob(f"*-{__version__}.yaml"))
CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")

# -- the controls ---------------------------------------------------------------------------------

BASELINE_CAPABILITIES = ["AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"]
SAFE_SYSCTLS = ["kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_syncookies",
                "net.ipv4.ping_group_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.ip_local_reserved_ports", "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes", "net.ipv4.tcp_rmem",
                "net.ipv4.tcp_wmem"]
SELINUX_TYPES = ["", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"]
RESTRICTED_VOLUME_TYPES = ["configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                           "persistentVolumeClaim", "projected", "secret", "image"]
SECCOMP_TYPES = ["RuntimeDefault", "Localhost"]


def _pod_spec(properties: dict) -> dict:
    """A schema over a pod ``{"metadata", "spec"}`` constraining ``spec`` ``properties``."""
    return {"properties": {"spec": {"properties": properties}}}


def _pod_context(properties: dict) -> dict:
    return _pod_spec({"securityContext": {"properties": properties}})


def _containers(schema: dict) -> dict:
    """``schema`` for every container, init container and ephemeral container."""
    return _pod_spec({name: {"items": schema} for name in CONTAINER_LISTS})


def _container_context(properties: dict, required: list[str] | None = None) -> dict:
    context: dict[str, Any] = {"properties": properties}
    if required is not None:
        context["required"] = required
        return _containers({"required": ["securityContext"], "properties": {"securityContext": context}})
    return _containers({"properties": {"securityContext": context}})


def _both(properties: dict) -> dict:
    """``properties`` of the pod's and of every container's security context."""
    return {"allOf": [_pod_context(properties), _container_context(properties)]}


_HOST_EMPTY = {"properties": {"host": {"const": ""}}}
_HANDLER = {"properties": {"httpGet": _HOST_EMPTY, "tcpSocket": _HOST_EMPTY}}

CONTROLS: list[dict[str, Any]] = [
    # -- Baseline ---------------------------------------------------------------------------------
    {"name": "HostProcess", "profile": "baseline",
     "fields": "spec.securityContext.windowsOptions.hostProcess, spec.containers[*].securityContext."
               "windowsOptions.hostProcess (and init/ephemeral containers)",
     "allowed": "undefined/nil, false",
     "schema": _both({"windowsOptions": {"properties": {"hostProcess": {"const": False}}}})},
    {"name": "Host Namespaces", "profile": "baseline",
     "fields": "spec.hostNetwork, spec.hostPID, spec.hostIPC", "allowed": "undefined/nil, false",
     "schema": _pod_spec({key: {"const": False} for key in ("hostNetwork", "hostPID", "hostIPC")})},
    {"name": "Privileged Containers", "profile": "baseline",
     "fields": "spec.containers[*].securityContext.privileged (and init/ephemeral)",
     "allowed": "undefined/nil, false",
     "schema": _container_context({"privileged": {"const": False}})},
    {"name": "Capabilities (baseline)", "profile": "baseline",
     "fields": "spec.containers[*].securityContext.capabilities.add (and init/ephemeral)",
     "allowed": "undefined/nil, " + ", ".join(BASELINE_CAPABILITIES),
     "schema": _container_context({"capabilities": {"properties": {
         "add": {"items": {"enum": BASELINE_CAPABILITIES}}}}})},
    {"name": "HostPath Volumes", "profile": "baseline", "fields": "spec.volumes[*].hostPath",
     "allowed": "undefined/nil",
     "schema": _pod_spec({"volumes": {"items": {"not": {"required": ["hostPath"]}}}})},
    {"name": "Host Ports", "profile": "baseline",
     "fields": "spec.containers[*].ports[*].hostPort (and init/ephemeral)", "allowed": "undefined/nil, 0",
     "schema": _containers({"properties": {"ports": {"items": {"properties": {"hostPort": {"const": 0}}}}}})},
    {"name": "Host Probes / Lifecycle Hooks", "profile": "baseline",
     "fields": "spec.containers[*].{liveness,readiness,startup}Probe.{httpGet,tcpSocket}.host, "
               "spec.containers[*].lifecycle.{postStart,preStop}.{httpGet,tcpSocket}.host (and init)",
     "allowed": "undefined/nil, \"\"",
     "schema": _containers({"properties": {
         **{probe: _HANDLER for probe in ("livenessProbe", "readinessProbe", "startupProbe")},
         "lifecycle": {"properties": {"postStart": _HANDLER, "preStop": _HANDLER}}}})},
    {"name": "AppArmor", "profile": "baseline",
     "fields": "metadata.annotations['container.apparmor.security.beta.kubernetes.io/*'], "
               "spec.securityContext.appArmorProfile.type, spec.containers[*].securityContext."
               "appArmorProfile.type (and init/ephemeral)",
     "allowed": "annotations: runtime/default, localhost/*, empty, undefined; type: RuntimeDefault, "
                "Localhost, undefined",
     "schema": {"allOf": [
         {"properties": {"metadata": {"properties": {"annotations": {"patternProperties": {
             r"^container\.apparmor\.security\.beta\.kubernetes\.io/": {
                 "anyOf": [{"enum": ["", "runtime/default"]}, {"pattern": "^localhost/"}]}}}}}}},
         _both({"appArmorProfile": {"properties": {"type": {"enum": ["RuntimeDefault", "Localhost"]}}}})]}},
    {"name": "SELinux", "profile": "baseline",
     "fields": "spec.securityContext.seLinuxOptions.{type,user,role}, spec.containers[*].securityContext."
               "seLinuxOptions.{type,user,role} (and init/ephemeral)",
     "allowed": "type: " + ", ".join(repr(t) for t in SELINUX_TYPES) + "; user, role: undefined/empty",
     "schema": _both({"seLinuxOptions": {"properties": {
         "type": {"enum": SELINUX_TYPES}, "user": {"const": ""}, "role": {"const": ""}}}})},
    {"name": "/proc Mount Type", "profile": "baseline",
     "fields": "spec.containers[*].securityContext.procMount (and init/ephemeral)",
     "allowed": "undefined/nil, Default",
     "schema": _container_context({"procMount": {"const": "Default"}})},
    {"name": "Seccomp (baseline)", "profile": "baseline",
     "fields": "spec.securityContext.seccompProfile.type, spec.containers[*].securityContext."
               "seccompProfile.type (and init/ephemeral)",
     "allowed": "undefined/nil, RuntimeDefault, Localhost",
     "schema": _both({"seccompProfile": {"properties": {"type": {"enum": SECCOMP_TYPES}}}})},
    {"name": "Sysctls", "profile": "baseline", "fields": "spec.securityContext.sysctls[*].name",
     "allowed": "undefined/empty, " + ", ".join(SAFE_SYSCTLS),
     "schema": _pod_context({"sysctls": {"items": {"properties": {"name": {"enum": SAFE_SYSCTLS}}}}})},
    # -- Restricted -------------------------------------------------------------------------------
    {"name": "Volume Types", "profile": "restricted", "fields": "spec.volumes[*] (its source)",
     "allowed": ", ".join(RESTRICTED_VOLUME_TYPES),
     "schema": _pod_spec({"volumes": {"items": {
         "propertyNames": {"enum": ["name", *RESTRICTED_VOLUME_TYPES]}}}})},
    {"name": "Privilege Escalation", "profile": "restricted",
     "fields": "spec.containers[*].securityContext.allowPrivilegeEscalation (and init/ephemeral)",
     "allowed": "false",
     "schema": _container_context({"allowPrivilegeEscalation": {"const": False}},
                                  required=["allowPrivilegeEscalation"])},
    {"name": "Running as Non-root", "profile": "restricted",
     "fields": "spec.securityContext.runAsNonRoot, spec.containers[*].securityContext.runAsNonRoot "
               "(and init/ephemeral)",
     "allowed": "true; undefined/nil at container level if the pod level is true",
     "schema": {"allOf": [
         _container_context({"runAsNonRoot": {"const": True}}),
         {"anyOf": [
             {"required": ["spec"], "properties": {"spec": {"required": ["securityContext"], "properties": {
                 "securityContext": {"required": ["runAsNonRoot"], "properties": {
                     "runAsNonRoot": {"const": True}}}}}}},
             _container_context({"runAsNonRoot": {"const": True}}, required=["runAsNonRoot"])]}]}},
    {"name": "Running as Non-root user", "profile": "restricted",
     "fields": "spec.securityContext.runAsUser, spec.containers[*].securityContext.runAsUser "
               "(and init/ephemeral)",
     "allowed": "non-zero, undefined/nil",
     "schema": _both({"runAsUser": {"not": {"const": 0}}})},
    {"name": "Seccomp (restricted)", "profile": "restricted",
     "fields": "spec.securityContext.seccompProfile.type, spec.containers[*].securityContext."
               "seccompProfile.type (and init/ephemeral)",
     "allowed": "RuntimeDefault, Localhost; undefined at container level if the pod level is set",
     "schema": {"allOf": [
         _container_context({"seccompProfile": {"properties": {"type": {"enum": SECCOMP_TYPES}}}}),
         {"anyOf": [
             {"required": ["spec"], "properties": {"spec": {"required": ["securityContext"], "properties": {
                 "securityContext": {"required": ["seccompProfile"], "properties": {"seccompProfile": {
                     "required": ["type"], "properties": {"type": {"enum": SECCOMP_TYPES}}}}}}}}},
             _container_context({"seccompProfile": {"required": ["type"], "properties": {
                 "type": {"enum": SECCOMP_TYPES}}}}, required=["seccompProfile"])]}]}},
    {"name": "Capabilities (restricted)", "profile": "restricted",
     "fields": "spec.containers[*].securityContext.capabilities.{drop,add} (and init/ephemeral)",
     "allowed": "drop must include ALL; add: undefined/empty, NET_BIND_SERVICE",
     "schema": _container_context({"capabilities": {"required": ["drop"], "properties": {
         "drop": {"contains": {"const": "ALL"}}, "add": {"items": {"const": "NET_BIND_SERVICE"}}}}},
         required=["capabilities"])},
]


def violations(pod: dict, profile: str = "restricted") -> list[str]:
    """Every control of ``profile`` (restricted includes baseline) that ``pod`` fails, as
    ``"<control>: <JSON path>: <why>"``."""
    wanted = ("baseline",) if profile == "baseline" else ("baseline", "restricted")
    found = []
    for control in CONTROLS:
        if control["profile"] not in wanted:
            continue
        for error in jsonschema.Draft202012Validator(control["schema"]).iter_errors(pod):
            found.append(f"{control['name']}: {error.json_path}: {error.message}")
    return found


def failed_controls(pod: dict) -> set[str]:
    return {found.split(":", 1)[0] for found in violations(pod)}


# -- the pods the cluster runs --------------------------------------------------------------------

#: Kinds the charts render that hold no pod template.
NON_POD_KINDS = {"ConfigMap", "Secret", "ServiceAccount", "Role", "RoleBinding", "PodDisruptionBudget",
                 "PrometheusRule", "NetworkPolicy", "Service"}


def _template(template: dict) -> dict:
    return {"metadata": template.get("metadata", {}), "spec": template["spec"]}


def pods_of(doc: dict) -> list[tuple[str, dict]]:
    """``(where, pod)`` for every pod template in a manifest (``pod = {"metadata", "spec"}``)."""
    kind, name = doc["kind"], doc["metadata"]["name"]
    if kind == "Pod":
        return [(f"Pod/{name}", _template(doc))]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [(f"{kind}/{name}", _template(doc["spec"]["template"]))]
    if kind == "CronJob":
        return [(f"CronJob/{name}", _template(doc["spec"]["jobTemplate"]["spec"]["template"]))]
    if kind == "InferenceService":
        # A component is a PodSpec inline plus KServe's own fields, which no control names.
        return [(f"InferenceService/{name}/{component}",
                 {"metadata": {"annotations": spec.get("annotations", {}), "labels": spec.get("labels", {})},
                  "spec": spec})
                for component, spec in doc["spec"].items()
                if component in ("predictor", "transformer", "explainer")]
    if kind == "RayJob":
        return rayjob_pods(doc)
    assert kind in NON_POD_KINDS, f"{kind}/{name}: a kind this check does not know; add how to find its pods"
    return []


def with_storage_initializer(pod: dict, storage_container: dict) -> dict:
    """``pod`` with the init container KServe v0.20's webhook injects for an ``s3://`` storage URI:
    the ClusterStorageContainer's container, named ``storage-initializer``, with the model volume
    (pkg/webhook/admission/pod/storage_initializer_injector.go, pkg/utils/storage.go)."""
    pod = copy.deepcopy(pod)
    container = {**copy.deepcopy(storage_container), "name": "storage-initializer",
                 "args": ["s3://labelmatch/models/onnx/0.1.0", "/mnt/models"],
                 "volumeMounts": [{"name": "kserve-provision-location", "mountPath": "/mnt/models"}]}
    pod["spec"].setdefault("initContainers", []).append(container)
    pod["spec"].setdefault("volumes", []).append({"name": "kserve-provision-location", "emptyDir": {}})
    return pod


#: KServe v0.20's ``default`` ClusterStorageContainer (config/storagecontainers/default.yaml).
KSERVE_DEFAULT_STORAGE_CONTAINER = {
    "name": "storage-initializer", "image": "kserve/storage-initializer:v0.20.0",
    "imagePullPolicy": "IfNotPresent",
    "resources": {"requests": {"memory": "100Mi", "cpu": "100m"}, "limits": {"memory": "1Gi", "cpu": "1"}}}


def documented_storage_container() -> dict:
    """The ClusterStorageContainer docs/kubernetes.md tells a cluster admin to apply."""
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    blocks = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)]
    [storage] = [b for b in blocks if isinstance(b, dict) and b.get("kind") == "ClusterStorageContainer"]
    assert storage["metadata"]["name"] == "default"
    return storage["spec"]["container"]


def rayjob_pods(rayjob: dict) -> list[tuple[str, dict]]:
    """The pods KubeRay v1.7.0 creates for ``rayjob`` (ray-operator/controllers/ray/common/pod.go,
    common/job.go): the head; the workers, each with the ``wait-gcs-ready`` init container that
    copies the Ray container's image and security context; in K8sJobMode the submitter Job's pod,
    ``submitterPodTemplate`` or, without one, KubeRay's default (a container with no security context)."""
    name = rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    cluster = spec["rayClusterSpec"]
    head = _template(cluster["headGroupSpec"]["template"])
    pods = [(f"RayJob/{name}/head", head)]
    for group in cluster["workerGroupSpecs"]:
        worker = _template(copy.deepcopy(group["template"]))
        ray = worker["spec"]["containers"][0]
        worker["spec"].setdefault("initContainers", []).insert(0, {
            "name": "wait-gcs-ready", "image": ray["image"], "command": ["/bin/bash", "-lc", "--"],
            "securityContext": copy.deepcopy(ray.get("securityContext"))})
        pods.append((f"RayJob/{name}/worker/{group['groupName']}", worker))
    if spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
        submitter = spec.get("submitterPodTemplate") or {"spec": {"restartPolicy": "Never", "containers": [{
            "name": "ray-job-submitter", "image": head["spec"]["containers"][0]["image"]}]}}
        pods.append((f"RayJob/{name}/submitter", _template(submitter)))
    return pods


# -- the KFP IR ---------------------------------------------------------------------------------

#: Every field of kfp-kubernetes' KubernetesExecutorConfig (the IR's platform section per executor)
#: and the Pod Security control it can touch (``None``: none).
IR_FIELDS: dict[str, str | None] = {
    "securityContext": "runAsUser, runAsGroup, runAsNonRoot of the user container",
    "podMetadata": "pod annotations (AppArmor's annotation)",
    "secretAsVolume": "Volume Types: secret", "configMapAsVolume": "Volume Types: configMap",
    "pvcMount": "Volume Types: persistentVolumeClaim", "genericEphemeralVolume": "Volume Types: ephemeral",
    "emptyDirMounts": "Volume Types: emptyDir", "enabledSharedMemory": "Volume Types: emptyDir (Memory)",
    "secretAsEnv": None, "configMapAsEnv": None, "fieldPathAsEnv": None, "nodeSelector": None,
    "tolerations": None, "nodeAffinity": None, "podAffinity": None, "imagePullSecret": None,
    "imagePullPolicy": None, "activeDeadlineSeconds": None,
}
_RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                         "seccompProfile": {"type": "RuntimeDefault"}}


def load_ir(path: Path) -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all(path.read_text()))
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    return docs[0], executors


def kfp_executor_pod(executor: dict, platform: dict) -> dict:
    """The pod KFP's backend 2.17 runs for a container executor (argocompiler container.go and
    security_context.go ``applySecurityContextToExecutorTemplate``, then the driver's
    ``extendPodSpecPatch`` in driver/k8s.go), from the IR alone; Argo's own init/wait containers
    are not in it (the workflow controller's ``executor`` setting gives them theirs)."""
    user = {"name": "main", "image": executor["container"]["image"],
            "securityContext": copy.deepcopy(_RESTRICTED_CONTAINER)}
    identity = platform.get("securityContext", {})
    for key in ("runAsUser", "runAsGroup"):
        if key in identity:  # int64 in the IR's JSON is a string
            user["securityContext"][key] = int(identity[key])
    if "runAsNonRoot" in identity:
        user["securityContext"]["runAsNonRoot"] = identity["runAsNonRoot"]
    launcher = {"name": "kfp-launcher", "image": "ghcr.io/kubeflow/kfp-launcher:2.17.0",
                "securityContext": {**copy.deepcopy(_RESTRICTED_CONTAINER), "runAsNonRoot": True}}
    volumes = [{"name": name, "emptyDir": {}} for name in ("kfp-launcher", "gcs-scratch", "s3-scratch",
                                                           "minio-scratch", "dot-local-scratch",
                                                           "dot-cache-scratch", "dot-config-scratch")]
    for _ in platform.get("secretAsVolume", []):
        volumes.append({"name": f"secret-{len(volumes)}", "secret": {"secretName": "from-ir"}})
    for _ in platform.get("configMapAsVolume", []):
        volumes.append({"name": f"cm-{len(volumes)}", "configMap": {"name": "from-ir"}})
    for _ in platform.get("pvcMount", []):
        volumes.append({"name": f"pvc-{len(volumes)}", "persistentVolumeClaim": {"claimName": "from-ir"}})
    for item in platform.get("genericEphemeralVolume", []):
        volumes.append({"name": item["volumeName"], "ephemeral": {"volumeClaimTemplate": {"spec": {}}}})
    for item in platform.get("emptyDirMounts", []):
        volumes.append({"name": item["volumeName"], "emptyDir": {}})
    if platform.get("enabledSharedMemory"):
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    metadata = platform.get("podMetadata", {})
    return {"metadata": {"labels": metadata.get("labels", {}),
                         "annotations": metadata.get("annotations", {})},
            "spec": {"securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                     "initContainers": [launcher], "containers": [user], "volumes": volumes}}


# -- the tests ----------------------------------------------------------------------------------


def _compliant_pod() -> dict:
    return {"metadata": {"annotations": {}}, "spec": {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "app", "image": "img", "ports": [{"containerPort": 8080}],
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}},
                        "securityContext": {"allowPrivilegeEscalation": False,
                                            "capabilities": {"drop": ["ALL"]}}}],
        "volumes": [{"name": "tmp", "emptyDir": {}}]}}


def _container_sc(pod: dict) -> dict:
    return pod["spec"]["containers"][0]["securityContext"]


#: For each control, a change of the compliant pod that the documentation says violates it.
VIOLATIONS: dict[str, Callable[[dict], None]] = {
    "HostProcess": lambda p: _container_sc(p).update(windowsOptions={"hostProcess": True}),
    "Host Namespaces": lambda p: p["spec"].update(hostPID=True),
    "Privileged Containers": lambda p: _container_sc(p).update(privileged=True),
    "Capabilities (baseline)": lambda p: _container_sc(p)["capabilities"].update(add=["SYS_ADMIN"]),
    "HostPath Volumes": lambda p: p["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
    "Host Ports": lambda p: p["spec"]["containers"][0]["ports"][0].update(hostPort=8080),
    "Host Probes / Lifecycle Hooks": lambda p: p["spec"]["containers"][0]["readinessProbe"]["httpGet"].update(
        host="169.254.169.254"),
    "AppArmor": lambda p: p["metadata"]["annotations"].update(
        {"container.apparmor.security.beta.kubernetes.io/app": "unconfined"}),
    "SELinux": lambda p: p["spec"]["securityContext"].update(seLinuxOptions={"type": "spc_t"}),
    "/proc Mount Type": lambda p: _container_sc(p).update(procMount="Unmasked"),
    "Seccomp (baseline)": lambda p: _container_sc(p).update(seccompProfile={"type": "Unconfined"}),
    "Sysctls": lambda p: p["spec"]["securityContext"].update(
        sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
    "Volume Types": lambda p: p["spec"]["volumes"].append({"name": "n", "nfs": {"server": "s", "path": "/"}}),
    "Privilege Escalation": lambda p: _container_sc(p).pop("allowPrivilegeEscalation"),
    "Running as Non-root": lambda p: p["spec"]["securityContext"].pop("runAsNonRoot"),
    "Running as Non-root user": lambda p: _container_sc(p).update(runAsUser=0),
    "Seccomp (restricted)": lambda p: p["spec"]["securityContext"].pop("seccompProfile"),
    "Capabilities (restricted)": lambda p: _container_sc(p)["capabilities"].update(add=["CHOWN"]),
}


def test_every_documented_control_has_a_rule() -> None:
    assert [c["name"] for c in CONTROLS] == list(VIOLATIONS)
    for control in CONTROLS:
        jsonschema.Draft202012Validator.check_schema(control["schema"])
        assert control["fields"] and control["allowed"]


@pytest.mark.parametrize("control", list(VIOLATIONS))
def test_each_control_rejects_its_violation(control: str) -> None:
    pod = _compliant_pod()
    assert violations(pod) == []
    VIOLATIONS[control](pod)
    assert control in failed_controls(pod), violations(pod)
    # An init container is held to the same rules as the containers.
    if control in {"Privileged Containers", "Privilege Escalation", "Capabilities (restricted)"}:
        pod = _compliant_pod()
        init = copy.deepcopy(pod["spec"]["containers"][0])
        VIOLATIONS[control]({"metadata": {}, "spec": {"containers": [init]}})
        pod["spec"]["initContainers"] = [init]
        assert control in failed_controls(pod), violations(pod)


def test_rules_follow_the_documented_pod_or_container_alternatives() -> None:
    """runAsNonRoot and seccomp may be set per container instead of for the pod; a container may
    not override the pod's runAsNonRoot with false; a pod without any security settings is
    baseline but not restricted, for exactly the four restricted controls it leaves unset."""
    pod = _compliant_pod()
    del pod["spec"]["securityContext"]
    _container_sc(pod).update(runAsNonRoot=True,
                              seccompProfile={"type": "Localhost", "localhostProfile": "p"})
    assert violations(pod) == []
    pod = _compliant_pod()
    _container_sc(pod)["runAsNonRoot"] = False
    assert failed_controls(pod) == {"Running as Non-root"}
    bare = {"metadata": {}, "spec": {"containers": [{"name": "app", "image": "img"}]}}
    assert violations(bare, "baseline") == []
    assert failed_controls(bare) == {"Privilege Escalation", "Running as Non-root", "Seccomp (restricted)",
                                     "Capabilities (restricted)"}


@pytest.fixture(scope="module")
def chart_pods(helm: str) -> list[tuple[str, dict]]:  # noqa: F811 (the fixture)
    pods = []
    for values in CI_VALUES:
        for doc in render(helm, values.parent.parent, "-f", str(values)):
            chart = f"{values.parent.parent.name}/{values.name}"
            pods += [(f"{chart}: {where}", pod) for where, pod in pods_of(doc)]
    return pods


def test_every_pod_the_charts_render_is_restricted(chart_pods: list[tuple[str, dict]]) -> None:
    wheres = [where for where, _ in chart_pods]
    assert any("InferenceService" in w for w in wheres) and any("Pod/" in w for w in wheres)
    for where, pod in chart_pods:
        assert violations(pod) == [], where


def test_predictor_pods_are_restricted_with_the_storage_initializer_the_cluster_adds(
        chart_pods: list[tuple[str, dict]]) -> None:
    """KServe's webhook adds the storage-initializer init container from its ClusterStorageContainer.
    Our pod-level runAsNonRoot and seccomp cover it; KServe's default gives it no
    allowPrivilegeEscalation or capabilities, so a restricted namespace refuses the pod until the
    cluster applies the ClusterStorageContainer of docs/kubernetes.md, with which it passes."""
    from labelmatch.platform.kserve import DeployConfig, inference_service

    created = inference_service(DeployConfig("tax", max_replicas=2, state_secret="labelmatch-state"),
                                "s3://labelmatch/models/onnx/a", "d" * 64, {"release-id": "r1"})
    predictors = [(where, pod) for where, pod in chart_pods if where.endswith("/predictor")]
    predictors += pods_of(created)
    assert len(predictors) > 5
    documented = documented_storage_container()
    for where, pod in predictors:
        assert violations(pod) == [], where
        assert failed_controls(with_storage_initializer(pod, KSERVE_DEFAULT_STORAGE_CONTAINER)) == {
            "Privilege Escalation", "Capabilities (restricted)"}, where
        assert violations(with_storage_initializer(pod, documented)) == [], where


def _tune_rayjob() -> dict:
    """The tune step's RayJob with the training IR's own defaults (as the step builds it)."""
    from labelmatch.platform.kuberay import build_rayjob
    from labelmatch.stages.tune import TuneStepConfig
    from labelmatch.tuning.pbt import TuneConfig
    from labelmatch.tuning.rayjob import cluster_entrypoint

    [training] = [path for path in COMPILED if "training" in path.name]
    ir = yaml.safe_load_all(training.read_text()).__next__()
    params = ir["root"]["inputDefinitions"]["parameters"]
    bindings = ir["root"]["dag"]["tasks"]["tune-sft"]["inputs"]["parameters"]
    defaults = {name: params[b["componentInputParameter"]].get("defaultValue") for name, b in bindings.items()
                if name.startswith("rayjob_") and "componentInputParameter" in b}
    spec = TuneStepConfig.from_parameters(backend="rayjob", run_id="run-42", **defaults).rayjob_spec()
    assert spec.gpus_per_worker >= 1 and spec.workers >= 1  # the GPU production shape
    return build_rayjob(spec, cluster_entrypoint(TuneConfig(), "s3://labelmatch/tune/run-42/dataset",
                                                 "s3://labelmatch/tune/run-42/outputs"))


def test_rayjob_pods_are_restricted(rayjob_crd) -> None:
    """The head, the GPU workers (with KubeRay's wait-gcs-ready init container) and the submitter
    Job's pod of the tune and batch RayJobs; the submitter pod is ours, not KubeRay's default
    (which sets no security context and would be refused in a restricted namespace)."""
    from labelmatch.batch.rayjob import batch_spec
    from labelmatch.platform.kuberay import build_rayjob

    tune = _tune_rayjob()
    batch = build_rayjob(batch_spec(namespace="ml"), "labelmatch classify --address auto", component="batch")
    for rayjob in (tune, batch):
        assert rayjob_crd(rayjob) == []
        pods = pods_of(rayjob)
        assert [where.split("/", 2)[2].split("/")[0] for where, _ in pods] == ["head", "worker", "submitter"]
        for where, pod in pods:
            assert violations(pod) == [], where
        default_submitter = {**rayjob, "spec": {k: v for k, v in rayjob["spec"].items()
                                                if k != "submitterPodTemplate"}}
        assert "Privilege Escalation" in failed_controls(pods_of(default_submitter)[-1][1])


def test_ir_expresses_only_what_this_check_knows() -> None:
    """Every field kfp-kubernetes can put in an executor's platform config is in :data:`IR_FIELDS`
    with what it can do to a pod's security; a new field fails here until it is looked at."""
    from kfp.kubernetes import kubernetes_executor_config_pb2 as pb

    fields = {f.json_name for f in pb.KubernetesExecutorConfig.DESCRIPTOR.fields}
    assert fields == set(IR_FIELDS)
    context = pb.KubernetesExecutorConfig.DESCRIPTOR.fields_by_name["security_context"].message_type
    assert {f.json_name for f in context.fields} == {"runAsUser", "runAsGroup", "runAsNonRoot"}


@pytest.mark.parametrize("path", COMPILED, ids=lambda path: path.name)
def test_every_pipeline_step_is_restricted(path: Path) -> None:
    """Each container step of the compiled IR runs as a non-root, non-zero user (what the IR says);
    the pod KFP's 2.17 backend makes of it passes the whole restricted profile; an importer is no
    pod of ours (KFP runs it in its own hardened system template)."""
    ir, platform = load_ir(path)
    executors = ir["deploymentSpec"]["executors"]
    steps = [name for name, executor in executors.items() if "container" in executor]
    assert steps
    for name, executor in executors.items():
        if "container" not in executor:
            assert set(executor) == {"importer"}, name
            continue
        config = platform.get(name, {})
        assert set(config) <= set(IR_FIELDS), (name, set(config) - set(IR_FIELDS))
        identity = config.get("securityContext", {})
        assert identity.get("runAsNonRoot") is True, name
        assert int(identity.get("runAsUser", 0)) != 0 and int(identity.get("runAsGroup", 0)) != 0, name
        assert violations(kfp_executor_pod(executor, config)) == [], name
        without = {k: v for k, v in config.items() if k != "securityContext"}
        assert "Running as Non-root" in failed_controls(kfp_executor_pod(executor, without)), name
