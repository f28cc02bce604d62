"""A real S3 API server for tests: moto's server mode on 127.0.0.1 and a free port."""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import Iterator

#: Known fake credentials; tests/test_secrets.py greps every output for them.
FAKE_ACCESS_KEY = "LMFAKEACCESSKEY7Q2Z"
FAKE_SECRET_KEY = "lm-fake-secret-Zq8vN3xK1pT6wR4y"


@contextlib.contextmanager
def moto_s3_server() -> Iterator[str]:
    """Run a moto S3 server on 127.0.0.1 (port chosen by the OS) and yield ``http://host:port``."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    # Moto keeps its state per process, not per server: start every server empty.
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST")).close()
    try:
        yield url
    finally:
        server.stop()


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment variables pointing labelmatch at ``endpoint`` with the fake credentials."""
    return {
        "LABELMATCH_S3_ENDPOINT": endpoint,
        "LABELMATCH_S3_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
    }
