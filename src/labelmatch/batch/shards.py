"""Input and output shards of a batch run: what to read, where each result goes, what is done.

An input is a local file or directory, or an ``s3://`` object or prefix, of JSONL
(``.jsonl``/``.json``, one ``{"id", "text"}`` object per line) or Parquet (``id``/``text``
columns) shards. Each input shard gets one output shard, ``<output>/<name>.parquet``, and one
rejects file, ``<output>/rejects/<name>.jsonl``. An output shard appears only when complete
(written under a temporary name, then moved), so its presence marks the input shard done: a run
started again with the same output skips it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labelmatch.core.errors import ConfigError

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
TMP_PREFIX = "_tmp-"


@dataclass(frozen=True)
class Shard:
    """One input shard.

    Attributes:
        path: Its path for ``filesystem`` (a local path, or ``bucket/key`` on S3).
        uri: As the user named it (``s3://bucket/key`` or the local path), for messages.
        kind: ``jsonl`` or ``parquet``.
        name: The output name it maps to (relative path, ``/`` → ``__``, suffix dropped).
    """

    path: str
    uri: str
    kind: str
    name: str


def filesystem_for(uri: str) -> tuple[Any, str]:
    """``(pyarrow filesystem, path on it)`` of a local path or ``s3://`` URI (the store's settings)."""
    from pyarrow import fs

    from labelmatch.tuning.storage import is_remote, s3_filesystem

    if is_remote(uri):
        return s3_filesystem(), uri.removeprefix("s3://").rstrip("/")
    return fs.LocalFileSystem(), str(Path(uri).resolve())


def _kind(path: str) -> str | None:
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def list_shards(input_uri: str) -> tuple[Any, list[Shard]]:
    """The input shards under ``input_uri``, sorted by path.

    Raises:
        ConfigError: Nothing readable is there.
    """
    from pyarrow import fs

    filesystem, root = filesystem_for(input_uri)
    info = filesystem.get_file_info(root)
    scheme = "s3://" if input_uri.startswith("s3://") else ""
    if info.type == fs.FileType.File:
        kind = _kind(root)
        if kind is None:
            raise ConfigError(f"{input_uri}: not a .jsonl, .json or .parquet file")
        name = Path(root).name.rsplit(".", 1)[0]
        return filesystem, [Shard(root, f"{scheme}{root}", kind, name)]
    if info.type == fs.FileType.NotFound:
        raise ConfigError(f"{input_uri}: no such file or prefix")
    found = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    shards = []
    for item in sorted(found, key=lambda i: i.path):
        kind = _kind(item.path) if item.type == fs.FileType.File else None
        relative = item.path[len(root):].lstrip("/")
        if kind is None or relative.startswith((".", "_")):
            continue
        name = relative.rsplit(".", 1)[0].replace("/", "__")
        shards.append(Shard(item.path, f"{scheme}{item.path}", kind, name))
    if not shards:
        raise ConfigError(f"{input_uri}: no .jsonl, .json or .parquet shards under it")
    return filesystem, shards


@dataclass(frozen=True)
class OutputLayout:
    """Where a run writes: one Parquet file and one rejects file per input shard, and a summary."""

    filesystem: Any
    root: str

    @classmethod
    def at(cls, output_uri: str) -> OutputLayout:
        """The layout of ``output_uri`` (created when local)."""
        filesystem, root = filesystem_for(output_uri)
        layout = cls(filesystem, root)
        layout.make_dir(root)
        return layout

    def make_dir(self, path: str) -> None:
        """Create a local directory; nothing on S3 (no directory marker objects there)."""
        if self.filesystem.type_name != "s3":
            self.filesystem.create_dir(path, recursive=True)

    def result(self, shard: Shard) -> str:
        """The output shard of ``shard`` (present = done)."""
        return f"{self.root}/{shard.name}.parquet"

    def rejects(self, shard: Shard) -> str:
        """The rejects file of ``shard``."""
        return f"{self.root}/rejects/{shard.name}.jsonl"

    def temporary(self, final: str) -> str:
        """Where ``final`` is written before it is moved into place."""
        directory, _, name = final.rpartition("/")
        return f"{directory}/{TMP_PREFIX}{name}"

    def done(self, shard: Shard) -> bool:
        """Whether ``shard``'s output is complete."""
        from pyarrow import fs

        return self.filesystem.get_file_info(self.result(shard)).type == fs.FileType.File

    def remove_leftovers(self) -> int:
        """Delete temporary files an interrupted run left behind; returns how many."""
        from pyarrow import fs

        removed = 0
        selector = fs.FileSelector(self.root, recursive=True, allow_not_found=True)
        for item in self.filesystem.get_file_info(selector):
            if item.type == fs.FileType.File and item.base_name.startswith(TMP_PREFIX):
                self.filesystem.delete_file(item.path)
                removed += 1
        return removed

    def summary(self) -> str:
        """The run summary (``_summary.json``)."""
        return f"{self.root}/_summary.json"
