"""Reading the files users hand labelmatch: JSON Lines records, one rule for every reader.

Every reader of a user's JSON Lines file (the data loaders, ``predict --file``, ``classify``'s Ray
Data source) goes through this module, so they all agree on what a record is:

* **Only** ``\\n`` **ends a record** (`JSON Lines <https://jsonlines.org>`_). Python's
  ``str.splitlines`` also splits at U+2028, U+2029, U+0085, ``\\v``, ``\\f``, ``\\x1c``-``\\x1e``
  and a lone ``\\r``, all of which may stand unescaped inside a JSON string: never use it on
  records. A ``\\r`` before the ``\\n`` (Windows line ends) is whitespace JSON ignores.
* Records are UTF-8; a byte-order mark at the very start of the file is skipped. A line that is
  not UTF-8 is named with the offending byte.
* A file that is not text at all (gzip, bzip2, xz, zstd, zip, Parquet, UTF-16) is named as such
  with what to do, instead of being reported as bad UTF-8 at byte 1 (:func:`refuse_binary`).
* A record is one JSON object: strict JSON (no ``NaN``/``Infinity``), no key given twice, no
  unpaired surrogate escape (``"\\ud800"`` is no character and cannot be written as UTF-8), and
  bounded nesting (a line nested thousands deep is an error, not a ``RecursionError``).

Errors are :class:`~labelmatch.core.errors.DataError` naming file, line and field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from labelmatch.core.errors import DataError

#: The only byte that ends a JSON Lines record.
RECORD_END = b"\n"
#: The UTF-8 byte-order mark (skipped at the start of a file).
UTF8_BOM = b"\xef\xbb\xbf"
#: Bytes read per chunk when streaming records.
CHUNK_BYTES = 1 << 20
#: Bytes :func:`describe_binary` needs to recognise a format.
SNIFF_BYTES = 16

#: ``(leading bytes, what the file is, what to do)`` of formats a JSON/text input is mistaken for.
_SIGNATURES: tuple[tuple[bytes | re.Pattern[bytes], str, str], ...] = (
    (b"\x1f\x8b", "gzip-compressed", "decompress it first (gunzip)"),
    (re.compile(rb"BZh[1-9]1AY&SY"), "bzip2-compressed", "decompress it first (bunzip2)"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it first (unxz)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it first (unzstd)"),
    (b"PK\x03\x04", "a zip archive", "extract it first (unzip)"),
    (b"PAR1", "a Parquet file", "give it a .parquet name where Parquet is accepted"),
    (b"\xff\xfe", "UTF-16 text", "convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)"),
    (b"\xfe\xff", "UTF-16 text", "convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)"),
)


def describe_binary(head: bytes) -> tuple[str, str] | None:
    """``(what the file is, what to do)`` when ``head`` (a file's first bytes) is a known
    non-text format (compressed, an archive, Parquet, UTF-16), else ``None``."""
    for signature, what, advice in _SIGNATURES:
        matched = signature.match(head) if isinstance(signature, re.Pattern) else head.startswith(signature)
        if matched:
            return what, advice
    return None


def refuse_binary(path: str | Path, head: bytes, expected: str = "UTF-8 text") -> None:
    """Raise a :class:`DataError` naming the format when ``head`` is not text.

    Args:
        path: The file, as the user named it.
        head: Its first :data:`SNIFF_BYTES` bytes (or more).
        expected: What the file should have been (for the message).

    Raises:
        DataError: ``path: the file is gzip-compressed, not UTF-8 text: decompress it first ...``.
    """
    found = describe_binary(head)
    if found is not None:
        what, advice = found
        raise DataError(path, f"the file is {what}, not {expected}: {advice}")


def iter_records(stream: BinaryIO | Any, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
    """``(line number, bytes)`` of each non-blank record of a binary stream, streaming.

    Splits at ``\\n`` only (see the module docstring); a UTF-8 byte-order mark at the start is
    dropped; blank lines are skipped but counted, so line numbers are the file's own (1-based).

    Args:
        stream: Any object with ``read(n) -> bytes`` (a file opened ``"rb"``, a pyarrow stream).
        chunk_bytes: Bytes per read.
    """
    number, pending, first = 0, b"", True
    while True:
        chunk = stream.read(chunk_bytes)
        if first:
            chunk, first = (chunk[len(UTF8_BOM):] if chunk.startswith(UTF8_BOM) else chunk), False
        if not chunk:
            break
        *complete, pending = (pending + chunk).split(RECORD_END)
        for line in complete:
            number += 1
            if line.strip():
                yield number, line
    if pending.strip():
        yield number + 1, pending


def split_records(data: bytes) -> Iterator[tuple[int, bytes]]:
    """:func:`iter_records` of bytes already in memory."""
    import io

    return iter_records(io.BytesIO(data))


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of each record of a local JSON Lines file.

    Raises:
        DataError: The file is missing, not a file, unreadable, not text (:func:`refuse_binary`),
            empty, or a record is not one JSON object (:func:`parse_record`).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if not path.is_file():
        raise DataError(path, "not a file (a directory?)")
    try:
        handle = open(path, "rb")  # noqa: SIM115 (a generator holds it open)
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc.strerror}") from exc
    with handle:
        refuse_binary(path, handle.read(SNIFF_BYTES), "UTF-8 JSON Lines")
        handle.seek(0)
        empty = True
        for number, raw in iter_records(handle):
            empty = False
            yield number, parse_record(path, number, raw)
    if empty:
        raise DataError(path, "file is empty")


def decode_utf8(path: str | Path, raw: bytes, line: int | None = None) -> str:
    """``raw`` (one record, or a whole file) as text; a byte that is not UTF-8 is named with its
    line and its offset in that line.

    Args:
        path: The file (for messages).
        raw: The bytes.
        line: The record's line; ``None`` for a whole file (the line is counted).

    Raises:
        DataError: ``file:3: not valid UTF-8 (byte 12: 0xe9)`` (the offset within the line, 0-based).
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start
        if line is None:
            line = raw.count(RECORD_END, 0, exc.start) + 1
            offset = exc.start - (raw.rfind(RECORD_END, 0, exc.start) + 1)
        raise DataError(path, f"not valid UTF-8 (byte {offset}: 0x{raw[exc.start]:02x})", line=line) from None


def _refuse_constant(path: str | Path, line: int | None) -> Any:
    def hook(name: str) -> Any:
        raise DataError(path, f"invalid JSON: {name} is not a JSON value (use null or a number)", line=line)

    return hook


def _unique_pairs(path: str | Path, line: int | None) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise DataError(path, "given twice in one object", line=line, field=key)
            out[key] = value
        return out

    return hook


def parse_json(path: str | Path, text: str, line: int | None = None,
               object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """Strict JSON of one record or one whole file (see the module docstring).

    Args:
        path: The file (for messages).
        text: The JSON text.
        line: The record's line (``None`` for a whole file: the parser's line is used).
        object_pairs_hook: Replaces the check that no key is given twice (to word it otherwise).

    Raises:
        DataError: Invalid JSON (with the column, or the line of a whole file), ``NaN`` or
            ``Infinity``, a key given twice, nesting too deep, an unpaired surrogate.
    """
    try:
        value = json.loads(text, object_pairs_hook=object_pairs_hook or _unique_pairs(path, line),
                           parse_constant=_refuse_constant(path, line))
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON: {exc.msg} at column {exc.colno}",
                        line=line if line is not None else exc.lineno) from None
    except RecursionError:
        raise DataError(path, "invalid JSON: nested too deeply", line=line) from None
    if "\\u" in text or "\\U" in text:  # only an escape can make an unpaired surrogate
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            code = ord(exc.object[exc.start])
            raise DataError(path, f"invalid JSON: \\u{code:04x} is an unpaired surrogate, not a character",
                            line=line) from None
        except RecursionError:
            raise DataError(path, "invalid JSON: nested too deeply", line=line) from None
    return value


def parse_record(path: str | Path, line: int, raw: bytes) -> dict[str, Any]:
    """One JSON Lines record (bytes, without its ``\\n``) as a JSON object.

    Raises:
        DataError: Not UTF-8, not strict JSON (:func:`parse_json`), or not an object.
    """
    value = parse_json(path, decode_utf8(path, raw, line), line)
    if not isinstance(value, dict):
        raise DataError(path, f"expected a JSON object, got {_json_type(value)}", line=line)
    return value


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    if isinstance(value, bool) or value is None:
        return names[type(value)]
    if isinstance(value, int | float):
        return "a number"
    return names.get(type(value), type(value).__name__)


def json_type(value: Any) -> str:
    """How a message names a parsed JSON/YAML value: ``a string '0.01'``, ``a number 3``, ``null``.

    Args:
        value: A value from :func:`json.loads` or ``yaml.safe_load``.
    """
    kind = _json_type(value)
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        return f"{kind} {shown}"
    if isinstance(value, bool):
        return f"{kind} {str(value).lower()}"
    return kind


def summarise_names(names: Iterable[str], shown: int = 5) -> str:
    """``'a', 'b', 'c' and 97 more``: a bounded list of names for one-line messages.

    Args:
        names: The names, in the order to show.
        shown: How many to name.
    """
    names = list(names)
    head = ", ".join(repr(n) for n in names[:shown])
    return head if len(names) <= shown else f"{head} and {len(names) - shown:,} more"


__all__ = [
    "RECORD_END", "decode_utf8", "describe_binary", "iter_jsonl", "iter_records", "json_type", "parse_json",
    "parse_record", "refuse_binary", "split_records", "summarise_names",
]
