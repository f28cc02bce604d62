"""Progressive delivery, the parts that need no model: the rules file, the signals read from
``/metrics``, each rule's verdict, the release record's new fields, the InferenceService changes for
a canary in both KServe modes (validated against KServe's v0.20.0 CRD) and their status transitions
in the Kubernetes double (``tests/k8s_fake.py``, written from KServe's controller source).

The decision on live signals, with real model servers, is ``tests/test_canary.py``.
"""

from __future__ import annotations

import copy
import json

import pytest
from k8s_fake import kube_fake_server
from prometheus_client import CollectorRegistry, generate_latest
from test_deploy import CRD, NS

from labelmatch.core.errors import ConfigError, DataError, LabelmatchError
from labelmatch.delivery.canary import CanaryTarget, feedback_rules, traffic_rules, watch_canary
from labelmatch.delivery.kserve import (
    KServeTraffic,
    canary_mode,
    canary_name,
    knative_canary_patch,
    promote_patch,
    raw_canary_patch,
    rollback_patch,
)
from labelmatch.delivery.rules import CanaryRules, load_rules
from labelmatch.delivery.shadow import build_shadow_report, render_markdown
from labelmatch.delivery.signals import PodCounts, TrafficStats, parse_metrics, quantile, window_stats
from labelmatch.platform.k8s_schema import validate_against_crd
from labelmatch.platform.kserve import (
    GROUP,
    PLURAL,
    VERSION,
    DeployConfig,
    inference_service,
    kube_custom_objects,
    merged,
)
from labelmatch.platform.releases import ReleaseLog, ReleaseRecord
from labelmatch.serving.metrics import ServeMetrics
from labelmatch.state.serving_state import ServingState, ShadowRow

# -- the rules file ------------------------------------------------------------------------------


def test_rules_file_errors_name_file_line_and_field(tmp_path):
    good = tmp_path / "canary.yaml"
    good.write_text("traffic_percent: 20\nwindow_s: 300\nmax_error_rate: 0.005\n"
                    "drift_signals: [low_confidence]\n")
    rules = CanaryRules.from_file(good)
    assert (rules.traffic_percent, rules.window_s, rules.max_error_rate, rules.drift_signals) == (
        20, 300.0, 0.005, ["low_confidence"])
    assert rules.longest_window_s == 900.0
    cases = {
        "traffic_percent: 20\nmax_error_rate: '1%'\n":
            r"canary.yaml:2: field 'max_error_rate': expected a number or null, got a string '1%'",
        "window_s: 60\ntraffic_percnt: 5\n": r"canary.yaml:2: field 'traffic_percnt': unknown setting",
        "traffic_percent: 100\n":
            r"canary.yaml:1: field 'traffic_percent': traffic_percent must be within 1..99",
        "drift_signals: [feedback]\n": r"canary.yaml:1: field 'drift_signals': unknown drift signal",
        "on_insufficient: wait\n":
            r"canary.yaml:1: field 'on_insufficient': expected one of 'rollback', 'promote'",
        "kserve_version: latest\n": r"canary.yaml:1: field 'kserve_version': kserve_version 'latest'",
        "min_requests: true\n":
            r"canary.yaml:1: field 'min_requests': expected an integer, got a boolean true",
    }
    for text, message in cases.items():
        good.write_text(text)
        with pytest.raises(DataError, match=message):
            CanaryRules.from_file(good)
    assert load_rules("").traffic_percent == 10
    assert load_rules('{"traffic_percent": 30}').traffic_percent == 30
    with pytest.raises(DataError, match=r"canary rules:1: field 'window_s': expected a number"):
        load_rules('{"window_s": "10m"}')
    with pytest.raises(DataError, match=r"nope.json: file not found"):
        load_rules(str(tmp_path / "nope.json"))


def test_the_deploy_step_takes_a_strategy(monkeypatch):
    from labelmatch.stages.deploy import DeployStepConfig

    monkeypatch.setenv("LABELMATCH_STATE_URL", "sqlite:////tmp/state.db")
    assert DeployStepConfig().strategy == "replace"
    canary = DeployStepConfig(target="kserve", release_root="s3://b", strategy="canary")
    assert canary.state_url == "sqlite:////tmp/state.db"
    with pytest.raises(ConfigError, match="strategy must be one of replace, canary, shadow"):
        DeployStepConfig(strategy="blue-green")
    with pytest.raises(ConfigError, match="strategy shadow needs the kserve target"):
        DeployStepConfig(strategy="shadow")
    with pytest.raises(ConfigError, match=r"a rollback .* takes all the traffic back at once"):
        DeployStepConfig(target="kserve", release_root="s3://b", strategy="canary", restore_release="r1")


# -- signals from /metrics -----------------------------------------------------------------------


