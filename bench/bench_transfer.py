"""Zero-shot transfer: does fine-tuning help on labels the model never saw in training?

The product's promise is that labels are text. This benchmark trains the dual encoder on some
labels and scores it on labels it never saw, against the untrained encoder, side by side:

* **within CLINC150** (``clinc_heldout``): a third of the 150 intents (5 of the 15 in each of
  the 10 domains, seeded) is held out with all its documents; the model trains on the other 100
  intents (intent labels only). Scored on the official test documents of the held-out intents,
  classified among the 50 held-out descriptions (``unseen``) and among all 150 (``unseen_among_all``:
  the seen labels compete, as they would in production), and on the seen intents' test documents
  (``seen``) for reference.
* **across datasets**: trained on CLINC150's intents, scored on Bitext's test split with Bitext's
  27 intent descriptions (``clinc_to_bitext``); trained on Bitext's intents, scored on CLINC150's
  banking and credit-card intents (30, their test documents; ``bitext_to_clinc_finance``).

Protocol: settings and thresholds chosen on validation only — the official CLINC150 validation
queries of the seen intents, or 15% of Bitext's train split. Each model's decision threshold for
labels without a tuned threshold (every unseen label) is its global threshold tuned on that
validation split; the untrained encoder gets its own, tuned the same way on the same documents.
The test splits are scored once per run. Reported: macro-F1 over the target labels (thresholded,
multi-label decisions as the server makes them), micro-F1, and top-1 accuracy (the best label;
these sets are single-label per level), mean and spread over ``--seeds``.

Recipe changes for transfer are chosen on **transfer-validation** sets (``dev_*``), never on the
test splits: the target labels' validation documents (the official CLINC150 validation queries of
the held-out or finance intents; 10 seeded train-split documents per Bitext intent). ``--dev-only``
scores those alone (the test splits are not read), for probing recipes; a full run reports them
beside the test rows.

Writes ``transfer.json`` and ``transfer.md`` (+ ``transfer.png``) under ``--out``
(``transfer_dev_<tag>.*`` with ``--dev-only``).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from common import cpu_text, machine, mean_spread, write_outputs

from labelmatch.evaluation.report import pyplot

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SCENARIOS = ("clinc_heldout", "clinc_to_bitext", "bitext_to_clinc_finance")
METRICS = ("macro_f1", "micro_f1", "top1_accuracy", "calibrated_macro_f1", "calibrated_micro_f1")


@dataclass
class EvalSet:
    """Documents scored against a label set the model may never have seen."""

    name: str
    texts: list[str]
    labels: dict[str, str]
    targets: np.ndarray  # (docs, labels) 0/1
    calibration: EvalSet | None = None  # validation documents of the same labels (see ``score``)


@dataclass
class Scenario:
    """A training set (train/val splits) and the evaluation sets scored after training."""

    name: str
    train: Any  # labelmatch.data.dataset.Dataset with train and val splits
    evals: list[EvalSet]  # test documents, scored once per recorded run
    dev: list[EvalSet]  # the same target labels' validation documents, for choosing recipes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-transfer"))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--scenario-seeds",
        default="",
        help="Per-scenario seeds overriding --seeds, e.g. 'clinc_to_bitext=0;x=0,1' "
        "(fewer seeds where time allows fewer; the report says which).",
    )
    parser.add_argument(
        "--train-per-label",
        type=int,
        default=30,
        help="Training documents per intent (seeded subsample; CLINC has 100, Bitext ~130).",
    )
    parser.add_argument("--val-per-label", type=int, default=10, help="Validation documents per seen intent.")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--config", default="{}", help="Extra TrainConfig fields as JSON (the recipe under test)."
    )
    parser.add_argument("--tag", default="", help="Name of this run's recipe in the report.")
    parser.add_argument("--retrain", action="store_true", help="Train again even where --work has the model.")
    parser.add_argument(
        "--dev-only",
        action="store_true",
        help="Score only the transfer-validation sets (dev_*); the test splits are not read.",
    )
    return parser.parse_args(argv)


def _load(name: str):
    from labelmatch.data.dataset import load_dataset

    return load_dataset(DATA / name)


def _hierarchy(name: str) -> dict[str, list[str]]:
    return json.loads((DATA / name / "hierarchy.json").read_text())


def _leaf_docs(dataset, leaves: set[str]):
    """Documents whose leaf (intent) label is in ``leaves``, relabelled with that leaf only."""
    from labelmatch.data.dataset import Document

    out = []
    for doc in dataset.documents:
        leaf = [label for label in doc.labels if label in leaves]
        if len(leaf) == 1:
            out.append(Document(id=doc.id, text=doc.text, labels=leaf, split=doc.split))
    return out


def _train_val(
    docs, labels: dict[str, str], per_label: int, val_per_label: int, seed: int, is_val=lambda d: False
):
    """A Dataset with ``per_label`` train and ``val_per_label`` validation documents per label."""
    from labelmatch.data.dataset import Dataset, Document

    rng = random.Random(seed)
    by_label: dict[str, list] = {name: [] for name in labels}
    for doc in docs:
        if doc.split != "test":
            by_label[doc.labels[0]].append(doc)
    chosen = []
    for pool in by_label.values():
        val_pool = [d for d in pool if is_val(d)] or pool
        val = rng.sample(val_pool, min(val_per_label, len(val_pool)))
        rest = [d for d in pool if d not in val and not is_val(d)] or [d for d in pool if d not in val]
        train = rng.sample(rest, min(per_label, len(rest)))
        chosen += [Document(d.id, d.text, d.labels, split="val") for d in val]
        chosen += [Document(d.id, d.text, d.labels, split="train") for d in train]
    return Dataset(chosen, labels)


def _is_clinc_val(doc) -> bool:
    """Whether ``doc`` is one of CLINC150's official validation queries."""
    return doc.id.startswith("clinc150-val")


