"""The export above protobuf's 2 GiB limit, on a model built to cross it cheaply.

bge-m3 (2.27 GB in fp32) broke the export: the size test read the exporter's 433 KB ``.onnx``
instead of the weights beside it, a 2.27 GB single-file graph was written and could not be parsed
back. Here an encoder with bge-m3's layer shapes but one layer and a 515,587-token vocabulary
(2.2 GB of fp32 weights, :func:`labelmatch.model.random_encoder.cheap_large_shape`) is trained for
one epoch and exported by the ``labelmatch export`` command, with random weights and so with the
agreement gate waived. What ships is then loaded and served. ``make bench-production-shape`` runs
the real bge-m3 shape through every stage.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import make_tiny_dataset, tiny_config

from labelmatch.core.artifacts import verify_artifact
from labelmatch.core.disk import free_bytes
from labelmatch.data.dataset import save_dataset
from labelmatch.export.candidates import PROTOBUF_LIMIT, graph_bytes, uses_external_data
from labelmatch.export.onnx import export_disk_bytes
from labelmatch.model.random_encoder import build_random_encoder, cheap_large_shape
from labelmatch.runtime.engines import ENGINES

pytestmark = pytest.mark.slow

GIB = 2**30


class DiskSampler:
    """Bytes on disk under ``root`` (less the ``ignore``d top-level entries), sampled every 0.2 s
    in a thread: the peak, and the names of the directories seen (ONNX Runtime's scratch)."""

    def __init__(self, root, ignore: set[str]):
        self.root, self.ignore = root, ignore
        self.peak, self.dirs = 0, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _usage(self, path, ignore: frozenset[str] | set[str] = frozenset()) -> int:
        total = 0
        for entry in os.scandir(path):
            if entry.name in ignore:
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    self.dirs.add(entry.name)
                    total += self._usage(entry.path)
                else:
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
            except FileNotFoundError:  # removed while it was read
                continue
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self._usage(self.root, self.ignore))

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def large_export(tmp_path_factory):
    from labelmatch.training.sft import train_sft

    root = tmp_path_factory.mktemp("large")
    shape = cheap_large_shape()
    weights = 4 * shape.parameters()
    need = weights + export_disk_bytes(weights)  # the encoder, then the export beside it
    if free_bytes(root) < need:
        pytest.skip(f"the 2 GiB export needs {need / 1e9:.1f} GB free under {root}, "
                    f"which has {free_bytes(root) / 1e9:.1f} GB")
    built = build_random_encoder(root / "encoder", shape)
    dataset = make_tiny_dataset(n_docs=60)
    save_dataset(dataset, root / "data")
    train_sft(dataset, tiny_config(base_model=str(root / "encoder"), epochs=1, max_length=32), root / "model")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with DiskSampler(root, ignore={"encoder", "model", "data"}) as disk:
        process = subprocess.run(
            [sys.executable, "-m", "labelmatch.cli", "export", "--model", str(root / "model"), "--out",
             str(root / "onnx"), "--data", str(root / "data"), "--max-parity-docs", "16", "--probe-threads",
             "1", "--waive-agreement-gate", "random weights"],
            capture_output=True, text=True, timeout=1200, check=False)
    if process.returncode:
        shutil.rmtree(root, ignore_errors=True)
    assert process.returncode == 0, process.stderr[-3000:]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    yield {"root": root, "built": built, "out": root / "onnx", "stderr": process.stderr,
           "peak_bytes": peak * 1024 if peak > before else None, "disk": disk,
           "parity": json.loads((root / "onnx" / "parity.json").read_text())}
    shutil.rmtree(root, ignore_errors=True)  # about 8.5 GB: pytest keeps its last three temp dirs


def test_the_fp32_graph_crosses_2_gib_with_its_weights_in_external_data(large_export):
    fp32 = large_export["out"] / "model_fp32.onnx"
    assert large_export["built"]["weights_bytes"] > 2 * GIB
    assert graph_bytes(fp32) > 2 * GIB > PROTOBUF_LIMIT
    assert fp32.stat().st_size < 64 * 2**20, "the weights belong beside the graph, not in it"
    assert uses_external_data(fp32)
    assert large_export["parity"]["external_data"]["ort-fp32"] is True


