"""SFT speed, new code against an earlier revision, side by side in one run (Reuters-21578).

Both runs train the same LoRA dual encoder at bench-quality's settings (the same documents,
seed, learning rate, LoRA targets, token lengths and epochs), each in its own process: the
*baseline* with the library of ``--baseline-rev`` (checked out into a git worktree and put first
on ``PYTHONPATH``), the *new* one with this checkout's library and its defaults. Each reports
training documents per second (optimisation steps only; validation is timed apart), validation
macro-F1 after every epoch and test micro/macro-F1 of the saved model.

Before training, each run profiles ``--profile-steps`` steps phase by phase (tokenising,
the documents' forward pass, the label descriptions' forward pass, backward, optimiser), so the
report says where a step's time goes on both revisions.

Writes ``sft_speed.{json,md,png}`` under ``--out`` and the comparison row into ``quality.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import machine

from labelmatch.evaluation.report import pyplot

ROOT = Path(__file__).resolve().parents[1]
ROW_START, ROW_END = "<!-- sft-speed -->", "<!-- /sft-speed -->"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-sft-speed"))
    parser.add_argument("--baseline-rev", default="5d85de8",
                        help="The revision whose library is the baseline (before the speed work).")
    parser.add_argument("--train-docs", type=int, default=7770)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-targets", default="query,key,value,dense")
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--inference-max-length", type=int, default=192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=0,
                        help="Stop each run after this many steps (0: all); a quick check, not a record.")
    parser.add_argument("--profile-steps", type=int, default=20, help="Steps profiled phase by phase.")
    parser.add_argument("--report-only", action="store_true",
                        help="Run nothing: rewrite the report from <out>/sft_speed.json.")
    parser.add_argument("--child", choices=("baseline", "new"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def profile_steps(trainer: Any, steps: int, warmup: int = 3) -> dict[str, float]:
    """Milliseconds per step in each phase of a training step, averaged over ``steps`` steps
    (after ``warmup``), measured on a copy of the step's work that does not change ``trainer``."""
    import copy

    import torch

    from labelmatch.model.losses import LossWeights, label_match_loss

    model = copy.deepcopy(trainer.model)
    model.train()
    encoder = model.encoder
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    phases: dict[str, float] = {}
    from labelmatch.training.batches import next_batch

    generator = torch.Generator().manual_seed(0)
    # Each revision's own batches: length-grouped where the trainer groups (new), else a shuffle.
    lengths = getattr(trainer, "_lengths", None)
    grouping = (lengths, trainer.config.length_group_batches) if lengths else ()
    order: list[int] = []
    size = trainer.config.batch_size
    for step in range(warmup + steps):
        batch, order = next_batch(order, len(trainer.train_set.documents), size, generator, *grouping)
        marks = [time.perf_counter()]
        tokens = encoder.tokenize([trainer.train_set.documents[i].text for i in batch])
        marks.append(time.perf_counter())
        docs = encoder(tokens)
        marks.append(time.perf_counter())
        if hasattr(encoder, "encode"):  # grouped by length (new)
            labels = encoder.encode(trainer.label_texts)
        else:
            labels = encoder(encoder.tokenize(trainer.label_texts))
        marks.append(time.perf_counter())
        cos, logits = model.logits(docs, labels)
        rows = torch.tensor(batch)
        loss = label_match_loss(cos, logits, trainer.targets[rows], LossWeights(), trainer.pos_weight)["loss"]
        optimizer.zero_grad()
        loss.backward()
        marks.append(time.perf_counter())
        optimizer.step()
        marks.append(time.perf_counter())
        if step >= warmup:
            for name, start, end in zip(("tokenize_documents", "forward_documents", "forward_labels",
                                         "loss_and_backward", "optimizer"), marks, marks[1:], strict=False):
                phases[name] = phases.get(name, 0.0) + (end - start) * 1000 / steps
    return {name: round(ms, 1) for name, ms in phases.items()}


