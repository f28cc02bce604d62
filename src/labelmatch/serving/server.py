"""The KServe model server over an OnnxModel artifact (no torch on this path).

Run::

    labelmatch serve --model runs/onnx --host 127.0.0.1 --port 8080
    python -m labelmatch.serving.server --model_dir runs/onnx --http_port 8080 --host 127.0.0.1

Endpoints (``NAME`` is ``--model_name``, default ``labelmatch``):

* ``POST /v1/models/NAME:predict`` ``{"instances": [{"text": ...} | "text", ...], "labels": {...},
  "replace_labels": false, "similarities": false}``
* ``POST /v2/models/NAME/infer`` Open Inference Protocol v2: a BYTES tensor ``text`` of shape
  ``[n]``; request ``parameters`` may carry ``labels`` (a JSON object string) and ``replace_labels``.
* ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2/models/NAME/ready``, ``GET /v2/models/NAME``
  (metadata with the model version), ``GET /metrics`` (Prometheus).
* ``GET|PUT /v2/models/NAME/labels``: the served label set; ``PUT`` (admin, bearer token from
  ``LABELMATCH_ADMIN_TOKEN``) stores a new version in the shared state and serves it; every
  replica serves it within ``--label_sync_s``.
* ``POST /v2/models/NAME/feedback``: ``{"prediction_id" | "text" + "predicted_labels", "score": 1-5,
  "corrected_labels": [...]}`` into the feedback store; a prediction id resolves on any replica.
* ``GET /v2/models/NAME/state``: 200 while the shared state accepts writes, else 503 with the
  reason (the chart's readiness probe).

A ``--log_sample_rate`` share of predictions also goes to the prediction log that
``labelmatch monitor`` compares with the model's reference profile; the newest monitor report
of the served model version is exported on ``/metrics`` (``labelmatch_drift_*``,
docs/monitoring.md).

State (label sets, prediction records, feedback) lives in one SQL database named by
``--state_url`` / ``LABELMATCH_STATE_URL`` (:mod:`labelmatch.state`): a SQLite file under
``--state_dir`` by default, PostgreSQL when several replicas serve.

KServe's REST server binds ``0.0.0.0`` unconditionally (``RESTServer`` builds its uvicorn config
with a fixed host); :class:`BoundModelServer` sets the bind address from ``--host`` (default
``127.0.0.1``) before serving. KServe's gRPC server always binds ``[::]``, so gRPC is off unless
asked for, and then only together with an all-interfaces ``--host``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import kserve
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve.model_server import ModelServer
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from labelmatch.core.artifacts import artifact_digest, verify_artifact
from labelmatch.core.errors import ArtifactError, ConfigError, DataError, LabelmatchError
from labelmatch.data.dataset import load_labels
from labelmatch.model.matching import Thresholds, check_label_count
from labelmatch.runtime.onnx_classifier import OnnxClassifier, OrtConfig
from labelmatch.serving.auth import AuthConfig, AuthRefused, RateLimiter, auth_from_args
from labelmatch.serving.load_probe import PROBE, probe_engine_at_load
from labelmatch.serving.metrics import RequestGuard, RequestLimits, ServeMetrics
from labelmatch.serving.request_schema import FeedbackBody, LabelsBody, parse
from labelmatch.serving.shadow import ShadowMirror
from labelmatch.state.replica import ReplicaState, StateConfig
from labelmatch.state.serving_state import LabelSet, StateUnavailable

logger = logging.getLogger("labelmatch.serving.server")
ALL_INTERFACES = ("0.0.0.0", "::")


class RequestRejected(Exception):
    """A request the server refuses, with the HTTP status and a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServeConfig:
    """Everything the model server needs besides KServe's own flags.

    Attributes:
        model_dir: The OnnxModel artifact (may be read-only).
        name: Model name on the endpoint paths.
        state_dir: Writable directory of the default SQLite state (``<model_dir>-state``).
        state: The shared serving state (label sets, prediction records); an empty ``url``
            means a SQLite file under ``state_dir`` (one replica).
        limits: Request limits.
        ort: ONNX Runtime settings.
        engine: The serving engine (:mod:`labelmatch.runtime.engines`); ``None`` serves the one
            the export's probe picked and recorded in the artifact; ``probe`` re-runs the probe
            on this machine at load (:mod:`labelmatch.serving.load_probe`).
        feedback_url: SQLAlchemy URL of the feedback store (default: the state's URL).
        admin_token: Bearer token for label-set updates (a principal ``admin``; see
            :mod:`labelmatch.serving.auth`).
        auth: How feedback and label updates are authenticated (:mod:`labelmatch.serving.auth`).
        feedback_rate: ``(writes per minute, burst)`` of feedback per principal (0: unlimited).
        inference_threads: Threads running predictions (requests queue for them, which keeps
            the event loop free for health checks and metrics under load).
        labels_file: A ``labels.json`` (e.g. from a ConfigMap) served instead of the model's.
        thresholds_file: A ``thresholds.json`` to go with it (or on its own).
        expected_digest: Refuse to start unless the artifact has this digest (set by deploy).
        label_set_version: Serve this stored label set (0: the model's own labels) instead of the
            newest one (a rollback restores its release's); ``None``: the newest.
        release_id: The release this server belongs to (set by deploy; reported, never checked).
        shadow_url: Mirror every prediction request to this shadow ``:predict`` URL
            (:mod:`labelmatch.serving.shadow`); ``None``: mirror where the serving state's shadow
            target for this model version says, if anywhere.
        shadow_queue: Requests that may wait for the mirror (more are not mirrored, counted).
        shadow_timeout_s: How long one mirrored request may take.
    """

    model_dir: Path
    name: str = "labelmatch"
    state_dir: Path | None = None
    state: StateConfig = field(default_factory=lambda: StateConfig(""))
    limits: RequestLimits = field(default_factory=RequestLimits)
    ort: OrtConfig = field(default_factory=OrtConfig)
    engine: str | None = None
    feedback_url: str | None = None
    admin_token: str | None = None
    auth: AuthConfig = field(default_factory=lambda: AuthConfig("none"))
    feedback_rate: tuple[float, int] = (120.0, 60)
    inference_threads: int = 1
    labels_file: Path | None = None
    thresholds_file: Path | None = None
    expected_digest: str | None = None
    label_set_version: int | None = None
    release_id: str = ""
    shadow_url: str | None = None
    shadow_queue: int = 1000
    shadow_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.admin_token and not self.auth.admin_token:
            self.auth = replace(self.auth, admin_token=self.admin_token)

    def state_config(self) -> StateConfig:
        """The state settings, defaulting to a SQLite file under ``state_dir``."""
        if self.state.url:
            return self.state
        directory = self.state_dir or Path(f"{self.model_dir}-state")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the state directory {directory}: {exc}; pass a writable "
                              "--state_dir or a --state_url") from exc
        return replace(self.state, url=f"sqlite:///{directory / 'serving.db'}")


