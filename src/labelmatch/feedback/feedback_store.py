"""The feedback store: what users said about served predictions, kept for the next GRPO run.

One record per rated prediction: id, time, model version, document text (PII-redacted before
storage when a redactor is set), the served prediction (labels and scores), a score 1–5,
optional corrected labels and a source. The store is any SQLAlchemy URL: an embedded SQLite
file by default (``sqlite:///feedback.db``), PostgreSQL in production
(``postgresql+psycopg://user@host/db``).

Validation (the same for :meth:`FeedbackStore.add` and :meth:`FeedbackStore.import_file`):

* ``score`` must be an integer 1–5, ``text`` non-empty, ``id`` unique (in the store and in the file);
* feedback on a served prediction (``prediction_id``) is kept **once per prediction and principal**:
  :meth:`FeedbackStore.upsert` derives the record id from both, so a repeat updates the record
  (score, corrected labels, time) instead of adding one;
* once at least one model version is registered (:meth:`FeedbackStore.register_model`), a record's
  ``model_version`` must be one of them and its predicted/corrected labels and score keys must be
  labels of that version. An empty registry accepts any version and label (an open store for
  quick starts; ``labelmatch feedback register`` closes it).

Import policy (chosen and documented): **good lines are stored, bad lines are reported**. An
import returns an :class:`ImportReport` listing every failed line with its field and reason; the
lines that passed are committed in one transaction, so a bad line never costs the good ones and
a crash never stores half a file.

Schema migrations are explicit: :data:`MIGRATIONS` is an ordered list of SQL scripts; the
``schema_version`` table records the last one applied and opening a store applies the missing
ones in order, inside one transaction (:mod:`labelmatch.state.migrations`, safe when several
replicas open one PostgreSQL database at once). A database newer than this code is refused.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from labelmatch.core.artifacts import atomic_artifact_dir, verify_artifact, write_json, write_manifest
from labelmatch.core.errors import ConfigError, DataError
from labelmatch.core.inputs import SNIFF_BYTES, parse_record, refuse_binary, split_records
from labelmatch.state.migrations import migrate, schema_version

FEEDBACK_FILE = "feedback.jsonl"
LABELS_FILE = "labels.json"
#: How feedback given on earlier model versions enters an export (see :meth:`FeedbackStore.export`).
PreviousPolicy = Literal["keep", "reweight", "filter"]
#: ``redact(text) -> (redacted_text, found_pii_types)``; the signature of ``labelmatch.data.pii.redact_text``.
Redactor = Callable[[str], tuple[str, list[str]]]

#: Ordered schema migrations; entry ``i`` brings the schema from version ``i`` to ``i + 1``.
#: Portable SQL (SQLite and PostgreSQL); JSON values are stored as TEXT, times as ISO-8601 UTC.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE model_versions (
            version VARCHAR(200) PRIMARY KEY,
            labels TEXT NOT NULL,
            registered_at VARCHAR(32) NOT NULL)""",
        """CREATE TABLE feedback (
            id VARCHAR(200) PRIMARY KEY,
            time VARCHAR(32) NOT NULL,
            model_version VARCHAR(200) NOT NULL,
            text TEXT NOT NULL,
            predicted_labels TEXT NOT NULL,
            scores TEXT NOT NULL,
            score INTEGER NOT NULL,
            corrected_labels TEXT,
            source VARCHAR(200) NOT NULL,
            pii_types TEXT NOT NULL)""",
        "CREATE INDEX ix_feedback_model_version ON feedback (model_version)",
    ],
    [
        # Who gave the feedback (the authenticated principal; "" for imports and older records),
        # and the served prediction it rates (NULL for feedback by text).
        "ALTER TABLE feedback ADD COLUMN principal VARCHAR(200) NOT NULL DEFAULT ''",
        "ALTER TABLE feedback ADD COLUMN prediction_id VARCHAR(200)",
        "CREATE INDEX ix_feedback_principal ON feedback (principal)",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass
class FeedbackRecord:
    """One piece of feedback on a served prediction.

    Attributes:
        text: The document text (redacted before storage when the store has a redactor).
        model_version: Version of the model that served the prediction.
        predicted_labels: The labels that were served.
        score: The user's rating of the served labels, an integer 1 (wrong) to 5 (right).
        scores: The served ``{label: probability}`` (may be empty).
        corrected_labels: The labels the user says are right, or ``None``.
        source: Where the feedback came from (``serve``, ``import``, ``cli``, ...).
        id: Unique id; generated when ``None``.
        time: ISO-8601 UTC time; now when ``None``.
        pii_types: PII types the redactor found in the text (filled by the store).
        principal: Who gave it (the authenticated caller; "" when unknown, e.g. imports).
        prediction_id: The served prediction it rates (``None``: feedback by text).
    """

    text: str
    model_version: str
    predicted_labels: list[str]
    score: int
    scores: dict[str, float] = field(default_factory=dict)
    corrected_labels: list[str] | None = None
    source: str = "api"
    id: str | None = None
    time: str | None = None
    pii_types: list[str] = field(default_factory=list)
    principal: str = ""
    prediction_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON form (one line of ``feedback.jsonl``)."""
        return asdict(self)


@dataclass
class LineError:
    """Why one line of an import was refused."""

    line: int
    field: str | None
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: " + (f"field '{self.field}': " if self.field else "") + self.message


@dataclass
class ImportReport:
    """Outcome of :meth:`FeedbackStore.import_file`.

    Attributes:
        path: The imported file.
        stored: Ids of the records stored.
        failed: One :class:`LineError` per refused line (nothing of those lines is stored).
    """

    path: str
    stored: list[str] = field(default_factory=list)
    failed: list[LineError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every line was stored."""
        return not self.failed

    def summary(self) -> str:
        """One line for humans."""
        return f"{self.path}: stored {len(self.stored)} record(s), refused {len(self.failed)} line(s)"


@dataclass
class ExportedFeedback:
    """A FeedbackExport artifact read back: the records, their training weights and the labels."""

    records: list[FeedbackRecord]
    weights: list[float]
    labels: dict[str, str] | None
    manifest: dict[str, Any]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _str_list(value: Any, name: str, where: str, line: int | None) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) and x.strip() for x in value):
        raise DataError(where, "expected a list of label names", line=line, field=name)
    return list(dict.fromkeys(value))


