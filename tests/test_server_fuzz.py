"""Bad request bodies against the real model server (127.0.0.1): each answered with a 4xx and a JSON
message naming the problem, never a 500, and the server stays up; a refused request leaves one
log line, not a traceback."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_server import ADMIN_TOKEN, ModelServer

NAME = "labelmatch"
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
#: Bodies shaped like the real ones, with any values in their fields.
V1 = st.fixed_dictionaries(
    {"instances": JSON}, optional={"labels": JSON, "replace_labels": JSON, "similarities": JSON}
)
V2 = st.fixed_dictionaries(
    {
        "inputs": st.lists(
            st.fixed_dictionaries({"name": JSON, "shape": JSON, "datatype": JSON, "data": JSON}), max_size=2
        )
    },
    optional={"parameters": JSON},
)
FEEDBACK = st.fixed_dictionaries(
    {"score": JSON},
    optional={
        "prediction_id": JSON,
        "text": JSON,
        "predicted_labels": JSON,
        "scores": JSON,
        "corrected_labels": JSON,
    },
)
LABELS = st.fixed_dictionaries({"labels": JSON}, optional={"thresholds": JSON})


@pytest.fixture(scope="module")
def server(onnx_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(onnx_model[0], root / "model")
    server = ModelServer(
        root / "model",
        root / "server.log",
        "--state_dir",
        str(root / "state"),
        "--feedback_rate_per_minute",
        "0",
    )
    server.start()
    yield server
    server.stop()


ENDPOINTS = {
    "v1": ("POST", f"/v1/models/{NAME}:predict"),
    "v2": ("POST", f"/v2/models/{NAME}/infer"),
    "feedback": ("POST", f"/v2/models/{NAME}/feedback"),
    "labels": ("PUT", f"/v2/models/{NAME}/labels"),
}


def _send(server: ModelServer, endpoint: str, body: bytes) -> requests.Response:
    method, path = ENDPOINTS[endpoint]
    headers = {"content-type": "application/json"}
    if endpoint == "labels":  # an admin's body; feedback goes in as the anonymous principal (--auth none)
        headers["authorization"] = f"Bearer {ADMIN_TOKEN}"
    return requests.request(method, server.base + path, data=body, timeout=60, headers=headers)


def _answered(response: requests.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert isinstance(response.json().get("error"), str) and response.json()["error"]


@pytest.mark.parametrize(
    "endpoint,strategy",
    [("v1", V1), ("v2", V2), ("feedback", FEEDBACK), ("labels", LABELS), ("feedback", JSON), ("v1", JSON)],
)
def test_random_json_never_gets_a_500(server, endpoint, strategy):
    @settings(
        max_examples=int(os.environ.get("LABELMATCH_FUZZ_EXAMPLES", "40")),
        deadline=None,
        derandomize=not os.environ.get("LABELMATCH_FUZZ_EXAMPLES"),
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(body=strategy)
    def run(body):
        _answered(_send(server, endpoint, json.dumps(body).encode()))

    run()
    assert requests.get(f"{server.base}/v2/models/{NAME}/ready", timeout=10).status_code == 200


def test_the_listed_bad_bodies_get_a_400_naming_the_problem(server):
    deep = "[" * 10_000 + "]" * 10_000
    cases = [
        ("v1", '{"instances": ' + deep + "}", "nests 10001 levels deep"),
        ("v1", '{"instances": ["a"], "labels": ' + '{"a": ' * 5000 + '"x"' + "}" * 5000 + "}", "levels deep"),
        ("v1", '{"instances": ["   "]}', "document 0 is empty or only whitespace"),
        ("v1", '{"instances": [""]}', "document 0 is empty"),
        ("feedback", '{"prediction_id": "x", "score": "5"}', "field 'score'"),
        ("feedback", '{"prediction_id": "x", "score": null}', "field 'score'"),
        ("feedback", '{"prediction_id": "x", "score": true}', "field 'score'"),
        ("feedback", '{"prediction_id": "x", "score": 3.5}', "field 'score'"),
        ("feedback", '{"prediction_id": "x", "score": 6}', "field 'score'"),
        ("feedback", '{"text": "  ", "predicted_labels": ["vat"], "score": 3}', "field 'text'"),
        ("feedback", '{"prediction_id": "x", "score": 3, "extra": 1}', "field 'extra'"),
        ("labels", '{"labels": {"vat": 5}}', "field 'labels.vat'"),
        (
            "labels",
            '{"labels": {"vat": "VAT"}, "thresholds": {"default": "0.5"}}',
            "field 'thresholds.default'",
        ),
    ]
    log_before = server.log_path.read_text()
    for endpoint, body, message in cases:
        response = _send(server, endpoint, body.encode())
        assert response.status_code == 400, (body[:80], response.status_code, response.text[:200])
        assert message in response.json()["error"], (body[:80], response.json())
    new_log = server.log_path.read_text()[len(log_before) :]
    assert "Traceback" not in new_log, new_log[-3000:]
    assert requests.get(f"{server.base}/v2/models/{NAME}/ready", timeout=10).status_code == 200
