"""Roll a service back by re-running the deploy pipeline of an earlier version with its model.

A rollback changes nothing by hand: it finds the release record (by release id, or the latest
release of a pipeline version), checks that the model artifact it names is still in the store
*byte for byte* (every object against the manifest, and the manifest against the recorded
digest), then creates a KFP run of the deploy pipeline **of that earlier pipeline version** with
``model_uri`` and ``model_digest`` from the record and ``restore_release`` naming it. That run's
deploy step verifies the digest again, puts the release's whole served state back (model, serve
image by digest, engine, label-set version and thresholds, predictor args, resources and replicas:
:func:`labelmatch.platform.kserve.point_at_model`), waits for the rollout, checks that the server
reports that model digest, label-set version and engine, and writes a new release record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from labelmatch.core.artifacts import artifact_digest, verify_artifact
from labelmatch.core.errors import ArtifactError, ConfigError
from labelmatch.platform.artifact_store import ArtifactStore, is_s3_uri
from labelmatch.platform.kfp import DEPLOY_PIPELINE, PipelineVersion, RunInfo
from labelmatch.platform.releases import ReleaseLog, ReleaseRecord


class PipelineRunner(Protocol):
    """What a rollback needs of a pipeline server: a KFP server
    (:class:`labelmatch.platform.kfp.PipelineRegistry`) or compiled IR run with ``kfp.local``
    (``pipelines.local.LocalPipelineRegistry``)."""

    def find_version(self, name: str, version: str) -> PipelineVersion:
        """The pipeline version named ``version``."""

    def create_run(self, name: str, version: str, params: dict[str, str] | None = None,
                   run_name: str | None = None, **options: Any) -> RunInfo:
        """Create (and, locally, run) a run of that version."""


def verify_model(uri: str, store: ArtifactStore) -> str:
    """Check every file of the model artifact at ``uri`` (``s3://`` or a local directory) against
    its manifest and return the artifact digest."""
    if is_s3_uri(uri):
        return store.verify_remote(uri, kind=("OnnxModel", "Model"))
    verify_artifact(uri, ("OnnxModel", "Model"))
    return artifact_digest(uri)


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
    registry: PipelineRunner,
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
        ConfigError: No such release; the pipeline version is not on the server, does not take a
            ``model_uri`` parameter, or requires a parameter a rollback cannot supply.
        ArtifactError: The model artifact changed or lost files since the release.
    """
    release = releases.find(service, target)
    digest = verify_model(release.model_uri, store)
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
        "target": release.target,
        "release_root": str(releases.root),
        "restore_release": release.release_id,
    }
    # Older deploy pipelines may declare fewer parameters; the model URI is the one that matters.
    parameters = {key: value for key, value in wanted.items() if key in version.parameters}
    missing = [name for name in version.required if name not in parameters]
    if missing:
        raise ConfigError(
            f"pipeline {pipeline} {version.version} requires parameter(s) {', '.join(missing)}, which a "
            f"rollback cannot supply (it knows {', '.join(sorted(wanted))}); re-deploy with "
            "`labelmatch pipeline run` instead"
        )
    return RollbackPlan(release=release, version=version, parameters=parameters)


def rollback(
    service: str,
    target: str,
    releases: ReleaseLog,
    store: ArtifactStore,
    registry: PipelineRunner,
    pipeline: str = DEPLOY_PIPELINE,
    service_account: str | None = None,
) -> tuple[RollbackPlan, RunInfo]:
    """Plan (see :func:`plan_rollback`) and create the deploy run; returns the plan and the run.

    Args:
        service_account: Service account of the run's pods (default: the server's).
    """
    plan = plan_rollback(service, target, releases, store, registry, pipeline)
    run = registry.create_run(
        pipeline,
        plan.version.version,
        plan.parameters,
        run_name=f"rollback {service} to {plan.release.release_id} ({plan.version.version})",
        service_account=service_account,
    )
    return plan, run