def _per_label_sample(docs, per_label: int, seed: int):
    """A seeded sample of up to ``per_label`` single-label documents of each label."""
    rng = random.Random(seed)
    by_label: dict[str, list] = {}
    for doc in docs:
        by_label.setdefault(doc.labels[0], []).append(doc)
    return [
        d
        for label in sorted(by_label)
        for d in rng.sample(by_label[label], min(per_label, len(by_label[label])))
    ]


def _eval_set(name: str, docs, labels: dict[str, str], calibration: EvalSet | None = None) -> EvalSet:
    index = {label: j for j, label in enumerate(labels)}
    targets = np.zeros((len(docs), len(labels)), dtype=np.int64)
    for i, doc in enumerate(docs):
        for label in doc.labels:
            targets[i, index[label]] = 1
    return EvalSet(name, [d.text for d in docs], dict(labels), targets, calibration)


def clinc_heldout(args: argparse.Namespace, seed: int) -> Scenario:
    clinc = _load("clinc150")
    hierarchy = _hierarchy("clinc150")
    rng = random.Random(seed)
    held = {intent for intents in hierarchy.values() for intent in rng.sample(sorted(intents), 5)}
    intents = [i for intents in hierarchy.values() for i in intents]
    seen = {i: clinc.labels[i] for i in intents if i not in held}
    unseen = {i: clinc.labels[i] for i in intents if i in held}
    every = {i: clinc.labels[i] for i in intents}
    seen_docs = _leaf_docs(clinc, set(seen))
    unseen_docs = _leaf_docs(clinc, set(unseen))
    unseen_test = [d for d in unseen_docs if d.split == "test"]
    unseen_val = [d for d in unseen_docs if _is_clinc_val(d)]
    dev = _eval_set("dev_unseen", unseen_val, unseen)
    train = _train_val(
        seen_docs,
        seen,
        args.train_per_label,
        args.val_per_label,
        seed,
        is_val=_is_clinc_val,
    )
    return Scenario(
        "clinc_heldout",
        train,
        [
            _eval_set("unseen", unseen_test, unseen, dev),
            _eval_set(
                "unseen_among_all", unseen_test, every, _eval_set("dev_unseen_among_all", unseen_val, every)
            ),
            _eval_set("seen", [d for d in seen_docs if d.split == "test"], seen),
        ],
        [dev],
    )


def clinc_to_bitext(args: argparse.Namespace, seed: int) -> Scenario:
    clinc, bitext = _load("clinc150"), _load("bitext_customer_support")
    intents = {i: clinc.labels[i] for v in _hierarchy("clinc150").values() for i in v}
    targets = {i: bitext.labels[i] for v in _hierarchy("bitext_customer_support").values() for i in v}
    train = _train_val(
        _leaf_docs(clinc, set(intents)),
        intents,
        args.train_per_label,
        args.val_per_label,
        seed,
        is_val=_is_clinc_val,
    )
    target_docs = _leaf_docs(bitext, set(targets))
    test = [d for d in target_docs if d.split == "test"]
    dev_docs = _per_label_sample([d for d in target_docs if d.split == "train"], 10, seed)
    dev = _eval_set("dev_bitext_intents", dev_docs, targets)
    return Scenario("clinc_to_bitext", train, [_eval_set("bitext_intents", test, targets, dev)], [dev])