def _exposition(latencies: list[float], errors: int, status: str = "500") -> str:
    """What a model server's /metrics says after serving ``latencies`` (the real metric objects)."""
    registry = CollectorRegistry()
    metrics = ServeMetrics(registry)
    for seconds in latencies:
        metrics.request_seconds.labels("v1_predict").observe(seconds)
    metrics.request_seconds.labels("feedback").observe(9.0)  # not prediction traffic
    for _ in range(errors):
        metrics.errors.labels("v1_predict", status).inc()
    metrics.errors.labels("feedback", "503").inc()
    return generate_latest(registry).decode()


def test_window_traffic_from_two_scrapes_of_every_pod():
    before = {"pod-a": parse_metrics(_exposition([0.004] * 10, 0))}
    after = {"pod-a": parse_metrics(_exposition([0.004] * 10 + [0.02] * 89 + [0.4], 2)),
             "pod-b": parse_metrics(_exposition([0.03] * 10, 0))}  # started during the window
    stats = window_stats(before, after, {"pod-c": "ConnectionError"})
    assert (stats.pods, stats.requests, stats.errors) == (2, 100, 2)
    assert stats.error_rate == pytest.approx(0.02)
    # 99 of 100 at or below 0.05 s: the p99 is read inside the (0.025, 0.05] bucket, as Prometheus would
    assert 0.025 < stats.latency(0.99) <= 0.05
    assert stats.latency(0.5) <= 0.025
    assert stats.to_json()["unreachable"] == {"pod-c": "ConnectionError"}
    restarted = parse_metrics(_exposition([0.01] * 3, 0))
    assert restarted.minus(parse_metrics(_exposition([0.01] * 50, 0))).requests == 3  # counters went down
    assert quantile({}, 0.99) is None
    assert quantile({0.1: 0.0, float("inf"): 5.0}, 0.99) == 0.1  # beyond the last bucket: its bound
    assert parse_metrics(_exposition([0.01], 1, status="429")).errors == 0  # a refusal is no failure


def _stats(requests: int, errors: int = 0, seconds: float = 0.01) -> TrafficStats:
    counts = PodCounts(requests, errors, {0.005: 0.0, 0.01: float(requests), float("inf"): float(requests)})
    if seconds > 0.01:
        counts.buckets = {0.01: 0.0, 0.25: 0.0, 0.5: float(requests), float("inf"): float(requests)}
    return window_stats({}, {"pod": counts})


def test_traffic_rules_decide_only_with_enough_requests():
    rules = CanaryRules(min_requests=50, max_error_rate=0.02, max_p99_latency_s=0.2,
                        max_p99_latency_ratio=2.0, latency_slack_s=0.01)
    verdict = {r.rule: r.passed for r in traffic_rules(rules, _stats(100), _stats(400))}
    assert verdict == {"max_error_rate": True, "max_p99_latency_s": True, "max_p99_latency_ratio": True}
    slow = _stats(100, errors=5, seconds=0.5)
    verdict = {r.rule: r.passed for r in traffic_rules(rules, slow, _stats(400))}
    assert verdict == {"max_error_rate": False, "max_p99_latency_s": False, "max_p99_latency_ratio": False}
    short = traffic_rules(rules, _stats(10, errors=10), _stats(400))
    assert all(r.passed is None and r.detail["skipped"] == "too few canary requests" for r in short)


def test_feedback_rules_need_feedback_on_both_sides(tmp_path):
    from labelmatch.feedback.feedback_store import FeedbackRecord, FeedbackStore

    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    store = FeedbackStore(url)
    for version, scores in (("good", [5, 4, 5, 4, 5] * 4), ("bad", [1, 2, 1, 1, 2] * 4)):
        for score in scores:
            store.add(FeedbackRecord(text="t", model_version=version, predicted_labels=["vat"], score=score))
    rules = CanaryRules(min_feedback=10, max_feedback_drop=0.5, min_mean_feedback=3.0)
    results, evidence = feedback_rules(rules, CanaryTarget("bad", "good", state_url=url), 0, 2e9)
    verdict = {r.rule: r for r in results}
    assert verdict["min_mean_feedback"].passed is False and verdict["max_feedback_drop"].passed is False
    assert verdict["max_feedback_drop"].detail["p_value"] < 0.05
    assert evidence == {"canary": {"n": 20, "mean": 1.4}, "stable": {"n": 20, "mean": 4.6}}
    results, _ = feedback_rules(rules, CanaryTarget("good", "bad", state_url=url), 0, 2e9)
    assert all(r.passed for r in results)
    results, _ = feedback_rules(rules, CanaryTarget("good", "good", state_url=url), 0, 2e9)
    assert all(r.passed is None and "same model version" in r.detail["skipped"] for r in results)


