"""A test double of the Kubernetes API for KubeRay's RayJobs, on 127.0.0.1.

It serves the three calls labelmatch makes (create, read, delete a ``ray.io/v1`` RayJob) the way
the API server answers them (201, 409 ``AlreadyExists``, 404 ``NotFound`` Status objects), fails
on request (:meth:`KubeRayState.inject`: ``429`` with ``Retry-After``, ``500``, ``503``, or a
connection reset, for the next N requests), and plays the operator in one of two ways:

* ``scripted``: each read returns the next status of a list (for the status-following logic);
  :func:`lifecycle` and :func:`dead_driver` write the lists KubeRay would go through;
* ``ray_jobs_address``: on create, the RayJob's ``entrypoint`` is submitted to a real Ray cluster's
  Jobs API — what KubeRay's ``K8sJobMode`` submitter does — with the environment the RayJob's
  pods would get (``env`` values, ``envFrom`` ConfigMaps and Secrets given to the double), and
  reads report that Ray job's status as KubeRay would; a delete stops a Ray job that has not
  ended (the RayJob's ``ray.io/rayjob-finalizer``). Only the pods are missing.

Status semantics are KubeRay v1.7.0's (tag ``v1.7.0``, commit ``59d663ae``, the version of
``../shared/crds/ray.io_rayjobs.yaml``), read in its source:

* ``ray-operator/apis/ray/v1/rayjob_types.go``: ``JobDeploymentStatus`` (``""`` → ``Initializing``
  → ``Running`` → ``Complete`` | ``Failed``; ``ValidationFailed``, ``Retrying``, ``Suspended`` ...),
  ``JobStatus`` (the Ray job's: ``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED``, ``STOPPED``;
  ``IsJobTerminal``), ``JobFailedReason`` (``AppFailed``, ``DeadlineExceeded``,
  ``SubmissionFailed``, ``JobDeploymentStatusTransitionGracePeriodExceeded``, ...), and
  ``RayJobStatus``: ``jobId``, ``rayClusterName``, ``dashboardURL``, ``jobStatus``,
  ``jobDeploymentStatus``, ``reason``, ``message``, ``startTime`` (set on ``Initializing``),
  ``endTime`` (set on ``Complete``/``Failed``), ``rayJobInfo.startTime``/``endTime`` (the Ray
  job's, from the dashboard), ``succeeded``/``failed`` (attempt counts, 0 from the first
  reconcile), ``jobStatusCheckFailureStartTime``.
* ``ray-operator/controllers/ray/rayjob_controller.go``: ``initRayJobStatusIfNeed`` (``Initializing``,
  ``startTime``, ``jobId``/``rayClusterName`` = name + random suffix); ``Initializing`` →
  ``Running`` once the submitter Kubernetes Job is created; under ``Running`` the job status is
  copied from the dashboard and the deployment becomes ``Complete`` (``SUCCEEDED``, ``STOPPED``)
  or ``Failed`` with reason ``AppFailed`` (``FAILED``) only when the Ray job is terminal **and**
  the submitter has finished, so a Ray job that ended under a submitter that did not leaves the
  RayJob ``Running`` (kuberay#2154; ``checkTransitionGracePeriodAndUpdateStatusIfNeeded`` ends
  that 300 s after ``rayJobInfo.endTime`` since 1.3); ``checkActiveDeadlineAndUpdateStatusIfNeeded``
  fails a RayJob past ``startTime + activeDeadlineSeconds`` (``Failed``, ``DeadlineExceeded``);
  ``checkBackoffLimitAndUpdateStatusIfNeeded`` counts ``failed``/``succeeded``.
* ``ray-operator/controllers/ray/utils/constant.go``: ``MaxRayJobNameLength`` (47) and the grace
  periods (``DEFAULT_RAYJOB_DEPLOYMENT_STATUS_TRANSITION_GRACE_PERIOD_SECONDS``,
  ``DEFAULT_RAYJOB_STATUS_CHECK_TIMEOUT_SECONDS``: 300).

The double's ``ApiClient`` turns urllib3's own retries off (``Configuration.retries = False``), so
every injected failure reaches labelmatch's retry layer (``labelmatch.platform.kube_retry``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: Ray job status → (KubeRay jobDeploymentStatus, reason) once the submitter has finished
#: (``rayjob_controller.go``, the ``JobDeploymentStatusRunning`` case).
RAY_TO_KUBERAY = {
    "PENDING": ("Running", ""),
    "RUNNING": ("Running", ""),
    "SUCCEEDED": ("Complete", ""),
    "FAILED": ("Failed", "AppFailed"),
    "STOPPED": ("Complete", ""),
}
TERMINAL_JOB = ("SUCCEEDED", "FAILED", "STOPPED")
#: What the API server says with each injected status code.
REASONS = {429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}


def _time(offset_s: float = 0.0) -> str:
    """A Kubernetes timestamp (RFC 3339, seconds)."""
    return datetime.fromtimestamp(time.time() + offset_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def initializing(name: str) -> dict[str, Any]:
    """The status after the first reconcile (``initRayJobStatusIfNeed``); ``jobStatus`` is still
    ``""`` and omitted."""
    return {"jobDeploymentStatus": "Initializing", "jobId": f"{name}-x7k2p",
            "rayClusterName": f"{name}-4mzqd", "startTime": _time(), "failed": 0, "succeeded": 0}


def running(name: str, job_status: str = "RUNNING", **extra: Any) -> dict[str, Any]:
    """``Running`` (the submitter Job exists) with the dashboard's job status."""
    status = {**initializing(name), "jobDeploymentStatus": "Running", "jobStatus": job_status,
              "dashboardURL": f"{name}-4mzqd-head-svc.ml.svc.cluster.local:8265"}
    if job_status != "PENDING":
        status["rayJobInfo"] = {"startTime": _time()}
    return {**status, **extra}


