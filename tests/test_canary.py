"""Canary and shadow on live signals, for real: real model servers, a traffic splitter, users.

The Kubernetes double (``tests/k8s_fake.py``) plays KServe in Serverless mode as its controller
source says (``ksvc_reconciler.go``'s canary traffic split, ``PropagateStatus``); its predictor pods
are real model servers on 127.0.0.1 started from the InferenceService's own container
(``tests/kserve_pods.py``), sharing one serving state. A splitter (``tests/traffic_splitter.py``)
plays the gateway: every prediction request goes to a revision drawn by the traffic split KServe
reports at that moment. Users send documents of the sample set the models never trained on and
rate each answer through the feedback API: 5, one point off per label it got wrong (missed or
extra), at least 1.

* a candidate trained on shuffled labels is rolled back on its live signals, and the stable takes
  all the traffic back;
* a good candidate is promoted and takes all the traffic;
* each decision and its evidence are in the release record, and every replica exports it;
* a shadow gets a copy of the traffic, and its report lists agreement, score shift and latency.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import random
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import make_tiny_dataset, tiny_config
from k8s_fake import kube_fake_server
from kserve_pods import LocalPods
from s3_server import moto_s3_server, s3_env
from test_deploy import CRD, NS, ROOT
from traffic_splitter import Splitter, running

from labelmatch.core.artifacts import read_manifest, write_manifest
from labelmatch.data.dataset import Dataset, load_dataset
from labelmatch.delivery.kserve import deploy_canary, deploy_shadow
from labelmatch.delivery.rules import CanaryRules
from labelmatch.platform.artifact_store import ArtifactStore, S3Config
from labelmatch.platform.kserve import (
    GROUP,
    PLURAL,
    VERSION,
    DeployConfig,
    inference_service,
    kube_custom_objects,
)
from labelmatch.platform.releases import ReleaseLog
from labelmatch.sample_data import sample_path

SERVICE = "tax"
#: Users of the service: each has a token allowed to rate served predictions.
USERS = {f"user-{i}": f"test-user-token-{i}-0123456789" for i in range(8)}
SECRETS = {"labelmatch-serving-auth": {"tokens.yaml": "tokens:\n" + "".join(
    f"  - {{name: {name}, token: {token}, permissions: [feedback]}}\n" for name, token in USERS.items())}}
#: Rules scaled to a test: half the traffic, a 10 s window. The latency rules allow for a shared
#: 2-core machine; drift and feedback are the monitor's tests on the real logged predictions. On
#: these users' ratings of unseen sample documents (measured offline, 200 documents) the good model
#: scores 3.0 ± 1.1 and the one trained on shuffled labels 1.6 ± 1.0. A window brings 40–70 ratings
#: a side (one run: shuffled 1.43 vs stable 2.93, the good copy 2.93 vs 3.08), so a drop above 0.7
#: at p < 0.01 lies over 3 standard errors from either case.
RULES = CanaryRules(traffic_percent=50, window_s=10, check_every_s=1, min_requests=15, max_window_s=40,
                    max_error_rate=0.05, max_p99_latency_ratio=4.0, latency_slack_s=0.5,
                    drift_signals=["low_confidence", "max_score"], drift_alpha=0.001, min_documents=15,
                    permutations=99, min_feedback=15, max_feedback_drop=0.7, feedback_alpha=0.01)


def _copy_as_new_version(source: Path, target: Path, version: str) -> Path:
    """The same weights as a new artifact (its own digest and model version): a re-export."""
    shutil.copytree(source, target)
    info = json.loads((target / "labelmatch.json").read_text())
    (target / "labelmatch.json").write_text(json.dumps({**info, "model_version": version}, indent=1) + "\n")
    manifest = read_manifest(source)
    write_manifest(target, "OnnxModel", lineage=manifest.get("lineage"), extra=manifest.get("summary"))
    return target


def _shuffled_label_model(root: Path) -> Path:
    """A model trained on the tiny set with every document's labels shuffled to another document:
    it learns nothing true. Exported cheaply (one engine, no fallback, no gate)."""
    from labelmatch.export.onnx import ExportConfig, export_onnx
    from labelmatch.training.sft import train_sft

    dataset = make_tiny_dataset()
    labels = [document.labels for document in dataset.documents]
    random.Random(0).shuffle(labels)
    documents = [dataclasses.replace(document, labels=shuffled_labels)
                 for document, shuffled_labels in zip(dataset.documents, labels, strict=True)]
    shuffled = Dataset(documents, dataset.labels)
    train_sft(shuffled, tiny_config(epochs=1, max_length=48), root / "sft")
    export_onnx(root / "sft", root / "onnx", ExportConfig(agreement_gate=0.0, engines=("ort-fp32",),
                                                          engine="ort-fp32", fp32_fallback="off"), shuffled)
    return root / "onnx"


@pytest.fixture(scope="module")
def cluster(onnx_model, tmp_path_factory):
    """S3, the double with real pods, the stable InferenceService serving, a splitter, users."""
    root = tmp_path_factory.mktemp("canary")
    with moto_s3_server() as s3_url:
        store = ArtifactStore(S3Config.from_env(s3_env(s3_url)))
        good = onnx_model[0]
        artifacts = {"stable": good, "good": _copy_as_new_version(good, root / "good", "candidate-good"),
                     "bad": _shuffled_label_model(root / "bad")}
        uris = {}
        for name, path in artifacts.items():
            uris[name] = f"{ROOT}/models/onnx/{name}"
            store.upload_artifact(path, uris[name])
        pods = LocalPods(store, root / "pods", secrets=SECRETS)
        with kube_fake_server(pod_runner=pods, default_mode="Serverless") as (kube_url, state):
            api = kube_custom_objects(kube_url)
            # The serving chart installed the stable InferenceService (every prediction logged for the
            # monitor; the state polled every 0.5 s).
            config = DeployConfig(SERVICE, NS, image="registry.test/serve:0.1.0", timeout_s=180, poll_s=0.2,
                                  crd_path=str(CRD))
            body = inference_service(config, uris["stable"], store.verify_remote(uris["stable"]),
                                     {"release-id": "chart"})
            body["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] = "Serverless"
            body["spec"]["predictor"]["containers"][0]["args"] += ["--log_sample_rate", "1",
                                                                    "--label_sync_s", "0.5"]
            api.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
            for _ in range(30):
                state.tick()
                if _component(state).get("latestRolledoutRevision"):
                    break

            splitter = Splitter(lambda: state.route(NS, SERVICE))
            with running(splitter) as gateway:
                users = Users(gateway)
                users.start()
                try:
                    yield {"store": store, "state": state, "api": api, "config": config, "uris": uris,
                           "state_url": f"sqlite:///{root / 'pods' / 'state' / 'serving.db'}",
                           "artifacts": artifacts, "users": users, "splitter": splitter}
                finally:
                    users.stop()


def _component(state) -> dict:
    return ((state.objects[(NS, SERVICE)].get("status") or {}).get("components") or {}).get("predictor", {})


class Users:
    """People using the service through the gateway: they classify documents the models never
    trained on and rate each answer 5, one point off per label it got wrong, at least 1."""

    def __init__(self, gateway: str):
        self.gateway = gateway
        documents = load_dataset(sample_path("tax")).documents[120:]
        self.documents = [(d.text, set(d.labels)) for d in documents]
        self.stopping = threading.Event()
        self.ratings: queue.Queue[tuple[float, str, int]] = queue.Queue()
        self.answers = 0
        self.failures: list[str] = []
        self.rated = 0
        self.threads = [threading.Thread(target=self._classify, daemon=True),
                        *(threading.Thread(target=self._rate, args=(i,), daemon=True) for i in range(2))]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def _classify(self) -> None:
        index = 0
        while not self.stopping.is_set():
            if self.ratings.qsize() > 4:  # people rate what they just read: no backlog of old answers
                time.sleep(0.02)
                continue
            text, truth = self.documents[index % len(self.documents)]
            index += 1
            try:
                answer = requests.post(f"{self.gateway}/v1/models/{SERVICE}:predict",
                                       json={"instances": [text]}, timeout=30)
            except requests.RequestException as exc:
                self.failures.append(type(exc).__name__)
                continue
            if answer.status_code != 200:
                self.failures.append(f"HTTP {answer.status_code}: {answer.text[:100]}")
                time.sleep(0.05)
                continue
            [prediction] = answer.json()["predictions"]
            wrong = len(set(prediction["labels"]) ^ truth)
            self.answers += 1
            self.ratings.put((time.monotonic(), prediction["id"], max(1, 5 - wrong)))

    def _rate(self, worker: int) -> None:
        names = list(USERS)[worker::2]
        count = 0
        while not self.stopping.is_set():
            try:
                at, prediction_id, score = self.ratings.get(timeout=0.2)
            except queue.Empty:
                continue
            time.sleep(max(0.0, at + 0.6 - time.monotonic()))  # the record is written behind the answer
            token = USERS[names[count % len(names)]]
            count += 1
            answer = requests.post(f"{self.gateway}/v2/models/{SERVICE}/feedback",
                                   json={"prediction_id": prediction_id, "score": score},
                                   headers={"Authorization": f"Bearer {token}"}, timeout=30)
            if answer.status_code != 200:
                self.failures.append(f"feedback HTTP {answer.status_code}: {answer.text[:100]}")
            else:
                self.rated += 1


def _exported(state, name: str, metric: str, value: str | None = "1.0", timeout_s: float = 10.0) -> str:
    """The line of ``metric`` on the /metrics of a serving pod, once it shows ``value`` (any value:
    ``None``): every replica picks the decision up from the serving state within ``--label_sync_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        url = state.endpoint(NS, name)
        lines = [line for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines()
                 if line.startswith(metric)] if url else []
        wanted = [line for line in lines if value is None or line.endswith(f" {value}")]
        if wanted or time.monotonic() > deadline:
            return "\n".join(wanted or lines)
        time.sleep(0.3)


