"""The production shape through every stage: a bge-m3-sized encoder (random weights), on our own CLI.

Our users run BAAI/bge-m3 (XLM-RoBERTa large, 568M parameters, 2.27 GB in fp32, CLS pooling). No
model hub is reachable here, so ``labelmatch random-encoder`` builds its exact architecture with
random weights (:mod:`labelmatch.model.random_encoder`), and this benchmark runs it through every
stage as a user would, one ``labelmatch`` command per stage: a few LoRA SFT steps, one PBT
iteration with 2 trials (local Ray on 127.0.0.1), one GRPO step on the bundled sample feedback,
evaluation, export (external data above 2 GiB, every engine candidate built, judged and probed;
the agreement gate waived because random weights make label sets meaningless), the model server
(v1 and v2 answers, readiness) and ``labelmatch classify`` on 1,000 documents.

Per stage it records wall time, the peak resident memory of the stage's whole process tree (the
sum over the command and every process it started, Ray workers included, sampled every 0.2 s)
and of its largest single process, and the size of what the stage wrote. Random weights say
nothing about quality: no F1 figure here means anything, and none is reported.

    python bench/bench_production_shape.py --out bench/results       # make bench-production-shape

Results: ``bench/results/production_shape.{json,md,png}``. The serving chart's and the IR's
memory for the bge-m3 profile are derived from these peaks (``tests/test_production_shape.py``
fails when a measured peak exceeds the limit that ships).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from common import machine, start_model_server, wait_until_ready

from labelmatch.evaluation.report import pyplot

ROOT = Path(__file__).resolve().parents[1]
WAIVED = "random weights (labelmatch random-encoder): label sets mean nothing"


def tree_rss(process: psutil.Process) -> tuple[int, int]:
    """``(sum, largest)`` resident bytes over ``process`` and all its descendants."""
    sizes = []
    for proc in [process, *process.children(recursive=True)]:
        try:
            sizes.append(proc.memory_info().rss)
        except psutil.Error:
            continue
    return sum(sizes), max(sizes, default=0)


class PeakSampler:
    """Samples a process tree's memory every ``interval`` seconds until stopped."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak_tree = self.peak_single = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                total, largest = tree_rss(self.process)
            except psutil.Error:
                return
            self.peak_tree, self.peak_single = max(self.peak_tree, total), max(self.peak_single, largest)
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, float]:
        """Stop sampling; the peaks in MB."""
        self._stop.set()
        self._thread.join()
        return {"peak_tree_rss_mb": round(self.peak_tree / 2**20),
                "peak_process_rss_mb": round(self.peak_single / 2**20)}


