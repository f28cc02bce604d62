"""Artifacts in MinIO (or any S3 endpoint) at ``s3://bucket/prefix`` through the ``minio`` client.

An artifact in the store is the artifact directory's files under ``<prefix>/`` plus its
``manifest.json`` (see :mod:`labelmatch.core.artifacts`). S3 has no multi-object transaction, so an
upload is made atomic *from a reader's view* by ordering:

1. every file listed in the manifest is uploaded under the final prefix;
2. ``manifest.json`` is uploaded **last**.

A reader starts from ``manifest.json``: no manifest means "no artifact" (an interrupted upload is
invisible), and every downloaded file is checked against the manifest's sha256 with
:func:`labelmatch.core.artifacts.verify_artifact`, so a file replaced or truncated under a manifest is
refused. Artifacts are immutable: uploading a *different* artifact over a prefix that already has
a manifest is refused (re-uploading the identical one is a no-op), so a reader never sees a
manifest paired with another upload's files. A copy-from-temp-key scheme would buy nothing more:
S3 copies are per object, the manifest is still the commit point.

Connection settings come from the environment (first name set wins) or a mounted Secret:

======================  ===============================================================
setting                 variables
======================  ===============================================================
endpoint                ``LABELMATCH_S3_ENDPOINT``, ``S3_ENDPOINT``, ``AWS_ENDPOINT_URL``,
                        ``MINIO_ENDPOINT`` (``http://`` / ``https://`` scheme sets TLS)
region                  ``LABELMATCH_S3_REGION``, ``AWS_REGION``, ``AWS_DEFAULT_REGION``
TLS                     ``LABELMATCH_S3_SECURE``, ``S3_USE_HTTPS`` (``1``/``0``; default: the
                        endpoint's scheme, else TLS on)
certificate check       ``LABELMATCH_S3_VERIFY``, ``S3_VERIFY_SSL`` (default on);
                        CA bundle ``LABELMATCH_S3_CA_BUNDLE``, ``AWS_CA_BUNDLE``
credentials             ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (+ ``AWS_SESSION_TOKEN``),
                        ``MINIO_ACCESS_KEY`` / ``MINIO_SECRET_KEY``, ``MINIO_ROOT_USER`` /
                        ``MINIO_ROOT_PASSWORD``
Secret directory        ``LABELMATCH_S3_SECRET_DIR``: a mounted Kubernetes Secret whose files
                        carry the credential names above, or ``accesskey`` / ``secretkey``
                        (the keys of KFP's ``mlpipeline-minio-artifact`` Secret); it wins
======================  ===============================================================

Credentials never appear in a ``repr``, a log line or an error message: :class:`S3Config` hides
them and every error raised here passes through :meth:`ArtifactStore._redact`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from labelmatch.core.artifacts import (
    MANIFEST,
    atomic_artifact_dir,
    manifest_digest,
    member_path,
    verify_artifact,
    write_manifest,
)
from labelmatch.core.errors import ArtifactError, ConfigError, DataError

log = logging.getLogger(__name__)

ENDPOINT_VARS = ("LABELMATCH_S3_ENDPOINT", "S3_ENDPOINT", "AWS_ENDPOINT_URL", "MINIO_ENDPOINT")
REGION_VARS = ("LABELMATCH_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION")
SECURE_VARS = ("LABELMATCH_S3_SECURE", "S3_USE_HTTPS")
VERIFY_VARS = ("LABELMATCH_S3_VERIFY", "S3_VERIFY_SSL")
CA_BUNDLE_VARS = ("LABELMATCH_S3_CA_BUNDLE", "AWS_CA_BUNDLE")
SECRET_DIR_VAR = "LABELMATCH_S3_SECRET_DIR"
#: (access key, secret key) names, in order of preference.
CREDENTIAL_NAMES = (
    ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
    ("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY"),
    ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"),
    ("accesskey", "secretkey"),
)
SESSION_TOKEN_NAME = "AWS_SESSION_TOKEN"
CACHE_DIR_VAR = "LABELMATCH_CACHE_DIR"


@dataclass(frozen=True)
class S3Uri:
    """A parsed ``s3://bucket/prefix`` (``prefix`` without leading or trailing slash)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        """Parse ``s3://bucket[/prefix]``; raises :class:`ConfigError` naming the URI otherwise."""
        if not uri.startswith("s3://"):
            raise ConfigError(f"{uri!r}: not an s3:// URI (expected s3://bucket/prefix)")
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ConfigError(f"{uri!r}: no bucket name")
        return cls(bucket, prefix.strip("/"))

    def key(self, name: str) -> str:
        """The object key of ``name`` under this prefix."""
        return f"{self.prefix}/{name}" if self.prefix else name

    def child(self, name: str) -> S3Uri:
        """The URI of ``name`` under this prefix."""
        return S3Uri(self.bucket, self.key(name.strip("/")))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def _truthy(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"environment variable {name}: expected true/false or 1/0, got {value!r}")


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        if env.get(name):
            return name, env[name]
    return None


