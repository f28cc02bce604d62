"""Deploy to KServe (against a double of the Kubernetes API and KServe's controller written from
their source: tests/k8s_fake.py), release records and rollback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from k8s_fake import kube_fake_server, kubeconfig
from kfp_stub import kfp_stub_server, shipped_ir
from s3_server import moto_s3_server, s3_env

from labelmatch import __version__
from labelmatch.core.artifacts import write_manifest
from labelmatch.core.errors import ArtifactError, ConfigError, DataError, LabelmatchError
from labelmatch.platform.artifact_store import ArtifactStore, S3Config, S3Uri
from labelmatch.platform.k8s_schema import validate_against_crd
from labelmatch.platform.kfp import PipelineRegistry
from labelmatch.platform.kserve import DeployConfig, deploy_model, inference_service, kube_custom_objects
from labelmatch.platform.releases import ReleaseLog, ReleaseRecord
from labelmatch.platform.rollback import plan_rollback, rollback

CRD = Path(__file__).resolve().parents[2] / "shared" / "crds" / "serving.kserve.io_inferenceservices.yaml"
ROOT = "s3://labelmatch"
NS = "ml"


@pytest.fixture(scope="module")
def store():
    with moto_s3_server() as url:
        yield ArtifactStore(S3Config.from_env(s3_env(url)))


@pytest.fixture
def kube():
    with kube_fake_server() as (url, state):
        yield kube_custom_objects(url), state


def onnx_model(tmp_path: Path, store: ArtifactStore, name: str) -> tuple[str, str]:
    """Upload a small OnnxModel artifact; returns (uri, digest)."""
    root = tmp_path / name
    root.mkdir()
    (root / "model.onnx").write_bytes(name.encode() * 1000)
    (root / "labels.json").write_text('{"vat": "value added tax"}\n')
    write_manifest(root, "OnnxModel")
    uri = f"{ROOT}/models/onnx/{name}"
    return uri, store.upload_artifact(root, uri)


def config(**changes) -> DeployConfig:
    # The small artifacts here cannot be served: what the server serves is checked in the rollback
    # test, with real model servers as the pods.
    values = dict(service="tax", namespace=NS, timeout_s=5.0, poll_s=0.01, crd_path=str(CRD),
                  verify_served=False)
    values.update(changes)
    return DeployConfig(**values)


def storage_uri(obj: dict) -> str:
    [container] = obj["spec"]["predictor"]["containers"]
    return {e["name"]: e.get("value") for e in container["env"]}["STORAGE_URI"]


def rolled_out(state, service: str) -> str:
    """The release every replica of the predictor Deployment runs ("" mid-rollout)."""
    deployment = state.deployment(NS, service)
    status = deployment["status"]
    replicas = deployment["spec"]["replicas"]
    counts = (status.get("updatedReplicas"), status.get("replicas"), status.get("availableReplicas"))
    if counts != (replicas,) * 3:
        return ""
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in container["env"]}["LABELMATCH_RELEASE_ID"]


def test_inference_service_is_valid_against_the_crd():
    body = inference_service(config(), "s3://labelmatch/models/onnx/a", "d" * 64, {"release-id": "r1"})
    validate_against_crd(body, CRD)
    replicas = inference_service(config(max_replicas=3, state_secret="labelmatch-state"),
                                 "s3://labelmatch/models/onnx/a", "d" * 64, {"release-id": "r1"})
    validate_against_crd(replicas, CRD)
    [container] = replicas["spec"]["predictor"]["containers"]
    assert {"name": "LABELMATCH_STATE_URL",
            "valueFrom": {"secretKeyRef": {"name": "labelmatch-state", "key": "url"}}} in container["env"]
    with pytest.raises(ConfigError, match="max_replicas > 1 needs state_secret"):
        config(max_replicas=3)
    body["spec"]["predictor"]["minReplica"] = 1  # a typo the API server would silently drop
    with pytest.raises(ConfigError, match=r"\$.spec.predictor: Additional properties are not allowed"):
        validate_against_crd(body, CRD)


def test_created_inference_service_authenticates_writes_and_is_ready_without_the_database(tmp_path):
    """The InferenceService the deploy step creates runs ``labelmatch serve --auth tokens`` with the
    tokens file of a Secret volume (as the serving chart does): through the real CLI and server
    parser, a request without a token is refused 401 and a token of the Secret is a principal; a
    namespace without the Secret gets no pod. Readiness is KServe's model readiness, not the
    state store's ``/state``."""
    from kserve_pods import FEEDBACK_TOKEN, SECRETS, mount_secrets, server_config

    from labelmatch.serving.auth import AuthRefused

    isvc = inference_service(config(), "s3://labelmatch/models/onnx/a", "d" * 64, {"release-id": "r1"})
    predictor = isvc["spec"]["predictor"]
    [container] = predictor["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/tax/ready"
    [auth] = [v for v in predictor["volumes"] if "secret" in v]
    assert auth["secret"]["secretName"] == DeployConfig("x").auth_secret == "labelmatch-serving-auth"
    mount = {"name": auth["name"], "mountPath": "/etc/labelmatch-auth", "readOnly": True}
    assert mount in container["volumeMounts"]

    served = server_config(mount_secrets(container, predictor["volumes"], SECRETS, tmp_path))
    assert served.auth.mode == "tokens"
    with pytest.raises(AuthRefused) as refused:
        served.auth.require({}, "feedback")
    assert refused.value.status == 401
    principal = served.auth.require({"authorization": f"Bearer {FEEDBACK_TOKEN}"}, "feedback")
    assert principal.name == "support-ui"
    with pytest.raises(AuthRefused) as forbidden:  # a feedback token is no admin
        served.auth.require({"authorization": f"Bearer {FEEDBACK_TOKEN}"}, "admin")
    assert forbidden.value.status == 403

    other = inference_service(config(auth_secret="team-tokens", auth_secret_key="tokens.json"),
                              "s3://labelmatch/models/onnx/a", "d" * 64, {})
    validate_against_crd(other, CRD)
    [container] = other["spec"]["predictor"]["containers"]
    args = container["args"]
    assert args[args.index("--auth_tokens_file") + 1] == "/etc/labelmatch-auth/tokens.json"
    with pytest.raises(RuntimeError, match="secret 'team-tokens' not found"):
        mount_secrets(container, other["spec"]["predictor"]["volumes"], SECRETS, tmp_path / "other")


def test_deploy_creates_then_patches_and_records_releases(tmp_path, store, kube, monkeypatch):
    api, state = kube
    uri_a, digest_a = onnx_model(tmp_path, store, "a")
    uri_b, digest_b = onnx_model(tmp_path, store, "b")
    # The compiled IR gives every step the registry it was compiled with; the predictor follows it.
    monkeypatch.setenv("LABELMATCH_IMAGE_REGISTRY", "registry.internal:5000/ml")

    first = deploy_model(config(), uri_a, store, ROOT, pipeline_version="0.1.0", run_id="run-1", api=api)
    assert [(m, ct) for m, _, ct, _ in state.requests if m != "GET"] == [("POST", "application/json")]
    created = state.objects[(NS, "tax")]
    assert storage_uri(created) == uri_a
    image = f"registry.internal:5000/ml/labelmatch-serve:{__version__}"
    assert created["spec"]["predictor"]["containers"][0]["image"] == image
    monkeypatch.delenv("LABELMATCH_IMAGE_REGISTRY")
    assert config().image == f"ghcr.io/labelmatch/labelmatch-serve:{__version__}"
    assert created["spec"]["predictor"]["serviceAccountName"] == "labelmatch-serving"
    assert created["metadata"]["annotations"]["labelmatch.io/release-id"] == first.release_id

    # The chart (or an operator) changed something: a patch keeps it.
    created["spec"]["predictor"]["containers"][0]["args"].append("--max-batch=32")
    state.requests.clear()
    second = deploy_model(config(), uri_b, store, ROOT, pipeline_version="0.2.0", run_id="run-2", api=api)
    patches = [body for method, _, _, body in state.requests if method == "PATCH"]
    assert len(patches) == 1 and [m for m, *_ in state.requests].count("POST") == 0
    served = state.objects[(NS, "tax")]
    assert storage_uri(served) == uri_b and served["metadata"]["generation"] == 2
    assert "--max-batch=32" in served["spec"]["predictor"]["containers"][0]["args"]
    # It returned once the predictor Deployment ran the new release on every replica.
    assert rolled_out(state, "tax") == second.release_id

    records = ReleaseLog(store, ROOT).list("tax")
    assert [(r.model_uri, r.model_digest, r.pipeline_version, r.run_id) for r in records] == [
        (uri_a, digest_a, "0.1.0", "run-1"),
        (uri_b, digest_b, "0.2.0", "run-2"),
    ]
    assert records == [first, second]
    keys = list(store.list_keys(f"{ROOT}/releases/tax"))
    assert keys == sorted(keys) and all(
        k.endswith(f"-{r.release_id}.json") for k, r in zip(keys, records, strict=True)
    )


def test_deploy_refuses_a_wrong_digest_and_times_out_without_a_record(tmp_path, store, kube):
    api, state = kube
    uri, _ = onnx_model(tmp_path, store, "c")
    with pytest.raises(ArtifactError, match=r"is not the expected"):
        deploy_model(config(service="other"), uri, store, ROOT, expected_digest="0" * 64, api=api)
    assert state.requests == []  # refused before touching the cluster

    state.pod_start_ticks = state.progress_deadline_ticks = 10**6  # still starting when we give up
    with pytest.raises(LabelmatchError, match=r"ml/other not Ready after 0.2 s \(Deployment other-predictor: "
                                              r"0 of 1 updated replicas available\)"):
        deploy_model(config(service="other", timeout_s=0.2), uri, store, ROOT, api=api)
    assert ReleaseLog(store, ROOT).list("other") == []


def test_release_log_is_append_only_and_finds_releases(store):
    log = ReleaseLog(store, "s3://labelmatch-log")
    common = dict(service="svc", namespace=NS, model_digest="d", run_id="", image="i")
    old = ReleaseRecord.new(model_uri="s3://m/1", pipeline_version="0.1.0", **common)
    mid = ReleaseRecord.new(model_uri="s3://m/2", pipeline_version="0.1.0", **common)
    new = ReleaseRecord.new(model_uri="s3://m/3", pipeline_version="0.2.0", **common)
    for record in (old, mid, new):
        log.append(record)
    with pytest.raises(ArtifactError, match=r"append-only"):
        log.append(mid)
    assert log.find("svc", old.release_id) == old
    assert log.find("svc", "0.1.0") == mid  # a version means its latest release
    assert log.find("svc", new.key_name) == new
    with pytest.raises(ConfigError, match=r"no release or pipeline version '9.9.9'"):
        log.find("svc", "9.9.9")
    store.put_bytes(S3Uri.parse("s3://labelmatch-log/releases/svc/zzz.json"), b'{"service": "svc"}')
    with pytest.raises(DataError, match=r"releases/svc/zzz.json: field 'release_id'"):
        log.list("svc")


@pytest.fixture
def deploy_ir_env(tmp_path, store, monkeypatch):
    """What the compiled deploy IR's step needs to reach the S3 server and the API double, as env
    (kfp.local's step subprocesses inherit it); the double's pods are real model servers
    (tests/kserve_pods.py). Yields ``(kube state, pipeline runner)``."""
    from kserve_pods import LocalPods

    from pipelines.local import LocalPipelineRegistry
    from pipelines.registry import COMPILED_DIR

    for key, value in s3_env(f"http://{store.config.endpoint}").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HOME", str(tmp_path))
    with kube_fake_server(pod_runner=LocalPods(store, tmp_path / "pods")) as (url, state):
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "kubeconfig", url, NS)))
        yield state, LocalPipelineRegistry(COMPILED_DIR, tmp_path / "runs")


