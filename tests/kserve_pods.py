"""Predictor pods as real processes for the Kubernetes double (``k8s_fake.KubeState.pod_runner``).

What a KServe predictor pod does, on 127.0.0.1: the storage initializer downloads ``STORAGE_URI``
(here: :meth:`ArtifactStore.download_artifact`, verified), then the ``kserve-container`` runs its
own ``command`` + ``args`` with its ``env``. Only what a pod gets from the cluster changes: the
model directory is the download (``--model``), the server binds 127.0.0.1 on a free port, and
every pod shares one SQLite state (the chart's PostgreSQL in a cluster; ``--state-dir``).

Secret volumes are mounted as the kubelet would (:func:`mount_secrets`): the keys a volume
projects become files under a local directory that stands in for its ``mountPath``, and a Secret
or key that does not exist keeps the pod from starting. The namespace's Secrets default to
:data:`SECRETS`: the auth Secret the deploy step's InferenceService mounts, with
:data:`FEEDBACK_TOKEN`.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from model_server import ADMIN_TOKEN, free_port, wait_until_ready

from labelmatch.platform.artifact_store import ArtifactStore

#: A token of the default auth Secret with the ``feedback`` permission.
FEEDBACK_TOKEN = "test-feedback-token-0123456789"
#: The namespace's Secrets (name -> key -> content): the deploy step's default auth Secret.
SECRETS = {"labelmatch-serving-auth": {"tokens.yaml": (
    "tokens:\n"
    f"  - {{name: support-ui, token: {FEEDBACK_TOKEN}, permissions: [feedback]}}\n"
)}}


def mount_secrets(container: dict, volumes: list[dict], secrets: dict[str, dict[str, str]],
                  root: Path) -> list[str]:
    """Write the Secret volumes ``container`` mounts under ``root`` as the kubelet would (each
    projected key a file) and return its args with every mount path replaced by its local copy.

    Raises:
        RuntimeError: A mounted Secret or a projected key does not exist (the pod would not start).
    """
    by_name = {volume["name"]: volume for volume in volumes}
    args = list(container.get("args", []))
    for mount in container.get("volumeMounts", []):
        source = by_name.get(mount["name"], {}).get("secret")
        if source is None:
            continue
        name = source["secretName"]
        if name not in secrets:
            raise RuntimeError(f"secret {name!r} not found: the pod cannot mount volume {mount['name']!r}")
        items = source.get("items") or [{"key": key, "path": key} for key in secrets[name]]
        local = root / mount["name"]
        for item in items:
            if item["key"] not in secrets[name]:
                raise RuntimeError(f"secret {name!r} has no key {item['key']!r}")
            (local / item["path"]).parent.mkdir(parents=True, exist_ok=True)
            (local / item["path"]).write_text(secrets[name][item["key"]])
        prefix = mount["mountPath"].rstrip("/")
        args = [str(local) + arg[len(prefix):] if arg == prefix or arg.startswith(prefix + "/") else arg
                for arg in args]
    return args


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
        secrets: The namespace's Secrets (default :data:`SECRETS`).
    """

    def __init__(self, store: ArtifactStore, root: Path, secrets: dict[str, dict[str, str]] | None = None):
        self.store, self.root = store, root
        self.secrets = SECRETS if secrets is None else secrets
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

    def __call__(self, container: dict, namespace: str, volumes: list[dict] = ()) -> PodProcess:
        number = next(self.counter)
        pod = self.root / f"pod-{number}"
        args = mount_secrets(container, list(volumes), self.secrets, pod / "volumes")
        env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        self.store.download_artifact(env["STORAGE_URI"], pod / "models", kind="OnnxModel")
        port = free_port()
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
        try:
            wait_until_ready(process, f"{running.url}/v2/models/{name}/ready", log, f"pod {number}")
        except TimeoutError:
            running.stop()
            raise RuntimeError(f"pod {number} not ready in 180 s: {log.read_text()[-3000:]}") from None
        return running


def server_config(args: list[str]):
    """The :class:`labelmatch.serving.server.ServeConfig` a container's ``labelmatch`` args give:
    through the real CLI (``labelmatch serve``) and the server's own parser, without serving."""
    import pytest
    from typer.testing import CliRunner

    import labelmatch.serving.server as server
    from labelmatch.cli import app, register_commands

    register_commands()
    captured: list[list[str]] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server, "serve", captured.append)
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    [argv] = captured
    return server.config_from_args(server.build_parser().parse_args(argv))
