"""A stub of the Kubeflow Pipelines v2beta1 REST endpoints labelmatch uses, on 127.0.0.1.

It keeps pipelines, versions, experiments and runs in memory, behaves like the KFP API server
where labelmatch depends on it (the upload endpoint names the first version after the pipeline;
version names are unique per pipeline; a run must reference an existing version and declared
parameters) and records every request so tests can assert the exact calls.

Namespaces and identity follow the KFP 2.17.0 backend (kubeflow/pipelines tag ``2.17.0``,
commit 4a3592cb; files under ``backend/src/apiserver/``):

* ``resource/resource_manager.go`` ``ReplaceNamespace``: a single-user server (``multi_user``
  False, the default) replaces every namespace it is sent by "" and authorises nothing.
* ``server/pipeline_upload_server.go`` ``UploadPipeline``: the ``namespace`` query parameter is the
  new pipeline's namespace ("" = a shared pipeline, which ``canUploadVersionedPipeline`` lets anyone
  create); ``UploadPipelineVersion`` takes the namespace of the pipeline.
* ``server/pipeline_server.go`` ``listPipelines``: pipelines are listed for exactly one namespace
  (``pipelines.Namespace = ?``: a namespaced list does not include the shared ones);
  ``canAccessPipeline``: reading a shared pipeline needs no identity, changing one is authorised
  against the KFP namespace (``POD_NAMESPACE``, default ``kubeflow``).
* ``server/experiment_server.go`` ``canAccessExperiment``: in multi-user mode an experiment (create
  or list) with an empty namespace is refused, 400 "An experiment cannot have an empty namespace
  in multi-user mode".
* ``server/run_server.go`` ``createRun``: a run takes its namespace from its experiment
  (``GetValidExperimentNamespacePair``); the v2beta1 Run has no namespace field of its own.
* ``auth/auth.go``, ``auth/authenticator_token_review.go``, ``common/const.go``: the caller is
  identified by the header ``Authorization: Bearer <token>`` (a TokenReview of the token), else
  401 Unauthenticated; ``resource/resource_manager.go`` ``IsAuthorized``: then a
  SubjectAccessReview per namespace, else 403. Here ``KfpState.tokens`` maps a token to the
  namespaces its user may use (the SubjectAccessReview's answer).

Pipeline tags, the default version and runs (same tag and files):

* ``server/pipeline_server.go`` ``UpdatePipeline`` (``PATCH /apis/v2beta1/pipelines/{pipeline_id}``,
  new in 2.17.0, ``backend/api/v2beta1/pipeline.proto``): authorised with the verb ``update`` like
  any change of the pipeline (``canAccessPipeline``); a non-empty ``display_name`` renames it;
  ``tags`` absent leaves the tags alone, present **replaces** them (``storage/pipeline_store.go``
  ``updateEntityFields``: upsert the given keys, delete the others), ``"tags": {}`` clears them
  (``main.go`` ``clearTagsMiddleware``); ``model/pipeline_tags.go`` ``ValidateTags``: at most 20,
  keys non-empty, without ``.``, keys and values at most 63 characters, else 400.
* There is no v2beta1 default version: a run that references a pipeline without a version id runs
  the newest version (``resource/resource_manager.go`` ``fetchPipelineVersionFromPipelineSpec``,
  ``storage/pipeline_store.go`` ``GetLatestPipelineVersion``: ``ORDER BY CreatedAtInSec DESC``);
  versions here are created one second apart.
* ``backend/api/v2beta1/run.proto``: a Run's ``pipeline_source`` is a oneof, a
  ``pipeline_version_reference`` **or** an inline ``pipeline_spec`` (both: 400, as protojson
  refuses a oneof set twice). With a reference the run executes the version's stored spec
  (``fetchTemplateFromPipelineSpec``); the run has no caching field, so what the v2 driver reads
  per task is ``cachingOptions.enableCache`` of that spec (``backend/src/v2/driver/container.go``):
  :func:`run_caching` answers it for a stored run.

Errors are the grpc-gateway JSON body (``code``, ``message``) with the HTTP status of the gRPC
code (InvalidArgument 400, Unauthenticated 401, PermissionDenied 403, NotFound 404).
"""

import contextlib
import email.parser
import itertools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

