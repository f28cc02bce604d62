"""Bounded retry with exponential back-off for Kubernetes API calls that can fail for a moment.

What is retried (:func:`is_transient`): the API server's ``429 Too Many Requests`` (priority and
fairness, a webhook's rate limit) and ``5xx`` answers (an API server restarting behind its load
balancer, an aggregated API or etcd timing out), and the connection failing under the call
(``urllib3`` protocol errors such as a reset connection, connect and read timeouts, and Python's
own ``ConnectionError``). Everything else (``400``, ``401``, ``403``, ``404``, ``409``, ``422``, a
bad certificate) fails at once: asking again cannot change the answer.

A ``Retry-After`` header (seconds or an HTTP date) replaces the computed back-off, up to the
policy's longest wait. The ``kubernetes`` client's own ``urllib3`` pool may retry a few idempotent
requests underneath (its default ``Retry(3)``); this layer is the one that logs, bounds and backs off.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from labelmatch.core.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a Kubernetes API call is retried.

    The defaults wait 1, 2, 4, ... 60 s between 8 attempts (about 4 minutes in all): long enough
    for an API server to restart, short enough that a broken cluster fails the step the same hour.

    Attributes:
        attempts: Calls in all (1: no retry).
        first_delay_s: Wait after the first failure.
        factor: Each later wait is this many times the one before.
        max_delay_s: The longest single wait (also caps a ``Retry-After``).
        request_timeout_s: Connect and read timeout of each call, so that a connection that hangs
            becomes a retried timeout instead of a wait without end.
    """

    attempts: int = 8
    first_delay_s: float = 1.0
    factor: float = 2.0
    max_delay_s: float = 60.0
    request_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.first_delay_s < 0 or self.factor < 1 or self.max_delay_s < 0:
            raise ConfigError(
                f"retry policy needs attempts >= 1, delays >= 0 and factor >= 1, got {self}"
            )

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the ``failures``-th failed call (1-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_delay_s)
        return min(self.first_delay_s * self.factor ** (failures - 1), self.max_delay_s)


def _transient_connection_error(exc: BaseException) -> bool:
    import urllib3.exceptions as u3

    if isinstance(exc, u3.MaxRetryError):
        return exc.reason is not None and _transient_connection_error(exc.reason)
    return isinstance(exc, u3.ProtocolError | u3.TimeoutError | ConnectionError | TimeoutError)


def is_transient(exc: BaseException) -> bool:
    """True for a ``429``, a ``5xx`` or a connection failure: worth asking again."""
    from kubernetes.client import ApiException

    if isinstance(exc, ApiException):
        return exc.status == 429 or (exc.status or 0) >= 500
    return _transient_connection_error(exc)


def retry_after_s(exc: BaseException, now: float | None = None) -> float | None:
    """The ``Retry-After`` of an API answer in seconds (``None``: absent or unreadable).

    Args:
        exc: A ``kubernetes.client.ApiException`` (anything else has no header).
        now: The current time (``time.time()``) to count an HTTP date from.
    """
    headers = getattr(exc, "headers", None)
    value = headers.get("Retry-After") if headers else None
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


def describe(exc: BaseException) -> str:
    """A short description of a failed call: ``429 Too Many Requests``, ``ProtocolError: ...``."""
    status = getattr(exc, "status", None)
    if status is not None and hasattr(exc, "reason"):
        return f"{status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def call_with_retry(
    call: Callable[[], T],
    what: str,
    policy: RetryPolicy | None = None,
    log: Callable[[str], Any] | None = None,
    sleep: Callable[[float], Any] = time.sleep,
) -> T:
    """Run ``call``; when it fails transiently (:func:`is_transient`), wait and run it again.

    Args:
        call: The API call (no arguments; bind them with a lambda).
        what: What the call does, for the log (``reading RayJob ml/lm-tune-1``).
        policy: Attempts and back-off (default :class:`RetryPolicy`).
        log: Called with one line per retry.
        sleep: How to wait (tests pass a recorder).

    Returns:
        What ``call`` returned.

    Raises:
        Exception: The first error that is not transient, or the last one once the attempts
            are spent; the caller turns it into its own message.
    """
    policy = policy or RetryPolicy()
    failures = 0
    while True:
        try:
            return call()
        except Exception as exc:
            failures += 1
            if not is_transient(exc) or failures >= policy.attempts:
                raise
            delay = policy.delay(failures, retry_after_s(exc))
            if log is not None:
                log(f"{what}: {describe(exc)}; retry {failures}/{policy.attempts - 1} in {delay:g} s")
            sleep(delay)