@dataclass
class ParsedRequest:
    """A validated prediction request of either protocol."""

    texts: list[str]
    ids: list[str | None]
    labels: dict[str, str] | None
    replace: bool
    similarities: bool
    v2_id: str | None = None


class LabelmatchModel(kserve.Model):
    """A KServe predictor over :class:`OnnxClassifier` (v1 and v2 protocols).

    Args:
        config: Server configuration.
        metrics: Prometheus metrics.
    """

    def __init__(self, config: ServeConfig, metrics: ServeMetrics):
        super().__init__(config.name, return_response_headers=True)
        self.config = config
        self.metrics = metrics
        self.classifier: OnnxClassifier | None = None
        #: What ``--engine probe`` measured at load (``None`` otherwise).
        self.engine_probe: dict[str, Any] | None = None
        self.state: ReplicaState | None = None
        self._executor = ThreadPoolExecutor(config.inference_threads, thread_name_prefix="inference")
        self._feedback_store: Any = None
        self._rate = RateLimiter(*config.feedback_rate)
        #: The loaded artifact's digest ("" before :meth:`load`).
        self.model_digest = ""
        #: Mirrors served requests to a shadow candidate (:mod:`labelmatch.serving.shadow`).
        self.mirror: ShadowMirror | None = None

    @property
    def label_set_version(self) -> int:
        """The version of the label set served (0: the model's own)."""
        return self.state.label_set_version if self.state else 0

    @property
    def model_version(self) -> str:
        """The served artifact's version ("loading" before :meth:`load`)."""
        return self.classifier.model_version if self.classifier else "loading"

    def load(self) -> bool:
        """Verify the artifact (refusing a corrupted file by name), load it and the label state."""
        verify_artifact(self.config.model_dir, "OnnxModel")
        expected = self.config.expected_digest
        actual = self.model_digest = artifact_digest(self.config.model_dir)
        if expected and actual != expected:
            raise ArtifactError(f"artifact {self.config.model_dir}: digest {actual} is not the expected "
                                f"{expected} (LABELMATCH_MODEL_DIGEST)")
        engine_name = self.config.engine
        if engine_name == PROBE:
            self.engine_probe = probe_engine_at_load(self.config.model_dir, self.config.ort)
            engine_name = self.engine_probe["picked"]
        self.classifier = OnnxClassifier.load(self.config.model_dir, self.config.ort, verify=False,
                                              engine_name=engine_name)
        logger.info("engine %s", self.classifier.engine)
        self.classifier.on_fallback = self.metrics.fp32_fallback.inc
        self._apply_config_files()
        from labelmatch.data.pii import redact_text

        self.mirror = ShadowMirror(
            lambda: self.model_version, self._log_shadow, self.config.shadow_url, self.config.shadow_queue,
            self.config.shadow_timeout_s,
            on_result=lambda result: self.metrics.shadow_documents.labels(result).inc(),
            on_dropped=self.metrics.shadow_dropped.inc, on_seconds=self.metrics.shadow_seconds.observe)
        self.state = ReplicaState(self.config.state_config(), self.classifier.model_version,
                                  self._serve_label_set, lambda text: redact_text(text)[0],
                                  on_written=self.metrics.state_seconds.observe,
                                  on_dropped=self.metrics.state_errors.inc,
                                  on_monitor=self.metrics.show_monitor_report,
                                  on_logged=self.metrics.logged_predictions.inc,
                                  on_shadow=None if self.config.shadow_url else self.mirror.set_target,
                                  service=self.config.name, on_delivery=self.metrics.show_delivery_event)
        if self.config.label_set_version is None:
            self.state.sync_labels()  # the newest label set stored for this model version, if any
        else:
            self.state.pin_labels(self.config.label_set_version)
        self.state.sync_monitor_report()  # and the newest drift report's gauges
        self.state.sync_shadow()  # a shadow target set for this model version
        self.state.sync_delivery()  # and the service's newest canary decision
        self.state.start()
        self.mirror.start()
        self.metrics.state_waiting.set_function(lambda: self.state.waiting if self.state else 0)
        from labelmatch.feedback.feedback_store import FeedbackStore

        self._feedback_store = FeedbackStore(self.config.feedback_url or self.state.config.url, redact=True)
        self.metrics.label_set_version.set(self.label_set_version)
        self.ready = True
        return True

    def _log_shadow(self, rows: Any) -> None:
        """Write mirrored documents to the shared state's shadow log."""
        if self.state is not None:
            self.state.store.log_shadow(rows)

    def _serve_label_set(self, label_set: LabelSet) -> None:
        """Serve a stored label set (from this replica's PUT or another's, via the sync)."""
        classifier = self.classifier
        assert classifier is not None
        classifier.set_labels(label_set.labels, label_set.thresholds)
        self.metrics.label_set_version.set(label_set.version)
        logger.info("serving label set v%d (%d labels)", label_set.version, len(label_set.labels))

    def _apply_config_files(self) -> None:
        """Serve the label set / thresholds of ``--labels`` / ``--thresholds`` (a ConfigMap)."""
        classifier = self.classifier
        assert classifier is not None
        if not (self.config.labels_file or self.config.thresholds_file):
            return
        labels = load_labels(self.config.labels_file) if self.config.labels_file else classifier.labels
        thresholds = {"default": classifier.default_threshold, "labels": classifier.label_thresholds}
        if self.config.thresholds_file:
            path = self.config.thresholds_file
            try:
                thresholds = Thresholds.from_json(json.loads(path.read_text())).to_json()
            except (OSError, json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
                raise DataError(path, f'expected {{"default": t, "labels": {{label: t}}}}: {exc}') from exc
        classifier.set_labels(labels, thresholds)

    # -- KServe handlers -------------------------------------------------------------------
    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": "text", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [
            {"name": "labels", "datatype": "BYTES", "shape": [-1]},
            {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
            {"name": "prediction_ids", "datatype": "BYTES", "shape": [-1]},
        ]

    async def preprocess(self, payload: dict | InferRequest,
                         headers: dict[str, str] | None = None) -> ParsedRequest:
        if isinstance(payload, InferRequest):
            return self._parse_v2(payload)
        return self._parse_v1(payload)

    async def predict(self, payload: ParsedRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._predict, payload)

    async def postprocess(self, result: dict[str, Any], headers: dict[str, str] | None = None,
                          response_headers: dict[str, str] | None = None) -> dict | InferResponse:
        request: ParsedRequest = result["request"]
        if response_headers is not None:  # W3C Server-Timing: lets a client split model time from the rest
            response_headers["server-timing"] = (f"inference;dur={result['inference_ms']:.3f}, "
                                                 f"state;dur={result['state_ms']:.3f}")
        if request.v2_id is None:
            return {"model_name": self.name, "model_version": result["model_version"],
                    "label_set_version": result["label_set_version"], "predictions": result["predictions"]}
        predictions = result["predictions"]
        names = result["label_names"]
        scores = [p["scores"][n] for p in predictions for n in names]
        label_lists = [json.dumps(p["labels"]) for p in predictions]
        outputs = [
            InferOutput("labels", [len(predictions)], "BYTES", label_lists),
            InferOutput("scores", [len(predictions), len(names)], "FP32", scores),
            InferOutput("prediction_ids", [len(predictions)], "BYTES", [p["id"] for p in predictions]),
        ]
        parameters = {"label_names": json.dumps(names), "label_set_version": result["label_set_version"]}
        return InferResponse(request.v2_id, self.name, outputs, model_version=result["model_version"],
                             parameters=parameters)

    # -- request parsing -------------------------------------------------------------------
    def _check_texts(self, texts: list[str]) -> None:
        limits = self.config.limits
        if not texts:
            raise RequestRejected(400, "the request has no documents")
        if len(texts) > limits.max_docs:
            raise RequestRejected(413, f"the request has {len(texts)} documents; the limit is "
                                       f"{limits.max_docs} per request (--max_docs)")
        for i, text in enumerate(texts):
            if not text.strip():
                raise RequestRejected(400, f"document {i} is empty or only whitespace")
            if len(text) > limits.max_chars:
                raise RequestRejected(413, f"document {i} has {len(text)} characters; the limit is "
                                           f"{limits.max_chars} (--max_chars)")

    def _parse_v1(self, payload: Any) -> ParsedRequest:
        if isinstance(payload, bytes | str):
            # KServe hands over the raw body when the content type is not JSON (curl -d); the
            # RequestGuard has already checked that it parses; a body that is one JSON string
            # arrives as that string.
            try:
                payload = json.loads(payload)
            except (ValueError, RecursionError):
                raise RequestRejected(400, 'expected a JSON object with an "instances" list') from None
        if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
            raise RequestRejected(400, 'expected a JSON object with an "instances" list')
        texts, ids = [], []
        for i, instance in enumerate(payload["instances"]):
            if isinstance(instance, str):
                texts.append(instance)
                ids.append(None)
            elif isinstance(instance, dict) and isinstance(instance.get("text"), str):
                texts.append(instance["text"])
                ids.append(str(instance["id"]) if "id" in instance else None)
            else:
                message = f'instances[{i}]: expected a string or an object with a string "text"'
                raise RequestRejected(400, message)
        self._check_texts(texts)
        labels = _check_labels(payload.get("labels"), "labels")
        replace = _check_bool(payload.get("replace_labels", False), "replace_labels")
        if replace and not labels:
            raise RequestRejected(400, "replace_labels is true but the request carries no labels")
        similarities = _check_bool(payload.get("similarities", False), "similarities")
        return ParsedRequest(texts, ids, labels, replace, similarities)

    def _parse_v2(self, request: InferRequest) -> ParsedRequest:
        inputs = [i for i in request.inputs if i.name == "text"] or request.inputs
        if len(inputs) != 1:
            raise RequestRejected(400, 'expected one BYTES input tensor named "text"')
        tensor = inputs[0]
        if tensor.datatype != "BYTES":
            message = f'input "{tensor.name}" has datatype {tensor.datatype}; expected BYTES'
            raise RequestRejected(400, message)
        texts = []
        for item in _flatten(tensor.data if tensor.data is not None else []):
            if isinstance(item, bytes):
                try:
                    item = item.decode("utf-8")
                except UnicodeDecodeError as exc:
                    message = f'input "{tensor.name}" holds bytes that are not UTF-8: {exc}'
                    raise RequestRejected(400, message) from exc
            if not isinstance(item, str):
                message = f'input "{tensor.name}" must hold strings, got {type(item).__name__}'
                raise RequestRejected(400, message)
            texts.append(item)
        self._check_texts(texts)
        params = dict(request.parameters or {})
        raw_labels = params.get("labels")
        if isinstance(raw_labels, str):
            try:
                raw_labels = json.loads(raw_labels)
            except json.JSONDecodeError as exc:
                raise RequestRejected(400, f'parameters.labels is not a JSON object string: {exc}') from exc
        labels = _check_labels(raw_labels, "parameters.labels")
        replace = _check_bool(params.get("replace_labels", False), "parameters.replace_labels")
        if replace and not labels:
            raise RequestRejected(400, "replace_labels is true but the request carries no labels")
        request_id = request.id or str(uuid.uuid4())
        return ParsedRequest(texts, [None] * len(texts), labels, replace, False, request_id)

    # -- prediction ------------------------------------------------------------------------
    def _predict(self, request: ParsedRequest) -> dict[str, Any]:
        classifier = self.classifier
        assert classifier is not None  # KServe routes only to ready models
        label_set_version = self.label_set_version
        start = time.perf_counter()
        served = classifier.predict(request.texts, request.labels, request.replace)
        names = list(served[0].scores) if served else list(classifier.resolve_labels(request.labels,
                                                                                     request.replace))
        predictions = [p.to_json(request.similarities) for p in served]
        elapsed = time.perf_counter() - start
        self.metrics.inference_seconds.observe(elapsed)
        self.metrics.batch_documents.observe(len(request.texts))
        self.metrics.count_labels((p["labels"] for p in predictions), set(classifier.labels))
        ids = [uuid.uuid4().hex for _ in predictions]
        for doc_id, prediction_id, prediction in zip(request.ids, ids, predictions, strict=True):
            prediction["id"] = prediction_id
            if doc_id is not None:
                prediction["doc_id"] = doc_id
        state_seconds = self._record(ids, request.texts, predictions, label_set_version)
        if self.mirror is not None:
            self.mirror.offer(request.texts, predictions, elapsed * 1000, request.labels, request.replace)
        return {"request": request, "predictions": predictions, "label_names": names,
                "model_version": classifier.model_version, "label_set_version": label_set_version,
                "inference_ms": elapsed * 1000, "state_ms": state_seconds * 1000}

    def _record(self, ids: list[str], texts: list[str], predictions: list[dict[str, Any]],
                label_set_version: int) -> float:
        """Queue the predictions for the shared state (written behind the response); seconds it took.
        A store outage never fails the request: the predictions are served, their ids just
        cannot take feedback."""
        assert self.state is not None
        start = time.perf_counter()
        self.state.record(ids, texts, predictions, label_set_version)
        return time.perf_counter() - start

    def stop(self) -> None:
        """Write the queued prediction records and stop the state threads (KServe's unload)."""
        super().stop()
        if self.mirror is not None:
            self.mirror.stop()
        if self.state is not None:
            self.state.stop()

    # -- admin and feedback ----------------------------------------------------------------
    def served(self) -> dict[str, Any]:
        """What this server serves: model version and artifact digest, engine, label-set version and
        the release it was deployed as (a deploy and a rollback compare these with the release)."""
        classifier = self.classifier
        assert classifier is not None
        return {"model_version": classifier.model_version, "model_digest": self.model_digest,
                "engine": classifier.engine, "label_set_version": self.label_set_version,
                "release_id": self.config.release_id}

    def label_state(self) -> dict[str, Any]:
        """The served label set, thresholds and versions."""
        classifier = self.classifier
        assert classifier is not None
        return {**self.served(), "labels": classifier.labels,
                "thresholds": {"default": classifier.default_threshold,
                               "labels": classifier.label_thresholds}}

    def update_labels(self, body: Any, headers: dict[str, str]) -> dict[str, Any]:
        """Validate, persist and serve a new label set (the ``admin`` permission)."""
        self._refusing("labels", lambda: self.config.auth.require(headers, "admin"))
        try:
            request = parse(LabelsBody, body)
            check_label_count(len(request.labels))
        except (ValueError, ConfigError) as exc:
            self.metrics.refused.labels("labels", "invalid").inc()
            raise RequestRejected(400, f"label set refused: {exc}") from None
        classifier = self.classifier
        assert classifier is not None
        labels = dict(request.labels)
        default = request.thresholds.default
        default = classifier.default_threshold if default is None else default
        kept = {k: v for k, v in classifier.label_thresholds.items() if k in labels}
        new_thresholds = {"default": default, "labels": {**kept, **request.thresholds.labels}}
        assert self.state is not None
        try:
            self.state.save_labels(labels, new_thresholds)
        except StateUnavailable as exc:
            self.metrics.refused.labels("labels", "store_unavailable").inc()
            raise RequestRejected(503, f"label set not stored (nothing changed): {exc}") from exc
        return self.label_state()

    def _refusing(self, endpoint: str, check: Any) -> Any:
        """Run an auth check; count and re-raise its refusal."""
        try:
            return check()
        except AuthRefused as exc:
            self.metrics.refused.labels(endpoint, exc.reason).inc()
            raise

    def add_feedback(self, body: Any, headers: dict[str, str]) -> dict[str, Any]:
        """Store one feedback record of the calling principal.

        By ``prediction_id`` (the ``feedback`` permission): the served prediction is looked up and
        rated, once per prediction and principal (a repeat updates the record). By ``text`` and
        ``predicted_labels`` (the ``feedback_text`` permission): nothing served backs it. Each
        principal is rate-limited; every refusal is a 4xx and counts in ``labelmatch_refused_total``.
        """
        from labelmatch.feedback.feedback_store import FeedbackRecord
        from labelmatch.state.replica import text_sha256

        def refuse(status: int, reason: str, message: str) -> RequestRejected:
            self.metrics.refused.labels("feedback", reason).inc()
            return RequestRejected(status, message)

        by_id = not (isinstance(body, dict) and "prediction_id" not in body and "text" in body)
        permission = "feedback" if by_id else "feedback_text"
        principal = self._refusing("feedback", lambda: self.config.auth.require(headers, permission))
        self._refusing("feedback", lambda: self._rate.take(principal.name))
        try:
            request = parse(FeedbackBody, body)
        except ValueError as exc:
            raise refuse(400, "invalid", f"feedback rejected: {exc}") from None
        assert self.state is not None and self._feedback_store is not None
        if request.prediction_id is not None:
            try:
                stored = self.state.resolve(request.prediction_id)
            except StateUnavailable as exc:
                raise refuse(503, "store_unavailable", f"feedback not stored: {exc}") from exc
            if stored is None:
                ttl = self.state.config.prediction_ttl_s
                message = (f"unknown or expired prediction_id {request.prediction_id!r} (predictions are "
                           f"kept {ttl:g} s)")
                raise refuse(404, "unknown_prediction", message)
            text = stored.text
            if text is None:  # only the hash was kept: the client sends the text again
                text = request.text
                if text is None or text_sha256(text) != stored.text_sha256:
                    raise refuse(400, "invalid", 'this server keeps only a hash of predicted texts: send the '
                                                 'document as "text" with the prediction_id')
            served = {"text": text, "labels": stored.labels, "scores": stored.scores,
                      "model_version": stored.model_version}
        elif request.text is not None and request.predicted_labels is not None:
            served = {"text": request.text, "labels": request.predicted_labels,
                      "scores": request.scores or {}, "model_version": self.model_version}
        else:
            raise refuse(400, "invalid", 'feedback needs "prediction_id", or "text" with "predicted_labels"')
        record = FeedbackRecord(
            text=served["text"], model_version=served["model_version"],
            predicted_labels=list(served["labels"]), score=request.score, scores=dict(served["scores"]),
            corrected_labels=request.corrected_labels, source="serve" if by_id else "serve-text",
            principal=principal.name, prediction_id=request.prediction_id,
        )
        try:
            if request.prediction_id is not None:
                feedback_id, created = self._feedback_store.upsert(record)
            else:
                feedback_id, created = self._feedback_store.add(record), True
        except DataError as exc:
            raise refuse(400, "invalid", f"feedback rejected: {exc.message}") from exc
        except SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", exc) or exc).strip().splitlines()[0]
            raise refuse(503, "store_unavailable", f"feedback not stored: the feedback store is unreachable: "
                                                   f"{reason}") from exc
        self.metrics.feedback.inc()
        return {"id": feedback_id, "model_version": record.model_version, "principal": principal.name,
                "updated": not created}


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list | tuple):
        return [x for item in data for x in _flatten(item)]
    return [data]


