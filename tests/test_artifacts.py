"""The artifact contract: manifests, digest verification and atomic writes."""

from __future__ import annotations

import json

import pytest

from labelmatch.artifacts import artifact_digest, atomic_artifact_dir, verify_artifact, write_manifest
from labelmatch.errors import ArtifactError


def make_artifact(root, kind="Dataset"):
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(b"\x00\x01")
    return write_manifest(root, kind, lineage={"run_id": "r1"}, extra={"documents": 2})


def test_manifest_lists_every_file_and_verifies(tmp_path):
    manifest = make_artifact(tmp_path)
    assert set(manifest["files"]) == {"a.txt", "sub/b.bin"}
    assert manifest["lineage"] == {"run_id": "r1"} and manifest["kind"] == "Dataset"
    assert verify_artifact(tmp_path, "Dataset")["files"] == manifest["files"]


def test_corrupted_missing_and_wrong_kind_are_refused(tmp_path):
    make_artifact(tmp_path)
    with pytest.raises(ArtifactError, match="kind is 'Dataset', expected 'Model'"):
        verify_artifact(tmp_path, "Model")
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00\x02")
    with pytest.raises(ArtifactError, match=r"file sub/b.bin is corrupted"):
        verify_artifact(tmp_path)
    (tmp_path / "a.txt").unlink()
    with pytest.raises(ArtifactError, match=r"file a.txt listed in manifest.json is missing"):
        verify_artifact(tmp_path)


def test_missing_or_broken_manifest(tmp_path):
    with pytest.raises(ArtifactError, match=r"missing manifest\.json"):
        verify_artifact(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        verify_artifact(tmp_path)


def test_digest_changes_with_content(tmp_path):
    make_artifact(tmp_path / "x")
    make_artifact(tmp_path / "y")
    assert artifact_digest(tmp_path / "x") == artifact_digest(tmp_path / "y")
    (tmp_path / "y" / "a.txt").write_text("beta")
    write_manifest(tmp_path / "y", "Dataset")
    assert artifact_digest(tmp_path / "x") != artifact_digest(tmp_path / "y")


def test_atomic_dir_leaves_previous_artifact_on_failure(tmp_path):
    out = tmp_path / "out"
    with atomic_artifact_dir(out) as tmp:
        (tmp / "v.json").write_text(json.dumps(1))
    with pytest.raises(RuntimeError), atomic_artifact_dir(out) as tmp:
        (tmp / "v.json").write_text(json.dumps(2))
        raise RuntimeError("crash mid-write")
    assert json.loads((out / "v.json").read_text()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_artifact_dir(out) as tmp:
        (tmp / "v.json").write_text(json.dumps(3))
    assert json.loads((out / "v.json").read_text()) == 3
