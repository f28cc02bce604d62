"""PBT vs random search at equal compute on a real dataset (``make bench-tune``).

Both methods run the same number of trials for the same number of iterations from the same
seeded initial population (same hyper-parameters and LoRA ranks, same trainer seeds); PBT
additionally exploits (copies weights + optimizer of a better trial) and explores (perturbs its
hyper-parameters). Reported: best validation macro-F1, test macro-F1 of the best checkpoint
(per-label thresholds tuned on validation), compute (trial-iterations, steps, wall time), and the
trial-iterations PBT needed to reach random search's best validation F1.

Data: ``../shared/data/bitext_customer_support`` (38 labels: 11 categories + 27 intents, two
per document), subsampled with the dataset's own split: ``--train`` documents of its train split
(of which ``--val`` become the validation split, stratified) and ``--test`` of its test split.

Usage::

    python bench/bench_tune.py --out bench/results [--trials 4 --iterations 12 --steps 8 --quantile 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from labelmatch.config import TrainConfig
from labelmatch.data import Dataset, assign_splits, load_dataset
from labelmatch.tune import METRIC, TuneConfig, best_checkpoint, init_local_ray, run_tune
from labelmatch.tuning.history import build_history, plot_history, progress_frame

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bitext_customer_support"


def subsample(path: Path, train: int, val: int, test: int, seed: int) -> Dataset:
    """A stratified-enough random subsample keeping the dataset's train/test split."""
    full = load_dataset(path)
    rng = random.Random(seed)
    pools = {name: [d for d in full.documents if d.split == name] for name in ("train", "test")}
    picked = rng.sample(pools["train"], train) + rng.sample(pools["test"], test)
    # No val split yet: assign_splits carves it out of train, stratified.
    return assign_splits(Dataset(picked, full.labels), val_fraction=val / train, seed=seed)


def curve(results: Any) -> list[dict[str, Any]]:
    """Every report of every trial in the order it happened (for best-so-far curves)."""
    rows = []
    for result in results:
        frame = progress_frame(result)
        rows += [{"t": float(r["timestamp"]), "f1": float(r[METRIC]), "trial": str(r["trial_id"])}
                 for r in frame.to_dict("records")]
    rows.sort(key=lambda r: r["t"])
    best = -1.0
    for i, row in enumerate(rows, 1):
        best = max(best, row["f1"])
        row.update(trial_iterations=i, best_so_far=best)
    return rows


def test_f1(results: Any, dataset: Dataset, work: Path) -> dict[str, Any]:
    """Macro-F1 on the test split of the best checkpoint (by validation F1)."""
    from labelmatch.classifier import Classifier
    from labelmatch.evaluate import evaluate
    from labelmatch.train import SFTTrainer

    checkpoint, metrics = best_checkpoint(results)
    with checkpoint.as_directory() as directory:
        trainer = SFTTrainer.load_checkpoint(directory, dataset)
    trainer.save_model(work)
    test = evaluate(Classifier.load(work), dataset, "test")
    return {"best_val_macro_f1": float(metrics[METRIC]), "best_iteration": int(metrics["iteration"]),
            "best_lora_rank": trainer.config.lora_rank, "test_macro_f1": float(test["macro_f1"]),
            "test_micro_f1": float(test["micro_f1"])}


