"""Drift detection on a real shift: how often `labelmatch monitor` fires, by shift size and window.

Protocol (``make bench-drift``, Bitext customer support from ``../shared/data``):

1. Two categories (``--holdout``, default FEEDBACK and CONTACT: complaints, reviews and requests
   for a human) are removed from training entirely: their documents, their category labels and
   their intents. The model is trained on the rest (a seeded subsample of the official train
   split; validation carved from it, seen categories only) and exported to ONNX int8, which
   builds its reference profile from that validation split.
2. The exported model is served by the real model server on 127.0.0.1 with every prediction
   logged (``--log_sample_rate 1``); the whole official test split is sent through it once. The
   logged predictions, read back from the serving state, are what the streams are made of.
3. For each shift rate (0%, 5%, 10%, 20% of held-out-category documents) and window size (100,
   250, 500 documents), ``--streams`` windows are drawn (seeded): seen-category test documents
   without replacement, plus the shifted share from the held-out categories. Each window goes
   through :func:`labelmatch.monitoring.monitor.evaluate_window` with the default rules
   (each test at alpha 0.01).

Reported: detection rate per (rate, window) and per signal; the false-alarm rate is the
detection rate on the 0% streams. Targets: 20% shift detected in >= 95% of 500-document
windows; false alarms <= 5%.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import cpu_text, machine, start_model_server, wait_until_ready, write_outputs

from labelmatch.evaluation.report import pyplot

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bitext_customer_support"
RATES = (0.0, 0.05, 0.10, 0.20)
WINDOWS = (100, 250, 500)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-drift"))
    parser.add_argument("--holdout", default="FEEDBACK,CONTACT", help="Categories never trained on.")
    parser.add_argument("--train-docs", type=int, default=1200)
    parser.add_argument("--val-docs", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--streams", type=int, default=40, help="Windows per (rate, window size); >= 20.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def held_out_split(holdout: set[str], train_docs: int, val_docs: int, seed: int) -> tuple[Any, list, list]:
    """``(training Dataset without the held-out categories, seen test docs, held-out test docs)``."""
    from labelmatch.data.dataset import Dataset, Document, load_dataset

    full = load_dataset(DATA)
    hierarchy = json.loads((DATA / "hierarchy.json").read_text())
    unseen = set(holdout) | {child for parent in holdout for child in hierarchy[parent]}
    seen_labels = {name: text for name, text in full.labels.items() if name not in unseen}

    def is_unseen(doc: Any) -> bool:
        return bool(set(doc.labels) & unseen)

    pool = [d for d in full.documents if d.split != "test" and not is_unseen(d)]
    random.Random(seed).shuffle(pool)
    val, train = pool[:val_docs], pool[val_docs : val_docs + train_docs]
    docs = [Document(d.id, d.text, d.labels, d.soft, split, d.meta)
            for split, part in (("train", train), ("val", val)) for d in part]
    test = [d for d in full.documents if d.split == "test"]
    seen = [d for d in test if not is_unseen(d)]
    return Dataset(docs, seen_labels), seen, [d for d in test if is_unseen(d)]


def train_and_export(dataset: Any, work: Path, args: argparse.Namespace) -> tuple[Path, bool]:
    """The exported model (trained and exported unless an earlier run left them in ``work``);
    ``(OnnxModel directory, whether it was reused)``."""
    from labelmatch.export.onnx import ExportConfig, export_onnx
    from labelmatch.training.config import TrainConfig
    from labelmatch.training.sft import train_sft

    model, onnx = work / "model", work / "onnx"
    reused = (onnx / "manifest.json").is_file()
    if not (model / "manifest.json").is_file():
        config = TrainConfig(epochs=args.epochs, max_length=96, seed=args.seed, progress=False)
        train_sft(dataset, config, model)
    if not (onnx / "manifest.json").is_file():
        export_onnx(model, onnx, ExportConfig(), dataset)
    return onnx, reused


def serve_and_log(onnx: Path, docs: list, work: Path) -> dict[str, Any]:
    """Send ``docs`` through the real server with every prediction logged; ``{doc id: logged record}``."""
    import requests

    from labelmatch.runtime.onnx_classifier import served_model_version
    from labelmatch.state.serving_state import ServingState

    state_dir = work / "state"
    shutil.rmtree(state_dir, ignore_errors=True)
    process, base = start_model_server(onnx, 2, work / "server.log", "--state_dir", str(state_dir),
                                       "--log_sample_rate", "1")
    ids: dict[str, str] = {}
    try:
        wait_until_ready(process, base, work / "server.log")
        for start in range(0, len(docs), 32):
            part = docs[start : start + 32]
            body = {"instances": [{"id": d.id, "text": d.text} for d in part]}
            response = requests.post(f"{base}/v1/models/labelmatch:predict", json=body, timeout=300)
            response.raise_for_status()
            ids.update({p["doc_id"]: p["id"] for p in response.json()["predictions"]})
        time.sleep(2.0)  # records are written behind the responses
    finally:
        process.terminate()
        process.wait(timeout=60)
    state = ServingState(f"sqlite:///{state_dir / 'serving.db'}")
    logged = {r.id: r for r in state.logged_predictions(served_model_version(onnx))}
    state.close()
    missing = [doc_id for doc_id, pid in ids.items() if pid not in logged]
    if missing:
        raise RuntimeError(f"{len(missing)} predictions were not logged (e.g. {missing[0]})")
    return {doc_id: logged[pid] for doc_id, pid in ids.items()}


def run_streams(profile: Any, seen: list, unseen: list, streams: int, seed: int) -> list[dict[str, Any]]:
    from labelmatch.monitoring.monitor import MonitorConfig, evaluate_window

    config = MonitorConfig(seed=seed)
    rng = random.Random(seed)
    rows = []
    for window in WINDOWS:
        for rate in RATES:
            shifted = round(rate * window)
            if shifted > len(unseen) or window - shifted > len(seen):
                raise ValueError(f"window {window} at {rate:.0%} needs more documents than the test has")
            fired, signals, started = [], {}, time.perf_counter()
            for stream in range(streams):
                records = rng.sample(seen, window - shifted) + rng.sample(unseen, shifted)
                config.seed = seed * 1000 + stream
                report = evaluate_window(profile, records, config, "bench")
                fired.append(report.drift)
                for name in report.fired:
                    signals[name] = signals.get(name, 0) + 1
            rows.append({"window": window, "rate": rate, "streams": streams, "detected": int(sum(fired)),
                         "detection_rate": float(np.mean(fired)),
                         "by_signal": {k: v / streams for k, v in sorted(signals.items())},
                         "seconds_per_window": (time.perf_counter() - started) / streams})
            print(f"window {window:>3} shift {rate:>4.0%}: {sum(fired)}/{streams} {signals}", flush=True)
    return rows


def markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = [
        "# Drift detection on a real shift (Bitext, held-out categories)",
        "",
        f"`make bench-drift`: the model never saw {', '.join(report['holdout'])} "
        f"({report['unseen_labels']} labels). Trained on {report['docs']['train']} documents "
        f"({report['epochs']} epochs, seed {report['seed']}), reference profile from "
        f"{report['docs']['val']} validation documents, exported int8 and served by the real model "
        f"server with every prediction logged. Streams drawn from the official test split's logged "
        f"predictions: {report['docs']['test_seen']} seen-category and {report['docs']['test_unseen']} "
        f"held-out-category documents. Default rules, each test at alpha {report['alpha']}. "
        f"CPU: {cpu_text(report['machine'])}.",
        "",
        "Detection rate (share of windows where any rule fired; the 0% column is the false-alarm rate):",
        "",
        "| window | " + " | ".join(f"{r:.0%} shift" for r in RATES) + " |",
        "|---|" + "---|" * len(RATES),
    ]
    for window in WINDOWS:
        cells = [next(r for r in rows if r["window"] == window and r["rate"] == rate) for rate in RATES]
        text = [f"{c['detection_rate']:.2f} ({c['detected']}/{c['streams']})" for c in cells]
        lines.append(f"| {window} | " + " | ".join(text) + " |")
    lines += ["", "Which signals fired (share of windows):", "", "| window | shift | signals |",
              "|---|---|---|"]
    for r in rows:
        signals = ", ".join(f"{k} {v:.2f}" for k, v in r["by_signal"].items()) or "none"
        lines.append(f"| {r['window']} | {r['rate']:.0%} | {signals} |")
    lines += ["", "Targets:", ""]
    lines += [f"- {name}: {'met' if met else '**not met**'}" for name, met in report["targets"].items()]
    per_window = np.mean([r["seconds_per_window"] for r in rows])
    lines += ["", f"Mean time per window (all tests, 500 permutations): {per_window:.2f} s. "
              f"Total wall time {report['wall_s']:.0f} s"
              + (" (the model trained and exported by an earlier run of this command, reused)."
                 if report.get("model_reused") else " (training and export included)."),
              "", "![drift](drift.png)", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for window in WINDOWS:
        cells = [r for r in report["rows"] if r["window"] == window]
        ax.plot([100 * r["rate"] for r in cells], [r["detection_rate"] for r in cells], marker="o",
                label=f"{window} documents")
    ax.axhline(0.95, color="green", ls=":", lw=1, label="target at 20%: 0.95")
    ax.axhline(0.05, color="red", ls=":", lw=1, label="false-alarm bound: 0.05")
    ax.set_xlabel("held-out-category documents in the window (%)")
    ax.set_ylabel("detection rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("labelmatch monitor on Bitext with two unseen categories")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from labelmatch.monitoring.profile import ReferenceProfile

    args = parse_args(argv)
    if args.streams < 20:
        raise SystemExit("--streams must be >= 20")
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    holdout = {c.strip() for c in args.holdout.split(",") if c.strip()}
    dataset, seen_docs, unseen_docs = held_out_split(holdout, args.train_docs, args.val_docs, args.seed)
    onnx, reused = train_and_export(dataset, args.work, args)
    logged = serve_and_log(onnx, seen_docs + unseen_docs, args.work)
    profile = ReferenceProfile.load(onnx)
    rows = run_streams(profile, [logged[d.id] for d in seen_docs], [logged[d.id] for d in unseen_docs],
                       args.streams, args.seed)
    cell = {(r["window"], r["rate"]): r["detection_rate"] for r in rows}
    report = {
        "machine": machine(), "holdout": sorted(holdout), "seed": args.seed, "epochs": args.epochs,
        "unseen_labels": len(json.loads((DATA / "labels.json").read_text())) - len(dataset.labels),
        "docs": {"train": len(dataset.split("train").documents), "val": len(dataset.split("val").documents),
                 "test_seen": len(seen_docs), "test_unseen": len(unseen_docs)},
        "alpha": 0.01, "rows": rows, "model_reused": reused,
        "targets": {
            "20% shift detected in >= 95% of 500-document windows": cell[(500, 0.2)] >= 0.95,
            "false alarms <= 5% (every window size)": max(cell[(w, 0.0)] for w in WINDOWS) <= 0.05,
        },
        "wall_s": time.perf_counter() - started,
    }
    write_outputs(args.out, "drift", report, markdown, plot, plot_key=None, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
