"""`labelmatch pipeline default`: the pinned default version of a KFP pipeline, against the KFP
v2beta1 stub (tests/kfp_stub.py, following the 2.17.0 backend: UpdatePipeline's tags, the latest
version for a reference without a version id)."""

from __future__ import annotations

import pytest
from conftest import run_cli as _cli
from kfp_stub import API, shipped_ir

from labelmatch.core.errors import ConfigError
from labelmatch.platform.kfp import DEFAULT_VERSION_TAG, GIVEN, LATEST, PINNED, PipelineRegistry

DEPLOY = "labelmatch-deploy"


def _upload(registry: PipelineRegistry, tmp_path, *versions: str) -> dict[str, str]:
    """Upload the shipped deploy IR as ``versions``; ``{version: version id}``."""
    return {v: registry.upload(shipped_ir(tmp_path, DEPLOY, v), v).version_id for v in versions}


def _run_version(state, run_id: str) -> str:
    return state.runs[run_id]["pipeline_version_reference"]["pipeline_version_id"]


def test_kfp_runs_the_latest_version_without_a_pin(kfp, tmp_path):
    """What KFP does itself (no v2beta1 default version): a run that references the pipeline
    without a version id runs the newest version; labelmatch resolves the same one."""
    url, state = kfp
    registry = PipelineRegistry(url)
    ids = _upload(registry, tmp_path, "0.1.0", "0.2.0")
    pipeline_id = registry.pipeline_id(DEPLOY)
    from kfp_server_api.models import V2beta1PipelineVersionReference, V2beta1Run, V2beta1RuntimeConfig

    experiment = registry.client.create_experiment("labelmatch").experiment_id
    run = registry.client.runs.run_service_create_run(run=V2beta1Run(
        experiment_id=experiment, display_name="by pipeline id",
        pipeline_version_reference=V2beta1PipelineVersionReference(pipeline_id=pipeline_id),
        runtime_config=V2beta1RuntimeConfig(parameters={"model_uri": "s3://b/m"})))
    assert _run_version(state, run.run_id) == ids["0.2.0"]
    target, how = registry.resolve_version(DEPLOY)
    assert (target.version, how) == ("0.2.0", LATEST)
    assert registry.default_version(DEPLOY) is None


def test_pin_default_and_runs_without_version_use_it(kfp, tmp_path):
    """`pipeline default --version` tags the pipeline (PATCH, the other tags kept); `pipeline run`
    without --version runs the pin, --version overrides it, a later upload does not move it, and
    --clear goes back to KFP's latest."""
    url, state = kfp
    registry = PipelineRegistry(url)
    ids = _upload(registry, tmp_path, "0.1.0", "0.2.0")
    pipeline_id = registry.pipeline_id(DEPLOY)
    state.pipelines[pipeline_id]["tags"] = {"team": "ml-platform"}  # someone else's tag
    state.requests.clear()

    result = _cli("pipeline", "default", "--host", url, "--pipeline", DEPLOY, "--version", "0.1.0")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{DEPLOY}: default version 0.1.0 (pinned)"
    [patch] = [r for r in state.requests if r.method == "PATCH"]
    assert patch.path == f"{API}/pipelines/{pipeline_id}"
    assert patch.body == {"tags": {"team": "ml-platform", DEFAULT_VERSION_TAG: "0.1.0"}}
    assert state.pipelines[pipeline_id]["tags"] == {"team": "ml-platform", DEFAULT_VERSION_TAG: "0.1.0"}
    assert registry.default_version(DEPLOY) == "0.1.0"

    result = _cli("pipeline", "run", "--host", url, "--pipeline", DEPLOY, "--param", "model_uri=s3://b/m")
    assert result.exit_code == 0, result.output
    assert f"({DEPLOY} 0.1.0, {PINNED}; cache as compiled)" in result.output
    [run] = state.runs.values()
    assert _run_version(state, run["run_id"]) == ids["0.1.0"]

    result = _cli("pipeline", "run", "--host", url, "--pipeline", DEPLOY, "--version", "0.2.0",
                  "--param", "model_uri=s3://b/m")
    assert result.exit_code == 0 and f"0.2.0, {GIVEN}" in result.output, result.output
    assert _run_version(state, list(state.runs)[-1]) == ids["0.2.0"]

    ids.update(_upload(registry, tmp_path, "0.3.0"))  # a newer upload does not move the pin
    assert registry.resolve_version(DEPLOY) == (registry.find_version(DEPLOY, "0.1.0"), PINNED)
    result = _cli("pipeline", "default", "--host", url, "--pipeline", DEPLOY)
    assert result.output.strip() == f"{DEPLOY}: default version 0.1.0 (pinned)"

    result = _cli("pipeline", "default", "--host", url, "--pipeline", DEPLOY, "--clear")
    assert result.exit_code == 0, result.output
    assert "no default pinned; runs without --version take the latest, 0.3.0" in result.output
    assert state.pipelines[pipeline_id]["tags"] == {"team": "ml-platform"}
    run = registry.create_run(DEPLOY, None, {"model_uri": "s3://b/m"})
    assert (run.version, _run_version(state, run.run_id)) == ("0.3.0", ids["0.3.0"])


