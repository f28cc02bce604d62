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

from labelmatch.core.errors import ConfigError, DataError

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
#: Suffixes of compressed files, which are not read (named in the refusal).
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")
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
        if kind is None and root.lower().endswith(COMPRESSED_SUFFIXES):
            raise ConfigError(f"{input_uri}: a compressed file; decompress it first (shards are .jsonl, "
                              ".json or .parquet)")
        if kind is None:
            raise ConfigError(f"{input_uri}: not a .jsonl, .json or .parquet file")
        name = Path(root).name.rsplit(".", 1)[0]
        return filesystem, [Shard(root, f"{scheme}{root}", kind, name)]
    if info.type == fs.FileType.NotFound:
        raise ConfigError(f"{input_uri}: no such file or prefix")
    found = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    shards, compressed = [], 0
    for item in sorted(found, key=lambda i: i.path):
        kind = _kind(item.path) if item.type == fs.FileType.File else None
        relative = item.path[len(root):].lstrip("/")
        compressed += kind is None and item.path.lower().endswith(COMPRESSED_SUFFIXES)
        if kind is None or relative.startswith((".", "_")):
            continue
        name = relative.rsplit(".", 1)[0].replace("/", "__")
        shards.append(Shard(item.path, f"{scheme}{item.path}", kind, name))
    if not shards:
        note = f" ({compressed} compressed file(s) there: decompress them first)" if compressed else ""
        raise ConfigError(f"{input_uri}: no .jsonl, .json or .parquet shards under it{note}")
    return filesystem, shards


def check_shards(filesystem: Any, shards: list[Shard]) -> dict[str, list[str]]:
    """Refuse, before anything runs, a shard that is not what its name says; returns the columns
    of each Parquet shard by path.

    A ``.jsonl``/``.json`` shard must be text (not gzip/bzip2/xz/zstd/zip, Parquet or UTF-16:
    :func:`labelmatch.core.inputs.refuse_binary`); a ``.parquet`` shard must be a Parquet file
    with a ``text`` column of strings. Rows are checked later, one by one (bad ones are rejects).

    Args:
        filesystem: The shards' pyarrow filesystem.
        shards: The shards to check.

    Raises:
        DataError: Naming the shard (and the field): ``in/a.parquet: not a Parquet file (...)``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from labelmatch.core.inputs import SNIFF_BYTES, describe_binary, refuse_binary

    columns: dict[str, list[str]] = {}
    for shard in shards:
        try:
            with filesystem.open_input_stream(shard.path) as handle:
                head = handle.read(SNIFF_BYTES)
        except OSError as exc:
            raise DataError(shard.uri, f"cannot read: {exc}") from None
        if shard.kind == "jsonl":
            refuse_binary(shard.uri, head, "UTF-8 JSON Lines")
            continue
        found = describe_binary(head)
        if found is not None and found[0] != "a Parquet file":
            refuse_binary(shard.uri, head, "a Parquet file")
        try:
            schema = pq.read_schema(shard.path, filesystem=filesystem)
        except (pa.ArrowException, OSError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            looks = " (it starts like JSON: name it .jsonl)" if head.lstrip()[:1] in (b"{", b"[") else ""
            raise DataError(shard.uri, f"not a Parquet file{looks}: {reason}") from None
        if "text" not in schema.names:
            raise DataError(shard.uri, "no such column", field="text")
        text_type = schema.field("text").type
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)
                or pa.types.is_binary(text_type) or pa.types.is_large_binary(text_type)
                or str(text_type) == "string_view"):
            raise DataError(shard.uri, f"expected a column of strings, got {text_type}", field="text")
        columns[shard.path] = list(schema.names)
    return columns


@dataclass(frozen=True)
class OutputLayout:
    """Where a run writes: one Parquet file and one rejects file per input shard, and a summary."""

    filesystem: Any
    root: str

    @classmethod
    def at(cls, output_uri: str) -> OutputLayout:
        """The layout of ``output_uri`` (nothing is created: see :meth:`create`).

        Raises:
            ConfigError: ``output_uri`` is an existing file (or object), not a directory.
        """
        from pyarrow import fs

        filesystem, root = filesystem_for(output_uri)
        if filesystem.get_file_info(root).type == fs.FileType.File:
            raise ConfigError(f"--output {output_uri}: is an existing file; give a directory "
                              "(or an s3:// prefix)")
        return cls(filesystem, root)

    def create(self) -> list[str]:
        """Create the output directory (local); returns the directories created, outermost first
        (:meth:`remove_if_empty` takes them back).

        Raises:
            ConfigError: It cannot be created (a parent is a file, no permission).
        """
        if self.filesystem.type_name == "s3":
            return []
        created = []
        path = Path(self.root)
        while not path.exists() and path != path.parent:
            created.insert(0, str(path))
            path = path.parent
        try:
            self.make_dir(self.root)
        except OSError as exc:
            raise ConfigError(f"--output {self.root}: cannot create the directory: "
                              f"{exc.strerror or exc}") from exc
        return created

    def remove_if_empty(self, created: list[str]) -> None:
        """Remove the directories :meth:`create` made, innermost first, as long as they are empty
        (a refused or failed run leaves no empty output behind; finished shards stay)."""
        import os

        if not created:
            return
        for directory in [f"{self.root}/rejects", *reversed(created)]:
            try:
                os.rmdir(directory)
            except OSError:
                if directory != f"{self.root}/rejects":
                    return

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
