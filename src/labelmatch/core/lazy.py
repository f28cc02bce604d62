"""Lazy package exports (PEP 562): a package names its public API without importing it.

``import labelmatch.serving`` must not import torch, yet ``labelmatch.model.Classifier`` should
work; each package's ``__init__`` lists ``{name: module}`` and imports a module only when one of
its names is first used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for a package whose public names live in its modules.

    Args:
        package: The package's ``__name__``.
        exports: ``{public name: module under the package}``.

    Example::

        __getattr__, __dir__ = lazy_exports(__name__, {"Classifier": "classifier"})
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        globals_of_package = importlib.import_module(package).__dict__
        globals_of_package[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(importlib.import_module(package).__dict__))

    return __getattr__, __dir__
