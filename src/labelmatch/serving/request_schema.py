"""The shapes of the model server's JSON request bodies, checked before any work.

Every body is first bounded (size and nesting depth: :func:`json_depth`, in the ASGI guard, so a
10,000-level document never reaches a recursive parser), then validated against a pydantic model
in strict mode: ``"5"``, ``true`` and ``3.5`` are not scores, an unknown field is an error, and
each refusal is a 400 naming the field (:func:`first_error`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

#: Deepest JSON nesting a request may have (the deepest valid body is 4: a v2 tensor's data).
MAX_JSON_DEPTH = 32
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)

NonEmpty = Annotated[str, StringConstraints(strip_whitespace=False, min_length=1, pattern=r"\S")]
Label = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"\S")]


def json_depth(body: bytes) -> int:
    """The deepest ``[``/``{`` nesting of a JSON document, without parsing it (strings skipped)."""
    depth = deepest = 0
    for char in _STRINGS.sub(b'""', body):
        if char in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif char in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FeedbackBody(_Strict):
    """``POST /v2/models/NAME/feedback``: a rating of a served prediction (by id) or of free text."""

    score: Annotated[int, Field(ge=1, le=5)]
    prediction_id: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    text: NonEmpty | None = None
    predicted_labels: list[Label] | None = None
    scores: dict[Label, Annotated[float, Field(ge=0.0, le=1.0)]] | None = None
    corrected_labels: list[Label] | None = None


class ThresholdsBody(_Strict):
    """Thresholds of a label set: a default and per-label values, each in [0, 1]."""

    default: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    labels: dict[Label, Annotated[float, Field(ge=0.0, le=1.0)]] = Field(default_factory=dict)


class LabelsBody(_Strict):
    """``PUT /v2/models/NAME/labels``: a new label set (and thresholds)."""

    labels: dict[Label, NonEmpty] = Field(min_length=1)
    thresholds: ThresholdsBody = Field(default_factory=ThresholdsBody)


def first_error(exc: ValidationError) -> str:
    """One line naming the first invalid field and why."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error.get("loc", ())) or "body"
    value = error.get("input")
    shown = "" if isinstance(value, dict | list) else f" (got {value!r:.60})"
    return f"field '{where}': {error.get('msg', 'invalid')}{shown}"


def parse(model: type[BaseModel], body: Any) -> Any:
    """``model`` validated from ``body``; raises :class:`ValueError` with :func:`first_error`'s line."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise ValueError(first_error(exc)) from None
