"""A RayJob cannot outlive the step that made it, and one API hiccup does not end a day of tuning.

Against the KubeRay double (``tests/kuberay_double.py``: KubeRay v1.7.0's status semantics, failures
injected on request); no Ray cluster. Each test names what it proves; every one fails on the code
before issue 32 (no handler, no owner, no retry, a fixed name, no bound on a stalled RayJob).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from kuberay_double import (
    KubeRayState,
    dead_driver,
    kuberay_double,
    lifecycle,
    running,
    serve,
    status_check_failing,
)

from labelmatch.core.errors import ConfigError, LabelmatchError
from labelmatch.platform.kube_retry import RetryPolicy, call_with_retry
from labelmatch.platform.kuberay import (
    MAX_NAME_LENGTH,
    RayJobSpec,
    WaitPolicy,
    build_rayjob,
    rayjob_name,
    run_rayjob,
    within_deadline,
)

ENTRYPOINT = "labelmatch tune --data s3://lm/ds --out /tmp/model --address auto"
#: Retries without the production waits (1 s, 2 s, ...).
QUICK_RETRY = RetryPolicy(attempts=4, first_delay_s=0.01, max_delay_s=0.05, request_timeout_s=5)
FAST = WaitPolicy(poll_s=0.01, dead_driver_grace_s=0.3, retry=QUICK_RETRY)
REPO = Path(__file__).resolve().parents[1]
POD_ENV = {"POD_NAME": "labelmatch-training-x8k2v-system-container-impl-1234",
           "POD_UID": "0b6f3c2e-5a1d-4c8e-9f70-2d4e8a1b3c5d"}

pytestmark = pytest.mark.timeout(30)


def spec(name: str = "lm-tune-abc", namespace: str = "ml") -> RayJobSpec:
    return RayJobSpec(name=name, namespace=namespace, image="img:1", workers=2)


def step_config(namespace: str = "ml", run_id: str = "run-1", **changes):
    from labelmatch.stages.tune import TuneStepConfig

    step = TuneStepConfig.from_parameters(backend="rayjob", run_id=run_id, storage_uri="s3://lm/tune",
                                          rayjob_image="img:1", rayjob_namespace=namespace)
    step.poll_s, step.dead_driver_grace_s = 0.01, 0.3
    for key, value in changes.items():
        setattr(step, key, value)
    return step


@pytest.fixture
def store_env(monkeypatch):
    """An S3 endpoint for the step's store; nothing reaches it (the dataset is an s3:// URI and
    every run here ends before the model download)."""
    monkeypatch.setenv("LABELMATCH_S3_ENDPOINT", "http://127.0.0.1:9")
    for key in ("POD_NAME", "POD_UID"):
        monkeypatch.delenv(key, raising=False)


def run_step(step, api):
    from labelmatch.stages.tune import run_tune_step
    from labelmatch.tuning.pbt import TuneConfig

    return run_tune_step("s3://lm/ds", "/nonexistent/model", "/nonexistent/report", TuneConfig(), step, api)


# -- SIGTERM ----------------------------------------------------------------------------------------
SIGTERM_STEP = textwrap.dedent("""
    import signal, sys
    from labelmatch.platform import kube
    from labelmatch.stages.tune import TuneStepConfig, run_tune_step
    from labelmatch.tuning.pbt import TuneConfig

    step = TuneStepConfig.from_parameters(backend="rayjob", run_id="run-signal", storage_uri="s3://lm/tune",
                                          rayjob_image="img:1", deadline_s=86400)
    step.poll_s = 0.05
    # Ctrl-C as in a terminal: a shell starts background jobs with SIGINT ignored, and Python then
    # keeps it ignored (the step would end with "stopped by SIGINT" instead of KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        run_tune_step("s3://lm/ds", "/nonexistent/model", "/nonexistent/report", TuneConfig(), step,
                      kube.api_client(host=sys.argv[1]))
    except KeyboardInterrupt:
        restored = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
        print(f"KeyboardInterrupt, handlers restored: {restored}", flush=True)
        sys.exit(130)
