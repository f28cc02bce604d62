"""Deploy readiness as KServe and Kubernetes report it, in both deployment modes.

The double (tests/k8s_fake.py) ports KServe's ``PropagateRawStatus`` / ``PropagateStatus`` and the
Deployment controller's rollout; each test drives one transition the deploy relies on, including
the two where the old ``status.observedGeneration >= metadata.generation`` shortcut was wrong.
"""

from __future__ import annotations

import pytest
from k8s_fake import kube_fake_server
from s3_server import moto_s3_server, s3_env
from test_deploy import NS, ROOT, config, onnx_model, rolled_out

from labelmatch.core.errors import LabelmatchError
from labelmatch.platform.artifact_store import ArtifactStore, S3Config
from labelmatch.platform.kserve import (
    GROUP,
    PLURAL,
    VERSION,
    deploy_model,
    inference_service,
    kube_custom_objects,
    point_at_model,
    predictor_settings,
)
from labelmatch.platform.kserve_rollout import knative_rollout, raw_rollout
from labelmatch.platform.releases import ReleaseLog, ReleaseRecord


@pytest.fixture(scope="module")
def store():
    with moto_s3_server() as url:
        yield ArtifactStore(S3Config.from_env(s3_env(url)))


@pytest.fixture(scope="module")
def models(store, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return [onnx_model(root, store, name) for name in ("m1", "m2", "m3")]


def old_shortcut(isvc: dict) -> bool:
    """What main waited for before: observedGeneration >= generation and Ready."""
    status = isvc.get("status") or {}
    ready = {c["type"]: c["status"] for c in status.get("conditions", [])}.get("Ready") == "True"
    return ready and status.get("observedGeneration", 0) >= isvc["metadata"]["generation"]


def test_raw_stale_ready_is_not_taken_for_the_new_release(store, models):
    """The HPA scaled the Deployment (its generation is ahead of the InferenceService's), and
    PredictorReady stays True during a rolling update: the shortcut passes at once; the deploy
    waits until every replica runs the new release."""
    (uri_a, _), (uri_b, _), _ = models
    with kube_fake_server() as (url, state):
        api = kube_custom_objects(url)
        deploy_model(config(service="s1"), uri_a, store, ROOT, api=api)
        for replicas in (2, 1, 1):
            state.hpa_scale(NS, "s1", replicas)
        state.tick(), state.tick()
        isvc = api.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "s1")
        assert isvc["status"]["observedGeneration"] == 4 > isvc["metadata"]["generation"] == 1
        second = deploy_model(config(service="s1"), uri_b, store, ROOT, api=api)
        assert rolled_out(state, "s1") == second.release_id
        # The moment right after the patch, as the shortcut saw it:
        state.objects[(NS, "s1")]["spec"]["predictor"]["containers"][0]["env"].append(
            {"name": "X", "value": "1"}
        )
        state.objects[(NS, "s1")]["metadata"]["generation"] += 1
        state.predictors[(NS, "s1")].lag = 0
        state.tick()
        stale = state.objects[(NS, "s1")]
        assert old_shortcut(stale) and rolled_out(state, "s1") == "", "the shortcut passes mid-rollout"


def test_raw_change_the_deployment_never_sees_does_not_block(store, models):
    """InferenceService-only changes (the HPA's maxReplicas) bump its generation but not the
    Deployment's, whose observedGeneration KServe reports: the shortcut would wait forever."""
    (uri_a, _), (uri_b, _), _ = models
    with kube_fake_server() as (url, state):
        api = kube_custom_objects(url)
        deploy_model(config(service="s2"), uri_a, store, ROOT, api=api)
        for bound in (2, 3, 4):
            api.patch_namespaced_custom_object(
                GROUP, VERSION, NS, PLURAL, "s2", {"spec": {"predictor": {"maxReplicas": bound}}}
            )
        second = deploy_model(config(service="s2"), uri_b, store, ROOT, api=api)
        isvc = state.objects[(NS, "s2")]
        assert isvc["metadata"]["generation"] == 5 and isvc["status"]["observedGeneration"] == 2
        assert not old_shortcut(isvc)
        assert rolled_out(state, "s2") == second.release_id