API = "/apis/v2beta1"
#: The namespace KFP itself runs in (``POD_NAMESPACE``): where shared pipelines are authorised.
KFP_NAMESPACE = "kubeflow"
#: Creation times of versions count seconds from here.
EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


class Refused(Exception):
    """A request the server answers with an error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Request:
    """One request as the stub received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any = None  # parsed JSON, or {"uploadfile": bytes} for a multipart upload

    def header(self, name: str) -> str | None:
        """A header's value; names are case-insensitive (the SDK sends ``authorization``)."""
        return next((value for key, value in self.headers.items() if key.lower() == name.lower()), None)


@dataclass
class KfpState:
    """The server's content; ``multi_user`` and ``tokens`` (bearer token -> namespaces its user
    may use) are set by a test before its requests."""

    multi_user: bool = False
    tokens: dict[str, set[str]] = field(default_factory=dict)
    pipelines: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, list[dict]] = field(default_factory=dict)
    experiments: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    clock: Iterator[int] = field(default_factory=lambda: itertools.count(1))  # seconds after EPOCH

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self.ids):04d}"

    def calls(self) -> list[tuple[str, str]]:
        """(method, path) of every request but the health check."""
        return [(r.method, r.path) for r in self.requests if not r.path.endswith("/healthz")]

    def namespace(self, given: str | None) -> str:
        """``ReplaceNamespace``: the namespace as sent in multi-user mode, "" in single-user mode."""
        return (given or "") if self.multi_user else ""

    def authorize(self, request: Request, namespace: str, write: bool = False) -> None:
        """Identity and access of a pipeline/experiment/run request in ``namespace``.

        A shared pipeline ("") is readable by anyone; changing it is authorised against
        :data:`KFP_NAMESPACE`. Raises :class:`Refused` (401 no or unknown token, 403 no access).
        """
        if not self.multi_user:
            return
        if namespace == "":
            if not write:
                return
            namespace = KFP_NAMESPACE
        header = request.header("Authorization") or ""
        token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else None
        if token is None or token not in self.tokens:
            raise Refused(401, "Failed to check authorization. User identity is empty in the request header")
        if namespace not in self.tokens[token]:
            raise Refused(403, f"PermissionDenied: no access to namespace {namespace}")

    def run_namespace(self, run: dict) -> str:
        return self.experiments[run["experiment_id"]].get("namespace", "")


#: ``model/pipeline_tags.go``: MaxTagsPerEntity, MaxTagKeyLength, MaxTagValueLength.
MAX_TAGS, MAX_TAG_KEY, MAX_TAG_VALUE = 20, 63, 63


def _validate_tags(tags: dict[str, str]) -> None:
    """``ValidateTags``: :class:`Refused` 400 for a tag set the server refuses."""
    if len(tags) > MAX_TAGS:
        raise Refused(400, f"number of tags ({len(tags)}) exceeds maximum of {MAX_TAGS} per entity")
    for key, value in tags.items():
        if not key:
            raise Refused(400, "tag key cannot be empty")
        if "." in key:
            raise Refused(400, f"tag key {key!r} must not contain '.' character")
        if len(key) > MAX_TAG_KEY:
            raise Refused(400, f"tag key {key!r} exceeds maximum length of {MAX_TAG_KEY} characters")
        if len(value) > MAX_TAG_VALUE:
            raise Refused(400, f"tag value {value!r} for key {key!r} exceeds maximum length of "
                               f"{MAX_TAG_VALUE} characters")


def _pipeline_json(pipeline: dict) -> dict:
    """A pipeline as the server answers: protojson leaves an empty tag map out."""
    return {k: v for k, v in pipeline.items() if not (k == "tags" and not v)}


