"""Versioned pipeline upload and runs through kfp.Client against a KFP v2beta1 stub on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli as _cli
from kfp_stub import API, shipped_ir

from labelmatch.core.errors import ConfigError
from labelmatch.platform.kfp import PipelineRegistry, compiled_packages, convert_parameter, read_package
from labelmatch.platform.kserve import DEPLOY_PARAMETERS


def test_first_upload_names_the_version_and_later_uploads_add_versions(kfp, tmp_path):
    url, state = kfp
    first = shipped_ir(tmp_path, "labelmatch-deploy", "0.1.0")
    registry = PipelineRegistry(url)

    uploaded = registry.upload(first, "0.1.0")
    assert (uploaded.pipeline, uploaded.version) == ("labelmatch-deploy", "0.1.0")
    assert state.calls() == [
        ("GET", f"{API}/pipelines"),  # is there a pipeline of this name?
        ("POST", f"{API}/pipelines/upload"),  # creates it, with a version named after it
        ("GET", f"{API}/pipelines/{uploaded.pipeline_id}/versions"),
        ("POST", f"{API}/pipelines/upload_version"),  # the version named by the package version
        ("DELETE", f"{API}/pipelines/{uploaded.pipeline_id}/versions/version-0002"),  # the auto-named one
        ("GET", f"{API}/pipelines/{uploaded.pipeline_id}/versions"),
    ]
    upload, upload_version = state.requests[2], state.requests[4]
    description = read_package(first)[1]
    assert upload.query == {"name": "labelmatch-deploy", "description": description}
    assert upload.body["uploadfile"] == Path(first).read_bytes()
    assert upload_version.query == {
        "name": "0.1.0", "pipelineid": uploaded.pipeline_id, "description": description
    }
    assert upload_version.body["uploadfile"] == Path(first).read_bytes()
    assert [v.version for v in registry.versions("labelmatch-deploy")] == ["0.1.0"]

    state.requests.clear()
    later = shipped_ir(tmp_path, "labelmatch-deploy", "0.2.0")
    assert registry.upload(later, "0.2.0").version == "0.2.0"
    assert [c for c in state.calls() if c[0] != "GET"] == [("POST", f"{API}/pipelines/upload_version")]
    assert [r.query for r in state.requests if r.method == "POST"] == [
        {"name": "0.2.0", "pipelineid": uploaded.pipeline_id, "description": description}
    ]
    versions = registry.versions("labelmatch-deploy")
    assert [v.version for v in versions] == ["0.1.0", "0.2.0"]
    # The server wraps an IR with a platform document; the declared inputs are read through it.
    assert "platform_spec" in state.versions[uploaded.pipeline_id][0]["pipeline_spec"]
    assert versions[0].parameters["model_uri"] == "STRING" and versions[0].required == ("model_uri",)
    assert set(DEPLOY_PARAMETERS) <= set(versions[0].parameters)

    state.requests.clear()
    assert registry.upload(later, "0.2.0").version_id == versions[1].version_id  # again: a no-op
    assert all(method == "GET" for method, _ in state.calls())


def test_run_references_the_version_and_types_parameters(kfp, tmp_path):
    url, state = kfp
    registry = PipelineRegistry(url)
    registry.upload(shipped_ir(tmp_path, "labelmatch-deploy", "0.1.0"), "0.1.0")
    target = registry.upload(shipped_ir(tmp_path, "labelmatch-deploy", "0.2.0"), "0.2.0")
    state.requests.clear()

    run = registry.create_run(
        "labelmatch-deploy", "0.2.0", {"model_uri": "s3://b/m", "deploy_cpu": "2"}, run_name="deploy tax"
    )
    [create] = [r for r in state.requests if (r.method, r.path) == ("POST", f"{API}/runs")]
    assert create.body == {
        "experiment_id": next(iter(state.experiments)),
        "display_name": "deploy tax",
        "pipeline_version_reference": {
            "pipeline_id": target.pipeline_id,
            "pipeline_version_id": target.version_id,
        },
        "runtime_config": {"parameters": {"model_uri": "s3://b/m", "deploy_cpu": "2"}},
    }
    assert run.run_id == state.runs[run.run_id]["run_id"]
    assert [e["display_name"] for e in state.experiments.values()] == ["labelmatch"]
    registry.create_run("labelmatch-deploy", "0.1.0", {"model_uri": "s3://b/m"})
    assert len(state.experiments) == 1  # the experiment is reused

    with pytest.raises(ConfigError, match=r"parameter 'min_replicas': 'two' is not a valid NUMBER_INTEGER"):
        convert_parameter("min_replicas", "two", "NUMBER_INTEGER")
    with pytest.raises(ConfigError, match=r"parameter 'epochs': not an input of labelmatch-deploy 0.2.0"):
        registry.create_run("labelmatch-deploy", "0.2.0", {"epochs": "3"})
    with pytest.raises(ConfigError, match=r"has no version '0.9.0' on the server \(versions: 0.1.0, 0.2.0\)"):
        registry.create_run("labelmatch-deploy", "0.9.0")


def test_compiled_packages_and_bad_package(tmp_path):
    shipped_ir(tmp_path, "labelmatch-training", "0.1.0")
    shipped_ir(tmp_path, "labelmatch-deploy", "0.1.0")
    shipped_ir(tmp_path, "labelmatch-deploy", "0.0.9")
    assert [p.name for p in compiled_packages(tmp_path, "0.1.0")] == [
        "labelmatch-deploy-0.1.0.yaml",
        "labelmatch-training-0.1.0.yaml",
    ]
    assert read_package(tmp_path / "labelmatch-training-0.1.0.yaml")[0] == "labelmatch-training"
    with pytest.raises(ConfigError, match=r"no compiled pipelines"):
        compiled_packages(tmp_path, "7.7.7")
    (tmp_path / "bad.yaml").write_text("a: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: field 'pipelineInfo.name' missing"):
        read_package(tmp_path / "bad.yaml")


def _authorizations(state) -> set[str | None]:
    return {r.header("Authorization") for r in state.requests if not r.path.endswith("/healthz")}


def test_multi_user_runs_go_to_the_profile_namespace_with_the_bearer_token(kfp, tmp_path):
    """Multi-user KFP (the stub follows the KFP 2.17 backend): the pipeline is uploaded into the
    profile namespace, the experiment and so the run are filed there, every request carries the
    token as ``Authorization: Bearer``, and the run reads back with its parameters."""
    url, state = kfp
    state.multi_user, state.tokens = True, {"alice": {"team-a"}}
    registry = PipelineRegistry(url, token="alice", namespace="team-a")
    uploaded = registry.upload(shipped_ir(tmp_path, "labelmatch-deploy", "0.1.0"), "0.1.0")
    assert state.pipelines[uploaded.pipeline_id]["namespace"] == "team-a"
    upload = next(r for r in state.requests if r.path == f"{API}/pipelines/upload")
    assert upload.query["namespace"] == "team-a"

    run = registry.create_run("labelmatch-deploy", "0.1.0", {"model_uri": "s3://b/m", "deploy_cpu": "2"},
                              service_account="labelmatch-pipeline-runner")
    [experiment] = state.experiments.values()
    assert experiment["namespace"] == "team-a"
    assert state.run_namespace(state.runs[run.run_id]) == "team-a"
    assert _authorizations(state) == {"Bearer alice"}

    found = registry.find_run(run.run_id)
    assert (found.pipeline, found.version) == ("labelmatch-deploy", "0.1.0")
    assert found.name == "labelmatch-deploy 0.1.0"
    assert found.parameters == {"model_uri": "s3://b/m", "deploy_cpu": "2"}
    assert found.service_account == "labelmatch-pipeline-runner"
    assert registry.run_parameters(run.run_id) == found.parameters
    with pytest.raises(ConfigError, match=r"run 'run-9999' is not on the KFP server"):
        registry.find_run("run-9999")

    from kfp_server_api.exceptions import ApiException

    with pytest.raises(ApiException) as refused:  # no access to another profile's namespace
        PipelineRegistry(url, token="alice", namespace="team-b").create_run(
            "labelmatch-deploy", "0.1.0", {"model_uri": "s3://b/m"})
    assert refused.value.status == 403
    with pytest.raises(ConfigError, match=r"is multi-user: a run needs the profile namespace"):
        PipelineRegistry(url, token="alice").create_run("labelmatch-deploy", "0.1.0", {"model_uri": "s3://b/m"})


def test_single_user_kfp_ignores_the_namespace(kfp, tmp_path):
    """A single-user server replaces every namespace by "" (ReplaceNamespace): the same commands work."""
    url, state = kfp
    registry = PipelineRegistry(url, namespace="team-a")
    uploaded = registry.upload(shipped_ir(tmp_path, "labelmatch-deploy", "0.1.0"), "0.1.0")
    run = registry.create_run("labelmatch-deploy", "0.1.0", {"model_uri": "s3://b/m"})
    assert state.pipelines[uploaded.pipeline_id]["namespace"] == ""
    assert state.run_namespace(state.runs[run.run_id]) == ""
    assert _authorizations(state) == {None}


def test_cli_namespace_and_token_from_flags_and_environment(kfp, tmp_path, monkeypatch):
    """`labelmatch pipeline upload/run` honour LABELMATCH_KFP_NAMESPACE and LABELMATCH_KFP_TOKEN,
    --namespace and --token win over them, and a refusal names what to pass."""
    url, state = kfp
    state.multi_user, state.tokens = True, {"alice": {"team-a"}, "bob": {"team-b"}}
    ir = shipped_ir(tmp_path, "labelmatch-deploy", "0.1.0")
    monkeypatch.setenv("LABELMATCH_KFP_NAMESPACE", "team-a")
    monkeypatch.setenv("LABELMATCH_KFP_TOKEN", "alice")
    result = _cli("pipeline", "upload", "--host", url, "--package", ir, "--version", "0.1.0")
    assert result.exit_code == 0, result.output
    result = _cli("pipeline", "run", "--host", url, "--pipeline", "labelmatch-deploy", "--version", "0.1.0",
                  "--param", "model_uri=s3://b/m")
    assert result.exit_code == 0, result.output
    [run] = state.runs.values()
    assert state.run_namespace(run) == "team-a" and _authorizations(state) == {"Bearer alice"}

    state.requests.clear()
    result = _cli("pipeline", "upload", "--host", url, "--package", ir, "--version", "0.1.0",
                  "--namespace", "team-b", "--token", "bob")
    assert result.exit_code == 0, result.output
    assert {p["namespace"] for p in state.pipelines.values()} == {"team-a", "team-b"}
    assert _authorizations(state) == {"Bearer bob"}

    monkeypatch.delenv("LABELMATCH_KFP_TOKEN")
    result = _cli("pipeline", "versions", "--host", url)
    assert result.exit_code != 0
    assert "answered 401" in str(result.exception) and "--token" in str(result.exception)
    monkeypatch.delenv("LABELMATCH_KFP_NAMESPACE")
    result = _cli("pipeline", "run", "--host", url, "--pipeline", "labelmatch-deploy", "--version", "0.1.0",
                  "--token", "alice", "--param", "model_uri=s3://b/m")
    assert result.exit_code != 0 and "LABELMATCH_KFP_NAMESPACE" in str(result.exception)


def test_token_file_is_read_before_every_request(kfp, tmp_path):
    """--token-file goes through the KFP SDK's ServiceAccountTokenVolumeCredentials: a rotated
    projected token is picked up without restarting anything."""
    url, state = kfp
    state.multi_user, state.tokens = True, {"first": {"team-a"}, "rotated": {"team-a"}}
    token = tmp_path / "token"
    token.write_text("first\n")
    registry = PipelineRegistry(url, namespace="team-a", token_file=token)
    assert registry.versions("labelmatch-deploy") == []
    token.write_text("rotated\n")
    registry.upload(shipped_ir(tmp_path, "labelmatch-deploy", "0.1.0"), "0.1.0")
    assert state.requests[-1].header("Authorization") == "Bearer rotated"
    assert _authorizations(state) == {"Bearer first", "Bearer rotated"}
    with pytest.raises(ConfigError, match=r"missing: cannot read the KFP token"):
        PipelineRegistry(url, namespace="team-a", token_file=tmp_path / "missing")


def test_shared_pipelines_are_uploaded_once_and_run_from_every_profile(kfp, tmp_path):
    """`upload --shared` creates a pipeline without namespace (its clean-up is authorised against
    KFP's own namespace: an admin's token); a profile's run finds it after its own namespace."""
    url, state = kfp
    state.multi_user, state.tokens = True, {"admin": {"kubeflow"}, "alice": {"team-a"}}
    ir = shipped_ir(tmp_path, "labelmatch-deploy", "0.1.0")
    result = _cli("pipeline", "upload", "--host", url, "--package", ir, "--version", "0.1.0", "--shared",
                  "--token", "admin")
    assert result.exit_code == 0, result.output
    [pipeline] = state.pipelines.values()
    assert pipeline["namespace"] == ""
    registry = PipelineRegistry(url, token="alice", namespace="team-a")
    run = registry.create_run("labelmatch-deploy", "0.1.0", {"model_uri": "s3://b/m"})
    assert state.runs[run.run_id]["pipeline_version_reference"]["pipeline_id"] == pipeline["pipeline_id"]
    assert state.run_namespace(state.runs[run.run_id]) == "team-a"
    lookups = [r.query.get("namespace") for r in state.requests if r.path == f"{API}/pipelines"]
    assert lookups[-2:] == ["team-a", None]  # its own namespace first, then the shared pipelines