#: How long an S3 outage a store call rides out: connection errors and 500/502/503/504 are
#: retried 8 times (``$LABELMATCH_S3_RETRIES``), 0.5 s, 1 s, 2 s ... apart (at most 10 s each),
#: about 45 s in all, before the call fails with one line naming the URI. A step's own retries
#: (KFP) come on top.
S3_RETRIES = 8
RETRIES_VAR = "LABELMATCH_S3_RETRIES"


@dataclass(frozen=True)
class S3Config:
    """Where the store is and how to authenticate; secrets are excluded from ``repr``.

    Args:
        endpoint: ``host:port`` of the S3 API (no scheme).
        secure: Use TLS.
        region: Bucket region (MinIO: any, e.g. ``us-east-1``); None lets the client ask.
        cert_check: Verify the server certificate when ``secure``.
        ca_bundle: PEM file of extra CA certificates.
        access_key: Access key id.
        secret_key: Secret access key.
        session_token: Temporary session token.
        retries: Retries of a call on connection errors and 5xx (:data:`S3_RETRIES`,
            ``$LABELMATCH_S3_RETRIES``).
    """

    endpoint: str
    secure: bool = True
    region: str | None = None
    cert_check: bool = True
    ca_bundle: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    retries: int = S3_RETRIES

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ConfigError(f"S3 retries must be >= 0, got {self.retries}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, secret_dir: str | Path | None = None) -> S3Config:
        """Read the settings from ``env`` (default ``os.environ``) and an optional Secret directory.

        Args:
            env: The environment to read.
            secret_dir: A mounted Secret directory; default ``$LABELMATCH_S3_SECRET_DIR``.

        Raises:
            ConfigError: No endpoint is set, a boolean is malformed, or the Secret directory is
                unreadable or lacks a credential pair.
        """
        env = os.environ if env is None else env
        found = _first(env, ENDPOINT_VARS)
        if found is None:
            raise ConfigError(f"no S3 endpoint: set one of {', '.join(ENDPOINT_VARS)}")
        endpoint = found[1].strip()
        secure = True
        if "://" in endpoint:
            scheme, _, endpoint = endpoint.partition("://")
            secure = scheme.lower() == "https"
        endpoint = endpoint.rstrip("/")
        if (flag := _first(env, SECURE_VARS)) is not None:
            secure = _truthy(flag[1], flag[0])
        cert_check = True
        if (flag := _first(env, VERIFY_VARS)) is not None:
            cert_check = _truthy(flag[1], flag[0])
        region = _first(env, REGION_VARS)
        ca_bundle = _first(env, CA_BUNDLE_VARS)
        secret_dir = secret_dir or env.get(SECRET_DIR_VAR)
        source = _read_secret_dir(Path(secret_dir)) if secret_dir else env
        access_key, secret_key = None, None
        for access_name, secret_name in CREDENTIAL_NAMES:
            if source.get(access_name) and source.get(secret_name):
                access_key, secret_key = source[access_name].strip(), source[secret_name].strip()
                break
        if secret_dir and access_key is None:
            pairs = ", ".join(f"{a}/{s}" for a, s in CREDENTIAL_NAMES)
            raise ConfigError(f"S3 secret directory {secret_dir}: no credential pair ({pairs})")
        token = source.get(SESSION_TOKEN_NAME)
        retries = env.get(RETRIES_VAR, "").strip()
        if retries and not retries.isdigit():
            raise ConfigError(f"{RETRIES_VAR}={retries!r}: expected a whole number")
        return cls(
            retries=int(retries) if retries else S3_RETRIES,
            endpoint=endpoint,
            secure=secure,
            region=region[1] if region else None,
            cert_check=cert_check,
            ca_bundle=ca_bundle[1] if ca_bundle else None,
            access_key=access_key,
            secret_key=secret_key,
            session_token=token.strip() if token else None,
        )

    def secrets(self) -> list[str]:
        """The secret values, for redaction."""
        return [value for value in (self.access_key, self.secret_key, self.session_token) if value]


def _read_secret_dir(path: Path) -> dict[str, str]:
    """Files of a mounted Secret as ``{key: value}`` (Kubernetes' ``..data`` links are skipped)."""
    if not path.is_dir():
        raise ConfigError(f"S3 secret directory {path}: not a directory")
    values = {}
    for item in path.iterdir():
        if item.is_file() and not item.name.startswith("."):
            try:
                values[item.name] = item.read_text()
            except OSError as exc:
                raise ConfigError(
                    f"S3 secret directory {path}: cannot read {item.name}: {exc.strerror}"
                ) from exc
    return values


@dataclass(frozen=True)
class ArtifactInfo:
    """One artifact found under a prefix."""

    uri: str
    kind: str
    digest: str
    created_at: str
    files: int


S3_BACKOFF_S = 0.5
S3_BACKOFF_MAX_S = 10.0


def _http_client(config: S3Config) -> Any:
    """minio's own pool settings (5 min timeouts, certifi or ``SSL_CERT_FILE``), with the
    longer retry policy above and ``config.ca_bundle``."""
    import certifi
    import urllib3

    retries = urllib3.Retry(total=config.retries, connect=config.retries,
                            read=min(3, config.retries), backoff_factor=S3_BACKOFF_S,
                            backoff_max=S3_BACKOFF_MAX_S, status_forcelist=(500, 502, 503, 504),
                            allowed_methods=None, raise_on_status=False)
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=300, read=300), maxsize=10,
        cert_reqs="CERT_REQUIRED" if config.cert_check else "CERT_NONE",
        ca_certs=config.ca_bundle or os.environ.get("SSL_CERT_FILE") or certifi.where(), retries=retries)