""")


def _signal_the_step(sig: int) -> tuple[KubeRayState, subprocess.Popen, str]:
    """Run the tune step in a process of its own against the KubeRay double; once it follows its
    Running RayJob, send it ``sig``; return the double's state, the process and its output."""
    with serve(KubeRayState(scripted=[running("x")])) as (url, state):
        env = {**os.environ, **POD_ENV, "LABELMATCH_S3_ENDPOINT": "http://127.0.0.1:9",
               "PYTHONPATH": str(REPO / "src")}
        process = subprocess.Popen([sys.executable, "-c", SIGTERM_STEP, url], env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while not any(m == "GET" for m, _, _ in state.requests) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert state.jobs, "the step created its RayJob and follows it"
            process.send_signal(sig)
            output, _ = process.communicate(timeout=15)
        finally:
            process.kill()
    return state, process, output


def test_sigterm_during_a_tune_deletes_the_rayjob_and_the_process_exits_by_it():
    """The tune step as the pipeline runs it, in a process of its own: SIGTERM (a KFP Terminate,
    the kubelet at the pod's deadline) arrives while it follows a Running RayJob; the RayJob is
    deleted, then the process ends by the signal (status -15), as it would have without us."""
    state, process, output = _signal_the_step(signal.SIGTERM)
    [created] = state.created
    key = (created["metadata"]["namespace"], created["metadata"]["name"])
    assert state.deleted == [key] and not state.jobs, output
    assert process.returncode == -signal.SIGTERM, output
    assert f"RayJob {key[0]}/{key[1]}: SIGTERM received, deleting it" in output
    assert f"RayJob {key[0]}/{key[1]}: deleted" in output
    assert created["metadata"]["ownerReferences"][0]["uid"] == POD_ENV["POD_UID"]
    spec_ = created["spec"]
    assert 0 < spec_["activeDeadlineSeconds"] <= 86400 - 1800, "inside the step's deadline, less the margin"


def test_sigint_deletes_the_rayjob_then_raises_keyboard_interrupt_and_restores_the_handlers():
    """Ctrl-C on a step run by hand: the RayJob is deleted, KeyboardInterrupt reaches the caller
    and the handlers are as before. In a process of its own: a SIGINT sent to the test session
    itself, with every native thread earlier tests left in it, once ended the whole session."""
    state, process, output = _signal_the_step(signal.SIGINT)
    [created] = state.created
    assert state.deleted == [(created["metadata"]["namespace"], created["metadata"]["name"])], output
    assert process.returncode == 130, output
    assert "KeyboardInterrupt, handlers restored: True" in output


# -- ownerReference --------------------------------------------------------------------------------
def test_the_rayjob_is_owned_by_the_steps_pod_and_valid_against_the_crd(
    rayjob_crd, store_env, monkeypatch, tmp_path
):
    """POD_NAME/POD_UID (the downward API) become the RayJob's ownerReference, so deleting the
    pod deletes the RayJob; the whole manifest, as sent by the tune step, passes KubeRay's CRD
    strictly and its metadata Kubernetes' own ObjectMeta schema (the CRD leaves metadata open)."""
    import kubernetes_validate

    from labelmatch.platform import kube

    namespace_file = tmp_path / "namespace"
    namespace_file.write_text("ml\n")
    monkeypatch.setattr(kube, "NAMESPACE_FILE", namespace_file)
    for key, value in POD_ENV.items():
        monkeypatch.setenv(key, value)
    step = step_config(namespace="")
    with kuberay_double(KubeRayState(scripted=lifecycle(step.name, "FAILED"))) as (api, state), \
            pytest.raises(LabelmatchError, match="did not succeed"):
        run_step(step, api)
    [manifest] = state.created
    assert manifest["metadata"]["namespace"] == "ml"
    assert manifest["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": POD_ENV["POD_NAME"], "uid": POD_ENV["POD_UID"]}]
    assert rayjob_crd(manifest) == []
    metadata_only = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": manifest["metadata"]}
    kubernetes_validate.validate(metadata_only, "1.35", strict=True)


