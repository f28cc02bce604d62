"""Serving engines: every candidate built and judged at export, the probe's pick served, overrides."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from conftest import make_tiny_dataset

from labelmatch.core.artifacts import read_manifest
from labelmatch.core.errors import ConfigError
from labelmatch.export.onnx import ExportConfig, export_onnx
from labelmatch.runtime.engines import (
    ENGINES,
    STATIC_MODEL_FILE,
    engine,
    pick_engine,
    probe_costs,
    served_cost_ms,
)
from labelmatch.runtime.onnx_classifier import OnnxClassifier, OrtConfig, served_engine

GATE = 0.5


@pytest.fixture(scope="module")
def probed(trained_model, tmp_path_factory):
    """An export that lets the probe pick (``engine="auto"``)."""
    out = tmp_path_factory.mktemp("engines") / "onnx"
    parity = export_onnx(trained_model, out, ExportConfig(agreement_gate=GATE, probe_seconds=0.3),
                         make_tiny_dataset())
    return out, parity


def test_export_measures_every_engine_and_records_the_cheapest_that_passes(probed):
    root, parity = probed
    info = json.loads((root / "labelmatch.json").read_text())
    probe = parity["engine_probe"]
    expected = [n for n in ENGINES if ENGINES[n].available]
    assert list(parity["engines"]) == expected == list(info["engines"])
    assert probe["passed"] == [n for n in expected if parity["engines"][n]["served_agreement"] >= GATE]
    assert set(probe["costs_ms"]) == set(probe["passed"]) and probe["picked"] in probe["passed"]
    assert probe["picked"] == min(probe["costs_ms"], key=probe["costs_ms"].get)
    assert info["engine"] == parity["served"]["engine"] == probe["picked"]
    assert probe["machine"]["cpu"] and probe["documents"] > 0
    # fp32 has no fallback and agrees with torch; every int8 cost includes its fallback's share.
    assert parity["engines"]["ort-fp32"]["fallback"] is None
    assert parity["engines"]["ort-fp32"]["served_agreement"] == 1.0
    for name in probe["passed"]:
        plan = parity["engines"][name]["fallback"]
        share = plan["fallback_fraction"] if plan else 0.0
        assert probe["costs_ms"][name] == pytest.approx(
            served_cost_ms(probe["probe_ms"][name], share, probe["probe_ms"]["ort-fp32"]))
    assert STATIC_MODEL_FILE in read_manifest(root)["files"]
    static = info["onnx"]["static_quantization"]
    assert static["format"] == "QDQ" and static["fp32_matmuls"] == 6  # MiniLM-L6's feed-forward outputs


def test_the_picked_engine_is_served_and_every_measured_one_can_be_chosen(probed):
    root, parity = probed
    config = OrtConfig(intra_op_threads=1)
    assert OnnxClassifier.load(root, config).engine == parity["served"]["engine"]
    texts = [d.text for d in make_tiny_dataset().split("val").documents]
    reference = OnnxClassifier.load(root, config, engine_name="ort-fp32").encoder.embed(texts)
    for name, entry in parity["engines"].items():
        clf = OnnxClassifier.load(root, config, engine_name=name)
        assert clf.engine == name and clf.encoder.runtime == ENGINES[name].runtime
        assert (clf.fallback is not None) == (entry["fallback"] is not None)
        cosine = (clf.encoder.embed(texts) * reference).sum(axis=1)
        assert cosine.min() > (0.9999 if name == "ort-fp32" else 0.95), name
        assert cosine.min() == pytest.approx(entry["cosine_min"], abs=0.02), name


def test_openvino_runs_the_static_graph_like_onnx_runtime(probed):
    pytest.importorskip("openvino")
    root, parity = probed
    texts = [d.text for d in make_tiny_dataset().split("val").documents]
    config = OrtConfig(intra_op_threads=1)
    ort = OnnxClassifier.load(root, config, engine_name="ort-int8-static").encoder.embed(texts)
    ov = OnnxClassifier.load(root, config, engine_name="openvino-int8-static").encoder.embed(texts)
    # Same QDQ graph, two runtimes' int8 kernels (OpenVINO may run the graph's float parts in
    # bf16 where the CPU has it): close, not bit-equal. 0.95, the margin every engine test uses:
    # between the two runtimes the tiny model's documents measured 0.980-0.99 on one Intel CPU.
    assert float((ort * ov).sum(axis=1).min()) > 0.95
    assert "openvino-int8-static" in parity["engines"]


def test_openvino_bf16_runs_the_fp32_graph_close_to_fp32(probed):
    if not ENGINES["openvino-bf16"].available:
        pytest.skip(f"openvino-bf16 {ENGINES['openvino-bf16'].unavailable_reason()}")
    root, parity = probed
    texts = [d.text for d in make_tiny_dataset().split("val").documents]
    config = OrtConfig(intra_op_threads=1)
    fp32 = OnnxClassifier.load(root, config, engine_name="ort-fp32").encoder.embed(texts)
    served = OnnxClassifier.load(root, config, engine_name="openvino-bf16")
    assert served.encoder.runtime == "openvino" and not served.encoder.batch_invariant
    bf16 = served.encoder.embed(texts)
    # bfloat16 keeps 8 bits of mantissa: far closer to fp32 than int8 (cosine 0.99998 on MiniLM),
    # and not bit-equal (or the hint was ignored).
    cosine = (fp32 * bf16).sum(axis=1)
    assert float(cosine.min()) > 0.999 and not np.array_equal(fp32, bf16)
    assert parity["engines"]["openvino-bf16"]["served_agreement"] >= GATE


def test_an_engine_can_be_forced_and_must_pass_the_gate(trained_model, tmp_path):
    out = tmp_path / "onnx"
    config = ExportConfig(agreement_gate=0.0, engine="ort-fp32", engines=("ort-int8-dynamic", "ort-fp32"),
                          probe_seconds=0.1)
    parity = export_onnx(trained_model, out, config, make_tiny_dataset())
    assert parity["engine_probe"]["picked"] == "ort-fp32" and parity["engine_probe"]["forced"]
    assert list(parity["engines"]) == ["ort-int8-dynamic", "ort-fp32"]
    assert not (out / STATIC_MODEL_FILE).exists()
    info = json.loads((out / "labelmatch.json").read_text())
    assert info["engine"] == "ort-fp32" and info["onnx"]["fallback"] is None
    with pytest.raises(ConfigError, match="was not measured"):
        OnnxClassifier.load(out, engine_name="ort-int8-static")


def test_engine_settings_are_checked():
    with pytest.raises(ConfigError, match="choose from"):
        ExportConfig(engines=("tensorrt",))
    with pytest.raises(ConfigError, match="one of engines"):
        ExportConfig(engine="ort-int8-static", engines=("ort-fp32",))
    with pytest.raises(ConfigError, match="known"):
        engine("tensorrt")
    with pytest.raises(ConfigError, match="no engine serves"):
        served_engine({}, model_file="model_other.onnx")


def test_an_artifact_from_before_engines_serves_dynamic_int8_with_its_fallback():
    plan = {"model": "model_fp32.onnx", "margin": 0.01}
    info = {"onnx": {"fallback": plan}}
    chosen, fallback = served_engine(info)
    assert chosen.name == "ort-int8-dynamic" and fallback == plan
    chosen, fallback = served_engine(info, model_file="model_fp32.onnx")
    assert chosen.name == "ort-fp32" and fallback is None
    with pytest.raises(ConfigError, match="was not measured"):
        served_engine(info, engine_name="ort-int8-static")


def test_the_probe_picks_the_cheapest_cost_with_fallback():
    # 2 ms int8 that re-embeds 40% with a 5 ms fp32 graph costs 4 ms: slower than 3.5 ms static.
    costs = {"ort-int8-dynamic": served_cost_ms(2.0, 0.4, 5.0),
             "ort-int8-static": served_cost_ms(3.5, 0.0, 5.0), "ort-fp32": 5.0}
    assert costs["ort-int8-dynamic"] == pytest.approx(4.0)
    assert pick_engine(costs) == "ort-int8-static"
    assert pick_engine({"ort-fp32": 1.0, "ort-int8-dynamic": 1.0}) == "ort-int8-dynamic"  # ties: list order
    with pytest.raises(ConfigError):
        pick_engine({})


def test_the_probe_warms_every_input_then_times_candidates_in_turns():
    calls: list[tuple[str, str]] = []

    def slow(text: str) -> None:
        calls.append(("slow", text))
        time.sleep(0.004 if ("slow", text) in calls[:-1] else 0.05)  # the first call of an input: compiling

    def fast(text: str) -> None:
        calls.append(("fast", text))
        time.sleep(0.002)

    ms = probe_costs({"slow": slow, "fast": fast}, ["a", "b", "c"], min_seconds=0.01, min_rounds=3)
    # Every input warmed once per candidate before timing: the slow first calls are not counted.
    assert calls[:6] == [("slow", t) for t in "abc"] + [("fast", t) for t in "abc"]
    assert 3.5 < ms["slow"] < 20 and 1.5 < ms["fast"] < ms["slow"]
    timed = [name for name, text in calls[6:] if text == "a"]
    assert len(timed) >= 6 and timed[:4] == ["slow", "fast", "fast", "slow"]  # turns rotate by round
    with pytest.raises(ConfigError):
        probe_costs({"slow": slow}, [])


def test_a_pick_whose_runtime_is_missing_falls_back_to_the_cheapest_installed_one(monkeypatch):
    import labelmatch.runtime.engines as engines

    real = engines.runtime_available
    monkeypatch.setattr(engines, "runtime_available", lambda runtime: runtime != "openvino" and real(runtime))
    plan = {"model": "model_fp32.onnx", "margin": 0.02}
    info = {"engine": "openvino-int8-static", "engines": {
        "ort-int8-dynamic": {"cost_ms": 3.0, "fallback": plan},
        "openvino-int8-static": {"cost_ms": 1.0, "fallback": None},
        "ort-fp32": {"cost_ms": 2.5, "fallback": None},
    }}
    chosen, fallback = served_engine(info)
    assert chosen.name == "ort-fp32" and fallback is None
    with pytest.raises(ConfigError, match="not installed"):
        served_engine(info, engine_name="openvino-int8-static")


def test_bf16_is_a_candidate_only_where_the_cpu_computes_bf16(monkeypatch):
    import labelmatch.runtime.engines as engines

    monkeypatch.setattr(engines, "runtime_available", lambda runtime: True)
    monkeypatch.setattr(engines, "precision_supported", lambda precision: False)
    assert not ENGINES["openvino-bf16"].available and ENGINES["openvino-int8-static"].available
    info = {"engine": "openvino-bf16", "engines": {
        "openvino-bf16": {"cost_ms": 1.0, "fallback": None},
        "ort-int8-dynamic": {"cost_ms": 3.0, "fallback": None},
        "ort-fp32": {"cost_ms": 2.5, "fallback": None},
    }}
    assert served_engine(info)[0].name == "ort-fp32"  # the cheapest measured engine that runs here
    with pytest.raises(ConfigError, match="computes bf16 natively"):
        served_engine(info, engine_name="openvino-bf16")


def test_the_server_serves_the_engine_it_is_told_to(probed, monkeypatch):
    from prometheus_client import CollectorRegistry

    from labelmatch.serving.metrics import ServeMetrics
    from labelmatch.serving.server import LabelmatchModel, build_parser, config_from_args

    root, _ = probed
    monkeypatch.delenv("LABELMATCH_ENGINE", raising=False)
    args = build_parser().parse_args(["--model_dir", str(root), "--engine", "ort-int8-static",
                                      "--state_dir", str(root.parent / "state")])
    config = config_from_args(args)
    assert config.engine == "ort-int8-static"
    model = LabelmatchModel(config, ServeMetrics(CollectorRegistry()))
    model.load()
    try:
        assert model.classifier.engine == "ort-int8-static"
    finally:
        model.stop()
    bad = config_from_args(build_parser().parse_args(["--model_dir", str(root), "--engine", "tensorrt",
                                                      "--state_dir", str(root.parent / "state")]))
    with pytest.raises(ConfigError, match="unknown engine 'tensorrt'"):
        LabelmatchModel(bad, ServeMetrics(CollectorRegistry())).load()


def test_a_server_told_to_probe_times_the_passing_engines_here_and_serves_the_cheapest(probed, monkeypatch):
    from prometheus_client import CollectorRegistry

    from labelmatch.runtime.onnx_classifier import TOKENIZER_FILE
    from labelmatch.serving.load_probe import probe_engine_at_load, texts_of_lengths
    from labelmatch.serving.metrics import ServeMetrics
    from labelmatch.serving.server import LabelmatchModel, build_parser, config_from_args

    root, parity = probed
    export_probe = parity["engine_probe"]
    assert len(export_probe["lengths"]) == export_probe["documents"] and max(export_probe["lengths"]) > 5
    # Texts of the export probe's token lengths (the artifact keeps no document text).
    tokenizer = OnnxClassifier.load(root, OrtConfig(intra_op_threads=1)).encoder.tokenizer
    texts = texts_of_lengths(root / TOKENIZER_FILE, ["a contract clause", "tariffs on steel"], [3, 17, 60])
    assert [len(tokenizer.encode(t).ids) for t in texts] == pytest.approx([3, 17, 60], abs=1)

    result = probe_engine_at_load(root, OrtConfig(intra_op_threads=1), min_seconds=0.05)
    assert result["candidates"] == [n for n in export_probe["passed"] if ENGINES[n].available]
    assert result["picked"] == min(result["costs_ms"], key=result["costs_ms"].get)
    assert result["lengths"] == export_probe["lengths"]
    for name in result["candidates"]:
        plan = parity["engines"][name]["fallback"]
        share = plan["fallback_fraction"] if plan else 0.0
        assert result["costs_ms"][name] == pytest.approx(
            served_cost_ms(result["probe_ms"][name], share, result["probe_ms"]["ort-fp32"]))

    monkeypatch.delenv("LABELMATCH_ENGINE", raising=False)
    state = str(root.parent / "state-probe")
    args = build_parser().parse_args(["--model_dir", str(root), "--engine", "probe",
                                      "--intra_op_threads", "1", "--state_dir", state])
    model = LabelmatchModel(config_from_args(args), ServeMetrics(CollectorRegistry()))
    model.load()
    try:
        assert model.engine_probe["picked"] == model.classifier.engine
        assert model.engine_probe["picked"] in model.engine_probe["candidates"]
    finally:
        model.stop()


def test_a_probe_one_at_a_time_holds_one_encoder_and_times_each():
    from labelmatch.runtime.engines import probe_encoders

    alive: list[str] = []
    most = []

    class Encoder:
        def __init__(self, name: str):
            self.name = name
            alive.append(name)
            most.append(len(alive))

        def embed(self, texts):
            return texts

        def __del__(self):
            alive.remove(self.name)

    loaders = {name: (lambda n=name: Encoder(n)) for name in ("a", "b", "c")}
    timed = probe_encoders(loaders, ["x", "y"], min_seconds=0.001, together=False)
    assert set(timed) == {"a", "b", "c"} and max(most) == 1
    most.clear()
    assert set(probe_encoders(loaders, ["x"], min_seconds=0.001, together=True)) == {"a", "b", "c"}
    assert max(most) == 3
