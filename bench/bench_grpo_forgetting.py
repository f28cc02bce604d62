"""GRPO without forgetting: which replay method keeps the rest while feedback helps, over seeds and datasets.

Scenario per dataset and seed (``bench_grpo``'s, on Bitext customer support and CLINC150: an SFT
model weak on a few categories, simulated feedback on unseen documents of those categories):

* **SFT** and its **re-tuned ablation** (SFT with thresholds re-tuned on the data GRPO may see:
  its validation split + the corrected feedback records; no encoder change);
* **GRPO** once per method (:data:`METHODS`, each a set of :class:`GRPOConfig` fields): plain GRPO
  (KL only on the feedback documents), a KL trust region on replayed SFT training documents,
  replay of the SFT data with its labels (BCE), and both.

Scored on the **test split** and on **dev** (unused training documents), each split into the
feedback distribution (the focus categories) and the rest: macro-F1 on the feedback distribution,
micro- and macro-F1 on the rest, and the mean Bernoulli KL of each model's probabilities to the
SFT model's on the rest. The default method is chosen on **dev** only (the rule in
:func:`choose_on_dev`); test is reported for every method, the choice never reads it.

Writes ``grpo_forgetting.{json,md,png}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_grpo import cached_sft, category_subset, pick_sft, scored_metrics, sft_cache_key, simulate_feedback
from common import machine, mean_spread, write_outputs

from labelmatch.data.dataset import Dataset, Document, assign_splits, load_dataset
from labelmatch.evaluation.report import pyplot
from labelmatch.feedback.feedback_store import FeedbackStore
from labelmatch.feedback.grpo import GRPOConfig, retune_thresholds, train_grpo
from labelmatch.model.classifier import Classifier
from labelmatch.training.config import TrainConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

#: Per dataset: the categories kept and the feedback categories (the SFT model is weak there).
DATASETS: dict[str, dict[str, str]] = {
    "bitext_customer_support": {"categories": "ORDER,REFUND,ACCOUNT,PAYMENT,DELIVERY,INVOICE",
                                "focus": "ORDER,REFUND"},
    "clinc150": {"categories": "banking,credit_cards,travel,utility,home,work",
                 "focus": "banking,credit_cards"},
}

#: GRPO methods compared: name → GRPOConfig fields set on top of the bench's common settings.
METHODS: dict[str, dict[str, float]] = {
    "grpo": {"replay_kl_weight": 0.0, "replay_bce_weight": 0.0},
    "replay_kl": {"replay_kl_weight": 1.0},
    "replay_bce": {"replay_bce_weight": 0.5},
    "replay_kl_bce": {"replay_kl_weight": 1.0, "replay_bce_weight": 0.5},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=SHARED)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work", type=Path, default=Path("bench/work/grpo_forgetting"))
    parser.add_argument("--sft-rest", type=int, default=12)
    parser.add_argument("--sft-focus", type=int, default=4)
    parser.add_argument("--corrupt", type=float, default=0.4)
    parser.add_argument("--feedback-docs", type=int, default=96)
    parser.add_argument("--corrected-share", type=float, default=0.3)
    parser.add_argument("--score-noise", type=float, default=0.6)
    parser.add_argument("--test-docs", type=int, default=600, help="Test (and dev) documents per dataset.")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--sft-epochs", type=int, default=2)
    parser.add_argument("--grpo-steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def kl_to(reference: np.ndarray, probs: np.ndarray) -> float:
    """Mean over documents of the Bernoulli KL(probs ‖ reference), summed over labels (nats)."""
    p, q = np.clip(probs, 1e-6, 1 - 1e-6), np.clip(reference, 1e-6, 1 - 1e-6)
    return float(np.mean(np.sum(p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q)), axis=1)))


#: The parts whose probabilities are compared with the SFT model's.
REST_PARTS = ("test_rest", "dev_rest")


def score(model: Classifier, parts: dict[str, list[Document]], labels: dict[str, str],
          sft_probs: dict[str, np.ndarray] | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every part's metrics and, on the rest, the KL of the model's probabilities to SFT's
    (``sft_probs``; ``None``: the model is SFT). Returns the metrics and the model's rest probabilities."""
    out: dict[str, Any] = {}
    rest_probs: dict[str, np.ndarray] = {}
    for part, docs in parts.items():
        names, probs = model.scores([d.text for d in docs], labels, replace=True)
        out[part] = scored_metrics(model, names, probs, docs, labels)
        if part in REST_PARTS:
            rest_probs[part] = probs
    reference = rest_probs if sft_probs is None else sft_probs
    for part in REST_PARTS:
        out[part]["kl_to_sft"] = kl_to(reference[part], rest_probs[part])
    return out, rest_probs


