"""Shared storage for multi-node Tune: local paths or ``s3://`` URIs (AWS S3 or MinIO).

Ray Tune needs storage every node can reach once trials run on more than one machine. An
``s3://bucket/prefix`` URI is opened with pyarrow's ``S3FileSystem``, configured from the same
settings as the artifact store (:class:`labelmatch.platform.artifact_store.S3Config`:
``LABELMATCH_S3_ENDPOINT`` or
``AWS_ENDPOINT_URL`` for MinIO, credentials from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
in the environment — a Kubernetes Secret in the cluster — never flags); ``--s3-endpoint``
overrides the endpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def is_remote(uri: str | Path | None) -> bool:
    """True for ``s3://`` URIs."""
    return str(uri or "").startswith("s3://")


def s3_filesystem(endpoint: str | None = None) -> Any:
    """A pyarrow S3 filesystem with the artifact store's settings; ``endpoint`` overrides its endpoint.

    Without any endpoint configured (no ``endpoint``, no endpoint variable) it is AWS S3 with
    pyarrow's own credential chain.
    """
    from pyarrow import fs

    from labelmatch.platform.artifact_store import ENDPOINT_VARS, S3Config

    env = dict(os.environ)
    if endpoint:
        env[ENDPOINT_VARS[0]] = endpoint if "://" in endpoint else f"http://{endpoint}"
    if not any(env.get(name) for name in ENDPOINT_VARS):
        return fs.S3FileSystem()
    config = S3Config.from_env(env)
    return fs.S3FileSystem(
        endpoint_override=config.endpoint,
        scheme="https" if config.secure else "http",
        region=config.region or "us-east-1",
        access_key=config.access_key,
        secret_key=config.secret_key,
        session_token=config.session_token,
    )


def ray_storage(storage_path: str, endpoint: str | None = None) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for ``ray.tune.RunConfig``."""
    if is_remote(storage_path):
        return storage_path.removeprefix("s3://"), s3_filesystem(endpoint)
    return str(Path(storage_path).resolve()), None
