"""Strict CRD validation: unknown fields, wrong types, wrong kinds, preserved sub-trees."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from labelmatch.core.errors import ConfigError
from labelmatch.platform.k8s_schema import strict_schema, validate_against_crd

CRDS = Path(__file__).resolve().parents[2] / "shared" / "crds"
ISVC_CRD = CRDS / "serving.kserve.io_inferenceservices.yaml"
RAYJOB_CRD = CRDS / "ray.io_rayjobs.yaml"

ISVC = {
    "apiVersion": "serving.kserve.io/v1beta1",
    "kind": "InferenceService",
    "metadata": {"name": "tax", "namespace": "ml"},
    "spec": {
        "predictor": {
            "minReplicas": 1,
            "containers": [
                {
                    "name": "kserve-container",
                    "image": "ghcr.io/labelmatch/labelmatch-serve:0.1.0",
                    "resources": {"limits": {"cpu": "2", "memory": "2Gi"}, "requests": {"cpu": 1}},
                }
            ],
        }
    },
}


def changed(path: list[str | int], value: object) -> dict:
    obj = copy.deepcopy(ISVC)
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return obj


def test_valid_inference_service_passes() -> None:
    validate_against_crd(ISVC, ISVC_CRD)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (["spec", "predictor", "minReplica"], 1, r"\$\.spec\.predictor: .*'minReplica' was unexpected"),
        (
            ["spec", "predictor", "minReplicas"],
            "one",
            r"\$\.spec\.predictor\.minReplicas: 'one' is not of type",
        ),
        (
            ["spec", "predictor", "scaleMetric"],
            "gpu",
            r"\$\.spec\.predictor\.scaleMetric: 'gpu' is not one of",
        ),
        (
            ["spec", "predictor", "containers", 0, "imagee"],
            "x",
            r"\$\.spec\.predictor\.containers\[0\]: .*'imagee'",
        ),
    ],
)
def test_errors_name_the_json_path(path: list, value: object, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        validate_against_crd(changed(path, value), ISVC_CRD)


def test_kind_and_version_must_match_the_crd() -> None:
    with pytest.raises(ConfigError, match="not this CRD's kind 'RayJob'"):
        validate_against_crd(ISVC, RAYJOB_CRD)
    with pytest.raises(ConfigError, match="not served"):
        validate_against_crd({**ISVC, "apiVersion": "serving.kserve.io/v1alpha9"}, ISVC_CRD)
    with pytest.raises(ConfigError, match="apiVersion"):
        validate_against_crd({"kind": "InferenceService"}, ISVC_CRD)


def test_unreadable_or_foreign_crd_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read CRD file"):
        validate_against_crd(ISVC, tmp_path / "missing.yaml")
    not_a_crd = tmp_path / "configmap.yaml"
    not_a_crd.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap"}))
    with pytest.raises(ConfigError, match="not a CustomResourceDefinition"):
        validate_against_crd(ISVC, not_a_crd)


def test_strict_schema_respects_explicit_openness() -> None:
    schema = {
        "type": "object",
        "properties": {
            "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
            "preserved": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"a": {}},
            },
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
            # A field literally named "properties" is a field, not a keyword.
            "properties": {"type": "object", "properties": {"b": {"type": "integer"}}},
        },
    }
    strict = strict_schema(schema)
    assert strict["additionalProperties"] is False
    assert strict["properties"]["closed"]["additionalProperties"] is False
    assert "additionalProperties" not in strict["properties"]["preserved"]
    assert strict["properties"]["map"]["additionalProperties"] == {"type": "string"}
    assert strict["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in schema, "the input schema must not be modified"
