"""The memory that ships for the production encoder covers what bge-m3's shape was measured to need.

``make bench-production-shape`` runs a bge-m3-shaped encoder (random weights) through every stage
and records each stage's peak RSS (``bench/results/production_shape.json``). The compiled IR's
per-step memory (request = limit) and the serving chart's bge-m3 values must cover those peaks with
25% headroom; these tests fail when a new measurement outgrows the limit that ships, so the
limits are changed with the figures, not apart from them. For serving and batch the figure is the
resident ceiling (the peak plus the served and fp32 graphs fully resident, see the bench).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kubernetes.utils.quantity import parse_quantity

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "production_shape.json"
COMPILED = ROOT / "pipelines" / "compiled"
BGE_M3_VALUES = ROOT / "charts" / "labelmatch-serving" / "ci" / "bge-m3-values.yaml"
HEADROOM = 1.25
MB = 2**20


@pytest.fixture(scope="module")
def measured() -> dict:
    results = json.loads(RESULTS.read_text())
    return {stage["stage"]: stage for stage in results["stages"]} | {"_run": results}


def ir_default(pipeline: str, parameter: str) -> int:
    """A memory parameter's default in the compiled IR that ships, in bytes."""
    [path] = COMPILED.glob(f"labelmatch-{pipeline}-*.yaml")
    spec = next(yaml.safe_load_all(path.read_text()))
    return int(parse_quantity(spec["root"]["inputDefinitions"]["parameters"][parameter]["defaultValue"]))


def test_the_recorded_run_is_bge_m3_shaped_and_every_stage_passed(measured):
    run = measured["_run"]
    assert run["encoder"]["parameters"] == 567_754_752 and run["encoder"]["config"]["num_hidden_layers"] == 24
    assert run["all_passed"]
    assert {"sft", "pbt", "grpo", "evaluate", "export", "serve", "classify"} <= set(measured)
    assert run["export"]["gate_waived"], "random weights: the export must say it waived the gate"


def test_the_export_fits_in_8_gb(measured):
    assert measured["export"]["peak_tree_rss_mb"] * MB <= 8e9


@pytest.mark.parametrize(("pipeline", "parameter", "stage", "figure"), [
    ("training", "export_memory", "export", "peak_tree_rss_mb"),
    ("training", "grpo_memory", "grpo", "peak_tree_rss_mb"),
    ("training", "evaluate_memory", "evaluate", "peak_tree_rss_mb"),
    # the local backend runs the trials in the step's pod (2 trials measured)
    ("training", "tune_memory", "pbt", "peak_tree_rss_mb"),
    # a RayJob worker runs one trial
    ("training", "rayjob_worker_memory", "pbt", "peak_process_rss_mb"),
    ("batch", "batch_memory", "classify", "resident_ceiling_mb"),
])
def test_the_ir_memory_covers_the_measured_peak(measured, pipeline, parameter, stage, figure):
    need = measured[stage][figure] * MB * HEADROOM
    limit = ir_default(pipeline, parameter)
    assert limit >= need, f"{parameter} {limit / 2**30:.1f} GiB < {stage} x {HEADROOM}: {need / 2**30:.1f}"


def test_the_bge_m3_serving_values_cover_the_resident_ceiling(measured):
    values = yaml.safe_load(BGE_M3_VALUES.read_text())["resources"]
    limit = parse_quantity(values["limits"]["memory"])
    assert parse_quantity(values["requests"]["memory"]) <= limit
    need = measured["serve"]["resident_ceiling_mb"] * MB * HEADROOM
    assert limit >= need, f"limit {limit / 2**30:.1f} GiB < {need / 2**30:.1f} GiB"
