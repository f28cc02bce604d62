"""Batch classification on Ray Data vs a plain single-process ONNX loop (``make bench-batch``).

Corpus: every document of ../shared/data (Reuters-21578, CLINC150, Bitext, CUAD: 45,953 texts,
short intents to long news and clauses), repeated with suffixed ids up to ``--docs`` (100,000 by
default), written as JSONL shards of 10,000 documents. Model: the bundled MiniLM, untrained, with
CLINC150's 150 intent descriptions as labels, exported to int8 ONNX (what ``labelmatch export``
ships; no fp32 fallback, so every configuration does the same work).

Side by side in one run, each configuration in its own process (so its memory is its own):

* ``plain``: one process, one ONNX Runtime thread, the same ``BatchClassifier`` the actors run,
  called on batches read line by line and written with one ``ParquetWriter`` per shard.
* ``ray_1``: ``labelmatch classify`` (``run_batch``) with 1 actor × 1 ORT thread.
* ``ray_2``: 2 actors × 1 ORT thread.
* ``ray_2_10k``: as ``ray_2`` on the first 10,000 documents (memory vs input size).

Figures: docs/s, scaling efficiency 1 → 2 actors (docs/s ratio / 2), Ray Data's overhead at one
actor vs the plain loop, peak memory of the whole process tree (PSS: Ray's servers and actors
included, shared pages counted once) for 10k vs 100k documents, and the cost per 1,000 documents
at ``--price`` per core-hour. JSON + Markdown + a plot in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

from common import machine, zero_shot_model

from labelmatch.evaluation.report import pyplot

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = ("reuters21578_modapte", "clinc150", "bitext_customer_support", "cuad_clauses")
SHARD_DOCS = 10_000
#: Seconds after which a run's memory counts as steady (Ray starts its workers and agents before:
#: a transient of up to ~1 GB whose height varies between runs, whatever the input).
STEADY_AFTER_S = 30.0


def build_corpus(data: Path, n_docs: int, out: Path) -> list[Path]:
    """``n_docs`` documents from every dataset, interleaved, repeated with ``#k`` id suffixes."""
    texts: list[tuple[str, str]] = []
    for name in DATASETS:
        with (data / name / "docs.jsonl").open() as handle:
            texts += [(f"{name}/{d['id']}", d["text"]) for d in map(json.loads, handle)]
    texts.sort(key=lambda t: zlib.crc32(t[0].encode()))  # long and short mixed, the same order every run
    out.mkdir(parents=True, exist_ok=True)
    shards, handle = [], None
    for i in range(n_docs):
        if i % SHARD_DOCS == 0:
            if handle:
                handle.close()
            shards.append(out / f"part-{i // SHARD_DOCS:04d}.jsonl")
            handle = shards[-1].open("w")
        doc_id, text = texts[i % len(texts)]
        handle.write(json.dumps({"id": f"{doc_id}#{i // len(texts)}", "text": text}) + "\n")
    if handle:
        handle.close()
    return shards


def build_model(data: Path, work: Path, max_length: int) -> Path:
    """An untrained int8 OnnxModel with CLINC150's intents as labels."""
    from labelmatch.data.dataset import Dataset, load_dataset
    from labelmatch.export.onnx import ExportConfig, export_onnx

    onnx_dir = work / "onnx"
    if (onnx_dir / "manifest.json").is_file():
        return onnx_dir
    clinc = load_dataset(data / "clinc150")
    model_dir = zero_shot_model(clinc.labels, work / "model", max_length=max_length)
    parity_docs = [d for d in clinc.documents if d.split == "test"][:200]  # untrained: parity only
    for doc in parity_docs:
        doc.split = "val"
    config = ExportConfig(agreement_gate=0.0, fp32_fallback="off", max_parity_docs=200)
    export_onnx(model_dir, onnx_dir, config, Dataset(parity_docs, clinc.labels))
    return onnx_dir


# --- one configuration (runs in a child process: ``--one``) -----------------------------------

def run_plain(model: str, shards: list[Path], out: Path, batch_size: int) -> dict[str, Any]:
    """The baseline: one process, one ORT thread, the actors' own classifier, Parquet out."""
    import numpy as np
    import pyarrow.parquet as pq

    from labelmatch.batch.worker import BatchClassifier

    classifier = BatchClassifier(model, "jsonl", ort_threads=1)
    out.mkdir(parents=True, exist_ok=True)
    rows = 0
    for shard in shards:
        writer = None
        with shard.open() as handle:
            while True:
                lines = [line for _, line in zip(range(batch_size), handle, strict=False)]
                if not lines:
                    break
                table = classifier({"text": np.array(lines, dtype=object),
                                    "path": np.array([str(shard)] * len(lines), dtype=object)})
                writer = writer or pq.ParquetWriter(out / f"{shard.stem}.parquet", table.schema)
                writer.write_table(table)
                rows += len(lines)
        if writer:
            writer.close()
    return {"rows": rows}


