"""GRPO end to end on the tiny SFT model: artifact contents, reference, checkpoints, bad feedback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from labelmatch.core.artifacts import artifact_digest, verify_artifact
from labelmatch.core.errors import ConfigError, DataError
from labelmatch.feedback.feedback_store import FeedbackStore
from labelmatch.feedback.grpo import (
    GRPOConfig,
    GRPOTrainer,
    feedback_tensors,
    replay_tensors,
    train_grpo,
)
from labelmatch.feedback.grpo_math import bernoulli_kl
from labelmatch.model.classifier import Classifier


def small_config(**changes) -> GRPOConfig:
    values = dict(steps=2, batch_size=4, group_size=4, max_length=32, progress=False, seed=0,
                  replay_kl_weight=0.0, replay_bce_weight=0.0)
    values.update(changes)
    return GRPOConfig(**values)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, sample_dir) -> Path:
    """A FeedbackExport of the first 12 bundled sample feedback records."""
    root = tmp_path_factory.mktemp("feedback")
    store = FeedbackStore(f"sqlite:///{root / 'f.db'}")
    store.register_model("sample", json.loads((sample_dir / "labels.json").read_text()))
    lines = (sample_dir / "feedback.jsonl").read_text().splitlines()[:12]
    (root / "part.jsonl").write_text("\n".join(lines) + "\n")
    assert store.import_file(root / "part.jsonl").ok
    return store.export(root / "export", current_version="sample")


@pytest.fixture(scope="module")
def grpo_run(trained_model, export_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    # label_gradients=False (the default) here; the next test steps with True: both paths run
    config = small_config(checkpoint_every=1, checkpoint_dir=str(root / "ckpt"), label_gradients=False)
    summary = train_grpo(trained_model, export_dir, root / "model", config)
    return summary, root


def test_output_is_a_merged_model_recording_its_inputs(grpo_run, trained_model, export_dir):
    summary, root = grpo_run
    out = root / "model"
    manifest = verify_artifact(out, "Model")
    assert (out / "encoder").is_dir() and not (out / "adapter").exists()
    info = json.loads((out / "labelmatch.json").read_text())
    assert info["reference_model_digest"] == artifact_digest(trained_model)
    assert info["feedback_digest"] == artifact_digest(export_dir)
    assert info["grpo"]["config"]["group_size"] == 4 and info["layout"] == "encoder"
    # the per-principal cap is reported: the sample records have no principal, one source
    assert info["grpo"]["principals"] == summary["principals"]
    assert summary["principals"]["max_share"] == GRPOConfig().max_principal_share
    assert summary["principals"]["principals"] == 1 and summary["principals"]["capped_principals"] == 0
    assert summary["principals"]["top"][0]["principal"] == "(unknown:sample)"
    assert manifest["lineage"]["reference_model_digest"] == artifact_digest(trained_model)
    assert summary["steps"] == 2 and len(summary["reward_curve"]) == len(summary["kl_curve"]) == 2
    assert all(k >= 0 for k in summary["kl_curve"]) and summary["final_kl"] > 0  # it moved, a little
    # thresholds kept from SFT (no validation set given); label embeddings recomputed (they moved)
    assert (out / "thresholds.json").read_text() == (trained_model / "thresholds.json").read_text()
    import numpy as np

    new, old = np.load(out / "label_embeddings.npy"), np.load(trained_model / "label_embeddings.npy")
    assert new.shape == old.shape and not np.allclose(new, old)
    prediction = Classifier.load(out).predict(["The VAT return for Q3 2023 was filed late."])[0]
    assert set(prediction.scores) == set(json.loads((trained_model / "labels.json").read_text()))


def test_policy_starts_at_reference_and_resumes_from_checkpoint(grpo_run, trained_model, export_dir):
    _, root = grpo_run
    labels = list(json.loads((trained_model / "labels.json").read_text()))
    config = small_config(steps=3, label_gradients=True)
    trainer = GRPOTrainer(trained_model, feedback_tensors(export_dir, labels), config)
    with torch.no_grad():
        _, logits = trainer.model(trainer.feedback.texts, trainer.label_texts)
    torch.testing.assert_close(logits, trainer.ref_logits, atol=1e-4, rtol=0)  # new LoRA starts at zero
    assert trainer.load_checkpoint(root / "ckpt")
    assert trainer.step == 2 and len(trainer.history) == 2
    with torch.no_grad():
        _, moved = trainer.model(trainer.feedback.texts, trainer.label_texts)
    assert not torch.allclose(moved, trainer.ref_logits, atol=1e-4)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    record = trainer.train_step()
    assert record["step"] == 3 and 0.0 <= record["clip_fraction"] <= 1.0
    moved = [
        n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])
    ]
    assert moved and all("lora_" in n for n in moved)  # only the new adapter trains; the bias stays


def test_per_label_credit_with_kl_budget_stops_early(trained_model, export_dir):
    labels = list(json.loads((trained_model / "labels.json").read_text()))
    config = small_config(steps=5, credit="label", target_kl=1e-9, lr=1e-3, label_gradients=False)
    trainer = GRPOTrainer(trained_model, feedback_tensors(export_dir, labels), config)
    history = trainer.fit()
    # the first step moves the policy (KL > 0 from the second inner iteration on): budget spent
    assert trainer.stopped_early and len(history) == 1 and history[0]["kl"] > 1e-9


def test_feedback_with_a_label_the_model_lacks_is_refused(tmp_path):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}")
    store.register_model("v", {"vat": "VAT.", "customs": "Customs duties."})
    from labelmatch.feedback.feedback_store import FeedbackRecord

    store.add(FeedbackRecord("import duties on parts", "v", ["customs"], 2, id="r1"))
    export = store.export(tmp_path / "export")
    with pytest.raises(DataError, match="record r1: label 'customs' is not a label of the model"):
        feedback_tensors(export, ["vat", "tax_problem"])


def test_config_validation():
    with pytest.raises(ConfigError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ConfigError, match="clip_eps"):
        GRPOConfig(clip_eps=1.5)
    with pytest.raises(ConfigError, match="credit"):
        GRPOConfig(credit="document")
    with pytest.raises(ConfigError, match="target_kl"):
        GRPOConfig(target_kl=0.0)
    with pytest.raises(ConfigError, match="unknown GRPOConfig field"):
        GRPOConfig.from_dict({"gamma": 0.9})
    with pytest.raises(ConfigError, match="replay_kl_weight"):
        GRPOConfig(replay_kl_weight=-1.0)
    with pytest.raises(ConfigError, match="replay_batch_size"):
        GRPOConfig(replay_batch_size=0)


def _replay_kl(trainer: GRPOTrainer, texts: list[str]) -> float:
    """Mean KL of the trainer's policy to its reference (adapter disabled) on ``texts``."""
    with torch.no_grad():
        return bernoulli_kl(trainer._forward(texts)[1], trainer._reference_logits(texts)).mean().item()


