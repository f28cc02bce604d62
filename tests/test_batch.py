"""``labelmatch classify`` on a real local Ray (127.0.0.1) and a real S3 API server (moto):
outputs, rejects, resume after an interruption, and agreement with the model server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from conftest import environ, make_tiny_dataset, ray_sandbox
from model_server import ModelServer
from s3_server import moto_s3_server, s3_env

from labelmatch.batch.run import BatchConfig, run_batch
from labelmatch.core.errors import ConfigError, DataError


@pytest.fixture
def sandbox():
    with ray_sandbox("lmb-") as root:
        yield root


def _texts(n: int, seed: int = 0) -> list[str]:
    docs = make_tiny_dataset(max(n, 40), seed=seed).documents
    return [docs[i % len(docs)].text for i in range(n)]


def _write_jsonl(path: Path, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r + "\n" for r in rows))
    return path


def _docs(prefix: str, texts: list[str]) -> list[str]:
    return [json.dumps({"id": f"{prefix}-{i}", "text": t}) for i, t in enumerate(texts)]


def _config(model: Path | str, input: Path | str, output: Path | str, root: Path, **changes) -> BatchConfig:
    base = dict(model=str(model), input=str(input), output=str(output), concurrency=1, batch_size=8,
                num_cpus=2, ray_temp_dir=str(root), progress=False)
    return BatchConfig(**{**base, **changes})


def _results(output: Path) -> list[Path]:
    """The output shards (temporary files start with ``_``, like every name pyarrow skips)."""
    return sorted(p for p in output.glob("*.parquet") if not p.name.startswith("_"))


def _read_outputs(output: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in _results(output)])


@pytest.fixture(scope="class")
def ray_root():
    """One local Ray (127.0.0.1, 3 CPUs: two actors and Ray Data's reads) for a class's in-process
    runs, and an S3 server on 127.0.0.1 that its workers know of: a Ray's workers take the
    environment it was started with. (A run started by the CLI starts its own Ray: tested below.)"""
    from labelmatch.platform.ray_local import init_local_ray

    with ray_sandbox("lmb-") as root, moto_s3_server() as endpoint, environ(**s3_env(endpoint)):
        init_local_ray(num_cpus=3, temp_dir=str(root))
        yield root  # ray_sandbox shuts Ray down


class TestInOneLocalRay:
    """``run_batch`` in this process, on one Ray started for them all (``ray_session`` uses the
    Ray already running): what each run writes, rejects and resumes."""

    def test_classify_local_shards_rows_rejects_and_digests(self, onnx_model, tmp_path, ray_root):
        model = onnx_model[0]
        texts = _texts(30)
        _write_jsonl(tmp_path / "in" / "a.jsonl", _docs("a", texts[:20]))
        bad = [json.dumps({"id": "b-0", "text": texts[20]}), "not json", json.dumps({"id": "b-2"}), "",
               "[1, 2]", json.dumps({"text": texts[21]})]
        _write_jsonl(tmp_path / "in" / "sub" / "b.jsonl", bad)
        pq.write_table(pa.table({"id": ["c-0", "c-1"], "text": texts[22:24], "labels": [["x"], []]}),
                       tmp_path / "in" / "c.parquet")
        _write_jsonl(tmp_path / "in" / "empty.jsonl", [])
        out = tmp_path / "out"

        summary = run_batch(_config(model, tmp_path / "in", out, ray_root, concurrency=2, batch_size=4))

        assert summary["shards"] == 4 and summary["written"] == 4
        assert summary["rows"] == 20 + 2 + 2 and summary["rejects"] == 3
        assert [p.name for p in _results(out)] == ["a.parquet", "c.parquet", "empty.parquet",
                                                                 "sub__b.parquet"]
        b = pq.read_table(out / "sub__b.parquet").to_pylist()
        assert [r["id"] for r in b] == ["b-0", "sub__b:6"]  # a row without id is named by shard:line
        assert [r["line"] for r in b] == [1, 6]
        rejects = [json.loads(line) for line in (out / "rejects" / "sub__b.jsonl").read_text().splitlines()]
        assert [(r["line"], r["reason"].split(":")[0]) for r in rejects] == [
            (2, "invalid JSON"), (3, "field 'text'"), (5, "expected a JSON object, got an array")]
        assert all(r["file"].endswith("sub/b.jsonl") for r in rejects)
        assert pq.read_table(out / "empty.parquet").num_rows == 0

        table = _read_outputs(out)
        names = json.loads(table.schema.metadata[b"labelmatch.label_names"])
        assert names == list(json.loads((model / "labels.json").read_text()))
        scores = np.array(table.column("scores").to_pylist())
        assert scores.shape == (24, len(names)) and np.all((scores > 0) & (scores < 1))
        assert set(table.column("model_digest").to_pylist()) == {summary["model_digest"]}
        assert set(table.column("label_set_digest").to_pylist()) == {summary["label_set_digest"]}
        assert json.loads((out / "_summary.json").read_text())["rows"] == 24
        assert not list(out.rglob("_tmp-*"))

    def test_extra_labels_change_the_label_set_digest(self, onnx_model, tmp_path, ray_root):
        model = onnx_model[0]
        _write_jsonl(tmp_path / "in.jsonl", _docs("d", _texts(5)))
        first = run_batch(_config(model, tmp_path / "in.jsonl", tmp_path / "o1", ray_root))
        extra = {"weather_report": "A weather forecast with rain and temperatures."}
        second = run_batch(_config(model, tmp_path / "in.jsonl", tmp_path / "o2", ray_root, labels=extra,
                                   similarities=True))
        assert first["model_digest"] == second["model_digest"]
        assert first["label_set_digest"] != second["label_set_digest"]
        table = pq.read_table(tmp_path / "o2" / "in.parquet")
        names = json.loads(table.schema.metadata[b"labelmatch.label_names"])
        assert names[-1] == "weather_report" and len(table.column("similarities")[0]) == len(names)

    def test_strict_stops_at_the_first_bad_row_and_keeps_finished_shards(self, onnx_model, tmp_path,
                                                                          ray_root):
        model = onnx_model[0]
        _write_jsonl(tmp_path / "in" / "a.jsonl", _docs("a", _texts(6)))
        _write_jsonl(tmp_path / "in" / "b.jsonl", [*_docs("b", _texts(3)), "{broken"])
        _write_jsonl(tmp_path / "in" / "c.jsonl", _docs("c", _texts(4)))
        out = tmp_path / "out"
        with pytest.raises(DataError, match=r"b\.jsonl:4: invalid JSON"):
            run_batch(_config(model, tmp_path / "in", out, ray_root, strict=True))
        # b's partial output is removed
        assert [p.name for p in out.iterdir() if p.suffix == ".parquet"] == ["a.parquet"]
        a_written = (out / "a.parquet").stat().st_mtime_ns

        # Started again (not strict) with the same output: a is skipped, b and c are written once.
        summary = run_batch(_config(model, tmp_path / "in", out, ray_root))
        assert summary["skipped_done"] == 1 and summary["leftovers_removed"] == 0
        assert (out / "a.parquet").stat().st_mtime_ns == a_written
        ids = _read_outputs(out).column("id").to_pylist()
        assert sorted(ids) == sorted([f"a-{i}" for i in range(6)] + [f"b-{i}" for i in range(3)]
                                     + [f"c-{i}" for i in range(4)])

    def test_s3_input_output_and_model(self, onnx_model, ray_root):
        from labelmatch.platform.artifact_store import ArtifactStore

        store = ArtifactStore.from_env()  # the class's S3 server
        store.upload_artifact(onnx_model[0], "s3://models/tax/onnx")
        texts = _texts(12)
        body = "".join(r + "\n" for r in [*_docs("x", texts), "oops"]).encode()
        store.put_bytes("s3://archive/in/2026/x.jsonl", body)
        store.put_bytes("s3://results/.keep", b"")

        summary = run_batch(_config("s3://models/tax/onnx", "s3://archive/in", "s3://results/run1", ray_root))
        assert summary["rows"] == 12 and summary["rejects"] == 1
        # (pyarrow keeps empty "directory/" marker objects after a move: not results)
        keys = sorted(k for k in store.list_keys("s3://results/run1/") if not k.endswith("/"))
        assert keys == ["run1/2026__x.parquet", "run1/_summary.json", "run1/rejects/2026__x.jsonl"]
        table = pq.read_table(pa.BufferReader(store.get_bytes("s3://results/run1/2026__x.parquet")))
        assert table.column("id").to_pylist() == [f"x-{i}" for i in range(12)]
        reject = json.loads(store.get_bytes("s3://results/run1/rejects/2026__x.jsonl"))
        assert reject["file"] == "s3://archive/in/2026/x.jsonl" and reject["line"] == 13

        again = run_batch(_config("s3://models/tax/onnx", "s3://archive/in", "s3://results/run1", ray_root))
        assert again["skipped_done"] == 1 and again["rows"] == 0

    def test_batch_agrees_with_the_model_server(self, onnx_model, tmp_path, ray_root):
        model = onnx_model[0]
        texts = _texts(24, seed=3)
        _write_jsonl(tmp_path / "in.jsonl", _docs("q", texts))
        run_batch(_config(model, tmp_path / "in.jsonl", tmp_path / "out", ray_root, concurrency=2,
                          batch_size=5))
        table = pq.read_table(tmp_path / "out" / "in.parquet")
        names = json.loads(table.schema.metadata[b"labelmatch.label_names"])

        server = ModelServer(model, tmp_path / "server.log", "--state_dir", str(tmp_path / "state"))
        server.start()
        try:
            response = requests.post(f"{server.base}/v1/models/labelmatch:predict",
                                     json={"instances": texts}, timeout=120)
            response.raise_for_status()
            served = response.json()["predictions"]
        finally:
            server.stop()
        batch_scores = np.array(table.column("scores").to_pylist())
        served_scores = np.array([[p["scores"][n] for n in names] for p in served])
        assert np.abs(batch_scores - served_scores).max() <= 1e-5
        assert table.column("labels").to_pylist() == [p["labels"] for p in served]

    def test_bad_rows_go_to_rejects_and_valid_rows_keep_their_exact_lines(self, onnx_model, tmp_path,
                                                                           ray_root):
        """JSON Lines as written: only \\n ends a record (U+2028, U+2029, U+0085 and \\r stay text), a
        line that is not UTF-8 or not one strict JSON object is a reject with its line, and every valid
        row keeps its own line number (blank lines and a BOM counted as the file has them)."""
        model = onnx_model[0]
        texts = _texts(6)
        valid = lambda i, extra="": json.dumps({"id": f"v{i}", "text": texts[i] + extra},  # noqa: E731
                                               ensure_ascii=False).encode()
        rows = [
            valid(0, " line\u2028separator"),                 # 1
            b'{"id": "bad-utf8", "text": "caf\xe9"}',          # 2 not UTF-8
            valid(1, " paragraph\u2029separator and \x85"),   # 3
            b"",                                                # 4 blank: counted, no row
            valid(2) + b"\r",                                  # 5 Windows line end
            b'{"id": "nan", "text": "x", "score": NaN}',        # 6 not JSON
            b'{"id": "dup", "text": "a", "text": "b"}',         # 7 a key twice
            b'{"id": "sur", "text": "\\ud800 lone"}',           # 8 unpaired surrogate
            b'{"id": {"a": 1}, "text": "x"}',                   # 9 id not a string or number
            b"[" * 50_000 + b"]" * 50_000,                      # 10 nested too deep
            b'{"id": "blank", "text": " "}',                    # 11 empty text
            b"\xff\xfe\x00garbage",                             # 12 binary
            valid(3),                                           # 13 last line, no \n after it
        ]
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "mixed.jsonl").write_bytes(b"\n".join(rows))
        (tmp_path / "in" / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + valid(4) + b"\n\n" + valid(5) + b"\n")
        out = tmp_path / "out"

        summary = run_batch(_config(model, tmp_path / "in", out, ray_root, batch_size=4))

        kept = pq.read_table(out / "mixed.parquet").to_pylist()
        assert [(r["id"], r["line"]) for r in kept] == [("v0", 1), ("v1", 3), ("v2", 5), ("v3", 13)]
        bom = pq.read_table(out / "bom.parquet").to_pylist()
        assert [(r["id"], r["line"]) for r in bom] == [("v4", 1), ("v5", 3)]
        written = (out / "rejects" / "mixed.jsonl").read_text()
        rejects = [json.loads(line) for line in written.split("\n") if line]
        reasons = {r["line"]: r["reason"] for r in rejects}
        assert sorted(reasons) == [2, 6, 7, 8, 9, 10, 11, 12]
        assert reasons[2].startswith("not valid UTF-8 (byte 31: 0xe9)")
        assert "NaN" in reasons[6] and "field 'text': given twice" in reasons[7]
        assert "unpaired surrogate" in reasons[8] and reasons[9].startswith("field 'id': expected a string")
        assert "nested too deeply" in reasons[10] and reasons[11] == "field 'text': is empty"
        assert reasons[12].startswith("not valid UTF-8")
        assert all(r["file"].endswith("in/mixed.jsonl") and "\n" not in r["reason"] for r in rejects)
        assert summary["rows"] == 6 and summary["rejects"] == 8

    def test_strict_run_refused_at_its_first_row_leaves_no_empty_output(self, onnx_model, tmp_path, ray_root):
        (tmp_path / "in.jsonl").write_bytes(b'{"text": "VAT refund"}\n{"text": "caf\xe9"}\n')
        out = tmp_path / "new" / "out"
        with pytest.raises(DataError, match=r"in\.jsonl:2: not valid UTF-8"):
            run_batch(_config(onnx_model[0], tmp_path / "in.jsonl", out, ray_root, strict=True))
        assert not (tmp_path / "new").exists()



def test_killed_run_resumes_without_duplicate_or_missing_rows(onnx_model, tmp_path, sandbox):
    model = onnx_model[0]
    texts = _texts(40)
    shards = 24
    for s in range(shards):
        _write_jsonl(tmp_path / "in" / f"part-{s:03d}.jsonl", _docs(f"s{s}", texts))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "labelmatch", "classify", "--model", str(model), "--input",
               str(tmp_path / "in"), "--output", str(out), "--batch-size", "8", "--num-cpus", "1",
               "--no-progress"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=log)
    deadline = time.monotonic() + 240
    while not _results(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(_results(out))
    assert 0 < done_at_kill < shards, (done_at_kill, (tmp_path / "first.log").read_text()[-2000:])
    for path in _results(out):  # whatever is visible is complete
        assert pq.read_table(path).num_rows == len(texts)

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout)
    assert summary["skipped_done"] >= done_at_kill and summary["written"] == shards - summary["skipped_done"]
    ids = _read_outputs(out).column("id").to_pylist()
    expected = [f"s{s}-{i}" for s in range(shards) for i in range(len(texts))]
    assert len(ids) == len(expected) and sorted(ids) == sorted(expected)
    assert not list(out.rglob("_tmp-*"))



def _refusal(tmp_path: Path, model: Path, input: Path, output: Path) -> str:
    """The CLI's answer to a run it refuses: exit status 2 and one line on stderr."""
    done = subprocess.run([sys.executable, "-m", "labelmatch", "classify", "--model", str(model), "--input",
                           str(input), "--output", str(output), "--no-progress"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    return lines[0]


def test_inputs_that_are_not_what_their_name_says_are_refused_in_one_line(onnx_model, tmp_path):
    """A text file named .parquet, a gzip file named .jsonl, a compressed input, an output that
    is a file or inside the input: exit 2, one line naming the file, and no output left behind."""
    import gzip

    model = onnx_model[0]
    texts = tmp_path / "texts"
    _write_jsonl(texts / "part-0.parquet", _docs("t", _texts(2)))
    out = tmp_path / "out"
    line = _refusal(tmp_path, model, texts, out)
    assert f"{texts / 'part-0.parquet'}: not a Parquet file (it starts like JSON: name it .jsonl)" in line
    assert not out.exists()

    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "a.jsonl").write_bytes(gzip.compress("".join(d + "\n" for d in _docs("g", _texts(3))).encode()))
    line = _refusal(tmp_path, model, packed, out)
    assert f"{packed / 'a.jsonl'}: the file is gzip-compressed, not UTF-8 JSON Lines: decompress it" in line
    assert not out.exists()
    (packed / "a.jsonl").rename(packed / "a.jsonl.gz")
    assert "compressed" in _refusal(tmp_path, model, packed / "a.jsonl.gz", out)
    assert "1 compressed file(s) there" in _refusal(tmp_path, model, packed, out)

    _write_jsonl(tmp_path / "good" / "in.jsonl", _docs("d", _texts(2)))
    (tmp_path / "taken").write_text("a file\n")
    assert "--output " + str(tmp_path / "taken") + ": is an existing file" in _refusal(
        tmp_path, model, tmp_path / "good", tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "a file\n"
    assert "is inside --input" in _refusal(tmp_path, model, tmp_path / "good", tmp_path / "good" / "out")
    assert not (tmp_path / "good" / "out").exists()

    table = tmp_path / "cols"
    table.mkdir()
    pq.write_table(pa.table({"text": [1, 2]}), table / "n.parquet")
    assert "field 'text': expected a column of strings, got int64" in _refusal(tmp_path, model, table, out)
    assert not out.exists()


def test_bad_settings_are_refused_before_anything_runs(onnx_model, tmp_path):
    with pytest.raises(ConfigError, match="concurrency"):
        BatchConfig(model="m", input="i", output="o", concurrency=0)
    with pytest.raises(ConfigError, match="4 CPUs, but the local Ray has 2"):
        run_batch(BatchConfig(model=str(onnx_model[0]), input=str(tmp_path), output=str(tmp_path / "o"),
                              concurrency=4, num_cpus=2))
    with pytest.raises(ConfigError, match=r"no \.jsonl, \.json or \.parquet shards"):
        run_batch(BatchConfig(model=str(onnx_model[0]), input=str(tmp_path), output=str(tmp_path / "o")))


def test_rayjob_runs_the_same_classify_on_cpu_workers(rayjob_crd, tmp_path):
    """The RayJob (checked strictly against KubeRay's CRD) runs this very command with the
    cluster's Ray; its arguments parse as the CLI's own. (Its run on a cluster is not tested here.)"""
    import shlex

    import typer
    import yaml
    from typer.testing import CliRunner

    from labelmatch.batch.rayjob import batch_rayjob, batch_spec
    from labelmatch.cli import app, register_commands

    config = BatchConfig(model="s3://models/tax/onnx", input="s3://archive/in", output="s3://results/run1",
                         labels={"weather": "A weather report."}, concurrency=8, similarities=True)
    values = tmp_path / "rayjob.yaml"
    values.write_text(yaml.safe_dump({"namespace": "ml", "env_secret": "s3-credentials", "workers": 2}))
    manifest, labels_uri = batch_rayjob(config, batch_spec(values, workers=3))
    assert rayjob_crd(manifest) == []
    assert labels_uri == "s3://results/run1/_labels.json"
    assert manifest["metadata"]["labels"]["app.kubernetes.io/component"] == "batch"
    [workers] = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == 3 and "nvidia.com/gpu" not in json.dumps(workers)

    register_commands()
    args = shlex.split(manifest["spec"]["entrypoint"])
    assert args[:2] == ["labelmatch", "classify"]
    command = typer.main.get_command(app)
    classify = command.get_command(command.make_context("labelmatch", ["classify", "--help"]), "classify")
    params = classify.make_context("classify", args[2:]).params
    assert params["address"] == "auto" and params["concurrency"] == 8 and params["similarities"] is True
    assert (params["model"], params["input"], params["output"], params["labels"]) == (
        config.model, config.input, config.output, labels_uri)

    with pytest.raises(ConfigError, match="--input /data: a RayJob reads and writes the store"):
        batch_rayjob(BatchConfig(model="s3://m", input="/data", output="s3://o"), batch_spec())
    printed = CliRunner().invoke(app, ["classify", "--model", "s3://m/x", "--input", "s3://a/in", "--output",
                                       "s3://b/out", "--rayjob", "--dry-run", "--namespace", "ml"])
    assert printed.exit_code == 0, printed.output
    assert yaml.safe_load(printed.output)["metadata"]["namespace"] == "ml"