class _Routes:
    """A TrafficControl over fixed pod URLs that cannot be reached."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def canary_pods(self) -> list[str]:
        return ["http://127.0.0.1:9"]

    def stable_pods(self) -> list[str]:
        return []

    def promote(self) -> None:
        self.calls.append("promote")

    def rollback(self) -> None:
        self.calls.append("rollback")


def test_a_canary_that_cannot_be_scraped_is_rolled_back_at_the_first_look():
    routes = _Routes()
    decision = watch_canary(CanaryRules(window_s=60, check_every_s=1), routes, CanaryTarget("c", "s"),
                            sleep=lambda seconds: None)
    assert decision.decision == "rolled_back" and routes.calls == ["rollback"]
    assert decision.reason.startswith("canary pod(s) not answering")
    assert decision.failed == ["canary_reachable"]
    assert decision.to_json()["strategy"] == "canary"


# -- release records -----------------------------------------------------------------------------


class _Store:
    """The little of ArtifactStore a ReleaseLog and a canary deploy use, in memory."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def exists(self, uri) -> bool:
        return str(uri) in self.objects

    def put_bytes(self, uri, data: bytes, content_type: str = "") -> None:
        self.objects[str(uri)] = data

    def get_bytes(self, uri) -> bytes | None:
        return self.objects.get(str(uri))

    def list_keys(self, folder) -> list[str]:
        prefix = str(folder).rstrip("/") + "/"
        return [key.split("/", 3)[3] for key in self.objects if key.startswith(prefix)]

    def verify_remote(self, uri, kind=None) -> str:
        """Every candidate model's digest (a canary deploy checks it first)."""
        return "e" * 64


def test_release_records_carry_the_decision_and_older_records_still_read():
    old = {"release_id": "r0", "service": "tax", "namespace": "ml", "model_uri": "s3://b/m0",
           "model_digest": "d0", "pipeline_version": "0.1.0", "run_id": "",
           "time": "2026-01-01T00:00:00.000000Z"}
    record = ReleaseRecord.from_dict(old, "old.json")
    assert (record.strategy, record.delivery, record.serving) == ("replace", {}, True)
    with pytest.raises(DataError, match=r"old.json: field 'strategy': expected one of replace, canary"):
        ReleaseRecord.from_dict({**old, "strategy": "blue-green"}, "old.json")
    with pytest.raises(DataError, match=r"old.json: field 'delivery': expected an object"):
        ReleaseRecord.from_dict({**old, "delivery": "promoted"}, "old.json")
    log = ReleaseLog(_Store(), "s3://b")
    log.append(record)
    base = {k: v for k, v in old.items() if k not in ("release_id", "time")}
    promoted = ReleaseRecord.new(**{**base, "model_uri": "s3://b/m1"}, strategy="canary",
                                 delivery={"decision": "promoted"})
    log.append(promoted)
    rolled_back = ReleaseRecord.new(**{**base, "model_uri": "s3://b/m2"}, strategy="canary",
                                    delivery={"decision": "rolled_back", "results": []})
    log.append(rolled_back)
    log.append(ReleaseRecord.new(**{**base, "model_uri": "s3://b/m3"}, strategy="shadow",
                                 delivery={"report": {}}))
    assert [r.serving for r in log.list("tax")] == [True, True, False, False]
    assert log.latest_serving("tax") == promoted
    assert log.find("tax", "0.1.0") == promoted  # a pipeline version names its release that served
    assert log.find("tax", rolled_back.release_id) == rolled_back  # by id, every record
    assert json.loads(log.store.get_bytes(f"s3://b/releases/tax/{rolled_back.key_name}"))["delivery"][
        "decision"] == "rolled_back"


# -- the InferenceService changes, against KServe's CRD ------------------------------------------


