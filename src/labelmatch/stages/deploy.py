"""The pipeline's ``deploy`` stage: serve an accepted OnnxModel, locally or on KServe.

Two targets, one entry point (:func:`run_deploy_step`):

* ``local`` (the demo, CI): start the labelmatch model server (:mod:`labelmatch.serving.server`, the
  same server the KServe predictor runs) on 127.0.0.1 on a free port, wait until it is ready,
  classify a few documents through ``POST /v1/models/NAME:predict``, and stop it. The server's
  log and the predictions are kept in the output; with a release root, a release record
  (``target: local``) is appended too, so local deploys roll back like cluster ones.
* ``kserve`` (a cluster): point an InferenceService at the model artifact in the S3/MinIO store
  and append a release record (:func:`labelmatch.platform.kserve.deploy_model`). ``model_uri`` is where
  the artifact lives in the store (``s3://``; a KFP ``minio://`` URI is the same object).

How the new model reaches its traffic is ``strategy`` (``kserve`` only for the last two):

* ``replace`` (the default, as before): it takes all the traffic once rolled out;
* ``canary``: it takes a share, is watched on its own live signals and promoted or rolled back
  (:func:`labelmatch.delivery.kserve.deploy_canary`; ``canary.json`` in the output);
* ``shadow``: it gets a copy of the live traffic for a window and never answers a user; the
  comparison report is written (:func:`labelmatch.delivery.kserve.deploy_shadow`;
  ``shadow_report.{json,md}`` in the output).

Either way the output is a Report artifact with ``release.json`` (what was deployed, where,
its digest, pipeline version and run) and, locally, ``predictions.json`` and ``server.log``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from labelmatch import __version__
from labelmatch.core.artifacts import (
    artifact_digest,
    atomic_artifact_dir,
    verify_artifact,
    write_json,
    write_manifest,
)
from labelmatch.core.errors import ArtifactError, ConfigError, LabelmatchError
from labelmatch.platform.artifact_store import as_s3_uri, is_s3_uri

#: The variable naming the labelmatch store root (``s3://bucket[/prefix]``), default release root.
STORE_ROOT_VAR = "LABELMATCH_STORE_ROOT"
#: The variable naming the serving state's SQLAlchemy URL (the serving chart's Secret holds it).
STATE_URL_VAR = "LABELMATCH_STATE_URL"
#: How a deploy reaches its traffic.
STRATEGIES = ("replace", "canary", "shadow")

#: Documents the local deploy classifies (new texts, not from the sample set).
SMOKE_TEXTS = [
    "Our Q2 2024 VAT return was filed late and the tax office charged a penalty. What can we do?",
    "The group applied the arm's length principle to price its intercompany services and loans.",
    "The dividend paid to our Dutch parent had 15% withholding tax deducted despite the treaty exemption.",
]
MODEL_NAME = "labelmatch"


@dataclass
class DeployStepConfig:
    """Settings of the deploy stage.

    Attributes:
        target: ``local`` (model server on 127.0.0.1, smoke-tested, stopped) or ``kserve``.
        service: InferenceService name (``kserve``).
        namespace: Its namespace (``kserve``).
        release_root: ``s3://bucket/prefix`` of the release records; empty:
            ``$LABELMATCH_STORE_ROOT`` (the pipeline ConfigMap sets it in a cluster). Required for
            ``kserve``; optional for ``local``.
        expected_digest: Refuse the model unless its artifact digest is this (rollbacks).
        pipeline_version: Recorded in the release.
        run_id: The pipeline run, recorded in the release.
        texts: Documents the local deploy classifies.
        timeout_s: Longest wait for the server (or the InferenceService) to become ready.
        restore_release: A release id whose whole served state comes back with the model (a
            rollback: image, engine, label-set version, predictor settings); ``kserve`` only.
        strategy: ``replace`` (all the traffic at once), ``canary`` or ``shadow`` (``kserve`` only;
            see the module docstring).
        canary_rules: The canary's rules (:class:`labelmatch.delivery.rules.CanaryRules`): a file,
            an ``s3://`` URI of one, or a JSON object inline; empty: the defaults.
        shadow_window_s: How long a shadow gets a copy of the live traffic.
        state_url: The serving state's SQLAlchemy URL (canary drift and feedback rules, the
            decision's metric; the shadow's target and log); empty: ``$LABELMATCH_STATE_URL``.
    """

    target: str = "local"
    service: str = "labelmatch"
    namespace: str = "default"
    release_root: str = ""
    expected_digest: str = ""
    pipeline_version: str = __version__
    run_id: str = ""
    texts: list[str] = field(default_factory=lambda: list(SMOKE_TEXTS))
    timeout_s: float = 300.0
    restore_release: str = ""
    strategy: str = "replace"
    canary_rules: str = ""
    shadow_window_s: float = 600.0
    state_url: str = ""

    def __post_init__(self) -> None:
        if self.target not in ("local", "kserve"):
            raise ConfigError(f"DeployStepConfig.target must be 'local' or 'kserve', got {self.target!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.strategy != "replace" and self.target != "kserve":
            raise ConfigError(f"strategy {self.strategy} needs the kserve target: a local deploy serves "
                              "nothing afterwards to compare with")
        if self.strategy != "replace" and self.restore_release:
            raise ConfigError("a rollback (restore_release) takes all the traffic back at once: use strategy "
                              "replace")
        if not self.shadow_window_s > 0:
            raise ConfigError(f"shadow_window_s must be > 0, got {self.shadow_window_s}")
        self.state_url = self.state_url or os.environ.get(STATE_URL_VAR, "")
        self.release_root = self.release_root or os.environ.get(STORE_ROOT_VAR, "")
        if self.release_root and not self.release_root.startswith("s3://"):
            raise ConfigError(f"release_root {self.release_root!r}: expected s3://bucket/prefix")
        if self.target == "kserve" and not self.release_root:
            raise ConfigError(
                f"the kserve target needs release_root (s3://bucket/prefix of the release records) "
                f"or {STORE_ROOT_VAR}"
            )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def serve_and_classify(
    model_dir: str | Path, texts: list[str], log_path: Path, timeout_s: float
) -> dict[str, Any]:
    """Start the model server on 127.0.0.1, classify ``texts`` over HTTP, stop it.

    Returns:
        ``{"url", "predictions", "ready_seconds"}``.

    Raises:
        LabelmatchError: the server exits or is not ready in time (with the end of its log).
    """
    import requests

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "labelmatch.serving.server",
        "--model_dir",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--http_port",
        str(port),
        "--model_name",
        MODEL_NAME,
    ]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            if server.poll() is not None:
                raise LabelmatchError(
                    f"model server exited with status {server.returncode}:\n{_log_tail(log_path)}"
                )
            try:
                if requests.get(f"{url}/v2/models/{MODEL_NAME}/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.perf_counter() - started > timeout_s:
                raise LabelmatchError(
                    f"model server not ready after {timeout_s:.0f} s:\n{_log_tail(log_path)}"
                )
            time.sleep(0.5)
        ready = time.perf_counter() - started
        response = requests.post(
            f"{url}/v1/models/{MODEL_NAME}:predict",
            json={"instances": [{"text": t} for t in texts]},
            timeout=60,
        )
        if response.status_code != 200:
            raise LabelmatchError(
                f"POST {url}/v1/models/{MODEL_NAME}:predict: HTTP {response.status_code} "
                f"{response.text[:300]}"
            )
        predictions = response.json()["predictions"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return {"url": url, "predictions": predictions, "ready_seconds": round(ready, 2)}


def run_deploy_step(
    model_dir: str | Path, out_dir: str | Path, config: DeployStepConfig, model_uri: str = ""
) -> dict[str, Any]:
    """Deploy the OnnxModel at ``model_dir`` and write the release Report to ``out_dir``.

    Args:
        model_dir: The OnnxModel artifact: KFP's local copy of the input. Where there is none
            (``kfp.local`` imports an ``s3://`` URI without downloading it) the artifact is
            downloaded from ``model_uri`` and verified first.
        out_dir: The Report artifact to write: ``release.json`` (+ ``predictions.json`` and
            ``server.log`` for the local target).
        config: Target and release settings.
        model_uri: Where the artifact lives (an ``s3://`` or KFP ``minio://`` URI, or a path).

    Returns:
        The release record (the content of ``release.json``).

    Raises:
        ArtifactError: the model is missing, of the wrong kind, corrupted or not the expected digest.
    """
    if not Path(model_dir).is_dir() and is_s3_uri(model_uri):
        from labelmatch.platform.artifact_store import ArtifactStore

        with tempfile.TemporaryDirectory(prefix="labelmatch-deploy-") as staging:
            local = Path(staging) / "onnx_model"
            ArtifactStore.from_env().download_artifact(as_s3_uri(model_uri), local, kind="OnnxModel")
            return run_deploy_step(local, out_dir, config, model_uri)
    verify_artifact(model_dir, "OnnxModel")
    digest = artifact_digest(model_dir)
    if config.expected_digest and digest != config.expected_digest:
        raise ArtifactError(
            f"artifact {model_dir}: digest {digest[:12]}… is not the expected "
            f"{config.expected_digest[:12]}…; refusing to deploy"
        )
    release: dict[str, Any] = {
        "target": config.target,
        "model_dir": str(model_dir),
        "model_digest": digest,
        "pipeline_version": config.pipeline_version,
        "run_id": config.run_id,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with atomic_artifact_dir(out_dir) as tmp:
        if config.target == "local":
            served = serve_and_classify(model_dir, config.texts, tmp / "server.log", config.timeout_s)
            rows = [{"text": t, **p} for t, p in zip(config.texts, served["predictions"], strict=True)]
            write_json(tmp / "predictions.json", rows)
            release.update(url=served["url"], ready_seconds=served["ready_seconds"], stopped=True)
            if config.release_root:
                record = _record_local_release(config, as_s3_uri(model_uri or str(model_dir)), digest)
                release.update(asdict(record))
        else:
            from labelmatch.platform.artifact_store import ArtifactStore
            from labelmatch.platform.kserve import DeployConfig, deploy_model
            from labelmatch.platform.releases import ReleaseLog

            if not model_uri:
                raise ConfigError("the kserve target needs the model's store URI (model_uri)")
            store = ArtifactStore.from_env()
            deploy_config = DeployConfig(config.service, config.namespace, timeout_s=config.timeout_s)
            if config.strategy == "canary":
                record = _deploy_canary(config, deploy_config, as_s3_uri(model_uri), store, digest, model_dir,
                                        tmp)
            elif config.strategy == "shadow":
                record = _deploy_shadow(config, deploy_config, as_s3_uri(model_uri), store, digest, tmp)
            else:
                restore = (ReleaseLog(store, config.release_root).find(config.service, config.restore_release)
                           if config.restore_release else None)
                record = deploy_model(
                    deploy_config,
                    as_s3_uri(model_uri),
                    store,
                    config.release_root,
                    config.pipeline_version,
                    config.run_id,
                    digest,
                    restore=restore,
                )
                if config.state_url:  # a canary its step never decided is gone now: say so
                    from labelmatch.delivery.abandoned import settle_abandoned_canary

                    settle_abandoned_canary(None, deploy_config, config.state_url, replace=True)
            release.update(asdict(record))
        write_json(tmp / "release.json", release)
        write_manifest(
            tmp,
            "Report",
            lineage={"model": digest, "run_id": config.run_id},
            extra={"stage": "deploy", "target": config.target, "strategy": config.strategy},
        )
    return release


def _deploy_canary(config: DeployStepConfig, deploy_config: Any, model_uri: str, store: Any, digest: str,
                   model_dir: str | Path, out: Path) -> Any:
    """The canary deploy; its decision and evidence also go to ``canary.json``."""
    from labelmatch.delivery.kserve import deploy_canary
    from labelmatch.delivery.rules import load_rules

    rules = load_rules(config.canary_rules, store)
    record, decision = deploy_canary(deploy_config, model_uri, store, config.release_root, rules,
                                     config.pipeline_version, config.run_id, digest,
                                     state_url=config.state_url or None, model_dir=model_dir)
    write_json(out / "canary.json", decision.to_json())
    return record


def _deploy_shadow(config: DeployStepConfig, deploy_config: Any, model_uri: str, store: Any, digest: str,
                   out: Path) -> Any:
    """The shadow deploy; its comparison report goes to ``shadow_report.{json,md}``."""
    from labelmatch.delivery.kserve import deploy_shadow
    from labelmatch.delivery.shadow import write_shadow_report

    record, report = deploy_shadow(deploy_config, model_uri, store, config.release_root,
                                   config.shadow_window_s, config.state_url, config.pipeline_version,
                                   config.run_id, digest)
    write_shadow_report(report, out)
    return record


def _record_local_release(config: DeployStepConfig, model_uri: str, digest: str) -> Any:
    """Append the release record of a local deploy (nothing keeps serving it: the record is what
    a rollback of the local target re-deploys from)."""
    from labelmatch.platform.artifact_store import ArtifactStore
    from labelmatch.platform.releases import ReleaseLog, ReleaseRecord

    record = ReleaseRecord.new(
        service=config.service, namespace=config.namespace, model_uri=model_uri, model_digest=digest,
        pipeline_version=config.pipeline_version, run_id=config.run_id, target="local",
    )
    ReleaseLog(ArtifactStore.from_env(), config.release_root).append(record)
    return record