def run_seed(args: argparse.Namespace, name: str, seed: int, methods: list[str]) -> dict[str, Any]:
    """SFT, the ablation and every method on one dataset and seed."""
    setup = DATASETS[name]
    data_dir = args.data_root / name
    rng = random.Random(seed)
    focus = set(setup["focus"].split(","))
    data = category_subset(load_dataset(data_dir), setup["categories"].split(","))
    labels = data.labels
    train = [d for d in data.documents if d.split == "train"]
    test = [d for d in data.documents if d.split == "test"]
    sft_docs, used = pick_sft(train, focus, args.sft_rest, args.sft_focus, args.corrupt, rng)
    pool = [d for d in train if d.id not in used and d.labels[0] in focus]
    feedback_docs = rng.sample(pool, min(args.feedback_docs, len(pool)))
    test = random.Random(seed).sample(test, min(args.test_docs, len(test)))
    held = {d.id for d in feedback_docs} | used
    dev = random.Random(seed + 1).sample([d for d in train if d.id not in held],
                                         min(args.test_docs, len(train) - len(held)))
    parts = {"test_feedback": [d for d in test if d.labels[0] in focus],
             "test_rest": [d for d in test if d.labels[0] not in focus],
             "dev_feedback": [d for d in dev if d.labels[0] in focus],
             "dev_rest": [d for d in dev if d.labels[0] not in focus]}
    work = args.work / name / f"s{seed}"
    work.mkdir(parents=True, exist_ok=True)
    key_args = argparse.Namespace(data=data_dir, categories=setup["categories"], focus=setup["focus"],
                                  sft_rest=args.sft_rest, sft_focus=args.sft_focus, corrupt=args.corrupt,
                                  max_length=args.max_length, sft_epochs=args.sft_epochs, seed=seed)
    sft_set = assign_splits(Dataset(sft_docs, labels), val_fraction=0.2, test_fraction=0.0, seed=seed)
    tick = time.perf_counter()
    sft_dir, reused = cached_sft(sft_set, TrainConfig(max_length=args.max_length, epochs=args.sft_epochs,
                                                      batch_size=16, seed=seed, progress=False, patience=5),
                                 args.work / name / f"sft-{sft_cache_key(key_args)}")
    print(f"{name} s{seed}: SFT {'reused' if reused else 'trained'} in {time.perf_counter() - tick:.0f} s",
          flush=True)
    sft = Classifier.load(sft_dir)
    sim = argparse.Namespace(score_noise=args.score_noise, corrected_share=args.corrected_share)
    records = simulate_feedback(sft, feedback_docs, labels, sim, rng)
    (work / "feedback.db").unlink(missing_ok=True)
    store = FeedbackStore(f"sqlite:///{work / 'feedback.db'}")
    store.register_model("sft", labels)
    for record in records:
        store.add(record)
    store.export(work / "feedback", current_version="sft")
    val = Dataset([d for d in sft_set.documents if d.split == "val"] + [
        Document(f"fb-{r.id}", r.text, list(r.corrected_labels)) for r in records if r.corrected_labels
    ], labels)
    replay = sft_set.split("train")
    results: dict[str, Any] = {}
    results["sft"], sft_probs = score(sft, parts, labels)
    retuned = Classifier.load(sft_dir)
    retuned.thresholds, _ = retune_thresholds(retuned, val)
    results["sft_retuned"] = score(retuned, parts, labels, sft_probs)[0]
    runs = {}
    for method in methods:
        tick = time.perf_counter()
        config = GRPOConfig(steps=args.grpo_steps, max_length=args.max_length, seed=seed, progress=False,
                            **METHODS[method])
        summary = train_grpo(sft_dir, work / "feedback", work / method, config, val_dataset=val,
                             replay_dataset=replay)
        results[method] = score(Classifier.load(work / method), parts, labels, sft_probs)[0]
        runs[method] = {"steps": summary["steps"], "final_kl": summary["final_kl"],
                        "stopped_early": summary["stopped_early"],
                        "seconds": round(time.perf_counter() - tick, 1)}
        r, a = results[method], results["sft_retuned"]
        feedback = 100 * (r["dev_feedback"]["macro_f1"] - a["dev_feedback"]["macro_f1"])
        rest = 100 * (r["dev_rest"]["micro_f1"] - a["dev_rest"]["micro_f1"])
        print(f"{name} s{seed} {method}: dev feedback macro {feedback:+.2f}, dev rest micro {rest:+.2f} vs "
              f"ablation, {runs[method]['seconds']:.0f} s", flush=True)
    return {"dataset": name, "seed": seed, "labels": len(labels), "sft_documents": len(sft_docs),
            "feedback_records": len(records), "documents": {p: len(d) for p, d in parts.items()},
            "results": results, "runs": runs}