def _serving(mode: str, **status) -> dict:
    body = inference_service(DeployConfig("tax", NS, image="reg/serve:0.1.0"), "s3://b/m1", "d" * 64,
                             {"release-id": "r1"})
    body["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] = mode
    body["status"] = {"deploymentMode": mode, **status}
    return body


def _valid(obj: dict) -> None:
    validate_against_crd({key: obj[key] for key in ("apiVersion", "kind", "metadata", "spec")}, CRD)


def test_canary_changes_are_valid_against_the_crd_in_each_mode():
    rules = CanaryRules(traffic_percent=20)
    release = {"release-id": "abcdef123456", "pipeline-version": "0.1.0", "run-id": ""}
    knative = _serving("Serverless",
                       components={"predictor": {"latestRolledoutRevision": "tax-predictor-00001"}})
    assert canary_mode(knative, rules) == "knative"
    patch = knative_canary_patch(knative, "s3://b/m2", "e" * 64, release, "reg/serve:0.2.0", 20)
    started = merged(knative, patch)
    _valid(started)
    assert started["spec"]["predictor"]["canaryTrafficPercent"] == 20
    env = {e["name"]: e.get("value") for e in started["spec"]["predictor"]["containers"][0]["env"]}
    assert (env["STORAGE_URI"], env["LABELMATCH_RELEASE_ID"]) == ("s3://b/m2", "abcdef123456")
    _valid(merged(started, promote_patch("knative", started)))
    promoted = merged(started, promote_patch("knative", started))
    assert "canaryTrafficPercent" not in promoted["spec"]["predictor"]
    back = merged(started, rollback_patch("knative", knative["spec"]["predictor"]["containers"]))
    _valid(back)
    assert back["spec"]["predictor"]["canaryTrafficPercent"] == 0
    assert back["spec"]["predictor"]["containers"] == knative["spec"]["predictor"]["containers"]

    raw = _serving("RawDeployment")
    with pytest.raises(ConfigError, match=r"ml/tax runs in RawDeployment mode, and KServe 0.20 cannot give a "
                                          r"canary a share of its traffic there .* kserve#5912"):
        canary_mode(raw, rules)
    assert canary_mode(raw, CanaryRules(kserve_version="v0.21.0")) == "raw"
    name = canary_name(release["release-id"])
    started = merged(raw, raw_canary_patch(raw, "s3://b/m2", "e" * 64, release, "reg/serve:0.2.0", 20, name))
    _valid(started)
    [canary] = started["spec"]["canary"]
    assert (canary["trafficPercent"], canary["predictor"]["name"], canary["predictor"]["minReplicas"]) == (
        20, "canary-abcdef12", 1)
    assert started["spec"]["predictor"] == raw["spec"]["predictor"]  # the stable is untouched
    promoted = merged(started, promote_patch("raw", started))
    _valid(promoted)
    assert promoted["spec"]["predictor"]["name"] == name and "canary" not in promoted["spec"]
    assert "canary" not in merged(started, rollback_patch("raw"))["spec"]
    bad = copy.deepcopy(started)
    bad["spec"]["canary"][0]["trafficPercent"] = 120
    with pytest.raises(ConfigError, match=r"trafficPercent"):
        _valid(bad)
    no_revision = _serving("Serverless")
    with pytest.raises(ConfigError, match=r"no rolled-out revision yet"):
        canary_mode(no_revision, rules)


# -- status transitions in the double ------------------------------------------------------------


def _predictor(state) -> dict:
    """``status.components.predictor`` of the double's InferenceService ``tax`` (``{}`` before any)."""
    status = state.objects[(NS, "tax")].get("status") or {}
    return (status.get("components") or {}).get("predictor", {})


def _shares(state) -> dict[str, int]:
    """Its traffic split as KServe reports it: revision name -> percent."""
    return {t["revisionName"]: t["percent"] for t in _predictor(state).get("traffic", [])}


def _tick_until(state, check, ticks: int = 30) -> None:
    for _ in range(ticks):
        state.tick()
        if check():
            return
    raise AssertionError("the double never reached the state")


def test_serverless_canary_transitions_follow_kserve_and_knative():
    """canaryTrafficPercent splits the route between the new revision and the last rolled-out one
    (ksvc_reconciler.go); removing it rolls the new one out (PropagateStatus); 0 gives the previous
    one everything back at once."""
    config = DeployConfig("tax", NS, image="reg/serve:0.1.0", timeout_s=5, poll_s=0.01)
    with kube_fake_server(default_mode="Serverless") as (url, state):
        api = kube_custom_objects(url)
        body = _serving("Serverless")
        body.pop("status")
        api.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)

        _tick_until(state, lambda: _predictor(state).get("latestRolledoutRevision") == "tax-predictor-00001")
        for number, decide in ((2, "promote"), (3, "rollback")):
            existing = state.objects[(NS, "tax")]
            stable = _predictor(state)["latestRolledoutRevision"]
            release = {"release-id": f"r{number}"}
            patch = knative_canary_patch(existing, f"s3://b/m{number}", "e" * 64, release, None, 25)
            containers = existing["spec"]["predictor"]["containers"]
            traffic = KServeTraffic(api, config, "knative", stable, "", containers)
            traffic._patch(patch)
            traffic.wait_canary(f"r{number}", 25, _predictor(state)["latestCreatedRevision"])
            assert traffic.canary != stable
            shares = {t["revisionName"]: (t["percent"], t.get("tag")) for t in _predictor(state)["traffic"]}
            assert shares == {traffic.canary: (25, None), stable: (75, "prev")}
            assert _predictor(state)["latestRolledoutRevision"] == stable  # a canary is not rolled out
            getattr(traffic, decide)()
            if decide == "promote":
                assert _predictor(state)["latestRolledoutRevision"] == traffic.canary
                assert _predictor(state)["previousRolledoutRevision"] == stable
            else:
                rebuilt = _predictor(state)["latestRolledoutRevision"]
                assert rebuilt not in (stable, traffic.canary)  # the stable's containers, a new revision
                assert _shares(state) == {rebuilt: 100}
                final = state.objects[(NS, "tax")]["spec"]["predictor"]
                assert "canaryTrafficPercent" not in final
                assert final["containers"] == existing["spec"]["predictor"]["containers"]


