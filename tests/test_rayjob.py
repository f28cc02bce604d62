"""The RayJob manifest against the real KubeRay CRD (strict), and its submission over HTTP.

Submission runs the real ``kubernetes`` client against a local Kubernetes API double
(``tests/kuberay_double.py``) that walks the RayJob through scripted KubeRay statuses; the run of
a RayJob's entrypoint on a real Ray cluster is in ``tests/test_rayjob_submit.py``.
"""

from __future__ import annotations

import pytest
import yaml
from kuberay_double import KubeRayState, ended, kuberay_double, lifecycle

from labelmatch.core.errors import DataError, LabelmatchError
from labelmatch.platform.kuberay import RayJobSpec, WaitPolicy, build_rayjob, delete_rayjob, submit_rayjob

FAST = WaitPolicy(poll_s=0.01)

ENTRYPOINT = "labelmatch tune --data /data --out /tmp/model --address auto --trials 4"


def production_spec(**changes) -> RayJobSpec:
    values = dict(
        name="tune-tax",
        namespace="ml",
        image="registry.local/labelmatch-train:0.1.0",
        workers=4,
        node_selector={"cloud.google.com/gke-accelerator": "nvidia-a10"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        env={"AWS_ENDPOINT_URL": "http://minio.ml:9000"},
        env_secret="minio-credentials",
        active_deadline_seconds=7200,
    )
    values.update(changes)
    return RayJobSpec(**values)


def test_rayjob_validates_strictly_against_the_kuberay_crd(rayjob_crd):
    manifest = build_rayjob(production_spec(), ENTRYPOINT)
    assert rayjob_crd(manifest) == []
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 600
    head = spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert (head["num-cpus"], head["num-gpus"]) == ("0", "0"), "no trial can land on the head"
    workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 4
    pod = workers["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-a10"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "--address auto" in spec["entrypoint"]


def test_strict_validation_rejects_unknown_and_mistyped_fields(rayjob_crd):
    manifest = build_rayjob(production_spec(), ENTRYPOINT)
    manifest["spec"]["shutdownAfterJobFinish"] = True  # typo of a real field
    manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "4"
    errors = rayjob_crd(manifest)
    assert any("shutdownAfterJobFinish" in e and "Additional properties" in e for e in errors)
    assert any("replicas" in e for e in errors)


def test_values_file_sets_the_spec_and_refuses_unknown_keys(tmp_path, rayjob_crd):
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "workers": 2,
                "gpus_per_worker": 1,
                "image": "img:1",
                "tolerations": [{"key": "gpu", "operator": "Exists"}],
            }
        )
    )
    spec = RayJobSpec.from_values(values, workers=3, image=None)
    assert (spec.workers, spec.image) == (3, "img:1")
    assert rayjob_crd(build_rayjob(spec, ENTRYPOINT)) == []
    values.write_text(yaml.safe_dump({"worker_count": 2}))
    with pytest.raises(DataError, match=r"values.yaml:1: field 'worker_count': unknown setting"):
        RayJobSpec.from_values(values)


@pytest.mark.parametrize(("text", "line", "field", "message"), [
    ("workers: two\n", 1, "workers", "expected an integer, got a string 'two'"),
    ("namespace: ml\nenv:\n  PORT: 8080\n", 3, "env.PORT", "expected a string, got a number 8080"),
    ("tolerations:\n  key: gpu\n", 1, "tolerations", "expected a list of mappings"),
    ("shutdown_after_job_finishes: 'yes'\n", 1, "shutdown_after_job_finishes", "expected true or false"),
    ("workers: 0\n", 1, "workers", "RayJob needs workers >= 1"),
    ("workers: 2\nworkers: 3\n", 2, "workers", "given twice"),
    ("- workers\n", None, None, "expected a mapping of settings, got an array"),
])
def test_values_file_fields_are_type_checked_with_their_line(tmp_path, text, line, field, message):
    values = tmp_path / "values.yaml"
    values.write_text(text)
    with pytest.raises(DataError) as info:
        RayJobSpec.from_values(values)
    err = info.value
    assert (err.path, err.line, err.field) == (str(values), line, field) and message in str(err)


