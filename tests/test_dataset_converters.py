"""The converters behind the general adapter's benchmark (bench/datasets/convert.py), on a git
repository built here with the source's file layout: what they keep, how they split, and the one
line a bad record gets."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from labelmatch.data.dataset import load_dataset

CONVERT = Path(__file__).resolve().parents[1] / "bench/datasets/convert.py"


def _convert_module():
    spec = importlib.util.spec_from_file_location("bench_convert", CONVERT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _repo_with(tmp_path: Path, name: str, text: str) -> tuple[Path, str]:
    """A git repository holding ``name`` with ``text``; returns ``(repo, commit)``."""
    repo = tmp_path / "src"
    repo.mkdir(parents=True)
    (repo / name).write_text(text)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", name], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "data"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout
    return repo, commit.strip()


def _article(category: str, i: int) -> dict:
    return {"link": f"https://example.org/{category}/{i}", "headline": f"Headline {i}",
            "short_description": f"About {category.lower()} {i}.", "category": category,
            "authors": "", "date": "2022-09-23"}


def test_news_keeps_its_described_sections_and_holds_out_a_fifth_by_link(tmp_path):
    convert = _convert_module()
    rows = [_article("POLITICS", i) for i in range(50)] + [_article("WEDDINGS", i) for i in range(3)]
    repo, commit = _repo_with(tmp_path, convert.NEWS_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    source = convert.Source(**{**convert.SOURCES["news"].__dict__, "commit": commit})
    dataset = load_dataset(convert.convert(source, repo, tmp_path / "out"))
    assert set(dataset.labels) == set(convert.NEWS_DESCRIPTIONS)  # every description, WEDDINGS not one
    assert {label for d in dataset.documents for label in d.labels} == {"POLITICS"}
    assert len(dataset.documents) == 50
    first = dataset.documents[0]
    assert first.text == "Headline 0 About politics 0."
    held_out = {d.id for d in dataset.documents if d.split == "test"}
    expected = {f"news-{i + 1}" for i in range(50)
                if int(hashlib.sha1(rows[i]["link"].encode()).hexdigest(), 16) % 5 == 0}
    assert held_out == expected and 0 < len(held_out) < 50


def test_a_bad_news_record_names_its_file_line_and_field(tmp_path):
    convert = _convert_module()
    rows = [json.dumps(_article("POLITICS", 0)), json.dumps({"headline": "no section"})]
    repo, commit = _repo_with(tmp_path, convert.NEWS_FILE, "\n".join(rows) + "\n")
    line = r"^News_Category_Dataset_v3\.json:2: field 'category': missing or not text$"
    with pytest.raises(ValueError, match=line):
        list(convert.news_docs(repo, commit))
    repo, commit = _repo_with(tmp_path / "list", convert.NEWS_FILE, "[1, 2]\n")
    with pytest.raises(ValueError, match=r"^News_Category_Dataset_v3\.json:1: not a JSON object \(list\)$"):
        list(convert.news_docs(repo, commit))
