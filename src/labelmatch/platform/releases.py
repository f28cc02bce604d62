"""Release records: an append-only log of what each service was deployed with.

Every deploy writes one JSON object to
``<root>/releases/<service>/<YYYYmmddTHHMMSSffffffZ>-<release id>.json``; records are never
rewritten or deleted, and the time-stamped key sorts them in deploy order. A record is the
whole served state: the model artifact (URI *and* digest), the serve image and the image digest its
pods ran, the engine, label-set version and thresholds the server reported, the predictor's args,
resources and replicas, and the pipeline version and run that deployed it, so a rollback can put
all of it back (see :mod:`labelmatch.platform.rollback`).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from labelmatch.core.errors import ArtifactError, ConfigError, DataError
from labelmatch.platform.artifact_store import ArtifactStore, S3Uri

_SERVICE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
#: Record fields that are not strings, and what they may hold.
_FIELD_TYPES: dict[str, Any] = {"label_set_version": (int, type(None)), "thresholds": dict, "predictor": dict,
                                "delivery": dict}
#: How a release reached its traffic (``labelmatch deploy --strategy``).
STRATEGIES = ("replace", "canary", "shadow")
_TYPE_NAMES: dict[Any, str] = {str: "a string", dict: "an object", (int, type(None)): "an integer or null"}


@dataclass(frozen=True)
class ReleaseRecord:
    """One deploy of a service.

    Args:
        release_id: Short random id, unique per deploy.
        service: InferenceService name.
        namespace: Its Kubernetes namespace.
        model_uri: ``s3://`` URI of the deployed model artifact.
        model_digest: The artifact digest of that model (``manifest_digest``).
        pipeline_version: KFP pipeline version (= package version) whose deploy step ran.
        run_id: KFP run id ("" when deployed from the command line).
        time: UTC time of the deploy, ISO 8601.
        image: Predictor container image.
        target: Where it was deployed: ``kserve`` (an InferenceService) or ``local`` (the model
            server on the deploying machine); a rollback deploys to the same kind of target.
        image_id: The image digest (``repo@sha256:…``) the predictor pods ran ("" when unknown).
        engine: The engine the model server reported serving ("" when not asked).
        label_set_version: The label-set version it reported (0: the model's own; ``None``: not
            asked, or a record older than this field).
        thresholds: The thresholds it reported (``{"default": t, "labels": {...}}``).
        predictor: The predictor settings that matter (:func:`labelmatch.platform.kserve.predictor_settings`:
            ``args``, ``resources``, ``minReplicas``, ``maxReplicas``).
        strategy: How it reached its traffic: ``replace`` (all at once; records older than this
            field), ``canary`` (a share first, then promoted or rolled back on live signals) or
            ``shadow`` (a copy of live traffic only; it never served an answer).
        delivery: For ``canary`` and ``shadow``: the decision and its evidence
            (:class:`labelmatch.delivery.canary.CanaryDecision` as JSON: ``decision`` ``promoted`` or
            ``rolled_back``, the rules, each rule's verdict and the signals it read, the window,
            the traffic share); ``{}`` for ``replace``.
    """

    release_id: str
    service: str
    namespace: str
    model_uri: str
    model_digest: str
    pipeline_version: str
    run_id: str
    time: str
    image: str = ""
    target: str = "kserve"
    image_id: str = ""
    engine: str = ""
    label_set_version: int | None = None
    thresholds: dict[str, Any] = field(default_factory=dict)
    predictor: dict[str, Any] = field(default_factory=dict)
    strategy: str = "replace"
    delivery: dict[str, Any] = field(default_factory=dict)

    @property
    def serving(self) -> bool:
        """Whether this release took over the service's traffic: ``False`` for a canary that was
        rolled back and for a shadow, which never answered a request."""
        if self.strategy == "shadow":
            return False
        return not (self.strategy == "canary" and self.delivery.get("decision") != "promoted")

    @classmethod
    def new(cls, **values: Any) -> ReleaseRecord:
        """A record with a fresh ``release_id`` and the current time."""
        stamp = time.time()
        values.setdefault("release_id", uuid.uuid4().hex[:12])
        values.setdefault(
            "time", time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp)) + f".{int(stamp % 1 * 1e6):06d}Z"
        )
        return cls(**values)

    @classmethod
    def from_dict(cls, data: Any, source: str) -> ReleaseRecord:
        """Parse a record; a missing field or one of the wrong type is a :class:`DataError` naming
        ``source`` (fields added later take their defaults in older records)."""
        if not isinstance(data, dict):
            raise DataError(source, "expected a JSON object")
        values = {}
        for spec in fields(cls):
            if spec.name in data:
                value = data[spec.name]
            elif spec.default is not MISSING:
                value = spec.default
            elif spec.default_factory is not MISSING:
                value = spec.default_factory()
            else:
                raise DataError(source, "missing", field=spec.name)
            wanted = _FIELD_TYPES.get(spec.name, str)
            if not isinstance(value, wanted) or isinstance(value, bool):
                raise DataError(source, f"expected {_TYPE_NAMES[wanted]}, got {type(value).__name__}",
                                field=spec.name)
            values[spec.name] = value
        if values["strategy"] not in STRATEGIES:
            raise DataError(source, f"expected one of {', '.join(STRATEGIES)}, got {values['strategy']!r}",
                            field="strategy")
        return cls(**values)

    @property
    def key_name(self) -> str:
        """The object name: time stamp (sortable) and release id."""
        compact = self.time.replace("-", "").replace(":", "").replace(".", "")
        return f"{compact}-{self.release_id}.json"


class ReleaseLog:
    """The release records of every service under ``<root>/releases/``.

    Args:
        store: The artifact store.
        root: ``s3://bucket/prefix`` of the labelmatch store (releases live under ``releases/``).
    """

    def __init__(self, store: ArtifactStore, root: str):
        self.store = store
        self.root = S3Uri.parse(root)

    def _folder(self, service: str) -> S3Uri:
        if not _SERVICE_NAME.match(service):
            raise ConfigError(
                f"service name {service!r}: expected a Kubernetes name (lower-case, digits, '-')"
            )
        return self.root.child(f"releases/{service}")

    def append(self, record: ReleaseRecord) -> str:
        """Write ``record`` as a new object and return its URI; an existing key is never overwritten."""
        target = self._folder(record.service).child(record.key_name)
        if self.store.exists(target):
            raise ArtifactError(f"{target}: release record exists already; records are append-only")
        self.store.put_bytes(
            target, (json.dumps(asdict(record), indent=2) + "\n").encode(), "application/json"
        )
        return str(target)

    def list(self, service: str) -> list[ReleaseRecord]:
        """The service's records, oldest first."""
        folder = self._folder(service)
        records = []
        for key in self.store.list_keys(folder):
            uri = S3Uri(folder.bucket, key)
            data = self.store.get_bytes(uri)
            if data is None:
                continue
            try:
                parsed = json.loads(data)
            except json.JSONDecodeError as exc:
                raise DataError(str(uri), f"not valid JSON ({exc.msg})", line=exc.lineno) from None
            records.append(ReleaseRecord.from_dict(parsed, str(uri)))
        return sorted(records, key=lambda record: (record.time, record.release_id))

    def latest_serving(self, service: str) -> ReleaseRecord | None:
        """The newest release that took over the service's traffic (a rolled-back canary or a
        shadow is passed over: the release before it still serves); ``None`` when there is none."""
        serving = [record for record in self.list(service) if record.serving]
        return serving[-1] if serving else None

    def find(self, service: str, ref: str) -> ReleaseRecord:
        """The release ``ref`` names: a release id, a record's object name, or a pipeline version.

        A pipeline version selects the latest release deployed by that version that served (a
        rolled-back canary or a shadow is no release to go back to).

        Raises:
            ConfigError: Nothing matches, listing what exists.
        """
        records = self.list(service)
        for record in records:
            if ref in (record.release_id, record.key_name, record.key_name.removesuffix(".json")):
                return record
        by_version = [record for record in records if record.pipeline_version == ref and record.serving]
        if by_version:
            return by_version[-1]
        known = ", ".join(f"{r.release_id} ({r.pipeline_version}, {r.time})" for r in records[-10:]) or "none"
        raise ConfigError(
            f"service {service!r}: no release or pipeline version {ref!r}; recent releases: {known}"
        )
