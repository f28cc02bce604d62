"""Settings files (JSON or YAML) read into typed dataclasses, every field checked, one-line errors.

Every settings file the command line reads (``train --config``, ``tune --config``, ``grpo
--config``, ``monitor --config``, RayJob values, ``thresholds.json``) goes through here:

* :func:`read_settings` reads the file (missing, not text, not UTF-8, invalid JSON/YAML: named
  with file and line; YAML floats such as ``1e-3`` are numbers, as in YAML 1.2 and JSON; a key
  given twice is an error) and keeps its text, so a bad field is named with its line.
* :func:`build_settings` checks every value against the dataclass's type annotations (``int``,
  ``float``, ``bool``, ``str``, ``Literal``, ``X | None``, ``list``/``tuple``/``dict`` of those,
  nested dataclasses) before the class's own range checks run: ``"alpha": "0.01"`` is "field
  'alpha': expected a number, got a string '0.01'", never a ``TypeError`` from deep inside. Nothing
  is coerced (a string is not a number, ``true`` is not 1) except integers where a float is
  expected.

A file's errors are :class:`~labelmatch.core.errors.DataError` (``file:line: field 'x': ...``);
values from elsewhere (flags, inline JSON) give :class:`~labelmatch.core.errors.ConfigError`
naming the source and the field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from labelmatch.core.errors import ConfigError, DataError
from labelmatch.core.inputs import SNIFF_BYTES, UTF8_BOM, decode_utf8, json_type, parse_json, refuse_binary

T = TypeVar("T")
#: Suffixes read as YAML (everything else is JSON).
YAML_SUFFIXES = (".yaml", ".yml")

Where = tuple[str | int, ...]


def _read_text(path: Path, expected: str) -> str:
    """The file's text: found, a file, readable, not binary, UTF-8 (the bad byte's line named)."""
    if not path.exists():
        raise DataError(path, "file not found")
    if not path.is_file():
        raise DataError(path, "not a file (a directory?)")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc.strerror}") from exc
    refuse_binary(path, raw[:SNIFF_BYTES], expected)
    raw = raw.removeprefix(UTF8_BOM)
    text = decode_utf8(path, raw)
    if not text.strip():
        raise DataError(path, "file is empty")
    return text


def read_json_file(path: str | Path,
                   object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """A whole JSON file, strictly (:func:`labelmatch.core.inputs.parse_json`).

    Args:
        path: The file.
        object_pairs_hook: Replaces the default check that no key is given twice (e.g. to word
            its message for the file's meaning).

    Raises:
        DataError: Missing, not text, not UTF-8, empty, or invalid JSON (with its line).
    """
    path = Path(path)
    return parse_json(path, _read_text(path, "UTF-8 JSON"), object_pairs_hook=object_pairs_hook)


@dataclass
class SettingsFile:
    """A settings file's parsed body and text (to name the line of a field).

    Attributes:
        path: The file.
        text: Its text.
        body: The parsed JSON/YAML value.
    """

    path: Path
    text: str
    body: Any
    _lines: dict[Where, int] | None = field(default=None, repr=False)

    def line_of(self, where: Where) -> int | None:
        """1-based line of the key at ``where`` (e.g. ``("train_config", "lr")``), or the nearest
        enclosing one found; ``None`` when none is."""
        if self._lines is None:
            self._lines = _key_lines(self.text)
        for end in range(len(where), 0, -1):
            if where[:end] in self._lines:
                return self._lines[where[:end]]
        return _search_line(self.text, where)

    def __str__(self) -> str:
        return str(self.path)


def read_settings(path: str | Path, default_format: Literal["json", "yaml"] = "json") -> SettingsFile:
    """Read a JSON file, or YAML by suffix (``.yaml``/``.yml``).

    Args:
        path: The file.
        default_format: How a file whose suffix is neither ``.json`` nor YAML's is read.

    Raises:
        DataError: Missing, not text, not UTF-8, empty (JSON), invalid JSON/YAML (with its
            line), or a key given twice.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    yaml_file = suffix in YAML_SUFFIXES or (suffix != ".json" and default_format == "yaml")
    text = _read_text(path, "UTF-8 YAML" if yaml_file else "UTF-8 JSON")
    body = _parse_yaml(path, text) if yaml_file else parse_json(path, text)
    return SettingsFile(path, text, body)


def _yaml_loader() -> type:
    """A SafeLoader that reads YAML 1.2 floats (``1e-3``) as numbers and refuses duplicate keys."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"),
        list("-+0123456789."),
    )

    def mapping(loader: Any, node: Any, deep: bool = False) -> dict[Any, Any]:
        loader.flatten_mapping(node)  # YAML merge keys (<<)
        seen: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise DataError(loader.name, "given twice in one mapping", line=key_node.start_mark.line + 1,
                                field=str(key))
            seen[key] = loader.construct_object(value_node, deep=deep)
        return seen

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def _parse_yaml(path: Path, text: str) -> Any:
    import yaml

    loader = _yaml_loader()(text)
    loader.name = str(path)
    try:
        return loader.get_single_data() or {}
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(str(exc.problem or exc.context or "").split())
        raise DataError(path, f"invalid YAML: {problem}", line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise DataError(path, f"invalid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise DataError(path, "invalid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def _key_lines(text: str) -> dict[Where, int]:
    """``{key path: line}`` of every mapping key, from YAML's node marks (JSON is YAML here)."""
    try:
        import yaml

        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except Exception:  # not parseable as YAML (a JSON corner case), or no PyYAML: search the text
        return {}
    lines: dict[Where, int] = {}

    def walk(node: Any, where: Where) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                here = (*where, str(key.value))
                lines.setdefault(here, key.start_mark.line + 1)
                walk(value, here)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines.setdefault((*where, i), item.start_mark.line + 1)
                walk(item, (*where, i))

    walk(root, ())
    return lines


def _search_line(text: str, where: Where) -> int | None:
    """The line of ``where``'s last key found in order in the text (only ``\\n`` ends a line)."""
    lines = text.split("\n")
    start, found = 0, None
    for key in where:
        if not isinstance(key, str):
            continue
        pattern = re.compile(rf'"{re.escape(key)}"\s*:|^\s*-?\s*{re.escape(key)}\s*:')
        for number in range(start, len(lines)):
            if pattern.search(lines[number]):
                start, found = number, number + 1
                break
    return found


def dotted(where: Where) -> str:
    """``train_config.lr``, ``tolerations[0].key``: how a message names a nested field."""
    out = ""
    for part in where:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def settings_error(source: SettingsFile | str | Path, where: Where, message: str) -> Exception:
    """The error naming ``source`` (file + line, or a flag/source name) and the field at ``where``."""
    name = dotted(where) or None
    if isinstance(source, SettingsFile):
        return DataError(source.path, message, line=source.line_of(where), field=name)
    return ConfigError(f"{source}: field '{name}': {message}" if name else f"{source}: {message}")


def _describe(hint: Any) -> str:
    """How a message names what a type annotation accepts."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if hint is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple) or hint in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values"
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict or hint is dict:
        return f"a mapping of {_plural(args[1])}" if args else "a mapping"
    if dataclasses.is_dataclass(hint):
        return "a mapping of settings"
    return getattr(hint, "__name__", str(hint))


def _plural(hint: Any) -> str:
    """How a message names several values of ``hint`` (the items of a list or mapping)."""
    words = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
    if hint in words:
        return words[hint]
    origin = typing.get_origin(hint)
    if origin is dict or hint is dict or dataclasses.is_dataclass(hint):
        return "mappings"
    if origin in (list, tuple) or hint in (list, tuple):
        return "lists"
    return "values"


def check_value(value: Any, hint: Any, where: Where, source: SettingsFile | str | Path) -> Any:
    """``value`` checked against the annotation ``hint`` (nested values too).

    Args:
        value: A parsed JSON/YAML value.
        hint: The field's type annotation.
        where: The field's key path (for messages).
        source: The file (or source name) it came from.

    Returns:
        The value, with integers made floats where a float is expected, lists made tuples where a
        tuple is, and mappings made dataclasses where one is.

    Raises:
        DataError: (a file) or ConfigError: the value does not fit, naming the field.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def wrong() -> Exception:
        return settings_error(source, where, f"expected {_describe(hint)}, got {json_type(value)}")

    if hint is Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        scalar = options[0] in (bool, int, float, str) or typing.get_origin(options[0]) is Literal
        if len(options) == 1 and not scalar:  # a container or settings: name the nested field at fault
            if value is None:
                raise wrong()
            return check_value(value, options[0], where, source)
        for option in options:
            try:
                return check_value(value, option, where, source)
            except (ConfigError, DataError):
                continue
        raise wrong()
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise wrong()
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise wrong()
    if hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise settings_error(source, where, f"expected a finite number, got {value}")
            return float(value)
        raise wrong()
    if hint is str:
        if isinstance(value, str):
            return value
        raise wrong()
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, list | tuple):
            raise wrong()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise settings_error(source, where, f"expected {_describe(hint)}, got {len(value)}")
            return tuple(check_value(v, a, (*where, i), source) for i, (v, a) in enumerate(zip(value, args,
                                                                                             strict=True)))
        item = args[0] if args else Any
        checked = [check_value(v, item, (*where, i), source) for i, v in enumerate(value)]
        return tuple(checked) if origin is tuple or hint is tuple else checked
    if origin is dict or hint is dict or origin is Mapping:
        if not isinstance(value, dict):
            raise wrong()
        key_hint, value_hint = args if args else (Any, Any)
        out = {}
        for key, item in value.items():
            if key_hint is str and not isinstance(key, str):
                raise settings_error(source, (*where, str(key)),
                                     f"expected a string key, got {json_type(key)}")
            out[key] = check_value(item, value_hint, (*where, str(key)), source)
        return out
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        return build_settings(hint, value, source, where)
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise wrong()
    return value