def record_from_json(
    obj: dict[str, Any], where: str = "<feedback>", line: int | None = None
) -> FeedbackRecord:
    """Parse and check the shape of one feedback object (store-level checks come later).

    Raises:
        DataError: naming ``where``, ``line`` and the field at fault.
    """
    for key in ("text", "model_version", "predicted_labels", "score"):
        if key not in obj:
            raise DataError(where, "missing", line=line, field=key)
    score = obj["score"]
    if isinstance(score, bool) or not isinstance(score, int | float) or float(score) != int(score):
        raise DataError(where, f"expected an integer 1-5, got {score!r}", line=line, field="score")
    scores = obj.get("scores") or {}
    if not isinstance(scores, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in scores.values()
    ):
        raise DataError(where, "expected an object {label: probability in [0, 1]}", line=line, field="scores")
    for key in ("text", "model_version", "source", "id", "time", "principal", "prediction_id"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise DataError(where, f"expected a string, got {type(obj[key]).__name__}", line=line, field=key)
    corrected = obj.get("corrected_labels")
    return FeedbackRecord(
        text=obj["text"],
        model_version=obj["model_version"],
        predicted_labels=_str_list(obj["predicted_labels"], "predicted_labels", where, line),
        score=int(score),
        scores={str(k): float(v) for k, v in scores.items()},
        corrected_labels=None if corrected is None else _str_list(corrected, "corrected_labels", where, line),
        source=obj.get("source") or "import",
        id=obj.get("id"),
        time=obj.get("time"),
        pii_types=list(obj.get("pii_types") or []),
        principal=obj.get("principal") or "",
        prediction_id=obj.get("prediction_id"),
    )


def feedback_id(prediction_id: str, principal: str) -> str:
    """The record id of a principal's feedback on a served prediction (one record per pair)."""
    import hashlib

    return hashlib.sha256(f"{prediction_id}\0{principal}".encode()).hexdigest()[:32]


class FeedbackStore:
    """Feedback records in a SQL database (SQLAlchemy).

    Args:
        url: SQLAlchemy database URL; the default is a SQLite file in the working directory.
        redact: A redactor ``text -> (redacted, pii_types)``, or ``True`` for
            :func:`labelmatch.data.pii.redact_text`. When set, every text is redacted before storage
            and the PII types found are kept with the record.

    Example::

        store = FeedbackStore("sqlite:///feedback.db")
        store.register_model("v3", labels)
        store.add(FeedbackRecord("VAT refund late", "v3", ["vat"], score=4))
        store.export("runs/feedback", current_version="v3", previous="reweight")
    """

    def __init__(self, url: str = "sqlite:///feedback.db", redact: Redactor | bool | None = None):
        from sqlalchemy import create_engine

        if redact is True:
            from labelmatch.data.pii import redact_text

            redact = redact_text
        self.url = url
        self.redact: Redactor | None = redact or None
        self.engine = create_engine(url, future=True)
        self.migrate()

    # -- schema ---------------------------------------------------------------------------
    def schema_version(self) -> int:
        """The schema version of the database (0 for an empty database)."""
        with self.engine.connect() as conn:
            return schema_version(conn, "schema_version")

    def migrate(self) -> int:
        """Apply the missing :data:`MIGRATIONS` in order (one transaction); return the version."""
        return migrate(self.engine, "schema_version", MIGRATIONS, f"feedback store {self.url}")

    # -- model versions -------------------------------------------------------------------
    def register_model(self, version: str, labels: dict[str, str]) -> None:
        """Declare a model version and its labels (re-registering replaces the labels)."""
        from sqlalchemy import text

        if not version.strip() or not labels:
            raise ConfigError("register_model needs a non-empty version and at least one label")
        with self.engine.begin() as conn:
            conn.execute(text("DELETE FROM model_versions WHERE version = :v"), {"v": version})
            conn.execute(
                text("INSERT INTO model_versions (version, labels, registered_at) VALUES (:v, :l, :t)"),
                {"v": version, "l": json.dumps(labels), "t": _now()},
            )

    def model_versions(self) -> dict[str, dict[str, str]]:
        """``{version: labels}`` of the registered versions, oldest first."""
        from sqlalchemy import text

        with self.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT version, labels FROM model_versions ORDER BY registered_at, version")
            )
            return {version: json.loads(labels) for version, labels in rows}

    # -- writing --------------------------------------------------------------------------
    def _check(
        self,
        record: FeedbackRecord,
        versions: dict[str, dict[str, str]],
        taken: set[str],
        where: str,
        line: int | None,
    ) -> FeedbackRecord:
        """Store-level validation; fills id/time and redacts. Raises DataError naming the field."""
        if isinstance(record.score, bool) or not isinstance(record.score, int) or not 1 <= record.score <= 5:
            raise DataError(where, f"score {record.score} is outside 1-5", line=line, field="score")
        if not isinstance(record.text, str) or not record.text.strip():
            raise DataError(where, "is empty", line=line, field="text")
        if not record.model_version or not record.model_version.strip():
            raise DataError(where, "is empty", line=line, field="model_version")
        if versions:
            if record.model_version not in versions:
                raise DataError(
                    where,
                    f"unknown model version {record.model_version!r} (registered: {', '.join(versions)})",
                    line=line,
                    field="model_version",
                )
            known = versions[record.model_version]
            checks = (
                ("predicted_labels", record.predicted_labels),
                ("corrected_labels", record.corrected_labels or []),
                ("scores", list(record.scores)),
            )
            for name, values in checks:
                for label in values:
                    if label not in known:
                        raise DataError(
                            where,
                            f"unknown label {label!r} for model version {record.model_version!r}",
                            line=line,
                            field=name,
                        )
        record_id = record.id or uuid.uuid4().hex
        if record_id in taken:
            raise DataError(where, f"duplicate id {record_id!r}", line=line, field="id")
        text, found = self.redact(record.text) if self.redact else (record.text, list(record.pii_types))
        return FeedbackRecord(
            text,
            record.model_version,
            list(record.predicted_labels),
            record.score,
            dict(record.scores),
            record.corrected_labels and list(record.corrected_labels),
            record.source,
            record_id,
            record.time or _now(),
            list(found),
            record.principal,
            record.prediction_id,
        )

    def _existing_ids(self, ids: Iterable[str]) -> set[str]:
        from sqlalchemy import bindparam, text

        wanted = [i for i in ids if i]
        found: set[str] = set()
        statement = text("SELECT id FROM feedback WHERE id IN :ids").bindparams(
            bindparam("ids", expanding=True)
        )
        with self.engine.connect() as conn:
            for start in range(0, len(wanted), 500):
                found.update(conn.execute(statement, {"ids": wanted[start : start + 500]}).scalars())
        return found

    def _insert(self, records: list[FeedbackRecord]) -> None:
        from sqlalchemy import text

        rows = [
            {
                "id": r.id,
                "time": r.time,
                "model_version": r.model_version,
                "text": r.text,
                "predicted_labels": json.dumps(r.predicted_labels),
                "scores": json.dumps(r.scores),
                "score": r.score,
                "corrected_labels": None if r.corrected_labels is None else json.dumps(r.corrected_labels),
                "source": r.source,
                "pii_types": json.dumps(r.pii_types),
                "principal": r.principal,
                "prediction_id": r.prediction_id,
            }
            for r in records
        ]
        if not rows:
            return
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO feedback (id, time, model_version, text, predicted_labels, scores, score, "
                    "corrected_labels, source, pii_types, principal, prediction_id) VALUES (:id, :time, "
                    ":model_version, :text, :predicted_labels, :scores, :score, :corrected_labels, :source, "
                    ":pii_types, :principal, :prediction_id)"
                ),
                rows,
            )

    def add(self, record: FeedbackRecord) -> str:
        """Validate, redact and store one record; return its id.

        Raises:
            DataError: naming the field at fault (score, text, model_version, labels, duplicate id).
        """
        taken = self._existing_ids([record.id] if record.id else [])
        checked = self._check(record, self.model_versions(), taken, "<feedback>", None)
        self._insert([checked])
        return str(checked.id)

    def upsert(self, record: FeedbackRecord) -> tuple[str, bool]:
        """Store a principal's feedback on a served prediction, once per (prediction, principal).

        The id is :func:`feedback_id` of the pair; when it exists, its score, corrected labels and
        time are updated (idempotent for a client that retries).

        Returns:
            ``(id, created)``: ``created`` is False when an earlier record was updated.

        Raises:
            ConfigError: The record has no ``prediction_id``.
            DataError: As :meth:`add`.
        """
        from dataclasses import replace

        from sqlalchemy import text

        if not record.prediction_id:
            raise ConfigError("upsert needs a prediction_id (feedback by text is added with add())")
        record = replace(record, id=feedback_id(record.prediction_id, record.principal))
        checked = self._check(record, self.model_versions(), set(), "<feedback>", None)
        with self.engine.begin() as conn:
            updated = conn.execute(
                text("UPDATE feedback SET score = :score, corrected_labels = :corrected, time = :time "
                     "WHERE id = :id"),
                {"score": checked.score, "time": checked.time, "id": checked.id,
                 "corrected": None if checked.corrected_labels is None
                 else json.dumps(checked.corrected_labels)},
            ).rowcount
        if updated:
            return str(checked.id), False
        try:
            self._insert([checked])
        except Exception as exc:  # a concurrent first write of the same pair won: update it instead
            from sqlalchemy.exc import IntegrityError

            if not isinstance(exc, IntegrityError):
                raise
            return self.upsert(record)[0], False
        return str(checked.id), True

    def import_file(self, path: str | Path) -> ImportReport:
        """Import a JSON-lines file of feedback objects: store the good lines, report the bad ones.

        Each line is a :class:`FeedbackRecord` as JSON (``text``, ``model_version``,
        ``predicted_labels``, ``score`` required). The good lines are committed in one
        transaction; the :class:`ImportReport` names every refused line with its field.

        Raises:
            DataError: when the file itself cannot be read (missing, empty).
        """
        path = Path(path)
        if not path.is_file():
            raise DataError(path, "file not found")
        raw = path.read_bytes()
        if not raw.strip():
            raise DataError(path, "file is empty")
        refuse_binary(path, raw[:SNIFF_BYTES], "UTF-8 JSON Lines")
        report = ImportReport(str(path))
        parsed: list[tuple[int, FeedbackRecord]] = []
        for number, line in split_records(raw):  # only \n ends a record; a BOM is skipped
            try:
                obj = parse_record(path, number, line)
                parsed.append((number, record_from_json(obj, str(path), number)))
            except DataError as exc:
                report.failed.append(LineError(number, exc.field, exc.message))
        versions = self.model_versions()
        taken = self._existing_ids(r.id for _, r in parsed if r.id)
        good: list[FeedbackRecord] = []
        for number, record in parsed:
            try:
                checked = self._check(record, versions, taken, str(path), number)
            except DataError as exc:
                report.failed.append(LineError(number, exc.field, exc.message))
                continue
            taken.add(str(checked.id))
            good.append(checked)
        self._insert(good)
        report.stored = [str(r.id) for r in good]
        report.failed.sort(key=lambda e: e.line)
        return report

    # -- reading --------------------------------------------------------------------------
    def scores_between(self, model_version: str, *windows: tuple[float, float]) -> list[list[int]]:
        """Scores given to ``model_version``'s predictions in each window ``[start, end)``, one read.

        Args:
            model_version: The model version rated.
            *windows: ``(start, end)`` pairs, POSIX seconds (start inclusive, end exclusive).

        Returns:
            One list of scores per window, oldest first; records without a time are left out.
        """
        scores: list[list[int]] = [[] for _ in windows]
        for record in self.records(model_version):
            if record.time:
                at = datetime.fromisoformat(record.time.replace("Z", "+00:00")).timestamp()
                for window, (start, end) in zip(scores, windows, strict=True):
                    if start <= at < end:
                        window.append(record.score)
        return scores

    def records(self, model_version: str | None = None) -> list[FeedbackRecord]:
        """All records (optionally of one model version), oldest first."""
        from sqlalchemy import text

        query = (
            "SELECT id, time, model_version, text, predicted_labels, scores, score, corrected_labels, "
            "source, pii_types, principal, prediction_id FROM feedback"
        )
        params: dict[str, Any] = {}
        if model_version is not None:
            query += " WHERE model_version = :v"
            params["v"] = model_version
        with self.engine.connect() as conn:
            rows = conn.execute(text(query + " ORDER BY time, id"), params).all()
        return [
            FeedbackRecord(
                text=r.text,
                model_version=r.model_version,
                predicted_labels=json.loads(r.predicted_labels),
                score=int(r.score),
                scores=json.loads(r.scores),
                corrected_labels=None if r.corrected_labels is None else json.loads(r.corrected_labels),
                source=r.source,
                id=r.id,
                time=r.time,
                pii_types=json.loads(r.pii_types),
                principal=r.principal,
                prediction_id=r.prediction_id,
            )
            for r in rows
        ]

    def stats(self) -> dict[str, Any]:
        """Counts: records, per model version, per score, per source, with corrections, mean score."""
        records = self.records()
        return {
            "records": len(records),
            "schema_version": self.schema_version(),
            "model_versions": dict(Counter(r.model_version for r in records)),
            "registered_versions": list(self.model_versions()),
            "scores": {str(s): sum(r.score == s for r in records) for s in range(1, 6)},
            "sources": dict(Counter(r.source for r in records)),
            "principals": len({r.principal for r in records}),
            "with_corrections": sum(r.corrected_labels is not None for r in records),
            "with_pii": sum(bool(r.pii_types) for r in records),
            "mean_score": round(sum(r.score for r in records) / len(records), 4) if records else None,
        }

    def export(
        self,
        out_dir: str | Path,
        current_version: str | None = None,
        previous: PreviousPolicy = "keep",
        previous_weight: float = 0.5,
        labels: dict[str, str] | None = None,
    ) -> Path:
        """Write a FeedbackExport artifact: ``feedback.jsonl`` (+ ``labels.json``) + manifest.

        Args:
            out_dir: Artifact directory (replaced atomically).
            current_version: The model version the next GRPO run starts from; feedback given on
                any other version is "previous". ``None`` treats every record as current.
            previous: ``keep`` (weight 1, as if current), ``reweight`` (weight
                ``previous_weight``) or ``filter`` (left out). Feedback on an older model rated
                *that* model's prediction; the served labels are still a valid action to reward,
                but the ratings describe another policy, hence the option to trust them less.
            previous_weight: Weight of previous-version records under ``reweight`` (0, 1].
            labels: ``labels.json`` to write; default: those registered for ``current_version``
                (or the only registered version). Not written when unknown.

        Returns:
            ``out_dir``.
        """
        if previous not in ("keep", "reweight", "filter"):
            raise ConfigError(f"previous must be keep, reweight or filter, got {previous!r}")
        if previous == "reweight" and not 0.0 < previous_weight <= 1.0:
            raise ConfigError(f"previous_weight must be in (0, 1], got {previous_weight}")
        versions = self.model_versions()
        if labels is None:
            if current_version in versions:
                labels = versions[current_version]
            elif len(versions) == 1:
                labels = next(iter(versions.values()))
        counts: Counter[str] = Counter()
        with atomic_artifact_dir(out_dir) as tmp:
            with open(tmp / FEEDBACK_FILE, "w", encoding="utf-8") as handle:
                for record in self.records():
                    is_current = current_version is None or record.model_version == current_version
                    if not is_current and previous == "filter":
                        counts["filtered_previous"] += 1
                        continue
                    weight = 1.0 if is_current or previous == "keep" else previous_weight
                    counts["current" if is_current else "previous"] += 1
                    handle.write(
                        json.dumps({**record.to_json(), "weight": weight}, ensure_ascii=False) + "\n"
                    )
            if labels:
                write_json(tmp / LABELS_FILE, labels)
            summary = {
                "records": counts["current"] + counts["previous"],
                **counts,
                "current_version": current_version,
                "previous": previous,
                "previous_weight": previous_weight if previous == "reweight" else None,
            }
            write_manifest(tmp, "FeedbackExport", lineage={"store": _safe_url(self.url)}, extra=summary)
        return Path(out_dir)


def _safe_url(url: str) -> str:
    """The URL without its password (manifests must not hold secrets)."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def read_export(export_dir: str | Path) -> ExportedFeedback:
    """Read (and verify) a FeedbackExport artifact written by :meth:`FeedbackStore.export`."""
    root = Path(export_dir)
    manifest = verify_artifact(root, "FeedbackExport")
    path = root / FEEDBACK_FILE
    records, weights = [], []
    for number, raw in split_records(path.read_bytes()):  # not str.splitlines: U+2028 is text
        obj = parse_record(path, number, raw)
        weight = obj.pop("weight", 1.0)
        records.append(record_from_json(obj, str(path), number))
        weights.append(float(weight))
    labels = json.loads((root / LABELS_FILE).read_text()) if (root / LABELS_FILE).is_file() else None
    return ExportedFeedback(records, weights, labels, manifest)
