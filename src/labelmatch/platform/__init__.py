"""The cluster's APIs: S3/MinIO artifact store, KFP, KServe, Kubernetes, releases and rollback.

Public names import lazily (:mod:`labelmatch.core.lazy`): importing the package costs nothing.
"""

from labelmatch.core.lazy import lazy_exports

_EXPORTS = {
    "ArtifactStore": "artifact_store",
    "S3Config": "artifact_store",
    "S3Uri": "artifact_store",
    "CachePolicy": "kfp_cache",
    "PipelineRegistry": "kfp",
    "PipelineVersion": "kfp",
    "RunInfo": "kfp",
    "image": "images",
    "DeployConfig": "kserve",
    "deploy_model": "kserve",
    "ReleaseLog": "releases",
    "ReleaseRecord": "releases",
    "plan_rollback": "rollback",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
