"""Label count vs training cost, and what sampling labels costs in F1 (``make bench-labels``).

Part A, step cost by label count: the tiny sample dataset plus synthetic label descriptions up to
``n`` labels, ``label_strategy`` ``all`` (every label live, with gradient, every step) vs
``sampled`` (positives + 128 hard + 64 random negatives), each in a process of its own: seconds
per optimisation step (after one warm-up step) and peak RSS. This is what chose
``TrainConfig.sampled_above``.

Part B, F1 cost: CLINC150 (160 labels) and Reuters-21578 (90 labels) with a seeded subsample of
training documents (``bench_suite.split_dataset``: official test split whole, validation carved
from train), the same settings and seed, ``all`` vs ``sampled`` forced; validation macro-F1 of
the best iteration, test macro-F1 scored once, training seconds. Sampling is forced here because
both label sets are below the threshold: it measures the price a large label set pays.
JSON + Markdown + a plot in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench_suite import split_dataset
from common import machine, measure

from labelmatch.evaluation.report import pyplot

SYNTHETIC_WORDS = ["tax", "invoice", "refund", "court", "customs", "payroll", "pension", "lease", "audit",
                   "merger", "loan", "export"]


def step_cost(n_labels: int, strategy: str, steps: int) -> dict[str, Any]:
    """Seconds per step and peak RSS with ``n_labels`` labels (run in its own process)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_tiny_dataset, tiny_config

    from labelmatch.training.sft import SFTTrainer

    dataset = make_tiny_dataset()
    w = SYNTHETIC_WORDS
    for i in range(n_labels - len(dataset.labels)):
        dataset.labels[f"synthetic_{i:06d}"] = (f"Documents about {w[i % 12]} and {w[(i // 12) % 12]}, "
                                                f"case {i}, filed under {w[(i // 144) % 12]}.")
    trainer = SFTTrainer(dataset, tiny_config(label_strategy=strategy, max_length=64))
    trainer.train_step()  # warm-up (and the first label cache)
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return {"labels": len(dataset.labels), "strategy": strategy,
            "s_per_step": (time.perf_counter() - started) / steps}


def f1_cost(name: str, strategy: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``strategy`` on a subsample of ``name``; validation and test macro-F1, seconds."""
    from labelmatch.evaluation.evaluate import evaluate
    from labelmatch.model.classifier import Classifier
    from labelmatch.training.config import TrainConfig
    from labelmatch.training.sft import train_sft

    dataset = split_dataset(name, args.train_docs, args.val_docs, args.seed)
    config = TrainConfig(epochs=args.epochs, max_length=args.max_length, patience=1, seed=args.seed,
                         progress=False, label_strategy=strategy, hard_negatives=args.hard,
                         random_negatives=args.random)
    out = args.work / f"{name}-{strategy}"
    started = time.perf_counter()
    trainer = train_sft(dataset, config, out)
    seconds = time.perf_counter() - started
    metrics = evaluate(Classifier.load(out), dataset, "test")
    best = max(trainer.history, key=lambda row: row["val_macro_f1"])
    return {"dataset": name, "strategy": strategy, "labels": len(dataset.labels), "train_s": seconds,
            "steps": trainer.step, "val_macro_f1": best["val_macro_f1"], "test_macro_f1": metrics["macro_f1"],
            "test_micro_f1": metrics["micro_f1"]}


def report(result: dict[str, Any], out: Path) -> None:
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for strategy in ("all", "sampled"):
        rows = [r for r in result["step_cost"] if r["strategy"] == strategy]
        left.plot([r["labels"] for r in rows], [r["s_per_step"] for r in rows], marker="o", label=strategy)
        right.plot([r["labels"] for r in rows], [r["peak_rss_mb"] for r in rows], marker="o", label=strategy)
    for ax, what in ((left, "seconds per step"), (right, "peak RSS (MB)")):
        ax.set_xscale("log")
        ax.set_xlabel("labels")
        ax.set_ylabel(what)
        ax.legend()
    fig.suptitle("SFT step cost by label count (batch 16, MiniLM, max length 64)")
    fig.tight_layout()
    fig.savefig(out / "labels.png", dpi=110)

    m = result["machine"]
    lines = ["# Label count: training cost and the sampled strategy (`make bench-labels`)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores. One run; each cell in its own process.", "",
             "## Step cost by label count", "",
             "| labels | strategy | s/step | peak RSS (MB) |", "|---:|---|---:|---:|"]
    for r in result["step_cost"]:
        lines.append(f"| {r['labels']:,} | {r['strategy']} | {r['s_per_step']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    all_max = result["settings"].get("all_max", 1024)
    lines += ["", f"`all` above {all_max:,} labels was not run: memory grows with the label count "
              "(1,024 labels: 8.2 GB), so 4,096 cannot fit this 24 GB machine.", "",
              "![step cost](labels.png)", "", "## F1 cost of sampling (forced below the threshold)", "",
              f"Seeded subsample: {result['settings']['train_docs']} training and "
              f"{result['settings']['val_docs']} validation documents, official test split whole, "
              f"{result['settings']['epochs']} epochs, seed {result['settings']['seed']}; sampled = "
              f"positives + {result['settings']['hard']} hard + {result['settings']['random']} random "
              "negatives.", "",
              "| dataset | labels | strategy | train s | steps | val macro-F1 | test macro-F1 | "
              "test micro-F1 |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in result["f1_cost"]:
        lines.append(f"| {r['dataset']} | {r['labels']} | {r['strategy']} | {r['train_s']:.0f} | "
                     f"{r['steps']} | {r['val_macro_f1']:.3f} | {r['test_macro_f1']:.3f} | "
                     f"{r['test_micro_f1']:.3f} |")
    (out / "labels.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-labels"))
    parser.add_argument("--counts", default="64,256,1024,4096")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--all-max", type=int, default=1024,
                        help="Largest label count run with 'all' (1,024: 8.2 GB; 4,096 cannot fit 24 GB).")
    parser.add_argument("--datasets", default="clinc150,reuters21578_modapte")
    parser.add_argument("--train-docs", type=int, default=1500)
    parser.add_argument("--val-docs", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--hard", type=int, default=32, help="Hard negatives (labels sets here are small).")
    parser.add_argument("--random", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    step_rows = []
    for n in (int(c) for c in args.counts.split(",") if c):
        for strategy in ("all", "sampled") if n <= args.all_max else ("sampled",):
            step_rows.append(measure(f"{n}-{strategy}", step_cost, n, strategy, args.steps))
    f1_rows = [measure(f"{name}-{strategy}", f1_cost, name, strategy, args)
               for name in args.datasets.split(",") if name for strategy in ("all", "sampled")]
    keys = ("train_docs", "val_docs", "epochs", "max_length", "hard", "random", "seed", "all_max")
    settings = {k: getattr(args, k) for k in keys}
    result = {"machine": machine(), "settings": settings, "step_cost": step_rows, "f1_cost": f1_rows,
              "command": "make bench-labels"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "labels.json").write_text(json.dumps(result, indent=2, default=str))
    report(result, args.out)


if __name__ == "__main__":
    main()
