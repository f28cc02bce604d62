"""``labelmatch grpo``: policy optimisation of the SFT model from a feedback export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from labelmatch.cli import app
from labelmatch.core.errors import ConfigError


@app.command()
def grpo(
    model: Annotated[Path, typer.Option("--model", help="SFT Model artifact (the frozen reference).")],
    feedback: Annotated[
        Path, typer.Option("--feedback", help="FeedbackExport artifact (labelmatch feedback export).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output Model artifact (SFT + GRPO, merged encoder).")],
    config: Annotated[
        Path | None, typer.Option(help="JSON file of GRPOConfig fields; flags below override it.")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Total GRPO steps (default: --epochs passes).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the feedback.")] = None,
    group_size: Annotated[int | None, typer.Option(help="Label sets sampled per document.")] = None,
    beta: Annotated[float | None, typer.Option(help="Weight of the KL to the reference.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate of the new LoRA adapter.")] = None,
    credit: Annotated[
        str | None, typer.Option(help="'label' (per-label credit) or 'set' (one reward per label set).")
    ] = None,
    target_kl: Annotated[
        float | None, typer.Option(help="Stop once the KL to the SFT model exceeds this (nats/doc).")
    ] = None,
    max_principal_share: Annotated[
        float | None,
        typer.Option(help="Largest share of the run's feedback weight one principal may carry (0, 1]; "
                     "1 disables the cap (default 0.25, chosen on dev: bench-feedback-poisoning-select)."),
    ] = None,
    replay_kl_weight: Annotated[
        float | None,
        typer.Option(help="Weight of the KL to the SFT model on replayed SFT training documents (needs "
                     "--replay-data; 0: off)."),
    ] = None,
    replay_bce_weight: Annotated[
        float | None,
        typer.Option(help="Weight of the BCE on replayed SFT training documents with their labels (needs "
                     "--replay-data; 0: off)."),
    ] = None,
    replay_data: Annotated[
        Path | None,
        typer.Option(
            "--replay-data",
            help="The SFT training data (docs.jsonl dir; its train split, or every document when it has "
                 "no split) replayed so GRPO keeps what feedback does not cover.",
        ),
    ] = None,
    val_data: Annotated[
        Path | None,
        typer.Option(
            "--val-data",
            help="Labelled docs (docs.jsonl dir) to re-tune thresholds on; default: keep the SFT ones.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide the progress bar.")] = False,
) -> None:
    """Optimise a new LoRA on the SFT model from user feedback (GRPO) and write a Model artifact."""
    from labelmatch.data.dataset import load_dataset
    from labelmatch.feedback.grpo import GRPOConfig, train_grpo

    values = json.loads(config.read_text()) if config else {}
    if not isinstance(values, dict):
        raise ConfigError(f"{config}: expected a JSON object of GRPOConfig fields")
    flags = {"steps": steps, "epochs": epochs, "group_size": group_size, "beta": beta, "lr": lr}
    flags.update(credit=credit, target_kl=target_kl, max_principal_share=max_principal_share,
                 replay_kl_weight=replay_kl_weight, replay_bce_weight=replay_bce_weight)
    values.update({k: v for k, v in flags.items() if v is not None})
    values["seed"], values["progress"] = seed, not no_progress
    labels_path = model / "labels.json"
    val_dataset = load_dataset(val_data, labels_path) if val_data else None
    replay_dataset = None
    if replay_data:
        replay_dataset = load_dataset(replay_data, labels_path)
        if replay_dataset.split("train").documents:
            replay_dataset = replay_dataset.split("train")
    summary = train_grpo(model, feedback, out, GRPOConfig.from_dict(values), val_dataset=val_dataset,
                         replay_dataset=replay_dataset)
    reward, cap = summary["reward_curve"], summary["principals"]
    typer.echo(
        f"model written to {out}: {summary['steps']} steps, mean reward {reward[0]:.3f} → {reward[-1]:.3f}, "
        f"final KL to the SFT model {summary['final_kl']:.4f}"
    )
    typer.echo(
        f"principals: {cap['principals']}, cap {cap['effective_share']:.3g} of the weight: "
        f"{cap['capped_principals']} capped, largest share {cap['largest_share_before']:.3f} → "
        f"{cap['largest_share_after']:.3f}, {100 * cap['weight_moved']:.1f}% of the weight moved"
    )
