"""A local fake of the few Kubernetes API calls labelmatch's deploy makes, on 127.0.0.1.

It serves InferenceServices (get, create, JSON merge patch) like the API server: generation
bumps on spec changes, 404/409 Status objects. A fake KServe controller marks the current
generation Ready after ``ready_after`` status reads (never, when None).
"""

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

PREFIX = "/apis/serving.kserve.io/v1beta1/namespaces/"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


@dataclass
class KubeState:
    objects: dict[tuple[str, str], dict] = field(default_factory=dict)
    requests: list[tuple[str, str, str, Any]] = field(
        default_factory=list
    )  # method, path, content type, body
    ready_after: int | None = 2
    reads_since_change: dict[tuple[str, str], int] = field(default_factory=dict)


class _Handler(BaseHTTPRequestHandler):
    state: KubeState

    def log_message(self, *args: Any) -> None:
        """Silence the per-request log."""

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._send(
            code,
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "reason": reason,
                "message": message,
                "code": code,
            },
        )

    def _route(self) -> tuple[str, str | None, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.state.requests.append((self.command, self.path, self.headers.get("Content-Type", ""), body))
        assert self.path.startswith(PREFIX), self.path
        parts = self.path[len(PREFIX) :].split("?")[0].split("/")
        assert parts[1] == "inferenceservices", self.path
        return parts[0], parts[2] if len(parts) > 2 else None, body

    def do_GET(self) -> None:
        namespace, name, _ = self._route()
        key = (namespace, name)
        if key not in self.state.objects:
            return self._status(404, "NotFound", f'inferenceservices.serving.kserve.io "{name}" not found')
        obj = self.state.objects[key]
        reads = self.state.reads_since_change[key] = self.state.reads_since_change.get(key, 0) + 1
        if self.state.ready_after is not None and reads >= self.state.ready_after:
            generation = obj["metadata"]["generation"]
            obj["status"] = {
                "observedGeneration": generation,
                "conditions": [{"type": "Ready", "status": "True"}],
                "url": f"http://{name}.{namespace}.example.com",
            }
        return self._send(200, obj)

    def do_POST(self) -> None:
        namespace, _, body = self._route()
        key = (namespace, body["metadata"]["name"])
        if key in self.state.objects:
            return self._status(
                409, "AlreadyExists", f'inferenceservices.serving.kserve.io "{key[1]}" already exists'
            )
        obj = json.loads(json.dumps(body))
        obj["metadata"].update(generation=1, resourceVersion="1", uid=f"uid-{key[1]}")
        obj["status"] = {
            "observedGeneration": 0,
            "conditions": [{"type": "Ready", "status": "False", "reason": "PredictorNotReady"}],
        }
        self.state.objects[key] = obj
        self.state.reads_since_change[key] = 0
        return self._send(201, obj)

    def do_PATCH(self) -> None:
        namespace, name, patch = self._route()
        key = (namespace, name)
        if self.headers.get("Content-Type") != "application/merge-patch+json":
            return self._status(415, "UnsupportedMediaType", self.headers.get("Content-Type", ""))
        if key not in self.state.objects:
            return self._status(404, "NotFound", f'inferenceservices.serving.kserve.io "{name}" not found')
        old = self.state.objects[key]
        new = json.loads(json.dumps(merge_patch(old, patch)))
        if new["spec"] != old["spec"]:
            new["metadata"]["generation"] = old["metadata"]["generation"] + 1
            self.state.reads_since_change[key] = 0
        new["metadata"]["resourceVersion"] = str(int(old["metadata"]["resourceVersion"]) + 1)
        self.state.objects[key] = new
        return self._send(200, new)


@contextlib.contextmanager
def kube_fake_server() -> Iterator[tuple[str, KubeState]]:
    """Serve the fake on 127.0.0.1 (free port); yield ``(http://host:port, state)``."""
    state = KubeState()
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


def kubeconfig(path: Path, server: str, namespace: str = "default") -> Path:
    """Write a kubeconfig pointing at a local API double (with a token, as a real one would have)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "fake", "user": {"token": "kube-token"}}],
        "contexts": [
            {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}
        ],
        "current-context": "fake",
    }
    path.write_text(json.dumps(config))
    return path