def test_raw_canary_transitions_follow_kserve_v0_20():
    """spec.canary makes its own Deployment with canaryStatuses and CanaryPredictorReady
    (reconcileCanaryDeployments); promotion keeps that Deployment as the stable; removing the entry
    deletes it."""
    config = DeployConfig("tax", NS, image="reg/serve:0.1.0", timeout_s=5, poll_s=0.01)
    with kube_fake_server() as (url, state):
        api = kube_custom_objects(url)
        body = _serving("RawDeployment")
        body.pop("status")
        api.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
        ready = lambda: any(c["type"] == "Ready" and c["status"] == "True"  # noqa: E731
                            for c in state.objects[(NS, "tax")].get("status", {}).get("conditions", []))
        _tick_until(state, ready)
        for number, decide in ((2, "rollback"), (3, "promote")):
            existing = state.objects[(NS, "tax")]
            release = {"release-id": f"r{number}xxxxxxxx"}
            name = canary_name(release["release-id"])
            traffic = KServeTraffic(api, config, "raw", state.deployment(NS, "tax")["metadata"]["name"], name)
            traffic._patch(raw_canary_patch(existing, f"s3://b/m{number}", "e" * 64, release, None, 20, name))
            isvc = traffic.wait_canary(release["release-id"], 20, "")
            assert isvc["status"]["canaryStatuses"] == [{"name": name, "ready": True, "trafficPercent": 20}]
            conditions = {c["type"]: c["status"] for c in isvc["status"]["conditions"]}
            assert conditions["CanaryPredictorReady"] == "True"
            canary = state.predictors[(NS, "tax")].canaries[f"tax-{name}-predictor"]
            labels = canary.deployment["spec"]["template"]["metadata"]["labels"]
            assert labels["app"] == f"isvc.tax-{name}-predictor"
            getattr(traffic, decide)()
            if decide == "rollback":
                assert not state.predictors[(NS, "tax")].canaries
                assert state.deployment(NS, "tax")["metadata"]["name"] == "tax-predictor"
            else:
                assert state.deployment(NS, "tax")["metadata"]["name"] == f"tax-{name}-predictor"
                assert not state.predictors[(NS, "tax")].canaries


# -- the shadow report ---------------------------------------------------------------------------


def test_shadow_report_lists_agreement_score_shift_and_latency():
    rows = [ShadowRow("q1", "v1", "v2", ["vat"], ["vat"], 0.01, 4.0, 6.0),
            ShadowRow("q2", "v1", "v2", ["vat", "payroll"], ["vat"], 0.2, 5.0, 7.0),
            ShadowRow("q2", "v1", "v2", [], ["customs"], 0.3, 5.0, 7.0),
            ShadowRow("q3", "v1", "", ["vat"], None, None, 3.0, None, "ReadTimeout")]
    report = build_shadow_report(rows, "v1", 0.0, 60.0)
    assert (report.documents, report.requests, report.answered) == (4, 3, 3)
    assert report.agreement == pytest.approx(1 / 3)
    assert report.jaccard == pytest.approx((1 + 0.5 + 0) / 3)
    assert report.score_shift["max"] == 0.3 and report.score_shift["mean"] == pytest.approx(0.17)
    assert report.latency_ms["serving"] == {"p50": 4.0, "p99": 5.0}
    assert report.latency_ms["shadow"] == {"p50": 6.0, "p99": 7.0}
    assert report.errors == {"ReadTimeout": 1}
    assert report.labels_added == [{"label": "customs", "documents": 1}]
    assert report.labels_dropped == [{"label": "payroll", "documents": 1}]
    text = render_markdown(report)
    assert "| label-set agreement | 0.333 |" in text and "shadow latency p50 / p99" in text


class _StubPod:
    """A pod process that only says what it serves (enough for the deploy's questions)."""

    def __init__(self, container: dict, namespace: str, volumes: list | None = None):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
        answer = json.dumps({"model_version": env["STORAGE_URI"].rsplit("/", 1)[-1],
                             "release_id": env.get("LABELMATCH_RELEASE_ID", ""),
                             "model_digest": env.get("LABELMATCH_MODEL_DIGEST", "")}).encode()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_revision_the_route_leaves_serves_until_it_scales_to_zero():
    """The double's Knative keeps a revision's pod for ``scale_to_zero_ticks`` after the route moves
    off it (the KPA's stable window and grace period), so a request sent by the old route lands."""
    import requests

    with kube_fake_server(default_mode="Serverless", pod_runner=_StubPod,
                          scale_to_zero_ticks=3) as (url, state):
        api = kube_custom_objects(url)
        body = _serving("Serverless")
        body.pop("status")
        api.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)

        _tick_until(state, lambda: _shares(state) == {"tax-predictor-00001": 100})
        old = state.revision_url(NS, "tax", "tax-predictor-00001")
        env = body["spec"]["predictor"]["containers"][0]["env"]
        patch = {"spec": {"predictor": {"containers": [{**body["spec"]["predictor"]["containers"][0],
                                                        "env": [*env, {"name": "X", "value": "2"}]}]}}}
        api.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tax", patch)
        _tick_until(state, lambda: _shares(state) == {"tax-predictor-00002": 100})
        for _ in range(3):  # unrouted, still running and listed
            assert requests.get(f"{old}/v2/models/tax/labels", timeout=10).status_code == 200
            assert "tax-predictor-00001" in {p["metadata"]["labels"].get("serving.knative.dev/revision")
                                             for p in state.pods(NS, {})}
            state.tick()
        assert state.revision_url(NS, "tax", "tax-predictor-00001") is None  # scaled to zero
        assert "tax-predictor-00001" not in {p["metadata"]["labels"].get("serving.knative.dev/revision")
                                             for p in state.pods(NS, {})}
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{old}/v2/models/tax/labels", timeout=10)