def test_pin_refusals_are_one_line(kfp, tmp_path):
    """An unknown version or pipeline is refused before anything is changed; a pinned version
    deleted since is named when a run needs it; a shared pipeline's pin needs KFP's namespace."""
    url, state = kfp
    registry = PipelineRegistry(url)
    with pytest.raises(ConfigError, match=r"pipeline 'labelmatch-deploy' is not on the KFP server"):
        registry.pin_default_version(DEPLOY, "0.1.0")
    ids = _upload(registry, tmp_path, "0.1.0", "0.2.0")
    result = _cli("pipeline", "default", "--host", url, "--pipeline", DEPLOY, "--version", "0.9.0")
    assert result.exit_code != 0
    assert "has no version '0.9.0' on the server (versions: 0.1.0, 0.2.0)" in str(result.exception)
    assert not [r for r in state.requests if r.method == "PATCH"]
    result = _cli("pipeline", "default", "--host", url, "--version", "0.1.0", "--clear")
    assert "not both" in str(result.exception)

    registry.pin_default_version(DEPLOY, "0.1.0")
    registry.client.delete_pipeline_version(registry.pipeline_id(DEPLOY), ids["0.1.0"])
    with pytest.raises(ConfigError, match=r"no version '0.1.0' .* it is the pinned default: pin another"):
        registry.create_run(DEPLOY, None, {"model_uri": "s3://b/m"})


def test_shared_pipeline_pin_is_authorised_against_kfps_namespace(kfp, tmp_path):
    """Multi-user KFP: UpdatePipeline is checked like any change of the pipeline (verb update): a
    profile's token may pin its own namespaced pipeline, a shared one needs KFP's namespace."""
    url, state = kfp
    state.multi_user, state.tokens = True, {"admin": {"kubeflow"}, "alice": {"team-a"}}
    PipelineRegistry(url, token="admin", shared_pipelines=True).upload(
        shipped_ir(tmp_path, DEPLOY, "0.1.0"), "0.1.0")
    result = _cli("pipeline", "default", "--host", url, "--pipeline", DEPLOY, "--version", "0.1.0",
                  "--token", "alice", "--namespace", "team-a")
    assert result.exit_code != 0
    assert "answered 403" in str(result.exception)
    result = _cli("pipeline", "default", "--host", url, "--pipeline", DEPLOY, "--version", "0.1.0",
                  "--token", "admin")
    assert result.exit_code == 0, result.output
    alice = PipelineRegistry(url, token="alice", namespace="team-a")
    assert alice.resolve_version(DEPLOY)[1] == PINNED  # every profile reads the shared pin


def test_releases_name_the_pipeline_version_of_each_release(tmp_path, monkeypatch):
    """`labelmatch releases` labels its columns; pipeline_version says which version deployed each."""
    from s3_server import moto_s3_server, s3_env

    from labelmatch.platform.artifact_store import ArtifactStore
    from labelmatch.platform.releases import ReleaseLog, ReleaseRecord

    with moto_s3_server() as url:
        for name, value in s3_env(url).items():
            monkeypatch.setenv(name, value)
        log = ReleaseLog(ArtifactStore.from_env(), "s3://labelmatch")
        for version in ("0.1.0", "0.2.0"):
            log.append(ReleaseRecord.new(service="tax", namespace="ml", model_uri=f"s3://labelmatch/m/{version}",
                                         model_digest="ab" * 32, pipeline_version=version,
                                         run_id=f"run-{version}"))
        result = _cli("releases", "--service", "tax", "--root", "s3://labelmatch")
    assert result.exit_code == 0, result.output
    header, *rows = [line.split("\t") for line in result.output.splitlines()]
    assert header[:3] == ["time", "release", "pipeline_version"]
    assert [dict(zip(header, row, strict=True))["pipeline_version"] for row in rows] == ["0.1.0", "0.2.0"]