def _check_labels(value: Any, where: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                              for k, v in value.items()):
        raise RequestRejected(400, f"{where} must be an object of non-empty strings {{label: description}}")
    try:
        check_label_count(len(value))
    except ConfigError as exc:
        raise RequestRejected(400, f"{where}: {exc}") from exc
    return value


def _check_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise RequestRejected(400, f"{where} must be true or false")
    return value


def add_routes(app: Any, model: LabelmatchModel) -> None:
    """Register labelmatch's own routes on KServe's FastAPI app (before KServe adds its own)."""
    prefix = f"/v2/models/{model.name}"

    async def rejected(_: Request, exc: RequestRejected) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def refused(_: Request, exc: AuthRefused) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=exc.headers)

    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"invalid request: {where}: {first.get('msg', exc)}"}, status_code=400)

    async def metadata() -> dict[str, Any]:
        served = model.served() if model.classifier is not None else {}
        return {"name": model.name, "versions": [model.model_version], "platform": "onnxruntime",
                "inputs": model.get_input_types(), "outputs": model.get_output_types(),
                "label_set_version": model.label_set_version, "served": served}

    async def get_labels() -> dict[str, Any]:
        return model.label_state()

    async def put_labels(request: Request) -> dict[str, Any]:
        body = json.loads(await request.body())
        return await run_in_threadpool(model.update_labels, body, dict(request.headers))

    async def state() -> JSONResponse:
        replica = model.state
        if replica is None or model.classifier is None:
            return JSONResponse({"error": "the model is not loaded yet"}, status_code=503)
        body = {"model_version": model.model_version, "label_set_version": model.label_set_version,
                "store": replica.store.safe_url}
        if replica.error is not None:
            return JSONResponse({**body, "error": replica.error}, status_code=503)
        return JSONResponse({**body, "state": "ok"})

    async def feedback(request: Request) -> dict[str, Any]:
        body = json.loads(await request.body())
        return await run_in_threadpool(model.add_feedback, body, dict(request.headers))

    app.add_exception_handler(RequestRejected, rejected)
    app.add_exception_handler(AuthRefused, refused)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_api_route(prefix, metadata, methods=["GET"])
    app.add_api_route(f"{prefix}/labels", get_labels, methods=["GET"])
    app.add_api_route(f"{prefix}/labels", put_labels, methods=["PUT"])
    app.add_api_route(f"{prefix}/feedback", feedback, methods=["POST"])
    app.add_api_route(f"{prefix}/state", state, methods=["GET"])


