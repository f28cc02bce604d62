"""Labels added after training: does keeping some of the start adapter help them? (validation only)

bench-peers' new-labels column trains labelmatch without some labels (from the general adapter
trained without the cell's dataset), adds them afterwards by their descriptions and scores them. On
Bitext's full split the trained model ranks them no better than the untrained encoder (0.689 vs
0.715 top-1, 0.613 vs 0.887 on seed 1): epochs on the other labels pull the embedding space toward
them. The standard remedy is WiSE-FT: interpolate the weights between where training started and
where it ended. Here, for each kept new-labels model of bench-peers and each share ``t`` of
``--shares``, the encoder's weights are

    W0 + (1 - t) · z · ΔW_start + t · ΔW_trained

(``W0`` the base encoder; ``ΔW_start`` the start adapter's LoRA delta, ``z`` its
``zero_shot_scale``; ``ΔW_trained`` the trained model's, peft's ``rescale_adapter_scale`` for each
share): ``t = 1`` is the trained model as shipped, ``t = 0`` the start adapter as zero-shot
prediction uses it. The base encoder (no adapter) is the reference.

Two figures per model and share, both rankings (no threshold is tuned, so nothing is fitted on the
documents scored), from the official **train** split only (never the test split):

* **new labels**: documents of the held-out labels that training never saw (not in the cell's
  training set; single-label datasets drop every document of a held-out label from training, so
  all of them qualify), at most ``--per-label`` per label (seeded). Single-label: top-1 accuracy
  among all labels. Multi-label: mean average precision of each held-out label's column over these
  documents and the validation documents.
* **seen labels**: the cell's validation documents (its seen labels). Single-label: top-1 accuracy
  among all labels; multi-label: mean average precision of each seen label's column.

Needs the models bench-peers keeps (``--work``, ``runs/bench-peers``) and the held-out adapters
(``--adapters``). Each model's result is written to ``--records`` as it ends (tracked; a later run
skips recorded models). Writes ``new_label_share.{json,md,png}`` under ``--out``. Chooses nothing: it
shows whether a share below 1 is worth making a training option. BANKING77 is never used, in any
form.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_general_adapter import held_out_adapter
from bench_peers import (
    carve,
    is_single_label,
    limit_threads,
    model_dir,
    new_labels,
    single_level,
    top1_metrics,
    without_labels,
)
from bench_transfer import _eval_set
from common import cpu_text, machine, mean_spread, write_outputs

from labelmatch.evaluation.report import pyplot

#: The bench-peers cells whose new-labels models are kept under runs/bench-peers.
CELLS = "bitext_customer_support:full,reuters21578_modapte:full,reuters21578_modapte:64"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-peers"), help="bench-peers' models.")
    parser.add_argument("--adapters", type=Path, default=Path("runs/general-adapter"),
                        help="bench_general_adapter.py's --work (the start adapters).")
    parser.add_argument("--cells", default=CELLS, help="dataset:size pairs, comma-separated.")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--shares", default="0,0.25,0.5,0.75,1",
                        help="t: the trained model's share of the weights' delta (1: as shipped).")
    parser.add_argument("--per-label", type=int, default=100,
                        help="At most this many unseen documents per held-out label.")
    # bench-peers' carve: the same validation and training documents, the same held-out labels.
    parser.add_argument("--val-per-label", type=int, default=4)
    parser.add_argument("--new-label-share", type=float, default=0.1)
    parser.add_argument("--records", type=Path, default=Path("bench/results/new_label_share_runs"),
                        help="Each model's result (tracked; resume: recorded ones are not probed again).")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads.")
    return parser.parse_args(argv)


def probe_documents(name: str, size: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The cell's labels, its held-out labels, and the two document sets scored (see the docstring)."""
    dataset = carve(name, size, seed, args.val_per_label)
    held = new_labels(name, seed, args.new_label_share)
    seen = without_labels(dataset, held)
    trained = {d.id for d in seen.split("train").documents}
    rng = random.Random(seed)
    pool = [d for d in single_level(name).documents
            if d.split != "test" and d.id not in trained and set(d.labels) & set(held)]
    rng.shuffle(pool)
    chosen: dict[str, Any] = {}
    for label in held:
        for doc in [d for d in pool if label in d.labels][: args.per_label]:
            chosen[doc.id] = doc
    val = [d for d in dataset.split("val").documents if set(d.labels) - set(held)]
    single = is_single_label(dataset)
    new_docs = list(chosen.values()) + ([] if single else [d for d in val if d.id not in chosen])
    return {"labels": dataset.labels, "held": held, "single": single,
            "new": _eval_set("new", new_docs, dataset.labels),
            "seen": _eval_set("seen", val, dataset.labels)}


