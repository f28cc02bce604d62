"""A stub of the Kubeflow Pipelines v2beta1 REST endpoints labelmatch uses, on 127.0.0.1.

It keeps pipelines, versions, experiments and runs in memory, behaves like the KFP API server
where labelmatch depends on it (the upload endpoint names the first version after the pipeline;
version names are unique per pipeline; a run must reference an existing version and declared
parameters) and records every request so tests can assert the exact calls.
"""

import contextlib
import email.parser
import itertools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

API = "/apis/v2beta1"


@dataclass
class Request:
    """One request as the stub received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any = None  # parsed JSON, or {"uploadfile": bytes} for a multipart upload


@dataclass
class KfpState:
    pipelines: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, list[dict]] = field(default_factory=dict)
    experiments: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self.ids):04d}"

    def calls(self) -> list[tuple[str, str]]:
        """(method, path) of every request but the health check."""
        return [(r.method, r.path) for r in self.requests if not r.path.endswith("/healthz")]


def _filter_name(query: dict[str, str]) -> str | None:
    if "filter" not in query:
        return None
    [predicate] = json.loads(query["filter"])["predicates"]
    assert predicate["key"] == "display_name" and predicate["operation"] in ("EQUALS", 1), predicate
    return predicate["stringValue"]


class _Handler(BaseHTTPRequestHandler):
    state: KfpState

    def log_message(self, *args: Any) -> None:
        """Silence the per-request log."""

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(
            status, {"error": message, "code": {404: 5, 409: 6, 400: 3}.get(status, 2), "message": message}
        )

    def _read(self) -> tuple[Request, dict[str, str]]:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body: Any = None
        content_type = self.headers.get("Content-Type", "")
        if content_type.startswith("multipart/form-data"):
            message = email.parser.BytesParser().parsebytes(
                f"Content-Type: {content_type}\r\n\r\n".encode() + raw
            )
            body = {
                part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                for part in message.get_payload()
            }
        elif raw:
            body = json.loads(raw)
        request = Request(self.command, parts.path, query, dict(self.headers.items()), body)
        self.state.requests.append(request)
        return request, query

    def do_GET(self) -> None:
        request, query = self._read()
        s, path = self.state, request.path
        if path == f"{API}/healthz":
            return self._send(200, {"multi_user": False})
        if path == f"{API}/pipelines":
            name = _filter_name(query)
            found = [p for p in s.pipelines.values() if name is None or p["display_name"] == name]
            return self._send(200, {"pipelines": found, "total_size": len(found)} if found else {})
        if path.startswith(f"{API}/pipelines/") and path.endswith("/versions"):
            pipeline_id = path.split("/")[4]
            if pipeline_id not in s.pipelines:
                return self._error(404, f"pipeline {pipeline_id} not found")
            versions = s.versions[pipeline_id]
            start = int(query.get("page_token") or 0)
            size = int(query.get("page_size") or 10)
            page = {"pipeline_versions": versions[start : start + size], "total_size": len(versions)}
            if start + size < len(versions):
                page["next_page_token"] = str(start + size)
            return self._send(200, page)
        if path == f"{API}/experiments":
            name = _filter_name(query)
            found = [e for e in s.experiments.values() if name is None or e["display_name"] == name]
            return self._send(200, {"experiments": found, "total_size": len(found)} if found else {})
        return self._error(404, f"no route GET {path}")

    def do_POST(self) -> None:
        request, query = self._read()
        s, path = self.state, request.path
        if path == f"{API}/pipelines/upload":
            name = query.get("display_name") or query.get("name")
            if not name or not request.body or "uploadfile" not in request.body:
                return self._error(400, "name and uploadfile are required")
            if any(p["display_name"] == name for p in s.pipelines.values()):
                return self._error(409, f"pipeline {name} already exists")
            pipeline = {
                "pipeline_id": s.new_id("pipeline"),
                "display_name": name,
                "name": name,
                "description": query.get("description", ""),
                "created_at": "2025-01-01T00:00:00Z",
            }
            s.pipelines[pipeline["pipeline_id"]] = pipeline
            s.versions[pipeline["pipeline_id"]] = []
            # As the real server does: the first version is named after the pipeline.
            self._add_version(pipeline["pipeline_id"], name, request.body["uploadfile"])
            return self._send(200, pipeline)
        if path == f"{API}/pipelines/upload_version":
            pipeline_id, name = query.get("pipelineid"), query.get("display_name") or query.get("name")
            if pipeline_id not in s.pipelines:
                return self._error(404, f"pipeline {pipeline_id} not found")
            if not name or not request.body or "uploadfile" not in request.body:
                return self._error(400, "name and uploadfile are required")
            if any(v["display_name"] == name for v in s.versions[pipeline_id]):
                return self._error(409, f"version {name} already exists")
            return self._send(200, self._add_version(pipeline_id, name, request.body["uploadfile"]))
        if path == f"{API}/experiments":
            experiment = {
                **request.body,
                "experiment_id": s.new_id("experiment"),
                "storage_state": "AVAILABLE",
            }
            s.experiments[experiment["experiment_id"]] = experiment
            return self._send(200, experiment)
        if path == f"{API}/runs":
            body = request.body
            ref = body.get("pipeline_version_reference") or {}
            versions = {v["pipeline_version_id"]: v for v in s.versions.get(ref.get("pipeline_id"), [])}
            if ref.get("pipeline_version_id") not in versions:
                return self._error(404, f"pipeline version {ref} not found")
            if body.get("experiment_id") not in s.experiments:
                return self._error(404, f"experiment {body.get('experiment_id')} not found")
            stored = versions[ref["pipeline_version_id"]]["pipeline_spec"]
            declared = stored.get("pipeline_spec", stored)["root"]["inputDefinitions"]["parameters"]
            unknown = set((body.get("runtime_config") or {}).get("parameters", {})) - set(declared)
            if unknown:
                return self._error(400, f"unknown parameters {sorted(unknown)}")
            run = {
                **body,
                "run_id": s.new_id("run"),
                "state": "PENDING",
                "created_at": "2025-01-01T00:00:00Z",
            }
            s.runs[run["run_id"]] = run
            return self._send(200, run)
        return self._error(404, f"no route POST {path}")

    def do_DELETE(self) -> None:
        request, _ = self._read()
        parts = request.path.split("/")
        if len(parts) == 7 and parts[5] == "versions" and parts[4] in self.state.versions:
            versions = self.state.versions[parts[4]]
            kept = [v for v in versions if v["pipeline_version_id"] != parts[6]]
            if len(kept) == len(versions):
                return self._error(404, f"version {parts[6]} not found")
            self.state.versions[parts[4]] = kept
            return self._send(200, {})
        return self._error(404, f"no route DELETE {request.path}")

    def _add_version(self, pipeline_id: str, name: str, package: bytes) -> dict:
        # As the server does (YamlStringToPipelineSpecStruct): an IR with a Kubernetes platform
        # document is stored as {"pipeline_spec": ..., "platform_spec": ...}.
        docs = [doc for doc in yaml.safe_load_all(package) if doc]
        pipeline = next(doc for doc in docs if "platforms" not in doc)
        platforms = [doc for doc in docs if "platforms" in doc]
        spec = {"pipeline_spec": pipeline, "platform_spec": platforms[0]} if platforms else pipeline
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": self.state.new_id("version"),
            "display_name": name,
            "name": name,
            "created_at": "2025-01-01T00:00:00Z",
            "pipeline_spec": spec,
        }
        self.state.versions[pipeline_id].append(version)
        return version


@contextlib.contextmanager
def kfp_stub_server() -> Iterator[tuple[str, KfpState]]:
    """Serve the stub on 127.0.0.1 (free port); yield ``(http://host:port, state)``."""
    state = KfpState()
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


def shipped_ir(out_dir, name: str, version: str) -> str:
    """The compiled IR that ships (``pipelines/compiled/<name>-<package version>.yaml``), copied to
    ``<out_dir>/<name>-<version>.yaml`` so that tests can upload it as several versions."""
    import shutil

    from labelmatch import __version__
    from pipelines.registry import COMPILED_DIR

    path = f"{out_dir}/{name}-{version}.yaml"
    shutil.copyfile(COMPILED_DIR / f"{name}-{__version__}.yaml", path)
    return path
