"""A traffic splitter on 127.0.0.1 playing the gateway's role in front of real model servers.

In a cluster, Knative's route (Serverless) or the Gateway API HTTPRoute (RawDeployment) sends each
request to one backend, weighted by the InferenceService's traffic split. Here the weights come
from a callback (for the Kubernetes double: ``KubeState.route``, the Knative route and its pods in
one snapshot, read on every request, so a promotion or a rollback takes effect in the tick that
moves the route, the tick KServe reports it in), and the draw is seeded, so a run routes the same
way given the same weights.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

#: ``() -> [(backend base URL, percent), ...]``
Weights = Callable[[], list[tuple[str, int]]]


class Splitter:
    """Weighted routing of prediction requests; everything else goes to the heaviest backend.

    Args:
        weights: The current backends and their shares.
        seed: Seed of the weighted draw.
    """

    def __init__(self, weights: Weights, seed: int = 0):
        self.weights = weights
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.routed: Counter[str] = Counter()

    def choose(self, predict: bool) -> str | None:
        """A backend for one request (``None`` when there is none)."""
        backends = [(url, percent) for url, percent in self.weights() if url and percent > 0]
        if not backends:
            return None
        if not predict:
            return max(backends, key=lambda item: item[1])[0]
        with self.lock:
            pick = self.random.uniform(0, sum(percent for _, percent in backends))
            chosen = backends[-1][0]
            for url, percent in backends:
                pick -= percent
                if pick <= 0:
                    chosen = url
                    break
            self.routed[chosen] += 1
        return chosen


@contextlib.contextmanager
def running(splitter: Splitter) -> Iterator[str]:
    """Serve ``splitter`` on a free port; yield its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            """Silence the per-request log."""

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() in ("content-type", "authorization")}
            answer = None
            for _ in range(2):  # a backend that went away between the draw and the call: draw again
                target = splitter.choose(self.path.endswith((":predict", "/infer")))
                if target is None:
                    break
                try:
                    answer = requests.request(self.command, f"{target}{self.path}", data=body,
                                              headers=headers, timeout=60)
                    break
                except requests.ConnectionError:
                    continue
            if answer is None:
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(answer.status_code)
            for name in ("Content-Type", "server-timing", "x-model-version"):
                if name in answer.headers:
                    self.send_header(name, answer.headers[name])
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        do_GET = do_POST = do_PUT = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
