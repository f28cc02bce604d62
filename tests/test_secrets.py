"""No credential ever appears in a log line, command output, manifest, artifact or request body.

Every cluster-path command runs with known fake credentials against real local servers (S3 API,
KFP stub, Kubernetes fake); then every output is searched for the secret values.
"""

from __future__ import annotations

import json
import logging

import pytest
from k8s_fake import kube_fake_server, kubeconfig
from kfp_stub import kfp_stub_server, shipped_ir
from s3_server import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, moto_s3_server, s3_env
from typer.testing import CliRunner

from labelmatch.cli import app, register_commands
from labelmatch.core.artifacts import write_manifest
from labelmatch.core.errors import ArtifactError
from labelmatch.platform.artifact_store import ArtifactStore, S3Config, S3Uri

FAKE_SESSION_TOKEN = "lm-fake-session-token-Hq2LwX9bE"
#: The bearer token of a multi-user KFP (LABELMATCH_KFP_TOKEN).
FAKE_KFP_TOKEN = "lm-fake-kfp-token-Rt5yUi8oP"
SECRETS = (FAKE_SECRET_KEY, FAKE_SESSION_TOKEN, FAKE_ACCESS_KEY, FAKE_KFP_TOKEN)


def test_no_secret_in_logs_outputs_artifacts_or_requests(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    register_commands()
    runner = CliRunner()
    outputs: list[str] = []

    def run(*args: str) -> None:
        result = runner.invoke(app, list(args), catch_exceptions=False)
        outputs.append(result.output)
        assert result.exit_code == 0, result.output

    with moto_s3_server() as s3, kfp_stub_server() as (kfp_url, kfp), kube_fake_server() as (kube_url, kube):
        env = {
            **s3_env(s3),
            "AWS_SESSION_TOKEN": FAKE_SESSION_TOKEN,
            "HOME": str(tmp_path),
            "LABELMATCH_STORE_ROOT": "s3://labelmatch",
            "KUBECONFIG": str(kubeconfig(tmp_path / "kubeconfig", kube_url)),
            "LABELMATCH_KFP_TOKEN": FAKE_KFP_TOKEN,
            "LABELMATCH_KFP_NAMESPACE": "ml",
        }
        kfp.multi_user, kfp.tokens = True, {FAKE_KFP_TOKEN: {"ml"}}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        config = S3Config.from_env()
        assert (config.access_key, config.secret_key, config.session_token) == (
            FAKE_ACCESS_KEY,
            FAKE_SECRET_KEY,
            FAKE_SESSION_TOKEN,
        )

        model = tmp_path / "model"
        model.mkdir()
        (model / "model.onnx").write_bytes(b"onnx" * 100)
        write_manifest(model, "OnnxModel", lineage={"run_id": "r1"})
        uri = "s3://labelmatch/models/onnx/a"
        run("store", "push", str(model), uri, "--kind", "OnnxModel")
        run("store", "ls", "s3://labelmatch")
        run("store", "pull", uri, str(tmp_path / "pulled"), "--kind", "OnnxModel")
        package = shipped_ir(tmp_path, "labelmatch-deploy", "0.1.0")
        run("pipeline", "upload", "--host", kfp_url, "--package", package, "--version", "0.1.0")
        run("pipeline", "versions", "--host", kfp_url, "--pipeline", "labelmatch-deploy")
        run(
            "pipeline",
            "run",
            "--host",
            kfp_url,
            "--version",
            "0.1.0",
            "--pipeline",
            "labelmatch-deploy",
            "--param",
            f"model_uri={uri}",
        )
        run(
            "deploy",
            "--model-uri",
            uri,
            "--service",
            "tax",
            "--namespace",
            "ml",
            "--pipeline-version",
            "0.1.0",
            "--timeout",
            "10",
            "--no-verify-served",  # a tiny stand-in model: nothing could serve it
        )
        run("releases", "--service", "tax")
        run("rollback", "--service", "tax", "--to", "0.1.0", "--host", kfp_url)
        assert "release" in outputs[-3] and "run run-" in outputs[-1]

        # An error message (a corrupted object) carries no secret either.
        store = ArtifactStore(config)
        store.put_bytes(S3Uri.parse(uri).child("model.onnx"), b"tampered")
        with pytest.raises(ArtifactError) as failure:
            store.download_artifact(uri, tmp_path / "refused")
        outputs.append(str(failure.value))
        # A store nobody answers: one retry (the default eight ride out about 45 s; not under test here)
        unreachable = {**env, "LABELMATCH_S3_ENDPOINT": "http://127.0.0.1:1", "LABELMATCH_S3_RETRIES": "1"}
        bad = ArtifactStore(S3Config.from_env(unreachable))
        with pytest.raises(ArtifactError) as failure:
            bad.remote_manifest(uri)
        outputs.append(str(failure.value))
        outputs.append(repr(store) + repr(config))

        stored = [
            store.get_bytes(S3Uri("labelmatch", key)) or b"" for key in store.list_keys("s3://labelmatch")
        ]
        assert any(b'"model_digest"' in blob for blob in stored)  # the release records are among them
        requests = [json.dumps([r.query, r.body], default=repr) for r in kfp.requests]
        requests += [json.dumps(body) for *_, body in kube.requests] + [
            json.dumps(o) for o in kube.objects.values()
        ]

    files = [
        path.read_bytes() for path in tmp_path.rglob("*") if path.is_file() and path.name != "kubeconfig"
    ]
    logs = [record.getMessage() for record in caplog.records]
    assert logs and files and stored and requests
    for secret in SECRETS:
        for line in outputs + logs + requests:
            assert secret not in line
        for blob in files + stored:
            assert secret.encode() not in blob
