"""A general zero-shot adapter: trained on a mix of public datasets, scored leave-one-dataset-out.

The product's promise is that labels are text. This benchmark trains one LoRA adapter for the
bundled MiniLM on a mixture of labelled datasets (:class:`labelmatch.training.mixture.MixtureTrainer`:
each step's batch comes from one dataset and is scored against that dataset's labels only), and
asks whether it classifies **labels it never saw** better than the base encoder:

* **leave one dataset out**: for every dataset of the mixture, an adapter is trained on the
  others and scored on the held-out dataset's official test split, with that dataset's labels
  (all new to the adapter). Reuters-21578 is never trained on (its licence is for research), so
  every adapter is scored on it as a held-out dataset too.
* **as shipped**: each model at the threshold it ships with and no labelled document of the
  held-out dataset: the base encoder as ``labelmatch predict --labels`` uses it (``Classifier.zero_shot``:
  probability 0.5 at cosine 0.3) and the adapter as zero-shot prediction merges it: ``--zero-shot-scale``
  of its LoRA delta (WiSE-FT; the share ``bench/bench_adapter_scale.py`` chose on the dev rows), at
  the global threshold tuned on its mixture's validation documents at that share. Reported:
  macro-F1 over the held-out labels (thresholded multi-label decisions, as the server makes them),
  micro-F1 and top-1 accuracy (the best label, for the single-label sets: ranking, whatever the
  threshold).
* **calibrated** (``calibrated_*``): both models at thresholds tuned by ``labelmatch calibrate`` on
  ``--dev-per-label`` validation documents per held-out label (drawn from the held-out dataset's
  train split, never its test split): what the adapter did to the ranking, apart from the threshold.

Settings are chosen on the ``dev`` rows (``--dev-only`` scores the held-out validation documents
and never reads a test split); each test split is scored once per recorded run.

``--final`` trains the adapter that ships on every training dataset and writes it under
``--export`` (``src/labelmatch/model/general_adapter/``: fp16 LoRA weights, ``general_adapter.json``
and the model card) — ``make train-general-adapter``.

Datasets: CLINC150, Bitext customer support and CUAD from ``../shared/data``; HWU64 and SNIPS
converted by ``bench/datasets/convert.py`` into ``--datasets-dir`` (``bench/datasets/SOURCES.md``:
repositories, commits, licences), and the news excerpt (``news``), tried on validation with
``--train clinc150,bitext,cuad,hwu64,snips,news --held-out reuters --dev-only --tag news`` and not
in the shipped mixture. BANKING77 is never used, in any form.

Writes ``general_adapter.json``, ``general_adapter.md`` and ``general_adapter.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_peers import sample_per_label, single_level
from bench_transfer import EvalSet, _eval_set, score
from common import cpu_text, machine, measure, write_outputs

from labelmatch.evaluation.report import pyplot

ROOT = Path(__file__).resolve().parents[1]
SHARED = {"clinc150": "clinc150", "bitext": "bitext_customer_support", "cuad": "cuad_clauses",
          "reuters": "reuters21578_modapte"}
CONVERTED = ("hwu64", "snips")
TRAINABLE = ("clinc150", "bitext", "cuad", "hwu64", "snips")
EVAL_ONLY = ("reuters",)
METRICS = ("macro_f1", "micro_f1", "top1_accuracy", "calibrated_macro_f1", "calibrated_micro_f1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/general-adapter")
    parser.add_argument("--datasets-dir", type=Path, default=ROOT / "runs/datasets",
                        help="Where bench/datasets/convert.py wrote HWU64 and SNIPS.")
    parser.add_argument("--train", default=",".join(TRAINABLE), help="The mixture's datasets.")
    parser.add_argument("--held-out", default=",".join(TRAINABLE + EVAL_ONLY),
                        help="Datasets to score leave-one-out ('' with --final alone).")
    parser.add_argument("--train-per-label", type=int, default=16)
    parser.add_argument("--labels-per-step", type=int, default=48,
                        help="Labels a step embeds: the batch's positives and random others of its dataset.")
    parser.add_argument("--val-per-label", type=int, default=4,
                        help="Mixture validation documents per label.")
    parser.add_argument("--dev-per-label", type=int, default=10,
                        help="Held-out validation documents per label (calibration, dev rows).")
    parser.add_argument("--test-docs", type=int, default=0, help="Cap test documents per dataset (0: all).")
    # min_steps pinned at 200, the library's default when the recorded adapters were trained: its
    # later default (400) would lengthen the smallest mixture (without CLINC150: 258 steps -> 400).
    parser.add_argument("--config", default=('{"epochs": 2, "max_length": 64, "inference_max_length": 128, '
                                             '"min_steps": 200}'),
                        help="TrainConfig fields (JSON) of the adapter's training.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dev-only", action="store_true",
                        help="Score the dev rows only; no test split is read.")
    parser.add_argument("--final", action="store_true",
                        help="Also train the shipped adapter on every dataset.")
    parser.add_argument("--export", type=Path, default=ROOT / "src/labelmatch/model/general_adapter")
    parser.add_argument("--tag", default="", help="Name of this recipe in the report.")
    # Chosen on the dev rows by bench/bench_adapter_scale.py (bench/results/general_adapter_scale.md).
    parser.add_argument("--zero-shot-scale", type=float, default=0.5,
                        help="Share of each adapter's LoRA delta merged for zero-shot scoring (1: all).")
    return parser.parse_args(argv)


# -- data -------------------------------------------------------------------------------------
def load(name: str, args: argparse.Namespace) -> Any:
    """A dataset by its short name, one label level (intents), all its splits."""
    from labelmatch.data.dataset import load_dataset

    if name in SHARED:
        return single_level(SHARED[name])
    return load_dataset(args.datasets_dir / name)


def carve(name: str, args: argparse.Namespace) -> tuple[Any, Any, list[Any]]:
    """``(mixture part with train and val splits, dev documents, test documents)`` of a dataset.

    Train, val and dev are disjoint seeded samples of the official train split (per label,
    rarest label first for multi-label sets); test is the official test split (capped by
    ``--test-docs``, seeded).
    """
    from labelmatch.data.dataset import Dataset, Document

    full = load(name, args)
    rng = random.Random(f"{args.seed}:{name}")
    pool = [d for d in full.documents if d.split != "test"]
    dev = sample_per_label(pool, args.dev_per_label, rng, share=0.25)
    used = {d.id for d in dev}
    val = sample_per_label([d for d in pool if d.id not in used], args.val_per_label, rng, share=0.25)
    used |= {d.id for d in val}
    train = sample_per_label([d for d in pool if d.id not in used], args.train_per_label, rng)
    part = Dataset([Document(d.id, d.text, d.labels, split="train") for d in train]
                   + [Document(d.id, d.text, d.labels, split="val") for d in val], full.labels)
    test = [d for d in full.documents if d.split == "test"]
    if args.test_docs and len(test) > args.test_docs:
        test = random.Random(args.seed).sample(test, args.test_docs)
    return part, [Document(d.id, d.text, d.labels, split="val") for d in dev], test


def eval_sets(name: str, dev: list[Any], test: list[Any], labels: dict[str, str],
              dev_only: bool) -> list[EvalSet]:
    """The held-out dataset's sets: ``dev`` always, ``test`` (calibrated on dev) unless dev-only."""
    used = {label for doc in dev + ([] if dev_only else test) for label in doc.labels}
    labels = {k: v for k, v in labels.items() if k in used}
    dev_set = _eval_set(f"dev_{name}", dev, labels)
    sets = [EvalSet(dev_set.name, dev_set.texts, dev_set.labels, dev_set.targets, dev_set)]
    if not dev_only:
        sets.append(_eval_set(name, test, labels, calibration=dev_set))
    return sets


