"""The RayJob manifest against the real KubeRay CRD (strict), and its submission over HTTP.

Submission runs the real ``kubernetes`` client against a small local HTTP server that speaks
the three API paths it uses (create, read) and walks the RayJob through KubeRay's statuses.
"""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import jsonschema
import pytest
import yaml

from labelmatch.errors import ConfigError, LabelmatchError
from labelmatch.tuning.rayjob import RayJobSpec, build_rayjob, submit_rayjob

CRD = Path(__file__).resolve().parents[2] / "shared" / "crds" / "ray.io_rayjobs.yaml"
ENTRYPOINT = "labelmatch tune --data /data --out /tmp/model --address auto --trials 4"


def strict(schema: dict) -> dict:
    """Reject unknown fields wherever the CRD lists properties and does not preserve unknowns."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def rayjob_validator():
    if not CRD.is_file():
        pytest.skip(f"{CRD} not available")
    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def _errors(validator, manifest) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


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


def test_rayjob_validates_strictly_against_the_kuberay_crd(rayjob_validator):
    manifest = build_rayjob(production_spec(), ENTRYPOINT)
    assert _errors(rayjob_validator, manifest) == []
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 600
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 4
    pod = workers["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-a10"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "--address auto" in spec["entrypoint"]


def test_strict_validation_rejects_unknown_and_mistyped_fields(rayjob_validator):
    manifest = build_rayjob(production_spec(), ENTRYPOINT)
    manifest["spec"]["shutdownAfterJobFinish"] = True  # typo of a real field
    manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "4"
    errors = _errors(rayjob_validator, manifest)
    assert any("shutdownAfterJobFinish" in e and "Additional properties" in e for e in errors)
    assert any("replicas" in e for e in errors)


def test_values_file_sets_the_spec_and_refuses_unknown_keys(tmp_path, rayjob_validator):
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
    assert _errors(rayjob_validator, build_rayjob(spec, ENTRYPOINT)) == []
    values.write_text(yaml.safe_dump({"worker_count": 2}))
    with pytest.raises(ConfigError, match=r"unknown RayJob setting.*worker_count"):
        RayJobSpec.from_values(values)


class FakeKubeRay(BaseHTTPRequestHandler):
    """Create and read RayJobs; each read advances the status like the KubeRay operator would."""

    jobs: ClassVar[dict] = {}
    statuses: ClassVar[list] = [
        {},
        {"jobDeploymentStatus": "Initializing"},
        {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
        {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
    ]

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        parts = self.path.strip("/").split("/")  # apis/ray.io/v1/namespaces/NS/rayjobs
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if parts[:3] != ["apis", "ray.io", "v1"] or parts[5:] != ["rayjobs"]:
            return self._reply(404, {"kind": "Status", "message": f"no route {self.path}"})
        name = body["metadata"]["name"]
        if (parts[4], name) in self.jobs:
            return self._reply(409, {"kind": "Status", "message": f'rayjobs.ray.io "{name}" already exists'})
        self.jobs[(parts[4], name)] = {"object": body, "reads": 0}
        return self._reply(201, body)

    def do_GET(self):
        parts = self.path.strip("/").split("/")
        job = self.jobs.get((parts[4], parts[6])) if len(parts) == 7 else None
        if job is None:
            return self._reply(404, {"kind": "Status", "message": "not found"})
        status = self.statuses[min(job["reads"], len(self.statuses) - 1)]
        job["reads"] += 1
        return self._reply(200, {**job["object"], "status": status})

    def log_message(self, *args):
        pass


@pytest.fixture
def kube_api():
    from kubernetes import client

    FakeKubeRay.jobs = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKubeRay)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
    yield client.ApiClient(configuration)
    server.shutdown()
    server.server_close()


def test_submit_creates_the_rayjob_and_follows_its_status_to_completion(kube_api):
    manifest = build_rayjob(production_spec(), ENTRYPOINT)
    seen = []
    status = submit_rayjob(manifest, kube_api, on_status=seen.append, poll_seconds=0.01)
    assert status == {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
    assert [s.get("jobDeploymentStatus") for s in seen] == [None, "Initializing", "Running", "Complete"]
    assert FakeKubeRay.jobs[("ml", "tune-tax")]["object"] == manifest


def test_submit_reports_an_api_refusal_in_one_line(kube_api):
    manifest = build_rayjob(production_spec(), ENTRYPOINT)
    submit_rayjob(manifest, kube_api, poll_seconds=0.01)
    with pytest.raises(LabelmatchError, match=r"creating RayJob ml/tune-tax failed: 409 .*already exists"):
        submit_rayjob(manifest, kube_api, poll_seconds=0.01)
