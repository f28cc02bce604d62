"""The artifact contract: every artifact is a directory with a verified ``manifest.json``.

A manifest records the schema version, the artifact kind, when and by what it was created, its
lineage (digests of the input artifacts, pipeline version, run id) and the sha256 of every file.
Readers call :func:`verify_artifact`, which refuses a missing file, an unlisted extra file in a
checked sub-tree, a digest mismatch or a wrong kind with a message naming the artifact and file.

Writers use :func:`atomic_artifact_dir`: everything is written into a temporary sibling
directory and moved into place only when complete, so a crash never leaves a half-written
artifact where a reader would look.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from labelmatch import __version__
from labelmatch.errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("Dataset", "Model", "OnnxModel", "FeedbackExport", "TuneResult", "Report", "Encoder")


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _artifact_files(root: Path) -> list[str]:
    files = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path != root / MANIFEST:
            files.append(path.relative_to(root).as_posix())
    return files


def write_manifest(
    root: str | Path,
    kind: str,
    lineage: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json`` for the artifact directory ``root`` and return it.

    Args:
        root: The artifact directory; every file under it is hashed.
        kind: One of :data:`KINDS`.
        lineage: Input artifact digests, pipeline version, run id, ... (free-form, JSON-able).
        extra: Kind-specific summary (e.g. counts per split for a Dataset).

    Returns:
        The manifest as written.
    """
    if kind not in KINDS:
        raise ArtifactError(f"unknown artifact kind {kind!r}; expected one of {', '.join(KINDS)}")
    root = Path(root)
    files = {name: sha256_file(root / name) for name in _artifact_files(root)}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "created_by": f"labelmatch {__version__}",
        "lineage": lineage or {},
        "files": files,
        **({"summary": extra} if extra else {}),
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def artifact_digest(root: str | Path) -> str:
    """A digest identifying an artifact's content: sha256 over its sorted file digests."""
    return manifest_digest(read_manifest(root))


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The :func:`artifact_digest` of a parsed manifest (e.g. one read from an artifact store)."""
    payload = json.dumps(manifest["files"], sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Read and parse ``manifest.json`` without verifying digests."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"artifact {root}: not a directory")
    if not path.is_file():
        raise ArtifactError(f"artifact {root}: missing {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"artifact {root}: {MANIFEST} is not valid JSON ({exc})") from exc
    for key in ("schema_version", "kind", "files"):
        if key not in manifest:
            raise ArtifactError(f"artifact {root}: {MANIFEST} lacks field '{key}'")
    return manifest


def verify_artifact(root: str | Path, kind: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Verify an artifact directory against its manifest and return the manifest.

    Args:
        root: The artifact directory.
        kind: Expected kind (or kinds); ``None`` accepts any.

    Raises:
        ArtifactError: naming the artifact and the file when the manifest is missing, the kind
            is wrong, a listed file is missing or its sha256 differs.
    """
    root = Path(root)
    manifest = read_manifest(root)
    if manifest["schema_version"] > SCHEMA_VERSION:
        raise ArtifactError(
            f"artifact {root}: schema_version {manifest['schema_version']} is newer than this "
            f"labelmatch understands ({SCHEMA_VERSION}); upgrade labelmatch"
        )
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds and manifest["kind"] not in kinds:
        raise ArtifactError(
            f"artifact {root}: kind is {manifest['kind']!r}, expected {' or '.join(map(repr, kinds))}"
        )
    for name, expected in manifest["files"].items():
        path = root / name
        if not path.is_file():
            raise ArtifactError(f"artifact {root}: file {name} listed in {MANIFEST} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(
                f"artifact {root}: file {name} is corrupted "
                f"(sha256 {actual[:12]}… != manifest {expected[:12]}…)"
            )
    return manifest


@contextlib.contextmanager
def atomic_artifact_dir(out: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block succeeds.

    The temporary directory is a sibling of ``out`` (same filesystem, so the final rename is
    atomic). On error it is removed and ``out`` is left exactly as it was.

    Args:
        out: Final artifact directory.
        overwrite: Replace an existing ``out``; when False an existing one is an error.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not overwrite:
        raise ArtifactError(f"output {out} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON with stable formatting (sorted keys are not used: label order matters)."""
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