def dir_bytes(path: Path) -> int:
    """Bytes under ``path`` (0 when absent)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run_stage(name: str, command: list[str], logs: Path, artifact: Path | None, env: dict[str, str],
              timeout_s: float) -> dict[str, Any]:
    """Run one stage's command, sampling its memory; its log goes to ``logs/<name>.log``."""
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    with (logs / f"{name}.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        sampler = PeakSampler(process.pid)
        try:
            rc = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            rc = -9
        memory = sampler.stop()
    result = {"stage": name, "passed": rc == 0, "rc": rc, "wall_s": round(time.perf_counter() - started, 1),
              **memory, "artifact_mb": round(dir_bytes(artifact) / 2**20, 1) if artifact else None}
    tail = (logs / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:] if rc else []
    if tail:
        result["error"] = tail[0][:500]
    print(f"    {json.dumps(result)}", flush=True)
    return result


def sample_data(out: Path, docs: int) -> Path:
    """The first ``docs`` documents of the bundled sample data (labels and splits as they are)."""
    from labelmatch.sample_data import sample_path

    src = sample_path("tax")
    out.mkdir(parents=True, exist_ok=True)
    lines = (src / "docs.jsonl").read_text().splitlines()[:docs]
    (out / "docs.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copyfile(src / "labels.json", out / "labels.json")
    return out


def classify_input(out: Path, n: int) -> Path:
    """``n`` documents (the sample texts, repeated with new ids) as one JSON-lines file."""
    from labelmatch.sample_data import sample_path

    lines = (sample_path("tax") / "docs.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "docs.jsonl").open("w") as handle:
        for i in range(n):
            handle.write(json.dumps({"id": f"doc-{i:05d}", "text": texts[i % len(texts)]}) + "\n")
    return out


def serve_stage(onnx_dir: Path, logs: Path, threads: int) -> dict[str, Any]:
    """Start the model server on 127.0.0.1, check readiness and a v1 and a v2 answer, sample its memory."""
    import requests

    started = time.perf_counter()
    process, base = start_model_server(onnx_dir, threads, logs / "serve.log")
    sampler = PeakSampler(process.pid)
    checks: dict[str, Any] = {}
    try:
        wait_until_ready(process, base, logs / "serve.log", timeout_s=900)
        checks["ready_s"] = round(time.perf_counter() - started, 1)
        checks["v2_ready"] = requests.get(f"{base}/v2/health/ready", timeout=10).status_code == 200
        text = "Withholding tax on the dividend paid to the parent company in 2023."
        v1 = requests.post(f"{base}/v1/models/labelmatch:predict", json={"instances": [text]}, timeout=120)
        checks["v1_status"] = v1.status_code
        checks["v1_labels_scored"] = len(v1.json()["predictions"][0]["scores"]) if v1.ok else 0
        v2 = requests.post(f"{base}/v2/models/labelmatch/infer", timeout=120, json={
            "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]})
        checks["v2_status"] = v2.status_code
        checks["v2_outputs"] = [o["name"] for o in v2.json().get("outputs", [])] if v2.ok else []
        latencies = []
        for _ in range(20):
            t = time.perf_counter()
            requests.post(f"{base}/v1/models/labelmatch:predict", json={"instances": [text]}, timeout=120)
            latencies.append((time.perf_counter() - t) * 1000)
        checks["v1_latency_ms_median"] = round(sorted(latencies)[len(latencies) // 2], 1)
        passed = checks["v2_ready"] and v1.ok and v2.ok and checks["v1_labels_scored"] > 0
    except Exception as exc:  # a bench records a failed stage and goes on
        checks["error"] = f"{type(exc).__name__}: {exc}"[:500]
        passed = False
    finally:
        memory = sampler.stop()
        process.terminate()
        process.wait(timeout=60)
    result = {"stage": "serve", "passed": passed, "wall_s": round(time.perf_counter() - started, 1), **memory,
              "artifact_mb": None, **checks}
    print(f"    {json.dumps(result)}", flush=True)
    return result


def write_report(results: dict[str, Any], out: Path) -> None:
    """``production_shape.{json,md,png}``."""
    plt = pyplot()

    (out / "production_shape.json").write_text(json.dumps(results, indent=2) + "\n")
    stages = results["stages"]
    lines = [
        "# Production shape: a bge-m3-sized encoder (random weights) through every stage",
        "",
        f"Encoder: {results['encoder']['shape']}, {results['encoder']['parameters'] / 1e6:.0f}M parameters, "
        f"{results['encoder']['weights_bytes'] / 1e9:.2f} GB of fp32 weights, CLS pooling; random weights "
        "(shapes, formats, memory and speed only, never quality). Export gate waived: "
        f"{WAIVED}. Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores "
        f"(int8 dot product: {', '.join(results['machine'].get('int8_dot_product') or ['none'])}).",
        "",
        f"`{results['command']}`",
        "",
        "| stage | passed | wall (s) | peak RSS, process tree (MB) | peak RSS, largest process (MB) "
        "| artifact (MB) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in stages:
        lines.append(f"| {s['stage']} | {'yes' if s['passed'] else '**no**'} | {s['wall_s']} | "
                     f"{s['peak_tree_rss_mb']} | {s['peak_process_rss_mb']} | "
                     f"{s['artifact_mb'] if s['artifact_mb'] is not None else '-'} |")
    export = results.get("export") or {}
    if export:
        lines += ["", "## Export", "",
                  "| engine | graph (MB) | external data | cosine to fp32 graph, min / mean (per window) | "
                  "probe ms / document |", "|---|---:|---|---|---:|"]
        for name, e in export["engines"].items():
            lines.append(f"| {name} | {e['graph_mb']} | {'yes' if e['external_data'] else 'no'} | "
                         f"{e['cosine_to_fp32_min']:.4f} / {e['cosine_to_fp32_mean']:.4f} | "
                         f"{e['probe_ms'] if e['probe_ms'] is not None else '-'} |")
        lines += ["", f"Picked: {export['picked']} (probe: {export['probe_mode']}). Gate waived: "
                      f"{export['gate_waived']}."]
    serve = next((s for s in stages if s["stage"] == "serve"), None)
    if serve:
        lines += ["", f"Serving: ready after {serve.get('ready_s')} s, v1 {serve.get('v1_status')}, "
                      f"v2 {serve.get('v2_status')}, median one-document v1 latency "
                      f"{serve.get('v1_latency_ms_median')} ms."]
    ceilings = [s for s in stages if "resident_ceiling_mb" in s]
    if ceilings:
        lines += ["", "Resident ceilings (the measured peak plus the served and fp32 graphs fully resident, "
                      "what the limits are sized on: ONNX Runtime maps external data, and short runs read "
                      "little of the 1 GB float embedding table): "
                  + ", ".join(f"{s['stage']} {s['resident_ceiling_mb']} MB" for s in ceilings) + "."]
    classify = next((s for s in stages if s["stage"] == "classify" and "rows" in s), None)
    if classify:
        lines += ["", f"classify: {classify['rows']} documents, {classify['docs_per_s']} documents/s "
                      "(one actor, 2 ONNX Runtime threads)."]
    lines += ["", "Wall times were measured with other jobs sharing the 2 cores (tests, a second "
                  "engineer's work): read them as orders of magnitude; the memory figures are the point.",
              "", "![stages](production_shape.png)", ""]
    (out / "production_shape.md").write_text("\n".join(lines))

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [s["stage"] for s in stages]
    a.barh(names, [s["wall_s"] for s in stages], color="tab:blue")
    a.set_xlabel("wall time (s)")
    a.invert_yaxis()
    b.barh(names, [s["peak_tree_rss_mb"] / 1024 for s in stages], color="tab:orange", label="process tree")
    b.barh(names, [s["peak_process_rss_mb"] / 1024 for s in stages], color="tab:red", alpha=0.6,
           label="largest process")
    b.set_xlabel("peak RSS (GiB)")
    b.invert_yaxis()
    b.legend()
    fig.suptitle("bge-m3-shaped encoder (random weights), every stage")
    fig.tight_layout()
    fig.savefig(out / "production_shape.png", dpi=110)


def add_ceilings(stages: list[dict[str, Any]], export: dict[str, Any]) -> None:
    """Add ``resident_ceiling_mb`` to the stages that serve the export (serve, classify).

    ONNX Runtime maps a graph's external data, so a weight counts in RSS only once it is read: the
    int8 graph's float word-embedding table (1 GB for bge-m3) is read row by row, one row per
    distinct token, and a short run touches little of it. The ceiling is the measured peak plus
    every graph the stage may hold fully resident: the served engine's and the fp32 fallback
    graph, as if the export had planned one (a trained model's usually does). What limits are
    sized on (tests/test_production_shape.py).
    """
    picked = export["engines"][export["picked"]]["graph_mb"]
    fallback = export["engines"]["ort-fp32"]["graph_mb"]
    for stage in stages:
        if stage["stage"] in ("serve", "classify"):
            stage["resident_ceiling_mb"] = round(stage["peak_tree_rss_mb"] + picked + fallback)


def export_summary(onnx_dir: Path) -> dict[str, Any]:
    """What the export wrote and measured: graphs, external data, cosines to fp32, the probe."""
    parity = json.loads((onnx_dir / "parity.json").read_text())
    probe = parity["engine_probe"]
    return {
        "picked": probe["picked"],
        "probe_mode": probe.get("mode"),
        "gate_waived": parity.get("gate_waived"),
        "engines": {
            name: {"graph_mb": round(parity["graph_bytes"][name] / 2**20, 1),
                   "external_data": parity["external_data"][name],
                   "cosine_to_fp32_min": entry["cosine_to_fp32"]["min"],
                   "cosine_to_fp32_mean": entry["cosine_to_fp32"]["mean"],
                   "cosine_to_fp32_per_window": entry["cosine_to_fp32"]["per_window"],
                   "probe_ms": round(probe["probe_ms"][name], 2) if name in probe["probe_ms"] else None}
            for name, entry in parity["engines"].items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--work", type=Path, default=None, help="Work directory (default: a temp dir).")
    parser.add_argument("--shape", default="bge-m3")
    parser.add_argument("--docs", type=int, default=60, help="Sample documents used to train and evaluate.")
    parser.add_argument("--classify-docs", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (export probe, server).")
    parser.add_argument("--stage-timeout", type=float, default=3600)
    parser.add_argument("--resume", action="store_true",
                        help="Keep the stages that passed in an earlier run of the same --work directory.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.work or Path(tempfile.mkdtemp(prefix="lmps-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    # Ray's temp dir and ~/.ray stay in the work directory (short path: Ray's socket names).
    env = {**os.environ, "HOME": str(work), "RAY_TMPDIR": str(work), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cli = [sys.executable, "-m", "labelmatch.cli"]
    data = sample_data(work / "data", args.docs)
    encoder = work / "encoder"
    train = ["--batch-size", "8", "--max-length", str(args.max_length)]
    stages: list[dict[str, Any]] = []

    done = work / "stages"
    done.mkdir(exist_ok=True)

    def stage(name: str, command: list[str], artifact: Path | None) -> bool:
        record = done / f"{name.replace(' ', '_')}.json"
        if args.resume and record.is_file() and json.loads(record.read_text())["passed"]:
            stages.append({**json.loads(record.read_text()), "resumed": True})
            print(f"    {name}: passed in an earlier run of this work directory, not run again", flush=True)
        else:
            stages.append(run_stage(name, cli + command, logs, artifact, env, args.stage_timeout))
            record.write_text(json.dumps(stages[-1]))
        return stages[-1]["passed"]

    stage("build encoder", ["random-encoder", "--out", str(encoder), "--shape", args.shape], encoder)
    stage("sft", ["train", "--data", str(data), "--base-model", str(encoder), "--out", str(work / "sft"),
                  "--epochs", "1", "--no-progress", *train], work / "sft")
    stage("pbt", ["tune", "--data", str(data), "--base-model", str(encoder), "--out", str(work / "pbt"),
                  "--report", str(work / "pbt-report"), "--trials", "2", "--iterations", "1",
                  "--steps-per-iteration", "2", "--num-cpus", "2", "--ray-temp-dir", str(work / "ray"),
                  "--verbose", "0", *train], work / "pbt")
    from labelmatch.demo import export_sample_feedback

    (work / "feedback").mkdir(exist_ok=True)
    feedback = work / "feedback" / "feedback_export"
    if not (feedback / "manifest.json").is_file():
        feedback = export_sample_feedback(work / "feedback")
    stage("grpo", ["grpo", "--model", str(work / "sft"), "--feedback", str(feedback), "--out",
                   str(work / "grpo"), "--steps", "1", "--no-progress", "--replay-data", str(data)],
          work / "grpo")
    stage("evaluate", ["evaluate", "--model", str(work / "grpo"), "--data", str(data), "--split", "test",
                       "--out", str(work / "eval")], work / "eval")
    stage("export", ["export", "--model", str(work / "grpo"), "--out", str(work / "onnx"),
                     "--data", str(data), "--probe-threads", str(args.threads),
                     "--waive-agreement-gate", WAIVED], work / "onnx")
    stages.append(serve_stage(work / "onnx", logs, args.threads))
    inputs = classify_input(work / "classify-in", args.classify_docs)
    stage("classify", ["classify", "--model", str(work / "onnx"), "--input", str(inputs / "docs.jsonl"),
                       "--output", str(work / "classify-out"), "--concurrency", "1", "--num-cpus", "2",
                       "--ort-threads", str(args.threads), "--no-progress"], work / "classify-out")
    if stages[-1]["passed"]:
        import pyarrow.parquet as pq

        rows = sum(pq.read_metadata(p).num_rows for p in (work / "classify-out").rglob("*.parquet"))
        stages[-1]["rows"] = rows
        stages[-1]["passed"] = rows == args.classify_docs
        stages[-1]["docs_per_s"] = round(rows / stages[-1]["wall_s"], 1)

    export = export_summary(work / "onnx") if (work / "onnx" / "parity.json").is_file() else None
    if export:
        add_ceilings(stages, export)
    results = {
        "command": "python bench/bench_production_shape.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "encoder": json.loads((encoder / "random_encoder.json").read_text()) if encoder.exists() else {},
        "stages": stages,
        "export": export,
        "all_passed": all(s["passed"] for s in stages),
        "work": str(work),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(results, args.out)
    print(f"all stages passed: {results['all_passed']}; results in {args.out}/production_shape.*")
    sys.exit(0 if results["all_passed"] else 1)


if __name__ == "__main__":
    main()
