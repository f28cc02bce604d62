"""labelmatch against SetFit, side by side, from a few labelled documents per label to the full split.

SetFit (contrastive fine-tuning of a sentence encoder, then a logistic-regression head) is what a
user with a few labelled examples per label picks. Both start from the same encoder: the MiniLM
bundled with labelmatch (``bundled:minilm``, resolved to its local directory; no model hub).

For each dataset, training size and seed, one **cell**:

* **data**: the official test split, whole. From the official train split, a seeded validation set
  (``--val-per-label`` documents per label, never more than half of a label's documents), then a
  seeded training set of ``8``, ``16`` or ``64`` documents per label, or every remaining document
  (``full``). Multi-label documents are drawn rarest label first until each label has its quota.
  CLINC150 and Bitext carry ``[category, intent]``: the intent is the single label here (the
  categories are dropped), scored by accuracy (top-1) and macro-F1; Reuters-21578 is multi-label,
  scored by micro- and macro-F1.
* **labelmatch**: ``train_sft`` with bench-suite's settings (the library defaults, at most
  ``--epochs`` validations kept by validation macro-F1, patience 1; its thresholds tuned on
  validation), starting from the general zero-shot adapter trained *without* the cell's dataset
  (``--base-adapter held-out``, from ``make bench-general-adapter``; the shipped adapter saw these
  datasets' training splits) or from a fresh adapter (``none``).
  Single-label: its top-1 label; multi-label: its thresholded decisions.
* **SetFit** (``setfit``; ``pip install -e '.[bench]'``): its documented defaults
  (``TrainingArguments()``: batch 16, one epoch over the pairs that ``sampling_strategy=
  "oversampling"`` draws when ``num_iterations`` is unset, CosineSimilarityLoss, logistic-regression
  head), ``multi_target_strategy="one-vs-rest"`` for multi-label data, whose global decision
  threshold is tuned on validation (the rule bench-suite gives its baselines). Single-label: the
  head's top class. Where the defaults' step count would not finish in two hours on two cores,
  ``--setfit-max-steps`` caps it; every cell records the defaults' steps and the steps run.
* **new labels** (labelmatch only): a share of the labels (``--new-label-share``, seeded) is taken
  out of training (their names dropped from the documents, documents left without a label dropped);
  after training, those labels are added by their descriptions and scored among all labels on the
  test documents that carry them: top-1 accuracy (single-label) or macro-F1 over the new labels
  (multi-label, at the trained model's global threshold), beside the untrained encoder's figure.
  SetFit cannot: its head has one output per label it was trained on.

Each training runs in a process of its own (wall time and peak RSS its own, ``common.measure``);
its result is written to ``<records>/cells/<dataset>-<size>-s<seed>-<method>.json`` as it ends and
a later run skips every cell whose file exists (resume). ``--records`` is tracked
(``bench/results/peers_runs``): a new checkout keeps every seed run so far, and the report is
combined from all of them; only the models stay under ``--work``. Predict speed, per dataset, of what each
ships: labelmatch's ONNX export (``export_onnx``, the engine its probe picks) and SetFit's saved
model, on the same ``--speed-docs`` test documents, each in its own process (labelmatch in torch
too, for reference); the models of the first size and seed of the run.

Writes ``peers.json``, ``peers.md`` and ``peers.png`` under ``--out``: mean ± half-range over seeds,
and for every cell whether labelmatch meets the goal: at or above SetFit on both metrics with up
to 64 documents per label, above it on both with the full split.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from bench_suite import DATA, _metrics, dual_encoder_config
from bench_transfer import _eval_set, _hierarchy, _leaf_docs, score, val_threshold
from common import cpu_text, machine, mean_spread, measure, write_outputs

from labelmatch.evaluation.report import pyplot

DATASETS = ("clinc150", "bitext_customer_support", "reuters21578_modapte")
SIZES = ("8", "16", "64", "full")
METHODS = ("labelmatch", "setfit")
NEW_LABELS = "labelmatch_new_labels"
#: Sizes at which labelmatch must be at or above SetFit; above it elsewhere (the full split).
FEW = {"8", "16", "64"}
#: SetFit's step caps (``--setfit-max-steps``): about two hours of its contrastive phase on two
#: cores. Measured with one thread on a shared 2-core Xeon: 0.42 s a step on Bitext's short
#: queries, 8.4 s on Reuters' pairs of 256 tokens; two threads taken as 1.7x faster, less room for
#: the head and the scoring. The defaults would take 2,808 steps on Bitext at 8 per label (not
#: capped) but 89,400 on CLINC150 and 5,948 on Reuters at 8 per label, millions on the full splits.
SETFIT_MAX_STEPS = "clinc150=20000,bitext_customer_support=20000,reuters21578_modapte=1200"
#: labelmatch's schedule in the cells recorded before cells stored it (the library's defaults then).
UNRECORDED_SCHEDULE = "epochs 3, min_steps 200 (before cells recorded their schedule)"
#: Labels with fewer official training documents are never held out as new labels.
MIN_NEW_LABEL_DOCS = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-peers"), help="The models.")
    parser.add_argument("--records", type=Path, default=Path("bench/results/peers_runs"),
                        help="Each cell's and speed run's result (tracked; resume: recorded ones are "
                             "skipped).")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--sizes", default=",".join(SIZES), help="Documents per label, or 'full'.")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--val-per-label", type=int, default=4,
                        help="Validation documents per label, carved from the official train split.")
    parser.add_argument("--epochs", type=int, default=3, help="labelmatch: most epochs (early stopping).")
    parser.add_argument("--max-length", type=int, default=96, help="labelmatch: training tokens per text.")
    parser.add_argument("--setfit-max-steps", default=SETFIT_MAX_STEPS,
                        help="Cap on SetFit's contrastive steps where its defaults would run more: N for "
                             "every dataset or 'dataset=N,...'; '' runs the defaults uncapped.")
    parser.add_argument("--setfit-num-iterations", type=int, default=None,
                        help="SetFit's num_iterations (unset: its default, oversampling every pair).")
    parser.add_argument("--new-label-share", type=float, default=0.1,
                        help="Share of labels held out of training and added afterwards (0: no column).")
    parser.add_argument("--speed-docs", type=int, default=256,
                        help="Test documents timed for predict docs/s.")
    parser.add_argument("--base-adapter", default="held-out", choices=("held-out", "none"),
                        help="labelmatch's starting adapter: the general adapter trained without the "
                             "dataset (bench-general-adapter's), or a fresh one.")
    parser.add_argument("--adapters", type=Path, default=Path("runs/general-adapter"),
                        help="bench_general_adapter.py's --work.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of every run.")
    parser.add_argument("--note", default="", help="A sentence for the report (what shared the machine).")
    parser.add_argument("--combine-only", action="store_true",
                        help="Run nothing: combine the cells recorded under --records into the report.")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------- data


def single_level(name: str) -> Any:
    """The dataset with the intents as its only labels where it has a category → intent hierarchy.

    Args:
        name: A directory under the shared data.

    Returns:
        A :class:`labelmatch.data.dataset.Dataset` (all splits, no hierarchy).
    """
    from labelmatch.data.dataset import Dataset, load_dataset

    full = load_dataset(DATA / name)
    if full.hierarchy is None:
        return full
    leaves = {intent for intents in _hierarchy(name).values() for intent in intents}
    return Dataset(_leaf_docs(full, leaves), {k: v for k, v in full.labels.items() if k in leaves})


def sample_per_label(docs: list[Any], per_label: int, rng: random.Random, share: float = 1.0) -> list[Any]:
    """A seeded sample that gives every label ``per_label`` documents where it can.

    Labels are filled rarest first, from a seeded shuffle; a multi-label document counts for every
    label it carries, so common labels may end above their quota. Single-label documents get
    exactly ``per_label`` each (or all a label has).

    Args:
        docs: The documents to draw from.
        per_label: Documents wanted per label.
        rng: The seeded generator.
        share: At most this share of any label's documents is drawn (rounded down), counting the
            labels a document brings along with the one being filled.

    Returns:
        The chosen documents.
    """
    counts = Counter(label for doc in docs for label in doc.labels)
    limit = {label: int(n * share) for label, n in counts.items()}
    shuffled = list(docs)
    rng.shuffle(shuffled)
    chosen: dict[str, Any] = {}
    have: Counter[str] = Counter()
    for label in sorted(counts, key=lambda name: (counts[name], name)):
        for doc in (d for d in shuffled if label in d.labels and d.id not in chosen):
            if have[label] >= min(per_label, limit[label]):
                break
            if all(have[x] < limit[x] for x in doc.labels):
                chosen[doc.id] = doc
                have.update(doc.labels)
    return list(chosen.values())


def carve(name: str, size: str, seed: int, val_per_label: int) -> Any:
    """One cell's data: validation and training sampled from the official train split, test whole.

    Args:
        name: The dataset.
        size: Training documents per label, or ``full`` (every document validation left).
        seed: The sampling seed.
        val_per_label: Validation documents per label.

    Returns:
        A Dataset with ``train``, ``val`` and ``test`` splits.
    """
    from labelmatch.data.dataset import Dataset, Document

    full = single_level(name)
    rng = random.Random(seed)
    pool = [d for d in full.documents if d.split != "test"]
    val = sample_per_label(pool, val_per_label, rng, share=0.5)
    taken = {d.id for d in val}
    rest = [d for d in pool if d.id not in taken]
    train = rest if size == "full" else sample_per_label(rest, int(size), rng)
    test = [d for d in full.documents if d.split == "test"]
    parts = (("train", train), ("val", val), ("test", test))
    docs = [Document(d.id, d.text, d.labels, split=split) for split, part in parts for d in part]
    return Dataset(docs, full.labels)


def is_single_label(dataset: Any) -> bool:
    """Whether every document carries exactly one label."""
    return all(len(doc.labels) == 1 for doc in dataset.documents)


def new_labels(name: str, seed: int, share: float) -> list[str]:
    """The labels held out of training for the new-labels column (seeded; never rare ones).

    Args:
        name: The dataset.
        seed: The seed (the same labels at every size of this seed).
        share: Share of all labels to hold out (at least two).

    Returns:
        Label names, in the dataset's order.
    """
    full = single_level(name)
    counts = Counter(label for doc in full.documents if doc.split != "test" for label in doc.labels)
    candidates = [label for label in full.labels if counts[label] >= MIN_NEW_LABEL_DOCS]
    chosen = set(random.Random(seed).sample(candidates, max(2, round(share * len(full.labels)))))
    return [label for label in full.labels if label in chosen]


def without_labels(dataset: Any, held: list[str]) -> Any:
    """``dataset``'s train and val splits with the ``held`` labels taken out of the label set."""
    from labelmatch.data.dataset import Dataset, Document

    docs = [Document(d.id, d.text, [x for x in d.labels if x not in held], split=d.split)
            for d in dataset.documents if d.split in ("train", "val")]
    labels = {k: v for k, v in dataset.labels.items() if k not in held}
    return Dataset([d for d in docs if d.labels], labels)