def test_a_canary_that_never_starts_is_rolled_back_without_a_record(tmp_path):
    """The candidate's pods crash: the deploy fails, but first gives the stable all the traffic back."""
    from labelmatch.delivery.kserve import deploy_canary

    config = DeployConfig("tax", NS, image="reg/serve:0.1.0", timeout_s=1.5, poll_s=0.01, crd_path=str(CRD))
    with kube_fake_server(default_mode="Serverless", pod_runner=_StubPod) as (url, state):
        api = kube_custom_objects(url)
        body = _serving("Serverless")
        body.pop("status")
        api.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
        _tick_until(state, lambda: bool(_predictor(state).get("latestRolledoutRevision")))
        state.crash = True
        state_url = f"sqlite:///{tmp_path / 'state.db'}"
        with pytest.raises(LabelmatchError, match=r"revision tax-predictor-00002 failed: .*; the canary was "
                                                  r"rolled back, no release recorded"):
            deploy_canary(config, "s3://b/m2", _Store(), "s3://b", CanaryRules(), api=api,
                          state_url=state_url)
        serving_state = ServingState(state_url)
        event = serving_state.latest_delivery_event("tax")[1]
        serving_state.close()
        # Every revision crashes here, the stable's rebuilt one too, so the rollback did not finish:
        # the canary stays "started" and its deadline applies (the traffic is back all the same).
        assert event["decision"] == "started"
        assert _shares(state) == {"tax-predictor-00001": 100}
        assert state.objects[(NS, "tax")]["spec"]["predictor"]["containers"] == body["spec"]["predictor"][
            "containers"]


class _Killed(BaseException):
    """The deploy step's process dying (SIGKILL, eviction): no ``except Exception`` of it runs."""


_REAL_WAIT = KServeTraffic.wait_canary


def _killed_once_rolled_out(self, *args):
    """``KServeTraffic.wait_canary`` whose step is killed once its canary has rolled out."""
    _REAL_WAIT(self, *args)
    raise _Killed


def _newest_event(state_url: str, service: str = "tax") -> dict:
    state = ServingState(state_url)
    try:
        return state.latest_delivery_event(service)[1]
    finally:
        state.close()


