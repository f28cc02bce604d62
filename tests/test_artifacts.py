"""The artifact contract: manifests, digest verification and atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labelmatch.core.artifacts import artifact_digest, atomic_artifact_dir, verify_artifact, write_manifest
from labelmatch.core.errors import ArtifactError


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


def test_an_unlisted_extra_file_is_refused(tmp_path):
    make_artifact(tmp_path)
    (tmp_path / "sub" / "planted.py").write_text("import os")
    with pytest.raises(ArtifactError, match=r"file sub/planted.py is not listed in manifest.json"):
        verify_artifact(tmp_path)


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/hostname", "sub/../../outside.txt", ""])
def test_a_manifest_name_leaving_the_artifact_is_refused(tmp_path, name):
    root = tmp_path / "art"
    make_artifact(root)
    (tmp_path / "outside.txt").write_text("alpha")  # same content as a.txt: only the path is wrong
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"][name] = manifest["files"].pop("a.txt")
    (root / "a.txt").unlink()
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"manifest.json lists an unsafe file name"):
        verify_artifact(root)


def test_replacing_an_artifact_never_leaves_the_path_missing_and_flushes_first(tmp_path, monkeypatch):
    import os

    import labelmatch.core.artifacts as artifacts

    out = tmp_path / "out"
    with atomic_artifact_dir(out) as tmp:
        (tmp / "v.json").write_text(json.dumps(1))
    synced, seen_missing = [], []
    real_fsync, real_exchange = os.fsync, artifacts.exchange_paths
    monkeypatch.setattr(artifacts.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or
                        real_fsync(fd))

    def exchange(a, b):
        real_exchange(a, b)
        seen_missing.append(not Path(b).exists())

    monkeypatch.setattr(artifacts, "exchange_paths", exchange)
    with atomic_artifact_dir(out) as tmp:
        (tmp / "v.json").write_text(json.dumps(2))
        staged = tmp
    assert json.loads((out / "v.json").read_text()) == 2
    assert str(staged / "v.json") in synced, "the new file is on disk before it becomes visible"
    assert seen_missing == [False]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_exchange_swaps_two_directories_in_one_step(tmp_path):
    from labelmatch.core.artifacts import exchange_paths

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("from a")
    (tmp_path / "b" / "x").write_text("from b")
    exchange_paths(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "x").read_text() == "from a" and (tmp_path / "a" / "x").read_text() == "from b"


def test_an_artifact_is_readable_by_other_users_as_the_umask_allows(tmp_path):
    """mkdtemp makes private directories; a model server running as another user must read the model."""
    import os

    old = os.umask(0o022)
    try:
        with atomic_artifact_dir(tmp_path / "out") as tmp:
            (tmp / "v.json").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
