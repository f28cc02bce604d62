"""Predictor pods as real processes for the Kubernetes double (``k8s_fake.KubeState.pod_runner``).

What a KServe predictor pod does, on 127.0.0.1: the storage initializer downloads ``STORAGE_URI``
(here: :meth:`ArtifactStore.download_artifact`, verified), then the ``kserve-container`` runs its
own ``command`` + ``args`` with its ``env``. Only what a pod gets from the cluster changes: the
model directory is the download (``--model``), the server binds 127.0.0.1 on a free port, and
every pod shares one SQLite state (the chart's PostgreSQL in a cluster; ``--state-dir``).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests
from model_server import ADMIN_TOKEN, free_port

from labelmatch.platform.artifact_store import ArtifactStore


@dataclass
class PodProcess:
    """A running predictor pod."""

    url: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        """SIGTERM (the pod's deletion), SIGKILL after 20 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class LocalPods:
    """Start predictor pods from their container spec.

    Args:
        store: Where ``STORAGE_URI`` points.
        root: Working directory of the pods (downloads, logs, the shared state).
    """

    def __init__(self, store: ArtifactStore, root: Path):
        self.store, self.root = store, root
        self.counter = itertools.count(1)
        self.started: list[PodProcess] = []

    @staticmethod
    def _replace(args: list[str], flag: str, value: str) -> list[str]:
        out, skip = [], False
        for arg in args:
            if skip:
                skip = False
                continue
            if arg == flag:
                skip = True
                continue
            out.append(arg)
        return [*out, flag, value]

    def __call__(self, container: dict, namespace: str) -> PodProcess:
        number = next(self.counter)
        pod = self.root / f"pod-{number}"
        env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        self.store.download_artifact(env["STORAGE_URI"], pod / "models", kind="OnnxModel")
        port = free_port()
        args = list(container.get("args", []))
        for flag, value in (
            ("--model", str(pod / "models")),
            ("--host", "127.0.0.1"),
            ("--port", str(port)),
            ("--state-dir", str(self.root / "state")),
        ):
            args = self._replace(args, flag, value)
        assert container["command"] == ["labelmatch"], container["command"]
        command = [sys.executable, "-m", "labelmatch", *args, "--intra_op_threads", "1"]
        log = pod / "server.log"
        with open(log, "w") as handle:
            process = subprocess.Popen(
                command,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env, "LABELMATCH_ADMIN_TOKEN": ADMIN_TOKEN, "HF_HUB_OFFLINE": "1"},
            )
        name = args[args.index("--model-name") + 1]
        running = PodProcess(f"http://127.0.0.1:{port}", process, log)
        self.started.append(running)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"pod {number} exited with {process.returncode}: {log.read_text()[-3000:]}"
                )
            try:
                if requests.get(f"{running.url}/v2/models/{name}/ready", timeout=2).status_code == 200:
                    return running
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        running.stop()
        raise RuntimeError(f"pod {number} not ready in 180 s: {log.read_text()[-3000:]}")
