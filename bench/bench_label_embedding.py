"""Label-embedding throughput, before and after, side by side in one run; and 100,000 labels end to end.

Part A, descriptions per second on synthetic label descriptions of mixed length (5 to 40 words),
engines interleaved round by round:

* ``onnx_one_per_run`` (before): the served fp32 graph embedding one description per ONNX
  Runtime run, what :class:`~labelmatch.runtime.onnx_classifier.OnnxClassifier` did for
  request-time labels and label-set updates;
* ``onnx_batched`` (after): the same graph, length-sorted batches of
  ``OnnxEncoder.LABEL_BATCH_SIZE`` (fp32 is batch-invariant, so the embeddings are the same);
* ``torch_batched``: the torch encoder (``labelmatch predict``), length-sorted batches of 64.

Part B, ``labelmatch predict --labels`` with ``--big`` synthetic labels (zero-shot, the bundled
encoder), in a subprocess: wall time, peak RSS, and whether progress was shown.

Writes ``label_embedding.{json,md,png}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import machine, zero_shot_model

from labelmatch.evaluation.report import pyplot

WORDS = ["tax", "invoice", "refund", "court", "customs", "payroll", "pension", "lease", "audit", "merger",
         "loan", "export", "shipping", "contract", "warranty", "delivery", "account", "password",
         "subscription", "complaint"]


def descriptions(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct label descriptions of 5 to 40 words."""
    rng = random.Random(seed)
    return [f"Label {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for i in range(n)]


def throughput(onnx_dir: Path, texts: list[str], rounds: int, threads: int) -> dict[str, Any]:
    """Descriptions per second of each way, interleaved over ``rounds`` rounds."""
    import numpy as np
    import torch

    from labelmatch.model.classifier import Classifier
    from labelmatch.runtime.onnx_classifier import OnnxClassifier, OrtConfig

    torch.set_num_threads(threads)
    onnx = OnnxClassifier.load(onnx_dir, OrtConfig(intra_op_threads=threads), engine_name="ort-fp32")
    encoder = onnx.encoder
    torch_clf = Classifier.load(onnx_dir.parent / "model")
    ways = {
        "onnx_one_per_run": lambda batch: encoder.embed(batch, 1),
        "onnx_batched": lambda batch: encoder.embed(batch, encoder.LABEL_BATCH_SIZE),
        "torch_batched": torch_clf.embed,
    }
    seconds: dict[str, float] = dict.fromkeys(ways, 0.0)
    outputs: dict[str, Any] = {}
    chunk = len(texts) // rounds
    for r in range(rounds):
        part = texts[r * chunk : (r + 1) * chunk]
        for name, embed in ways.items():
            started = time.perf_counter()
            out = embed(part)
            seconds[name] += time.perf_counter() - started
            outputs.setdefault(name, []).append(out)
    embedded = {name: np.concatenate(parts) for name, parts in outputs.items()}
    n = chunk * rounds
    return {
        "descriptions": n,
        "threads": threads,
        "per_second": {name: n / s for name, s in seconds.items()},
        "speedup_batched_vs_one_per_run": seconds["onnx_one_per_run"] / seconds["onnx_batched"],
        "max_abs_difference_batched_vs_one_per_run": float(np.abs(
            embedded["onnx_batched"] - embedded["onnx_one_per_run"]).max()),
    }


def big_predict(n: int, work: Path) -> dict[str, Any]:
    """``labelmatch predict --labels`` with ``n`` labels, zero-shot, in a subprocess."""
    labels = work / f"labels-{n}.json"
    labels.write_text(json.dumps({f"label_{i:06d}": d for i, d in enumerate(descriptions(n, seed=1))}))
    command = [sys.executable, "-m", "labelmatch.cli", "predict", "--labels", str(labels),
               "A customs declaration for the export shipment was filed late and a penalty invoiced."]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"labels": n, "returncode": done.returncode, "wall_s": wall,
            "peak_rss_mb": max(peak, before) / 1024,
            "progress_shown": "label descriptions" in done.stderr,
            "output": done.stdout.strip()[-600:], "stderr_tail": done.stderr.strip()[-300:]}


def report(result: dict[str, Any], out: Path) -> None:
    plt = pyplot()

    rates = result["throughput"]["per_second"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(list(rates), list(rates.values()), color=["grey", "tab:blue", "tab:orange"])
    ax.set_ylabel("descriptions / s")
    ax.set_title(f"Label embedding ({result['throughput']['threads']} threads)")
    fig.tight_layout()
    fig.savefig(out / "label_embedding.png", dpi=110)
    cpu, t, big = result["machine"], result["throughput"], result["big"]
    lines = [
        "# Label-embedding throughput (`make bench-label-embedding`)", "",
        f"Machine: {cpu['cpu']}, {cpu['cores']} cores, AVX-512 {cpu['avx512f']}, int8 dot product "
        f"{cpu['int8_dot_product'] or 'none'}. One run: {t['descriptions']} synthetic descriptions of 5 to "
        f"40 words, the ways interleaved round by round, {t['threads']} threads each.", "",
        "| way | descriptions/s |", "|---|---:|",
        *[f"| {name} | {rate:.0f} |" for name, rate in t["per_second"].items()], "",
        f"Batched vs one per run (the change, fp32 graph): **{t['speedup_batched_vs_one_per_run']:.2f}x**, "
        f"largest difference between their embeddings {t['max_abs_difference_batched_vs_one_per_run']:.1e}.",
        "", f"## {big['labels']:,} labels end to end", "",
        f"`labelmatch predict --labels <{big['labels']:,} labels> \"...\"` (zero-shot, torch): exit "
        f"{big['returncode']}, **{big['wall_s']:.0f} s**, peak RSS **{big['peak_rss_mb']:.0f} MB**, "
        f"progress bar shown: {'yes' if big['progress_shown'] else 'no'}.", "",
        "![label embedding](label_embedding.png)", "",
    ]
    (out / "label_embedding.md").write_text("\n".join(lines))
    (out / "label_embedding.json").write_text(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--descriptions", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--big", type=int, default=100_000, help="Labels of the end-to-end run (0: skip).")
    args = parser.parse_args()
    from labelmatch.data.dataset import load_labels
    from labelmatch.export.onnx import ExportConfig, export_onnx
    from labelmatch.sample_data import sample_path

    work = Path(tempfile.mkdtemp(prefix="bench-label-embedding-"))
    zero_shot_model(load_labels(sample_path("tax") / "labels.json"), work / "model")
    export_onnx(work / "model", work / "onnx", ExportConfig(agreement_gate=0.0, engines=("ort-fp32",),
                                                            probe_seconds=0.1))
    texts = descriptions(args.descriptions)
    result = {"machine": machine(), "throughput": throughput(work / "onnx", texts, args.rounds, args.threads)}
    print(json.dumps(result["throughput"], indent=2), flush=True)
    result["big"] = big_predict(args.big, work) if args.big else None
    print(json.dumps(result["big"], indent=2), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report(result, args.out)


if __name__ == "__main__":
    main()