def bitext_to_clinc_finance(args: argparse.Namespace, seed: int) -> Scenario:
    clinc, bitext = _load("clinc150"), _load("bitext_customer_support")
    intents = {i: bitext.labels[i] for v in _hierarchy("bitext_customer_support").values() for i in v}
    hierarchy = _hierarchy("clinc150")
    targets = {i: clinc.labels[i] for domain in ("banking", "credit_cards") for i in hierarchy[domain]}
    train = _train_val(
        _leaf_docs(bitext, set(intents)), intents, args.train_per_label, args.val_per_label, seed
    )
    target_docs = _leaf_docs(clinc, set(targets))
    test = [d for d in target_docs if d.split == "test"]
    dev = _eval_set("dev_clinc_finance_intents", [d for d in target_docs if _is_clinc_val(d)], targets)
    evals = [_eval_set("clinc_finance_intents", test, targets, dev)]
    return Scenario("bitext_to_clinc_finance", train, evals, [dev])


def score(clf: Any, threshold: float, evalset: EvalSet) -> dict[str, float]:
    """Macro-F1 over the target labels, micro-F1 and top-1 accuracy of ``clf`` on ``evalset``.

    Target labels are those with positives in the set: where the seen labels compete
    (``unseen_among_all``), a document wrongly given a seen label counts as a false positive in
    micro-F1 and top-1 accuracy, and as a miss of its true label, but the seen labels' own F1
    (zero positives) do not dilute the macro average.

    With ``evalset.calibration`` (validation documents of the same labels), it is also scored at
    thresholds tuned on those documents by ``labelmatch calibrate``'s
    :func:`~labelmatch.evaluation.calibration.calibrate_thresholds` (``calibrated_*``): the same
    model and the same test documents, with thresholds set for the new labels instead of the
    training labels' carried over. The encoder still never trained on these labels: this separates
    what training did to the ranking from how well the training labels' threshold carries over.
    """
    from labelmatch.evaluation.calibration import calibrate_thresholds
    from labelmatch.evaluation.metrics import binarize, macro_f1

    def thresholded(probs: np.ndarray, at: float | np.ndarray) -> dict[str, float]:
        pred = binarize(probs, at)
        tp = float((pred & evalset.targets).sum())
        target = evalset.targets.sum(0) > 0
        return {
            "macro_f1": macro_f1(evalset.targets[:, target], pred[:, target]),
            "micro_f1": 2 * tp / max(float(pred.sum() + evalset.targets.sum()), 1.0),
        }

    _, probs = clf.scores(evalset.texts, evalset.labels, replace=True)
    result = {
        **thresholded(probs, threshold),
        "top1_accuracy": float(evalset.targets[np.arange(len(probs)), probs.argmax(1)].mean()),
    }
    if evalset.calibration is not None:
        calibration = calibrate_thresholds(clf, _as_dataset(evalset.calibration))
        result["calibrated_threshold"] = calibration.global_threshold
        at = calibration.thresholds.for_labels(list(evalset.labels))
        result.update({f"calibrated_{k}": v for k, v in thresholded(probs, at).items()})
    return result


def _as_dataset(evalset: EvalSet):
    """``evalset`` as a labelmatch Dataset (its documents, labels and descriptions)."""
    from labelmatch.data.dataset import Dataset, Document

    names = list(evalset.labels)
    docs = [
        Document(f"{evalset.name}-{i}", text, [names[j] for j in np.flatnonzero(row)], split="val")
        for i, (text, row) in enumerate(zip(evalset.texts, evalset.targets, strict=True))
    ]
    return Dataset(docs, dict(evalset.labels))


def val_threshold(clf: Any, dataset: Any) -> float:
    """The global threshold tuned on the scenario's validation split (seen labels)."""
    from labelmatch.evaluation.metrics import tune_global_threshold

    val = dataset.split("val")
    _, probs = clf.scores([d.text for d in val.documents], dataset.labels, replace=True)
    return tune_global_threshold(val.label_matrix(), probs)[0]


