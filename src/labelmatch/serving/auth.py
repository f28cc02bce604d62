"""Who is calling the model server's write endpoints, what they may do, and how often.

Feedback trains the next model, so it is an authenticated, rate-limited write. Two ways to know
the caller (``--auth``):

* ``tokens`` (default): ``Authorization: Bearer <token>`` matched against a tokens file, e.g. a
  key of a Kubernetes Secret mounted as a file (``--auth_tokens_file``, YAML or JSON)::

      tokens:
        - name: support-ui          # the principal stored with each feedback record
          token: "…"                # compared in constant time
          permissions: [feedback]
        - name: labelling-team
          token: "…"
          permissions: [feedback, feedback_text]
        - name: platform-admin
          token: "…"
          permissions: [admin]

  ``LABELMATCH_ADMIN_TOKEN``, when set, adds a principal ``admin`` with the ``admin`` permission.
* ``header``: a mesh or gateway in front (Istio, an auth proxy) has authenticated the caller and
  sets a trusted header (``--auth_header``, default ``x-auth-request-user``); every principal gets
  ``--auth_header_permissions``. Only safe when nothing else can reach the pods (the serving
  chart's NetworkPolicy).
* ``none``: no authentication (a laptop); feedback is stored under principal ``anonymous``, and
  label updates still need ``LABELMATCH_ADMIN_TOKEN``.

Permissions: ``feedback`` (rate a served prediction by its id), ``feedback_text`` (feedback with
free text and labels, which no served prediction backs), ``admin`` (label-set updates).

:class:`RateLimiter` is a token bucket per principal (``--feedback_rate_per_minute``,
``--feedback_burst``); a refusal carries ``Retry-After``.
"""

from __future__ import annotations

import hmac
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from labelmatch.core.errors import ConfigError

PERMISSIONS = ("feedback", "feedback_text", "admin")
AuthMode = Literal["tokens", "header", "none"]
ANONYMOUS = "anonymous"