def test_a_canary_whose_step_died_blocks_other_canaries_until_its_deadline_then_is_rolled_back(
        tmp_path, monkeypatch):
    """The step is killed after its canary took 25 %: the serving state still says when it is
    overdue and how to undo it. Before that deadline another canary is refused (the first step might
    still be deciding) and nothing changes; after it the canary is rolled back, the decision stored
    as ``rolled_back`` (``abandoned``), and the replicas' gauges say ``started`` then ``rolled_back``."""
    from labelmatch.delivery.abandoned import settle_abandoned_canary
    from labelmatch.delivery.kserve import deploy_canary

    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    config = DeployConfig("tax", NS, image="reg/serve:0.1.0", timeout_s=1.5, poll_s=0.01, crd_path=str(CRD))
    rules = CanaryRules(traffic_percent=25, window_s=60.0)

    def newest_event() -> dict:
        return _newest_event(state_url)

    with kube_fake_server(default_mode="Serverless", pod_runner=_StubPod) as (url, kube):
        api = kube_custom_objects(url)
        body = _serving("Serverless")
        body.pop("status")
        api.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)

        _tick_until(kube, lambda: _predictor(kube).get("latestRolledoutRevision") == "tax-predictor-00001")
        monkeypatch.setattr(KServeTraffic, "wait_canary", _killed_once_rolled_out)
        with pytest.raises(_Killed):
            deploy_canary(config, "s3://b/m2", _Store(), "s3://b", rules, api=api, state_url=state_url)
        assert _shares(kube) == {"tax-predictor-00002": 25, "tax-predictor-00001": 75}
        started = newest_event()
        assert started["decision"] == "started" and started["mode"] == "knative"
        # The rollout wait, the longest window (3 x 60 s), a look, the decision's waits, the slack.
        assert started["deadline"] - started["created_at"] == pytest.approx(1.5 + 180 + 15 + 3 + 120, abs=2)
        registry = CollectorRegistry()
        metrics = ServeMetrics(registry)
        metrics.show_delivery_event(started)
        assert registry.get_sample_value("labelmatch_canary_decision", {"decision": "started"}) == 1
        deadline = registry.get_sample_value("labelmatch_canary_deadline_timestamp_seconds")
        assert deadline == started["deadline"]

        monkeypatch.setattr(KServeTraffic, "wait_canary", _REAL_WAIT)
        with pytest.raises(ConfigError, match=rf"tax: the canary of release {started['release_id']} is still "
                                              r"being decided until 20\d\d-.*Z \(its deploy step may"):
            deploy_canary(config, "s3://b/m3", _Store(), "s3://b", rules, api=api, state_url=state_url)
        assert _shares(kube) == {"tax-predictor-00002": 25, "tax-predictor-00001": 75}
        assert newest_event()["decision"] == "started"

        assert settle_abandoned_canary(api, config, state_url, now=started["deadline"] + 1) == "rolled_back"
        rebuilt = _predictor(kube)["latestRolledoutRevision"]
        assert rebuilt not in ("tax-predictor-00001", "tax-predictor-00002")
        assert _shares(kube) == {rebuilt: 100}
        final = kube.objects[(NS, "tax")]["spec"]["predictor"]
        assert "canaryTrafficPercent" not in final and final["containers"] == body["spec"]["predictor"][
            "containers"]
        decided = newest_event()
        assert (decided["decision"], decided["reason"], decided["release_id"]) == (
            "rolled_back", "abandoned", started["release_id"])
        metrics.show_delivery_event(decided)
        assert registry.get_sample_value("labelmatch_canary_decision", {"decision": "rolled_back"}) == 1
        assert registry.get_sample_value("labelmatch_canary_decision", {"decision": "started"}) == 0
        assert settle_abandoned_canary(api, config, state_url) is None  # settled once

        # A retry of the same pipeline run (its earlier attempt died) rolls it back at once; another
        # run waits for the deadline.
        monkeypatch.setattr(KServeTraffic, "wait_canary", _killed_once_rolled_out)
        with pytest.raises(_Killed):
            deploy_canary(config, "s3://b/m4", _Store(), "s3://b", rules, api=api, state_url=state_url,
                          run_id="run-4")
        with pytest.raises(ConfigError, match="still being decided"):
            settle_abandoned_canary(api, config, state_url, run_id="run-5")
        assert settle_abandoned_canary(api, config, state_url, run_id="run-4") == "rolled_back"
        assert newest_event()["reason"] == "abandoned" and len(_shares(kube)) == 1

        # An error the step lives through: it rolls its canary back itself and stores the decision.
        def fails_once_rolled_out(self, *args):
            _REAL_WAIT(self, *args)
            raise LabelmatchError("the canary pod answers nonsense")

        monkeypatch.setattr(KServeTraffic, "wait_canary", fails_once_rolled_out)
        with pytest.raises(LabelmatchError, match="answers nonsense; the canary was rolled back"):
            deploy_canary(config, "s3://b/m5", _Store(), "s3://b", rules, api=api, state_url=state_url)
        assert (newest_event()["decision"], newest_event()["reason"]) == (
            "rolled_back", "failed before its decision: the canary pod answers nonsense")
        assert len(_shares(kube)) == 1
        monkeypatch.setattr(KServeTraffic, "wait_canary", _killed_once_rolled_out)

        # A replace (an operator's rollback among them) is never refused: it clears the canary
        # itself, and the undecided canary is recorded as superseded.
        with pytest.raises(_Killed):
            deploy_canary(config, "s3://b/m6", _Store(), "s3://b", rules, api=api, state_url=state_url)
        assert newest_event()["decision"] == "started"
        assert settle_abandoned_canary(api, config, state_url, replace=True) == "superseded"
        assert newest_event()["reason"] == "replaced while being decided"