def test_what_ships_is_the_graphs_with_their_data_files_and_nothing_left_over(large_export):
    out = large_export["out"]
    verify_artifact(out, "OnnxModel")  # every file listed, every digest right
    graphs = {ENGINES[name].file for name in large_export["parity"]["engines"]}
    expected = {"README.md", "label_embeddings.npy", "labelmatch.json", "labels.json", "manifest.json",
                "parity.json", "reference_features.npy", "reference_profile.json", "thresholds.json",
                "tokenizer", *graphs}
    extra = {p.name for p in out.iterdir()} - expected
    assert {name.removesuffix(".data") for name in extra} <= graphs, f"left over: {sorted(extra)[:5]}"


def test_every_candidate_was_built_judged_and_compared_with_the_fp32_graph(large_export):
    parity = large_export["parity"]
    candidates = [name for name, engine in ENGINES.items() if engine.available]
    assert set(parity["engines"]) == set(candidates)
    for name in candidates:
        to_fp32 = parity["engines"][name]["cosine_to_fp32"]
        assert len(to_fp32["per_window"]) == parity["windows"] > 0
        assert -1.0 <= to_fp32["min"] <= to_fp32["mean"] <= 1.0 + 1e-6
    assert parity["engines"]["ort-fp32"]["cosine_to_fp32"]["min"] > 0.9999
    assert parity["isolated_steps"] is True
    assert parity["engine_probe"]["mode"] == "one candidate loaded at a time"
    assert parity["engine_probe"]["picked"] in candidates


def test_the_waived_gate_is_recorded_and_said(large_export):
    assert large_export["parity"]["gate_waived"] == "random weights"
    assert "agreement gate waived: random weights" in large_export["stderr"]
    info = json.loads((large_export["out"] / "labelmatch.json").read_text())
    assert info["onnx"]["quantization"]["embeddings_quantized"] is False


def test_the_export_as_served_answers(large_export):
    from labelmatch.runtime.onnx_classifier import OnnxClassifier, OrtConfig

    served = OnnxClassifier.load(large_export["out"], OrtConfig(intra_op_threads=1))
    [prediction] = served.predict(["The VAT return for 2023 was filed late."])
    assert set(prediction.scores) == set(json.loads((large_export["out"] / "labels.json").read_text()))
    assert all(np.isfinite(list(prediction.scores.values())))


def test_the_export_process_peak_stays_within_a_bound(large_export):
    """Largest single process of the export (ru_maxrss of the waited children): a regression bound,
    not the figure (bench-production-shape records the whole process tree's peak at bge-m3 size).
    Before the fix the same export peaked at 19.9 GB in one process."""
    if large_export["peak_bytes"] is None:
        pytest.skip("an earlier child process of this session peaked higher; no figure for this one")
    weights = large_export["built"]["weights_bytes"]
    assert large_export["peak_bytes"] < 4.5 * weights, f"{large_export['peak_bytes'] / GIB:.1f} GiB"


def test_the_export_stays_within_the_disk_it_checked_for_with_its_scratch_beside_it(large_export):
    """What ``labelmatch export`` checks for before it starts (:func:`export_disk_bytes`) bounds what
    it held on disk, ONNX Runtime's quantisation copies included: they were written beside the
    artifact (``pre.quant.*``, ``ort.quant.*`` under its scratch directory), not in the system's
    temp dir, and are gone. Before the static graph was built first, the same export held 10.2 GB."""
    disk, weights = large_export["disk"], large_export["built"]["weights_bytes"]
    assert 2 * weights < disk.peak <= export_disk_bytes(weights), f"{disk.peak / 1e9:.2f} GB"
    scratch = {name for name in disk.dirs if name.startswith(".onnx.scratch-")}
    assert scratch and any(name.startswith(("pre.quant.", "ort.quant.")) for name in disk.dirs), disk.dirs
    assert not any((large_export["root"] / name).exists() for name in scratch)
