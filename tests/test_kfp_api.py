"""Versioned pipeline upload and runs through kfp.Client against a KFP v2beta1 stub on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
from kfp_stub import API, kfp_stub_server, shipped_ir

from labelmatch.core.errors import ConfigError
from labelmatch.platform.kfp import PipelineRegistry, compiled_packages, convert_parameter, read_package
from labelmatch.platform.kserve import DEPLOY_PARAMETERS


@pytest.fixture
def kfp(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/kfp/context.json of the machine
    with kfp_stub_server() as (url, state):
        yield url, state


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
        ("GET", f"{API}/pipelines"),
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
