"""Small datasets written for this project (synthetic tax documents with fake PII)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def sample_path(name: str = "tax") -> Path:
    """Directory of a bundled sample dataset (``docs.jsonl``, ``labels.json``, ``feedback.jsonl``)."""
    path = ROOT / name
    if not (path / "docs.jsonl").is_file():
        raise FileNotFoundError(f"no bundled sample dataset {name!r} under {ROOT}")
    return path