def test_a_candidate_trained_on_shuffled_labels_is_rolled_back_on_live_signals(cluster):
    state, store = cluster["state"], cluster["store"]
    stable_before = _component(state)["latestRolledoutRevision"]
    record, decision = deploy_canary(cluster["config"], cluster["uris"]["bad"], store, ROOT, RULES,
                                     run_id="run-bad", api=cluster["api"], state_url=cluster["state_url"],
                                     model_dir=cluster["artifacts"]["bad"])
    assert decision.decision == "rolled_back", decision.reason
    assert "max_feedback_drop" in decision.failed, decision.results
    feedback = decision.feedback
    assert feedback["canary"]["mean"] < feedback["stable"]["mean"] - RULES.max_feedback_drop
    assert decision.canary["requests"] >= RULES.min_requests and decision.stable["requests"] > 0
    assert decision.canary["error_rate"] == 0.0
    verdicts = {r.rule: r.passed for r in decision.results}
    assert verdicts["max_error_rate"] is True and "drift:low_confidence" in verdicts
    # The stable's containers serve all the traffic again, on a revision of their own.
    component = _component(state)
    [(revision, share)] = [(t["revisionName"], t["percent"]) for t in component["traffic"]]
    assert share == 100 and revision == component["latestRolledoutRevision"] != stable_before
    predictor = state.objects[(NS, SERVICE)]["spec"]["predictor"]
    assert "canaryTrafficPercent" not in predictor
    env = {e["name"]: e.get("value") for e in predictor["containers"][0]["env"]}
    assert env["STORAGE_URI"] == cluster["uris"]["stable"]
    # The decision and its evidence are the release record's.
    [stored] = ReleaseLog(store, ROOT).list(SERVICE)
    assert stored == record and stored.strategy == "canary" and not stored.serving
    assert stored.delivery["decision"] == "rolled_back" and stored.run_id == "run-bad"
    failed = [r for r in stored.delivery["results"] if r["rule"] == "max_feedback_drop"]
    assert failed[0]["passed"] is False and failed[0]["detail"]["p_value"] < RULES.feedback_alpha
    assert stored.delivery["window"]["seconds"] >= RULES.window_s
    # Every replica exports it.
    line = _exported(state, SERVICE, 'labelmatch_canary_decision{decision="rolled_back"}')
    assert line.endswith(" 1.0"), line
    # Users were served throughout (a feedback may reach the state before its prediction's record);
    # the gateway always found a pod of the route it was given (its own 503 has an empty body).
    failures = [f for f in cluster["users"].failures if not f.startswith("feedback HTTP 404")]
    assert not [f for f in failures if f.endswith("HTTP 503: ")], failures
    assert len(failures) <= 2, failures


