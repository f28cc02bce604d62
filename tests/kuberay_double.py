"""A test double of the Kubernetes API for KubeRay's RayJobs, on 127.0.0.1.

It serves the three calls labelmatch makes (create, read, delete a ``ray.io/v1`` RayJob) the way
the API server answers them (201, 409 ``AlreadyExists``, 404 ``NotFound`` Status objects), and
plays the operator in one of two ways:

* ``scripted``: each read returns the next status of a fixed list (for the status-following logic);
* ``ray_jobs_address``: on create, the RayJob's ``entrypoint`` is submitted to a real Ray cluster's
  Jobs API — what KubeRay's ``K8sJobMode`` submitter does — with the environment the RayJob's
  pods would get (``env`` values, ``envFrom`` ConfigMaps and Secrets given to the double), and
  reads report that Ray job's status as KubeRay would. Only the pods are missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: Ray job status → (KubeRay jobDeploymentStatus, jobStatus).
RAY_TO_KUBERAY = {
    "PENDING": ("Initializing", "PENDING"),
    "RUNNING": ("Running", "RUNNING"),
    "SUCCEEDED": ("Complete", "SUCCEEDED"),
    "FAILED": ("Complete", "FAILED"),
    "STOPPED": ("Complete", "STOPPED"),
}


@dataclass
class KubeRayState:
    """What the double holds and saw."""

    jobs: dict[tuple[str, str], dict] = field(default_factory=dict)
    deleted: list[tuple[str, str]] = field(default_factory=list)
    scripted: list[dict] = field(default_factory=list)
    ray_jobs_address: str | None = None
    config_maps: dict[str, dict[str, str]] = field(default_factory=dict)
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)


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

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                           "message": message, "code": code})

    def _key(self) -> tuple[list[str], tuple[str, str] | None]:
        parts = self.path.split("?")[0].strip("/").split("/")  # apis/ray.io/v1/namespaces/NS/rayjobs[/NAME]
        ok = parts[:3] == ["apis", "ray.io", "v1"] and len(parts) >= 6 and parts[5] == "rayjobs"
        return parts, ((parts[4], parts[6]) if ok and len(parts) == 7 else None)

    def do_POST(self) -> None:
        parts, _ = self._key()
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if parts[:3] != ["apis", "ray.io", "v1"] or parts[5:] != ["rayjobs"]:
            return self._status(404, "NotFound", f"no route {self.path}")
        key = (parts[4], body["metadata"]["name"])
        if key in self.state.jobs:
            return self._status(409, "AlreadyExists", f'rayjobs.ray.io "{key[1]}" already exists')
        job = {"object": body, "reads": 0, "ray_job": None}
        if self.state.ray_jobs_address:
            job["ray_job"] = self._submit(body)
        self.state.jobs[key] = job
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
        _, key = self._key()
        job = self.state.jobs.get(key) if key else None
        if job is None:
            return self._status(404, "NotFound", f"rayjobs.ray.io {key} not found")
        job["reads"] += 1
        return self._reply(200, {**job["object"], "status": self._progress(job)})

    def _progress(self, job: dict) -> dict:
        if job["ray_job"] is None:
            scripted = self.state.scripted
            return scripted[min(job["reads"] - 1, len(scripted) - 1)] if scripted else {}
        from ray.job_submission import JobSubmissionClient

        info = JobSubmissionClient(self.state.ray_jobs_address).get_job_info(job["ray_job"])
        deployment, job_status = RAY_TO_KUBERAY[str(info.status.value)]
        status = {"jobDeploymentStatus": deployment, "jobStatus": job_status, "jobId": job["ray_job"]}
        if info.message:
            status["message"] = info.message
        return status

    def do_DELETE(self) -> None:
        _, key = self._key()
        if key not in self.state.jobs:
            return self._status(404, "NotFound", f"rayjobs.ray.io {key} not found")
        del self.state.jobs[key]
        self.state.deleted.append(key)
        return self._reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})


@contextlib.contextmanager
def kuberay_double(state: KubeRayState | None = None) -> Iterator[tuple[Any, KubeRayState]]:
    """Serve the double on 127.0.0.1 (free port); yield ``(kubernetes ApiClient, state)``."""
    from kubernetes import client

    state = state or KubeRayState()
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield client.ApiClient(configuration), state
    finally:
        server.shutdown()
        server.server_close()