class AuthRefused(Exception):
    """A write the caller may not make: HTTP status, message, reason (a metric label) and headers."""

    def __init__(self, status: int, message: str, reason: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.reason, self.headers = status, reason, headers or {}


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    Attributes:
        name: Stored with each feedback record.
        permissions: What it may do (:data:`PERMISSIONS`).
    """

    name: str
    permissions: frozenset[str]


@dataclass(frozen=True)
class AuthConfig:
    """How the server authenticates writes.

    Attributes:
        mode: ``tokens``, ``header`` or ``none``.
        tokens: ``token -> principal`` (``tokens`` mode).
        header: The trusted identity header (``header`` mode), lower case.
        header_permissions: Permissions of a header-authenticated principal.
        admin_token: ``LABELMATCH_ADMIN_TOKEN`` (a principal ``admin`` in every mode).
    """

    mode: AuthMode = "tokens"
    tokens: dict[str, Principal] = field(default_factory=dict)
    header: str = "x-auth-request-user"
    header_permissions: frozenset[str] = frozenset({"feedback"})
    admin_token: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("tokens", "header", "none"):
            raise ConfigError(f"--auth must be tokens, header or none, got {self.mode!r}")
        unknown = set(self.header_permissions) - set(PERMISSIONS)
        if unknown:
            raise ConfigError(f"--auth_header_permissions: unknown {', '.join(sorted(unknown))} "
                              f"(known: {', '.join(PERMISSIONS)})")

    def authenticate(self, headers: dict[str, str]) -> Principal | None:
        """The caller of a request (``headers`` with lower-case names), ``None`` when unknown."""
        bearer = _bearer(headers.get("authorization", ""))
        if bearer and self.admin_token and hmac.compare_digest(bearer.encode(), self.admin_token.encode()):
            return Principal("admin", frozenset({"admin"}))
        if self.mode == "none":
            return Principal(ANONYMOUS, frozenset({"feedback", "feedback_text"}))
        if self.mode == "header":
            name = headers.get(self.header, "").strip()
            return Principal(name, self.header_permissions) if name else None
        if bearer:
            for token, principal in self.tokens.items():  # every comparison, constant time each
                if hmac.compare_digest(bearer.encode(), token.encode()):
                    return principal
        return None

    def require(self, headers: dict[str, str], permission: str) -> Principal:
        """The caller, if it may ``permission``.

        Raises:
            AuthRefused: 401 (no or unknown credentials) or 403 (not permitted).
        """
        principal = self.authenticate(headers)
        if permission == "admin" and principal is not None and principal.name == ANONYMOUS:
            principal = None  # without authentication nobody is an admin: LABELMATCH_ADMIN_TOKEN
        if principal is None:
            how = (f"the {self.header!r} header set by the gateway" if self.mode == "header"
                   else "'Authorization: Bearer <token>' with a token of --auth_tokens_file")
            if permission == "admin" and self.mode == "none" and not self.admin_token:
                raise AuthRefused(403, "label updates are disabled: start the server with "
                                       "LABELMATCH_ADMIN_TOKEN set", "disabled")
            raise AuthRefused(401, f"{permission} needs {how}", "unauthenticated",
                              {"WWW-Authenticate": "Bearer"} if self.mode != "header" else {})
        if permission not in principal.permissions:
            raise AuthRefused(403, f"principal {principal.name!r} may not {permission.replace('_', ' ')} "
                                   f"(its permissions: {', '.join(sorted(principal.permissions)) or 'none'})",
                              "forbidden")
        return principal


def _bearer(value: str) -> str:
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def load_tokens(path: str | Path) -> dict[str, Principal]:
    """Read a tokens file (see the module docstring).

    Raises:
        ConfigError: One line naming the file, the entry and the field.
    """
    import yaml

    source = Path(path)
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{source}: cannot read the tokens file: {exc}".splitlines()[0]) from None
    entries = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: expected a mapping with a 'tokens' list")
    tokens: dict[str, Principal] = {}
    names: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"{source}: tokens[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with name, token, permissions")
        name, token = entry.get("name"), entry.get("token")
        permissions = entry.get("permissions", ["feedback"])
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}: field 'name': expected a non-empty string")
        if not isinstance(token, str) or len(token) < 16:
            raise ConfigError(f"{where}: field 'token': expected a string of at least 16 characters")
        if not isinstance(permissions, list) or not all(p in PERMISSIONS for p in permissions):
            raise ConfigError(f"{where}: field 'permissions': expected a list of {', '.join(PERMISSIONS)}")
        if name in names or token in tokens:
            raise ConfigError(f"{where}: duplicate {'name' if name in names else 'token'}")
        names.add(name)
        tokens[token] = Principal(name, frozenset(permissions))
    return tokens


class RateLimiter:
    """A token bucket per principal: ``per_minute`` writes a minute, bursts up to ``burst``.

    Args:
        per_minute: Sustained rate (0: unlimited).
        burst: Bucket size.
        max_principals: Buckets kept (the least recently used are forgotten beyond it).
    """

    def __init__(self, per_minute: float, burst: int, max_principals: int = 100_000):
        if per_minute < 0 or burst < 1:
            raise ConfigError(f"rate limit: need per_minute >= 0 and burst >= 1, got {per_minute}, {burst}")
        self.rate, self.burst, self.max_principals = per_minute / 60.0, burst, max_principals
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, principal: str, now: float | None = None) -> None:
        """Spend one write of ``principal``.

        Raises:
            AuthRefused: 429 with ``Retry-After`` (whole seconds) when its bucket is empty.
        """
        if self.rate <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(principal, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[principal] = (tokens, now)
                wait = math.ceil((1.0 - tokens) / self.rate)
                raise AuthRefused(429, f"principal {principal!r} sends feedback faster than "
                                       f"{self.rate * 60:g} a minute; retry in {wait} s", "rate_limited",
                                  {"Retry-After": str(wait)})
            self._buckets[principal] = (tokens - 1.0, now)
            while len(self._buckets) > self.max_principals:
                self._buckets.pop(next(iter(self._buckets)))


def auth_from_args(args: Any, admin_token: str | None) -> AuthConfig:
    """:class:`AuthConfig` from the server's flags."""
    tokens = load_tokens(args.auth_tokens_file) if args.auth_tokens_file else {}
    permissions = frozenset(p.strip() for p in args.auth_header_permissions.split(",") if p.strip())
    return AuthConfig(args.auth, tokens, args.auth_header.lower(), permissions, admin_token)
