"""How much of the general adapter's LoRA delta to apply: a sweep on validation rows only.

The leave-one-dataset-out adapters of ``bench/bench_general_adapter.py`` help every held-out
dataset of the mixture but hurt Reuters-21578 (long news articles, topic labels): its ranking
drops, not only its threshold. A standard remedy for a fine-tuned model under distribution shift
is to interpolate between the base and the fine-tuned weights (WiSE-FT); for LoRA that is
scaling the adapter's delta by a factor ``s`` in [0, 1] (peft's
:func:`peft.helpers.rescale_adapter_scale`, which its documentation says is strictly WiSE-FT).

For every held-out dataset and every ``s`` of ``--scales``, the adapter trained without that
dataset is merged at ``s``; its global threshold is re-tuned on **its own mixture's validation
documents** (as training tuned it at ``s = 1``); then it is scored on the held-out dataset's
``dev`` rows (validation documents drawn from its train split, never the test split): macro-F1 at
that threshold (as shipped), top-1 accuracy, and macro-F1 at thresholds calibrated on the same
documents. The base encoder as ``labelmatch predict --labels`` uses it is the reference.

A rule picks ``s`` on a group of dev rows: among the shares that pass the goal's own test there
(macro-F1 never below the base, on average at least +0.05 above it, top-1 up on average), the one
with the best mean macro-F1 gain; if none passes, the best mean gain. Two groups are reported:
``mixture_folds`` (only the mixture's own datasets: no labelled document of a dataset outside the
mixture, such as Reuters, takes part) and ``all_dev`` (every held-out dataset, Reuters included:
the goal is about every dataset a user brings, so this is the rule the shipped share follows,
``bench_general_adapter.py --zero-shot-scale``). A dev row ranks a document among the labels its
dataset's validation documents use. No test split is read. BANKING77 is never used, in any form.

Needs the leave-one-out adapters under ``--work`` (``bench/bench_general_adapter.py`` trains
them). Writes ``general_adapter_scale.{json,md,png}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_general_adapter import (
    EVAL_ONLY,
    ROOT,
    TRAINABLE,
    carve,
    eval_sets,
    held_out_adapter,
    mixture_threshold,
    mixture_validation,
)
from bench_transfer import score
from common import cpu_text, machine, write_outputs

from labelmatch.evaluation.report import pyplot


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/general-adapter",
                        help="bench_general_adapter.py's --work (the leave-one-out adapters).")
    parser.add_argument("--datasets-dir", type=Path, default=ROOT / "runs/datasets")
    parser.add_argument("--held-out", default=",".join(TRAINABLE + EVAL_ONLY))
    parser.add_argument("--scales", default="0,0.25,0.5,0.75,1",
                        help="Multipliers of the LoRA delta (1: the adapter as trained).")
    # The carve of bench_general_adapter.py's recorded run: same seed and sizes, same documents.
    parser.add_argument("--train-per-label", type=int, default=16)
    parser.add_argument("--val-per-label", type=int, default=4)
    parser.add_argument("--dev-per-label", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.test_docs = 0  # carve()'s test cap; the test split is never scored here
    return args


def sweep_dataset(name: str, scales: list[float], args: argparse.Namespace) -> dict[str, Any]:
    """Base and adapter-at-each-scale scores on ``name``'s dev rows."""
    from labelmatch.model.classifier import Classifier

    part, dev, _ = carve(name, args)
    (dev_set,) = eval_sets(name, dev, [], part.labels, dev_only=True)  # calibrated on itself
    base = Classifier.zero_shot(dev_set.labels, max_length=128, base_adapter="none")
    result: dict[str, Any] = {"labels": len(dev_set.labels), "docs": len(dev_set.texts),
                              "base": score(base, base.thresholds.default, dev_set), "scales": {}}
    adapter = held_out_adapter(args.work, name)
    validation = mixture_validation(json.loads(Path(f"{adapter}.train.json").read_text())["parts"], args)
    for s in scales:
        started = time.perf_counter()
        clf = Classifier.load(adapter, share=s)  # s of its LoRA delta merged, as zero-shot does
        threshold = mixture_threshold(clf, validation)
        result["scales"][str(s)] = {"threshold": threshold, **score(clf, threshold, dev_set)}
        row = result["scales"][str(s)]
        print(f"    s={s:<5} threshold {threshold:.2f}  macro-F1 {row['macro_f1']:.3f}  "
              f"top-1 {row['top1_accuracy']:.3f}  calibrated {row['calibrated_macro_f1']:.3f}  "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    return result


def choose(cells: dict[str, dict[str, Any]], names: list[str], scales: list[float]) -> dict[str, Any]:
    """The share picked on ``names``' dev rows (the module's rule), with every share's mean gains
    over the base and whether it passes the goal's test there."""
    means: dict[str, dict[str, float]] = {}
    for s in scales:
        def delta(name: str, metric: str, s: float = s) -> float:
            return cells[name]["scales"][str(s)][metric] - cells[name]["base"][metric]

        gains, top1 = [delta(n, "macro_f1") for n in names], [delta(n, "top1_accuracy") for n in names]
        means[str(s)] = {"macro_f1": round(float(np.mean(gains)), 4),
                         "top1_accuracy": round(float(np.mean(top1)), 4),
                         "min_macro_f1": round(float(np.min(gains)), 4)}
        means[str(s)]["passes"] = bool(min(gains) >= 0 and np.mean(gains) >= 0.05 and np.mean(top1) > 0)
    passing = [s for s in scales if means[str(s)]["passes"]] or scales
    best = max(passing, key=lambda s: (means[str(s)]["macro_f1"], s))
    return {"datasets": names, "scale": best, "mean_delta": means}


def markdown(report: dict[str, Any]) -> str:
    scales = report["scales"]
    lines = [
        "# General adapter: how much of its LoRA delta to apply (validation rows only)",
        "",
        f"Each cell: the leave-one-out adapter trained without the row's dataset, its LoRA delta times "
        f"*s* (peft's `rescale_adapter_scale`, i.e. WiSE-FT), its threshold re-tuned on its own mixture's "
        f"validation documents; scored on the row's dev documents ({report['dev_per_label']} per label "
        f"from its train split; no test split read). Base: the encoder as `labelmatch predict --labels` "
        f"uses it. A row ranks a document among the labels its dataset's dev documents use. "
        f"CPU: {cpu_text(report['machine'])}. Wall time {report['wall_s']:.0f} s.",
        "",
        "The rule: among the shares that pass the goal's test on a group's dev rows (macro-F1 never "
        "below the base, ≥ +0.05 on average, top-1 up on average), the best mean macro-F1 gain.",
        "",
        "| held out | metric | base | " + " | ".join(f"s={s}" for s in scales) + " |",
        "|---|---|---:|" + "---:|" * len(scales),
    ]
    for name, cell in report["cells"].items():
        for metric, title in (("macro_f1", "macro-F1"), ("top1_accuracy", "top-1"),
                              ("calibrated_macro_f1", "calibrated macro-F1")):
            row = " | ".join(f"{cell['scales'][str(s)][metric]:.3f}" for s in scales)
            lines.append(f"| {name} | {title} | {cell['base'][metric]:.3f} | {row} |")
    lines.append("")
    for rule, chosen in report["choice"].items():
        means = ", ".join(f"s={s}: {v['macro_f1']:+.3f} (top-1 {v['top1_accuracy']:+.3f}, "
                          f"worst {v['min_macro_f1']:+.3f}{', passes' if v['passes'] else ''})"
                          for s, v in chosen["mean_delta"].items())
        lines.append(f"- **{rule}** ({', '.join(chosen['datasets'])}): s = **{chosen['scale']}**; "
                     f"mean macro-F1 Δ over the base by s: {means}.")
    lines += ["", "![scale sweep](general_adapter_scale.png)", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> bool:
    """Macro-F1 and top-1 Δ over the base against s, one line per held-out dataset."""
    try:
        plt = pyplot()
    except ImportError:
        return False
    scales = report["scales"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in ((axes[0], "macro_f1", "macro-F1 Δ (as shipped)"),
                              (axes[1], "top1_accuracy", "top-1 Δ")):
        for name, cell in report["cells"].items():
            ax.plot(scales, [cell["scales"][str(s)][metric] - cell["base"][metric] for s in scales],
                    marker="o", label=name)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("s (share of the LoRA delta)")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scales = [float(s) for s in args.scales.split(",") if s]
    started = time.perf_counter()
    names = [n for n in args.held_out.split(",") if n]
    cells = {}
    for i, name in enumerate(names, start=1):
        print(f"[{i}/{len(names)}] held out: {name}", flush=True)
        cells[name] = sweep_dataset(name, scales, args)
    report: dict[str, Any] = {
        "scales": scales, "seed": args.seed, "dev_per_label": args.dev_per_label, "machine": machine(),
        "cells": cells,
        "choice": {},
    }
    mixture = [n for n in names if n in TRAINABLE]
    for rule, chosen_from in (("mixture_folds", mixture), ("all_dev", names)):
        if chosen_from:
            report["choice"][rule] = choose(cells, chosen_from, scales)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    write_outputs(args.out, "general_adapter_scale", report, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
