"""Evaluation reports: matplotlib PNG plots and a Markdown page that links them."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (reports are written, never shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_per_label_f1(metrics: dict[str, Any], path: Path) -> Path:
    """Horizontal bar chart of per-label F1 (with support in the tick labels)."""
    plt = pyplot()
    items = sorted(metrics["per_label"].items(), key=lambda kv: kv[1]["f1"])
    height = max(3.0, 0.22 * len(items) + 1)
    fig, ax = plt.subplots(figsize=(7, height))
    ax.barh([f"{k} ({v['support']})" for k, v in items], [v["f1"] for _, v in items], color="#4477aa")
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 (support in brackets)")
    ax.set_title(f"Per-label F1 — macro {metrics['macro_f1']:.3f}, micro {metrics['micro_f1']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reliability(metrics: dict[str, Any], path: Path) -> Path:
    """Reliability diagram over all (document, label) pairs."""
    plt = pyplot()
    curve = metrics["reliability"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.plot(curve["confidence"], curve["accuracy"], marker="o", color="#cc6677", label="model")
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"Reliability (ECE {metrics['ece']:.3f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_thresholds(thresholds: dict[str, float], default: float, path: Path) -> Path:
    """Tuned per-label thresholds against the global one."""
    plt = pyplot()
    names = list(thresholds)
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.22 * len(names) + 1)))
    ax.barh(names, [thresholds[n] for n in names], color="#228833")
    ax.axvline(default, color="black", linestyle="--", label=f"global {default:.2f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("threshold (tuned on validation)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_report(metrics: dict[str, Any], title: str, images: dict[str, str]) -> str:
    """A Markdown evaluation report."""
    lines = [f"# {title}", ""]
    lines += ["| metric | value |", "|---|---|"]
    for key in (
        "documents",
        "labels",
        "micro_f1",
        "macro_f1",
        "samples_f1",
        "weighted_f1",
        "micro_precision",
        "micro_recall",
        "macro_precision",
        "macro_recall",
        "exact_match",
        "ece",
    ):
        value = metrics[key]
        lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    lines += [
        "",
        "## Per label",
        "",
        "| label | precision | recall | F1 | support | threshold |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in metrics["per_label"].items():
        threshold = metrics.get("thresholds", {}).get(name, "")
        threshold = f"{threshold:.2f}" if isinstance(threshold, float) else threshold
        lines.append(
            f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} "
            f"| {row['support']} | {threshold} |"
        )
    if metrics["most_missed"]:
        lines += [
            "",
            "## Most missed labels",
            "",
            "| label | missed | support | miss rate |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {m['label']} | {m['missed']} | {m['support']} | {m['miss_rate']:.2f} |"
            for m in metrics["most_missed"]
        ]
    if metrics["top_confusions"]:
        lines += [
            "",
            "## Top confusions (missed true label → wrongly predicted label, same document)",
            "",
            "| true | predicted | count |",
            "|---|---|---|",
        ]
        lines += [f"| {c['true']} | {c['predicted']} | {c['count']} |" for c in metrics["top_confusions"]]
    lines += [""]
    for caption, name in images.items():
        lines += [f"![{caption}]({name})", ""]
    return "\n".join(lines)


def write_report_page(report_dir: str | Path, page_path: str | Path) -> Path:
    """Write ``report_dir/report.md`` as one self-contained page: PNG links become data URIs.

    A pipeline UI renders a Markdown output as a single file, so plots that sit beside the
    report must travel inside it.
    """
    import base64
    import re

    report_dir = Path(report_dir)

    def inline(match: re.Match[str]) -> str:
        image = report_dir / match.group(2)
        if not image.is_file():
            return match.group(0)
        data = base64.b64encode(image.read_bytes()).decode()
        return f"![{match.group(1)}](data:image/png;base64,{data})"

    text = re.sub(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)", inline, (report_dir / "report.md").read_text())
    Path(page_path).parent.mkdir(parents=True, exist_ok=True)
    Path(page_path).write_text(text)
    return Path(page_path)
