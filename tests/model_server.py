"""Start the real model server (``python -m labelmatch.serving.server``) on 127.0.0.1 for tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ADMIN_TOKEN = "test-admin-token"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(process: subprocess.Popen, ready_url: str, log_path: Path, what: str,
                     timeout_s: float = 180) -> None:
    """Poll ``ready_url`` until it answers 200.

    Raises:
        RuntimeError: The process exited first (with its log's tail).
        TimeoutError: Not ready within ``timeout_s`` (the caller stops the process).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text()[-3000:] if log_path.is_file() else ""
            raise RuntimeError(f"{what} exited with {process.returncode}: {tail}")
        try:
            if requests.get(ready_url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what} not ready in {timeout_s} s")


class ModelServer:
    """One model server subprocess: ``start()`` waits until the model is ready.

    Args:
        model_dir: The OnnxModel artifact.
        log_path: Where its output goes.
        extra: Further server flags.
        port: Its HTTP port (a free one by default; reuse one to restart "the same" replica).
    """

    def __init__(self, model_dir: Path, log_path: Path, *extra: str, port: int | None = None):
        self.model_dir, self.log_path, self.extra = model_dir, log_path, list(extra)
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        """The server's command line."""
        return [sys.executable, "-m", "labelmatch.serving.server", "--model_dir", str(self.model_dir),
                "--http_port", str(self.port), "--host", "127.0.0.1", "--intra_op_threads", "1", *self.extra]

    def launch(self) -> ModelServer:
        """Start the process without waiting."""
        env = {**os.environ, "LABELMATCH_ADMIN_TOKEN": ADMIN_TOKEN, "HF_HUB_OFFLINE": "1"}
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout_s: float = 180) -> ModelServer:
        """Wait until ``/v2/models/labelmatch/ready`` answers 200 (fails with the log's tail)."""
        assert self.process is not None
        try:
            wait_until_ready(self.process, f"{self.base}/v2/models/labelmatch/ready", self.log_path,
                             "server", timeout_s)
        except TimeoutError:
            self.kill()
            raise RuntimeError(f"server not ready in {timeout_s} s: {self.log_tail()}") from None
        return self

    def start(self) -> ModelServer:
        """Launch and wait until ready."""
        return self.launch().wait_ready()

    def log_tail(self) -> str:
        """The end of the server's output."""
        return self.log_path.read_text()[-3000:] if self.log_path.is_file() else ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL (a crashed replica)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