class ArtifactStore:
    """Artifacts, encoders and small JSON records in an S3 bucket (MinIO).

    Args:
        config: Connection settings (see :class:`S3Config`).

    Example:
        >>> store = ArtifactStore(S3Config.from_env())
        >>> store.upload_artifact("runs/demo/model", "s3://labelmatch/models/demo")
        >>> store.download_artifact("s3://labelmatch/models/demo", "/tmp/model", kind="Model")
    """

    def __init__(self, config: S3Config):
        from minio import Minio

        self.config = config
        self._client = Minio(
            config.endpoint,
            access_key=config.access_key,
            secret_key=config.secret_key,
            session_token=config.session_token,
            secure=config.secure,
            region=config.region,
            cert_check=config.cert_check,
            http_client=_http_client(config),
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ArtifactStore:
        """A store configured from the environment (see the module docstring)."""
        return cls(S3Config.from_env(env))

    def __repr__(self) -> str:
        scheme = "https" if self.config.secure else "http"
        return f"ArtifactStore({scheme}://{self.config.endpoint})"

    def _redact(self, text: str) -> str:
        for secret in self.config.secrets():
            text = text.replace(secret, "***")
        return text

    def _error(self, uri: str, what: str, exc: Exception) -> ArtifactError:
        """An :class:`ArtifactError` for a failed S3 call; the cause is dropped, its text redacted."""
        from minio.error import S3Error

        detail = f"{exc.code}: {exc.message}" if isinstance(exc, S3Error) else f"{type(exc).__name__}: {exc}"
        return ArtifactError(self._redact(f"{uri}: {what} failed ({detail})"))

    # -- objects ---------------------------------------------------------------------------
    def get_bytes(self, uri: str | S3Uri) -> bytes | None:
        """The object's content, or None when it does not exist."""
        from minio.error import S3Error

        loc = S3Uri.parse(uri) if isinstance(uri, str) else uri
        response = None
        try:
            response = self._client.get_object(loc.bucket, loc.prefix)
            return response.read()
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket"):
                return None
            raise self._error(str(loc), "download", exc) from None
        except Exception as exc:  # connection errors carry no S3 code
            raise self._error(str(loc), "download", exc) from None
        finally:
            if response is not None:
                response.close()
                response.release_conn()

    def exists(self, uri: str | S3Uri) -> bool:
        """Whether an object exists at ``uri``."""
        from minio.error import S3Error

        loc = S3Uri.parse(uri) if isinstance(uri, str) else uri
        try:
            self._client.stat_object(loc.bucket, loc.prefix)
            return True
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket", "NotFound", "ResourceNotFound"):
                return False
            raise self._error(str(loc), "stat", exc) from None
        except Exception as exc:
            raise self._error(str(loc), "stat", exc) from None

    def put_bytes(
        self, uri: str | S3Uri, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        """Write one object (creating the bucket if needed)."""
        loc = S3Uri.parse(uri) if isinstance(uri, str) else uri
        self._ensure_bucket(loc)
        try:
            self._client.put_object(
                loc.bucket, loc.prefix, io.BytesIO(data), len(data), content_type=content_type
            )
        except Exception as exc:
            raise self._error(str(loc), "upload", exc) from None

    def list_keys(self, uri: str | S3Uri) -> Iterator[str]:
        """Object keys under ``uri`` treated as a folder (``prefix/``), recursively, sorted."""
        from minio.error import S3Error

        loc = S3Uri.parse(uri) if isinstance(uri, str) else uri
        folder = f"{loc.prefix}/" if loc.prefix else ""
        try:
            keys = [
                obj.object_name
                for obj in self._client.list_objects(loc.bucket, prefix=folder, recursive=True)
            ]
        except S3Error as exc:
            if exc.code == "NoSuchBucket":
                return iter(())
            raise self._error(str(loc), "list", exc) from None
        except Exception as exc:
            raise self._error(str(loc), "list", exc) from None
        return iter(sorted(keys))

    def _ensure_bucket(self, loc: S3Uri) -> None:
        try:
            if not self._client.bucket_exists(loc.bucket):
                self._client.make_bucket(loc.bucket, location=self.config.region or "us-east-1")
        except Exception as exc:
            raise self._error(f"s3://{loc.bucket}", "bucket check/create", exc) from None

    # -- artifacts -------------------------------------------------------------------------
    def remote_manifest(self, uri: str) -> dict[str, Any] | None:
        """The parsed ``manifest.json`` at ``uri``, or None when there is no (complete) artifact."""
        data = self.get_bytes(S3Uri.parse(uri).child(MANIFEST))
        if data is None:
            return None
        try:
            manifest = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{uri}: {MANIFEST} is not valid JSON ({exc})") from None
        for key in ("schema_version", "kind", "files"):
            if key not in manifest:
                raise ArtifactError(f"{uri}: {MANIFEST} lacks field '{key}'")
        return manifest

    def require_manifest(self, uri: str, kind: str | tuple[str, ...] | None = None) -> dict[str, Any]:
        """Like :meth:`remote_manifest` but an absent artifact or a wrong kind is an error."""
        manifest = self.remote_manifest(uri)
        if manifest is None:
            raise ArtifactError(f"{uri}: no {MANIFEST} (not an artifact, or an upload that did not finish)")
        kinds = (kind,) if isinstance(kind, str) else kind
        if kinds and manifest["kind"] not in kinds:
            raise ArtifactError(
                f"{uri}: kind is {manifest['kind']!r}, expected {' or '.join(map(repr, kinds))}"
            )
        return manifest

    def remote_digest(self, uri: str) -> str:
        """The digest (:func:`labelmatch.core.artifacts.artifact_digest`) of the artifact at ``uri``."""
        return manifest_digest(self.require_manifest(uri))

    def upload_artifact(
        self, local_dir: str | Path, uri: str, kind: str | tuple[str, ...] | None = None
    ) -> str:
        """Upload a verified artifact directory to ``uri``, ``manifest.json`` last.

        Args:
            local_dir: The artifact directory (verified before anything is sent).
            uri: ``s3://bucket/prefix`` of the artifact.
            kind: Expected kind(s), or None for any.

        Returns:
            The artifact digest.

        Raises:
            ArtifactError: The local artifact fails verification, or ``uri`` already holds a
                different artifact (artifacts are immutable; upload to a new prefix).
        """
        from tqdm.auto import tqdm

        local_dir = Path(local_dir)
        manifest = verify_artifact(local_dir, kind)
        digest = manifest_digest(manifest)
        existing = self.remote_manifest(uri)
        if existing is not None:
            if manifest_digest(existing) == digest:
                log.info("%s already holds this artifact (digest %s); nothing to upload", uri, digest[:12])
                return digest
            raise ArtifactError(
                f"{uri}: already holds a different artifact (digest {manifest_digest(existing)[:12]}…); "
                "artifacts are immutable, upload to a new prefix"
            )
        loc = S3Uri.parse(uri)
        self._ensure_bucket(loc)
        for name in tqdm(sorted(manifest["files"]), desc=f"upload {uri}", unit="file", leave=False):
            target = loc.child(name)
            try:
                self._client.fput_object(target.bucket, target.prefix, str(local_dir / name))
            except Exception as exc:
                raise self._error(str(target), "upload", exc) from None
        # The commit point: readers see the artifact only once its manifest is there.
        self.put_bytes(loc.child(MANIFEST), (local_dir / MANIFEST).read_bytes(), "application/json")
        log.info("uploaded %s (%d files, digest %s)", uri, len(manifest["files"]), digest[:12])
        return digest

    def read_members(self, uri: str, names: list[str],
                     kind: str | tuple[str, ...] | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
        """Read a few files of the artifact at ``uri``, each checked against its manifest's sha256,
        without downloading the rest (a bge-m3 OnnxModel is 5 GB; its labels a few KB).

        Returns:
            ``(manifest, {name: content})``.

        Raises:
            ArtifactError: No manifest, wrong kind, a name the manifest does not list, a missing
                object or a digest mismatch; the message names the URI and file.
        """
        manifest = self.require_manifest(uri, kind)
        loc = S3Uri.parse(uri)
        contents = {}
        for name in names:
            expected = manifest["files"].get(name)
            if expected is None:
                raise ArtifactError(f"{uri}: {MANIFEST} lists no file {name}")
            data = self.get_bytes(loc.child(name))
            if data is None:
                raise ArtifactError(f"{uri}: file {name} listed in {MANIFEST} is missing")
            if hashlib.sha256(data).hexdigest() != expected:
                raise ArtifactError(f"{uri}: file {name} is corrupted (its sha256 differs from {MANIFEST})")
            contents[name] = data
        return manifest, contents

    def download_artifact(
        self, uri: str, dest: str | Path, kind: str | tuple[str, ...] | None = None
    ) -> dict[str, Any]:
        """Download the artifact at ``uri`` into ``dest`` (replaced atomically) and verify it.

        Only the files listed in the manifest are fetched; every one is checked against its
        sha256 by :func:`labelmatch.core.artifacts.verify_artifact` before ``dest`` appears.

        Returns:
            The verified manifest.

        Raises:
            ArtifactError: No manifest (absent or unfinished upload), wrong kind, a listed
                object missing, or a digest mismatch; the message names the URI and file.
        """
        from minio.error import S3Error
        from tqdm.auto import tqdm

        manifest = self.require_manifest(uri, kind)
        loc = S3Uri.parse(uri)
        with atomic_artifact_dir(dest) as tmp:
            for name in tqdm(sorted(manifest["files"]), desc=f"download {uri}", unit="file", leave=False):
                target = member_path(tmp, name, where=uri)
                source = loc.child(name)
                try:
                    self._client.fget_object(source.bucket, source.prefix, str(target))
                except S3Error as exc:
                    if exc.code == "NoSuchKey":
                        raise ArtifactError(f"{uri}: file {name} listed in {MANIFEST} is missing") from None
                    raise self._error(str(source), "download", exc) from None
                except Exception as exc:
                    raise self._error(str(source), "download", exc) from None
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            try:
                verified = verify_artifact(tmp, kind)
            except ArtifactError as exc:
                raise ArtifactError(str(exc).replace(f"artifact {tmp}", uri)) from None
        log.info("downloaded %s to %s (digest %s)", uri, dest, manifest_digest(manifest)[:12])
        return verified

    def verify_remote(self, uri: str, kind: str | tuple[str, ...] | None = None) -> str:
        """Check every object of the artifact at ``uri`` against its manifest (streamed, no disk).

        Returns:
            The artifact digest.
        """
        import hashlib

        from minio.error import S3Error

        manifest = self.require_manifest(uri, kind)
        loc = S3Uri.parse(uri)
        for name, expected in sorted(manifest["files"].items()):
            source = loc.child(name)
            digest = hashlib.sha256()
            response = None
            try:
                response = self._client.get_object(source.bucket, source.prefix)
                for block in response.stream(1 << 20):
                    digest.update(block)
            except S3Error as exc:
                if exc.code == "NoSuchKey":
                    raise ArtifactError(f"{uri}: file {name} listed in {MANIFEST} is missing") from None
                raise self._error(str(source), "download", exc) from None
            finally:
                if response is not None:
                    response.close()
                    response.release_conn()
            if digest.hexdigest() != expected:
                raise ArtifactError(
                    f"{uri}: file {name} is corrupted "
                    f"(sha256 {digest.hexdigest()[:12]}… != manifest {expected[:12]}…)"
                )
        return manifest_digest(manifest)

    def upload_tree(self, source: str | Path, uri: str) -> list[str]:
        """Upload a file, or every file under a directory, to ``uri`` (plain objects, no manifest).

        For inputs such as raw ``docs.jsonl`` + ``labels.json`` that a pipeline reads by
        ``data_uri``; artifacts go through :meth:`upload_artifact`. ``uri`` is a prefix: a file
        lands at ``<uri>/<its name>``, a directory's files at ``<uri>/<relative path>``.

        Returns:
            The object URIs written.
        """
        source = Path(source)
        loc = S3Uri.parse(uri)
        if source.is_file():
            pairs = [(source, loc.child(source.name))]
        elif source.is_dir():
            pairs = [(path, loc.child(path.relative_to(source).as_posix()))
                     for path in sorted(source.rglob("*")) if path.is_file()]
        else:
            raise DataError(source, "file not found")
        self._ensure_bucket(loc)
        for path, target in pairs:
            try:
                self._client.fput_object(target.bucket, target.prefix, str(path))
            except Exception as exc:
                raise self._error(str(target), "upload", exc) from None
        return [str(target) for _, target in pairs]

    def download_tree(self, uri: str, dest: str | Path) -> Path:
        """Download the object at ``uri``, or every object under it, into ``dest``.

        For plain inputs (a ``docs.jsonl`` a user uploaded, a folder of them), not artifacts:
        nothing is verified beyond what the S3 API guarantees; use :meth:`download_artifact`
        for anything with a manifest.

        Args:
            uri: ``s3://bucket/key`` of one object, or ``s3://bucket/prefix`` of a folder.
            dest: A directory to create; the object keeps its file name inside it, a folder
                its relative layout.

        Returns:
            The local path that stands for ``uri``: the file, or ``dest`` for a folder.

        Raises:
            DataError: Nothing exists at ``uri`` (no object and nothing under the prefix).
        """
        from minio.error import S3Error

        loc = S3Uri.parse(uri)
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        if loc.prefix and self.exists(loc):
            pairs = [(loc, dest / PurePosixPath(loc.prefix).name)]
            result = pairs[0][1]
        else:
            folder = f"{loc.prefix}/" if loc.prefix else ""
            keys = list(self.list_keys(loc))
            pairs = [
                (S3Uri(loc.bucket, key), member_path(dest, key[len(folder) :], uri, "the object listing"))
                for key in keys
            ]
            result = dest
        if not pairs:
            raise DataError(
                str(loc), "not found in the object store (no object, and nothing under that prefix)"
            )
        for source, target in pairs:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._client.fget_object(source.bucket, source.prefix, str(target))
            except S3Error as exc:
                raise self._error(str(source), "download", exc) from None
            except Exception as exc:
                raise self._error(str(source), "download", exc) from None
        return result

    def list_artifacts(self, uri: str) -> list[ArtifactInfo]:
        """Every complete artifact (one with a manifest) under ``uri``, sorted by URI."""
        loc = S3Uri.parse(uri)
        found = []
        for key in self.list_keys(loc):
            if PurePosixPath(key).name != MANIFEST:
                continue
            artifact_uri = str(S3Uri(loc.bucket, str(PurePosixPath(key).parent)))
            manifest = self.remote_manifest(artifact_uri)
            if manifest is not None:
                found.append(
                    ArtifactInfo(
                        uri=artifact_uri,
                        kind=manifest["kind"],
                        digest=manifest_digest(manifest),
                        created_at=manifest.get("created_at", ""),
                        files=len(manifest["files"]),
                    )
                )
        return found

    # -- base-encoder registry -------------------------------------------------------------
    def push_encoder(self, model_dir: str | Path, uri: str) -> str:
        """Mirror a local Hugging Face model directory (e.g. bge-m3) as an ``Encoder`` artifact.

        The directory itself is left untouched: the manifest is written in a staging directory
        of symbolic links to its files.

        Returns:
            The artifact digest.
        """
        model_dir = Path(model_dir).resolve()
        if not (model_dir / "config.json").is_file():
            raise ArtifactError(f"encoder {model_dir}: no config.json (not a Hugging Face model directory)")
        with tempfile.TemporaryDirectory(prefix="labelmatch-encoder-") as staging:
            for path in sorted(model_dir.rglob("*")):
                relative = path.relative_to(model_dir)
                if path.is_file() and relative.parts[0] != ".cache" and path.name != MANIFEST:
                    link = Path(staging) / relative
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(path)
            write_manifest(staging, "Encoder", lineage={"source": model_dir.name})
            return self.upload_artifact(staging, uri, kind="Encoder")

    def resolve_encoder(self, uri: str, cache_dir: str | Path | None = None) -> Path:
        """A local directory holding the verified ``Encoder`` artifact at ``uri``.

        Downloads once into ``<cache>/encoders/<digest>`` (``$LABELMATCH_CACHE_DIR`` or
        ``~/.cache/labelmatch``); a cached copy is re-verified before it is used.
        """
        digest = manifest_digest(self.require_manifest(uri, "Encoder"))
        root = Path(cache_dir or os.environ.get(CACHE_DIR_VAR) or Path.home() / ".cache" / "labelmatch")
        target = root / "encoders" / digest
        if target.is_dir():
            try:
                verify_artifact(target, "Encoder")
                return target
            except ArtifactError as exc:
                log.warning("cached encoder %s failed verification (%s); downloading again", target, exc)
        self.download_artifact(uri, target, kind="Encoder")
        return target



def is_s3_uri(uri: str | Path | None) -> bool:
    """True for ``s3://`` URIs (and KFP's ``minio://`` form of the same objects)."""
    return str(uri or "").startswith(("s3://", "minio://"))


def as_s3_uri(uri: str) -> str:
    """A KFP ``minio://bucket/key`` artifact URI as the ``s3://`` URI of the same object."""
    return "s3://" + uri.removeprefix("minio://") if uri.startswith("minio://") else uri


@contextlib.contextmanager
def local_input(uri: str | Path | None, store: ArtifactStore | None = None) -> Iterator[Path | None]:
    """A local path standing for ``uri`` for as long as the ``with`` block runs.

    A local path is yielded as it is; an ``s3://`` object or prefix is downloaded into a
    temporary directory (:meth:`ArtifactStore.download_tree`), removed afterwards. A
    :class:`~labelmatch.core.errors.DataError` raised in the block names the URI (``s3://…/docs.jsonl:12``),
    not the temporary copy.

    Args:
        uri: A local path, ``s3://bucket/key`` or ``s3://bucket/prefix``; ``None`` yields ``None``.
        store: The store to read from (default: configured from the environment).
    """
    if uri is None or str(uri) == "":
        yield None
        return
    if not is_s3_uri(uri):
        yield Path(uri)
        return
    remote = as_s3_uri(str(uri)).rstrip("/")
    with tempfile.TemporaryDirectory(prefix="labelmatch-input-") as staging:
        local = (store or ArtifactStore.from_env()).download_tree(remote, Path(staging) / "input")
        try:
            yield local
        except DataError as exc:
            if not exc.path.startswith(str(local)):
                raise
            raise DataError(remote + exc.path[len(str(local)):], exc.message, exc.line, exc.field) from None


@contextlib.contextmanager
def local_artifact(
    uri: str | Path, kind: str | tuple[str, ...] | None = None, store: ArtifactStore | None = None
) -> Iterator[Path]:
    """A verified local directory of the artifact at ``uri`` for the ``with`` block.

    A local path is verified in place; an ``s3://`` (or KFP ``minio://``) URI is downloaded into
    a temporary directory (:meth:`ArtifactStore.download_artifact`, every file verified), removed
    afterwards.
    """
    if not is_s3_uri(uri):
        verify_artifact(uri, kind)
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="labelmatch-artifact-") as staging:
        local = Path(staging) / "artifact"
        (store or ArtifactStore.from_env()).download_artifact(as_s3_uri(str(uri)), local, kind)
        yield local