class BoundModelServer(ModelServer):
    """KServe's ModelServer, listening on ``host`` instead of the hard-coded ``0.0.0.0``.

    ``ModelServer.start`` builds the uvicorn config and then calls :meth:`setup_event_loop`
    before serving; that is the one hook between the two, so the bind address is set there.
    """

    def __init__(self, host: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.host = host

    def setup_event_loop(self) -> None:
        if self._rest_server is not None:
            self._rest_server.config.host = self.host
        super().setup_event_loop()


def _int_env(name: str) -> int | None:
    """An integer environment variable (``None`` when unset or empty)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r}: expected an integer") from None


def build_parser() -> argparse.ArgumentParser:
    """KServe's own argument parser plus labelmatch's flags."""
    from kserve.model_server import parser as kserve_parser

    parser = argparse.ArgumentParser(
        prog="labelmatch-serve", parents=[kserve_parser], allow_abbrev=False,
        description="Serve an OnnxModel artifact with KServe (v1 + v2 protocols).",
    )
    parser.add_argument("--model_dir", required=True, type=Path, help="The OnnxModel artifact directory.")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (0.0.0.0 in a pod).")
    parser.add_argument("--state_url", default=os.environ.get("LABELMATCH_STATE_URL"),
                        help="SQLAlchemy URL of the shared serving state: label sets, prediction records "
                             "and (by default) feedback; PostgreSQL for several replicas "
                             "(default: a SQLite file under --state_dir).")
    parser.add_argument("--state_dir", type=Path, default=os.environ.get("LABELMATCH_STATE_DIR"),
                        help="Directory of the default SQLite state (default: <model_dir>-state).")
    parser.add_argument("--label_sync_s", type=float, default=2.0,
                        help="How often a replica picks up label sets stored by another.")
    parser.add_argument("--record_delay_s", type=float, default=0.5,
                        help="Longest time before a prediction id resolves on every replica (records "
                             "are written behind the response).")
    parser.add_argument("--prediction_ttl_s", type=float, default=7 * 24 * 3600.0,
                        help="How long a prediction id takes feedback.")
    parser.add_argument("--prediction_text", choices=["redacted", "hash"], default="redacted",
                        help="Keep each prediction's PII-redacted text, or only its SHA-256 (feedback "
                             "then sends the text again).")
    parser.add_argument("--log_sample_rate", type=float, default=0.1,
                        help="Share of predictions written to the prediction log that `labelmatch monitor` "
                             "reads (0: off); text kept as --prediction_text says.")
    parser.add_argument("--log_max_rows", type=int, default=100_000,
                        help="Most rows of the prediction log (oldest deleted first).")
    parser.add_argument("--log_retention_s", type=float, default=30 * 24 * 3600.0,
                        help="Longest a logged prediction is kept.")
    parser.add_argument("--max_docs", type=int, default=64, help="Most documents per request (413 above).")
    parser.add_argument("--max_chars", type=int, default=20_000, help="Longest document (413 above).")
    parser.add_argument("--max_body_bytes", type=int, default=2 * 1024 * 1024,
                        help="Largest request body (413 above).")
    parser.add_argument("--labels", type=Path, help="labels.json served instead of the model's (ConfigMap).")
    parser.add_argument("--thresholds", type=Path, help="thresholds.json served instead of the model's.")
    parser.add_argument("--feedback_url", default=os.environ.get("LABELMATCH_FEEDBACK_URL"),
                        help="SQLAlchemy URL of the feedback store (default: the state URL).")
    parser.add_argument("--intra_op_threads", type=int, default=0,
                        help="ONNX Runtime intra-op threads (0: one per core).")
    parser.add_argument("--inter_op_threads", type=int, default=1, help="ONNX Runtime inter-op threads.")
    parser.add_argument("--allow_spinning", action="store_true",
                        help="Let ONNX Runtime threads busy-wait (off by default).")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="Documents per ONNX Runtime call (1: a score depends on its text alone, "
                             "see OrtConfig.batch_size).")
    parser.add_argument("--inference_threads", type=int, default=1, help="Concurrent predictions.")
    parser.add_argument("--engine", default=os.environ.get("LABELMATCH_ENGINE") or None,
                        help="Serving engine (ort-int8-dynamic, ort-int8-static, openvino-int8-static, "
                             "openvino-bf16, ort-fp32) instead of the one the export's probe picked; it "
                             "must be one the export measured (labelmatch.json 'engines'). 'probe': "
                             "time the engines that passed the export's gate on this machine at load "
                             "and serve the cheapest.")
    parser.add_argument("--label_set_version", type=int,
                        default=_int_env("LABELMATCH_LABEL_SET_VERSION"),
                        help="Serve this stored label set of the model (0: the model's own labels) instead "
                             "of the newest; later label-set updates are still served (a rollback sets it).")
    parser.add_argument("--auth", choices=["tokens", "header", "none"],
                        default=os.environ.get("LABELMATCH_AUTH", "none"),
                        help="How feedback and label updates are authenticated: bearer tokens of "
                             "--auth_tokens_file, a trusted identity header set by the gateway, or none (a "
                             "laptop; the serving chart and deploy use tokens). See labelmatch.serving.auth.")
    parser.add_argument("--auth_tokens_file", type=Path,
                        default=os.environ.get("LABELMATCH_AUTH_TOKENS_FILE") or None,
                        help="YAML/JSON {tokens: [{name, token, permissions}]} (a mounted Secret key).")
    parser.add_argument("--auth_header", default="x-auth-request-user",
                        help="The identity header a trusted gateway sets (--auth header).")
    parser.add_argument("--auth_header_permissions", default="feedback",
                        help="Permissions of a header-authenticated principal (comma-separated: feedback, "
                             "feedback_text, admin).")
    parser.add_argument("--feedback_rate_per_minute", type=float, default=120.0,
                        help="Feedback writes per principal and minute (0: unlimited); 429 above.")
    parser.add_argument("--feedback_burst", type=int, default=60, help="Feedback burst per principal.")
    parser.add_argument("--shadow_url", default=os.environ.get("LABELMATCH_SHADOW_URL") or None,
                        help="Mirror every prediction request to this shadow's v1 :predict URL and log "
                             "both answers in the serving state (default: where the state's shadow target "
                             "for this model version points, set by `labelmatch deploy --strategy shadow`).")
    parser.add_argument("--shadow_queue", type=int, default=1000,
                        help="Requests that may wait for the mirror; more are not mirrored (counted).")
    parser.add_argument("--shadow_timeout_s", type=float, default=10.0,
                        help="How long one mirrored request may take.")
    parser.set_defaults(model_name="labelmatch", enable_grpc=False, configure_logging=True)
    return parser


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """:class:`ServeConfig` from parsed flags (and ``LABELMATCH_ADMIN_TOKEN``)."""
    for flag in ("max_docs", "max_chars", "max_body_bytes", "batch_size", "inference_threads",
                 "shadow_queue"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.workers != 1:
        raise ConfigError("--workers must be 1: scale with replicas (each worker would load its own model)")
    if args.enable_grpc and args.host not in ALL_INTERFACES:
        raise ConfigError(f"KServe's gRPC server always binds all interfaces; with --host {args.host} keep "
                          "--enable_grpc false")
    state = StateConfig(args.state_url or "", args.prediction_ttl_s, args.prediction_text, args.label_sync_s,
                        record_delay_s=args.record_delay_s, log_sample_rate=args.log_sample_rate,
                        log_max_rows=args.log_max_rows, log_retention_s=args.log_retention_s)
    return ServeConfig(
        model_dir=args.model_dir, name=args.model_name, state_dir=args.state_dir, state=state,
        limits=RequestLimits(args.max_body_bytes, args.max_docs, args.max_chars),
        ort=OrtConfig(args.intra_op_threads, args.inter_op_threads, args.allow_spinning, args.batch_size),
        engine=args.engine, feedback_url=args.feedback_url,
        admin_token=os.environ.get("LABELMATCH_ADMIN_TOKEN") or None,
        auth=auth_from_args(args, os.environ.get("LABELMATCH_ADMIN_TOKEN") or None),
        feedback_rate=(args.feedback_rate_per_minute, args.feedback_burst),
        inference_threads=args.inference_threads, labels_file=args.labels, thresholds_file=args.thresholds,
        expected_digest=os.environ.get("LABELMATCH_MODEL_DIGEST") or None,
        label_set_version=args.label_set_version,
        release_id=os.environ.get("LABELMATCH_RELEASE_ID", ""),
        shadow_url=args.shadow_url, shadow_queue=args.shadow_queue, shadow_timeout_s=args.shadow_timeout_s,
    )


def serve(argv: list[str] | None = None) -> None:
    """Parse flags, load the model (refusing a corrupted artifact) and run the server."""
    from kserve.model_server import app

    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    metrics = ServeMetrics()
    model = LabelmatchModel(config, metrics)
    model.load()
    add_routes(app, model)
    app.add_middleware(RequestGuard, metrics=metrics, limits=config.limits,
                       version=lambda: model.model_version)
    server = BoundModelServer(
        args.host, http_port=args.http_port, grpc_port=args.grpc_port, workers=args.workers,
        enable_grpc=args.enable_grpc, enable_docs_url=args.enable_docs_url,
        enable_latency_logging=args.enable_latency_logging, access_log_format=args.access_log_format,
        event_loop=args.event_loop, timeout_keep_alive=args.timeout_keep_alive,
    )
    logger.info("serving %s (model version %s) on http://%s:%s", config.model_dir, model.model_version,
                args.host, args.http_port)
    server.start([model])


def main(argv: list[str] | None = None) -> None:
    """``python -m labelmatch.serving.server``: errors labelmatch raises on purpose are one line, exit 2."""
    try:
        serve(argv)
    except LabelmatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
