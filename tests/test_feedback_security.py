"""Feedback is an authenticated, rate-limited write: the real model server (127.0.0.1) with a tokens
file as the serving chart mounts it, and with a trusted identity header."""

from __future__ import annotations

import shutil

import pytest
import requests
from model_server import ModelServer

from labelmatch.core.errors import ConfigError
from labelmatch.serving.auth import AuthConfig, AuthRefused, RateLimiter, load_tokens

UI, TEAM, ADMIN = "ui-token-0123456789abcdef", "team-token-0123456789abcdef", "admin-token-0123456789abcdef"
TOKENS = f"""tokens:
  - name: support-ui
    token: {UI}
    permissions: [feedback]
  - name: labelling-team
    token: {TEAM}
    permissions: [feedback, feedback_text]
  - name: platform-admin
    token: {ADMIN}
    permissions: [admin]
"""


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def secured(onnx_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("secured")
    model_dir = root / "model"
    shutil.copytree(onnx_model[0], model_dir)
    tokens = root / "tokens.yaml"
    tokens.write_text(TOKENS)
    feedback_url = f"sqlite:///{root / 'feedback.db'}"
    server = ModelServer(
        model_dir,
        root / "server.log",
        "--state_dir",
        str(root / "state"),
        "--feedback_url",
        feedback_url,
        "--auth",
        "tokens",
        "--auth_tokens_file",
        str(tokens),
        "--feedback_rate_per_minute",
        "6",
        "--feedback_burst",
        "5",
    )
    server.start()
    yield server, feedback_url
    server.stop()


def _predict(base: str, text: str) -> dict:
    response = requests.post(f"{base}/v1/models/labelmatch:predict", json={"instances": [text]}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]


def _metric(base: str, reason: str) -> float:
    for line in requests.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(f'labelmatch_refused_total{{endpoint="feedback",reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_feedback_needs_a_principal_its_permission_and_keeps_one_record_per_prediction(secured):
    from labelmatch.feedback.feedback_store import FeedbackStore

    server, feedback_url = secured
    url = f"{server.base}/v2/models/labelmatch/feedback"
    served = _predict(server.base, "VAT return corrected after audit")
    body = {"prediction_id": served["id"], "score": 2}

    anonymous = requests.post(url, json=body, timeout=30)
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
    assert requests.post(url, json=body, headers=_bearer("not-a-token-at-all"), timeout=30).status_code == 401
    admin_only = requests.post(url, json=body, headers=_bearer(ADMIN), timeout=30)
    assert admin_only.status_code == 403 and "may not feedback" in admin_only.json()["error"]

    first = requests.post(url, json=body, headers=_bearer(UI), timeout=30)
    assert first.status_code == 200, first.text
    assert first.json()["principal"] == "support-ui" and first.json()["updated"] is False
    again = requests.post(
        url, json={**body, "score": 4, "corrected_labels": ["vat"]}, headers=_bearer(UI), timeout=30
    )
    assert again.status_code == 200 and again.json() == {**first.json(), "updated": True}
    other = requests.post(url, json=body, headers=_bearer(TEAM), timeout=30)
    assert other.status_code == 200 and other.json()["id"] != first.json()["id"]
    records = {r.principal: r for r in FeedbackStore(feedback_url).records()}
    assert set(records) == {"support-ui", "labelling-team"}
    assert (records["support-ui"].score, records["support-ui"].corrected_labels) == (4, ["vat"])
    assert records["support-ui"].prediction_id == served["id"]

    by_text = {"text": "A customs declaration", "predicted_labels": ["customs"], "score": 5}
    refused = requests.post(url, json=by_text, headers=_bearer(UI), timeout=30)
    assert refused.status_code == 403 and "feedback text" in refused.json()["error"]
    allowed = requests.post(url, json=by_text, headers=_bearer(TEAM), timeout=30)
    assert allowed.status_code == 200, allowed.text
    assert _metric(server.base, "unauthenticated") >= 2 and _metric(server.base, "forbidden") >= 2

    # Label updates need the admin permission.
    labels = {"labels": {"vat": "Value added tax."}}
    put = f"{server.base}/v2/models/labelmatch/labels"
    assert requests.put(put, json=labels, headers=_bearer(UI), timeout=30).status_code == 403
    assert requests.put(put, json=labels, timeout=30).status_code == 401
    assert requests.put(put, json=labels, headers=_bearer(ADMIN), timeout=60).status_code == 200


def test_a_principal_over_its_rate_gets_429_with_retry_after(secured):
    server, _ = secured
    url = f"{server.base}/v2/models/labelmatch/feedback"
    served = _predict(server.base, "Payroll tax withheld")
    statuses = []
    for _ in range(8):
        response = requests.post(
            url, json={"prediction_id": served["id"], "score": 3}, headers=_bearer(UI), timeout=30
        )
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert "faster than 6 a minute" in response.json()["error"]
    assert 429 in statuses and statuses[0] == 200
    assert _metric(server.base, "rate_limited") >= 1
    # Another principal has a bucket of its own.
    other = requests.post(
        url, json={"prediction_id": served["id"], "score": 3}, headers=_bearer(TEAM), timeout=30
    )
    assert other.status_code == 200, other.text


def test_header_mode_trusts_the_gateways_identity_header():
    config = AuthConfig("header", header="x-auth-request-user", header_permissions=frozenset({"feedback"}))
    alice = config.require({"x-auth-request-user": "alice@example.com"}, "feedback")
    assert alice.name == "alice@example.com"
    with pytest.raises(AuthRefused) as refused:
        config.require({}, "feedback")
    assert refused.value.status == 401 and "x-auth-request-user" in str(refused.value)
    with pytest.raises(AuthRefused) as refused:
        config.require({"x-auth-request-user": "alice"}, "feedback_text")
    assert refused.value.status == 403
    with pytest.raises(ConfigError, match="unknown write"):
        AuthConfig("header", header_permissions=frozenset({"write"}))


def test_tokens_file_errors_name_the_entry_and_field(tmp_path):
    path = tmp_path / "tokens.yaml"
    entry = f"  - name: a\n    token: {UI}\n"
    for text, message in (
        ("tokens: nope", r"expected a mapping with a 'tokens' list"),
        ("tokens:\n  - name: a\n    token: short", r"tokens\[0\]: field .token.: expected a string"),
        (f"tokens:\n{entry}    permissions: [root]", r"tokens\[0\]: field 'permissions'"),
        (f"tokens:\n{entry}  - name: a\n    token: {TEAM}", r"tokens\[1\]: duplicate name"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_tokens(path)


def test_rate_limiter_refills_at_its_rate():
    limiter = RateLimiter(per_minute=60, burst=2)
    limiter.take("a", now=0.0)
    limiter.take("a", now=0.0)
    with pytest.raises(AuthRefused) as refused:
        limiter.take("a", now=0.5)
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "1"}
    limiter.take("a", now=1.5)  # one more token after a second
    limiter.take("b", now=0.5)  # other principals are unaffected