def test_raw_crash_loop_fails_fast_without_a_record(store, models):
    """KServe's BlockedByFailedLoad fails the deploy at once; past the progress deadline the
    Deployment's own condition does too; neither writes a release record."""
    (uri_a, _), (uri_b, _), (uri_c, _) = models
    with kube_fake_server() as (url, state):
        api = kube_custom_objects(url)
        first = deploy_model(config(service="s3"), uri_a, store, ROOT, api=api)
        state.crash = True
        with pytest.raises(
            LabelmatchError,
            match=r"ml/s3: release \w+ failed to roll out: the model failed to "
            r"load \(ModelLoadFailed: container exited with 1\)",
        ):
            deploy_model(config(service="s3", timeout_s=30), uri_b, store, ROOT, api=api)
        # A KServe that does not report model status: the Deployment's progress deadline decides.
        state._model_status = lambda pods: {"transitionStatus": "InProgress"}
        with pytest.raises(LabelmatchError, match=r"Deployment s3-predictor exceeded its progress deadline"):
            deploy_model(config(service="s3", timeout_s=30), uri_c, store, ROOT, api=api)
        assert ReleaseLog(store, ROOT).list("s3") == [first]


def test_serverless_waits_for_the_new_revision_to_take_all_traffic(store, models):
    (uri_a, digest_a), (uri_b, _), _ = models
    with kube_fake_server() as (url, state):
        api = kube_custom_objects(url)
        # The chart installed a Serverless InferenceService; deploys patch it.
        body = inference_service(config(service="s4"), uri_a, digest_a, {"release-id": "chart"})
        body["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] = "Serverless"
        api.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
        for _ in range(6):
            state.tick()
        assert (
            state.objects[(NS, "s4")]["status"]["components"]["predictor"]["latestRolledoutRevision"]
            == "s4-predictor-00001"
        )
        second = deploy_model(config(service="s4"), uri_b, store, ROOT, api=api)
        predictor = state.objects[(NS, "s4")]["status"]["components"]["predictor"]
        assert (
            predictor["latestCreatedRevision"]
            == predictor["latestReadyRevision"]
            == predictor["latestRolledoutRevision"]
            == "s4-predictor-00002"
        )
        assert second.model_uri == uri_b
        state.crash = True
        with pytest.raises(
            LabelmatchError,
            match=r"revision s4-predictor-00003 failed: False: Revision "
            r"\"s4-predictor-00003\" failed",
        ):
            deploy_model(config(service="s4", timeout_s=30), uri_a, store, ROOT, api=api)


def test_rollout_transitions_as_each_mode_reports_them():
    """The pure readers, one status per transition."""
    deployment = {
        "metadata": {"name": "s-predictor", "generation": 3},
        "spec": {
            "replicas": 2,
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "kserve-container",
                            "env": [{"name": "LABELMATCH_RELEASE_ID", "value": "r2"}],
                        }
                    ]
                }
            },
        },
        "status": {"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2},
    }
    ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    assert raw_rollout(ready, deployment, "r2").done
    assert "still has release r2" in raw_rollout(ready, deployment, "r3").detail
    for status, detail in (
        ({"observedGeneration": 2}, "generation 3 not observed"),
        ({"updatedReplicas": 1}, "1 of 2 new replicas updated"),
        ({"replicas": 3}, "1 old replicas pending termination"),
        ({"availableReplicas": 1}, "1 of 2 updated replicas available"),
    ):
        changed = {**deployment, "status": {**deployment["status"], **status}}
        state = raw_rollout(ready, changed, "r2")
        assert not state.done and detail in state.detail
    not_ready = {
        "status": {"conditions": [{"type": "Ready", "status": "False", "reason": "IngressNotReady"}]}
    }
    assert raw_rollout(not_ready, deployment, "r2").detail == "InferenceService Ready False: IngressNotReady"
    blocked = {
        "status": {
            "modelStatus": {
                "transitionStatus": "BlockedByFailedLoad",
                "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "exit 1"},
            }
        }
    }
    with pytest.raises(Exception, match="the model failed to load"):
        raw_rollout(blocked, deployment, "r2")

    def knative(created, ready_rev, rolled):
        return {
            "status": {
                "conditions": [{"type": "Ready", "status": "True"}],
                "components": {
                    "predictor": {
                        "latestCreatedRevision": created,
                        "latestReadyRevision": ready_rev,
                        "latestRolledoutRevision": rolled,
                    }
                },
            }
        }

    assert not knative_rollout(knative("p-1", "p-1", "p-1"), "p-1").done  # no new revision yet
    assert "not ready yet" in knative_rollout(knative("p-2", "p-1", "p-1"), "p-1").detail
    assert "does not take all traffic" in knative_rollout(knative("p-2", "p-2", "p-1"), "p-1").detail
    assert knative_rollout(knative("p-2", "p-2", "p-2"), "p-1").done