def run_method(scheduler: str, dataset: Dataset, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    config = TuneConfig(
        trials=args.trials, iterations=args.iterations, scheduler=scheduler, seed=args.seed, verbose=0,
        quantile_fraction=args.quantile, resample_probability=args.resample, name=f"bench-{scheduler}",
        storage_path=str(work / "ray_results"),
        train_config=TrainConfig(max_length=args.max_length, batch_size=16, steps_per_iteration=args.steps,
                                 eval_batch_size=128, progress=False),
    )
    started = time.perf_counter()
    results = run_tune(dataset, config, config.storage_path)
    wall = time.perf_counter() - started
    history = build_history(list(results))
    rows = curve(results)
    return {
        "results": results, "history": history, "curve": rows,
        "summary": {
            **test_f1(results, dataset, work / f"model-{scheduler}"),
            "trial_iterations": len(rows), "training_steps": len(rows) * args.steps,
            "wall_seconds": round(wall, 1), "exploits": len(history["exploits"]),
        },
    }


def plot_curves(pbt: list[dict], rnd: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for rows, name, colour in ((pbt, "PBT", "#4477aa"), (rnd, "random search", "#cc6677")):
        ax.step([r["trial_iterations"] for r in rows], [r["best_so_far"] for r in rows], where="post",
                label=name, color=colour)
    ax.axhline(max(r["f1"] for r in rnd), color="#cc6677", linestyle=":", label="random search best")
    ax.set_xlabel("trial-iterations done (compute)")
    ax.set_ylabel("best validation macro-F1 so far")
    ax.set_title("PBT vs random search at equal compute")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--trials", type=int, default=4)
    # Many short iterations: PBT perturbs after every iteration, so exploits start after a few
    # steps instead of a third of the budget; the total steps per trial stay 36 (as 6 x 6).
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--steps", type=int, default=8, help="steps per iteration")
    # With 4 trials, 0.5 means the bottom two copy the top two at every perturbation.
    parser.add_argument("--quantile", type=float, default=0.5, help="PBT quantile_fraction")
    parser.add_argument("--resample", type=float, default=0.25, help="PBT resample_probability")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray (1 per trial)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = subsample(args.data, args.train, args.val, args.test, args.seed)
    counts = {s: len(dataset.split(s).documents) for s in ("train", "val", "test")}
    work = Path(tempfile.mkdtemp(prefix="lmbt-", dir="/tmp"))
    os.environ.setdefault("RAY_TMPDIR", str(work))
    init_local_ray(num_cpus=args.num_cpus, temp_dir=str(work / "ray"))
    try:
        pbt = run_method("pbt", dataset, args, work)
        rnd = run_method("random", dataset, args, work)
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    target = max(r["f1"] for r in rnd["curve"])
    reached = next((r["trial_iterations"] for r in pbt["curve"] if r["f1"] >= target), None)
    budget = len(rnd["curve"])
    report = {
        "dataset": str(args.data.name), "splits": counts, "labels": len(dataset.labels),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "data")},
        "pbt": pbt["summary"], "random_search": rnd["summary"],
        "pbt_trial_iterations_to_reach_random_best_val": reached,
        "pbt_share_of_random_compute_to_reach_its_best": round(reached / budget, 3) if reached else None,
        "targets": {
            "pbt_ge_random_val": pbt["summary"]["best_val_macro_f1"] >= rnd["summary"]["best_val_macro_f1"],
            "pbt_reaches_random_best_within_60pct": bool(reached and reached <= 0.6 * budget),
        },
    }
    plot_curves(pbt["curve"], rnd["curve"], args.out / "tune_curve.png")
    plot_history(pbt["history"], args.out / "tune_pbt_history.png")
    (args.out / "tune.json").write_text(json.dumps(report, indent=2) + "\n")
    summary = markdown(report)
    report_path = args.out / "tune.md"
    report_path.write_text(summary + kept_notes(report_path))
    print(summary)


NOTES_HEADING = "## Why the 60% target is missed"


def kept_notes(path: Path) -> str:
    """The hand-written analysis below ``NOTES_HEADING`` of an earlier report, so a re-run keeps it."""
    if not path.exists():
        return ""
    text = path.read_text()
    start = text.find(NOTES_HEADING)
    return "" if start < 0 else "\n" + text[start:]


def markdown(report: dict[str, Any]) -> str:
    pbt, rnd = report["pbt"], report["random_search"]
    s, n = report["settings"], report["splits"]
    targets = report["targets"]
    lines = [
        "# Tuning: PBT vs random search at equal compute", "",
        f"Dataset `{report['dataset']}` ({report['labels']} labels), subsampled: {n['train']} train / "
        f"{n['val']} validation (stratified out of {s['train']} sampled from its train split) / "
        f"{n['test']} test (sampled from its test split); bundled MiniLM encoder, "
        f"max_length {s['max_length']}, CPU only (Ray with {s['num_cpus']} logical CPUs, 1 per trial, "
        "on a shared 2-core machine).", "",
        f"Both: {s['trials']} trials × {s['iterations']} iterations × {s['steps']} steps (batch 16), "
        "same seeded initial population (hyper-parameters and LoRA ranks) and trainer seeds; "
        f"PBT perturbs every iteration: the bottom {100 * s['quantile']:.0f}% copies the top "
        f"{100 * s['quantile']:.0f}% (weights + optimizer), then explores (×0.8/×1.2, or a redraw "
        f"with probability {s['resample']}).", "",
        "| | PBT | random search |", "|---|---|---|",
    ]
    for key in ("best_val_macro_f1", "test_macro_f1", "test_micro_f1", "best_lora_rank", "best_iteration",
                "trial_iterations", "training_steps", "wall_seconds", "exploits"):
        a, b = pbt[key], rnd[key]
        fmt = (lambda v: f"{v:.4f}") if isinstance(a, float) and key != "wall_seconds" else str
        lines.append(f"| {key} | {fmt(a)} | {fmt(b)} |")
    reached = report["pbt_trial_iterations_to_reach_random_best_val"]
    share = report["pbt_share_of_random_compute_to_reach_its_best"]
    lines += [
        "", f"PBT reached random search's best validation macro-F1 after **{reached}** trial-iterations "
        f"({share if share is None else f'{100 * share:.0f}%'} of random search's compute; "
        "target ≤ 60%).", "",
        "How compute is counted: every report (one iteration of one trial) of every trial, in the "
        "order they happened; PBT's count is the position of its first report whose validation "
        "macro-F1 is at least random search's best, random search's budget is all its reports.", "",
        f"Targets: PBT ≥ random (validation): {targets['pbt_ge_random_val']}; "
        f"≤ 60% compute to reach random's best: {targets['pbt_reaches_random_best_within_60pct']}.", "",
        "![best validation F1 so far](tune_curve.png)", "", "![PBT history](tune_pbt_history.png)", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