def run_ray(model: str, shards: list[Path], out: Path, batch_size: int, actors: int,
            ray_dir: str) -> dict[str, Any]:
    """``labelmatch classify`` on a local Ray with ``actors`` actors of one ORT thread."""
    from labelmatch.batch.run import BatchConfig, run_batch

    inputs = out.parent / f"{out.name}-in"
    inputs.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        (inputs / shard.name).symlink_to(shard.resolve())
    summary = run_batch(BatchConfig(model, str(inputs), str(out), batch_size=batch_size, concurrency=actors,
                                    ort_threads=1, num_cpus=os.cpu_count(), ray_temp_dir=ray_dir,
                                    progress=False))
    return {"rows": summary["rows"], "rejects": summary["rejects"]}


def one(args: argparse.Namespace) -> None:
    shards = sorted(Path(args.shards).glob("*.jsonl"))[: args.n_shards]
    started = time.perf_counter()
    if args.one == "plain":
        result = run_plain(args.model, shards, Path(args.outdir), args.batch_size)
    else:
        result = run_ray(args.model, shards, Path(args.outdir), args.batch_size, args.actors, args.ray_dir)
    result["seconds"] = time.perf_counter() - started
    print("RESULT " + json.dumps(result), flush=True)


# --- the parent: runs each configuration and samples its process tree's memory ---------------

def _tree_pss_mb(pid: int) -> float:
    import psutil

    total = 0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += proc.memory_full_info().pss
    except psutil.NoSuchProcess:
        return 0.0
    return total / 2**20


def steady_pss(timeline: list[tuple[float, float]], after_s: float = STEADY_AFTER_S) -> float:
    """Peak PSS after the first ``after_s`` seconds (Ray's start-up transient left out)."""
    steady = [mb for t, mb in timeline if t >= after_s] or [mb for _, mb in timeline] or [0.0]
    return max(steady)


