"""ArtifactStore against a real S3 API (moto server on 127.0.0.1) through the minio client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from s3_server import FAKE_SECRET_KEY, moto_s3_server, s3_env

from labelmatch.core.artifacts import artifact_digest, verify_artifact, write_manifest
from labelmatch.core.errors import ArtifactError, ConfigError
from labelmatch.platform.artifact_store import ArtifactStore, S3Config, S3Uri


@pytest.fixture(scope="module")
def endpoint():
    with moto_s3_server() as url:
        yield url


@pytest.fixture
def store(endpoint) -> ArtifactStore:
    return ArtifactStore(S3Config.from_env(s3_env(endpoint)))


def make_artifact(root: Path, n_files: int = 5, salt: str = "") -> Path:
    """A small Report artifact with a nested file."""
    root.mkdir(parents=True)
    for i in range(n_files):
        (root / f"part-{i}.txt").write_text(f"content {i} {salt}\n" * (i + 1))
    (root / "plots").mkdir()
    (root / "plots" / "curve.bin").write_bytes(bytes(range(256)) * 40)
    write_manifest(root, "Report", lineage={"run_id": "r1"})
    return root


def test_round_trip_verifies_digests(store, tmp_path):
    source = make_artifact(tmp_path / "src")
    uri = "s3://lm-roundtrip/reports/r1"
    digest = store.upload_artifact(source, uri, kind="Report")
    assert digest == artifact_digest(source)
    assert store.remote_digest(uri) == digest
    assert store.verify_remote(uri, kind="Report") == digest

    manifest = store.download_artifact(uri, tmp_path / "dst", kind="Report")
    assert artifact_digest(tmp_path / "dst") == digest
    assert verify_artifact(tmp_path / "dst", "Report") == manifest
    for name in manifest["files"]:
        assert (tmp_path / "dst" / name).read_bytes() == (source / name).read_bytes()

    [info] = store.list_artifacts("s3://lm-roundtrip/reports")
    assert (info.uri, info.kind, info.digest, info.files) == (uri, "Report", digest, 6)
    # A wrong kind is refused before anything is downloaded.
    with pytest.raises(ArtifactError, match=r"kind is 'Report', expected 'Model'"):
        store.download_artifact(uri, tmp_path / "wrong", kind="Model")
    assert not (tmp_path / "wrong").exists()


def test_interrupted_upload_leaves_nothing_a_reader_accepts(store, tmp_path, monkeypatch):
    source = make_artifact(tmp_path / "src", n_files=8)
    uri = "s3://lm-interrupted/models/m1"
    real_put = store._client.fput_object
    sent = []

    def dropping_connection(bucket, key, path, *args, **kwargs):
        if len(sent) == 4:  # the network goes away after four files
            raise ConnectionResetError("connection reset by peer")
        sent.append(key)
        return real_put(bucket, key, path, *args, **kwargs)

    monkeypatch.setattr(store._client, "fput_object", dropping_connection)
    with pytest.raises(ArtifactError, match=r"upload failed"):
        store.upload_artifact(source, uri)
    # Half of the files are really there ...
    assert len(list(store.list_keys(uri))) == 4
    # ... but no reader accepts them.
    assert store.remote_manifest(uri) is None
    with pytest.raises(ArtifactError, match=r"no manifest.json"):
        store.download_artifact(uri, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    assert store.list_artifacts("s3://lm-interrupted/models") == []

    monkeypatch.setattr(store._client, "fput_object", real_put)
    assert store.upload_artifact(source, uri) == artifact_digest(source)
    store.download_artifact(uri, tmp_path / "dst")
    assert artifact_digest(tmp_path / "dst") == artifact_digest(source)


def test_corrupted_or_missing_object_is_refused(store, tmp_path):
    source = make_artifact(tmp_path / "src")
    uri = "s3://lm-corrupt/a"
    store.upload_artifact(source, uri)
    (tmp_path / "old").mkdir()
    store.download_artifact(uri, tmp_path / "old")
    store.put_bytes(S3Uri.parse(uri).child("part-2.txt"), b"tampered\n")
    with pytest.raises(ArtifactError, match=r"s3://lm-corrupt/a: file part-2.txt is corrupted"):
        store.download_artifact(uri, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    with pytest.raises(ArtifactError, match=r"part-2.txt is corrupted"):
        store.verify_remote(uri)
    # A failed download leaves an existing destination untouched.
    with pytest.raises(ArtifactError):
        store.download_artifact(uri, tmp_path / "old")
    verify_artifact(tmp_path / "old")

    store._client.remove_object("lm-corrupt", "a/plots/curve.bin")
    with pytest.raises(ArtifactError, match=r"file plots/curve.bin listed in manifest.json is missing"):
        store.download_artifact(uri, tmp_path / "dst")


def test_artifacts_are_immutable(store, tmp_path):
    uri = "s3://lm-immutable/x"
    first = make_artifact(tmp_path / "a", salt="one")
    store.upload_artifact(first, uri)
    assert store.upload_artifact(first, uri) == artifact_digest(first)  # identical: a no-op
    with pytest.raises(ArtifactError, match=r"already holds a different artifact"):
        store.upload_artifact(make_artifact(tmp_path / "b", salt="two"), uri)


def test_local_artifact_is_verified_before_upload(store, tmp_path):
    source = make_artifact(tmp_path / "src")
    (source / "part-0.txt").write_text("changed after the manifest\n")
    with pytest.raises(ArtifactError, match=r"part-0.txt is corrupted"):
        store.upload_artifact(source, "s3://lm-local/x")
    assert store.remote_manifest("s3://lm-local/x") is None


def test_encoder_registry_mirrors_and_resolves_base_model(endpoint, store, tmp_path, monkeypatch):
    from labelmatch.model.encoder import load_base, resolve_base_model, weights_digest

    local = Path(resolve_base_model("bundled:minilm"))
    uri = "s3://lm-registry/encoders/minilm"
    store.push_encoder(local, uri)
    assert not (local / "manifest.json").exists()  # the source directory is left untouched

    for name, value in s3_env(endpoint).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LABELMATCH_CACHE_DIR", str(tmp_path / "cache"))
    resolved = Path(resolve_base_model(uri))
    assert resolved.parent == tmp_path / "cache" / "encoders"
    assert weights_digest(resolved) == weights_digest(local)
    verify_artifact(resolved, "Encoder")
    model, tokenizer = load_base(uri)
    assert model.config.hidden_size == 384 and tokenizer("tax return")["input_ids"]

    # A tampered cache is detected and fetched again.
    (resolved / "config.json").write_text("{}")
    assert Path(resolve_base_model(uri)) == resolved
    assert json.loads((resolved / "config.json").read_text())["hidden_size"] == 384


def test_config_from_env_and_secret_dir(tmp_path):
    config = S3Config.from_env(
        {
            "S3_ENDPOINT": "https://minio.example:9000/",
            "AWS_ACCESS_KEY_ID": "ak",
            "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
        }
    )
    assert (config.endpoint, config.secure, config.access_key) == ("minio.example:9000", True, "ak")
    assert FAKE_SECRET_KEY not in repr(config) and FAKE_SECRET_KEY not in repr(ArtifactStore(config))

    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "accesskey").write_text("minio")
    (secret / "secretkey").write_text(FAKE_SECRET_KEY + "\n")
    config = S3Config.from_env(
        {"MINIO_ENDPOINT": "minio:9000", "S3_USE_HTTPS": "0", "AWS_SECRET_ACCESS_KEY": "ignored"},
        secret_dir=secret,
    )
    assert (config.endpoint, config.secure, config.secret_key) == ("minio:9000", False, FAKE_SECRET_KEY)

    with pytest.raises(ConfigError, match=r"no S3 endpoint"):
        S3Config.from_env({})
    with pytest.raises(ConfigError, match=r"S3_USE_HTTPS: expected true/false"):
        S3Config.from_env({"S3_ENDPOINT": "m:9000", "S3_USE_HTTPS": "maybe"})
    (secret / "secretkey").unlink()
    with pytest.raises(ConfigError, match=r"no credential pair"):
        S3Config.from_env({"S3_ENDPOINT": "m:9000"}, secret_dir=secret)
    with pytest.raises(ConfigError, match=r"not an s3:// URI"):
        S3Uri.parse("/local/path")


def test_data_prep_reads_a_dataset_from_s3_and_names_the_uri_in_errors(store, endpoint, sample_dir, tmp_path,
                                                                        monkeypatch):
    from labelmatch.core.errors import DataError
    from labelmatch.data.prepare import prepare_dataset
    from labelmatch.platform.artifact_store import local_input

    for key, value in s3_env(endpoint).items():
        monkeypatch.setenv(key, value)
    for name in ("docs.jsonl", "labels.json"):
        store.put_bytes(f"s3://lm-data/raw/tax/{name}", (sample_dir / name).read_bytes())
    from_s3 = prepare_dataset("s3://lm-data/raw/tax", tmp_path / "ds", tmp_path / "report")
    local = prepare_dataset(sample_dir, tmp_path / "ds-local", tmp_path / "report-local")
    assert from_s3["documents"] == local["documents"] > 0 and from_s3["splits"] == local["splits"]
    verify_artifact(tmp_path / "ds", "Dataset")
    # One object by its key, labels from another prefix.
    store.put_bytes("s3://lm-data/labels/tax.json", (sample_dir / "labels.json").read_bytes())
    with local_input("s3://lm-data/raw/tax/docs.jsonl") as path:
        assert path.is_file() and path.name == "docs.jsonl"
    one = prepare_dataset("s3://lm-data/raw/tax/docs.jsonl", tmp_path / "ds-1", tmp_path / "r-1",
                          labels="s3://lm-data/labels/tax.json")
    assert one["documents"] == local["documents"]
    with pytest.raises(DataError, match=r"^s3://lm-data/raw/nothing-here: not found in the object store"):
        prepare_dataset("s3://lm-data/raw/nothing-here", tmp_path / "x", tmp_path / "y")
    bad = (sample_dir / "docs.jsonl").read_text().splitlines()
    bad[2] = bad[2].replace('"text"', '"txet"')
    store.put_bytes("s3://lm-data/raw/bad/docs.jsonl", "\n".join(bad).encode())
    store.put_bytes("s3://lm-data/raw/bad/labels.json", (sample_dir / "labels.json").read_bytes())
    with pytest.raises(DataError, match=r"^s3://lm-data/raw/bad/docs\.jsonl:3: field 'text'"):
        prepare_dataset("s3://lm-data/raw/bad", tmp_path / "x", tmp_path / "y")
    assert not (tmp_path / "x").exists(), "a failed prep writes nothing"


def test_store_put_uploads_plain_files_under_a_prefix(store, endpoint, sample_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from labelmatch.cli import app, register_commands

    register_commands()
    for key, value in s3_env(endpoint).items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["store", "put", str(sample_dir), "s3://lm-put/data/tax"])
    assert result.exit_code == 0, result.output
    keys = set(store.list_keys("s3://lm-put/data/tax"))
    assert {"data/tax/docs.jsonl", "data/tax/labels.json"} <= keys
    store.download_tree("s3://lm-put/data/tax", tmp_path / "back")
    assert (tmp_path / "back" / "docs.jsonl").read_bytes() == (sample_dir / "docs.jsonl").read_bytes()
    one = CliRunner().invoke(app, ["store", "put", str(sample_dir / "labels.json"), "s3://lm-put/labels"])
    assert one.output.strip() == "s3://lm-put/labels/labels.json"


def test_a_few_members_are_read_verified_without_the_rest(store, tmp_path):
    source = make_artifact(tmp_path / "src")
    uri = "s3://lm-members/a"
    store.upload_artifact(source, uri)
    manifest, files = store.read_members(uri, ["part-1.txt", "plots/curve.bin"], "Report")
    assert files["part-1.txt"] == (source / "part-1.txt").read_bytes()
    assert files["plots/curve.bin"] == (source / "plots" / "curve.bin").read_bytes()
    assert set(manifest["files"]) >= {"part-1.txt", "plots/curve.bin"}
    with pytest.raises(ArtifactError, match=r"s3://lm-members/a: manifest.json lists no file nope.txt"):
        store.read_members(uri, ["nope.txt"])
    with pytest.raises(ArtifactError, match="kind"):
        store.read_members(uri, ["part-1.txt"], "OnnxModel")
    store.put_bytes(S3Uri.parse(uri).child("part-1.txt"), b"tampered\n")
    with pytest.raises(ArtifactError, match=r"s3://lm-members/a: file part-1.txt is corrupted"):
        store.read_members(uri, ["part-1.txt"])