def run_caching(state: "KfpState", run_id: str) -> dict[str, bool]:
    """``{"<dag>/<task>": enableCache}`` of every task of a stored run, as the v2 driver reads it
    (``opts.Task.GetCachingOptions().GetEnableCache()``: absent is false): from the run's inline
    spec, else from the spec of the version it references."""
    run = state.runs[run_id]
    if "pipeline_spec" in run:
        spec = run["pipeline_spec"]
    else:
        ref = run["pipeline_version_reference"]
        [version] = [v for v in state.versions[ref["pipeline_id"]]
                     if v["pipeline_version_id"] == ref["pipeline_version_id"]]
        spec = version["pipeline_spec"]
    spec = spec.get("pipeline_spec", spec) if "root" not in spec else spec
    dags = {"root": spec["root"]["dag"]}
    dags.update({name: c["dag"] for name, c in spec.get("components", {}).items() if "dag" in c})
    return {f"{dag}/{task}": bool((body.get("cachingOptions") or {}).get("enableCache", False))
            for dag, body_dag in dags.items() for task, body in body_dag.get("tasks", {}).items()}


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
        try:
            self._get(request, query)
        except Refused as exc:
            self._error(exc.status, exc.message)

    def do_POST(self) -> None:
        request, query = self._read()
        try:
            self._post(request, query)
        except Refused as exc:
            self._error(exc.status, exc.message)

    def do_PATCH(self) -> None:
        request, _ = self._read()
        try:
            self._patch(request)
        except Refused as exc:
            self._error(exc.status, exc.message)

    def do_DELETE(self) -> None:
        request, _ = self._read()
        try:
            self._delete(request)
        except Refused as exc:
            self._error(exc.status, exc.message)

    def _pipeline(self, pipeline_id: str, request: Request, write: bool = False) -> dict:
        if pipeline_id not in self.state.pipelines:
            raise Refused(404, f"pipeline {pipeline_id} not found")
        pipeline = self.state.pipelines[pipeline_id]
        self.state.authorize(request, pipeline["namespace"], write)
        return pipeline

    def _experiment_namespace(self, given: str | None) -> str:
        namespace = self.state.namespace(given)
        if self.state.multi_user and not namespace:
            raise Refused(400, "An experiment cannot have an empty namespace in multi-user mode")
        return namespace

    def _get(self, request: Request, query: dict[str, str]) -> None:
        s, path = self.state, request.path
        parts = path.split("/")
        if path == f"{API}/healthz":
            return self._send(200, {"multi_user": s.multi_user})
        if path == f"{API}/pipelines":
            name, namespace = _filter_name(query), s.namespace(query.get("namespace"))
            s.authorize(request, namespace)
            found = [_pipeline_json(p) for p in s.pipelines.values()
                     if p["namespace"] == namespace and (name is None or p["display_name"] == name)]
            return self._send(200, {"pipelines": found, "total_size": len(found)} if found else {})
        if len(parts) == 5 and path.startswith(f"{API}/pipelines/"):
            return self._send(200, _pipeline_json(self._pipeline(parts[4], request)))
        if len(parts) == 7 and path.startswith(f"{API}/pipelines/") and parts[5] == "versions":
            self._pipeline(parts[4], request)
            found = [v for v in s.versions[parts[4]] if v["pipeline_version_id"] == parts[6]]
            if not found:
                return self._error(404, f"pipeline version {parts[6]} not found")
            return self._send(200, found[0])
        if path.startswith(f"{API}/pipelines/") and path.endswith("/versions"):
            pipeline_id = path.split("/")[4]
            self._pipeline(pipeline_id, request)
            versions = s.versions[pipeline_id]
            start = int(query.get("page_token") or 0)
            size = int(query.get("page_size") or 10)
            page = {"pipeline_versions": versions[start : start + size], "total_size": len(versions)}
            if start + size < len(versions):
                page["next_page_token"] = str(start + size)
            return self._send(200, page)
        if path == f"{API}/experiments":
            name, namespace = _filter_name(query), self._experiment_namespace(query.get("namespace"))
            s.authorize(request, namespace)
            found = [e for e in s.experiments.values()
                     if e["namespace"] == namespace and (name is None or e["display_name"] == name)]
            return self._send(200, {"experiments": found, "total_size": len(found)} if found else {})
        if len(parts) == 5 and path.startswith(f"{API}/runs/"):
            if parts[4] not in s.runs:
                return self._error(404, f"run {parts[4]} not found")
            run = s.runs[parts[4]]
            s.authorize(request, s.run_namespace(run))
            return self._send(200, run)
        return self._error(404, f"no route GET {path}")

    def _post(self, request: Request, query: dict[str, str]) -> None:
        s, path = self.state, request.path
        if path == f"{API}/pipelines/upload":
            name = query.get("display_name") or query.get("name")
            if not name or not request.body or "uploadfile" not in request.body:
                return self._error(400, "name and uploadfile are required")
            namespace = s.namespace(query.get("namespace"))
            if namespace:  # canUploadVersionedPipeline: a shared upload is not authorised
                s.authorize(request, namespace, write=True)
            if any(p["display_name"] == name and p["namespace"] == namespace for p in s.pipelines.values()):
                return self._error(409, f"pipeline {name} already exists")
            pipeline = {
                "pipeline_id": s.new_id("pipeline"),
                "display_name": name,
                "name": name,
                "description": query.get("description", ""),
                "created_at": "2025-01-01T00:00:00Z",
                "namespace": namespace,
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
            if s.pipelines[pipeline_id]["namespace"]:  # as the upload: a shared pipeline is not authorised
                s.authorize(request, s.pipelines[pipeline_id]["namespace"], write=True)
            if not name or not request.body or "uploadfile" not in request.body:
                return self._error(400, "name and uploadfile are required")
            if any(v["display_name"] == name for v in s.versions[pipeline_id]):
                return self._error(409, f"version {name} already exists")
            return self._send(200, self._add_version(pipeline_id, name, request.body["uploadfile"]))
        if path == f"{API}/experiments":
            namespace = self._experiment_namespace(request.body.get("namespace"))
            s.authorize(request, namespace, write=True)
            experiment = {
                **request.body,
                "namespace": namespace,
                "experiment_id": s.new_id("experiment"),
                "storage_state": "AVAILABLE",
            }
            s.experiments[experiment["experiment_id"]] = experiment
            return self._send(200, experiment)
        if path == f"{API}/runs":
            body = request.body
            if "pipeline_version_reference" in body and "pipeline_spec" in body:
                return self._error(400, "oneof v2beta1.Run.pipeline_source is already set")
            if "pipeline_spec" in body:
                stored = body["pipeline_spec"]
            else:
                ref = body.get("pipeline_version_reference") or {}
                versions = s.versions.get(ref.get("pipeline_id"), [])
                if not ref.get("pipeline_version_id") and versions:
                    # GetLatestPipelineVersion: the newest creation time; the run is filed under it.
                    latest = max(versions, key=lambda v: v["created_at"])
                    body["pipeline_version_reference"] = {**ref, "pipeline_version_id":
                                                          latest["pipeline_version_id"]}
                    ref = body["pipeline_version_reference"]
                by_id = {v["pipeline_version_id"]: v for v in versions}
                if ref.get("pipeline_version_id") not in by_id:
                    return self._error(404, f"pipeline version {ref} not found")
                stored = by_id[ref["pipeline_version_id"]]["pipeline_spec"]
            if body.get("experiment_id") not in s.experiments:
                return self._error(404, f"experiment {body.get('experiment_id')} not found")
            namespace = s.experiments[body["experiment_id"]]["namespace"]
            if s.multi_user and not namespace:
                return self._error(400, "A run cannot have an empty namespace in multi-user mode")
            s.authorize(request, namespace, write=True)
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

    def _patch(self, request: Request) -> None:
        parts = request.path.split("/")
        if len(parts) == 5 and request.path.startswith(f"{API}/pipelines/"):
            pipeline = self._pipeline(parts[4], request, write=True)  # canAccessPipeline, verb update
            body = request.body or {}
            tags = body.get("tags")
            if tags is not None:
                _validate_tags(tags)
            if body.get("display_name"):
                pipeline["display_name"] = body["display_name"]
            if tags is not None:
                pipeline["tags"] = dict(tags)  # replaces the set; {} clears it
            return self._send(200, _pipeline_json(pipeline))
        return self._error(404, f"no route PATCH {request.path}")

    def _delete(self, request: Request) -> None:
        parts = request.path.split("/")
        if len(parts) == 7 and parts[5] == "versions" and parts[4] in self.state.versions:
            self._pipeline(parts[4], request, write=True)
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
            # One second apart, so that the newest version is well defined (CreatedAtInSec).
            "created_at": (EPOCH + timedelta(seconds=next(self.state.clock))).strftime("%Y-%m-%dT%H:%M:%SZ"),
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
