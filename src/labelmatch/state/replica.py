"""One replica's view of the shared serving state: label-set sync, prediction records, health.

A model server holds one :class:`ReplicaState`. A background thread polls the store every
``label_sync_s`` seconds: a newer label set of the served model version is applied (so a
``PUT /labels`` on any replica is served everywhere within ``label_sync_s`` plus the time to
embed new descriptions), expired predictions are purged now and then, and a write transaction
checks that the store accepts writes (:attr:`ReplicaState.error` says why not).

Prediction records are written behind the response: :meth:`ReplicaState.record` only queues
them (microseconds in the request path); a writer thread redacts the texts and inserts what has
queued in one transaction, within ``record_delay_s``. A feedback by id that arrives before its
record is written (another replica, a few milliseconds later) waits up to ``record_delay_s``
for it before answering "unknown".

While the store is unreachable, predictions keep being served with the last label set applied;
their records are dropped (counted: feedback by those ids gets 404), and label updates and
feedback answer 503. Nothing here imports the server: it is handed a callback that applies a
label set.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from labelmatch.core.errors import ConfigError
from labelmatch.state.serving_state import LabelSet, PredictionRecord, ServingState, StateUnavailable

logger = logging.getLogger("labelmatch.state")

#: What a prediction record keeps of the document: its PII-redacted text, or only a SHA-256.
TextPolicy = Literal["redacted", "hash"]


@dataclass
class StateConfig:
    """Settings of the shared serving state.

    Attributes:
        url: SQLAlchemy URL (SQLite file for one replica; PostgreSQL for several).
        prediction_ttl_s: How long a prediction id resolves for feedback.
        prediction_text: ``redacted`` keeps the PII-redacted text with each prediction (feedback
            by id alone is enough); ``hash`` keeps only its SHA-256 (feedback must send the text,
            which is checked against the hash).
        label_sync_s: How often each replica looks for a newer label set (the bound on how
            stale another replica's labels can be, plus embedding time).
        purge_every_s: How often a replica deletes expired prediction records.
        record_delay_s: Longest time between a response and its prediction record being
            resolvable on every replica (the writer flushes at least this often).
        record_queue: Records that may wait for the writer, and records the writer holds back
            while the store is unreachable (retried with back-off, oldest first); beyond either
            bound the oldest are dropped and counted, so an outage never grows memory without
            bound.
        log_sample_rate: Share of predictions also written to the prediction log that
            ``labelmatch monitor`` reads (0 turns the log off). Its text follows
            ``prediction_text``.
        log_max_rows: Most rows the prediction log keeps (the oldest go first).
        log_retention_s: Longest a logged prediction is kept.
    """

    url: str
    prediction_ttl_s: float = 7 * 24 * 3600.0
    prediction_text: TextPolicy = "redacted"
    label_sync_s: float = 2.0
    purge_every_s: float = 600.0
    record_delay_s: float = 0.5
    record_queue: int = 10_000
    log_sample_rate: float = 0.1
    log_max_rows: int = 100_000
    log_retention_s: float = 30 * 24 * 3600.0

    def __post_init__(self) -> None:
        if self.prediction_text not in ("redacted", "hash"):
            raise ConfigError(f"prediction_text must be redacted or hash, got {self.prediction_text!r}")
        if not 0.0 <= self.log_sample_rate <= 1.0:
            raise ConfigError(f"log_sample_rate must be within [0, 1], got {self.log_sample_rate}")
        for name in ("prediction_ttl_s", "label_sync_s", "purge_every_s", "record_delay_s", "record_queue",
                     "log_max_rows", "log_retention_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")


def text_sha256(text: str) -> str:
    """Hex SHA-256 of a document's UTF-8 text (what a ``hash`` prediction record keeps)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ReplicaState:
    """The shared state as one replica uses it.

    Args:
        config: Store settings.
        model_version: The served model's version (label sets are per model version).
        apply: Called with a newer stored :class:`LabelSet` to serve it.
        redact: ``text -> redacted text`` for ``prediction_text="redacted"``.
        on_written: Called with the seconds each batch of prediction records took (metrics).
        on_dropped: Called with the number of prediction records that could not be written.
        on_monitor: Called with each newer monitor report of the served model version (gauges).
        on_logged: Called with the number of predictions written to the prediction log.
        on_shadow: Called with the URL this model version's traffic is mirrored to (``None``: no
            more) whenever it changes (:mod:`labelmatch.serving.shadow`).
        service: The served name (``--model_name``: the InferenceService): canary and shadow
            decisions of that service go to ``on_delivery``.
        on_delivery: Called with each newer canary or shadow decision of ``service`` (gauges).
    """

    def __init__(self, config: StateConfig, model_version: str, apply: Callable[[LabelSet], None],
                 redact: Callable[[str], str] | None = None,
                 on_written: Callable[[float], None] | None = None,
                 on_dropped: Callable[[int], None] | None = None,
                 on_monitor: Callable[[dict[str, Any]], None] | None = None,
                 on_logged: Callable[[int], None] | None = None,
                 on_shadow: Callable[[str | None], None] | None = None, service: str = "",
                 on_delivery: Callable[[dict[str, Any]], None] | None = None):
        self.config = config
        self.model_version = model_version
        self.store = ServingState(config.url, config.prediction_ttl_s)
        self._apply = apply
        self._redact = redact or (lambda text: text)
        self.label_set_version = 0
        #: Label sets up to this version are not synced (see :meth:`pin_labels`).
        self._sync_floor = 0
        #: Why the store cannot be written now (``None`` when it can).
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sync_lock = threading.Lock()
        self._last_purge = 0.0
        #: (prediction id, text, prediction, label-set version, also logged for monitoring)
        self._pending: queue.Queue[tuple[str, str, dict[str, Any], int, bool]] = queue.Queue(
            config.record_queue)
        self._on_written = on_written or (lambda seconds: None)
        self._on_dropped = on_dropped or (lambda count: None)
        self._on_monitor = on_monitor or (lambda report: None)
        self._on_logged = on_logged or (lambda count: None)
        self._monitor_report_id = 0
        self._on_shadow = on_shadow
        self.shadow_url: str | None = None
        self.service = service
        self._on_delivery = on_delivery
        self._delivery_event_id = 0
        self._sample = random.Random()
        self._writer: threading.Thread | None = None
        #: Records a failed write held back, oldest first (bounded by ``record_queue``).
        self._backlog: list[tuple[str, str, dict[str, Any], int, bool]] = []
        self._backlog_lock = threading.Lock()

    # -- label sets -----------------------------------------------------------------------------
    def sync_labels(self) -> bool:
        """Apply the newest stored label set of the served model when it is newer; True if applied."""
        with self._sync_lock:
            latest = self.store.latest_version(self.model_version)
            if latest <= max(self.label_set_version, self._sync_floor):
                return False
            label_set = self.store.latest_label_set(self.model_version)
            if label_set is None:
                return False
            self._apply(label_set)
            self.label_set_version = label_set.version
            return True

    def pin_labels(self, version: int) -> None:
        """Serve label set ``version`` (0: the model's own labels) instead of the newest stored one.

        A rollback restores the label set its release served. Label sets stored after this call
        (an admin's later ``PUT``, on any replica) are served as usual.

        Raises:
            ConfigError: The store has no label set ``version`` for the served model.
        """
        with self._sync_lock:
            floor = self.store.latest_version(self.model_version)
            if version:
                label_set = self.store.label_set(self.model_version, version)
                if label_set is None:
                    raise ConfigError(f"label set version {version} (LABELMATCH_LABEL_SET_VERSION): the "
                                      f"serving state has no such label set for model version "
                                      f"{self.model_version}")
                self._apply(label_set)
            self.label_set_version = version
            self._sync_floor = floor

    def sync_monitor_report(self) -> bool:
        """Hand a newer monitor report of the served model version to ``on_monitor``; True if one."""
        found = self.store.latest_monitor_report(self.model_version, self._monitor_report_id)
        if found is None:
            return False
        self._monitor_report_id, report = found
        self._on_monitor(report)
        return True

    def sync_shadow(self) -> bool:
        """Hand a changed mirror target of the served model version to ``on_shadow``; True if changed."""
        if self._on_shadow is None:
            return False
        url = self.store.shadow_target(self.model_version)
        if url == self.shadow_url:
            return False
        self.shadow_url = url
        self._on_shadow(url)
        return True

    def sync_delivery(self) -> bool:
        """Hand a newer canary or shadow decision of the service to ``on_delivery``; True if one."""
        if self._on_delivery is None or not self.service:
            return False
        found = self.store.latest_delivery_event(self.service, self._delivery_event_id)
        if found is None:
            return False
        self._delivery_event_id, event = found
        self._on_delivery(event)
        return True

    def save_labels(self, labels: dict[str, str], thresholds: dict[str, Any]) -> LabelSet:
        """Store a new label set for the served model and serve it here at once.

        Raises:
            StateUnavailable: The store cannot be written (nothing changes).
        """
        with self._sync_lock:
            label_set = self.store.save_label_set(self.model_version, labels, thresholds)
            self._apply(label_set)
            self.label_set_version = label_set.version
        return label_set

    # -- predictions ----------------------------------------------------------------------------
    def record(self, ids: Sequence[str], texts: Sequence[str], predictions: Sequence[dict[str, Any]],
               label_set_version: int) -> None:
        """Queue served predictions for the writer (they become resolvable within ``record_delay_s``).

        Never blocks: when the queue is full (the store has been unreachable for a while) the
        records are dropped and counted. A ``log_sample_rate`` share of them is marked for the
        prediction log too.
        """
        dropped = 0
        rate = self.config.log_sample_rate
        for item in zip(ids, texts, predictions, strict=True):
            logged = rate > 0 and self._sample.random() < rate
            try:
                self._pending.put_nowait((*item, label_set_version, logged))
            except queue.Full:
                dropped += 1
        if dropped:
            self._on_dropped(dropped)

    def _records(self, batch: list[tuple[str, str, dict[str, Any], int, bool]]) -> list[PredictionRecord]:
        keep_text = self.config.prediction_text == "redacted"
        now = time.time()
        return [
            PredictionRecord(
                id=prediction_id, model_version=self.model_version, label_set_version=label_set_version,
                labels=list(prediction["labels"]), scores=dict(prediction["scores"]),
                text_sha256=text_sha256(text), text=self._redact(text) if keep_text else None,
                created_at=now,
            )
            for prediction_id, text, prediction, label_set_version, _ in batch
        ]

    @property
    def waiting(self) -> int:
        """Records not written yet: queued for the writer, or held back while the store is down."""
        return len(self._backlog) + self._pending.qsize()

    def write_pending(self, wait_s: float = 0.0) -> int:
        """Write the held-back records, then what has queued (waiting up to ``wait_s`` for a first
        record); returns how many were written.

        When the store cannot be written the batch is held back (oldest first) for the next
        call; beyond ``record_queue`` held-back records the oldest are dropped, counted and logged.
        """
        with self._backlog_lock:
            batch, self._backlog = self._backlog[:1000], self._backlog[1000:]
        taken = 0  # records taken from the queue (each needs task_done)
        if not batch:
            try:
                batch.append(self._pending.get(timeout=wait_s) if wait_s > 0 else self._pending.get_nowait())
                taken = 1
            except queue.Empty:
                return 0
        while len(batch) < 1000:
            try:
                batch.append(self._pending.get_nowait())
                taken += 1
            except queue.Empty:
                break
        start = time.perf_counter()
        try:
            records = self._records(batch)
            logged = [record for record, item in zip(records, batch, strict=True) if item[-1]]
            self.store.record_predictions(records, logged)
            self._on_written(time.perf_counter() - start)
            if logged:
                self._on_logged(len(logged))
            return len(batch)
        except StateUnavailable as exc:
            self._hold_back(batch, exc)
            return 0
        finally:
            for _ in range(taken):
                self._pending.task_done()

    def _hold_back(self, batch: list[tuple[str, str, dict[str, Any], int, bool]], exc: Exception) -> None:
        with self._backlog_lock:
            self._backlog = batch + self._backlog
            overflow = len(self._backlog) - self.config.record_queue
            if overflow > 0:
                del self._backlog[:overflow]
        if overflow > 0:
            self._on_dropped(overflow)
            logger.error("prediction records dropped: %d (more than %d held back while the store is "
                         "unreachable)", overflow, self.config.record_queue)
        if self.error is None:
            logger.error("prediction records held back until the store is reachable: %s", exc)
        self.error = str(exc)

    def flush(self) -> None:
        """Block until every queued record is written or held back (see :meth:`write_pending`)."""
        if self._writer is None:
            while self.write_pending():
                pass
        self._pending.join()

    def resolve(self, prediction_id: str) -> PredictionRecord | None:
        """The recorded prediction, or ``None`` when unknown or expired.

        An id not found yet is looked up again for ``record_delay_s`` (its record may still be
        on its way from the replica that served it).

        Raises:
            StateUnavailable: The store cannot be read.
        """
        deadline = time.monotonic() + self.config.record_delay_s
        while True:
            found = self.store.prediction(prediction_id)
            if found is not None or time.monotonic() >= deadline:
                return found
            time.sleep(min(0.05, self.config.record_delay_s))

    # -- background sync -------------------------------------------------------------------------
    def check(self) -> None:
        """One round of the background work: health (a write), label sync, monitor report, shadow
        target, delivery decision, purge when due."""
        try:
            self.store.check_writable()
            self.sync_labels()
            self.sync_monitor_report()
            self.sync_shadow()
            self.sync_delivery()
            if time.monotonic() - self._last_purge >= self.config.purge_every_s:
                purged = self.store.purge_expired()
                trimmed = self.store.trim_log(self.config.log_max_rows, self.config.log_retention_s)
                self._last_purge = time.monotonic()
                if purged or trimmed:
                    logger.info("purged %d expired prediction records, %d logged predictions",
                                purged, trimmed)
            if self.error is not None:
                logger.warning("serving state reachable again: %s", self.store.safe_url)
            self.error = None
        except StateUnavailable as exc:
            if self.error is None:
                logger.error("%s", exc)
            self.error = str(exc)

    def start(self) -> None:
        """Start the background threads: one :meth:`check` every ``label_sync_s`` seconds, and the
        prediction-record writer."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(self.config.label_sync_s):
                self.check()

        def write() -> None:
            backoff = self.config.record_delay_s
            while not self._stop.is_set():
                written = self.write_pending(wait_s=self.config.record_delay_s / 2)
                if written or not self._backlog:
                    backoff = self.config.record_delay_s
                else:  # the store is down: retry the held-back records with back-off (up to 5 s)
                    self._stop.wait(backoff)
                    backoff = min(2 * backoff, 5.0)

        self._thread = threading.Thread(target=loop, name="labelmatch-state", daemon=True)
        self._thread.start()
        self._writer = threading.Thread(target=write, name="labelmatch-records", daemon=True)
        self._writer.start()

    def stop(self) -> None:
        """Write what is queued, stop the background threads and release connections (records
        still held back by an outage are dropped and counted)."""
        if self._writer is not None:
            self.flush()
        self._stop.set()
        for thread in (self._thread, self._writer):
            if thread is not None:
                thread.join(timeout=10)
        while self._backlog and self.write_pending():  # one last try for what an outage held back
            pass
        if self._backlog:
            self._on_dropped(len(self._backlog))
            logger.error("prediction records dropped at shutdown: %d (the store was unreachable)",
                         len(self._backlog))
            self._backlog = []
        self.store.close()


__all__ = ["ReplicaState", "StateConfig", "StateUnavailable", "text_sha256"]