def test_a_good_candidate_is_promoted(cluster):
    state, store = cluster["state"], cluster["store"]
    record, decision = deploy_canary(cluster["config"], cluster["uris"]["good"], store, ROOT, RULES,
                                     run_id="run-good", api=cluster["api"], state_url=cluster["state_url"],
                                     model_dir=cluster["artifacts"]["good"])
    assert decision.decision == "promoted", (decision.reason, decision.results)
    assert decision.canary_version == "candidate-good" and not decision.failed
    ran = {r.rule for r in decision.results if r.passed}
    assert {"max_error_rate", "max_feedback_drop", "drift:low_confidence", "drift:max_score"} <= ran
    component = _component(state)
    shares = {t["revisionName"]: t["percent"] for t in component["traffic"]}
    assert shares == {component["latestRolledoutRevision"]: 100}
    served = requests.get(f"{state.endpoint(NS, SERVICE)}/v2/models/{SERVICE}/labels", timeout=10).json()
    assert served["model_version"] == "candidate-good" and served["release_id"] == record.release_id
    log = ReleaseLog(store, ROOT)
    assert log.latest_serving(SERVICE) == record and record.delivery["decision"] == "promoted"
    line = _exported(state, SERVICE, 'labelmatch_canary_decision{decision="promoted"}')
    assert line.endswith(" 1.0"), line


def test_a_shadow_gets_a_copy_of_the_traffic_and_its_report_lists_agreement_and_latency(cluster):
    state, store = cluster["state"], cluster["store"]
    answered = cluster["users"].answers
    record, report = deploy_shadow(cluster["config"], cluster["uris"]["bad"], store, ROOT, window_s=4,
                                   state_url=cluster["state_url"], api=cluster["api"])
    assert cluster["users"].answers > answered  # users were served all along, by the serving model
    assert report.serving_version == "candidate-good"
    assert report.documents >= 5 and report.answered == report.documents
    assert 0.0 <= report.agreement < 1.0  # a model trained on shuffled labels disagrees
    assert report.score_shift["mean"] > 0
    for side in ("serving", "shadow"):
        assert 0 < report.latency_ms[side]["p50"] <= report.latency_ms[side]["p99"]
    assert record.strategy == "shadow" and not record.serving
    assert record.delivery["report"]["agreement"] == report.agreement
    assert ReleaseLog(store, ROOT).latest_serving(SERVICE).delivery["decision"] == "promoted"
    line = _exported(state, SERVICE, "labelmatch_shadow_documents_total", value=None)
    assert line, "the serving replica counts what it mirrored"