def test_a_rayjob_in_another_namespace_gets_no_owner_and_the_log_says_why(monkeypatch, tmp_path):
    from labelmatch.platform import kube
    from labelmatch.platform.kuberay import rayjob_owner

    namespace_file = tmp_path / "namespace"
    namespace_file.write_text("kubeflow-user")
    monkeypatch.setattr(kube, "NAMESPACE_FILE", namespace_file)
    lines: list[str] = []
    assert rayjob_owner("ml", lines.append, env=POD_ENV) is None
    assert lines == [f"RayJob namespace ml is not this pod's (kubeflow-user): no ownerReference to pod "
                     f"{POD_ENV['POD_NAME']} (garbage collection does not cross namespaces); the RayJob "
                     "ends by this step's deletion or its activeDeadlineSeconds"]
    assert rayjob_owner("kubeflow-user", lines.append, env=POD_ENV).uid == POD_ENV["POD_UID"]
    assert rayjob_owner("ml", lines.append, env={}) is None and len(lines) == 1, "outside a pod: silent"
    owner = rayjob_owner("kubeflow-user", None, env=POD_ENV)
    with pytest.raises(ConfigError, match="cannot cross namespaces"):
        build_rayjob(spec(namespace="ml"), ENTRYPOINT, owner=owner)


# -- retries ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "faults"), [
    ("GET", [(429, 2, 0.02), (500, 1, None), (503, 1, None)]),
    ("GET", [("reset", 3, None)]),
    ("POST", [(503, 1, None), ("reset", 1, None), (429, 1, 0)]),
    ("DELETE", [(500, 2, None), ("reset", 1, None)]),
], ids=["poll-429-500-503", "poll-reset", "create", "delete"])
def test_429_5xx_and_resets_are_retried_then_the_rayjob_succeeds(method, faults):
    with kuberay_double(KubeRayState(scripted=lifecycle("lm-tune-abc"))) as (api, state):
        for kind, count, retry_after in faults:
            state.inject(kind, count, method, retry_after)
        lines: list[str] = []
        status = run_rayjob(build_rayjob(spec(), ENTRYPOINT), api, on_status=lines.append,
                            wait=WaitPolicy(poll_s=0.01, retry=RetryPolicy(attempts=5, first_delay_s=0.01)))
    assert status["jobDeploymentStatus"] == "Complete" and status["jobStatus"] == "SUCCEEDED"
    injected = sum(count for _, count, _ in faults)
    retries = [line for line in lines if "; retry " in line]
    assert len(retries) == injected, lines
    assert state.deleted == [("ml", "lm-tune-abc")]
    assert [answer for m, _, answer in state.requests if m == method][:injected] == [k for k, c, _ in faults
                                                                                    for _ in range(c)]


def test_a_create_whose_answer_was_lost_is_taken_as_ours():
    """The connection resets after the API server stored the RayJob: the retry's 409 is our own."""
    with kuberay_double(KubeRayState(scripted=lifecycle("lm-tune-abc"))) as (api, state):
        state.inject("lost", 1, "POST")
        lines: list[str] = []
        status = run_rayjob(build_rayjob(spec(), ENTRYPOINT), api, on_status=lines.append, wait=FAST)
    assert [answer for method, _, answer in state.requests if method == "POST"] == ["lost", 409]
    assert "RayJob ml/lm-tune-abc: created by an earlier attempt whose answer was lost" in lines
    assert status["jobStatus"] == "SUCCEEDED" and state.deleted == [("ml", "lm-tune-abc")]