def train_and_score(args: argparse.Namespace) -> dict[str, Any]:
    """One run, in this process, with whichever ``labelmatch`` is first on the path."""
    from bench_quality import load_subsets

    import labelmatch
    from labelmatch.evaluation.evaluate import evaluate
    from labelmatch.model.classifier import Classifier
    from labelmatch.training.config import TrainConfig
    from labelmatch.training.sft import SFTTrainer

    dataset, _ = load_subsets(args.train_docs, args.seed)
    config = TrainConfig(epochs=args.epochs, lr=args.lr, lora_target_modules=args.lora_targets.split(","),
                         max_length=args.max_length, inference_max_length=args.inference_max_length,
                         batch_size=16, seed=args.seed, patience=2, progress=False)
    trainer = SFTTrainer(dataset, config)
    profile = profile_steps(trainer, args.profile_steps) if args.profile_steps else {}
    if args.steps:
        trainer.total_steps = args.steps
    step_seconds = [0.0]
    train_step = trainer.train_step

    def timed_step() -> dict[str, float]:
        started = time.perf_counter()
        parts = train_step()
        step_seconds[0] += time.perf_counter() - started
        return parts

    trainer.train_step = timed_step  # the same hook on both revisions: steps timed apart from validation
    started = time.perf_counter()
    trainer.fit()
    fit_s = time.perf_counter() - started
    out = args.work / args.child
    trainer.save_model(out)
    metrics = evaluate(Classifier.load(out), dataset, "test")
    docs = trainer.step * config.batch_size
    return {
        "library": str(Path(labelmatch.__file__).parent),
        "config": {k: v for k, v in config.to_dict().items() if k in (
            "lora_dropout", "encoder_dropout", "group_by_length", "batch_size", "lr", "max_length",
            "epochs")},
        "profile_ms_per_step": profile,
        "steps": trainer.step,
        "train_docs_seen": docs,
        "step_seconds": round(step_seconds[0], 1),
        "docs_per_s": docs / step_seconds[0],
        "fit_seconds": round(fit_s, 1),
        "val_macro_f1_per_epoch": [round(h["val_macro_f1"], 4) for h in trainer.history],
        "val_macro_f1": max(h["val_macro_f1"] for h in trainer.history),
        "test_micro_f1": metrics["micro_f1"],
        "test_macro_f1": metrics["macro_f1"],
    }


def worktree(rev: str, where: Path) -> Path:
    """A detached git worktree of ``rev`` (created once, reused)."""
    if not (where / "src" / "labelmatch").is_dir():
        where.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev], check=True)
    return where


def run_child(kind: str, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if kind == "baseline":
        tree = worktree(args.baseline_rev, (args.work / "baseline-src").resolve())
        env["PYTHONPATH"] = os.pathsep.join([str(tree / "src"), env.get("PYTHONPATH", "")])
    result_file = args.work / f"{kind}.json"
    started = time.perf_counter()
    subprocess.run([sys.executable, __file__, *argv, "--child", kind], env=env, check=True)
    result = json.loads(result_file.read_text())
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"{kind}: {json.dumps(result)}", flush=True)
    return result


