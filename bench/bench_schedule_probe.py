"""Few labelled documents: choose ``TrainConfig.min_steps`` (and the starting adapter) on validation.

With 8 to 16 documents per label, ``epochs`` passes are a few dozen steps (Bitext, 27 labels × 8:
14 steps an epoch). This probe trains on bench-peers' cells (``bench_peers.carve``: seeded training
and validation samples of the official train split) with several ``min_steps`` and starting points,
and records the **validation** macro-F1 (the trainer's best, at its global threshold) and the
training time. No test split is read: the defaults are chosen here, and bench-peers scores them.

Starting points: ``none`` (a fresh LoRA adapter) and ``held-out`` (the general adapter trained
*without* the probed dataset by ``bench_general_adapter.py``: the adapter a user gets has never
seen their data, so the shipped one, which saw these datasets' training splits, would flatter it).

Writes ``schedule_probe.json``, ``schedule_probe.md`` and ``schedule_probe.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench_general_adapter import held_out_adapter, short_name
from bench_peers import carve
from bench_suite import dual_encoder_config
from common import cpu_text, machine, mean_spread, measure, write_outputs

from labelmatch.evaluation.report import pyplot

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/schedule-probe")
    parser.add_argument("--adapters", type=Path, default=ROOT / "runs/general-adapter",
                        help="bench_general_adapter.py's --work (its held-out adapters).")
    parser.add_argument("--datasets", default="bitext_customer_support,clinc150")
    parser.add_argument("--sizes", default="8,16",
                        help="Documents per label, for every dataset; 'dataset:size' for one dataset only.")
    parser.add_argument("--min-steps", default="0,200,400")
    parser.add_argument("--starts", default="none,held-out")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--val-per-label", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=96)
    return parser.parse_args(argv)


def planned(name: str, result: dict[str, Any], args: argparse.Namespace) -> int:
    """Steps the cell's config plans on its training documents without ``min_steps``."""
    from labelmatch.training.sft import planned_steps

    return planned_steps(result["train_docs"], dual_encoder_config(name, args, 0, min_steps=0))[0]


def run(name: str, size: str, seed: int, min_steps: int, start: str,
        args: argparse.Namespace) -> dict[str, Any]:
    """Train one probe cell (own process); validation figures only."""
    from labelmatch.training.sft import SFTTrainer

    dataset = carve(name, size, seed, args.val_per_label)
    base = "none" if start == "none" else held_out_adapter(args.adapters, name)
    # min_steps as given, whatever the passes it makes (no max_lengthened_epochs ceiling): the
    # probe measures the number of steps itself; the ceiling is read off its rows.
    config = dual_encoder_config(name, args, seed, min_steps=min_steps, max_lengthened_epochs=None,
                                 base_adapter=base)
    started = time.perf_counter()
    trainer = SFTTrainer(dataset, config)
    first = trainer.validation_scores()
    from labelmatch.evaluation.metrics import tune_global_threshold

    start_f1 = tune_global_threshold(trainer.val_targets, first)[1]
    trainer.fit()
    return {"val_macro_f1": round(trainer.best_f1, 4), "start_val_macro_f1": round(start_f1, 4),
            "steps": trainer.step, "train_s": round(time.perf_counter() - started, 1),
            "train_docs": len(trainer.train_set.documents)}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Few labelled documents: schedule and starting point, chosen on validation",
        "",
        f"bench-peers' cells (validation {report['val_per_label']} documents per label, at most "
        f"{report['epochs']} validations, patience 1); seeds {report['seeds']}. CPU: "
        f"{cpu_text(report['machine'])}. "
        "No test split read.",
        "",
        "| dataset | per label | start | min_steps | steps run | val macro-F1 before training | "
        "val macro-F1 | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(f"| {row['dataset']} | {row['size']} | {row['start']} | {row['min_steps']} | "
                     f"{row['steps']['mean']:.0f} | {row['start_val_macro_f1']['mean']:.3f} | "
                     f"{row['val_macro_f1']['mean']:.3f} ± {row['val_macro_f1']['spread']:.3f} | "
                     f"{row['train_s']['mean']:.0f} |")
    return "\n".join(lines) + "\n\n![schedule probe](schedule_probe.png)\n"


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in report["rows"]:
        groups.setdefault((row["dataset"], row["size"], row["start"]), []).append(row)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (name, size, start), rows in sorted(groups.items()):
        ax.plot([r["min_steps"] for r in rows], [r["val_macro_f1"]["mean"] for r in rows], marker="o",
                linestyle="-" if start == "none" else "--", label=f"{short_name(name)} {size}/label, {start}")
    ax.set_xlabel("min_steps")
    ax.set_ylabel("validation macro-F1")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sizes_for(name: str, spec: str) -> list[str]:
    """The sizes of ``--sizes`` that apply to ``name`` (plain ones, and those given as ``name:size``)."""
    picked = []
    for part in spec.split(","):
        dataset, _, size = part.rpartition(":")
        if dataset in ("", name):
            picked.append(size)
    return picked


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for name in args.datasets.split(","):
        for size in sizes_for(name, args.sizes):
            for start in args.starts.split(","):
                for min_steps in (int(m) for m in args.min_steps.split(",")):
                    runs = []
                    for seed in seeds:
                        cell = args.work / f"{name}-{size}-{start}-m{min_steps}-s{seed}.json"
                        same = args.work / f"{name}-{size}-{start}-m0-s{seed}.json"
                        if min_steps and not cell.is_file() and same.is_file() and \
                                planned(name, json.loads(same.read_text()), args) >= min_steps:
                            cell.write_text(same.read_text())  # epochs plan more steps: the same run
                        if not cell.is_file():
                            result = measure(cell.stem, run, name, size, seed, min_steps, start, args)
                            cell.write_text(json.dumps(result))
                        runs.append(json.loads(cell.read_text()))
                    rows.append({"dataset": name, "size": size, "start": start, "min_steps": min_steps,
                                 **{k: mean_spread([r[k] for r in runs]) for k in
                                    ("val_macro_f1", "start_val_macro_f1", "steps", "train_s")}})
    report = {"rows": rows, "seeds": seeds, "val_per_label": args.val_per_label, "epochs": args.epochs,
              "machine": machine()}
    write_outputs(args.out, "schedule_probe", report, markdown, plot, plot_key=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