def test_restoring_a_release_puts_back_its_whole_served_state():
    isvc = {
        "metadata": {"name": "s"},
        "spec": {
            "predictor": {
                "minReplicas": 2,
                "maxReplicas": 4,
                "containers": [
                    {
                        "name": "kserve-container",
                        "image": "reg/labelmatch-serve:0.2.0",
                        "args": ["serve", "--engine", "ort-fp32"],
                        "resources": {"limits": {"memory": "4Gi"}},
                        "env": [{"name": "LABELMATCH_LABEL_SET_VERSION", "value": "9"}],
                    }
                ],
            }
        },
    }
    release = ReleaseRecord.new(
        service="s",
        namespace=NS,
        model_uri="s3://m/1",
        model_digest="d1",
        pipeline_version="0.1.0",
        run_id="",
        image="reg/labelmatch-serve:0.1.0",
        image_id="reg/labelmatch-serve@sha256:" + "a" * 64,
        engine="ort-int8-dynamic",
        label_set_version=3,
        thresholds={"default": 0.5, "labels": {}},
        predictor={
            "args": ["serve"],
            "resources": {"limits": {"memory": "2Gi"}},
            "minReplicas": 1,
            "maxReplicas": 2,
        },
    )
    patch = point_at_model(isvc, "s3://m/1", "d1", {"release-id": "r9"}, image="reg/x:0.3.0", restore=release)
    [container] = patch["spec"]["predictor"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert container["image"] == release.image_id and container["args"] == ["serve"]
    # Who may write stays today's setting: an older release's args never switch auth off.
    secured = {
        **isvc,
        "spec": {
            "predictor": {
                **isvc["spec"]["predictor"],
                "containers": [
                    {
                        **isvc["spec"]["predictor"]["containers"][0],
                        "args": [
                            "serve",
                            "--auth",
                            "tokens",
                            "--auth_tokens_file=/etc/labelmatch-auth/tokens.yaml",
                        ],
                    }
                ],
            }
        },
    }
    restored = point_at_model(secured, "s3://m/1", "d1", {"release-id": "r9"}, restore=release)
    assert restored["spec"]["predictor"]["containers"][0]["args"] == [
        "serve",
        "--auth",
        "tokens",
        "--auth_tokens_file=/etc/labelmatch-auth/tokens.yaml",
    ]
    assert container["resources"] == {"limits": {"memory": "2Gi"}}
    assert env["LABELMATCH_LABEL_SET_VERSION"] == "3" and "LABELMATCH_ENGINE" not in env
    assert env["LABELMATCH_RELEASE_ID"] == "r9" and env["LABELMATCH_MODEL_DIGEST"] == "d1"
    assert (patch["spec"]["predictor"]["minReplicas"], patch["spec"]["predictor"]["maxReplicas"]) == (1, 2)
    # A plain deploy takes the deploying version's image and unpins the label set.
    plain = point_at_model(isvc, "s3://m/2", "d2", {"release-id": "r10"}, image="reg/x:0.3.0")
    [container] = plain["spec"]["predictor"]["containers"]
    assert container["image"] == "reg/x:0.3.0"
    assert "LABELMATCH_LABEL_SET_VERSION" not in {e["name"] for e in container["env"]}
    assert predictor_settings(isvc) == {
        "args": ["serve", "--engine", "ort-fp32"],
        "resources": {"limits": {"memory": "4Gi"}},
        "minReplicas": 2,
        "maxReplicas": 4,
    }