def ended(name: str, job_status: str, message: str = "") -> dict[str, Any]:
    """The status once the Ray job and the submitter have both ended."""
    deployment, reason = RAY_TO_KUBERAY[job_status]
    status = running(name, job_status)
    status.update(jobDeploymentStatus=deployment, endTime=_time())
    status["rayJobInfo"]["endTime"] = _time()
    status["succeeded" if job_status == "SUCCEEDED" else "failed"] = 1 if job_status != "STOPPED" else 0
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    return status


def lifecycle(name: str, job_status: str = "SUCCEEDED", message: str = "") -> list[dict[str, Any]]:
    """What reads see of a RayJob from creation to its end: no status yet, ``Initializing``,
    ``Running`` with ``PENDING`` then ``RUNNING``, then :func:`ended`."""
    return [{}, initializing(name), running(name, "PENDING"), running(name), ended(name, job_status, message)]


def dead_driver(name: str, job_status: str = "FAILED") -> list[dict[str, Any]]:
    """A Ray job that ended (its driver failed) under a submitter that did not: the RayJob stays
    ``Running`` with a terminal ``jobStatus`` and ``rayJobInfo.endTime`` (kuberay#2154; for ever
    before KubeRay 1.3, for the 300 s grace period since)."""
    stuck = running(name, job_status)
    stuck["rayJobInfo"]["endTime"] = _time()
    if job_status == "FAILED":
        stuck["message"] = "Job entrypoint command failed with exit code 1"
    return [{}, initializing(name), running(name), stuck]


def status_check_failing(name: str) -> list[dict[str, Any]]:
    """The head's dashboard stopped answering KubeRay: ``Running`` with
    ``jobStatusCheckFailureStartTime`` (``recordJobStatusCheckFailure``)."""
    return [{}, initializing(name), running(name), running(name, jobStatusCheckFailureStartTime=_time())]


