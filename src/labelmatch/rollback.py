"""Roll a service back by re-running the deploy pipeline of an earlier version with its model.

A rollback changes nothing by hand: it finds the release record (by release id, or the latest
release of a pipeline version), checks that the model artifact it names is still in the store
*byte for byte* (every object against the manifest, and the manifest against the recorded
digest), then creates a KFP run of the deploy pipeline **of that earlier pipeline version** with
``model_uri`` and ``model_digest`` from the record. That run's deploy step verifies the digest
again before it points the InferenceService at the model and writes a new release record, so the
service comes back serving exactly the files it served then.
"""

from __future__ import annotations

from dataclasses import dataclass

from labelmatch.errors import ArtifactError, ConfigError
from labelmatch.kfp_api import DEPLOY_PIPELINE, PipelineRegistry, PipelineVersion, RunInfo
from labelmatch.releases import ReleaseLog, ReleaseRecord
from labelmatch.store import ArtifactStore


@dataclass(frozen=True)
class RollbackPlan:
    """What a rollback will run.

    Args:
        release: The release rolled back to.
        version: The deploy pipeline version that will run.
        parameters: The run's parameters (strings, as on the command line).
    """

    release: ReleaseRecord
    version: PipelineVersion
    parameters: dict[str, str]


def plan_rollback(
    service: str,
    target: str,
    releases: ReleaseLog,
    store: ArtifactStore,
    registry: PipelineRegistry,
    pipeline: str = DEPLOY_PIPELINE,
) -> RollbackPlan:
    """Choose the release, verify its model, and find the deploy pipeline version to run.

    Args:
        service: The InferenceService name.
        target: A release id (or record name), or a pipeline version (its latest release).
        releases: The release log.
        store: The artifact store holding the model.
        registry: The KFP server.
        pipeline: Name of the deploy-only pipeline.

    Raises:
        ConfigError: No such release, or the pipeline version is not on the server or does not
            take a ``model_uri`` parameter.
        ArtifactError: The model artifact changed or lost files since the release.
    """
    release = releases.find(service, target)
    digest = store.verify_remote(release.model_uri, kind=("OnnxModel", "Model"))
    if digest != release.model_digest:
        raise ArtifactError(
            f"{release.model_uri}: artifact digest {digest[:12]}… differs from "
            f"release {release.release_id}'s "
            f"{release.model_digest[:12]}…; refusing to roll back to a different model"
        )
    version = registry.find_version(pipeline, release.pipeline_version)
    if "model_uri" not in version.parameters:
        raise ConfigError(
            f"pipeline {pipeline} {version.version} has no 'model_uri' parameter; cannot re-deploy with it"
        )
    wanted = {
        "model_uri": release.model_uri,
        "model_digest": release.model_digest,
        "service": release.service,
        "namespace": release.namespace,
    }
    # Older deploy pipelines may declare fewer parameters; the model URI is the one that matters.
    parameters = {key: value for key, value in wanted.items() if key in version.parameters}
    return RollbackPlan(release=release, version=version, parameters=parameters)


def rollback(
    service: str,
    target: str,
    releases: ReleaseLog,
    store: ArtifactStore,
    registry: PipelineRegistry,
    pipeline: str = DEPLOY_PIPELINE,
) -> tuple[RollbackPlan, RunInfo]:
    """Plan (see :func:`plan_rollback`) and create the deploy run; returns the plan and the run."""
    plan = plan_rollback(service, target, releases, store, registry, pipeline)
    run = registry.create_run(
        pipeline,
        plan.version.version,
        plan.parameters,
        run_name=f"rollback {service} to {plan.release.release_id} ({plan.version.version})",
    )
    return plan, run
