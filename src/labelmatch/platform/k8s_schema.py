"""Strict validation of custom resources (InferenceService, RayJob, ...) against their CRD schema.

A CRD's ``openAPIV3Schema`` tolerates unknown fields: the API server prunes them silently, so a
misspelt ``minReplica`` would be dropped without a word. To catch that before a cluster does, the
schema is made strict: every object schema that lists ``properties`` and sets neither
``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields`` gets
``additionalProperties: false``. The CRD files are the ones published by each project (see
``../shared/crds/README.md``); no cluster is needed.

Example:
    >>> validate_against_crd(manifest, "crds/serving.kserve.io_inferenceservices.yaml")
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from labelmatch.core.errors import ConfigError

PRESERVE_UNKNOWN = "x-kubernetes-preserve-unknown-fields"


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of an OpenAPI v3 schema that rejects fields it does not declare.

    Args:
        schema: A CRD version's ``openAPIV3Schema``.

    Returns:
        The same schema with ``additionalProperties: false`` on every object schema that has
        ``properties`` and allows neither extra properties nor unknown fields explicitly.
    """
    strict = copy.deepcopy(schema)
    _make_strict(strict)
    return strict


def _make_strict(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _make_strict(item)
        return
    if not isinstance(node, dict):
        return
    if "properties" in node and "additionalProperties" not in node and not node.get(PRESERVE_UNKNOWN):
        node["additionalProperties"] = False
    for key, child in node.items():
        # Under `properties` the keys are field names, not keywords: recurse into each field schema.
        if key == "properties" and isinstance(child, dict):
            for field_schema in child.values():
                _make_strict(field_schema)
        elif isinstance(child, dict | list):
            _make_strict(child)


@functools.lru_cache(maxsize=8)
def _load_crd(path: str) -> dict[str, Any]:
    """Parse a CRD file once per process (the KServe one is ~1 MB of YAML)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with open(path, encoding="utf-8") as handle:
            crd = yaml.load(handle, Loader=loader)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read CRD file: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
        raise ConfigError(f"{path}: not a CustomResourceDefinition")
    return crd


@functools.lru_cache(maxsize=16)
def _validator_for(path: str, api_version: str, kind: str) -> jsonschema.protocols.Validator:
    crd = _load_crd(path)
    spec = crd["spec"]
    if kind != spec["names"]["kind"]:
        raise ConfigError(f"{path}: object kind '{kind}' is not this CRD's kind '{spec['names']['kind']}'")
    group, _, version = api_version.rpartition("/")
    if group != spec["group"]:
        raise ConfigError(f"{path}: apiVersion '{api_version}' is not in group '{spec['group']}'")
    versions = {entry["name"]: entry for entry in spec["versions"]}
    if version not in versions:
        raise ConfigError(f"{path}: apiVersion '{api_version}' not served (versions: {sorted(versions)})")
    schema = strict_schema(versions[version]["schema"]["openAPIV3Schema"])
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return validator_class(schema)


def _json_path(error: jsonschema.ValidationError) -> str:
    path = "$"
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def validate_against_crd(obj: dict[str, Any], crd_path: str | Path) -> None:
    """Validate a custom resource strictly against the CRD that defines it.

    Args:
        obj: The resource as a dict (e.g. one document of ``helm template`` output).
        crd_path: Path of the ``CustomResourceDefinition`` YAML file.

    Raises:
        ConfigError: The CRD cannot be read, does not define the object's kind/apiVersion, or the
            object does not conform; the message starts with the JSON path of the first error,
            e.g. ``$.spec.predictor.minReplica: Additional properties are not allowed ...``.
    """
    api_version = obj.get("apiVersion")
    kind = obj.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        raise ConfigError("$: object has no string 'apiVersion' and 'kind'")
    validator = _validator_for(str(Path(crd_path).resolve()), api_version, kind)
    first = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if first is not None:
        name = obj.get("metadata", {}).get("name", "?") if isinstance(obj.get("metadata"), dict) else "?"
        raise ConfigError(f"{kind} '{name}': {_json_path(first)}: {first.message}")