def write_report(report: dict[str, Any], out: Path) -> None:
    plt = pyplot()

    base, new = report["baseline"], report["new"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    left.bar(["baseline", "new"], [base["docs_per_s"], new["docs_per_s"]], color=["grey", "tab:blue"])
    left.set_ylabel("training documents / s")
    left.set_title(f"SFT speed: {report['speedup']:.2f}x")
    for name, run in (("baseline", base), ("new", new)):
        curve = run["val_macro_f1_per_epoch"]
        right.plot(range(1, len(curve) + 1), curve, "o-", label=name)
    right.set_xlabel("epoch")
    right.set_ylabel("validation macro-F1")
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "sft_speed.png", dpi=110)
    cpu = report["machine"]
    table = ["| run | LoRA dropout | encoder dropout | length-grouped batches | docs/s | step s "
             "| validation macro-F1 | test micro-F1 | test macro-F1 |", "|---" * 9 + "|"]
    for name, run in (("baseline", base), ("new", new)):
        cfg = run["config"]
        grouped = "yes" if cfg.get("group_by_length") else "no"
        table.append(f"| {name} | {cfg.get('lora_dropout')} | {cfg.get('encoder_dropout', 'model (0.1)')} | "
                     f"{grouped} | "
                     f"{run['docs_per_s']:.2f} | {run['step_seconds']:.0f} | {run['val_macro_f1']:.4f} | "
                     f"{run['test_micro_f1']:.4f} | {run['test_macro_f1']:.4f} |")
    speedup = (f"Speed-up (docs/s, new / baseline): **{report['speedup']:.2f}x**; validation macro-F1 "
               f"difference (new − baseline): {report['val_macro_f1_delta']:+.4f}.")
    lines = [
        "# SFT speed — Reuters-21578, new code vs an earlier revision, one run",
        "",
        f"Command: `make bench-sft-speed` ({report['command']}). Machine: {cpu['cpu']}, "
        f"{cpu['cores']} cores, AVX2 {cpu['avx2']}, AVX-512 {cpu['avx512f']}, int8 dot product "
        f"{cpu['int8_dot_product'] or 'none'}. Baseline: the library at `{report['baseline_rev']}`; new: "
        "this checkout, its defaults. Same documents, seed and settings; each run in its own process, "
        "one after the other. Documents per second count "
        "optimisation steps only (validation timed apart).",
        "",
        *table,
    ]
    lines += ["", "Where a step's time goes (ms per step, averaged over "
              f"{report['profile_steps']} steps profiled before training, each run's own batches):", "",
              "| phase | baseline | new |", "|---|---|---|"]
    for phase in base["profile_ms_per_step"]:
        lines.append(f"| {phase} | {base['profile_ms_per_step'][phase]:.0f} | "
                     f"{new['profile_ms_per_step'].get(phase, float('nan')):.0f} |")
    lines += ["", speedup, "", "![sft speed](sft_speed.png)", ""]
    (out / "sft_speed.md").write_text("\n".join(lines))
    row = "\n".join([ROW_START, "## SFT speed (new vs old code, same settings, one run)", "", *table, "",
                     speedup, "", "Details: [sft_speed.md](sft_speed.md).", ROW_END])
    quality = out / "quality.md"
    if quality.is_file():
        text = quality.read_text()
        if ROW_START in text:
            text = text[: text.index(ROW_START)] + row + text[text.index(ROW_END) + len(ROW_END):]
        else:
            text = text.rstrip("\n") + "\n\n" + row + "\n"
        quality.write_text(text)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.child:
        (args.work / f"{args.child}.json").write_text(json.dumps(train_and_score(args), indent=2))
        return
    if args.report_only:
        write_report(json.loads((args.out / "sft_speed.json").read_text()), args.out)
        return
    report: dict[str, Any] = {"machine": machine(), "baseline_rev": args.baseline_rev,
                              "profile_steps": args.profile_steps,
                              "command": "`python bench/bench_sft_speed.py " + " ".join(argv) + "`"}
    report["baseline"] = run_child("baseline", args, argv)
    report["new"] = run_child("new", args, argv)
    report["speedup"] = report["new"]["docs_per_s"] / report["baseline"]["docs_per_s"]
    report["val_macro_f1_delta"] = report["new"]["val_macro_f1"] - report["baseline"]["val_macro_f1"]
    if args.steps:
        print(json.dumps({k: report[k] for k in ("speedup", "val_macro_f1_delta")}))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sft_speed.json").write_text(json.dumps(report, indent=2))
    write_report(report, args.out)


if __name__ == "__main__":
    main()