@dataclass
class Fault:
    """An injected failure for the next ``count`` requests (of ``method``, or any).

    Attributes:
        kind: An HTTP status code (429, 500, 503, ...), ``"reset"`` (the connection is reset
            before anything is done) or ``"lost"`` (a create is stored, then the connection is
            reset before the answer).
        count: How many requests it hits.
        method: ``GET``, ``POST``, ``DELETE``; ``None``: any.
        retry_after: ``Retry-After`` header of the answer (seconds), if any.
    """

    kind: int | str
    count: int = 1
    method: str | None = None
    retry_after: float | None = None


@dataclass
class KubeRayState:
    """What the double holds and saw."""

    jobs: dict[tuple[str, str], dict] = field(default_factory=dict)
    #: Every RayJob object created, as the client sent it.
    created: list[dict] = field(default_factory=list)
    deleted: list[tuple[str, str]] = field(default_factory=list)
    scripted: list[dict] = field(default_factory=list)
    ray_jobs_address: str | None = None
    config_maps: dict[str, dict[str, str]] = field(default_factory=dict)
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    #: ``(method, path, answer)`` of every request; answer ``reset`` for a dropped connection.
    requests: list[tuple[str, str, int | str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def inject(self, kind: int | str, count: int = 1, method: str | None = None,
               retry_after: float | None = None) -> None:
        """Fail the next ``count`` requests (of ``method``) with ``kind`` (see :class:`Fault`)."""
        with self.lock:
            self.faults.append(Fault(kind, count, method, retry_after))

    def take_fault(self, method: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.count > 0 and fault.method in (None, method):
                    fault.count -= 1
                    return fault
        return None


def pod_environment(container: dict[str, Any], state: KubeRayState) -> dict[str, str]:
    """The environment a container of the RayJob would start with (``env`` then ``envFrom``)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(state.config_maps[source["configMapRef"]["name"]])
        if "secretRef" in source:
            env.update(state.secrets[source["secretRef"]["name"]])
    env.update({item["name"]: item["value"] for item in container.get("env", [])})
    return env


class _Handler(BaseHTTPRequestHandler):
    state: KubeRayState

    def log_message(self, *args: Any) -> None:
        """Silence the per-request log."""

    def _reply(self, code: int, body: dict, headers: dict[str, str] | None = None) -> None:
        self.state.requests.append((self.command, self.path, code))
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        self._reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                           "message": message, "code": code}, headers)

    def _reset(self, answer: str) -> None:
        self.state.requests.append((self.command, self.path, answer))
        # SO_LINGER 0: closing sends an RST, the client reads "Connection reset by peer".
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _fault(self, fault: Fault | None = None) -> bool:
        """Answer with an injected failure, if one is due; True when it did (``lost`` is
        answered by the handler once it has done what was asked)."""
        fault = fault or self.state.take_fault(self.command)
        if fault is None or fault.kind == "lost":
            return False
        if fault.kind == "reset":
            self._reset("reset")
            return True
        code = int(fault.kind)
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
        self._status(code, REASONS.get(code, "InternalError"), f"injected {code}", headers)
        return True

    def _key(self) -> tuple[list[str], tuple[str, str] | None]:
        parts = self.path.split("?")[0].strip("/").split("/")  # apis/ray.io/v1/namespaces/NS/rayjobs[/NAME]
        ok = parts[:3] == ["apis", "ray.io", "v1"] and len(parts) >= 6 and parts[5] == "rayjobs"
        return parts, ((parts[4], parts[6]) if ok and len(parts) == 7 else None)

    def do_POST(self) -> None:
        parts, _ = self._key()
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        fault = self.state.take_fault("POST")
        if self._fault(fault):
            return None
        if parts[:3] != ["apis", "ray.io", "v1"] or parts[5:] != ["rayjobs"]:
            return self._status(404, "NotFound", f"no route {self.path}")
        key = (parts[4], body["metadata"]["name"])
        if key in self.state.jobs:
            return self._status(409, "AlreadyExists", f'rayjobs.ray.io "{key[1]}" already exists')
        job = {"object": body, "reads": 0, "ray_job": None, "created": time.monotonic(), "final": None}
        if self.state.ray_jobs_address:
            job["ray_job"] = self._submit(body)
        self.state.jobs[key] = job
        self.state.created.append(body)
        if fault is not None:  # lost: stored, but the answer never reaches the client
            return self._reset("lost")
        return self._reply(201, body)

    def _submit(self, rayjob: dict) -> str:
        from ray.job_submission import JobSubmissionClient

        head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        env = pod_environment(head, self.state)
        # The image has labelmatch on PATH; here it is this interpreter's environment.
        env["PATH"] = f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}"
        client = JobSubmissionClient(self.state.ray_jobs_address)
        return client.submit_job(entrypoint=rayjob["spec"]["entrypoint"], runtime_env={"env_vars": env})

    def do_GET(self) -> None:
        if self._fault():
            return None
        _, key = self._key()
        job = self.state.jobs.get(key) if key else None
        if job is None:
            return self._status(404, "NotFound", f"rayjobs.ray.io {key} not found")
        job["reads"] += 1
        return self._reply(200, {**job["object"], "status": self._progress(job)})

    def _progress(self, job: dict) -> dict:
        if job["final"] is not None:  # Complete and Failed are final (no backoffLimit here)
            return job["final"]
        status = self._scripted(job) if job["ray_job"] is None else self._from_ray(job)
        deadline = job["object"]["spec"].get("activeDeadlineSeconds")
        if status.get("jobDeploymentStatus") in ("Initializing", "Running") and deadline \
                and time.monotonic() - job["created"] >= deadline:
            status = {**status, "jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded",
                      "endTime": _time(),
                      "message": f"The RayJob has passed the activeDeadlineSeconds. StartTime: "
                                 f"{status.get('startTime')}. ActiveDeadlineSeconds: {deadline}"}
        if status.get("jobDeploymentStatus") in ("Complete", "Failed"):
            job["final"] = status
        return status

    def _scripted(self, job: dict) -> dict:
        scripted = self.state.scripted
        return dict(scripted[min(job["reads"] - 1, len(scripted) - 1)]) if scripted else {}

    def _from_ray(self, job: dict) -> dict:
        from ray.job_submission import JobSubmissionClient

        info = JobSubmissionClient(self.state.ray_jobs_address).get_job_info(job["ray_job"])
        job_status = str(info.status.value)
        name = job["object"]["metadata"]["name"]
        if job_status in TERMINAL_JOB:
            status = ended(name, job_status, info.message or "")
        else:
            status = running(name, job_status)
        status["jobId"] = job["ray_job"]
        if info.message:
            status["message"] = info.message
        return status

    def do_DELETE(self) -> None:
        if self._fault():
            return None
        _, key = self._key()
        if key not in self.state.jobs:
            return self._status(404, "NotFound", f"rayjobs.ray.io {key} not found")
        job = self.state.jobs.pop(key)
        if job["ray_job"] is not None:
            self._stop(job["ray_job"])
        self.state.deleted.append(key)
        return self._reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

    def _stop(self, ray_job: str) -> None:
        """The finalizer: stop a Ray job that has not ended (``StopJob``)."""
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.state.ray_jobs_address)
        if str(client.get_job_status(ray_job).value) not in TERMINAL_JOB:
            client.stop_job(ray_job)


@contextlib.contextmanager
def serve(state: KubeRayState | None = None) -> Iterator[tuple[str, KubeRayState]]:
    """Serve the double on 127.0.0.1 (free port); yield ``(base URL, state)``."""
    state = state or KubeRayState()
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


def api_client(url: str) -> Any:
    """A ``kubernetes`` ApiClient for the double at ``url``, urllib3's own retries off."""
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = url
    configuration.retries = False
    return client.ApiClient(configuration)


@contextlib.contextmanager
def kuberay_double(state: KubeRayState | None = None) -> Iterator[tuple[Any, KubeRayState]]:
    """Serve the double on 127.0.0.1 (free port); yield ``(kubernetes ApiClient, state)``."""
    with serve(state) as (url, state):
        yield api_client(url), state