# -------------------------------------------------------------------------------------------- metrics


def top1_metrics(targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 of the highest-scoring label of single-label documents."""
    from sklearn.metrics import f1_score

    true, predicted = targets.argmax(1), probs.argmax(1)
    labels = list(range(targets.shape[1]))
    return {"accuracy": float((true == predicted).mean()),
            "macro_f1": float(f1_score(true, predicted, labels=labels, average="macro", zero_division=0))}


def headline(single_label: bool) -> tuple[str, str]:
    """The two metrics of a dataset: accuracy or micro-F1, then macro-F1."""
    return ("accuracy" if single_label else "micro_f1", "macro_f1")


def limit_threads(threads: int) -> None:
    """Every library of this process on ``threads`` CPU threads."""
    import torch

    torch.set_num_threads(threads)


def describe(dataset: Any) -> dict[str, Any]:
    """Sizes of a cell's data, for its record."""
    return {"labels": len(dataset.labels), "single_label": is_single_label(dataset),
            **{f"{split}_docs": len(dataset.split(split).documents) for split in ("train", "val", "test")}}


# ----------------------------------------------------------------------------------- labelmatch runs


def peers_config(name: str, args: argparse.Namespace, seed: int) -> Any:
    """bench-suite's ``TrainConfig``, starting from ``--base-adapter`` (``held-out``: the general
    adapter trained without this dataset, as a user's data is new to the adapter that ships)."""
    start = args.base_adapter
    if start == "held-out":
        from bench_general_adapter import held_out_adapter

        start = held_out_adapter(args.adapters, name)
    return dual_encoder_config(name, args, seed, base_adapter=start)


def run_labelmatch(name: str, size: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train labelmatch on one cell (own process) and score the test split once."""
    from labelmatch.evaluation.evaluate import evaluate, score_split
    from labelmatch.model.classifier import Classifier
    from labelmatch.training.sft import train_sft

    limit_threads(args.threads)
    dataset = carve(name, size, seed, args.val_per_label)
    out = model_dir(args, name, size, seed, "labelmatch")
    started = time.perf_counter()
    config = peers_config(name, args, seed)
    trainer = train_sft(dataset, config, out)
    train_s = time.perf_counter() - started
    clf = Classifier.load(out)
    if is_single_label(dataset):
        metrics = top1_metrics(*score_split(clf, dataset, "test"))
    else:
        scored = evaluate(clf, dataset, "test")
        metrics = {"micro_f1": scored["micro_f1"], "macro_f1": scored["macro_f1"]}
    best = max(trainer.history, key=lambda row: row["val_macro_f1"])
    return {**describe(dataset), **metrics, "train_s": round(train_s, 1), "steps": trainer.step,
            "planned_steps": trainer.total_steps, "schedule": schedule_of(config),
            "start_adapter": start_adapter_digest(config),
            "best_epoch": best["epoch"], "val_macro_f1": best["val_macro_f1"]}


def schedule_of(config: Any) -> str:
    """labelmatch's schedule settings of a cell, as one phrase (recorded with the cell)."""
    ceiling = config.max_lengthened_epochs
    return (f"epochs {config.epochs}, min_steps {config.min_steps}"
            + (f" (at most {ceiling:g} passes)" if ceiling is not None and config.min_steps else ""))


def start_adapter_digest(config: Any) -> str | None:
    """The artifact digest of the adapter a cell started from (``None`` for a fresh one): the
    held-out adapters live under runs/ and are rebuilt by a new checkout, so each cell says which
    one it started from."""
    from labelmatch.core.artifacts import artifact_digest

    start = config.base_adapter
    return artifact_digest(start) if start and start != "none" and Path(start).is_dir() else None


def run_new_labels(name: str, size: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train labelmatch without some labels, then add them by description and score them (own process).

    Returns:
        The new labels, the metric on their test documents among all labels (``top1_accuracy`` or
        ``macro_f1``) of the trained model and of the untrained encoder, the training time and the
        steps run and planned (records before these fields have neither).
    """
    from labelmatch.data.dataset import Document
    from labelmatch.model.classifier import Classifier
    from labelmatch.training.sft import train_sft

    limit_threads(args.threads)
    dataset = carve(name, size, seed, args.val_per_label)
    held = new_labels(name, seed, args.new_label_share)
    seen = without_labels(dataset, held)
    out = model_dir(args, name, size, seed, NEW_LABELS)
    started = time.perf_counter()
    config = peers_config(name, args, seed)
    trainer = train_sft(seen, config, out)
    train_s = time.perf_counter() - started
    test = dataset.split("test").documents
    docs = [Document(d.id, d.text, [x for x in d.labels if x in held]) for d in test]
    evalset = _eval_set("new_labels", [d for d in docs if d.labels], dataset.labels)
    metric = "top1_accuracy" if is_single_label(dataset) else "macro_f1"
    trained = Classifier.load(out)
    untrained = Classifier.zero_shot(seen.labels, max_length=trained.encoder.max_length, base_adapter="none")
    return {"new_labels": held, "metric": metric, "test_docs": len(evalset.texts),
            "train_s": round(train_s, 1), "steps": trainer.step, "planned_steps": trainer.total_steps,
            "schedule": schedule_of(config), "start_adapter": start_adapter_digest(config),
            "trained": score(trained, trained.thresholds.default, evalset)[metric],
            "untrained": score(untrained, val_threshold(untrained, seen), evalset)[metric]}


# --------------------------------------------------------------------------------------- SetFit runs


def setfit_default_steps(targets: np.ndarray, num_iterations: int | None = None) -> int:
    """The contrastive steps SetFit's defaults take on these training targets.

    SetFit pairs every document with every other and itself (``shuffle_combinations``); a pair is
    positive when the two share a label. ``oversampling`` repeats the smaller side up to the larger,
    so an epoch is ``2 · max(positive, negative)`` pairs; ``num_iterations`` gives ``2 · it · n``.

    Args:
        targets: ``(documents, labels)`` 0/1 matrix of the training split.
        num_iterations: SetFit's ``num_iterations`` (``None``: its default).

    Returns:
        Optimisation steps of the embedding phase (its batch size and epochs).
    """
    from setfit import TrainingArguments

    defaults = TrainingArguments()
    n = targets.shape[0]
    if num_iterations:
        pairs = 2 * num_iterations * n
    else:
        y = targets.astype(np.float32)
        shared = sum(int((y[i : i + 2048] @ y.T > 0).sum()) for i in range(0, n, 2048))
        positive = (shared + int((y.sum(1) > 0).sum())) // 2  # i <= j, the diagonal once
        pairs = 2 * max(positive, n * (n + 1) // 2 - positive)
    return math.ceil(pairs / defaults.embedding_batch_size) * defaults.embedding_num_epochs


def setfit_cap(spec: str, name: str) -> int | None:
    """The step cap ``--setfit-max-steps`` sets for ``name`` (``None``: uncapped)."""
    if not spec.strip():
        return None
    if "=" not in spec:
        return int(spec)
    caps = dict(part.split("=", 1) for part in spec.split(",") if part)
    return int(caps[name]) if name in caps else None


def setfit_targets(dataset: Any) -> list[Any]:
    """SetFit's ``label`` column: class indices (single-label) or 0/1 rows (multi-label)."""
    matrix = dataset.label_matrix().astype(int)
    return [int(row.argmax()) for row in matrix] if is_single_label(dataset) else matrix.tolist()


def setfit_probs(model: Any, texts: list[str], n_labels: int) -> np.ndarray:
    """``(documents, labels)`` probabilities of a SetFit model, columns in the dataset's label order."""
    probs = np.asarray(model.predict_proba(texts, as_numpy=True), dtype=np.float32)
    if model.multi_target_strategy:
        return probs
    out = np.zeros((len(texts), n_labels), dtype=np.float32)
    out[:, np.asarray(model.model_head.classes_, dtype=int)] = probs
    return out


def new_setfit(single_label: bool) -> Any:
    """An untrained SetFitModel on the bundled MiniLM (its local directory: no hub)."""
    from setfit import SetFitModel

    from labelmatch.model.encoder import DEFAULT_BASE_MODEL, resolve_base_model

    strategy = None if single_label else "one-vs-rest"
    return SetFitModel.from_pretrained(resolve_base_model(DEFAULT_BASE_MODEL), multi_target_strategy=strategy)


def run_setfit(name: str, size: str, seed: int, args: argparse.Namespace, keep: bool) -> dict[str, Any]:
    """Train SetFit with its defaults on one cell (own process) and score the test split once.

    Args:
        name: The dataset.
        size: Training documents per label, or ``full``.
        seed: The cell's seed (data and SetFit's ``seed``).
        args: The command line.
        keep: Save the trained model (for the speed measurement).
    """
    from datasets import Dataset as HFDataset
    from setfit import Trainer, TrainingArguments

    limit_threads(args.threads)
    dataset = carve(name, size, seed, args.val_per_label)
    single, train = is_single_label(dataset), dataset.split("train")
    texts, targets = [d.text for d in train.documents], setfit_targets(train)
    default_steps = setfit_default_steps(train.label_matrix(), args.setfit_num_iterations)
    cap = setfit_cap(args.setfit_max_steps, name)
    capped = cap is not None and default_steps > cap
    training = TrainingArguments(output_dir=str(model_dir(args, name, size, seed, "setfit-checkpoints")),
                                 seed=seed, max_steps=cap if capped else -1, report_to="none",
                                 save_strategy="no", show_progress_bar=False,
                                 num_iterations=args.setfit_num_iterations)
    model = new_setfit(single)
    columns = HFDataset.from_dict({"text": texts, "label": targets})
    trainer = Trainer(model=model, args=training, train_dataset=columns)
    started = time.perf_counter()
    trainer.train_embeddings(texts, targets, args=training)
    embed_s = time.perf_counter() - started
    trainer.train_classifier(texts, targets, args=training)
    train_s = time.perf_counter() - started
    steps = trainer.st_trainer.state.global_step
    if keep:
        model.save_pretrained(str(model_dir(args, name, size, seed, "setfit")))
    test = dataset.split("test")
    test_probs = setfit_probs(model, [d.text for d in test.documents], len(dataset.labels))
    if single:
        metrics = top1_metrics(test.label_matrix(), test_probs)
    else:
        val_probs = setfit_probs(model, [d.text for d in dataset.split("val").documents], len(dataset.labels))
        metrics = _metrics(dataset, val_probs, test_probs)
    return {**describe(dataset), **metrics, "train_s": round(train_s, 1), "steps": steps,
            "default_steps": default_steps, "capped": capped, "s_per_step": round(embed_s / max(steps, 1), 4),
            "default_hours_estimate": round(default_steps * embed_s / max(steps, 1) / 3600, 1)}


# ------------------------------------------------------------------------------------------- speed


def speed_texts(name: str, n: int) -> list[str]:
    """``n`` test documents of ``name`` (seeded), the same for every method."""
    test = [d.text for d in single_level(name).documents if d.split == "test"]
    return random.Random(0).sample(test, min(n, len(test)))


def docs_per_s(predict: Any, texts: list[str]) -> float:
    """Documents per second of ``predict(texts)`` after a short warm-up."""
    predict(texts[:8])
    started = time.perf_counter()
    predict(texts)
    return round(len(texts) / (time.perf_counter() - started), 1)


def speed_labelmatch(name: str, args: argparse.Namespace, source: Path, size: str,
                     seed: int) -> dict[str, Any]:
    """labelmatch's shipped predict speed: export the model to ONNX as the pipeline does, time it
    (and the torch model it came from), own process."""
    from labelmatch.export.onnx import ExportConfig, export_onnx
    from labelmatch.model.classifier import Classifier
    from labelmatch.runtime.onnx_classifier import OnnxClassifier, OrtConfig

    limit_threads(args.threads)
    texts = speed_texts(name, args.speed_docs)
    onnx_dir = source.parent / f"{source.name}-onnx"
    parity = export_onnx(source, onnx_dir, ExportConfig(probe_threads=args.threads),
                         carve(name, size, seed, args.val_per_label))
    shipped = OnnxClassifier.load(onnx_dir, OrtConfig(intra_op_threads=args.threads))
    return {"docs": len(texts), "engine": parity["served"]["engine"],
            "docs_per_s": docs_per_s(shipped.predict, texts),
            "torch_docs_per_s": docs_per_s(Classifier.load(source).predict, texts)}


def speed_setfit(name: str, args: argparse.Namespace, source: Path) -> dict[str, Any]:
    """SetFit's predict speed: its saved model, loaded as a user would, own process."""
    from setfit import SetFitModel

    limit_threads(args.threads)
    texts = speed_texts(name, args.speed_docs)
    return {"docs": len(texts), "engine": "torch (SetFitModel)",
            "docs_per_s": docs_per_s(SetFitModel.from_pretrained(str(source)).predict, texts)}


# ------------------------------------------------------------------------------------- orchestration


def model_dir(args: argparse.Namespace, name: str, size: str, seed: int, method: str) -> Path:
    """Where one cell's model of ``method`` is kept."""
    return args.work / "models" / f"{name}-{size}-s{seed}-{method}"


def cell_file(args: argparse.Namespace, name: str, size: str, seed: int, method: str) -> Path:
    """One cell's result file (its presence skips the cell on a later run)."""
    return args.records / "cells" / f"{name}-{size}-s{seed}-{method}.json"


def run_cell(args: argparse.Namespace, cell: tuple[str, str, int, str], progress: str) -> None:
    """Run one cell's method in its own process unless its result exists; write the result."""
    name, size, seed, method = cell
    path = cell_file(args, *cell)
    if path.is_file():
        print(f"{progress} {path.stem}: done earlier, skipped", flush=True)
        return
    print(f"{progress} {path.stem}: running", flush=True)
    calls = {"labelmatch": (run_labelmatch, ()), NEW_LABELS: (run_new_labels, ()),
             "setfit": (run_setfit, (seed == first_seed(args) and size == first_size(args),))}
    fn, extra = calls[method]
    try:
        result = measure(path.stem, fn, name, size, seed, args, *extra)
    except RuntimeError as exc:
        print(f"{progress} {path.stem}: failed ({exc}); no result written", flush=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"dataset": name, "size": size, "seed": seed, "method": method, "settings": settings(args),
              "machine": machine()}
    path.write_text(json.dumps({**record, **result}, indent=2) + "\n")


def first_seed(args: argparse.Namespace) -> int:
    """The seed whose models are timed for predict speed."""
    return int(args.seeds.split(",")[0])


def first_size(args: argparse.Namespace) -> str:
    """The size whose models are timed for predict speed."""
    return args.sizes.split(",")[0]


def run_speed(args: argparse.Namespace, name: str, methods: list[str]) -> None:
    """Predict docs/s of each method's shipped model of ``name`` (first size and seed), once."""
    size, seed = first_size(args), first_seed(args)
    for method in methods:
        path = args.records / "speed" / f"{name}-{method}.json"
        source = model_dir(args, name, size, seed, method)
        if path.is_file() or not source.is_dir():
            why = "done earlier" if path.is_file() else f"no model at {source}"
            print(f"speed {name}/{method}: {why}", flush=True)
            continue
        extra = (size, seed) if method == "labelmatch" else ()
        fn = speed_labelmatch if method == "labelmatch" else speed_setfit
        try:
            result = measure(f"speed {name}/{method}", fn, name, args, source, *extra)
        except RuntimeError as exc:
            print(f"speed {name}/{method}: failed ({exc})", flush=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"size": size, "seed": seed, "machine": machine(), **result}
        path.write_text(json.dumps(record, indent=2) + "\n")


def cells(args: argparse.Namespace, methods: list[str]) -> list[tuple[str, str, int, str]]:
    """Every (dataset, size, seed, method) the command line asks for, in running order."""
    runs = [*methods, *([NEW_LABELS] if "labelmatch" in methods and args.new_label_share > 0 else [])]
    return [(name, size, int(seed), method) for name in args.datasets.split(",")
            for size in args.sizes.split(",") for seed in args.seeds.split(",") for method in runs]


# -------------------------------------------------------------------------------------------- report


def load_cells(records: Path) -> dict[tuple[str, str], dict[str, list[dict[str, Any]]]]:
    """Every recorded cell result: ``{(dataset, size): {method: [run per seed]}}``."""
    grouped: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    for path in sorted((records / "cells").glob("*.json")):
        run = json.loads(path.read_text())
        grouped.setdefault((run["dataset"], run["size"]), {}).setdefault(run["method"], []).append(run)
    return grouped


def summarise_method(runs: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """Mean ± half-range over seeds of ``keys`` (those the runs have) and the seeds."""
    present = [k for k in keys if k in runs[0]]
    return {"seeds": sorted(r["seed"] for r in runs),
            **{k: mean_spread([r[k] for r in runs]) for k in present}}


#: Seeds a cell needs on both sides for a final verdict (fewer: provisional).
FULL_SEEDS = 3


def goal(size: str, by_method: dict[str, list[dict[str, Any]]],
         metrics: tuple[str, str]) -> dict[str, Any] | None:
    """Whether labelmatch meets the goal against SetFit in one cell, over the seeds both ran
    (``None`` without both); ``provisional`` while fewer than :data:`FULL_SEEDS` are paired."""
    runs = {m: {r["seed"]: r for r in by_method.get(m, [])} for m in METHODS}
    paired = sorted(set(runs["labelmatch"]) & set(runs["setfit"]))
    if not paired:
        return None
    per_seed = {m: [float(runs["labelmatch"][s][m] - runs["setfit"][s][m]) for s in paired] for m in metrics}
    margins = {m: float(np.mean(v)) for m, v in per_seed.items()}
    few = size in FEW
    met = all(v >= 0 for v in margins.values()) if few else all(v > 0 for v in margins.values())
    return {"rule": "at or above SetFit" if few else "above SetFit", "met": met, "margins": margins,
            "per_seed": per_seed, "test_docs": runs["labelmatch"][paired[0]].get("test_docs"),
            "seeds": paired, "provisional": len(paired) < FULL_SEEDS}


def accuracy_noise(accuracy: float, docs: int) -> float:
    """One binomial standard error of an accuracy measured on ``docs`` test documents: how much the
    test split alone moves a figure, before any difference between the methods."""
    return float(np.sqrt(accuracy * (1 - accuracy) / docs))


def unmet_lines(cells: dict[str, dict[str, Any]]) -> list[str]:
    """For each cell whose goal is not met (all its seeds paired), the margin on each paired seed and,
    for accuracy, that margin in test documents beside the test split's own standard error."""
    lines = []
    for label, cell in judged(cells):
        result = cell["goal"]
        if result["met"]:
            continue
        seeds = ", ".join(str(s) for s in result["seeds"])
        parts = [f"{metric.replace('_', '-')} " + ", ".join(f"{v:+.3f}" for v in values)
                 for metric, values in result["per_seed"].items()]
        text = f"Not met, {label}: labelmatch minus SetFit on seeds {seeds}: {'; '.join(parts)}"
        docs = result.get("test_docs")
        if "accuracy" in result["per_seed"] and docs:
            counts = ", ".join(f"{v * docs:+.0f}" for v in result["per_seed"]["accuracy"])
            noise = accuracy_noise(cell["methods"]["setfit"]["accuracy"]["mean"], docs)
            text += (f" (accuracy in documents of {docs:,} on the test split: {counts}; one binomial "
                     f"standard error of either method's accuracy there: {noise:.3f}, "
                     f"{noise * docs:.1f} documents)")
        lines.append(text + ".")
    return lines


def summarise(records: Path) -> dict[str, dict[str, Any]]:
    """Per dataset and size: each method's summary, SetFit's steps, new labels and the goal."""
    order = {s: i for i, s in enumerate(SIZES)}
    out: dict[str, dict[str, Any]] = {}
    recorded = sorted(load_cells(records).items(), key=lambda kv: (kv[0][0], order[kv[0][1]]))
    for (name, size), by_method in recorded:
        first = next(iter(by_method.values()))[0]
        metrics = headline(first.get("single_label", True))
        keys = (*metrics, "train_s", "wall_s", "peak_rss_mb", "train_docs", "steps", "default_steps",
                "s_per_step", "default_hours_estimate")
        methods = {m: summarise_method(runs, keys) for m, runs in by_method.items() if m in METHODS}
        cell: dict[str, Any] = {"metrics": list(metrics), "labels": first.get("labels"), "methods": methods,
                                "goal": goal(size, by_method, metrics),
                                "cpus": {m: sorted({run_cpu(r) for r in runs})
                                         for m, runs in by_method.items() if m in METHODS}}
        if "setfit" in by_method:
            cell["setfit_capped"] = any(r["capped"] for r in by_method["setfit"])
        schedules = {r.get("schedule", UNRECORDED_SCHEDULE) for m in ("labelmatch", NEW_LABELS)
                     for r in by_method.get(m, [])}
        if schedules:
            cell["labelmatch_schedules"] = sorted(schedules)
        if NEW_LABELS in by_method:
            runs = by_method[NEW_LABELS]
            cell["new_labels"] = {"metric": runs[0]["metric"], "labels": len(runs[0]["new_labels"]),
                                  **summarise_method(runs, ("trained", "untrained", "train_s"))}
        out.setdefault(name, {})[size] = cell
    return out


def load_speed(records: Path) -> dict[str, dict[str, Any]]:
    """Recorded predict speeds: ``{dataset: {method: result}}``."""
    speed: dict[str, dict[str, Any]] = {}
    for path in sorted((records / "speed").glob("*.json")):
        name, _, method = path.stem.rpartition("-")
        speed.setdefault(name, {})[method] = json.loads(path.read_text())
    return speed


def fmt(cell: dict[str, Any] | None, digits: int = 3) -> str:
    """``mean ± spread`` of a summarised value, or a dash."""
    if not cell:
        return "—"
    return f"{cell['mean']:.{digits}f} ± {cell['spread']:.{digits}f}"


def goal_text(result: dict[str, Any] | None) -> str:
    """One table cell saying whether the goal is met and by how much."""
    if result is None:
        return "— (needs both methods)"
    margins = ", ".join(f"{k.replace('_', '-')} {v:+.3f}" for k, v in result["margins"].items())
    verdict = f"{'met' if result['met'] else '**not met**'} ({result['rule']}: {margins})"
    if result.get("provisional"):
        seeds = ", ".join(str(s) for s in result["seeds"])
        verdict = f"provisional: {verdict}, paired seed{'s' if len(result['seeds']) > 1 else ''} {seeds} only"
    return verdict


def steps_text(cell: dict[str, Any]) -> str:
    """labelmatch's steps run, then SetFit's against its defaults' steps, marked where capped."""
    lm, setfit = cell["methods"].get("labelmatch"), cell["methods"].get("setfit")
    ours = f"{lm['steps']['mean']:,.0f}" if lm and "steps" in lm else "—"
    if not setfit:
        return f"{ours} / —"
    run, default = setfit["steps"]["mean"], setfit["default_steps"]["mean"]
    if not cell.get("setfit_capped"):
        return f"{ours} / {run:,.0f}"
    hours = setfit["default_hours_estimate"]["mean"]
    return f"{ours} / {run:,.0f} of {default:,.0f} (**capped**; the defaults ≈ {hours:,.1f} h)"


def schedule_lines(cells: dict[str, dict[str, Any]]) -> list[str]:
    """One line naming labelmatch's schedule settings and the cells that ran each."""
    where: dict[str, list[str]] = {}
    for name, sizes in cells.items():
        for size, cell in sizes.items():
            for schedule in cell.get("labelmatch_schedules", []):
                where.setdefault(schedule, []).append(f"{name} {size}")
    if not where:
        return []
    return ["labelmatch's schedule (its defaults; steps run in the steps column): " + "; ".join(
        f"{schedule} in {', '.join(names)}" for schedule, names in sorted(where.items())) + "."]


def new_labels_text(cell: dict[str, Any]) -> str:
    """labelmatch's new-label figure beside the untrained encoder's."""
    new = cell.get("new_labels")
    if not new:
        return "—"
    return f"{fmt(new['trained'])} (untrained {new['untrained']['mean']:.3f}; {new['labels']} labels)"


def table_row(name: str, size: str, cell: dict[str, Any]) -> str:
    """One Markdown row of the main table."""
    lm, sf = cell["methods"].get("labelmatch", {}), cell["methods"].get("setfit", {})
    first, second = cell["metrics"]
    docs = (lm or sf).get("train_docs")
    seconds = f"{fmt(lm.get('train_s'), 0)} / {fmt(sf.get('train_s'), 0)}{' †' if cpus_differ(cell) else ''}"
    rss = f"{fmt(lm.get('peak_rss_mb'), 0)} / {fmt(sf.get('peak_rss_mb'), 0)}"
    counts = sorted({len(m["seeds"]) for m in (lm, sf) if m}, reverse=True)
    seeds = " / ".join(str(len(m["seeds"])) if m else "0" for m in (lm, sf)) if len(counts) > 1 else counts[0]
    return (f"| {name} | {size} | {docs['mean']:,.0f} | {seeds} | {fmt(lm.get(first))} | "
            f"{fmt(sf.get(first))} | {fmt(lm.get(second))} | {fmt(sf.get(second))} | {seconds} | {rss} | "
            f"{steps_text(cell)} | {new_labels_text(cell)} | N/A | {goal_text(cell['goal'])} |")


def cpus_differ(cell: dict[str, Any]) -> bool:
    """Whether a cell's two methods ran on different CPUs (or one side's CPU is not recorded), so
    that their training times are not a side-by-side comparison."""
    cpus = cell["cpus"]
    return all(m in cpus for m in METHODS) and len({tuple(cpus[m]) for m in METHODS}) > 1


def timing_lines(cells: dict[str, dict[str, Any]]) -> list[str]:
    """A footnote naming the cells whose two training times were measured on different CPUs."""
    differ = [f"{name} {size} (labelmatch: {'; '.join(c['cpus']['labelmatch'])}; SetFit: "
              f"{'; '.join(c['cpus']['setfit'])})"
              for name, sizes in cells.items() for size, c in sizes.items() if cpus_differ(c)]
    if not differ:
        return []
    return ["† The two methods' training times were measured on different CPUs (or one side's CPU was "
            "not recorded), so their ratio is not a side-by-side figure: " + ", ".join(differ) + "."]


def judged(cells: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """``("<dataset> <size>", cell)`` for each cell with a final verdict (all its seeds paired)."""
    return [(f"{name} {size}", c) for name, sizes in cells.items() for size, c in sizes.items()
            if c["goal"] is not None and not c["goal"].get("provisional")]


def goal_summary(cells: dict[str, dict[str, Any]]) -> list[str]:
    """One line: in how many cells with both methods labelmatch meets the goal, naming the others."""
    final = judged(cells)
    early = [f"{name} {size} ({'met' if c['goal']['met'] else 'not met'} so far)"
             for name, sizes in cells.items() for size, c in sizes.items()
             if c["goal"] is not None and c["goal"].get("provisional")]
    missed = [label for label, c in final if not c["goal"]["met"]]
    text = (f"Goal (labelmatch at or above SetFit with up to 64 documents per label, above it with the full "
            f"split, on both metrics, over {FULL_SEEDS} paired seeds): met in {len(final) - len(missed)} of "
            f"{len(final)} cells")
    text += f"; not met: {', '.join(missed)}" if missed else ""
    return [text + (f"; provisional, fewer seeds paired: {', '.join(early)}." if early else ".")]


def speed_lines(speed: dict[str, dict[str, Any]]) -> list[str]:
    """The predict-speed table."""
    lines = ["| dataset | labelmatch shipped (ONNX, engine) docs/s | labelmatch torch docs/s | "
             "SetFit docs/s |", "|---|---|---|---|"]
    for name, by_method in speed.items():
        lm, sf = by_method.get("labelmatch"), by_method.get("setfit")
        shipped = f"{lm['docs_per_s']:.1f} ({lm['engine']})" if lm else "—"
        lines.append(f"| {name} | {shipped} | {lm['torch_docs_per_s'] if lm else '—'} | "
                     f"{sf['docs_per_s'] if sf else '—'} |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The Markdown report."""
    s = report["settings"]
    lines = [
        "# labelmatch vs SetFit, side by side",
        "",
        f"`make bench-peers` — the same bundled MiniLM under both; training documents per label as in "
        f"the second column (`full`: the whole official train split less validation); validation "
        f"{s['val_per_label']} documents per label carved from the train split (labelmatch's epochs and "
        "thresholds, SetFit's multi-label threshold); the official test split scored once per seed. "
        "CLINC150 and Bitext: the intent as the single label, accuracy (top-1) and macro-F1; Reuters: "
        "micro- and macro-F1. Mean ± half-range over seeds. "
        f"CPU of the runs: {', '.join(f'{cpu}: {n}' for cpu, n in report['cpus'].items())}; "
        f"{s['threads']} thread(s) a run.",
        "",
        f"SetFit: its documented defaults (`TrainingArguments()`, num_iterations "
        f"{s['setfit_num_iterations'] or 'unset: oversampling'}), one-vs-rest on Reuters. Step cap where "
        f"the defaults would not finish in two hours on two cores: `{s['setfit_max_steps'] or 'none'}`; "
        "**capped** cells say so with the defaults' step count.",
        "",
        "| dataset | per label | train docs | seeds | labelmatch acc./micro-F1 | SetFit acc./micro-F1 | "
        "labelmatch macro-F1 | SetFit macro-F1 | train s (labelmatch / SetFit) | "
        "peak RSS MB (labelmatch / SetFit) | steps (labelmatch / SetFit) | new labels: labelmatch | "
        "new labels: SetFit | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [table_row(name, size, cell) for name, sizes in report["cells"].items()
              for size, cell in sizes.items()]
    lines += ["", *goal_summary(report["cells"])]
    lines += ["", *unmet] if (unmet := unmet_lines(report["cells"])) else []
    lines += ["", *timing] if (timing := timing_lines(report["cells"])) else []
    lines += ["", *schedule] if (schedule := schedule_lines(report["cells"])) else []
    lines += ["", "New labels: labels held out of training, added afterwards by their descriptions and "
              "scored among all labels on their test documents (top-1 accuracy; Reuters: macro-F1 over "
              "the new labels at the trained model's global threshold), beside the untrained encoder. "
              "SetFit: N/A, its head has one output per label it was trained on and none for a label "
              "added later.", "",
              "Predict speed of what each ships (first size and seed of the run, "
              f"{s['speed_docs']} test documents, one call):", "", *speed_lines(report["speed"])]
    if len({r["method"] for r in report["recorded_settings"]}) < len(report["recorded_settings"]):
        lines += ["", "**Cells of one method were recorded under different settings** "
                  "(`recorded_settings` in peers.json): "
                  + "; ".join(f"`{json.dumps(r)}`" for r in report["recorded_settings"])]
    if s.get("note"):
        lines += ["", s["note"]]
    lines += ["", "![peers](peers.png)", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Both metrics against the training size, per dataset, labelmatch and SetFit."""
    plt = pyplot()

    names = list(report["cells"])
    if not names:
        return
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 6.5), squeeze=False)
    for col, name in enumerate(names):
        sizes = report["cells"][name]
        for row in range(2):
            ax = axes[row][col]
            for method in METHODS:
                points = [(i, c["methods"][method][c["metrics"][row]]) for i, c in enumerate(sizes.values())
                          if method in c["methods"]]
                if points:
                    ax.errorbar([i for i, _ in points], [v["mean"] for _, v in points],
                                yerr=[v["spread"] for _, v in points], marker="o", capsize=3, label=method)
            ax.set_xticks(range(len(sizes)), list(sizes))
            metric = next(iter(sizes.values()))["metrics"][row]
            ax.set_ylabel(metric.replace("_", "-"))
            ax.set_title(name if row == 0 else "", fontsize=9)
            ax.set_xlabel("documents per label" if row == 1 else "")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a cell's result depends on (recorded with it)."""
    return {k: getattr(args, k) for k in ("val_per_label", "epochs", "max_length", "setfit_max_steps",
                                          "setfit_num_iterations", "new_label_share", "threads",
                                          "base_adapter")}


#: Settings only SetFit's cells depend on; every other setting is labelmatch's, or both methods'.
SETFIT_ONLY = {"setfit_max_steps", "setfit_num_iterations"}
#: Settings SetFit's cells do not depend on (labelmatch's schedule, start and new-labels share).
LABELMATCH_ONLY = {"base_adapter", "epochs", "max_length", "new_label_share"}


def bearing_settings(cell: dict[str, Any]) -> dict[str, Any]:
    """The recorded settings that a cell's method depends on (the other method's left out), under
    ``method``: ``setfit``, or ``labelmatch`` for its cells and its new-labels cells."""
    setfit = cell["method"] == "setfit"
    ignored = LABELMATCH_ONLY if setfit else SETFIT_ONLY
    return {"method": "setfit" if setfit else "labelmatch",
            **{k: v for k, v in (cell.get("settings") or {}).items() if k not in ignored}}


def report_of(args: argparse.Namespace, started: float) -> dict[str, Any]:
    """The combined report of every cell recorded under ``--records`` (``recorded_settings``: each
    distinct set of settings the cells' methods depend on, per method)."""
    recorded = {json.dumps(bearing_settings(json.loads(path.read_text())), sort_keys=True)
                for path in (args.records / "cells").glob("*.json")}
    return {"machine": machine(), "settings": {**settings(args), "speed_docs": args.speed_docs,
                                               "note": args.note},
            "recorded_settings": [json.loads(s) for s in sorted(recorded)], "cells": summarise(args.records),
            "speed": load_speed(args.records), "cpus": run_cpus(args.records),
            "wall_s": round(time.perf_counter() - started, 1)}


def run_cpus(records: Path) -> dict[str, int]:
    """How many recorded runs (cells and speed runs) each CPU ran; ``not recorded`` for the runs
    recorded before records named their machine."""
    runs = [json.loads(path.read_text()) for path in sorted(records.glob("*/*.json"))]
    return dict(Counter(run_cpu(run) for run in runs).most_common())


def run_cpu(run: dict[str, Any]) -> str:
    """The CPU a recorded run names, or ``not recorded`` (runs recorded before records named it)."""
    return cpu_text(run["machine"]) if run.get("machine") else "not recorded"


def main(argv: list[str] | None = None) -> int:
    """Run the cells asked for (skipping recorded ones), the speed runs, then write the report."""
    args = parse_args(argv)
    started = time.perf_counter()
    methods = args.methods.split(",")
    if "setfit" in methods and not args.combine_only and importlib.util.find_spec("setfit") is None:
        print("bench_peers: setfit is not installed: .venv/bin/pip install -e '.[bench]' "
              "(or --methods labelmatch)", flush=True)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TQDM_MININTERVAL", "30")  # SetFit's step bars: a line every 30 s in a log
    todo = [] if args.combine_only else cells(args, methods)
    for i, cell in enumerate(todo, 1):
        run_cell(args, cell, f"[{i}/{len(todo)}]")
    for name in [] if args.combine_only else args.datasets.split(","):
        run_speed(args, name, [m for m in methods if m in METHODS])
    report = report_of(args, started)
    write_outputs(args.out, "peers", report, markdown, plot, plot_key=None, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