def run_scenario(scenario: Scenario, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from labelmatch.model.classifier import Classifier
    from labelmatch.training.config import TrainConfig
    from labelmatch.training.sft import train_sft

    train = scenario.train
    evals = scenario.dev if args.dev_only else scenario.evals + scenario.dev
    result: dict[str, Any] = {
        "train_docs": len(train.split("train").documents),
        "val_docs": len(train.split("val").documents),
        "train_labels": len(train.labels),
        "evals": {e.name: {"docs": len(e.texts), "labels": len(e.labels)} for e in evals},
    }
    # The plain encoder, and training from a fresh adapter: the general adapter saw these
    # datasets' labels (bench-general-adapter scores it leave-one-dataset-out instead).
    untrained = Classifier.zero_shot(train.labels, max_length=args.max_length, base_adapter="none")
    threshold = val_threshold(untrained, train)
    result["untrained"] = {
        "threshold": threshold,
        **{e.name: score(untrained, threshold, e) for e in evals},
    }
    config = TrainConfig(
        **{
            "epochs": args.epochs,
            "lr": args.lr,
            "max_length": args.max_length,
            "batch_size": args.batch_size,
            "seed": seed,
            "progress": False,
            "base_adapter": "none",
            "min_steps": 0,  # its recorded schedule: --epochs passes exactly
            **json.loads(args.config),
        }
    )
    out = args.work / f"{scenario.name}-s{seed}-{args.tag or 'default'}"
    if (out / "manifest.json").is_file() and not args.retrain:
        print(f"reusing the model trained earlier at {out} (--retrain to train again)", flush=True)
        seconds, steps, history = None, None, json.loads((out / "labelmatch.json").read_text())["history"]
    else:
        started = time.perf_counter()
        trainer = train_sft(train, config, out)
        seconds, steps, history = round(time.perf_counter() - started, 1), trainer.step, trainer.history
    trained = Classifier.load(out)
    result["trained"] = {
        "threshold": trained.thresholds.default,
        "train_seconds": seconds,
        "steps": steps,
        "val_macro_f1": max(row["val_macro_f1"] for row in history),
        **{e.name: score(trained, trained.thresholds.default, e) for e in evals},
    }
    return result


def aggregate(runs: list[dict[str, Any]], eval_names: list[str]) -> dict[str, Any]:
    """Mean ± half-range over seeds of every model, evaluation set and metric."""
    return {
        f"{model}/{name}/{metric}": mean_spread([r[model][name][metric] for r in runs])
        for model in ("untrained", "trained")
        for name in eval_names
        for metric in METRICS
        if metric in runs[0][model][name]
    }


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    cells = [(s, e) for s, entry in report["scenarios"].items() for e in entry["eval_names"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cells)), 4))
    xs = np.arange(len(cells))
    bars = (
        (-0.3, "untrained", "macro_f1", "untrained", None),
        (-0.1, "trained", "macro_f1", "trained", None),
        (0.1, "untrained", "calibrated_macro_f1", "untrained, new-label threshold", "//"),
        (0.3, "trained", "calibrated_macro_f1", "trained, new-label threshold", "//"),
    )
    for offset, model, metric, legend, hatch in bars:
        empty = {"mean": 0.0, "spread": 0.0}
        cell = [report["scenarios"][s]["aggregate"].get(f"{model}/{e}/{metric}", empty) for s, e in cells]
        color = "tab:blue" if model == "untrained" else "tab:orange"
        ax.bar(
            xs + offset,
            [c["mean"] for c in cell],
            0.2,
            yerr=[c["spread"] for c in cell],
            label=legend,
            capsize=2,
            color=color,
            hatch=hatch,
            alpha=0.6 if hatch else 1.0,
        )
    ax.set_xticks(xs, [f"{s}\n{e}" for s, e in cells], fontsize=7)
    ax.set_ylabel("macro-F1 (target labels)")
    ax.set_title(f"Zero-shot transfer — recipe: {report['tag'] or 'default'}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _calibrated_cells(agg: dict[str, Any], name: str) -> str:
    """The new-label-threshold columns of one table row (dashes where there is no such set)."""
    u, t = agg.get(f"untrained/{name}/calibrated_macro_f1"), agg.get(f"trained/{name}/calibrated_macro_f1")
    if u is None or t is None:
        return "— | — | — |"
    return (
        f"{u['mean']:.3f} ± {u['spread']:.3f} | {t['mean']:.3f} ± {t['spread']:.3f} | "
        f"{t['mean'] - u['mean']:+.3f} |"
    )


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Zero-shot transfer to labels never trained on",
        "",
        f"Recipe: `{report['tag'] or 'default'}` — TrainConfig {json.dumps(report['train_config'])}; "
        f"{report['train_per_label']} training / {report['val_per_label']} validation documents per label; "
        f"seeds {report['seeds']}. CPU: {cpu_text(report['machine'])}. "
        f"Wall time {report['wall_s']:.0f} s, peak RSS {report['peak_rss_mib']:.0f} MiB"
        + (
            " (models trained by an earlier run with these settings were reused from `--work`; "
            "`train_seconds` is null for those)."
            if any(
                r["trained"]["train_seconds"] is None for e in report["scenarios"].values() for r in e["runs"]
            )
            else "."
        ),
        "",
        "Thresholds from the seen labels' validation documents; recipes chosen on the `dev_*` rows "
        "(the target labels' validation documents), never on test; "
        + (
            "this run scored the `dev_*` sets only (no test split read). "
            if report.get("dev_only")
            else "each test split scored once. "
        )
        + "Mean ± half-range over seeds.",
        "",
        "The last three columns score the same models on the same test documents at thresholds tuned "
        "for the new labels on their validation documents (the `dev_*` set of those labels) by "
        "`labelmatch calibrate`, instead of the training labels' threshold: what training did to the "
        "ranking, apart from how well the training labels' threshold carries over to new ones.",
        "",
        "| scenario | seeds | eval set | labels | docs | macro-F1 untrained | macro-F1 trained | Δ | "
        "top-1 untrained | top-1 trained | macro-F1 untrained, new-label threshold | "
        "macro-F1 trained, new-label threshold | Δ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in report["scenarios"].items():
        agg = entry["aggregate"]
        first = entry["runs"][0]
        for e in entry["eval_names"]:
            u, t = agg[f"untrained/{e}/macro_f1"], agg[f"trained/{e}/macro_f1"]
            u1, t1 = agg[f"untrained/{e}/top1_accuracy"], agg[f"trained/{e}/top1_accuracy"]
            lines.append(
                f"| {name} | {','.join(map(str, entry.get('seeds', report['seeds'])))} | {e} | "
                f"{first['evals'][e]['labels']} | {first['evals'][e]['docs']} | "
                f"{u['mean']:.3f} ± {u['spread']:.3f} | {t['mean']:.3f} ± {t['spread']:.3f} | "
                f"{t['mean'] - u['mean']:+.3f} | {u1['mean']:.3f} | {t1['mean']:.3f} | "
                + _calibrated_cells(agg, e)
            )
    lines += ["", "![transfer](transfer.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    builders = {
        "clinc_heldout": clinc_heldout,
        "clinc_to_bitext": clinc_to_bitext,
        "bitext_to_clinc_finance": bitext_to_clinc_finance,
    }
    report: dict[str, Any] = {
        "tag": args.tag,
        "dev_only": args.dev_only,
        "seeds": seeds,
        "train_per_label": args.train_per_label,
        "val_per_label": args.val_per_label,
        "machine": machine(),
        "train_config": {
            "epochs": args.epochs,
            "lr": args.lr,
            "max_length": args.max_length,
            "batch_size": args.batch_size,
            **json.loads(args.config),
        },
        "scenarios": {},
    }
    parts = (part.partition("=") for part in args.scenario_seeds.split(";") if part)
    overrides = {name: [int(x) for x in value.split(",")] for name, _, value in parts}
    for name in args.scenarios.split(","):
        runs = []
        for seed in overrides.get(name, seeds):
            scenario = builders[name](args, seed)
            print(
                f"[{name} seed {seed}] training on {len(scenario.train.split('train').documents)} docs, "
                f"{len(scenario.train.labels)} labels",
                flush=True,
            )
            runs.append(run_scenario(scenario, args, seed))
            print(
                json.dumps({k: v for k, v in runs[-1].items() if k in ("untrained", "trained")}, indent=1),
                flush=True,
            )
        eval_names = list(runs[0]["evals"])
        report["scenarios"][name] = {
            "seeds": overrides.get(name, seeds),
            "eval_names": eval_names,
            "runs": runs,
            "aggregate": aggregate(runs, eval_names),
        }
    report["wall_s"] = time.perf_counter() - started
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stem = f"transfer{'_dev' if args.dev_only else ''}{'_' + args.tag if args.tag else ''}"
    write_outputs(args.out, stem, report,
                  lambda report: markdown(report).replace("transfer.png", f"{stem}.png"), plot,
                  plot_key=None, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