# -- one leave-one-out cell, in its own process ----------------------------------------------
def train_mixture(parts: list[str], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Train an adapter on ``parts`` into ``out`` (reused when it is there)."""
    from labelmatch.training.config import TrainConfig
    from labelmatch.training.mixture import MixtureTrainer, NamedDataset

    record = out.parent / f"{out.name}.train.json"  # beside the artifact: its manifest lists its files
    if (out / "manifest.json").is_file() and record.is_file():
        return {"reused": True, **json.loads(record.read_text())}
    # Never from the shipped adapter: it was trained on the held-out datasets too.
    config = TrainConfig(**{"seed": args.seed, "progress": False, **json.loads(args.config),
                            "base_adapter": "none"})
    started = time.perf_counter()
    trainer = MixtureTrainer([NamedDataset(p, carve(p, args)[0]) for p in parts], config,
                             labels_per_step=args.labels_per_step)
    trainer.fit()
    trainer.save_model(out, extra_info={"mixture": parts})
    info = {"parts": parts, "train_docs": len(trainer.train_set.documents), "steps": trainer.step,
            "train_seconds": round(time.perf_counter() - started, 1),
            "val_macro_f1": round(trainer.best_f1, 4)}
    record.write_text(json.dumps(info, indent=1))
    return info


def mixture_validation(parts: list[str], args: argparse.Namespace) -> list[EvalSet]:
    """Each mixture dataset's validation documents, as its adapter's training carved them."""
    sets = []
    for name in parts:
        part = carve(name, args)[0]
        sets.append(_eval_set(name, part.split("val").documents, part.labels))
    return sets


def mixture_threshold(clf: Any, validation: list[EvalSet]) -> float:
    """The global threshold tuned on the mixture's validation documents, each scored against its
    own dataset's labels only (as :class:`~labelmatch.training.mixture.MixtureTrainer` tunes it)."""
    from labelmatch.evaluation.metrics import tune_global_threshold

    blocks = [(v.targets, clf.scores(v.texts, v.labels, replace=True)[1]) for v in validation]
    rows, cols = sum(t.shape[0] for t, _ in blocks), sum(t.shape[1] for t, _ in blocks)
    targets, scores = np.zeros((rows, cols), dtype=np.int64), np.zeros((rows, cols), dtype=np.float32)
    r = c = 0
    for t, p in blocks:
        targets[r:r + t.shape[0], c:c + t.shape[1]], scores[r:r + t.shape[0], c:c + t.shape[1]] = t, p
        r, c = r + t.shape[0], c + t.shape[1]
    return tune_global_threshold(targets, scores)[0]


def zero_shot_adapter(model_dir: Path, parts: list[str], args: argparse.Namespace) -> tuple[Any, float]:
    """A mixture's adapter as zero-shot prediction uses it: ``--zero-shot-scale`` of its delta, and
    the threshold tuned at that share on the mixture's validation documents."""
    from labelmatch.model.classifier import Classifier

    clf = Classifier.load(model_dir, share=args.zero_shot_scale)
    return clf, mixture_threshold(clf, mixture_validation(parts, args))


def score_held_out(name: str, model: Path | None, args: argparse.Namespace,
                   parts: list[str] | None = None) -> dict[str, Any]:
    """Scores of the base encoder (``model`` None) or a trained adapter (trained on ``parts``) on a
    held-out dataset, with its ``labels`` and ``docs`` per set counted."""
    from labelmatch.model.classifier import Classifier

    part, dev, test = carve(name, args)
    sets = eval_sets(name, dev, test, part.labels, args.dev_only)
    if model is None:
        clf = Classifier.zero_shot(sets[0].labels, max_length=128, base_adapter="none")
        threshold = clf.thresholds.default
    else:
        clf, threshold = zero_shot_adapter(model, parts or [], args)
    return {"threshold": threshold, "labels": len(part.labels), "docs": {s.name: len(s.texts) for s in sets},
            **{s.name: score(clf, threshold, s) for s in sets}}


def mixture_dir(args: argparse.Namespace, parts: list[str]) -> Path:
    """Where the adapter of a recipe and a mixture is trained (one mixture, one model)."""
    return args.work / f"{args.tag or 'default'}-{'+'.join(sorted(parts))}"


def short_name(name: str) -> str:
    """A dataset's name in the mixture (``bitext`` for ``bitext_customer_support``)."""
    return {shared: short for short, shared in SHARED.items()}.get(name, name)


def held_out_adapter(work: Path, name: str) -> str:
    """The default recipe's adapter trained on every mixture dataset but ``name`` (on all of them
    for a dataset outside the mixture, such as Reuters); ``work`` is this bench's ``--work``."""
    parts = [p for p in TRAINABLE if p != short_name(name)]
    path = mixture_dir(argparse.Namespace(work=work, tag=""), parts)
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{path}: run bench/bench_general_adapter.py first")
    return str(path)


def held_out_cell(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train without ``name`` (if it is in the mixture) and score both models on it."""
    parts = [p for p in args.train.split(",") if p and p != name]
    out = mixture_dir(args, parts)
    trained = train_mixture(parts, args, out)
    return {"held_out": name, "train": trained, "adapter": score_held_out(name, out, args, parts)}


# -- report -----------------------------------------------------------------------------------
def summary(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Average Δ over held-out datasets, and whether the goal is met (test rows; dev when dev-only)."""
    deltas: dict[str, list[float]] = {m: [] for m in METRICS}
    per_dataset: dict[str, dict[str, float]] = {}
    never_below = True
    for cell in cells:
        key = cell["held_out"] if cell["held_out"] in cell["adapter"] else f"dev_{cell['held_out']}"
        for metric in METRICS:
            if metric in cell["adapter"][key]:
                delta = cell["adapter"][key][metric] - cell["base"][key][metric]
                deltas[metric].append(delta)
                per_dataset.setdefault(key, {})[metric] = round(delta, 4)
                if metric == "macro_f1" and delta < 0:
                    never_below = False
    mean = {m: round(float(np.mean(v)), 4) for m, v in deltas.items() if v}
    return {"mean_delta": mean, "delta": per_dataset, "never_below_base_macro_f1": never_below,
            "goal_met": never_below and mean.get("macro_f1", 0) >= 0.05 and mean.get("top1_accuracy", 0) > 0}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# General zero-shot adapter, leave one dataset out",
        "",
        f"Recipe `{report['tag'] or 'default'}`: TrainConfig {report['config']}; {report['train_per_label']} "
        f"training / {report['val_per_label']} validation documents per label from each mixture dataset, "
        f"{report['labels_per_step']} labels per step; "
        f"seed {report['seed']}. CPU: {cpu_text(report['machine'])}. Wall time {report['wall_s']:.0f} s.",
        "",
        "Each row: an adapter trained on the other datasets, scored on this dataset's labels, all new "
        "to it, against the base encoder. *As shipped*: no labelled document of the held-out dataset "
        f"(the base at cosine 0.3; the adapter as zero-shot prediction merges it, "
        f"{report.get('zero_shot_scale', 1.0):g} of its LoRA delta, at the threshold tuned at that share on "
        "its mixture's validation documents). *Calibrated*: both "
        f"at thresholds tuned on {report['dev_per_label']} validation documents per held-out label "
        "(`labelmatch calibrate`). `dev_*` rows score those validation documents (settings were chosen "
        "on them); test rows are the official test splits, scored once.",
        "",
        "| held out | set | labels | docs | macro-F1 base | macro-F1 adapter | Δ | top-1 base "
        "| top-1 adapter | Δ | calibrated macro-F1 base | calibrated macro-F1 adapter | Δ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in report["cells"]:
        for key, base in cell["base"].items():
            if not isinstance(base, dict):
                continue
            ours = cell["adapter"][key]

            def triple(metric: str, base=base, ours=ours) -> str:
                if metric not in base:
                    return "— | — | —"
                return f"{base[metric]:.3f} | {ours[metric]:.3f} | {ours[metric] - base[metric]:+.3f}"

            lines.append(f"| {cell['held_out']} | {key} | {cell['labels']} | {cell['docs'][key]} | "
                         f"{triple('macro_f1')} | {triple('top1_accuracy')} | "
                         f"{triple('calibrated_macro_f1')} |")
    s = report["summary"]
    lines += [
        "",
        f"Mean Δ over the held-out datasets: macro-F1 {s['mean_delta'].get('macro_f1', 0):+.3f}, top-1 "
        f"{s['mean_delta'].get('top1_accuracy', 0):+.3f}, calibrated macro-F1 "
        f"{s['mean_delta'].get('calibrated_macro_f1', 0):+.3f}. Goal (macro-F1 never below the base, "
        f"≥ +0.05 on average, top-1 up): **{'met' if s['goal_met'] else 'not met'}**.",
        "",
        "![general adapter](general_adapter.png)" if report.get("plot") else "",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> bool:
    plt = pyplot()

    rows = [(c["held_out"], k) for c in report["cells"] for k in c["base"] if isinstance(c["base"][k], dict)
            and not k.startswith("dev_")] or [(c["held_out"], k) for c in report["cells"]
                                              for k in c["base"] if isinstance(c["base"][k], dict)]
    if not rows:
        return False
    cells = {c["held_out"]: c for c in report["cells"]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(rows))
    for ax, metric, title in ((axes[0], "macro_f1", "macro-F1, as shipped"),
                              (axes[1], "top1_accuracy", "top-1 accuracy")):
        ax.bar(x - 0.2, [cells[h]["base"][k][metric] for h, k in rows], 0.4, label="base encoder")
        ax.bar(x + 0.2, [cells[h]["adapter"][k][metric] for h, k in rows], 0.4, label="general adapter")
        ax.set_xticks(x, [k for _, k in rows], rotation=30)
        ax.set_title(title)
        ax.set_ylim(0, 1)
    axes[0].legend()
    fig.suptitle("Labels never trained on: each dataset held out of the adapter's training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cells = []
    held = [h for h in args.held_out.split(",") if h]
    for i, name in enumerate(held, start=1):
        print(f"[{i}/{len(held)}] held out: {name}", flush=True)
        cell = measure(f"without-{name}", held_out_cell, name, args)
        cell["base"] = measure(f"base-{name}", score_held_out, name, None, args)
        for scored in (cell["base"], cell["adapter"]):
            cell["labels"], cell["docs"] = scored.pop("labels"), scored.pop("docs")
        cells.append(cell)
        key = name if name in cell["base"] else f"dev_{name}"
        print(f"    macro-F1 base {cell['base'][key]['macro_f1']:.3f} "
              f"adapter {cell['adapter'][key]['macro_f1']:.3f}", flush=True)
    report: dict[str, Any] = {
        "tag": args.tag, "config": json.loads(args.config), "seed": args.seed,
        "train_per_label": args.train_per_label, "val_per_label": args.val_per_label,
        "labels_per_step": args.labels_per_step, "zero_shot_scale": args.zero_shot_scale,
        "dev_per_label": args.dev_per_label, "dev_only": args.dev_only, "machine": machine(), "cells": cells,
    }
    if args.final:
        parts = [p for p in args.train.split(",") if p]
        out = mixture_dir(args, parts)
        report["final"] = measure("final", train_mixture, parts, args, out)
        from labelmatch.model.general_adapter import export_general_adapter

        _, threshold = zero_shot_adapter(out, parts, args)
        report["final"]["zero_shot_threshold"] = threshold
        export_general_adapter(out, args.export, sources=ROOT / "bench/datasets/SOURCES.md",
                               evaluation=summary(cells) if cells else None,
                               zero_shot_scale=args.zero_shot_scale, threshold=threshold)
        print(f"shipped adapter written to {args.export}", flush=True)
    report["summary"] = summary(cells) if cells else {}
    report["wall_s"] = round(time.perf_counter() - started, 1)
    if cells:
        stem = "general_adapter" if not args.dev_only else f"general_adapter_dev_{args.tag or 'default'}"
        write_outputs(args.out, stem, report,
                      lambda report: markdown(report).replace("general_adapter.png", f"{stem}.png"), plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