#: The comparisons reported: (key, part, metric).
EFFECTS = (("feedback_macro", "feedback", "macro_f1"), ("rest_micro", "rest", "micro_f1"),
           ("rest_macro", "rest", "macro_f1"))


def summarise(seed_runs: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Per dataset and method: each effect in points vs SFT and vs the ablation (mean ± spread), KL."""
    table: dict[str, Any] = {}
    for name in sorted({r["dataset"] for r in seed_runs}):
        runs = [r for r in seed_runs if r["dataset"] == name]
        table[name] = {}
        for method in methods:
            row: dict[str, Any] = {}
            for split in ("test", "dev"):
                for key, part, metric in EFFECTS:
                    for ref in ("sft", "sft_retuned"):
                        row[f"{split}_{key}_vs_{ref}"] = mean_spread([
                            100 * (r["results"][method][f"{split}_{part}"][metric]
                                   - r["results"][ref][f"{split}_{part}"][metric]) for r in runs])
                row[f"{split}_rest_kl_to_sft"] = mean_spread(
                    [r["results"][method][f"{split}_rest"]["kl_to_sft"] for r in runs])
            table[name][method] = row
    return table


def choose_on_dev(table: dict[str, Any], methods: list[str]) -> dict[str, Any]:
    """The default method, from dev only: among methods whose dev rest micro-F1 (mean over datasets)
    is at most 0.5 points below the ablation's, the largest mean dev feedback macro-F1 gain over
    the ablation; when none qualifies, the smallest rest loss."""
    def mean(method: str, key: str) -> float:
        return float(np.mean([table[d][method][key]["mean"] for d in table]))

    scores = {m: {"dev_feedback_macro_vs_ablation": mean(m, "dev_feedback_macro_vs_sft_retuned"),
                  "dev_rest_micro_vs_ablation": mean(m, "dev_rest_micro_vs_sft_retuned")} for m in methods}
    keeping = [m for m in methods if scores[m]["dev_rest_micro_vs_ablation"] >= -0.5]
    chosen = (max(keeping, key=lambda m: scores[m]["dev_feedback_macro_vs_ablation"]) if keeping
              else max(methods, key=lambda m: scores[m]["dev_rest_micro_vs_ablation"]))
    return {"rule": choose_on_dev.__doc__.split(":", 1)[1].strip().replace("\n   ", ""),
            "dev_scores": scores, "chosen": chosen, "config": METHODS[chosen]}


def goals(table: dict[str, Any], method: str) -> dict[str, Any]:
    """The issue's goal for ``method`` on test, per dataset: feedback ≥ +2, rest micro ≥ −0.5 vs ablation."""
    out = {}
    for name, rows in table.items():
        row = rows[method]
        feedback = row["test_feedback_macro_vs_sft_retuned"]["mean"]
        rest = row["test_rest_micro_vs_sft_retuned"]["mean"]
        out[name] = {"feedback_macro_vs_ablation": feedback, "rest_micro_vs_ablation": rest,
                     "feedback_goal_met": feedback >= 2.0, "rest_goal_met": rest >= -0.5}
    return out


def plot(table: dict[str, Any], methods: list[str], path: Path) -> str:
    """Test effects vs the ablation per dataset and method: feedback macro-F1 and rest micro-F1."""
    plt = pyplot()
    names = list(table)
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    width = 0.8 / len(methods)
    for ax, name in zip(axes[0], names, strict=True):
        for i, method in enumerate(methods):
            row = table[name][method]
            values = [row["test_feedback_macro_vs_sft_retuned"], row["test_rest_micro_vs_sft_retuned"]]
            ax.bar(np.arange(2) + i * width, [v["mean"] for v in values], width,
                   yerr=[v["spread"] for v in values], capsize=3, label=method)
        ax.axhline(2.0, color="#117733", ls=":", lw=1)
        ax.axhline(-0.5, color="#cc6677", ls=":", lw=1)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(np.arange(2) + 0.4 - width / 2, ["feedback: macro-F1", "rest: micro-F1"])
        ax.set_ylabel("points vs SFT, re-tuned (test)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def markdown(report: dict[str, Any]) -> str:
    """The Markdown summary."""
    s, table, choice = report["setup"], report["table"], report["choice"]
    lines = [
        "# GRPO without forgetting — replay methods over seeds and datasets",
        "",
        f"Per dataset and seed ({s['seeds']}): an SFT model weak on the feedback categories "
        f"({s['sft_rest']} documents per intent of the rest, {s['sft_focus']} per focus intent, "
        f"{s['corrupt']:.0%} of those mislabelled), {s['feedback_docs']} simulated feedback records on "
        f"unseen focus documents, {s['grpo_steps']} GRPO steps per method. *Ablation* = SFT with "
        "thresholds re-tuned on the same data GRPO's thresholds see. Effects in F1 points, mean ± half "
        "the range over seeds; KL = mean Bernoulli KL(model ‖ SFT) per document on the rest.",
        "",
        "Methods (every other GRPOConfig field at its default): "
        + "; ".join(f"`{m}` {METHODS[m]}" for m in report["methods"]) + ".",
        "",
    ]
    for name, rows in table.items():
        lines += [f"## {name} ({DATASETS[name]['focus']} = feedback)", "",
                  "| method | split | feedback macro vs SFT | feedback macro vs ablation | "
                  "rest micro vs SFT | rest micro vs ablation | rest macro vs ablation | rest KL to SFT |",
                  "|---|---|---|---|---|---|---|---|"]
        for method, row in rows.items():
            for split in ("test", "dev"):
                keys = ("feedback_macro_vs_sft", "feedback_macro_vs_sft_retuned", "rest_micro_vs_sft",
                        "rest_micro_vs_sft_retuned", "rest_macro_vs_sft_retuned")
                cell = [row[f"{split}_{k}"] for k in keys]
                kl = row[f"{split}_rest_kl_to_sft"]
                lines.append(f"| {method} | {split} | " + " | ".join(
                    f"{c['mean']:+.2f} ± {c['spread']:.2f}" for c in cell) + f" | {kl['mean']:.4f} |")
        lines.append("")
    lines += ["## The default, chosen on dev", "", f"Rule: {choice['rule']}", ""]
    lines += [f"* `{m}`: dev feedback macro vs ablation {v['dev_feedback_macro_vs_ablation']:+.2f}, dev "
              f"rest micro vs ablation {v['dev_rest_micro_vs_ablation']:+.2f}"
              for m, v in choice["dev_scores"].items()]
    lines += ["", f"Chosen: **`{choice['chosen']}`** ({choice['config']}).", "",
              "Goal on test for the chosen method (feedback macro-F1 ≥ +2 points over the ablation; rest "
              "micro-F1 no more than 0.5 points below it), mean over seeds:", ""]
    for name, goal in report["goals"].items():
        lines.append(f"* {name}: feedback {goal['feedback_macro_vs_ablation']:+.2f} "
                     f"(**{'met' if goal['feedback_goal_met'] else 'NOT met'}**), rest micro "
                     f"{goal['rest_micro_vs_ablation']:+.2f} "
                     f"(**{'met' if goal['rest_goal_met'] else 'NOT met'}**)")
    lines += ["", f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores (shared), "
              f"{s['threads']} torch thread; total {report['seconds']:.0f} s. Command: `make bench-grpo`.",
              "", f"![effects]({report['image']})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the results."""
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    names, methods = args.datasets.split(","), args.methods.split(",")
    for name in names:
        if name not in DATASETS or not (args.data_root / name / "docs.jsonl").is_file():
            print(f"error: {args.data_root / name}/docs.jsonl not found or not configured", file=sys.stderr)
            return 2
    seeds = [int(x) for x in args.seeds.split(",")]
    seed_runs = [run_seed(args, name, seed, methods) for name in names for seed in seeds]
    table = summarise(seed_runs, methods)
    choice = choose_on_dev(table, methods)
    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {"machine": machine(), "setup": setup,
              "methods": methods, "table": table, "choice": choice, "goals": goals(table, choice["chosen"]),
              "seed_runs": seed_runs, "seconds": round(time.perf_counter() - started, 1)}
    write_outputs(args.out, "grpo_forgetting", report, markdown,
                  lambda report, path: plot(table, methods, path), plot_key="image", indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
