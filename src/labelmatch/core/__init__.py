"""The artifact contract (manifests, digests, atomic writes) and the errors every stage raises.

Public names import lazily (:mod:`labelmatch.core.lazy`): importing the package costs nothing.
"""

from labelmatch.core.lazy import lazy_exports

_EXPORTS = {
    "write_manifest": "artifacts",
    "verify_artifact": "artifacts",
    "read_manifest": "artifacts",
    "artifact_digest": "artifacts",
    "atomic_artifact_dir": "artifacts",
    "member_path": "artifacts",
    "write_json": "artifacts",
    "LabelmatchError": "errors",
    "DataError": "errors",
    "ArtifactError": "errors",
    "ConfigError": "errors",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