@pytest.mark.parametrize(("code", "reason"), [(403, "Forbidden"), (404, "NotFound"), (422, "Invalid")])
def test_other_4xx_fail_at_once_in_one_line(code, reason):
    with kuberay_double(KubeRayState(scripted=[running("x")])) as (api, state):
        state.inject(code, 1, "GET")
        lines: list[str] = []
        with pytest.raises(LabelmatchError, match=rf"^reading RayJob ml/lm-tune-abc failed: {code} "):
            run_rayjob(build_rayjob(spec(), ENTRYPOINT), api, on_status=lines.append, wait=FAST)
    assert not [line for line in lines if "; retry " in line], "not retried"
    assert state.deleted == [("ml", "lm-tune-abc")], "and the RayJob is deleted"


def test_after_the_retry_budget_the_step_fails_and_still_deletes_the_rayjob():
    with kuberay_double(KubeRayState(scripted=[running("x")])) as (api, state):
        state.inject(503, 50, "GET")
        lines: list[str] = []
        failed = r"^reading RayJob ml/lm-tune-abc failed \(after retries\): 503 Service Unavailable: injected"
        with pytest.raises(LabelmatchError, match=failed):
            run_rayjob(build_rayjob(spec(), ENTRYPOINT), api, on_status=lines.append, wait=FAST)
    assert len([line for line in lines if "; retry " in line]) == QUICK_RETRY.attempts - 1
    assert state.deleted == [("ml", "lm-tune-abc")] and lines[-1] == "RayJob ml/lm-tune-abc: deleted"


def test_backoff_doubles_honours_retry_after_and_is_capped():
    from kubernetes.client import ApiException

    def answer(status: int, retry_after: str | None = None) -> ApiException:
        exc = ApiException(status=status, reason="x")
        exc.headers = {"Retry-After": retry_after} if retry_after is not None else {}
        return exc

    failures = iter([answer(500), answer(503), answer(429, "7"), answer(429, "Fri, 01 Jan 2100 00:00:00 GMT"),
                     ConnectionResetError(104, "reset"), answer(502)])

    def call():
        exc = next(failures, None)
        if exc is not None:
            raise exc
        return "ok"

    slept: list[float] = []
    policy = RetryPolicy(attempts=7, first_delay_s=1, factor=2, max_delay_s=30)
    assert call_with_retry(call, "reading", policy, sleep=slept.append) == "ok"
    assert slept == [1, 2, 7, 30, 16, 30]


# -- names -----------------------------------------------------------------------------------------
def test_two_concurrent_runs_get_distinct_names_and_both_finish():
    """Two tune steps of one run id (or none), and two batch runs, at the same time in one
    namespace: distinct RayJob names, valid for KubeRay (DNS-1035, <= 47 characters), no 409."""
    import re

    from labelmatch.batch.rayjob import batch_spec

    tune = [step_config(run_id=run_id).rayjob_spec() for run_id in ("", "", "run-9", "run-9")]
    batch = [batch_spec(namespace="ml") for _ in range(2)]
    names = [s.name for s in tune + batch]
    assert len(set(names)) == len(names), names
    assert all(re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", n) and len(n) <= MAX_NAME_LENGTH for n in names)
    assert tune[2].name[:16] == tune[3].name[:16], "the same run's RayJobs share the run's hash"
    results: dict[str, object] = {}
    with kuberay_double(KubeRayState(scripted=lifecycle("x"))) as (api, state):
        def run(s: RayJobSpec) -> None:
            try:
                results[s.name] = run_rayjob(build_rayjob(s, ENTRYPOINT), api, on_status=None, wait=FAST)
            except Exception as exc:  # reported below
                results[s.name] = exc
        threads = [threading.Thread(target=run, args=(s,)) for s in tune + batch]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert all(isinstance(r, dict) and r["jobStatus"] == "SUCCEEDED" for r in results.values()), results
    assert len(state.deleted) == len(names)


def test_a_name_kuberay_would_refuse_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"RayJob name 'x{48}': KubeRay needs a DNS-1035 label .* most 47"):
        RayJobSpec(name="x" * 48, image="img:1")
    with pytest.raises(ConfigError, match="DNS-1035"):
        RayJobSpec(name="7-tune", image="img:1")
    assert len(rayjob_name("lm-tune", "a" * 200)) == len("lm-tune-12345678-abcde")


