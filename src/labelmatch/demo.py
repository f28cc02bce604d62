"""The main job, locally: ``python -m labelmatch.demo --out runs/demo`` (``make demo``).

Runs the training pipeline's compiled IR (``pipelines/compiled/labelmatch-training-<version>.yaml``,
the file a cluster runs) end to end with ``kfp.local`` — every stage a KFP component in a
subprocess of this interpreter, no Docker, no cluster — on the bundled tax sample data and the
bundled MiniLM encoder:

1. the sample feedback (``sample_data/tax/feedback.jsonl``) is imported into a SQLite
   :class:`~labelmatch.feedback.feedback_store.FeedbackStore` (PII-redacted) and exported as a FeedbackExport;
2. ``data_prep`` validates, redacts, de-duplicates and splits the documents;
3. ``tune_sft`` runs Population Based Training with a small population on a local Ray;
4. ``grpo`` refines the best model from the feedback export;
5. ``evaluate`` writes the report and the deploy decision (nothing serves yet: deploy);
6. ``export_onnx`` and ``deploy`` run when the gate passes.

At the end it verifies every artifact's manifest and prints where each artifact and report is.
Run it from the repository root (the compiled pipelines live in ``pipelines/compiled/``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _import_pipelines():
    """Import the repository's ``pipelines`` package (it is not part of the installed library)."""
    root = Path.cwd()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from pipelines import local, registry
    except ModuleNotFoundError as exc:
        from labelmatch.core.errors import ConfigError

        raise ConfigError(
            f"cannot import the pipeline definitions ({exc}); run the demo from the "
            "repository root (where pipelines/ and components/ are)"
        ) from exc
    return local, registry


def export_sample_feedback(out_dir: Path) -> Path:
    """Import the bundled sample feedback into a SQLite store and export it (FeedbackExport)."""
    from labelmatch.data.pii import redact_text
    from labelmatch.feedback.feedback_store import FeedbackStore
    from labelmatch.sample_data import sample_path

    db = out_dir / "feedback.db"
    db.unlink(missing_ok=True)
    store = FeedbackStore(f"sqlite:///{db}", redact=redact_text)
    report = store.import_file(sample_path("tax") / "feedback.jsonl")
    print(f"feedback: {report.summary()}")
    return store.export(out_dir / "feedback_export", current_version="sample")


def main(argv: list[str] | None = None) -> None:
    """Run the demo."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="Output directory.")
    parser.add_argument("--trials", type=int, default=3, help="PBT population size.")
    parser.add_argument("--iterations", type=int, default=4, help="Training iterations per trial.")
    parser.add_argument("--steps-per-iteration", type=int, default=12, help="Steps between PBT decisions.")
    parser.add_argument("--max-length", type=int, default=96, help="Tokens per text.")
    parser.add_argument("--grpo-epochs", type=int, default=2, help="GRPO passes over the feedback.")
    parser.add_argument("--no-feedback", action="store_true", help="Skip GRPO (no feedback export).")
    parser.add_argument(
        "--export-agreement-gate",
        type=float,
        default=0.7,
        help="Least label-set agreement with torch for the ONNX export. The pipeline default is "
        "0.98; the demo's briefly trained MiniLM has many scores near its thresholds, where int8 "
        "rounding flips a label in ~5%% of its ~50 validation documents, and half of those are too "
        "few to check an fp32-fallback margin against 0.98, so the demo lowers the gate openly.",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from labelmatch import __version__
    from labelmatch.core.artifacts import verify_artifact
    from labelmatch.sample_data import sample_path

    local, registry = _import_pipelines()
    # The compiled IR that ships (what a cluster runs), not the Python definition.
    training_ir = registry.COMPILED_DIR / f"labelmatch-training-{__version__}.yaml"
    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    feedback = "" if args.no_feedback else str(export_sample_feedback(out))
    # Ray's socket paths must fit in 107 characters: its session lives in a short temp dir.
    with tempfile.TemporaryDirectory(prefix="lm-ray-", dir="/tmp") as ray_tmp:
        run_dir = local.run_locally(
            training_ir,
            out / "pipeline_root",
            data_uri=str(sample_path("tax")),
            trials=args.trials,
            iterations=args.iterations,
            steps_per_iteration=args.steps_per_iteration,
            max_length=args.max_length,
            ray_num_cpus=os.cpu_count() or 2,
            ray_temp_dir=ray_tmp,
            feedback_uri=feedback,
            grpo_epochs=args.grpo_epochs,
            export_agreement_gate=args.export_agreement_gate,
            deploy_target="local",
        )
    print(f"\npipeline run: {run_dir}")
    print("artifacts (every manifest verified):")
    for artifact in local.run_artifacts(run_dir):
        print(f"  {artifact.task:>14} {artifact.output:<12} {artifact.kind:<14} {artifact.path}")
    if feedback:
        kind = verify_artifact(feedback, "FeedbackExport")["kind"]
        print(f"  {'(input)':>14} {'feedback':<12} {kind:<14} {feedback}")
    for report in sorted(run_dir.glob("*/report/report.md")):
        print(f"report: {report}")
    decisions = sorted(run_dir.glob("evaluate*/report/decision.json"))
    for path in decisions:
        decision = json.loads(path.read_text())
        verdict = "deploy" if decision["deploy"] else "do not deploy"
        print(f"gate: {verdict} — {'; '.join(decision['reasons'])}")
    for path in sorted(run_dir.glob("export-onnx*/onnx_model/parity.json")):
        parity = json.loads(path.read_text())
        int8, fallback = parity["int8"], parity.get("fallback")
        served = (f"; with fp32 fallback for {fallback['fallback_fraction']:.0%} of documents: "
                  f"{fallback['label_set_agreement']:.3f}") if fallback else ""
        print(
            f"export: int8 label-set agreement with torch {int8['label_set_agreement']:.3f}{served} "
            f"(gate {args.export_agreement_gate}), cosine min {int8['cosine_min']:.4f}"
        )
    for path in sorted(run_dir.glob("deploy*/release/predictions.json")):
        print(f"\npredictions of the locally deployed server ({path}):")
        for row in json.loads(path.read_text()):
            print(json.dumps(row, ensure_ascii=False))
    print(f"\ndone in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    from labelmatch.core.errors import LabelmatchError

    try:
        main()
    except LabelmatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