def test_replay_keeps_the_policy_near_sft_on_replayed_documents(trained_model, export_dir):
    """The replay KL term holds the policy to the reference on SFT training documents that the
    feedback never covers; without it the same steps move them further. A replay term without
    replay documents is refused."""
    from conftest import make_tiny_dataset

    labels = list(json.loads((trained_model / "labels.json").read_text()))
    feedback = feedback_tensors(export_dir, labels)
    replay = replay_tensors(make_tiny_dataset().split("train"), labels, max_documents=24, seed=0)
    assert len(replay.texts) == 24 and replay.targets.shape == (24, len(labels))
    assert (replay.targets.sum(1) >= 1).all()
    with pytest.raises(ConfigError, match="no replay documents were given: pass the SFT training data"):
        GRPOTrainer(trained_model, feedback, small_config(replay_kl_weight=1.0))
    with pytest.raises(ConfigError, match=r"replay_kl_weight 1, replay_bce_weight 0\.5; on by default"):
        train_grpo(trained_model, export_dir, Path("unused"), GRPOConfig(progress=False))
    moved = {}
    for weight in (0.0, 20.0):
        config = small_config(steps=4, lr=5e-3, target_kl=None, replay_kl_weight=weight, replay_batch_size=8)
        trainer = GRPOTrainer(trained_model, feedback, config, replay)
        history = trainer.fit()
        assert ("replay_kl" in history[-1]) == (weight > 0)
        moved[weight] = _replay_kl(trainer, replay.texts)
    assert moved[0.0] > 0 and moved[20.0] < 0.8 * moved[0.0], moved  # measured here: 0.90 vs 0.48