def ranking(evalset: Any, probs: np.ndarray, columns: list[int], single: bool) -> float:
    """Top-1 accuracy of ``evalset``'s documents with a label among ``columns`` (single-label), or
    the mean average precision of those columns (multi-label)."""
    from sklearn.metrics import average_precision_score

    targets = evalset.targets
    if single:
        rows = targets[:, columns].any(1)
        return top1_metrics(targets[rows], probs[rows])["accuracy"]
    scored = [c for c in columns if targets[:, c].any()]
    return float(np.mean([average_precision_score(targets[:, c], probs[:, c]) for c in scored]))


def blended(trained: Path, start: Any, share: float) -> Any:
    """The trained classifier with weights ``W0 + (1 - share)·z·ΔW_start + share·ΔW_trained``."""
    from peft import PeftModel

    from labelmatch.model.classifier import Classifier
    from labelmatch.model.io import merge_share

    clf = Classifier.load(trained, share=share)
    rest = (1.0 - share) * start.zero_shot_scale
    if rest > 0:
        clf.encoder.model = merge_share(PeftModel.from_pretrained(clf.encoder.model, str(start.path)), rest)
    clf.encoder.model.eval()
    return clf


def score_model(clf: Any, sets: dict[str, Any]) -> dict[str, float]:
    """``{"new", "seen"}`` rankings of one encoder on the probe documents."""
    names = list(sets["labels"])
    held = [names.index(label) for label in sets["held"]]
    others = [j for j in range(len(names)) if j not in held]
    result = {}
    for part, columns in (("new", held), ("seen", others)):
        evalset = sets[part]
        _, probs = clf.scores(evalset.texts, sets["labels"], replace=True)
        result[part] = ranking(evalset, probs, columns, sets["single"])
    return result


def probe_model(name: str, size: str, seed: int, shares: list[float],
                args: argparse.Namespace) -> dict[str, Any]:
    """The base encoder and every share of one kept new-labels model, scored on its probe documents."""
    from labelmatch.model.classifier import Classifier
    from labelmatch.model.general_adapter import resolve_base_adapter

    trained = model_dir(args, name, size, seed, "labelmatch_new_labels")
    if not (trained / "manifest.json").is_file():
        raise FileNotFoundError(f"{trained}: run bench-peers' new-labels cell first")
    sets = probe_documents(name, size, seed, args)
    info = json.loads((trained / "labelmatch.json").read_text())
    start = resolve_base_adapter(held_out_adapter(args.adapters, name), info["base_model"])
    base = Classifier.zero_shot(sets["labels"], max_length=int(info["max_length"]), base_adapter="none")
    result: dict[str, Any] = {"held": sets["held"], "new_docs": len(sets["new"].texts),
                              "seen_docs": len(sets["seen"].texts), "base": score_model(base, sets),
                              "shares": {}}
    for share in shares:
        result["shares"][str(share)] = score_model(blended(trained, start, share), sets)
    return result


