"""PBT history (each trial's hyper-parameters over time, every exploit) and its report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from labelmatch.evaluation.report import pyplot
from labelmatch.tuning.search_space import LOG_SCALE, MUTATED

TIMELINE_KEYS = (
    "iteration",
    "val_macro_f1",
    "train_loss",
    *MUTATED,
    "lora_rank",
    "exploited_from",
    "exploited_at",
    "node_id",
)


def build_history(results: list[Any]) -> dict[str, Any]:
    """Collect the history of a run from Ray Tune results (one per trial).

    Args:
        results: ``ray.tune.Result`` objects (``ResultGrid`` items).

    Returns:
        ``{"trials": {trial_id: {"sampled": {...}, "timeline": [...], "best_val_macro_f1"}},
        "exploits": [{"into_trial", "from_trial", "at_iteration", "iteration"}]}``.
    """
    trials: dict[str, Any] = {}
    exploits = []
    for result in results:
        frame = progress_frame(result)
        if frame is None or frame.empty:
            continue
        trial_id = str(frame["trial_id"].iloc[-1])
        rows = [{k: _plain(row[k]) for k in TIMELINE_KEYS if k in row} for row in frame.to_dict("records")]
        trials[trial_id] = {
            "sampled": {"lora_rank": int(frame["lora_rank"].iloc[0]), "trial_index": _trial_index(result)},
            "timeline": rows,
            "best_val_macro_f1": float(frame["val_macro_f1"].max()),
        }
        exploits += [
            {
                "into_trial": trial_id,
                "from_trial": row["exploited_from"],
                "at_iteration": row["exploited_at"],
                "iteration": row["iteration"],
            }
            for row in rows
            if row.get("exploited_from")
        ]
    return {"trials": trials, "exploits": sorted(exploits, key=lambda e: (e["iteration"], e["into_trial"]))}


def progress_frame(result: Any) -> Any:
    """Every row a trial reported, read from its ``progress.csv``.

    Not ``result.metrics_dataframe``: Ray rewrites a trial's ``result.json`` when PBT restores
    another trial's checkpoint into it, dropping the rows before the exploit.
    """
    import pandas as pd

    path = f"{result.path}/progress.csv"
    try:
        with result.filesystem.open_input_stream(path) as stream:
            return pd.read_csv(stream)
    except FileNotFoundError:
        return None


def _trial_index(result: Any) -> int | None:
    index = (result.config or {}).get("trial_index")
    return int(index) if index is not None else None


def _plain(value: Any) -> Any:
    """NumPy / pandas scalars → JSON-able Python values (NaN → None)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def plot_history(history: dict[str, Any], path: Path) -> Path:
    """Validation macro-F1 and every tuned hyper-parameter over training time, exploits marked."""
    plt = pyplot()
    panels = ["val_macro_f1", *MUTATED, "lora_rank"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.0 * len(panels)), sharex=True)
    colours = plt.get_cmap("tab10")
    for i, (trial_id, trial) in enumerate(sorted(history["trials"].items())):
        rows = trial["timeline"]
        x = [r["iteration"] for r in rows]
        for ax, key in zip(axes, panels, strict=True):
            ax.plot(
                x, [r.get(key) for r in rows], marker="o", markersize=3, color=colours(i % 10), label=trial_id
            )
            marks = [(r["iteration"], r.get(key)) for r in rows if r.get("exploited_from")]
            if marks:
                ax.scatter(
                    *zip(*marks, strict=True),
                    marker="*",
                    s=120,
                    color=colours(i % 10),
                    edgecolors="black",
                    zorder=3,
                )
    for ax, key in zip(axes, panels, strict=True):
        ax.set_ylabel(key, fontsize=8)
        if key in LOG_SCALE:
            ax.set_yscale("log")
    axes[0].set_title("PBT: each trial over training time (★ = exploit: weights + optimizer cloned)")
    axes[0].legend(fontsize=7, ncol=4)
    axes[-1].set_xlabel("training iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown_summary(history: dict[str, Any], summary: dict[str, Any], images: dict[str, str]) -> str:
    """The tuning report: outcome, one row per trial, every exploit."""
    lines = ["# Hyper-parameter tuning (Ray Tune)", "", "| | |", "|---|---|"]
    for key in (
        "scheduler",
        "trials",
        "iterations",
        "best_trial",
        "best_iteration",
        "best_val_macro_f1",
        "best_lora_rank",
        "exploits",
        "trial_iterations",
        "wall_seconds",
    ):
        value = summary.get(key)
        lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    lines += [
        "",
        "## Trials",
        "",
        "| trial | sampled rank | effective rank | best val macro-F1 | final lr | final weight decay "
        "| final warmup | final contrastive | final scale | exploited |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for trial_id, trial in sorted(history["trials"].items()):
        last = trial["timeline"][-1]
        exploited = sum(1 for r in trial["timeline"] if r.get("exploited_from"))
        lines.append(
            f"| {trial_id} | {trial['sampled']['lora_rank']} | {last['lora_rank']} "
            f"| {trial['best_val_macro_f1']:.4f} "
            f"| {last['lr']:.2e} | {last['weight_decay']:.3f} | {last['warmup_ratio']:.3f} "
            f"| {last['contrastive_weight']:.3f} | {last['scale']:.1f} | {exploited} |"
        )
    if history["exploits"]:
        lines += [
            "",
            "## Exploits (who copied whom, when)",
            "",
            "| iteration | trial | cloned from | checkpoint of iteration |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {e['iteration']} | {e['into_trial']} | {e['from_trial']} | {e['at_iteration']} |"
            for e in history["exploits"]
        ]
    lines.append("")
    for caption, name in images.items():
        lines += [f"![{caption}]({name})", ""]
    return "\n".join(lines)