# -- a dead driver under Running -------------------------------------------------------------------
@pytest.mark.parametrize("script", [dead_driver, status_check_failing], ids=["job-failed", "dashboard-gone"])
def test_a_dead_driver_under_running_fails_the_step_in_bounded_time(script, store_env):
    """KubeRay keeps the RayJob Running after the Ray job failed (the submitter did not finish;
    kuberay#2154), or while it cannot read the job at all: the step fails after its grace period
    (0.3 s here, 360 s by default) with a line that says so, and deletes the RayJob."""
    step = step_config()
    with kuberay_double(KubeRayState(scripted=script(step.name))) as (api, state):
        started = time.monotonic()
        with pytest.raises(LabelmatchError) as failure:
            run_step(step, api)
        elapsed = time.monotonic() - started
    assert elapsed < 5, elapsed
    message = str(failure.value)
    assert message.startswith(f"RayJob ml/{step.name}: ") and "giving up" in message
    assert ("the Ray job is FAILED but the RayJob is still Running" in message) == (script is dead_driver)
    assert ("KubeRay has not read the Ray job's status since" in message) == (script is status_check_failing)
    assert state.deleted == [("ml", step.name)]


def test_a_succeeded_job_under_running_counts_once_the_grace_period_is_over():
    """As KubeRay >= 1.3 decides itself: the Ray job's own result, once the grace period is over."""
    with kuberay_double(KubeRayState(scripted=dead_driver("lm-tune-abc", "SUCCEEDED"))) as (api, state):
        status = run_rayjob(build_rayjob(spec(), ENTRYPOINT), api, on_status=None, wait=FAST)
    assert (status["jobDeploymentStatus"], status["jobStatus"]) == ("Running", "SUCCEEDED")
    assert state.deleted == [("ml", "lm-tune-abc")]


# -- deadlines -------------------------------------------------------------------------------------
def test_the_rayjob_and_the_wait_end_inside_the_steps_deadline():
    from labelmatch.stages.tune import TuneStepConfig

    step = TuneStepConfig(deadline_s=86400)
    started = time.monotonic()
    fitted, wait = within_deadline(spec(), step.wait_policy(), step.ends_by(started))
    assert 86400 - 1800 - 60 - 2 <= fitted.active_deadline_seconds <= 86400 - 1800 - 60
    assert fitted.active_deadline_seconds < wait.timeout_s <= 86400 - 1800, "wait ends first"
    assert within_deadline(spec(), WaitPolicy(), None) == (spec(), WaitPolicy()), "no deadline outside KFP"
    with pytest.raises(LabelmatchError, match="only 0 s left before the step's deadline"):
        within_deadline(spec(), WaitPolicy(), time.monotonic() + 30)
    with pytest.raises(ConfigError, match="margin_s must be above 0 and below its deadline_s"):
        TuneStepConfig(deadline_s=600, margin_s=900)


def test_kuberay_fails_a_rayjob_past_its_deadline_and_the_step_reports_it(store_env):
    with kuberay_double(KubeRayState(scripted=[running("x")])) as (api, state):
        manifest = build_rayjob(RayJobSpec(name="lm-tune-abc", namespace="ml", image="img:1",
                                           active_deadline_seconds=1), ENTRYPOINT)
        with pytest.raises(LabelmatchError, match=r"did not succeed: .*DeadlineExceeded"):
            run_rayjob(manifest, api, on_status=None, wait=FAST)
    assert state.deleted == [("ml", "lm-tune-abc")]
