"""Quality on every shared dataset, one protocol, side by side: the dual encoder against the baselines.

For each dataset in ``../shared/data`` (Reuters-21578, CUAD clauses, CLINC150, Bitext) and each seed:

* **data**: the official test split, whole; validation carved from the official train split
  (``--val-docs``, seeded); training documents a seeded subsample of the rest (``--train-docs``,
  for time on two CPU cores; say so in every table). Hierarchical datasets (CLINC150
  domain → intent, Bitext category → intent: ``hierarchy.json``) keep both levels as labels.
* **methods**, in their own processes (wall time and peak RSS their own):
  TF-IDF + one-vs-rest logistic regression and TF-IDF + one-vs-rest LinearSVC (class-balanced),
  each with ``C`` chosen on validation from a small grid; the untrained encoder zero-shot; the
  trained dual encoder (the library defaults; epochs up to ``--epochs`` with early stopping on
  validation macro-F1). Every method's decision threshold is tuned on validation (the dual
  encoder: its own global + per-label rule); the test split is scored once.
* **hierarchy**: where the dataset has one, the dual encoder's predictions are made consistent
  (a child brings its parent) and the per-level F1 and the raw inconsistency rate are reported.

Results are written per dataset as each completes (``suite/<dataset>.json``), then combined into
``suite.json``, ``suite.md`` and one plot per dataset (``suite_<dataset>.png``).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import cpu_text, machine, mean_spread, measure, write_outputs

from labelmatch.evaluation.report import pyplot

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = ("reuters21578_modapte", "cuad_clauses", "clinc150", "bitext_customer_support")
METHODS = ("tfidf_lr", "tfidf_linear_svc", "zero_shot", "dual_encoder")
#: Long documents read more tokens at validation and test than in training (TrainConfig.inference_max_length).
INFERENCE_LENGTH = {"reuters21578_modapte": 256, "cuad_clauses": 256}
#: Library defaults recorded with each dataset's runs (they changed between recorded runs).
RECIPE_KEYS = ("lr", "batch_size", "lora_rank", "lora_dropout", "encoder_dropout", "contrastive_weight",
               "group_by_length")
#: What the runs recorded before ``recipe`` was recorded used (the defaults until dropout went off).
EARLIER_RECIPE = {"lr": 1e-3, "batch_size": 16, "lora_rank": 8, "lora_dropout": 0.1,
                  "encoder_dropout": "model (0.1)", "contrastive_weight": 0.2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-suite"))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train-docs", type=int, default=1500, help="Training documents (seeded subsample).")
    parser.add_argument("--val-docs", type=int, default=400, help="Validation documents (carved from train).")
    parser.add_argument("--epochs", type=int, default=3, help="Most epochs; early stopping on validation.")
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--note", default="", help="A sentence for the report (what shared the machine).")
    parser.add_argument("--combine-only", action="store_true",
                        help="Run nothing: combine the datasets recorded in <out>/suite/ into suite.*.")
    return parser.parse_args(argv)


def split_dataset(name: str, train_docs: int, val_docs: int, seed: int) -> Any:
    """The official test split whole; validation and a training subsample from the official train split."""
    from labelmatch.data.dataset import Dataset, Document, load_dataset

    full = load_dataset(DATA / name)
    rng = random.Random(seed)
    pool = [d for d in full.documents if d.split != "test"]
    rng.shuffle(pool)
    val, train = pool[:val_docs], pool[val_docs : val_docs + train_docs]
    docs = [
        Document(d.id, d.text, d.labels, d.soft, split, d.meta)
        for split, part in (
            ("train", train),
            ("val", val),
            ("test", [d for d in full.documents if d.split == "test"]),
        )
        for d in part
    ]
    return Dataset(docs, full.labels, full.hierarchy)


def _metrics(dataset: Any, val_scores: np.ndarray, test_scores: np.ndarray) -> dict[str, Any]:
    """Micro/macro-F1 on test at the global threshold tuned on validation."""
    from labelmatch.evaluation.metrics import binarize, classification_metrics, tune_global_threshold

    threshold, _ = tune_global_threshold(dataset.split("val").label_matrix(), val_scores)
    test = dataset.split("test")
    m = classification_metrics(
        test.label_matrix(), binarize(test_scores, threshold), test_scores, dataset.label_names
    )
    return {"micro_f1": m["micro_f1"], "macro_f1": m["macro_f1"], "threshold": threshold}


def run_tfidf(name: str, args: argparse.Namespace, seed: int, model: str) -> dict[str, Any]:
    """TF-IDF + one-vs-rest LR or class-balanced LinearSVC; ``C`` chosen on validation macro-F1."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.svm import LinearSVC

    from labelmatch.evaluation.metrics import binarize, tune_global_threshold

    dataset = split_dataset(name, args.train_docs, args.val_docs, seed)
    train, val, test = (dataset.split(s) for s in ("train", "val", "test"))
    vectorizer = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2, max_features=100_000)
    x_train = vectorizer.fit_transform([d.text for d in train.documents])
    x_val, x_test = (vectorizer.transform([d.text for d in part.documents]) for part in (val, test))
    y = train.label_matrix()
    present = y.sum(0) > 0  # one-vs-rest cannot fit a label without positives: it scores 0

    def fit(c: float) -> Any:
        base = (
            LogisticRegression(C=c, max_iter=2000, class_weight="balanced")
            if model == "lr"
            else LinearSVC(C=c, class_weight="balanced")
        )
        return OneVsRestClassifier(base, n_jobs=1).fit(x_train, y[:, present])

    def scores(clf: Any, x: Any) -> np.ndarray:
        out = np.zeros((x.shape[0], len(dataset.labels)), dtype=np.float32)
        raw = clf.predict_proba(x) if model == "lr" else 1 / (1 + np.exp(-clf.decision_function(x)))
        out[:, present] = raw
        return out

    grid = (1.0, 10.0, 100.0) if model == "lr" else (0.1, 1.0, 10.0)
    tried = {}
    for c in grid:
        clf = fit(c)
        val_scores = scores(clf, x_val)
        threshold, _ = tune_global_threshold(val.label_matrix(), val_scores)
        tried[c] = (
            f1_score(val.label_matrix(), binarize(val_scores, threshold), average="macro", zero_division=0),
            clf,
        )
    best_c = max(tried, key=lambda c: tried[c][0])
    clf = tried[best_c][1]
    return {
        **_metrics(dataset, scores(clf, x_val), scores(clf, x_test)),
        "C": best_c,
        "val_macro_f1": tried[best_c][0],
    }


