"""The artifact contract: every artifact is a directory with a verified ``manifest.json``.

A manifest records the schema version, the artifact kind, when and by what it was created, its
lineage (digests of the input artifacts, pipeline version, run id) and the sha256 of every file.
Readers call :func:`verify_artifact`, which refuses a missing file, a file the manifest does not
list, a listed name that leaves the artifact directory (``../``, an absolute path), a digest
mismatch or a wrong kind, with a message naming the artifact and file.

Writers use :func:`atomic_artifact_dir`: everything is written into a temporary sibling
directory, flushed to disk (files and directories fsync'd), and swapped into place in one
atomic step only when complete (``renameat2(RENAME_EXCHANGE)`` on Linux), so a crash never leaves
a half-written artifact where a reader would look, and a reader never finds the output missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from labelmatch import __version__
from labelmatch.core.errors import ArtifactError

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


def member_path(root: str | Path, name: str, where: str | None = None, listing: str = MANIFEST) -> Path:
    """The path of a listed file inside ``root``; a name that would leave it is refused.

    Args:
        root: The artifact directory.
        name: A file name as the listing gives it (POSIX, relative).
        where: How to name the artifact in the error (default: ``artifact <root>``).
        listing: What listed the name (``manifest.json``, an object store listing).

    Raises:
        ArtifactError: ``name`` is absolute, empty, has a ``..`` part or a backslash.
    """
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise ArtifactError(f"{where or f'artifact {root}'}: {listing} lists an unsafe file name {name!r}")
    return Path(root).joinpath(*path.parts)


def verify_artifact(root: str | Path, kind: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Verify an artifact directory against its manifest and return the manifest.

    Args:
        root: The artifact directory.
        kind: Expected kind (or kinds); ``None`` accepts any.

    Raises:
        ArtifactError: naming the artifact and the file when the manifest is missing, the kind
            is wrong, a listed name leaves the directory, a listed file is missing or its sha256
            differs, or a file is there that the manifest does not list.
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
        path = member_path(root, name)
        if not path.is_file():
            raise ArtifactError(f"artifact {root}: file {name} listed in {MANIFEST} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(
                f"artifact {root}: file {name} is corrupted "
                f"(sha256 {actual[:12]}… != manifest {expected[:12]}…)"
            )
    unlisted = sorted(set(_artifact_files(root)) - set(manifest["files"]))
    if unlisted:
        more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
        raise ArtifactError(f"artifact {root}: file {unlisted[0]} is not listed in {MANIFEST}{more}")
    return manifest


@contextlib.contextmanager
def atomic_artifact_dir(out: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block succeeds.

    The temporary directory is a sibling of ``out`` (same filesystem). When the block succeeds
    its files and directories are fsync'd, then it takes ``out``'s place in one atomic exchange
    (:func:`exchange_paths`), so ``out`` is at every moment either the old artifact or the new
    one, and the new one is on disk before it becomes visible. On error the temporary directory
    is removed and ``out`` is left exactly as it was.

    Args:
        out: Final artifact directory.
        overwrite: Replace an existing ``out``; when False an existing one is an error.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not overwrite:
        raise ArtifactError(f"output {out} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    # mkdtemp makes the directory private (0700); an artifact is as readable as any directory
    # this process makes (the umask decides), e.g. by a model server running as another user.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        fsync_tree(tmp)
        if out.exists():
            exchange_paths(tmp, out)  # tmp now holds the old artifact
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (and ``root``): on disk before it is renamed."""
    root = Path(root)
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(a: str | Path, b: str | Path) -> None:
    """Swap two directory entries atomically (Linux ``renameat2(RENAME_EXCHANGE)``).

    Where the kernel or filesystem lacks it, falls back to two renames, which leave a moment in
    which ``b`` does not exist (never a half-written ``b``).
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        result = renameat2(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
        if result == 0:
            return
    parked = Path(tempfile.mkdtemp(prefix=".exchange-", dir=Path(b).parent)) / "x"
    os.replace(b, parked)
    os.replace(a, b)
    os.replace(parked, a)
    parked.parent.rmdir()


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON with stable formatting (sorted keys are not used: label order matters)."""
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
