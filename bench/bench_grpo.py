"""GRPO from simulated user feedback on real data: SFT vs SFT+GRPO, side by side.

Scenario (Bitext customer-support intents, ``../shared/data/bitext_customer_support``):

1. **SFT where it is imperfect.** A subset of categories is kept (``--categories``). The SFT model
   sees plenty of documents from the "rest" categories but only a few from the "feedback"
   categories (``--focus``), and a share of those have their intent corrupted (``--corrupt``):
   new traffic concentrates on what the model learnt least well.
2. **Simulated feedback** on a separate pool of training documents from the focus categories
   (never seen by SFT): the SFT model's served prediction is compared with the true labels;
   ``score = clip(round(1 + 4·F1 + noise), 1, 5)`` and a share of records carries the true labels
   as corrections. Records go through the real :class:`~labelmatch.feedback.feedback_store.FeedbackStore`
   (SQLite) and its export.
3. **GRPO** (:func:`labelmatch.feedback.grpo.train_grpo`) from the SFT model on that export.
4. **Test macro-F1** of SFT and SFT+GRPO on the test split, separately on the feedback's
   distribution (focus categories) and on the rest, with each model's own thresholds. Macro-F1
   is over the labels that occur in that part; micro-F1 over all labels is reported too.

Writes ``grpo.json``, ``grpo.md``, ``grpo_reward.png`` and ``grpo_kl.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from common import write_outputs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from labelmatch.core.artifacts import verify_artifact
from labelmatch.core.errors import ArtifactError
from labelmatch.data.dataset import Dataset, Document, assign_splits, load_dataset
from labelmatch.evaluation.metrics import binarize
from labelmatch.evaluation.report import pyplot
from labelmatch.feedback.feedback_store import FeedbackRecord, FeedbackStore
from labelmatch.feedback.grpo import GRPOConfig, retune_thresholds, train_grpo
from labelmatch.model.classifier import Classifier
from labelmatch.training.config import TrainConfig
from labelmatch.training.sft import train_sft

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bitext_customer_support"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults sized for ≤ 20 minutes on two heavily shared CPU cores)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--work", type=Path, default=Path("bench/work/grpo"), help="Cache of the SFT model + scratch space."
    )
    parser.add_argument("--categories", default="ORDER,REFUND,ACCOUNT,PAYMENT,DELIVERY,INVOICE")
    parser.add_argument("--focus", default="ORDER,REFUND", help="Categories the feedback comes from.")
    parser.add_argument("--sft-rest", type=int, default=12, help="SFT documents per intent of the rest.")
    parser.add_argument("--sft-focus", type=int, default=4, help="SFT documents per intent of the focus.")
    parser.add_argument(
        "--corrupt", type=float, default=0.4, help="Share of focus SFT docs with a wrong intent."
    )
    parser.add_argument("--feedback-docs", type=int, default=96)
    parser.add_argument("--corrected-share", type=float, default=0.3)
    parser.add_argument("--score-noise", type=float, default=0.6)
    parser.add_argument("--test-docs", type=int, default=240)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--sft-epochs", type=int, default=2)
    parser.add_argument("--grpo-steps", type=int, default=60)
    parser.add_argument("--grpo-lr", type=float, default=GRPOConfig.lr)
    parser.add_argument("--beta", type=float, default=GRPOConfig.beta)
    parser.add_argument("--target-kl", type=float, default=GRPOConfig.target_kl)
    parser.add_argument("--credit", choices=("set", "label"), default=GRPOConfig.credit)
    parser.add_argument("--group-size", type=int, default=GRPOConfig.group_size)
    parser.add_argument("--inner-iterations", type=int, default=GRPOConfig.inner_iterations)
    parser.add_argument(
        "--retune",
        choices=("val", "none"),
        default="val",
        help="val: re-tune GRPO's thresholds on the SFT validation split + the corrected feedback records; "
        "none: keep the SFT thresholds.",
    )
    parser.add_argument(
        "--label-gradients", action="store_true", default=GRPOConfig.label_gradients,
        help="Exact label-side gradients (slower).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: on a heavily shared CPU, OpenMP oversubscription costs 2-3x).",
    )
    return parser.parse_args(argv)


def category_subset(dataset: Dataset, categories: list[str]) -> Dataset:
    """Documents whose category is listed; labels = those categories and their intents."""
    docs = [d for d in dataset.documents if d.labels[0] in categories]
    used = {label for d in docs for label in d.labels}
    return Dataset(docs, {k: v for k, v in dataset.labels.items() if k in used})


def pick_sft(
    train: list[Document], focus: set[str], per_rest: int, per_focus: int, corrupt: float, rng: random.Random
) -> tuple[list[Document], set[str]]:
    """SFT documents per intent (few for the focus), focus intents corrupted; returns (docs, used ids)."""
    by_intent: dict[str, list[Document]] = {}
    for doc in train:
        by_intent.setdefault(doc.labels[1], []).append(doc)
    intents_of: dict[str, list[str]] = {}
    for doc in train:
        if doc.labels[1] not in intents_of.setdefault(doc.labels[0], []):
            intents_of[doc.labels[0]].append(doc.labels[1])
    chosen, used = [], set()
    for intent, docs in sorted(by_intent.items()):
        category = docs[0].labels[0]
        for doc in rng.sample(docs, min(len(docs), per_focus if category in focus else per_rest)):
            labels = list(doc.labels)
            others = [i for i in intents_of[category] if i != intent]
            if category in focus and others and rng.random() < corrupt:
                labels = [category, rng.choice(others)]
            chosen.append(Document(doc.id, doc.text, labels))
            used.add(doc.id)
    return chosen, used


def simulate_feedback(
    classifier: Classifier,
    docs: list[Document],
    labels: dict[str, str],
    args: argparse.Namespace,
    rng: random.Random,
) -> list[FeedbackRecord]:
    """Serve the SFT prediction, rate it from its F1 against the truth (+ noise), sometimes correct it."""
    predictions = classifier.predict([d.text for d in docs], labels, replace=True)
    records = []
    for doc, prediction in zip(docs, predictions, strict=True):
        truth, served = set(doc.labels), set(prediction.labels)
        f1 = 2 * len(truth & served) / max(len(truth) + len(served), 1)
        score = int(np.clip(round(1 + 4 * f1 + rng.gauss(0, args.score_noise)), 1, 5))
        corrected = list(doc.labels) if rng.random() < args.corrected_share else None
        records.append(
            FeedbackRecord(
                doc.text, "sft", prediction.labels, score, prediction.scores, corrected, "bench", id=doc.id
            )
        )
    return records


def sft_cache_key(args: argparse.Namespace) -> str:
    """Digest of everything the SFT model depends on (the cached model is reused when it matches)."""
    keys = (
        "data",
        "categories",
        "focus",
        "sft_rest",
        "sft_focus",
        "corrupt",
        "max_length",
        "sft_epochs",
        "seed",
    )
    text = json.dumps({k: str(getattr(args, k)) for k in keys}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cached_sft(sft_set: Dataset, config: TrainConfig, cache: Path) -> tuple[Path, bool]:
    """The SFT Model artifact at ``cache``, trained there when missing or invalid; returns (dir, reused)."""
    try:
        verify_artifact(cache, "Model")
        return cache, True
    except (ArtifactError, OSError):
        shutil.rmtree(cache, ignore_errors=True)
    train_sft(sft_set, config, cache)
    return cache, False


def part_metrics(classifier: Classifier, docs: list[Document], labels: dict[str, str]) -> dict[str, float]:
    """Macro-F1 over the labels present in ``docs`` and micro-F1 over all labels."""
    names, probs = classifier.scores([d.text for d in docs], labels, replace=True)
    return scored_metrics(classifier, names, probs, docs, labels)


def scored_metrics(
    classifier: Classifier, names: list[str], probs: np.ndarray, docs: list[Document], labels: dict[str, str]
) -> dict[str, float]:
    """:func:`part_metrics` from scores already computed (``classifier.scores`` of ``docs``)."""
    from sklearn.metrics import f1_score

    predicted = binarize(probs, classifier.thresholds.for_labels(names))
    truth = Dataset(docs, labels).label_matrix()
    present = np.flatnonzero(truth.sum(0) > 0)
    return {
        "macro_f1": float(
            f1_score(truth[:, present], predicted[:, present], average="macro", zero_division=0)
        ),
        "micro_f1": float(f1_score(truth, predicted, average="micro", zero_division=0)),
        "documents": len(docs),
        "labels_present": len(present),
    }


def plot_curve(values: list[float], title: str, ylabel: str, path: Path) -> str:
    """A curve with its moving average."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(values, color="#88ccee", label="per step")
    window = max(1, len(values) // 10)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    ax.plot(range(window - 1, len(values)), smooth, color="#332288", label=f"moving average ({window})")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the results."""
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if not (args.data / "docs.jsonl").is_file():
        print(f"error: {args.data}/docs.jsonl not found (pass --data)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    rng = random.Random(args.seed)
    categories, focus = args.categories.split(","), set(args.focus.split(","))
    data = category_subset(load_dataset(args.data), categories)
    labels = data.labels
    train = [d for d in data.documents if d.split == "train"]
    test = [d for d in data.documents if d.split == "test"]
    sft_docs, used = pick_sft(train, focus, args.sft_rest, args.sft_focus, args.corrupt, rng)
    pool = [d for d in train if d.id not in used and d.labels[0] in focus]
    feedback_docs = rng.sample(pool, min(args.feedback_docs, len(pool)))
    test = rng.sample(test, min(args.test_docs, len(test)))
    test_focus = [d for d in test if d.labels[0] in focus]
    # A development set (unused training documents, own generator so the draws above and the
    # feedback noise stay as they were): settings are chosen on it, never on the test split.
    held = {d.id for d in feedback_docs} | used
    dev = random.Random(args.seed + 1).sample(
        [d for d in train if d.id not in held], min(args.test_docs, len(train) - len(held))
    )
    parts = {
        "feedback_distribution": test_focus,
        "rest": [d for d in test if d.labels[0] not in focus],
        "dev_feedback_distribution": [d for d in dev if d.labels[0] in focus],
        "dev_rest": [d for d in dev if d.labels[0] not in focus],
    }
    run_dir = args.work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    timings: dict[str, float] = {}

    sft_set = assign_splits(Dataset(sft_docs, labels), val_fraction=0.2, test_fraction=0.0, seed=args.seed)
    tick = time.perf_counter()
    train_config = TrainConfig(
        max_length=args.max_length,
        epochs=args.sft_epochs,
        batch_size=16,
        seed=args.seed,
        progress=False,
        patience=5,
    )
    sft_dir, sft_reused = cached_sft(sft_set, train_config, args.work / f"sft-{sft_cache_key(args)}")
    timings["sft_seconds"] = time.perf_counter() - tick
    sft = Classifier.load(sft_dir)

    store = FeedbackStore(f"sqlite:///{run_dir / 'feedback.db'}")
    store.register_model("sft", labels)
    records = simulate_feedback(sft, feedback_docs, labels, args, rng)
    for record in records:
        store.add(record)
    store.export(run_dir / "feedback", current_version="sft")
    stats = store.stats()
    # Threshold data GRPO may see: SFT's own validation split (its labels as given, focus
    # corruption included) and the feedback records that carry corrected labels. No test data.
    val_docs = [d for d in sft_set.documents if d.split == "val"] + [
        Document(f"fb-{r.id}", r.text, list(r.corrected_labels)) for r in records if r.corrected_labels
    ]
    val_set = Dataset(val_docs, labels) if args.retune == "val" else None

    tick = time.perf_counter()
    config = GRPOConfig(
        group_size=args.group_size,
        batch_size=16,
        steps=args.grpo_steps,
        inner_iterations=args.inner_iterations,
        credit=args.credit,
        target_kl=args.target_kl,
        lr=args.grpo_lr,
        beta=args.beta,
        label_gradients=args.label_gradients,
        seed=args.seed,
        progress=True,
    )
    summary = train_grpo(sft_dir, run_dir / "feedback", run_dir / "grpo", config, val_dataset=val_set,
                         replay_dataset=sft_set.split("train"))
    timings["grpo_seconds"] = time.perf_counter() - tick
    grpo = Classifier.load(run_dir / "grpo")
    # Ablation: the SFT model with thresholds re-tuned on the same data, to separate what GRPO's
    # encoder update brings from what threshold re-tuning alone brings.
    sft_retuned = Classifier.load(sft_dir)
    if val_set is not None:
        sft_retuned.thresholds, _ = retune_thresholds(sft_retuned, val_set)

    results: dict[str, dict] = {"sft": {}, "sft_retuned": {}, "grpo": {}}
    for name, clf in (("sft", sft), ("sft_retuned", sft_retuned), ("grpo", grpo)):
        for part, docs in parts.items():
            results[name][part] = part_metrics(clf, docs, labels)
    gain_focus = 100 * (
        results["grpo"]["feedback_distribution"]["macro_f1"]
        - results["sft"]["feedback_distribution"]["macro_f1"]
    )
    change_rest = 100 * (results["grpo"]["rest"]["macro_f1"] - results["sft"]["rest"]["macro_f1"])
    dev_gains = {
        part: 100 * (results["grpo"][part]["macro_f1"] - results["sft"][part]["macro_f1"])
        for part in ("dev_feedback_distribution", "dev_rest")
    }
    args.out.mkdir(parents=True, exist_ok=True)
    images = {
        "reward": plot_curve(
            summary["reward_curve"],
            "Mean reward of sampled label sets",
            "reward",
            args.out / "grpo_reward.png",
        ),
        "kl": plot_curve(
            summary["kl_curve"],
            "KL(policy ‖ SFT reference) per document",
            "KL (nats)",
            args.out / "grpo_kl.png",
        ),
    }
    report = {
        "dataset": str(args.data.name),
        "setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "labels": len(labels),
        "sft_documents": len(sft_docs),
        "sft_cache": {"dir": str(sft_dir), "reused": sft_reused},
        "threshold_data": (
            {
                "sft_val_documents": len(val_docs) - stats["with_corrections"],
                "corrected_feedback_records": stats["with_corrections"],
            }
            if val_set is not None
            else None
        ),
        "feedback": stats,
        "test_documents": {part: len(docs) for part, docs in parts.items()},
        "results": results,
        "gain_feedback_distribution_points": gain_focus,
        "change_rest_points": change_rest,
        "dev_change_points": dev_gains,
        "target_met": gain_focus >= 2.0 and change_rest >= -1.0,
        "grpo": {
            "steps": summary["steps"],
            "final_kl": summary["final_kl"],
            "stopped_early": summary["stopped_early"],
            "config": config.to_dict(),
            "reward_first_10": float(np.mean(summary["reward_curve"][:10])),
            "reward_last_10": float(np.mean(summary["reward_curve"][-10:])),
        },
        "curves": {"reward": summary["reward_curve"], "kl": summary["kl_curve"]},
        "timings": {
            **{k: round(v, 1) for k, v in timings.items()},
            "total_seconds": round(time.perf_counter() - started, 1),
        },
        "images": images,
    }
    write_outputs(args.out, "grpo", report, markdown, indent=2)
    return 0


def markdown(report: dict) -> str:
    """The Markdown summary."""
    r, setup, fb, n_test = report["results"], report["setup"], report["feedback"], report["test_documents"]
    g, thr = report["grpo"], report["threshold_data"]
    threshold_text = (
        f"GRPO's thresholds are re-tuned on data GRPO may see: the SFT validation split "
        f"({thr['sft_val_documents']} documents, labels as SFT saw them, focus corruption included) + the "
        f"{thr['corrected_feedback_records']} feedback records with corrected labels. Column *SFT, re-tuned* "
        "is the ablation: the SFT model with thresholds re-tuned on the same data (no GRPO)."
        if thr
        else "GRPO keeps the SFT thresholds."
    )
    lines = [
        "# GRPO from simulated feedback — SFT vs SFT+GRPO",
        "",
        f"Data: `{report['dataset']}`, categories {setup['categories']} ({report['labels']} labels: "
        f"categories + intents). Feedback distribution = categories {setup['focus']}; rest = the others.",
        f"SFT: {report['sft_documents']} documents ({setup['sft_rest']} per intent of the rest, "
        f"{setup['sft_focus']} per intent of the focus with {setup['corrupt']:.0%} of those given a wrong "
        f"intent), max_length {setup['max_length']}, {setup['sft_epochs']} epochs (cached in "
        f"`{report['sft_cache']['dir']}`, reused: {report['sft_cache']['reused']}).",
        f"Feedback: {fb['records']} records on unseen focus documents; score = clip(round(1 + 4·F1"
        f"(served, truth) + N(0, {setup['score_noise']})), 1, 5); {fb['with_corrections']} with "
        f"corrected labels. Score histogram: {fb['scores']}.",
        f"Test: {n_test['feedback_distribution']} + {n_test['rest']} documents subsampled from the test "
        f"split (seed {setup['seed']}). Dev: {n_test['dev_feedback_distribution']} + {n_test['dev_rest']} "
        "unused *training* documents (neither SFT nor feedback); GRPO settings were chosen on dev, "
        "never on test.",
        threshold_text,
        "",
        "| part | metric | SFT | SFT, re-tuned | SFT+GRPO | Δ vs SFT (points) | Δ vs SFT re-tuned |",
        "|---|---|---|---|---|---|---|",
    ]
    for part in ("feedback_distribution", "rest", "dev_feedback_distribution", "dev_rest"):
        name = part.replace("dev_", "dev: ").replace("_", " ")
        name = name if part.startswith("dev") else f"test: {name}"
        for metric in ("macro_f1", "micro_f1"):
            a, t, b = r["sft"][part][metric], r["sft_retuned"][part][metric], r["grpo"][part][metric]
            lines.append(
                f"| {name} | {metric} | {a:.4f} | {t:.4f} | {b:.4f} | {100 * (b - a):+.2f} | "
                f"{100 * (b - t):+.2f} |"
            )
    cfg = g["config"]
    lines += [
        "",
        f"Target (test: ≥ +2 points macro-F1 on the feedback distribution, ≥ −1 on the rest, vs SFT): "
        f"**{'met' if report['target_met'] else 'NOT met'}** "
        f"({report['gain_feedback_distribution_points']:+.2f} / {report['change_rest_points']:+.2f}).",
        "",
        f"GRPO: {g['steps']} steps{' (stopped by the KL budget)' if g['stopped_early'] else ''}, credit "
        f"`{cfg['credit']}`, group {cfg['group_size']}, batch {cfg['batch_size']}, "
        f"{cfg['inner_iterations']} inner iterations, β {cfg['beta']}, lr {cfg['lr']}, KL budget "
        f"{cfg['target_kl']}, label gradients {cfg['label_gradients']}; mean set reward "
        f"{g['reward_first_10']:.3f} (first 10 steps) → {g['reward_last_10']:.3f} (last 10); final KL to "
        f"the SFT reference {g['final_kl']:.4f} nats per feedback document.",
        "",
        f"Wall time: {report['timings']} (two shared CPU cores, {setup['threads']} torch thread).",
        "",
        f"![reward]({report['images']['reward']})",
        "",
        f"![KL]({report['images']['kl']})",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
