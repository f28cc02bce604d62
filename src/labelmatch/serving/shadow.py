"""Shadow traffic: the serving model server mirrors its prediction requests to a candidate.

The candidate (a *shadow*) gets a copy of live traffic; its answers are compared and logged, never
returned. The mirror lives in the model server because that works the same in both KServe modes
and needs no mesh: after a prediction is answered, :meth:`ShadowMirror.offer` puts the request's
documents, request-time labels, the served answers and the served inference time on a bounded
queue (it never blocks: when the queue is full the request is not mirrored, and counted); one
thread posts each to the shadow's v1 ``:predict`` URL and writes one row per document to the
serving state's ``shadow_log`` (:class:`~labelmatch.state.serving_state.ShadowRow`): both label
sets, the score shift and both inference times (the shadow's from its ``Server-Timing``).

Where the mirror points: ``--shadow_url`` (fixed), or the serving state's ``shadow_targets`` for
the served model version, which every replica polls with the label sets (``labelmatch deploy
--strategy shadow`` sets it for a window and clears it after). A shadow that is slow or down costs
the serving path nothing: its requests time out on the mirror's thread, and the rows say so.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from labelmatch.state.serving_state import ShadowRow, StateUnavailable

logger = logging.getLogger("labelmatch.serving.shadow")
_INFERENCE = re.compile(r"inference;dur=([0-9.]+)")


@dataclass
class MirroredRequest:
    """One served request waiting to be mirrored."""

    texts: list[str]
    labels: dict[str, str] | None
    replace: bool
    answers: list[dict[str, Any]]  # the served predictions: labels, scores
    serving_ms: float


def score_shift(served: dict[str, float], shadow: dict[str, float]) -> float | None:
    """Mean absolute difference of two answers' scores over the labels both scored (``None``: none)."""
    common = [name for name in served if name in shadow]
    if not common:
        return None
    return sum(abs(float(served[n]) - float(shadow[n])) for n in common) / len(common)


class ShadowMirror:
    """Mirror served prediction requests to a shadow, compare, and log the comparison.

    Args:
        model_version: Returns the serving model's version (for the rows).
        log: Writes rows (``ServingState.log_shadow``); a :class:`StateUnavailable` drops them.
        url: A fixed shadow ``:predict`` URL (``--shadow_url``); ``None``: set later by
            :meth:`set_target` (the serving state's shadow target).
        queue_size: Requests that may wait; more are not mirrored (counted).
        timeout_s: How long one mirrored request may take.
        on_result: Called per document with ``"agree"``, ``"disagree"`` or ``"error"`` (metrics).
        on_dropped: Called when a request is not mirrored (queue full).
        on_seconds: Called with each mirrored request's round trip, seconds.
    """

    def __init__(self, model_version: Callable[[], str], log: Callable[[Sequence[ShadowRow]], None],
                 url: str | None = None, queue_size: int = 1000, timeout_s: float = 10.0,
                 on_result: Callable[[str], None] | None = None,
                 on_dropped: Callable[[], None] | None = None,
                 on_seconds: Callable[[float], None] | None = None):
        self._model_version = model_version
        self._log = log
        self.url = url
        self.timeout_s = timeout_s
        self._queue: queue.Queue[MirroredRequest] = queue.Queue(queue_size)
        self._on_result = on_result or (lambda result: None)
        self._on_dropped = on_dropped or (lambda: None)
        self._on_seconds = on_seconds or (lambda seconds: None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._session: Any = None

    def set_target(self, url: str | None) -> None:
        """Mirror to ``url`` from now on (``None``: stop mirroring)."""
        if url != self.url:
            logger.info("shadow traffic %s", f"mirrored to {url}" if url else "no longer mirrored")
        self.url = url

    @property
    def active(self) -> bool:
        """Whether requests are mirrored now."""
        return self.url is not None

    def offer(self, texts: list[str], answers: list[dict[str, Any]], serving_ms: float,
              labels: dict[str, str] | None = None, replace: bool = False) -> None:
        """Queue a served request for the shadow (never blocks; a full queue drops it, counted)."""
        if self.url is None:
            return
        try:
            served = [{"labels": a["labels"], "scores": a["scores"]} for a in answers]
            self._queue.put_nowait(MirroredRequest(list(texts), labels, replace, served, serving_ms))
        except queue.Full:
            self._on_dropped()

    def start(self) -> None:
        """Start the mirroring thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="labelmatch-shadow", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread (requests still queued are not mirrored)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 2)

    def _run(self) -> None:
        import requests

        self._session = requests.Session()
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.mirror(item)
            except Exception:  # never let one bad answer stop the mirror
                logger.exception("mirroring a request to the shadow failed")

    def mirror(self, item: MirroredRequest) -> list[ShadowRow]:
        """Send one request to the shadow, compare its answers with the served ones, log the rows."""
        import requests

        url = self.url
        if url is None:
            return []
        session = self._session or requests
        body: dict[str, Any] = {"instances": item.texts}
        if item.labels:
            body.update(labels=item.labels, replace_labels=item.replace)
        request_id = uuid.uuid4().hex
        shadow_version, error, answers, shadow_ms = "", None, None, None
        start = time.perf_counter()
        try:
            response = session.post(url, json=body, timeout=self.timeout_s)
            if response.status_code == 200:
                payload = response.json()
                answers = payload.get("predictions")
                shadow_version = str(payload.get("model_version", ""))
                match = _INFERENCE.search(response.headers.get("server-timing", ""))
                shadow_ms = float(match.group(1)) if match else None
                if not isinstance(answers, list) or len(answers) != len(item.texts):
                    error, answers = "the shadow's answer does not have one prediction per document", None
            else:
                error = f"HTTP {response.status_code}: {response.text[:200]}"
        except (requests.RequestException, ValueError) as exc:
            error = type(exc).__name__
        self._on_seconds(time.perf_counter() - start)
        now = time.time()
        rows = []
        for index, served in enumerate(item.answers):
            shadow = answers[index] if answers is not None else None
            row = ShadowRow(
                request_id=request_id, model_version=self._model_version(), shadow_version=shadow_version,
                labels=list(served["labels"]),
                shadow_labels=None if shadow is None else list(shadow["labels"]),
                score_shift=None if shadow is None else score_shift(served["scores"],
                                                                    shadow.get("scores", {})),
                serving_ms=item.serving_ms, shadow_ms=shadow_ms, error=error, created_at=now)
            rows.append(row)
            self._on_result("error" if shadow is None else
                            "agree" if sorted(row.labels) == sorted(row.shadow_labels or []) else "disagree")
        try:
            self._log(rows)
        except StateUnavailable as exc:
            logger.warning("shadow rows not logged: %s", exc)
        return rows


__all__ = ["MirroredRequest", "ShadowMirror", "score_shift"]
