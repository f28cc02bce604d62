"""Shared storage for multi-node Tune: local paths or ``s3://`` URIs (AWS S3 or MinIO).

Ray Tune needs storage every node can reach once trials run on more than one machine. An
``s3://bucket/prefix`` URI is opened with pyarrow's ``S3FileSystem``; for MinIO set the endpoint
(``AWS_ENDPOINT_URL`` or ``--s3-endpoint``), credentials come from ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` in the environment (a Kubernetes Secret in the cluster), never flags.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


def is_remote(uri: str | Path | None) -> bool:
    """True for ``s3://`` URIs."""
    return str(uri or "").startswith("s3://")


def s3_filesystem(endpoint: str | None = None) -> Any:
    """A pyarrow S3 filesystem; ``endpoint`` (or ``AWS_ENDPOINT_URL``) overrides AWS (MinIO)."""
    from pyarrow import fs

    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return fs.S3FileSystem()
    parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    return fs.S3FileSystem(
        endpoint_override=parsed.netloc,
        scheme=parsed.scheme,
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    )


def ray_storage(storage_path: str, endpoint: str | None = None) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for ``ray.tune.RunConfig``."""
    if is_remote(storage_path):
        return storage_path.removeprefix("s3://"), s3_filesystem(endpoint)
    return str(Path(storage_path).resolve()), None


def copy_dir(source: str | Path, target: str | Path, endpoint: str | None = None) -> None:
    """Copy a directory tree between local paths and ``s3://`` URIs (either direction)."""
    from pyarrow import fs

    remote = s3_filesystem(endpoint) if is_remote(source) or is_remote(target) else None
    src_fs = remote if is_remote(source) else fs.LocalFileSystem()
    dst_fs = remote if is_remote(target) else fs.LocalFileSystem()
    if not is_remote(target):
        Path(target).mkdir(parents=True, exist_ok=True)
    fs.copy_files(
        str(source).removeprefix("s3://"),
        str(target).removeprefix("s3://"),
        source_filesystem=src_fs,
        destination_filesystem=dst_fs,
    )