def run_zero_shot(name: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from labelmatch.model.classifier import Classifier

    dataset = split_dataset(name, args.train_docs, args.val_docs, seed)
    # The plain encoder: the general adapter saw these datasets' training splits (bench-general-adapter).
    clf = Classifier.zero_shot(dataset.labels, max_length=INFERENCE_LENGTH.get(name, args.max_length),
                               base_adapter="none")
    _, val = clf.scores([d.text for d in dataset.split("val").documents])
    _, test = clf.scores([d.text for d in dataset.split("test").documents])
    return _metrics(dataset, val, test)


def dual_encoder_config(name: str, args: argparse.Namespace, seed: int, **overrides: Any) -> Any:
    """The suite's ``TrainConfig`` for one dataset and seed: the library defaults, the suite's
    epoch budget and lengths, patience 1; ``overrides`` change fields (recipe probes)."""
    from labelmatch.training.config import TrainConfig

    # A fresh adapter: the general one saw training documents of three of these datasets (its
    # start is measured leave-one-dataset-out by bench-general-adapter and bench-peers).
    settings = {"epochs": args.epochs, "max_length": args.max_length, "patience": 1, "seed": seed,
                "progress": False, "inference_max_length": INFERENCE_LENGTH.get(name), "base_adapter": "none"}
    return TrainConfig(**{**settings, **overrides})


def run_dual_encoder(name: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from labelmatch.evaluation.evaluate import evaluate
    from labelmatch.model.classifier import Classifier
    from labelmatch.training.sft import train_sft

    dataset = split_dataset(name, args.train_docs, args.val_docs, seed)
    config = dual_encoder_config(name, args, seed)
    out = args.work / f"{name}-s{seed}"
    if (out / "manifest.json").is_file():  # trained by an earlier run with these settings: reuse it
        info = json.loads((out / "labelmatch.json").read_text())
        steps, history = None, info["history"]
    else:
        trainer = train_sft(dataset, config, out)
        steps, history = trainer.step, trainer.history
    metrics = evaluate(Classifier.load(out), dataset, "test")
    best = max(history, key=lambda row: row["val_macro_f1"])
    result = {
        "micro_f1": metrics["micro_f1"],
        "macro_f1": metrics["macro_f1"],
        "steps": steps,
        "best_epoch": best["epoch"],
        "val_macro_f1": best["val_macro_f1"],
    }
    if "levels" in metrics:
        result["levels"] = metrics["levels"]
    return result


def run_dataset(name: str, args: argparse.Namespace, seeds: list[int]) -> dict[str, Any]:
    runs = []
    for seed in seeds:
        print(f"[{name} seed {seed}]", flush=True)
        run = {
            "tfidf_lr": measure(f"{name}/tfidf_lr", run_tfidf, name, args, seed, "lr"),
            "tfidf_linear_svc": measure(f"{name}/tfidf_linear_svc", run_tfidf, name, args, seed, "svc"),
            "zero_shot": measure(f"{name}/zero_shot", run_zero_shot, name, args, seed),
            "dual_encoder": measure(f"{name}/dual_encoder", run_dual_encoder, name, args, seed),
        }
        runs.append(run)
    dataset = split_dataset(name, args.train_docs, args.val_docs, seeds[0])
    summary = {
        m: {
            k: mean_spread([r[m][k] for r in runs]) for k in ("micro_f1", "macro_f1", "wall_s", "peak_rss_mb")
        }
        for m in METHODS
    }
    svc, dual = summary["tfidf_linear_svc"], summary["dual_encoder"]
    levels = [r["dual_encoder"]["levels"] for r in runs if "levels" in r["dual_encoder"]]
    from labelmatch.model.encoder import LORA_TARGETS  # the bundled MiniLM is a BERT
    from labelmatch.training.config import TrainConfig

    return {
        "dataset": name,
        "seeds": seeds,
        "recipe": {**{k: getattr(TrainConfig(), k) for k in RECIPE_KEYS},
                   "lora_targets": TrainConfig().lora_target_modules or LORA_TARGETS["bert"]},
        "labels": len(dataset.labels),
        "docs": {s: len(dataset.split(s).documents) for s in ("train", "val", "test")},
        "hierarchy": dataset.hierarchy is not None,
        "runs": runs,
        "summary": summary,
        "levels": levels,
        "targets": {
            "macro-F1 above LinearSVC": dual["macro_f1"]["mean"] > svc["macro_f1"]["mean"],
            "micro-F1 within 0.01 of LinearSVC or above": dual["micro_f1"]["mean"]
            >= svc["micro_f1"]["mean"] - 0.01,
        },
    }


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = np.arange(len(METHODS))
    for offset, metric in ((-0.2, "micro_f1"), (0.2, "macro_f1")):
        cells = [result["summary"][m][metric] for m in METHODS]
        ax.bar(
            xs + offset,
            [c["mean"] for c in cells],
            0.4,
            yerr=[c["spread"] for c in cells],
            capsize=3,
            label=metric.replace("_", "-"),
        )
    ax.set_xticks(xs, [m.replace("_", "\n") for m in METHODS], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(f"{result['dataset']}: official test split, {len(result['seeds'])} seed(s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Quality suite: every shared dataset, one protocol",
        "",
        f"`make bench-suite` — {report['train_docs']} training documents (seeded subsample of the "
        f"official train split), {report['val_docs']} validation documents carved from it, the official "
        f"test split whole; settings (C of the baselines, the dual encoder's epochs by early stopping, "
        f"every threshold) chosen on validation only; test scored once per seed. "
        f"CPU: {cpu_text(report['machine'])}. Mean ± half-range.",
        "",
        "| dataset | labels | seeds | method | micro-F1 | macro-F1 | wall s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in report["datasets"].values():
        for method in METHODS:
            cell = result["summary"][method]
            lines.append(
                f"| {result['dataset']} | {result['labels']} | {len(result['seeds'])} | {method} | "
                f"{cell['micro_f1']['mean']:.3f} ± {cell['micro_f1']['spread']:.3f} | "
                f"{cell['macro_f1']['mean']:.3f} ± {cell['macro_f1']['spread']:.3f} | "
                f"{cell['wall_s']['mean']:.0f} | {cell['peak_rss_mb']['mean']:.0f} |"
            )
    lines += ["", "Dual encoder settings: the library defaults (`TrainConfig()`) of the run, at most "
              f"{report['epochs']} epochs, the epoch kept by validation macro-F1 (early stopping, "
              "patience 1). Kept epoch and validation macro-F1 per seed, and the defaults that differ "
              "between recorded runs:", ""]
    for result in report["datasets"].values():
        kept = ", ".join(f"{r['dual_encoder']['best_epoch']:.0f} ({r['dual_encoder']['val_macro_f1']:.3f})"
                         for r in result["runs"])
        recipe = result.get("recipe", EARLIER_RECIPE)
        grouped = "length-grouped" if recipe.get("group_by_length") else "shuffled"
        targets = ", ".join(recipe.get("lora_targets", ["query", "value"]))
        lines.append(f"- {result['dataset']}: {kept}; LoRA on {targets}, LoRA dropout "
                     f"{recipe['lora_dropout']}, encoder dropout {recipe['encoder_dropout']}, "
                     f"{grouped} batches")
    if report.get("note"):
        lines += ["", report["note"]]
    lines += ["", "Targets (dual encoder vs TF-IDF + LinearSVC):", ""]
    for result in report["datasets"].values():
        for target, met in result["targets"].items():
            lines.append(f"- {result['dataset']}: {target}: {'met' if met else '**not met**'}")
    hier = [r for r in report["datasets"].values() if r["levels"]]
    if hier:
        lines += [
            "",
            "Hierarchy (dual encoder, predictions made consistent; seed 1st run):",
            "",
            "| dataset | parent micro/macro-F1 | child micro/macro-F1 | raw inconsistency |",
            "|---|---|---|---|",
        ]
        for r in hier:
            lv = r["levels"][0]
            lines.append(
                f"| {r['dataset']} | {lv['parent']['micro_f1']:.3f} / {lv['parent']['macro_f1']:.3f} | "
                f"{lv['child']['micro_f1']:.3f} / {lv['child']['macro_f1']:.3f} | "
                f"{lv['inconsistent_rate']:.3f} |"
            )
    lines += [""] + [f"![{name}](suite_{name}.png)" for name in report["datasets"]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    (args.out / "suite").mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine(),
        "train_docs": args.train_docs,
        "val_docs": args.val_docs,
        "epochs": args.epochs,
        "max_length": args.max_length,
        "note": args.note,
        "datasets": {},
    }
    for name in [] if args.combine_only else args.datasets.split(","):
        result = run_dataset(name, args, seeds)
        (args.out / "suite" / f"{name}.json").write_text(
            json.dumps(result, indent=2) + "\n"
        )  # as it completes
        plot(result, args.out / f"suite_{name}.png")
        report["datasets"][name] = result
    for path in sorted((args.out / "suite").glob("*.json")):  # datasets recorded by earlier runs
        report["datasets"].setdefault(path.stem, json.loads(path.read_text()))
    order = {name: i for i, name in enumerate(DATASETS)}
    report["datasets"] = dict(sorted(report["datasets"].items(),
                                     key=lambda item: order.get(item[0], len(order))))
    report["wall_s"] = time.perf_counter() - started  # this invocation
    report["runs_wall_s"] = sum(r["summary"][m]["wall_s"]["mean"] * len(r["seeds"])  # every recorded run
                                for r in report["datasets"].values() for m in METHODS)
    write_outputs(args.out, "suite", report, markdown, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
