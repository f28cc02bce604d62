"""Room on disk for a large step: the check before it starts, and its scratch files beside its output."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from labelmatch.core.disk import free_bytes, require_free_space, scratch_beside
from labelmatch.core.errors import ArtifactError


def test_a_step_without_room_is_refused_in_one_line_naming_the_place_and_both_sizes(tmp_path):
    out = tmp_path / "not" / "yet" / "there"
    free = free_bytes(out)  # the nearest existing parent's filesystem
    require_free_space(out, free // 2, "export of m")
    with pytest.raises(ArtifactError) as refused:
        require_free_space(out, free + 10**12, "export of m")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"export of m needs about {(free + 10**12) / 1e9:.1f} GB free")
    assert str(out) in message and f"which has {free / 1e9:.1f} GB" in message
    assert not out.exists()


def test_temp_files_inside_the_block_go_beside_the_output_also_in_processes_it_starts(tmp_path):
    before_dir, before_env = tempfile.gettempdir(), os.environ.get("TMPDIR")
    out = tmp_path / "artifact"
    with scratch_beside(out) as scratch:
        assert scratch.parent == tmp_path and scratch.is_dir()
        assert tempfile.mkdtemp().startswith(str(scratch) + os.sep)
        child = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
                               capture_output=True, text=True, check=True)
        assert child.stdout.strip() == str(scratch)
    assert not scratch.exists()
    assert tempfile.gettempdir() == before_dir and os.environ.get("TMPDIR") == before_env


def test_the_block_restores_the_temp_dir_when_it_fails(tmp_path):
    before = tempfile.gettempdir()
    with pytest.raises(RuntimeError), scratch_beside(tmp_path / "artifact") as scratch:
        raise RuntimeError("step died")
    assert not scratch.exists() and tempfile.gettempdir() == before
    assert [p.name for p in tmp_path.iterdir()] == []
