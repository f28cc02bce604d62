"""PBT vs random search at equal compute on a real dataset (``make bench-tune``).

Both methods run the same number of trials for the same number of iterations from the same
seeded initial population (same hyper-parameters and LoRA ranks, same trainer seeds); PBT
additionally exploits (copies weights + optimizer of a better trial) and explores (perturbs its
hyper-parameters). Reported: best validation macro-F1, test macro-F1 of the best checkpoint
(per-label thresholds tuned on validation), compute (trial-iterations, steps, wall time), and the
trial-iterations PBT needed to reach random search's best validation F1. Repeated over
``--seeds`` (each seed its own data subsample, initial population and trainer seeds); the
targets are read off the mean (F1) and the median (compute share) over seeds.

Data: ``../shared/data/bitext_customer_support`` (38 labels: 11 categories + 27 intents, two
per document), subsampled with the dataset's own split: ``--train`` documents of its train split
(of which ``--val`` become the validation split, stratified) and ``--test`` of its test split.

Usage::

    python bench/bench_tune.py --out bench/results [--seeds 0 1 2 --trials 4 --iterations 12 --steps 8]
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

import numpy as np

from labelmatch.data.dataset import Dataset, assign_splits, load_dataset
from labelmatch.evaluation.report import pyplot
from labelmatch.platform.ray_local import init_local_ray
from labelmatch.training.config import TrainConfig
from labelmatch.tuning.history import build_history, plot_history, progress_frame
from labelmatch.tuning.pbt import METRIC, TuneConfig, best_checkpoint, run_tune
from labelmatch.tuning.search_space import SearchSpace

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
    from labelmatch.evaluation.evaluate import evaluate
    from labelmatch.model.classifier import Classifier
    from labelmatch.training.sft import SFTTrainer

    checkpoint, metrics = best_checkpoint(results)
    with checkpoint.as_directory() as directory:
        trainer = SFTTrainer.load_checkpoint(directory, dataset)
    trainer.save_model(work)
    test = evaluate(Classifier.load(work), dataset, "test")
    return {"best_val_macro_f1": float(metrics[METRIC]), "best_iteration": int(metrics["iteration"]),
            "best_lora_rank": trainer.config.lora_rank, "test_macro_f1": float(test["macro_f1"]),
            "test_micro_f1": float(test["micro_f1"])}


def search_space(args: argparse.Namespace) -> SearchSpace:
    """The default search space, with ``--lr-range`` when given."""
    return SearchSpace(lr=tuple(args.lr_range)) if args.lr_range else SearchSpace()


def run_method(scheduler: str, dataset: Dataset, args: argparse.Namespace, seed: int,
               work: Path) -> dict[str, Any]:
    config = TuneConfig(
        trials=args.trials, iterations=args.iterations, scheduler=scheduler, seed=seed, verbose=0,
        quantile_fraction=args.quantile, resample_probability=args.resample, name=f"bench-{scheduler}",
        search_space=search_space(args),
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
        "history": history, "curve": rows,
        "summary": {
            **test_f1(results, dataset, work / f"model-{scheduler}"),
            "trial_iterations": len(rows), "training_steps": len(rows) * args.steps,
            "wall_seconds": round(wall, 1), "exploits": len(history["exploits"]),
        },
    }


def run_seed(seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One replicate: the data subsample, the initial population and the trainer seeds follow ``seed``."""
    dataset = subsample(args.data, args.train, args.val, args.test, seed)
    population = search_space(args).initial_population(args.trials, seed)
    pbt = run_method("pbt", dataset, args, seed, work / "pbt")
    rnd = run_method("random", dataset, args, seed, work / "random")
    target = max(r["f1"] for r in rnd["curve"])
    reached = next((r["trial_iterations"] for r in pbt["curve"] if r["f1"] >= target), None)
    budget = len(rnd["curve"])
    share = reached / budget if reached else None
    # Equal compute: PBT's best among its first `budget` reports (it may run a few more).
    at_budget = max(r["f1"] for r in pbt["curve"] if r["trial_iterations"] <= budget)
    return {
        "seed": seed,
        "splits": {s: len(dataset.split(s).documents) for s in ("train", "val", "test")},
        "labels": len(dataset.labels),
        "initial_population": [{k: p[k] for k in ("lr", "lora_rank", "scale")} for p in population],
        "pbt": pbt["summary"], "random_search": rnd["summary"],
        "pbt_trial_iterations_to_reach_random_best_val": reached,
        "pbt_share_of_random_compute_to_reach_its_best": round(share, 3) if share else None,
        "pbt_best_val_at_random_budget": at_budget,
        "pbt_ge_random_val": at_budget >= rnd["summary"]["best_val_macro_f1"],
        "within_60pct": bool(share is not None and share <= 0.6),
        "curves": {"pbt": pbt["curve"], "random": rnd["curve"]},
        "history": pbt["history"],
    }


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Across seeds: means, the median compute share (never reached counts as worse than any) and counts."""
    shares = [r["pbt_share_of_random_compute_to_reach_its_best"] or float("inf") for r in runs]
    median = float(np.median(shares))

    def mean(method: str, key: str) -> float:
        return float(np.mean([r[method][key] for r in runs]))

    return {
        "seeds": len(runs),
        "mean_best_val_macro_f1": {"pbt": mean("pbt", "best_val_macro_f1"),
                                   "random_search": mean("random_search", "best_val_macro_f1")},
        "mean_pbt_best_val_at_random_budget": float(np.mean([r["pbt_best_val_at_random_budget"]
                                                             for r in runs])),
        "mean_test_macro_f1": {"pbt": mean("pbt", "test_macro_f1"),
                               "random_search": mean("random_search", "test_macro_f1")},
        "median_share_to_reach_random_best": None if median == float("inf") else round(median, 3),
        "seeds_pbt_ge_random_val": sum(r["pbt_ge_random_val"] for r in runs),
        "seeds_within_60pct": sum(r["within_60pct"] for r in runs),
    }


def plot_curves(runs: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.8), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        pbt, rnd = run["curves"]["pbt"], run["curves"]["random"]
        for rows, name, colour in ((pbt, "PBT", "#4477aa"), (rnd, "random search", "#cc6677")):
            ax.step([r["trial_iterations"] for r in rows], [r["best_so_far"] for r in rows], where="post",
                    label=name, color=colour)
        ax.axhline(max(r["f1"] for r in rnd), color="#cc6677", linestyle=":", label="random search best")
        ax.axvline(0.6 * len(rnd), color="grey", linestyle="--", linewidth=0.8, label="60% of its compute")
        ax.set_xlabel("trial-iterations done (compute)")
        ax.set_title(f"seed {run['seed']}")
    axes[0][0].set_ylabel("best validation macro-F1 so far")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("PBT vs random search at equal compute")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--trials", type=int, default=4)
    # Many short iterations: PBT perturbs after every iteration, so exploits start after a few
    # steps instead of a third of the budget.
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="replicates: each seed draws its own data subsample, initial population "
                             "and trainer seeds (the same for PBT and random search)")
    parser.add_argument("--lr-range", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                        help="learning-rate range of the search space (default: SearchSpace's)")
    args = parser.parse_args()
    search_space(args)  # a bad range fails here, before any trial starts
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lmbt-", dir="/tmp"))
    os.environ.setdefault("RAY_TMPDIR", str(work))
    init_local_ray(num_cpus=args.num_cpus, temp_dir=str(work / "ray"))
    try:
        runs = [run_seed(seed, args, work / f"seed{seed}") for seed in args.seeds]
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    summary = aggregate(runs)
    median = summary["median_share_to_reach_random_best"]
    report = {
        "dataset": str(args.data.name), "labels": runs[0]["labels"], "splits": runs[0]["splits"],
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "data")},
        "runs": runs, "aggregate": summary,
        "targets": {
            "pbt_ge_random_val": summary["mean_pbt_best_val_at_random_budget"]
            >= summary["mean_best_val_macro_f1"]["random_search"],
            "pbt_reaches_random_best_within_60pct": bool(median is not None and median <= 0.6),
        },
    }
    plot_curves(runs, args.out / "tune_curve.png")
    for run in runs:
        plot_history(run["history"], args.out / f"tune_pbt_history_s{run['seed']}.png")
    (args.out / "tune.json").write_text(json.dumps(report, indent=2) + "\n")
    summary_md = markdown(report)
    report_path = args.out / "tune.md"
    report_path.write_text(summary_md + kept_notes(report_path))
    print(summary_md)


NOTES_HEADING = "## Analysis"


def kept_notes(path: Path) -> str:
    """The hand-written analysis below ``NOTES_HEADING`` of an earlier report, so a re-run keeps it."""
    if not path.exists():
        return ""
    text = path.read_text()
    start = text.find(NOTES_HEADING)
    return "" if start < 0 else "\n" + text[start:]


def markdown(report: dict[str, Any]) -> str:
    s, n, agg = report["settings"], report["splits"], report["aggregate"]
    targets = report["targets"]
    lr_note = f" with lr {s['lr_range'][0]:g}–{s['lr_range'][1]:g}" if s.get("lr_range") else ""

    def share(run: dict[str, Any]) -> str:
        reached = run["pbt_trial_iterations_to_reach_random_best_val"]
        if reached is None:
            return f"never (of {run['random_search']['trial_iterations']})"
        return (f"{reached} of {run['random_search']['trial_iterations']} "
                f"({100 * run['pbt_share_of_random_compute_to_reach_its_best']:.0f}%)")

    lines = [
        "# Tuning: PBT vs random search at equal compute", "",
        f"Dataset `{report['dataset']}` ({report['labels']} labels), subsampled per seed: "
        f"{n['train']} train / {n['val']} validation (stratified out of {s['train']} sampled from its "
        f"train split) / {n['test']} test (sampled from its test split); bundled MiniLM encoder, "
        f"max_length {s['max_length']}, CPU only (Ray with {s['num_cpus']} logical CPUs, 1 per trial, "
        "on a 2-core machine).", "",
        f"Both methods, per seed: {s['trials']} trials × {s['iterations']} iterations × {s['steps']} steps "
        "(batch 16) from the same seeded initial population (hyper-parameters and LoRA ranks, the default "
        f"`SearchSpace`{lr_note}) and trainer seeds; PBT perturbs every iteration: the bottom "
        f"{100 * s['quantile']:.0f}% copies the top {100 * s['quantile']:.0f}% (weights + optimizer), then "
        f"explores (×0.8/×1.2, or a redraw with probability {s['resample']}). Each seed also draws its own "
        "data subsample.", "",
        "| seed | initial lr (rank) | PBT best val / test macro-F1 | random best val / test | exploits | "
        "PBT trial-iterations to reach random's best | trial-iterations run PBT / random | "
        "PBT / random wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        pbt, rnd = run["pbt"], run["random_search"]
        lrs = ", ".join(f"{p['lr']:.1e} ({p['lora_rank']})" for p in run["initial_population"])
        lines.append(
            f"| {run['seed']} | {lrs} | {pbt['best_val_macro_f1']:.4f} / {pbt['test_macro_f1']:.4f} | "
            f"{rnd['best_val_macro_f1']:.4f} / {rnd['test_macro_f1']:.4f} | {pbt['exploits']} | "
            f"{share(run)} | {pbt['trial_iterations']} / {rnd['trial_iterations']} | "
            f"{pbt['wall_seconds']:.0f} / {rnd['wall_seconds']:.0f} |"
        )
    mean_val, mean_test = agg["mean_best_val_macro_f1"], agg["mean_test_macro_f1"]
    median = agg["median_share_to_reach_random_best"]
    lines += [
        "",
        f"Over {agg['seeds']} seeds: mean best validation macro-F1 PBT {mean_val['pbt']:.4f} vs random "
        f"{mean_val['random_search']:.4f} (test {mean_test['pbt']:.4f} vs {mean_test['random_search']:.4f}); "
        f"at equal compute (PBT's best within random search's number of trial-iterations) "
        f"{agg['mean_pbt_best_val_at_random_budget']:.4f} vs {mean_val['random_search']:.4f}, "
        f"PBT ≥ random in {agg['seeds_pbt_ge_random_val']} of {agg['seeds']} seeds; PBT reached random "
        f"search's best within 60% of its compute in {agg['seeds_within_60pct']} of {agg['seeds']} seeds, "
        f"median share **{'never' if median is None else f'{100 * median:.0f}%'}**.", "",
        "How compute is counted: every report (one iteration of one trial) of every trial, in the "
        "order they happened; PBT's count is the position of its first report whose validation "
        "macro-F1 is at least random search's best, random search's budget is all its reports. "
        "PBT can run a few more than random search: a trial that copies a donor behind it re-trains "
        "those iterations (and one that copies a donor ahead skips some). Wall seconds depend on what "
        "else the machine ran; compare trial-iterations.", "",
        "Targets: PBT ≥ random at equal compute (mean validation over seeds): "
        f"{targets['pbt_ge_random_val']}; "
        f"≤ 60% compute to reach random's best (median over seeds): "
        f"{targets['pbt_reaches_random_best_within_60pct']}.", "",
        "![best validation F1 so far](tune_curve.png)", "",
    ]
    lines += [f"![PBT history, seed {r['seed']}](tune_pbt_history_s{r['seed']}.png)" for r in report["runs"]]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