def test_the_scheduled_reaper_rolls_back_an_abandoned_raw_canary_only_past_its_deadline(
        tmp_path, monkeypatch):
    """``labelmatch settle-canary`` (the serving chart's CronJob) on a RawDeployment canary whose step
    died: within the deadline it changes nothing and says so; past it, the canary's Deployment goes
    (KServe deletes a predictor Deployment the spec no longer names) and ``rolled_back`` is stored."""
    import time as time_module

    from conftest import run_cli
    from k8s_fake import kubeconfig

    from labelmatch.delivery import kserve as kserve_module
    from labelmatch.delivery.kserve import deploy_canary

    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    config = DeployConfig("tax", NS, image="reg/serve:0.1.0", timeout_s=5, poll_s=0.01, crd_path=str(CRD))
    rules = CanaryRules(traffic_percent=25, window_s=60.0, kserve_version="v0.21.0")

    def newest_event() -> dict:
        return _newest_event(state_url)
    monkeypatch.delenv("LABELMATCH_STATE_URL", raising=False)
    with kube_fake_server(pod_runner=_StubPod) as (url, kube):
        api = kube_custom_objects(url)
        body = _serving("RawDeployment")
        body.pop("status")
        api.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
        _tick_until(kube, lambda: any(c["type"] == "Ready" and c["status"] == "True" for c in
                                      kube.objects[(NS, "tax")].get("status", {}).get("conditions", [])))
        monkeypatch.setattr(KServeTraffic, "wait_canary", _killed_once_rolled_out)
        with pytest.raises(_Killed):
            deploy_canary(config, "s3://b/m2", _Store(), "s3://b", rules, api=api, state_url=state_url)
        started = newest_event()
        canary = f"tax-{started['canary']}-predictor"
        assert started["mode"] == "raw" and kube.objects[(NS, "tax")]["spec"]["canary"]
        assert set(kube.predictors[(NS, "tax")].canaries) == {canary}

        monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "kubeconfig", url, NS)))
        command = ("settle-canary", "--service", "tax", "--namespace", NS, "--timeout", "5")
        result = run_cli(*command, "--state-url", state_url)
        assert result.exit_code == 0, result.output
        assert result.output.strip() == f"{NS}/tax: its canary is still within its deadline"
        assert kube.objects[(NS, "tax")]["spec"]["canary"] and newest_event()["decision"] == "started"

        real_time, overdue, shift = time_module.time, started["deadline"] - started["created_at"], [0.0]
        monkeypatch.setattr(time_module, "time", lambda: real_time() + shift[0])
        shift[0] += overdue
        result = run_cli(*command, "--state-url", state_url)
        assert result.exit_code == 0, result.output
        assert result.output.strip() == f"{NS}/tax: the abandoned canary was rolled back"
        assert "canary" not in kube.objects[(NS, "tax")]["spec"]
        _tick_until(kube, lambda: not kube.predictors[(NS, "tax")].canaries)
        assert kube.deployment(NS, "tax")["metadata"]["name"] == "tax-predictor"
        decided = newest_event()
        assert (decided["decision"], decided["reason"], decided["release_id"]) == (
            "rolled_back", "abandoned", started["release_id"])
        result = run_cli(*command, "--state-url", state_url)
        assert result.output.strip() == f"{NS}/tax: no undecided canary"

        # Another abandoned canary, and a deploy that changes the InferenceService and stores its own
        # event between the reaper's read and its patch: the patch carries the resourceVersion it
        # read, the API server answers 409, the reaper reads again, sees another release and
        # undoes nothing; its decision is not stored over the newer event.
        with pytest.raises(_Killed):
            deploy_canary(config, "s3://b/m3", _Store(), "s3://b", rules, api=api, state_url=state_url)
        again = newest_event()
        shift[0] += overdue
        real_get = kserve_module.get_isvc

        def another_deploy_after_the_read(*args):
            read = real_get(*args)
            if read["metadata"]["annotations"]["labelmatch.io/release-id"] == again["release_id"]:
                api.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tax", {"metadata": {
                    "annotations": {"labelmatch.io/release-id": "b" * 12}}})
                serving_state = ServingState(state_url)
                serving_state.save_delivery_event("tax", "b" * 12, "canary", "started", {"deadline": 0})
                serving_state.close()
            return read

        monkeypatch.setattr(kserve_module, "get_isvc", another_deploy_after_the_read)
        result = run_cli(*command, "--state-url", state_url)
        assert result.exit_code == 0, result.output
        assert "superseded" in result.output
        assert kube.objects[(NS, "tax")]["spec"]["canary"]  # the other deploy's object, not undone
        assert (newest_event()["release_id"], newest_event()["decision"]) == ("b" * 12, "started")

        result = run_cli(*command)
        assert result.exit_code != 0 and "settle-canary needs --state-url" in str(result.exception)


def test_deploy_command_refuses_a_bad_strategy_or_rules_file_in_one_line(tmp_path, monkeypatch, capsys):
    import sys

    from labelmatch.cli import main

    rules = tmp_path / "canary.yaml"
    rules.write_text("traffic_percent: 10\nwindow_s: ten minutes\n")
    base = ["labelmatch", "deploy", "--model-uri", "s3://labelmatch/models/onnx/m", "--service", "tax"]
    for extra, message in (
        (["--strategy", "blue-green"],
         "error: --strategy must be replace, canary or shadow, got 'blue-green'"),
        (["--rules", str(rules)], "error: --rules is for --strategy canary"),
        (["--strategy", "canary", "--rules", str(rules)],
         f"error: {rules}:2: field 'window_s': expected a number, got a string 'ten minutes'"),
    ):
        monkeypatch.setattr(sys, "argv", base + extra)
        with pytest.raises(SystemExit) as exit_:
            main()
        assert exit_.value.code == 2
        assert capsys.readouterr().err.strip() == message
