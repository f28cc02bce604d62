"""``labelmatch classify``: stream JSONL/Parquet shards through Ray Data actors that each hold one
ONNX Runtime session, and write one Parquet shard (plus a rejects file) per input shard.

Streaming end to end: Ray Data reads blocks, ``map_batches`` runs :class:`BatchClassifier` on a
pool of ``concurrency`` actors, and the driver iterates the results in input order
(``preserve_order``) and writes each input shard's rows to its own output shard as they come, so
memory stays bounded by Ray Data's in-flight blocks whatever the input size. An output shard is
written under a temporary name and moved into place when its input shard is complete; a run
started again with the same output skips the shards that have one (and deletes temporary
leftovers), so an interruption costs at most the shards in flight, and no row is written twice.

Output rows: ``id`` (the input's, or ``<shard>:<line>``), ``labels``, ``scores`` (a list aligned
with the label names in the file's metadata and ``_summary.json``), optional ``similarities``,
``source`` and ``line``, ``model_digest`` and ``label_set_digest``. Rows that cannot be read go to
``rejects/<shard>.jsonl`` with file, line and reason; ``strict`` stops at the first.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labelmatch.batch.shards import OutputLayout, Shard, check_shards, list_shards
from labelmatch.batch.worker import BatchClassifier, label_set_digest
from labelmatch.core.errors import ConfigError, DataError


@dataclass
class BatchConfig:
    """A batch classification run.

    Attributes:
        model: The OnnxModel artifact (local path or ``s3://``).
        input: Local file/directory or ``s3://`` object/prefix of JSONL or Parquet shards.
        output: Local directory or ``s3://`` prefix for the results.
        labels: Extra ``{label: description}`` (or, with ``replace_labels``, the whole label set).
        replace_labels: Score only ``labels``.
        batch_size: Rows per ``map_batches`` call (one ONNX Runtime batch per call).
        concurrency: Actors (each holds one session and one CPU).
        ort_threads: ONNX Runtime intra-op threads per actor.
        similarities: Also write cosines.
        strict: Stop at the first row that cannot be read.
        address: Ray cluster address (``auto`` inside a RayJob); ``None`` starts a local Ray on
            127.0.0.1.
        num_cpus: CPUs the local Ray may use (default: all); ``concurrency * ort_threads`` must fit.
        ray_temp_dir: Temp dir of the local Ray.
        progress: Show progress bars.
    """

    model: str
    input: str
    output: str
    labels: dict[str, str] | None = None
    replace_labels: bool = False
    batch_size: int = 256
    concurrency: int = 1
    ort_threads: int = 1
    similarities: bool = False
    strict: bool = False
    address: str | None = None
    num_cpus: int | None = None
    ray_temp_dir: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "concurrency", "ort_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.replace_labels and not self.labels:
            raise ConfigError("replace_labels needs labels")


@dataclass
class _Served:
    """What every output row names: the model, its label set and the score columns."""

    model_digest: str
    label_set_digest: str
    names: list[str]


def _served(config: BatchConfig) -> _Served:
    """The model's digest, labels and thresholds; from ``s3://`` only those two files are read
    (verified against the manifest), not the graphs the actors download."""
    from labelmatch.core.artifacts import artifact_digest, manifest_digest, verify_artifact
    from labelmatch.platform.artifact_store import ArtifactStore, as_s3_uri, is_s3_uri

    if is_s3_uri(config.model):
        manifest, files = ArtifactStore.from_env().read_members(
            as_s3_uri(str(config.model)), ["labels.json", "thresholds.json"], "OnnxModel")
        model_labels, thresholds = (json.loads(files[name]) for name in ("labels.json", "thresholds.json"))
        digest = manifest_digest(manifest)
    else:
        verify_artifact(config.model, "OnnxModel")
        path = Path(config.model)
        model_labels = json.loads((path / "labels.json").read_text())
        thresholds = json.loads((path / "thresholds.json").read_text())
        digest = artifact_digest(path)
    labels = dict(config.labels or {}) if config.replace_labels else {**model_labels, **(config.labels or {})}
    return _Served(digest, label_set_digest(labels, thresholds), list(labels))


class _ShardWriter:
    """Writes the rows of one input shard at a time; moves each finished shard into place."""

    def __init__(self, layout: OutputLayout, served: _Served, strict: bool):
        self.layout, self.served, self.strict = layout, served, strict
        self.shard: Shard | None = None
        self.writer: Any = None
        self.line = 0
        self.rejects: list[dict[str, Any]] = []
        self.rows = self.rejected = 0

    def _schema(self, with_similarities: bool) -> Any:
        import pyarrow as pa

        width = len(self.served.names)
        fields = [("id", pa.string()), ("labels", pa.list_(pa.string())),
                  ("scores", pa.list_(pa.float32(), width))]
        if with_similarities:
            fields.append(("similarities", pa.list_(pa.float32(), width)))
        fields += [("source", pa.string()), ("line", pa.int64()), ("model_digest", pa.string()),
                   ("label_set_digest", pa.string())]
        metadata = {"labelmatch.label_names": json.dumps(self.served.names, ensure_ascii=False)}
        return pa.schema(fields, metadata=metadata)

    def start(self, shard: Shard, with_similarities: bool) -> None:
        import pyarrow.parquet as pq

        self.finish()
        self.shard, self.line, self.rejects = shard, 0, []
        tmp = self.layout.temporary(self.layout.result(shard))
        schema = self._schema(with_similarities)
        self.writer = pq.ParquetWriter(tmp, schema, filesystem=self.layout.filesystem)

    def write(self, table: Any) -> None:
        """Write one contiguous run of rows of the current shard (errors to its rejects)."""
        import pyarrow as pa

        shard = self.shard
        assert shard is not None and self.writer is not None
        errors = table.column("error").to_pylist()
        ids = table.column("id").to_pylist()
        # JSON Lines rows carry their line (blank lines are no rows); Parquet rows are counted.
        numbers = table.column("line").to_pylist() if "line" in table.column_names else None
        keep, out_ids, lines = [], [], []
        for i, error in enumerate(errors):
            self.line = numbers[i] if numbers is not None else self.line + 1
            if error:
                if self.strict:
                    raise DataError(shard.uri, error, line=self.line)
                self.rejects.append({"file": shard.uri, "line": self.line, "reason": error})
                continue
            keep.append(i)
            out_ids.append(ids[i] or f"{shard.name}:{self.line}")
            lines.append(self.line)
        if not keep:
            return
        kept = table.take(pa.array(keep))
        n = len(keep)
        columns = {"id": pa.array(out_ids, pa.string()), "labels": kept.column("labels"),
                   "scores": kept.column("scores")}
        if "similarities" in kept.column_names:
            columns["similarities"] = kept.column("similarities")
        columns.update({"source": pa.array([shard.uri] * n, pa.string()), "line": pa.array(lines, pa.int64()),
                        "model_digest": pa.array([self.served.model_digest] * n, pa.string()),
                        "label_set_digest": pa.array([self.served.label_set_digest] * n, pa.string())})
        self.writer.write_table(pa.table(columns, schema=self.writer.schema))
        self.rows += n

    def abort(self) -> None:
        """Drop the shard in progress (its temporary file); finished shards stay."""
        if self.shard is None:
            return
        with contextlib.suppress(Exception):
            self.writer.close()
        with contextlib.suppress(FileNotFoundError, OSError):
            self.layout.filesystem.delete_file(self.layout.temporary(self.layout.result(self.shard)))
        self.shard, self.writer = None, None

    def finish(self) -> None:
        """Close the current shard and move its rejects, then its results, into place."""
        if self.shard is None:
            return
        self.writer.close()
        fs, layout, shard = self.layout.filesystem, self.layout, self.shard
        rejects = layout.rejects(shard)
        if self.rejects:
            layout.make_dir(rejects.rpartition("/")[0])
            tmp = layout.temporary(rejects)
            with fs.open_output_stream(tmp) as out:
                out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rejects).encode())
            fs.move(tmp, rejects)
            self.rejected += len(self.rejects)
        fs.move(layout.temporary(layout.result(shard)), layout.result(shard))
        self.shard, self.writer = None, None


@contextlib.contextmanager
def _aborting(writer: _ShardWriter) -> Iterator[None]:
    try:
        yield
    except BaseException:
        writer.abort()
        raise


def _dataset(shards: list[Shard], kind: str, filesystem: Any, config: BatchConfig,
             columns: dict[str, list[str]]) -> Any:
    import ray

    paths = [s.path for s in shards]
    # Reads are I/O only (parsing happens in the actors): they take no CPU slot.
    if kind == "jsonl":
        from labelmatch.batch.jsonl_source import read_json_lines

        ds = read_json_lines(paths, filesystem)
    else:
        ds = ray.data.read_parquet(paths, include_paths=True, filesystem=filesystem,
                                   columns=_parquet_columns(shards, columns), num_cpus=0)
    return ds.map_batches(
        BatchClassifier,
        fn_constructor_kwargs={"model_uri": config.model, "kind": kind, "labels": config.labels,
                               "replace": config.replace_labels, "ort_threads": config.ort_threads,
                               "similarities": config.similarities},
        batch_size=config.batch_size, compute=ray.data.ActorPoolStrategy(size=config.concurrency),
        num_cpus=config.ort_threads,
        batch_format="numpy",
    )


def _parquet_columns(shards: list[Shard], columns: dict[str, list[str]]) -> list[str]:
    """``text`` and, where every shard has it, ``id`` (the other columns are never read).

    Args:
        shards: The Parquet shards.
        columns: Each shard's columns by path (:func:`~labelmatch.batch.shards.check_shards`).
    """
    with_id = all("id" in columns[shard.path] for shard in shards)
    return ["id", "text"] if with_id else ["text"]


def _check_local_cpus(config: BatchConfig) -> None:
    if config.address:
        return
    import os

    available = config.num_cpus or os.cpu_count() or 1
    needed = config.concurrency * config.ort_threads
    if needed > available:
        raise ConfigError(f"concurrency {config.concurrency} x ort_threads {config.ort_threads} = {needed} "
                          f"CPUs, "
                          f"but the local Ray has {available}")


def run_batch(config: BatchConfig) -> dict[str, Any]:
    """Classify every input shard not done yet; returns (and writes) the run summary.

    Raises:
        ConfigError: The input has no shards, or the model cannot be read.
        DataError: ``strict`` and a row cannot be read (``file:line: reason``); the shards
            finished before it stay.
    """

    _check_local_cpus(config)
    started = time.perf_counter()
    # Everything that can refuse the run is checked before the output is created.
    in_fs, shards = list_shards(config.input)
    layout = OutputLayout.at(config.output)
    _check_not_inside(config.input, config.output)
    served = _served(config)
    pending = [s for s in shards if not layout.done(s)]
    columns = check_shards(in_fs, pending)
    created = layout.create()
    try:
        leftovers = layout.remove_leftovers()
        writer = _classify(config, in_fs, pending, layout, served, columns)
    except BaseException:
        layout.remove_if_empty(created)
        raise
    seconds = time.perf_counter() - started
    summary = {
        "shards": len(shards), "skipped_done": len(shards) - len(pending), "written": len(pending),
        "rows": writer.rows, "rejects": writer.rejected, "leftovers_removed": leftovers,
        "seconds": seconds, "docs_per_s": writer.rows / seconds if seconds else 0.0,
        "model_digest": served.model_digest, "label_set_digest": served.label_set_digest,
        "label_names": served.names, "concurrency": config.concurrency, "batch_size": config.batch_size,
        "ort_threads": config.ort_threads,
    }
    tmp = layout.temporary(layout.summary())
    with layout.filesystem.open_output_stream(tmp) as out:
        out.write(json.dumps(summary, indent=2, ensure_ascii=False).encode())
    layout.filesystem.move(tmp, layout.summary())
    return summary


def _classify(config: BatchConfig, in_fs: Any, pending: list[Shard], layout: OutputLayout, served: _Served,
              columns: dict[str, list[str]]) -> _ShardWriter:
    """Stream the pending shards through the actors into their output shards."""
    import ray
    from tqdm.auto import tqdm

    writer = _ShardWriter(layout, served, config.strict)
    by_path = {s.path: s for s in pending}
    seen: set[str] = set()
    from labelmatch.platform.ray_local import ray_session  # torch-free: runs in the step image

    # A local Ray gets its own logical CPUs: one per actor thread, and one for Ray Data's listing
    # and reads, which would otherwise wait forever behind actors that hold every CPU.
    local_cpus = config.concurrency * config.ort_threads + 1
    with ray_session(config.address, local_cpus, temp_dir=config.ray_temp_dir), _aborting(writer):
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # rows of a shard arrive together, in order
        context.enable_progress_bars = config.progress
        bar = tqdm(desc="classified", unit="doc", disable=not config.progress)
        for kind in ("jsonl", "parquet"):
            group = [s for s in pending if s.kind == kind]
            if not group:
                continue
            for table in _dataset(group, kind, in_fs, config, columns).iter_batches(batch_format="pyarrow",
                                                                                     batch_size=None):
                for path in _runs(table.column("path").to_pylist()):
                    part = table.slice(path[1], path[2] - path[1])
                    shard = by_path[_strip(path[0], in_fs)]
                    if writer.shard is not shard:
                        if shard.path in seen:  # would truncate what was written: never silently
                            raise RuntimeError(f"{shard.uri}: rows arrived out of order")
                        writer.start(shard, config.similarities)
                        seen.add(shard.path)
                    before = writer.rows
                    writer.write(part)
                    bar.update(writer.rows - before)
            writer.finish()
        bar.close()
    for shard in pending:  # empty input shards still get an (empty) output shard
        if shard.path not in seen:
            writer.start(shard, config.similarities)
            writer.finish()
    return writer


def _check_not_inside(input_uri: str, output_uri: str) -> None:
    """Refuse an output inside the input (its shards would be read as input by the next run).

    Raises:
        ConfigError: The output is the input or under it.
    """
    from labelmatch.batch.shards import filesystem_for

    in_fs, in_root = filesystem_for(input_uri)
    out_fs, out_root = filesystem_for(output_uri)
    if in_fs.type_name != out_fs.type_name:
        return
    if out_root == in_root or out_root.startswith(in_root.rstrip("/") + "/"):
        raise ConfigError(f"--output {output_uri} is inside --input {input_uri}: its results would be read "
                          "as input by the next run; choose an output outside the input")


def _strip(path: str, filesystem: Any) -> str:
    """Ray Data's ``path`` column as the shard listing spells it."""
    return path.removeprefix("s3://") if filesystem.type_name == "s3" else path


def _runs(paths: list[str]) -> list[tuple[str, int, int]]:
    """``(path, start, end)`` of each run of equal consecutive paths."""
    out = []
    start = 0
    for i in range(1, len(paths) + 1):
        if i == len(paths) or paths[i] != paths[start]:
            out.append((paths[start], start, i))
            start = i
    return out