def summarise(runs: dict[str, dict[str, dict[str, Any]]], shares: list[float]) -> dict[str, Any]:
    """Per cell: mean ± half-range over seeds of each share's and the base's rankings."""
    summary = {}
    for cell, seeds in runs.items():
        rows = {"base": {p: mean_spread([r["base"][p] for r in seeds.values()]) for p in ("new", "seen")}}
        for share in shares:
            rows[str(share)] = {p: mean_spread([r["shares"][str(share)][p] for r in seeds.values()])
                                for p in ("new", "seen")}
        summary[cell] = rows
    return summary


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown."""
    shares = report["shares"]
    lines = [
        "# Labels added after training: the trained model's share of the weights (validation only)",
        "",
        "Weights `W0 + (1 - t)·z·ΔW_start + t·ΔW_trained` for bench-peers' kept new-labels models "
        "(`t = 1`: the model as shipped; `t = 0`: the start adapter as zero-shot prediction uses it). "
        "**new**: the held-out labels' documents that training never saw, from the official train "
        "split (top-1 among all labels; Reuters: mean average precision of the held-out labels' "
        "columns); **seen**: the cell's validation documents (top-1, or mean AP of the seen labels' "
        "columns). Rankings only, no test split read, nothing chosen here. "
        f"Mean ± half-range over seeds {report['seeds']}; each model's record (under "
        "`bench/results/new_label_share_runs`) names its CPU, threads and seconds. "
        f"Combined on {cpu_text(report['machine'])}.",
        "",
        "| cell | part | base encoder | " + " | ".join(f"t={s:g}" for s in shares) + " |",
        "|---|---|---:|" + "---:|" * len(shares),
    ]
    for cell, rows in report["summary"].items():
        docs = report["runs"][cell]
        first = next(iter(docs.values()))
        for part in ("new", "seen"):
            values = " | ".join(f"{rows[str(s)][part]['mean']:.3f} ± {rows[str(s)][part]['spread']:.3f}"
                                for s in shares)
            count = first[f"{part}_docs"]
            lines.append(f"| {cell} | {part} (~{count} docs) | {rows['base'][part]['mean']:.3f} | {values} |")
    lines += ["", "![new-label share](new_label_share.png)", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> bool:
    """New- and seen-label rankings against ``t``, one panel per cell."""
    try:
        plt = pyplot()
    except ImportError:
        return False
    shares, cells = report["shares"], report["summary"]
    fig, axes = plt.subplots(1, len(cells), figsize=(5 * len(cells), 4), squeeze=False)
    for ax, (cell, rows) in zip(axes[0], cells.items(), strict=True):
        for part, style in (("new", "-o"), ("seen", "--s")):
            ax.errorbar(shares, [rows[str(s)][part]["mean"] for s in shares],
                        yerr=[rows[str(s)][part]["spread"] for s in shares], fmt=style, label=part, capsize=3)
            ax.axhline(rows["base"][part]["mean"], ls=":", color="grey")
        ax.set_title(cell, fontsize=9)
        ax.set_xlabel("t (trained model's share; dotted: base encoder)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    """Probe every kept model, then write the report."""
    args = parse_args(argv)
    limit_threads(args.threads)
    shares = [float(s) for s in args.shares.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    cells = [tuple(c.split(":")) for c in args.cells.split(",") if c]
    started = time.perf_counter()
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for i, (name, size) in enumerate(cells, start=1):
        for seed in seeds:
            record = args.records / f"{name}-{size}-s{seed}.json"
            recorded = json.loads(record.read_text()) if record.is_file() else None
            if recorded and set(recorded["shares"]) == {str(s) for s in shares}:
                runs.setdefault(f"{name} {size}", {})[str(seed)] = recorded
                continue
            began = time.perf_counter()
            result = probe_model(name, size, seed, shares, args)
            result.update(wall_s=round(time.perf_counter() - began, 1), threads=args.threads,
                          cpu=cpu_text(machine()))
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(result, indent=1) + "\n")
            runs.setdefault(f"{name} {size}", {})[str(seed)] = result
            row = "  ".join(f"t={s} {r['new']:.3f}/{r['seen']:.3f}" for s, r in result["shares"].items())
            print(f"[{i}/{len(cells)}] {name} {size} seed {seed}: base {result['base']['new']:.3f}/"
                  f"{result['base']['seen']:.3f}  {row}  (new/seen; {time.perf_counter() - began:.0f} s)",
                  flush=True)
    report = {"shares": shares, "seeds": seeds, "machine": machine(), "runs": runs,
              "summary": summarise(runs, shares), "wall_s": round(time.perf_counter() - started, 1)}
    write_outputs(args.out, "new_label_share", report, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