def build_settings(cls: type[T], values: Any, source: SettingsFile | str | Path, where: Where = ()) -> T:
    """An instance of the dataclass ``cls`` from parsed values, every field checked first.

    Unknown keys and values of the wrong type are named with their field (and line, for a file);
    then ``cls`` is built and its own checks run (a ``ConfigError`` from ``__post_init__`` is
    attributed to the field it names).

    Args:
        cls: A dataclass whose fields are annotated.
        values: The parsed mapping.
        source: A :class:`SettingsFile`, or a name for values from elsewhere (``--config``).
        where: Key path of ``values`` inside the file (nested settings).

    Raises:
        DataError: (a file) or ConfigError: naming the field.
    """
    if not isinstance(values, dict):
        raise settings_error(source, where, f"expected a mapping of settings, got {json_type(values)}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]  # type: ignore[arg-type]
    for key in values:
        if key not in known:
            raise settings_error(source, (*where, str(key)),
                                 f"unknown setting (known: {', '.join(sorted(known))})")
    checked = {key: check_value(value, hints[key], (*where, key), source) for key, value in values.items()}
    try:
        return cls(**checked)
    except (ConfigError, TypeError, ValueError) as exc:
        own_check = isinstance(exc, ConfigError) and not isinstance(source, SettingsFile)
        if isinstance(exc, DataError) or own_check:
            raise  # a class's own range checks name their field already
        message = str(exc)
        named = sorted((k for k in checked if re.search(rf"(?<!\w){re.escape(k)}(?!\w)", message)),
                       key=len, reverse=True)
        raise settings_error(source, (*where, named[0]) if named else where, message) from None


def load_settings(cls: type[T], path: str | Path) -> tuple[T, dict[str, Any]]:
    """Read ``path`` (:func:`read_settings`) and build ``cls`` from it (:func:`build_settings`).

    Returns:
        The instance and the file's checked values (to merge flags into and build again).
    """
    settings = read_settings(path)
    instance = build_settings(cls, settings.body, settings)
    return instance, {k: getattr(instance, k) for k in settings.body}


__all__ = [
    "SettingsFile", "build_settings", "check_value", "dotted", "load_settings", "read_json_file",
    "read_settings", "settings_error",
]