def _deploy_params(uri: str, service: str) -> dict[str, str]:
    return {"model_uri": uri, "service": service, "namespace": NS, "target": "kserve", "release_root": ROOT}


def _served_model(tmp_path: Path, store: ArtifactStore, source: Path, name: str) -> tuple[str, str]:
    """Upload a copy of a real OnnxModel under its own model version; returns (uri, digest)."""
    import json
    import shutil

    root = tmp_path / name
    shutil.copytree(source, root)
    info = json.loads((root / "labelmatch.json").read_text())
    info["model_version"] = f"{name}-{info.get('model_version', '')}"[:40]
    (root / "labelmatch.json").write_text(json.dumps(info))
    write_manifest(root, "OnnxModel")
    uri = f"{ROOT}/models/onnx/{name}"
    return uri, store.upload_artifact(root, uri)


@pytest.mark.slow
def test_rollback_restores_the_whole_served_state(tmp_path, store, onnx_model, deploy_ir_env):
    """Deploys and the rollback run the deploy IR that ships (kfp.local); the Kubernetes API and
    KServe's controller are a double, the predictor pods real model servers. After the rollback
    the server itself reports the earlier release's model digest, label-set version and engine,
    and the InferenceService has its image (by digest) and args. The KFP server's part (which
    version, which parameters) is checked against the KFP stub with the same IR uploaded."""
    import requests
    from model_server import ADMIN_TOKEN

    from labelmatch.platform.kserve_rollout import served_url

    state, runner = deploy_ir_env
    uri_a, digest_a = _served_model(tmp_path, store, onnx_model[0], "ra")
    uri_b, digest_b = _served_model(tmp_path, store, onnx_model[0], "rb")
    releases = ReleaseLog(store, ROOT)

    def labels_url() -> str:
        return f"{served_url(state.objects[(NS, 'tax2')])}/v2/models/tax2/labels"

    def put_labels(labels: dict[str, str]) -> int:
        response = requests.put(labels_url(), json={"labels": labels}, timeout=60,
                                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert response.status_code == 200, response.text
        return response.json()["label_set_version"]

    runner.create_run("labelmatch-deploy", __version__, _deploy_params(uri_a, "tax2"))
    [first] = releases.list("tax2")
    assert (first.model_digest, first.label_set_version, first.engine) == (digest_a, 0, "ort-int8-dynamic")
    pinned = put_labels({"vat": "value added tax", "payroll": "payroll and wage taxes"})
    runner.create_run("labelmatch-deploy", __version__, _deploy_params(uri_a, "tax2"))
    second = releases.list("tax2")[-1]
    assert (second.model_digest, second.label_set_version) == (digest_a, pinned)
    assert second.image_id.startswith("ghcr.io/labelmatch/labelmatch-serve@sha256:")
    newer = put_labels({"vat": "value added tax"})  # the newest label set of model A is now another
    # An operator switches the engine; the next release serves model B with it.
    container = state.objects[(NS, "tax2")]["spec"]["predictor"]["containers"][0]
    container["args"] += ["--engine", "ort-fp32"]
    runner.create_run("labelmatch-deploy", __version__, _deploy_params(uri_b, "tax2"))
    third = releases.list("tax2")[-1]
    assert (third.model_digest, third.engine) == (digest_b, "ort-fp32")
    assert requests.get(labels_url(), timeout=10).json()["model_digest"] == digest_b

    with kfp_stub_server() as (url, kfp):
        registry = PipelineRegistry(url)
        registry.upload(shipped_ir(tmp_path, "labelmatch-deploy", __version__), __version__)
        plan, run = rollback("tax2", second.release_id, releases, store, registry)
        assert plan.release == second and plan.version.version == __version__
        sent = kfp.runs[run.run_id]["runtime_config"]["parameters"]
    assert sent == {"model_uri": uri_a, "model_digest": digest_a, "service": "tax2", "namespace": NS,
                    "target": "kserve", "release_root": ROOT, "restore_release": second.release_id}

    # What the cluster runs for that request: the same IR with the same parameters.
    plan, _ = rollback("tax2", second.release_id, releases, store, runner)
    assert plan.parameters == sent
    fourth = releases.list("tax2")[-1]
    assert fourth.release_id not in (first.release_id, second.release_id, third.release_id)
    served = requests.get(labels_url(), timeout=10).json()
    assert served["release_id"] == fourth.release_id
    assert (served["model_digest"], served["label_set_version"], served["engine"]) == (
        digest_a, pinned, "ort-int8-dynamic"), f"restored label set {pinned}, not the newest ({newer})"
    assert served["thresholds"] == second.thresholds
    container = state.objects[(NS, "tax2")]["spec"]["predictor"]["containers"][0]
    assert container["image"] == second.image_id and container["args"] == second.predictor["args"]
    assert (fourth.model_digest, fourth.label_set_version, fourth.engine) == (
        digest_a, pinned, "ort-int8-dynamic")

    # A model changed in the store since its release is never rolled back to.
    store.put_bytes(S3Uri.parse(uri_a).child("labels.json"), b"retrained in place")
    with pytest.raises(ArtifactError, match=r"labels.json is corrupted"):
        rollback("tax2", first.release_id, releases, store, runner)


def test_rollback_refuses_versions_it_cannot_run(tmp_path, store, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    uri, digest = onnx_model(tmp_path, store, "rc")
    releases = ReleaseLog(store, ROOT)
    common = dict(service="tax3", namespace=NS, model_uri=uri, model_digest=digest, run_id="")
    releases.append(ReleaseRecord.new(pipeline_version=__version__, **common))
    releases.append(ReleaseRecord.new(pipeline_version="0.0.1", **common))
    ir = Path(shipped_ir(tmp_path, "labelmatch-deploy", "0.0.1"))
    docs = list(yaml.safe_load_all(ir.read_text()))
    cpu = docs[0]["root"]["inputDefinitions"]["parameters"]["deploy_cpu"]
    del cpu["defaultValue"], cpu["isOptional"]  # a version that needs a parameter rollbacks cannot give
    ir.write_text(yaml.safe_dump_all(docs))
    with kfp_stub_server() as (url, _):
        registry = PipelineRegistry(url)
        registry.upload(ir, "0.0.1")
        with pytest.raises(ConfigError, match=r"labelmatch-deploy 0.0.1 requires parameter\(s\) deploy_cpu"):
            plan_rollback("tax3", "0.0.1", releases, store, registry)
        with pytest.raises(ConfigError, match=rf"has no version '{__version__}'"):
            plan_rollback("tax3", __version__, releases, store, registry)


def test_predictor_memory_follows_the_exported_graphs():
    """bge-m3's recorded export (bench-production-shape): int8 alone, then with a planned fallback."""
    import json

    from labelmatch.platform.kserve import serving_memory

    run = json.loads((Path(__file__).resolve().parents[1] / "bench" / "results" / "production_shape.json")
                     .read_text())
    sizes = {name: int(e["graph_mb"] * 2**20) for name, e in run["export"]["engines"].items()}
    engines = {name: {"fallback": None} for name in sizes}
    info = {"engine": "ort-int8-dynamic"}
    assert serving_memory({"graph_bytes": sizes, "engines": engines}, info) == "2304Mi"
    engines["ort-int8-dynamic"]["fallback"] = {"margin": 0.01}
    assert serving_memory({"graph_bytes": sizes, "engines": engines}, info) == "5120Mi"
    assert serving_memory({}, info) == "2Gi", "an export without graph sizes gets the minimum"
    small = {"ort-int8-dynamic": 30 * 2**20, "ort-fp32": 90 * 2**20}
    assert serving_memory({"graph_bytes": small, "engines": engines}, info) == "2048Mi"
    body = inference_service(config(memory="5120Mi"), "s3://labelmatch/models/onnx/a", "d" * 64, {})
    [container] = body["spec"]["predictor"]["containers"]
    resources = container["resources"]
    assert resources["limits"]["memory"] == resources["requests"]["memory"] == "5120Mi"