def test_values_file_quantities_may_be_numbers(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text("worker_cpu: 4\nhead_cpu: 0.5\nworker_memory: 16Gi\n")
    spec = RayJobSpec.from_values(values)
    assert (spec.worker_cpu, spec.head_cpu, spec.worker_memory) == ("4", "0.5", "16Gi")


SCRIPT = lifecycle("tune-tax")


@pytest.fixture
def kube_api():
    with kuberay_double(KubeRayState(scripted=SCRIPT)) as (api, state):
        yield api, state


def test_submit_creates_the_rayjob_and_follows_its_status_to_completion(kube_api):
    api, state = kube_api
    manifest = build_rayjob(production_spec(), ENTRYPOINT)
    seen = []
    status = submit_rayjob(manifest, api, on_status=seen.append, wait=FAST)
    assert status == SCRIPT[-1] and status["jobStatus"] == "SUCCEEDED" and status["succeeded"] == 1
    assert [(s.get("jobDeploymentStatus"), s.get("jobStatus")) for s in seen] == [
        (None, None), ("Initializing", None), ("Running", "PENDING"), ("Running", "RUNNING"),
        ("Complete", "SUCCEEDED")]
    assert state.jobs[("ml", "tune-tax")]["object"] == manifest


def test_submit_reports_an_api_refusal_in_one_line(kube_api):
    api, _ = kube_api
    manifest = build_rayjob(production_spec(), ENTRYPOINT)
    submit_rayjob(manifest, api, wait=FAST)
    with pytest.raises(LabelmatchError, match=r"creating RayJob ml/tune-tax failed: 409 .*already exists"):
        submit_rayjob(manifest, api, wait=FAST)


def test_delete_removes_the_rayjob_and_tolerates_its_absence(kube_api):
    api, state = kube_api
    submit_rayjob(build_rayjob(production_spec(), ENTRYPOINT), api, wait=FAST)
    assert delete_rayjob("ml", "tune-tax", api) is True
    assert state.deleted == [("ml", "tune-tax")] and not state.jobs
    assert delete_rayjob("ml", "tune-tax", api) is False


def test_a_failed_rayjob_is_deleted_and_reported(tmp_path, kube_api, monkeypatch):
    from conftest import make_tiny_dataset
    from s3_server import moto_s3_server, s3_env

    from labelmatch.core.artifacts import write_manifest
    from labelmatch.data.dataset import save_dataset
    from labelmatch.tuning.pbt import TuneConfig
    from labelmatch.tuning.rayjob import run_tune_rayjob

    api, state = kube_api
    state.scripted = [ended("tune-tax", "FAILED", "trial crashed")]
    save_dataset(make_tiny_dataset(), tmp_path / "ds")
    write_manifest(tmp_path / "ds", "Dataset")
    lines = []
    with moto_s3_server() as url:
        for key, value in s3_env(url).items():
            monkeypatch.setenv(key, value)
        with pytest.raises(LabelmatchError, match=r"RayJob ml/tune-tax did not succeed: .*trial crashed"):
            run_tune_rayjob(tmp_path / "ds", tmp_path / "model", tmp_path / "report", TuneConfig(),
                            production_spec(), "s3://lm-work/run-1", api_client=api, on_status=lines.append,
                            wait=FAST)
    assert state.deleted == [("ml", "tune-tax")], "a failed RayJob is cleaned up too"
    assert lines[-1] == "RayJob ml/tune-tax: deleted" and "FAILED" in lines[0]
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    ("resources", "gpus_per_worker", "expected"),
    [
        ({"CPU": 1}, 1, {"CPU": 1, "GPU": 1}),  # the defaults: one trial per 1-GPU worker
        ({"CPU": 2}, 2, {"CPU": 2, "GPU": 2}),  # a trial takes every GPU of its worker
        ({"CPU": 1, "GPU": 0}, 1, {"CPU": 1, "GPU": 1}),  # 0 is "not set"
        ({"CPU": 1, "GPU": 0.5}, 1, {"CPU": 1, "GPU": 0.5}),  # set by the user: kept
        ({"CPU": 1}, 0, {"CPU": 1}),  # CPU workers: nothing to derive
    ],
)
def test_trials_take_one_workers_gpus_unless_their_request_sets_gpus(resources, gpus_per_worker, expected):
    from labelmatch.stages.tune import rayjob_trial_resources

    given = dict(resources)
    spec = production_spec(gpus_per_worker=gpus_per_worker)
    assert rayjob_trial_resources(resources, spec) == expected
    assert resources == given, "the caller's mapping is not changed"


def test_the_tune_step_gives_rayjob_trials_the_workers_gpus(tmp_path, monkeypatch):
    """The derivation is applied by the step itself (what the tune component calls), only for rayjob."""
    from labelmatch.stages import tune as stage
    from labelmatch.tuning.pbt import TuneConfig

    seen: list[tuple[str, dict]] = []
    monkeypatch.setattr(stage, "run_tune_rayjob", lambda data, model, report, config, spec, work, **kw:
                        seen.append(("rayjob", config.resources_per_trial)) or {})
    monkeypatch.setattr(stage, "tune_sft", lambda data, model, report, config:
                        seen.append(("local", config.resources_per_trial)) or {})
    rayjob = stage.TuneStepConfig.from_parameters(
        backend="rayjob", run_id="run-1", storage_uri="s3://lm/tune", rayjob_image="img:1",
        rayjob_namespace="ml", rayjob_gpus_per_worker=1,
    )
    for backend, step in (("rayjob", rayjob), ("local", stage.TuneStepConfig())):
        for resources in ({"CPU": 1}, {"CPU": 1, "GPU": 0.5}):
            tune = TuneConfig(resources_per_trial=dict(resources))
            stage.run_tune_step(tmp_path / "ds", tmp_path / "m", tmp_path / "r", tune, step)
            assert tune.resources_per_trial == resources, backend
    assert seen == [
        ("rayjob", {"CPU": 1, "GPU": 1}),
        ("rayjob", {"CPU": 1, "GPU": 0.5}),
        ("local", {"CPU": 1}),
        ("local", {"CPU": 1, "GPU": 0.5}),
    ]
