"""A recipe change judged on validation only, under bench-suite's protocol (seed 0 by default).

For each dataset, the dual encoder is trained twice on bench_suite's split of that seed (1,500
training and 400 validation documents carved from the official train split): with the library
defaults (the baseline) and with the candidate's ``TrainConfig`` overrides (``--set key=value``).
Validation macro-F1 per epoch is recorded; **the test split is not read**. A candidate becomes a
default only where it is higher or equal on every dataset (the rule `bench/results/suite_probe`
applies). Each run is in its own process (its wall time its own). Writes
``<out>/<name>.json``, ``.md`` and ``.png``.

    python bench/bench_recipe_probe.py --name lora-all-linear \\
        --set 'lora_target_modules=["query","key","value","dense"]' --datasets cuad_clauses,clinc150
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench_suite import DATASETS, dual_encoder_config, split_dataset
from common import machine, measure

from labelmatch.evaluation.report import pyplot


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="The candidate's name (file names of the report).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="A TrainConfig override; the value is JSON (a bare word is a string).")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-docs", type=int, default=1500)
    parser.add_argument("--val-docs", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path("bench/results/suite_probe"))
    parser.add_argument("--work", type=Path, default=Path("runs/recipe-probe"))
    parser.add_argument("--note", default="", help="A sentence for the report (what shared the machine).")
    return parser.parse_args(argv)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["lr=5e-4", "schedule=cosine"]`` → ``{"lr": 0.0005, "schedule": "cosine"}``."""
    overrides = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides


def validation_curve(name: str, args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    """Train on the suite's split of ``args.seed``; validation macro-F1 per epoch, and micro-F1 of
    the epoch early stopping keeps (no test)."""
    from labelmatch.training.sft import SFTTrainer

    dataset = split_dataset(name, args.train_docs, args.val_docs, args.seed)
    trainer = SFTTrainer(dataset, dual_encoder_config(name, args, args.seed, **overrides))
    trainer.fit()
    curve = [round(row["val_macro_f1"], 4) for row in trainer.history]
    kept = max(trainer.history, key=lambda row: row["val_macro_f1"])
    return {"val_macro_f1_per_epoch": curve, "best_val_macro_f1": max(curve),
            "kept_val_micro_f1": round(kept["val_micro_f1"], 4), "steps": trainer.step}


def baseline_curve(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    """The defaults' curve, reused from ``<work>`` while the defaults and split are unchanged."""
    config = dual_encoder_config(dataset, args, args.seed).to_dict()
    cache = args.work / f"baseline-{dataset}-s{args.seed}.json"
    key = {"config": config, "train_docs": args.train_docs, "val_docs": args.val_docs}
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved["key"] == json.loads(json.dumps(key)) and "kept_val_micro_f1" in saved["result"]:
            print(f"{dataset}/baseline: reused {cache}", flush=True)
            return saved["result"]
    result = measure(f"{dataset}/baseline", validation_curve, dataset, args, {})
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "result": result}, indent=2))
    return result


def _micro(run: dict[str, Any]) -> str:
    """The kept epoch's validation micro-F1 (``-`` in reports written before it was recorded)."""
    return f"{run['kept_val_micro_f1']:.4f}" if "kept_val_micro_f1" in run else "-"


def write_report(report: dict[str, Any], out: Path) -> None:
    plt = pyplot()

    name, rows = report["name"], report["datasets"]
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3), squeeze=False)
    for ax, (dataset, row) in zip(axes[0], rows.items(), strict=True):
        for run, style in (("baseline", "o--"), ("candidate", "o-")):
            curve = row[run]["val_macro_f1_per_epoch"]
            ax.plot(range(1, len(curve) + 1), curve, style, label=run)
        ax.set_title(dataset, fontsize=9)
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("validation macro-F1")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=100)
    lines = [f"# Recipe probe `{name}` (validation only, seed {report['seed']})", "",
             f"Candidate: `TrainConfig` overrides `{json.dumps(report['overrides'])}` against the library "
             f"defaults; bench_suite's protocol ({report['train_docs']} training and {report['val_docs']} "
             f"validation documents carved from the official train split, at most {report['epochs']} epochs, "
             f"patience 1, max length {report['max_length']}). The test split is not read. "
             f"CPU: {report['machine']['cpu']}. Command: `{report['command']}`.", "",
             "| dataset | baseline val macro-F1 per epoch | candidate | best baseline | best candidate | Δ "
             "| val micro-F1 there, baseline / candidate | wall s baseline / candidate |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for dataset, row in rows.items():
        base, cand = row["baseline"], row["candidate"]
        lines.append(f"| {dataset} | {', '.join(map(str, base['val_macro_f1_per_epoch']))} | "
                     f"{', '.join(map(str, cand['val_macro_f1_per_epoch']))} | "
                     f"{base['best_val_macro_f1']:.4f} | {cand['best_val_macro_f1']:.4f} | "
                     f"{row['delta']:+.4f} | {_micro(base)} / {_micro(cand)} | "
                     f"{base['wall_s']:.0f} / {cand['wall_s']:.0f} |")
    verdict = ("higher or equal on every dataset probed" if all(r["delta"] >= 0 for r in rows.values())
               else "lower on " + ", ".join(d for d, r in rows.items() if r["delta"] < 0))
    lines += ["", f"Candidate: {verdict}.", ""]
    if report.get("note"):
        lines += [report["note"], ""]
    lines += [f"![{name}]({name}.png)", ""]
    (out / f"{name}.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    overrides = parse_overrides(args.set)
    dual_encoder_config("probe", args, args.seed, **overrides)  # a bad override fails here, not later
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"name": args.name, "overrides": overrides, "seed": args.seed,
                              "train_docs": args.train_docs, "val_docs": args.val_docs, "epochs": args.epochs,
                              "max_length": args.max_length, "machine": machine(), "note": args.note,
                              "command": "python bench/bench_recipe_probe.py " + " ".join(argv),
                              "datasets": {}}
    for dataset in args.datasets.split(","):
        base = baseline_curve(dataset, args)
        cand = measure(f"{dataset}/{args.name}", validation_curve, dataset, args, overrides)
        report["datasets"][dataset] = {"baseline": base, "candidate": cand,
                                       "delta": cand["best_val_macro_f1"] - base["best_val_macro_f1"]}
        # Written as each dataset completes.
        (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
        write_report(report, args.out)


if __name__ == "__main__":
    main()
