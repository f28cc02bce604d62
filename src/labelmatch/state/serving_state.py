"""The serving state every replica shares: versioned label sets and the predictions feedback refers to.

One SQLAlchemy URL names it: a SQLite file for one replica and the demo, PostgreSQL (driver
``psycopg``, in the ``serve`` extra) when several replicas serve one model. What lives where:

* ``label_sets``: one row per ``PUT /labels`` (labels, thresholds, the model version it was made
  for; ``version`` grows globally). Every replica polls it every ``label_sync_s`` and serves the
  newest row of its model version.
* ``predictions``: one row per predicted document (model and label-set version, labels, scores,
  the redacted text or only its hash), read by ``POST /feedback`` by ``prediction_id`` on any
  replica; gone after ``prediction_ttl_s``.
* ``prediction_log``: a sample of predictions (``--log_sample_rate``), same columns, read by
  ``labelmatch monitor`` (:mod:`labelmatch.monitoring`); bounded by ``log_max_rows`` and
  ``log_retention_s``.
* ``monitor_reports``: one row per ``labelmatch monitor`` run (its signals, whether drift
  fired); every replica exports the newest report of its model version as Prometheus gauges.
* ``shadow_targets``: where the replicas of a model version mirror their prediction traffic to
  (a shadow candidate, :mod:`labelmatch.serving.shadow`), and until when; every replica polls it
  with the label sets.
* ``shadow_log``: one row per mirrored document: both answers' labels, the score shift and both
  latencies (:mod:`labelmatch.delivery.shadow` reports on it).
* ``delivery_events``: one row per canary or shadow decision of a service (its evidence); every
  replica of that service exports the newest as ``labelmatch_canary_decision``.

Feedback itself goes to the feedback store (:mod:`labelmatch.feedback.feedback_store`), by default in the
same database. The schema is versioned (:mod:`labelmatch.state.migrations`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from labelmatch.core.errors import LabelmatchError
from labelmatch.state.migrations import migrate

VERSION_TABLE = "serving_schema_version"


class StateUnavailable(LabelmatchError):
    """The shared state store cannot be reached (or written)."""


def _create_v1(conn: Any) -> None:
    from sqlalchemy import Column, Float, Index, Integer, MetaData, String, Table, Text

    metadata = MetaData()
    Table(
        "label_sets", metadata,
        Column("version", Integer, primary_key=True, autoincrement=True),
        Column("model_version", String(200), nullable=False, index=True),
        Column("labels", Text, nullable=False),
        Column("thresholds", Text, nullable=False),
        Column("created_at", Float, nullable=False),
    )
    predictions = Table(
        "predictions", metadata,
        Column("id", String(64), primary_key=True),
        Column("created_at", Float, nullable=False),
        Column("expires_at", Float, nullable=False),
        Column("model_version", String(200), nullable=False),
        Column("label_set_version", Integer, nullable=False),
        Column("labels", Text, nullable=False),
        Column("scores", Text, nullable=False),
        Column("text", Text),
        Column("text_sha256", String(64), nullable=False),
    )
    Index("ix_predictions_expires_at", predictions.c.expires_at)
    metadata.create_all(conn)


def _create_v2(conn: Any) -> None:
    """The prediction log (sampled predictions for monitoring) and the monitor reports."""
    from sqlalchemy import Column, Float, Index, Integer, MetaData, String, Table, Text

    metadata = MetaData()
    log = Table(
        "prediction_log", metadata,
        Column("id", String(64), primary_key=True),
        Column("created_at", Float, nullable=False),
        Column("model_version", String(200), nullable=False),
        Column("label_set_version", Integer, nullable=False),
        Column("labels", Text, nullable=False),
        Column("scores", Text, nullable=False),
        Column("text", Text),
        Column("text_sha256", String(64), nullable=False),
    )
    Index("ix_prediction_log_model_time", log.c.model_version, log.c.created_at)
    Index("ix_prediction_log_created_at", log.c.created_at)
    Table(
        "monitor_reports", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("created_at", Float, nullable=False),
        Column("model_version", String(200), nullable=False, index=True),
        Column("drift", Integer, nullable=False),
        Column("report", Text, nullable=False),
    )
    metadata.create_all(conn)


def _create_v3(conn: Any) -> None:
    """Progressive delivery: shadow targets, the shadow log, canary and shadow decisions."""
    from sqlalchemy import Column, Float, Index, Integer, MetaData, String, Table, Text

    metadata = MetaData()
    Table(
        "shadow_targets", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("model_version", String(200), nullable=False, index=True),
        Column("url", Text, nullable=False),
        Column("created_at", Float, nullable=False),
        Column("until", Float, nullable=False),
    )
    shadow = Table(
        "shadow_log", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("created_at", Float, nullable=False),
        Column("request_id", String(64), nullable=False),
        Column("model_version", String(200), nullable=False),
        Column("shadow_version", String(200), nullable=False),
        Column("labels", Text, nullable=False),
        Column("shadow_labels", Text),
        Column("score_shift", Float),
        Column("serving_ms", Float, nullable=False),
        Column("shadow_ms", Float),
        Column("error", Text),
    )
    Index("ix_shadow_log_model_time", shadow.c.model_version, shadow.c.created_at)
    Table(
        "delivery_events", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("created_at", Float, nullable=False),
        Column("service", String(200), nullable=False, index=True),
        Column("release_id", String(64), nullable=False),
        Column("strategy", String(20), nullable=False),
        Column("decision", String(20), nullable=False),
        Column("event", Text, nullable=False),
    )
    metadata.create_all(conn)


#: Ordered schema migrations of the serving state.
MIGRATIONS = [_create_v1, _create_v2, _create_v3]


@dataclass(frozen=True)
class ShadowRow:
    """One mirrored document: what the serving model answered, and what the shadow did.

    Attributes:
        request_id: The mirrored request (several documents share it).
        model_version: The serving model's version.
        shadow_version: The shadow's model version ("" when it did not answer).
        labels: The serving model's labels.
        shadow_labels: The shadow's (``None`` when it did not answer).
        score_shift: Mean absolute difference of the two answers' scores over their common labels.
        serving_ms: The serving model's inference time for the request (its Server-Timing).
        shadow_ms: The shadow's (its Server-Timing ``inference``; ``None`` when it did not answer).
        error: Why the shadow did not answer (``None`` when it did).
        created_at: Unix time.
    """

    request_id: str
    model_version: str
    shadow_version: str
    labels: list[str]
    shadow_labels: list[str] | None
    score_shift: float | None
    serving_ms: float
    shadow_ms: float | None
    error: str | None = None
    created_at: float = 0.0


@dataclass(frozen=True)
class LabelSet:
    """One stored label set.

    Attributes:
        version: Its number (grows over all model versions; responses name it).
        model_version: The model version it was made for (a rolled-back model serves its own).
        labels: ``{label: description}``.
        thresholds: ``{"default": t, "labels": {label: t}}``.
        created_at: Unix time.
    """

    version: int
    model_version: str
    labels: dict[str, str]
    thresholds: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class PredictionRecord:
    """A served prediction, kept so feedback can name it by id on any replica.

    Attributes:
        id: The prediction id returned to the client.
        model_version: The model that served it.
        label_set_version: The label set it was served with (0: the model's own).
        labels: The predicted labels.
        scores: ``{label: probability}``.
        text_sha256: SHA-256 of the document text.
        text: The PII-redacted text, or ``None`` when only the hash is kept.
        created_at: Unix time.
        expires_at: Unix time after which the id is unknown.
    """

    id: str
    model_version: str
    label_set_version: int
    labels: list[str]
    scores: dict[str, float]
    text_sha256: str
    text: str | None = None
    created_at: float = 0.0
    expires_at: float = 0.0


_LOG_INSERT = ("INSERT INTO prediction_log (id, created_at, model_version, label_set_version, labels, "
               "scores, text, text_sha256) VALUES (:id, :c, :m, :s, :l, :sc, :t, :h)")


def _prediction_row(record: PredictionRecord, now: float) -> dict[str, Any]:
    """The columns ``predictions`` and ``prediction_log`` share (``created_at``: the record's, else now)."""
    return {"id": record.id, "c": record.created_at or now, "m": record.model_version,
            "s": record.label_set_version, "l": json.dumps(record.labels, ensure_ascii=False),
            "sc": json.dumps(record.scores), "t": record.text, "h": record.text_sha256}


class ServingState:
    """Label sets and prediction records in a SQL database shared by the replicas.

    Args:
        url: SQLAlchemy URL (``sqlite:///state.db``, ``postgresql+psycopg://user:pw@host/db``).
        prediction_ttl_s: How long a prediction id stays resolvable.

    Example::

        state = ServingState("postgresql+psycopg://labelmatch@127.0.0.1/labelmatch")
        state.save_label_set("a1b2c3", {"vat": "Value added tax."}, {"default": 0.5, "labels": {}})
        state.latest_label_set("a1b2c3").version
    """

    def __init__(self, url: str, prediction_ttl_s: float = 7 * 24 * 3600):
        from sqlalchemy import create_engine

        if prediction_ttl_s <= 0:
            raise ValueError(f"prediction_ttl_s must be > 0, got {prediction_ttl_s}")
        self.url = url
        self.prediction_ttl_s = float(prediction_ttl_s)
        options: dict[str, Any] = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            options["connect_args"] = {"timeout": 30}
        else:
            options["connect_args"] = {"connect_timeout": 5}
        self.engine = create_engine(url, **options)
        with self._errors("migrate"):
            migrate(self.engine, VERSION_TABLE, MIGRATIONS, f"serving state {self.safe_url}")

    @property
    def safe_url(self) -> str:
        """The URL without its password."""
        return self.engine.url.render_as_string(hide_password=True)

    def _errors(self, action: str) -> Any:
        from contextlib import contextmanager

        from sqlalchemy.exc import DBAPIError, OperationalError

        @contextmanager
        def guard() -> Any:
            try:
                yield
            except (OperationalError, DBAPIError) as exc:
                reason = str(exc.orig if getattr(exc, "orig", None) else exc).strip().splitlines()[0]
                raise StateUnavailable(f"serving state {self.safe_url}: cannot {action}: {reason}") from exc

        return guard()

    # -- label sets ---------------------------------------------------------------------------
    def save_label_set(self, model_version: str, labels: dict[str, str],
                       thresholds: dict[str, Any]) -> LabelSet:
        """Store a new label set for ``model_version``; it is served from now on (by every replica)."""
        from sqlalchemy import text

        now = time.time()
        with self._errors("store the label set"), self.engine.begin() as conn:
            row = conn.execute(
                text("INSERT INTO label_sets (model_version, labels, thresholds, created_at) "
                     "VALUES (:m, :l, :t, :c) RETURNING version"),
                {"m": model_version, "l": json.dumps(labels, ensure_ascii=False),
                 "t": json.dumps(thresholds), "c": now},
            ).scalar_one()
        return LabelSet(int(row), model_version, dict(labels), dict(thresholds), now)

    def latest_label_set(self, model_version: str) -> LabelSet | None:
        """The newest label set stored for ``model_version`` (``None``: serve the model's own)."""
        from sqlalchemy import text

        with self._errors("read the label set"), self.engine.connect() as conn:
            row = conn.execute(
                text("SELECT version, labels, thresholds, created_at FROM label_sets "
                     "WHERE model_version = :m ORDER BY version DESC LIMIT 1"),
                {"m": model_version},
            ).first()
        if row is None:
            return None
        return LabelSet(int(row[0]), model_version, json.loads(row[1]), json.loads(row[2]), float(row[3]))

    def label_set(self, model_version: str, version: int) -> LabelSet | None:
        """Label set ``version`` of ``model_version`` (``None``: no such set for that model)."""
        from sqlalchemy import text

        with self._errors("read the label set"), self.engine.connect() as conn:
            row = conn.execute(
                text("SELECT version, labels, thresholds, created_at FROM label_sets "
                     "WHERE model_version = :m AND version = :v"),
                {"m": model_version, "v": version},
            ).first()
        if row is None:
            return None
        return LabelSet(int(row[0]), model_version, json.loads(row[1]), json.loads(row[2]), float(row[3]))

    def latest_version(self, model_version: str) -> int:
        """The newest label-set version of ``model_version`` (0 when none); one indexed read."""
        from sqlalchemy import text

        with self._errors("read the label-set version"), self.engine.connect() as conn:
            value = conn.execute(text("SELECT MAX(version) FROM label_sets WHERE model_version = :m"),
                                 {"m": model_version}).scalar()
        return int(value or 0)

    # -- predictions --------------------------------------------------------------------------
    def record_predictions(self, records: Sequence[PredictionRecord],
                           logged: Sequence[PredictionRecord] = ()) -> None:
        """Store served predictions so feedback can name them on any replica, and append ``logged``
        (the sampled ones) to the prediction log, in one transaction."""
        from sqlalchemy import text

        if not records and not logged:
            return
        now = time.time()
        rows = [{**_prediction_row(r, now), "c": now, "e": now + self.prediction_ttl_s} for r in records]
        with self._errors("record predictions"), self.engine.begin() as conn:
            if rows:
                conn.execute(
                    text("INSERT INTO predictions (id, created_at, expires_at, model_version, "
                         "label_set_version, labels, scores, text, text_sha256) "
                         "VALUES (:id, :c, :e, :m, :s, :l, :sc, :t, :h)"),
                    rows,
                )
            if logged:
                conn.execute(text(_LOG_INSERT), [_prediction_row(r, now) for r in logged])

    def prediction(self, prediction_id: str) -> PredictionRecord | None:
        """The prediction named ``prediction_id``, or ``None`` when unknown or expired."""
        from sqlalchemy import text

        with self._errors("read the prediction"), self.engine.connect() as conn:
            row = conn.execute(
                text("SELECT id, model_version, label_set_version, labels, scores, text_sha256, text, "
                     "created_at, expires_at FROM predictions WHERE id = :id AND expires_at > :now"),
                {"id": prediction_id, "now": time.time()},
            ).first()
        if row is None:
            return None
        return PredictionRecord(row[0], row[1], int(row[2]), json.loads(row[3]), json.loads(row[4]), row[5],
                                row[6], float(row[7]), float(row[8]))

    # -- prediction log (monitoring) ----------------------------------------------------------------
    def log_predictions(self, records: Sequence[PredictionRecord]) -> None:
        """Append sampled predictions to the prediction log (one transaction)."""
        from sqlalchemy import text

        if not records:
            return
        now = time.time()
        with self._errors("log predictions"), self.engine.begin() as conn:
            conn.execute(text(_LOG_INSERT), [_prediction_row(r, now) for r in records])

    def logged_predictions(self, model_version: str, since: float = 0.0, until: float | None = None,
                           limit: int | None = None) -> list[PredictionRecord]:
        """Logged predictions of ``model_version`` in ``[since, until)``, oldest first (the newest
        ``limit`` when given)."""
        from sqlalchemy import text

        query = ("SELECT id, model_version, label_set_version, labels, scores, text_sha256, text, created_at "
                 "FROM prediction_log WHERE model_version = :m AND created_at >= :since "
                 "AND created_at < :until ORDER BY created_at DESC, id")
        params: dict[str, Any] = {"m": model_version, "since": since,
                                  "until": until if until is not None else float("inf")}
        if limit is not None:
            query += " LIMIT :limit"
            params["limit"] = int(limit)
        with self._errors("read the prediction log"), self.engine.connect() as conn:
            rows = conn.execute(text(query), params).all()
        return [PredictionRecord(r[0], r[1], int(r[2]), json.loads(r[3]), json.loads(r[4]), r[5], r[6],
                                 float(r[7])) for r in reversed(rows)]

    def trim_log(self, max_rows: int, retention_s: float) -> int:
        """Delete logged predictions (and shadow-log rows) older than ``retention_s``, and logged
        predictions beyond the newest ``max_rows``; returns how many."""
        from sqlalchemy import text

        with self._errors("trim the prediction log"), self.engine.begin() as conn:
            deleted = conn.execute(text("DELETE FROM prediction_log WHERE created_at < :cut"),
                                   {"cut": time.time() - retention_s}).rowcount or 0
            deleted += conn.execute(text("DELETE FROM shadow_log WHERE created_at < :cut"),
                                    {"cut": time.time() - retention_s}).rowcount or 0
            cutoff = conn.execute(text("SELECT created_at FROM prediction_log ORDER BY created_at DESC "
                                       "LIMIT 1 OFFSET :n"), {"n": max_rows}).scalar()
            if cutoff is not None:
                deleted += conn.execute(text("DELETE FROM prediction_log WHERE created_at <= :cut"),
                                        {"cut": cutoff}).rowcount or 0
        return int(deleted)

    # -- monitor reports ------------------------------------------------------------------------------
    def save_monitor_report(self, model_version: str, report: dict[str, Any], drift: bool) -> int:
        """Store a monitor report; every replica of ``model_version`` exports its gauges. Returns its id."""
        from sqlalchemy import text

        with self._errors("store the monitor report"), self.engine.begin() as conn:
            return int(conn.execute(
                text("INSERT INTO monitor_reports (created_at, model_version, drift, report) "
                     "VALUES (:c, :m, :d, :r) RETURNING id"),
                {"c": time.time(), "m": model_version, "d": int(drift), "r": json.dumps(report)},
            ).scalar_one())

    def latest_monitor_report(self, model_version: str,
                              after_id: int = 0) -> tuple[int, dict[str, Any]] | None:
        """``(id, report)`` of the newest monitor report of ``model_version`` newer than ``after_id``."""
        from sqlalchemy import text

        with self._errors("read the monitor report"), self.engine.connect() as conn:
            row = conn.execute(
                text("SELECT id, report FROM monitor_reports WHERE model_version = :m AND id > :after "
                     "ORDER BY id DESC LIMIT 1"), {"m": model_version, "after": after_id}).first()
        return None if row is None else (int(row[0]), json.loads(row[1]))

    # -- progressive delivery: shadow targets, the shadow log, decisions ----------------------------
    def set_shadow_target(self, model_version: str, url: str, until: float) -> None:
        """Every replica of ``model_version`` mirrors its prediction requests to ``url`` (a shadow's
        ``:predict`` URL) until ``until`` (Unix time), from its next state poll on."""
        from sqlalchemy import text

        with self._errors("store the shadow target"), self.engine.begin() as conn:
            conn.execute(text("INSERT INTO shadow_targets (model_version, url, created_at, until) "
                              "VALUES (:m, :u, :c, :t)"),
                         {"m": model_version, "u": url, "c": time.time(), "t": float(until)})

    def clear_shadow_target(self, model_version: str) -> None:
        """Stop mirroring the traffic of ``model_version`` (from the replicas' next poll on)."""
        from sqlalchemy import text

        with self._errors("clear the shadow target"), self.engine.begin() as conn:
            conn.execute(text("UPDATE shadow_targets SET until = :now WHERE model_version = :m "
                              "AND until > :now"),
                         {"m": model_version, "now": time.time()})

    def shadow_target(self, model_version: str) -> str | None:
        """The URL the replicas of ``model_version`` mirror to now (``None``: none)."""
        from sqlalchemy import text

        with self._errors("read the shadow target"), self.engine.connect() as conn:
            row = conn.execute(
                text("SELECT url FROM shadow_targets WHERE model_version = :m AND until > :now "
                     "ORDER BY id DESC LIMIT 1"), {"m": model_version, "now": time.time()}).first()
        return None if row is None else str(row[0])

    def log_shadow(self, rows: Sequence[ShadowRow]) -> None:
        """Append mirrored documents to the shadow log (one transaction)."""
        from sqlalchemy import text

        if not rows:
            return
        now = time.time()
        with self._errors("log shadow answers"), self.engine.begin() as conn:
            conn.execute(
                text("INSERT INTO shadow_log (created_at, request_id, model_version, shadow_version, labels, "
                     "shadow_labels, score_shift, serving_ms, shadow_ms, error) VALUES (:c, :r, :m, :sv, :l, "
                     ":sl, :ss, :ms, :sms, :e)"),
                [{"c": row.created_at or now, "r": row.request_id, "m": row.model_version,
                  "sv": row.shadow_version, "l": json.dumps(row.labels, ensure_ascii=False),
                  "sl": (None if row.shadow_labels is None
                         else json.dumps(row.shadow_labels, ensure_ascii=False)),
                  "ss": row.score_shift, "ms": row.serving_ms, "sms": row.shadow_ms, "e": row.error}
                 for row in rows])

    def shadow_rows(self, model_version: str, since: float = 0.0,
                    until: float | None = None) -> list[ShadowRow]:
        """Mirrored documents of the serving ``model_version`` in ``[since, until)``, oldest first."""
        from sqlalchemy import text

        with self._errors("read the shadow log"), self.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT request_id, model_version, shadow_version, labels, shadow_labels, score_shift, "
                     "serving_ms, shadow_ms, error, created_at FROM shadow_log WHERE model_version = :m "
                     "AND created_at >= :since AND created_at < :until ORDER BY created_at, id"),
                {"m": model_version, "since": since, "until": until if until is not None else float("inf")},
            ).all()
        return [ShadowRow(r[0], r[1], r[2], json.loads(r[3]), None if r[4] is None else json.loads(r[4]),
                          r[5], float(r[6]), r[7], r[8], float(r[9])) for r in rows]

    def save_delivery_event(self, service: str, release_id: str, strategy: str, decision: str,
                            event: dict[str, Any], newest_id: int | None = None) -> int:
        """Store a canary or shadow decision of ``service``; every replica of it exports the newest.

        Args:
            newest_id: Store it only while the event with this id is still the service's newest
                (one statement: a decision about an event that another step has since followed is
                not stored over that step's).

        Returns:
            The new event's id; 0 when ``newest_id`` was not the newest and nothing was stored.
        """
        from sqlalchemy import text

        values = {"c": time.time(), "s": service, "r": release_id, "st": strategy, "d": decision,
                  "e": json.dumps(event), "service": service, "after": newest_id or 0}
        guard = ("" if newest_id is None else  # (its own parameter: PostgreSQL types each use of one)
                 " WHERE NOT EXISTS (SELECT 1 FROM delivery_events WHERE service = :service AND id > :after)")
        with self._errors("store the delivery decision"), self.engine.begin() as conn:
            result = conn.execute(
                text("INSERT INTO delivery_events (created_at, service, release_id, strategy, decision, "
                     f"event) SELECT :c, :s, :r, :st, :d, :e{guard} RETURNING id"), values)
            stored = result.scalar_one_or_none()
        return int(stored or 0)

    def latest_delivery_event(self, service: str, after_id: int = 0) -> tuple[int, dict[str, Any]] | None:
        """``(id, event)`` of the newest decision of ``service`` newer than ``after_id`` (the event
        carries ``created_at``, ``release_id``, ``strategy``, ``decision``)."""
        from sqlalchemy import text

        with self._errors("read the delivery decision"), self.engine.connect() as conn:
            row = conn.execute(
                text("SELECT id, created_at, release_id, strategy, decision, event FROM delivery_events "
                     "WHERE service = :s AND id > :after ORDER BY id DESC LIMIT 1"),
                {"s": service, "after": after_id}).first()
        if row is None:
            return None
        event = json.loads(row[5])
        event.update(created_at=float(row[1]), release_id=row[2], strategy=row[3], decision=row[4])
        return int(row[0]), event

    def purge_expired(self) -> int:
        """Delete expired prediction records; returns how many."""
        from sqlalchemy import text

        with self._errors("purge expired predictions"), self.engine.begin() as conn:
            return int(conn.execute(text("DELETE FROM predictions WHERE expires_at <= :now"),
                                    {"now": time.time()}).rowcount or 0)

    def check_writable(self) -> None:
        """Raise :class:`StateUnavailable` unless the database accepts a write transaction now."""
        from sqlalchemy import text

        with self._errors("write"), self.engine.begin() as conn:
            postgres = conn.dialect.name == "postgresql"
            if postgres and conn.execute(text("SELECT pg_is_in_recovery()")).scalar():
                raise StateUnavailable(f"serving state {self.safe_url}: the database is a read-only replica")
            conn.execute(text(f"UPDATE {VERSION_TABLE} SET version = version"))

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()