def test_feedback_on_test_documents_is_not_trained_on(trained_model, export_dir):
    labels = list(json.loads((trained_model / "labels.json").read_text()))
    everything = feedback_tensors(export_dir, labels)
    # Two records' texts appear (re-spaced, re-cased) among the evaluation's test documents.
    test_texts = [f"  {everything.texts[0].upper()} ", everything.texts[3].replace(" ", "  "), "unrelated"]
    kept = feedback_tensors(export_dir, labels, exclude_texts=test_texts)
    assert kept.excluded_test_overlap == 2 and len(kept.texts) == len(everything.texts) - 2
    assert everything.texts[0] not in kept.texts and everything.texts[3] not in kept.texts
    assert kept.served.shape[0] == kept.weights.shape[0] == len(kept.texts)
    with pytest.raises(DataError, match=r"all 12 feedback records are test documents"):
        feedback_tensors(export_dir, labels, exclude_texts=everything.texts)


@pytest.fixture(scope="module")
def flood_export(trained_model, tmp_path_factory) -> Path:
    """12 honest records (5 users with 2 each, 2 anonymous) and 12 by ``mallory`` (half of all)."""
    from labelmatch.feedback.feedback_store import FeedbackRecord

    root = tmp_path_factory.mktemp("flood")
    labels = json.loads((trained_model / "labels.json").read_text())
    names = list(labels)
    store = FeedbackStore(f"sqlite:///{root / 'f.db'}")
    store.register_model("v", labels)
    for i in range(12):
        principal = f"user-{i // 2}" if i < 12 - 2 else ""
        store.upsert(FeedbackRecord(f"honest document {i}", "v", [names[i % len(names)]], 4,
                                    principal=principal, prediction_id=f"p{i}"))
    for i in range(12):
        store.upsert(FeedbackRecord(f"flood document {i}", "v", [names[0]], 5, principal="mallory",
                                    prediction_id=f"m{i}"))
    return store.export(root / "export", current_version="v")


def test_a_flood_by_one_principal_is_capped_in_the_trainer(trained_model, flood_export):
    """One principal holding half the records weighs max_principal_share of the run; the others
    keep their weights, and the loss is normalised by the run's mean weight."""
    names = list(json.loads((trained_model / "labels.json").read_text()))
    feedback = feedback_tensors(flood_export, names)
    assert feedback.principals.count("mallory") == 12
    assert feedback.principals.count("(unknown:api)") == 2  # FeedbackRecord's default source
    trainer = GRPOTrainer(trained_model, feedback, small_config(max_principal_share=0.2))
    report = trainer.principal_weights.report()
    attacker = [i for i, p in enumerate(feedback.principals) if p == "mallory"]
    assert report["top"][0]["principal"] == "mallory" and report["top"][0]["share_before"] == 0.5
    assert trainer.weights[attacker].sum() / trainer.weights.sum() == pytest.approx(0.2)
    assert report["capped_principals"] == 1 and report["largest_share_after"] == pytest.approx(0.2)
    honest = [i for i in range(len(feedback.texts)) if i not in attacker]
    assert torch.equal(trainer.weights[honest], feedback.weights[honest])  # untouched
    assert trainer._weight_norm == pytest.approx(trainer.weights.mean().item())
    uncapped = GRPOTrainer(trained_model, feedback, small_config(max_principal_share=1.0))
    assert torch.equal(uncapped.weights, feedback.weights)


def test_the_cli_takes_the_cap_and_reports_it(trained_model, flood_export, tmp_path, sample_dir):
    """The cap and the replay options reach the run (recorded in the model's labelmatch.json)."""
    from typer.testing import CliRunner

    from labelmatch.cli import app, register_commands

    register_commands()
    result = CliRunner().invoke(app, [
        "grpo", "--model", str(trained_model), "--feedback", str(flood_export), "--out", str(tmp_path / "m"),
        "--steps", "1", "--max-principal-share", "0.25", "--no-progress",
        "--replay-data", str(sample_dir), "--replay-kl-weight", "0.5", "--replay-bce-weight", "0.25",
    ])
    assert result.exit_code == 0, result.output
    assert ("principals: 7, cap 0.25 of the weight: 1 capped, largest share 0.500 → 0.250, 25.0% of the "
            "weight moved") in result.output
    info = json.loads((tmp_path / "m" / "labelmatch.json").read_text())
    assert info["grpo"]["config"]["max_principal_share"] == 0.25
    config = info["grpo"]["config"]
    assert config["replay_kl_weight"] == 0.5 and config["replay_bce_weight"] == 0.25
    assert "replay_kl" in info["history"][-1] and "replay_bce" in info["history"][-1]
    assert info["grpo"]["principals"]["top"][0] == {
        "principal": "mallory", "records": 12, "share_before": 0.5, "share_after": pytest.approx(0.25),
        "capped": True}
