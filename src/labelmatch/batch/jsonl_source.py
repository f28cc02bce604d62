"""A Ray Data source of JSON Lines shards that splits records as JSON Lines does.

``ray.data.read_text`` decodes a whole file and splits it with ``str.splitlines``: one byte that is
not UTF-8 fails the read task (and the run), and U+2028, U+2029 or U+0085 inside a JSON string
split a valid record in pieces. This source reads bytes and splits them with
:func:`labelmatch.core.inputs.iter_records` (only ``\\n`` ends a record), the rule of every other
reader here, and hands each record on undecoded with its line number: decoding and parsing happen
in the actors, where a bad record becomes a reject naming its line.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ray.data.datasource.file_based_datasource import FileBasedDatasource

from labelmatch.core.inputs import iter_records

#: Records per block (a block is also cut at :data:`BLOCK_BYTES`).
BLOCK_RECORDS = 4096
#: Bytes of records per block.
BLOCK_BYTES = 8 << 20


class JsonLinesSource(FileBasedDatasource):
    """Rows ``{"line": int64, "raw": binary}``: each non-blank record of each file and its 1-based
    line (blank lines are skipped but counted). Use with ``include_paths=True`` for ``path``."""

    def _read_stream(self, f: Any, path: str) -> Iterator[Any]:
        import pyarrow as pa

        lines: list[int] = []
        records: list[bytes] = []
        size = 0
        for number, raw in iter_records(f):
            lines.append(number)
            records.append(raw)
            size += len(raw)
            if len(records) >= BLOCK_RECORDS or size >= BLOCK_BYTES:
                yield pa.table({"line": pa.array(lines, pa.int64()), "raw": pa.array(records, pa.binary())})
                lines, records, size = [], [], 0
        if records:
            yield pa.table({"line": pa.array(lines, pa.int64()), "raw": pa.array(records, pa.binary())})


def read_json_lines(paths: list[str], filesystem: Any) -> Any:
    """A Ray Dataset of the records of ``paths`` (``path``, ``line``, ``raw`` columns), in order.

    Args:
        paths: The shards, as ``filesystem`` spells them.
        filesystem: Their pyarrow filesystem.
    """
    import ray

    source = JsonLinesSource(paths, filesystem=filesystem, include_paths=True)
    # Reads are I/O only (parsing happens in the actors): they take no CPU slot.
    return ray.data.read_datasource(source, num_cpus=0)