def measure(name: str, argv: list[str]) -> dict[str, Any]:
    """Run one configuration; its result, peak tree PSS and the PSS timeline."""
    proc = subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True)
    samples: list[tuple[float, float]] = []
    started = time.perf_counter()

    def sample() -> None:
        while proc.poll() is None:
            samples.append((time.perf_counter() - started, _tree_pss_mb(proc.pid)))
            time.sleep(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read() if proc.stdout else ""
    proc.wait()
    sampler.join()
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{output[-3000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["docs_per_s"] = result["rows"] / result["seconds"]
    result["peak_pss_mb"] = max((mb for _, mb in samples), default=0.0)
    result["steady_pss_mb"] = steady_pss([(t, mb) for t, mb in samples])
    result["pss_timeline"] = [(round(t, 1), round(mb, 1)) for t, mb in samples]
    print(f"{name}: {result['rows']} docs in {result['seconds']:.1f} s = {result['docs_per_s']:.1f} docs/s, "
          f"peak PSS {result['peak_pss_mb']:.0f} MB", flush=True)
    return result


def report(results: dict[str, Any], meta: dict[str, Any], out: Path) -> None:
    plt = pyplot()

    runs = results["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = ["plain", "ray_1", "ray_2"]
    left.bar(names, [runs[n]["docs_per_s"] for n in names], color=["#888", "#4c72b0", "#55a868"])
    left.set_ylabel("documents / s")
    left.set_title(f"{meta['docs']:,} documents, int8 MiniLM, 1 ORT thread per worker")
    for name in ("ray_2_10k", "ray_2"):
        timeline = runs[name]["pss_timeline"]
        right.plot([t for t, _ in timeline], [mb for _, mb in timeline],
                   label=f"{name} ({runs[name]['rows']:,} docs)")
    right.set_xlabel("seconds")
    right.set_ylabel("process tree PSS (MB)")
    right.set_title("memory vs input size (2 actors)")
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "batch.png", dpi=110)

    d = results["derived"]
    m = results["machine"]
    lines = [
        "# Batch classification on Ray Data (`make bench-batch`)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, int8 dot-product: "
        f"{', '.join(m['int8_dot_product']) or 'none'}"
        f" (avx2 {m['avx2']}, avx512f {m['avx512f']}). Corpus: {meta['docs']:,} documents from "
        f"../shared/data ({meta['unique_docs']:,} unique texts repeated with suffixed ids), "
        f"{meta['shards']} JSONL shards; model: bundled MiniLM int8, {meta['labels']} labels (CLINC150), "
        f"max length {meta['max_length']}; batch size {meta['batch_size']}. Each configuration in its own "
        "process, one after the other, in one run.",
        "",
        f"| configuration | documents | seconds | docs/s | peak PSS (MB) | "
        f"peak PSS after {STEADY_AFTER_S:.0f} s (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, run in runs.items():
        lines.append(f"| {name} | {run['rows']:,} | {run['seconds']:.1f} | {run['docs_per_s']:.1f} | "
                     f"{run['peak_pss_mb']:.0f} | {run['steady_pss_mb']:.0f} |")
    lines += [
        "",
        f"- Scaling 1 → 2 actors: **{d['scaling_efficiency']:.2f}** (docs/s ratio / 2; target ≥ 0.8).",
        f"- Ray Data overhead at one actor vs the plain loop: **{d['overhead_1_actor'] * 100:.1f}%** "
        "(1 − ray_1 / plain; target ≤ 15%).",
        f"- Memory, 100k vs 10k documents (2 actors): **{d['steady_pss_ratio_100k_10k']:.2f}×** after the "
        f"first {STEADY_AFTER_S:.0f} s (target within 1.25×); {d['pss_ratio_100k_10k']:.2f}× counting Ray's "
        "start-up transient, whose height varies from run to run whatever the input (see the plot).",
        f"- Cost per 1,000 documents at {meta['price']} USD per core-hour: plain "
        f"{d['usd_per_1k']['plain']:.5f}, ray_1 {d['usd_per_1k']['ray_1']:.5f}, ray_2 "
        f"{d['usd_per_1k']['ray_2']:.5f} (cores used: 1, 1, 2; from docs/s per core).",
        "",
        "![throughput and memory](batch.png)",
        "",
        "PSS counts shared pages (Ray's object store in /dev/shm, the model mapped by each process) "
        "once across the tree, so it is what the processes cost the machine together; it includes "
        "Ray's own servers (GCS, raylet, dashboard agent), about 1 GB whatever the input.",
    ]
    (out / "batch.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000, help="Documents of the memory comparison.")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--price", type=float, default=0.05, help="USD per core-hour.")
    parser.add_argument("--work", type=Path, default=None)
    # child mode
    parser.add_argument("--one", choices=["plain", "ray"], default=None)
    parser.add_argument("--model", default="")
    parser.add_argument("--shards", default="")
    parser.add_argument("--n_shards", type=int, default=10**9)
    parser.add_argument("--outdir", default="")
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--ray_dir", default="")
    parser.add_argument("--render", type=Path, default=None, help="Re-render a batch.json (same figures).")
    args = parser.parse_args()
    if args.render:
        results = json.loads(args.render.read_text())
        for run in results["runs"].values():
            run["steady_pss_mb"] = steady_pss(run["pss_timeline"])
        runs = results["runs"]
        results["derived"]["steady_pss_ratio_100k_10k"] = (runs["ray_2"]["steady_pss_mb"]
                                                           / runs["ray_2_10k"]["steady_pss_mb"])
        args.render.write_text(json.dumps(results, indent=2))
        report(results, results["meta"], args.render.parent)
        return
    if args.one:
        one(args)
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-batch-"))
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(args.data, work, args.max_length)
    corpus = work / "corpus"
    shards = sorted(corpus.glob("*.jsonl")) or build_corpus(args.data, args.docs, corpus)
    ray_dir = tempfile.mkdtemp(prefix="lmbb-", dir="/tmp")
    common = ["--model", str(model), "--shards", str(corpus), "--batch_size", str(args.batch_size),
              "--ray_dir", ray_dir]
    small_shards = max(1, args.small // SHARD_DOCS)
    configs = {
        "plain": ["--one", "plain"],
        "ray_1": ["--one", "ray", "--actors", "1"],
        "ray_2": ["--one", "ray", "--actors", "2"],
        "ray_2_10k": ["--one", "ray", "--actors", "2", "--n_shards", str(small_shards)],
    }
    runs = {}
    for name, argv in configs.items():
        outdir = work / "out" / name
        runs[name] = measure(name, [*common, *argv, "--outdir", str(outdir)])
    labels = json.loads((model / "labels.json").read_text())
    unique = sum(sum(1 for _ in (args.data / n / "docs.jsonl").open()) for n in DATASETS)
    per_core = {"plain": runs["plain"]["docs_per_s"], "ray_1": runs["ray_1"]["docs_per_s"],
                "ray_2": runs["ray_2"]["docs_per_s"] / 2}
    derived = {
        "scaling_efficiency": runs["ray_2"]["docs_per_s"] / (2 * runs["ray_1"]["docs_per_s"]),
        "overhead_1_actor": 1 - runs["ray_1"]["docs_per_s"] / runs["plain"]["docs_per_s"],
        "pss_ratio_100k_10k": runs["ray_2"]["peak_pss_mb"] / runs["ray_2_10k"]["peak_pss_mb"],
        "steady_pss_ratio_100k_10k": runs["ray_2"]["steady_pss_mb"] / runs["ray_2_10k"]["steady_pss_mb"],
        "usd_per_1k": {k: args.price * 1000 / (v * 3600) for k, v in per_core.items()},
        "docs_per_s_per_core": per_core,
    }
    meta = {"docs": args.docs, "unique_docs": unique, "shards": len(shards), "labels": len(labels),
            "max_length": args.max_length, "batch_size": args.batch_size, "price": args.price}
    results = {"machine": machine(), "meta": meta, "runs": runs, "derived": derived,
               "command": "make bench-batch"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch.json").write_text(json.dumps(results, indent=2))
    report(results, meta, args.out)
    print(json.dumps(derived, indent=2))


if __name__ == "__main__":
    main()
