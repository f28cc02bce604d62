"""SFT training, the Model artifact, resumable checkpoints and reloading."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_dataset, tiny_config

from labelmatch.core.artifacts import verify_artifact
from labelmatch.core.errors import ArtifactError, ConfigError
from labelmatch.model.classifier import Classifier
from labelmatch.model.io import read_model_info
from labelmatch.training.sft import SFTTrainer, lr_multiplier

PROBE = [
    "Late VAT filing for FY2022 led to a penalty notice.",
    "Withholding tax on dividends paid to the parent.",
]


def test_model_artifact_contents(trained_model):
    manifest = verify_artifact(trained_model, "Model")
    names = set(manifest["files"])
    assert {"labels.json", "label_embeddings.npy", "thresholds.json", "labelmatch.json"} <= names
    assert any(n.startswith("adapter/") for n in names) and any(n.startswith("tokenizer/") for n in names)
    info = read_model_info(trained_model)
    labels = json.loads((trained_model / "labels.json").read_text())
    emb = np.load(trained_model / "label_embeddings.npy")
    assert emb.shape == (len(labels), info["embedding_dim"]) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert info["base_model"] == "bundled:minilm" and len(info["base_model_digest"]) == 64
    assert info["history"] and info["config"]["lora_rank"] == 8 and info["pooling"] == "mean"
    thresholds = json.loads((trained_model / "thresholds.json").read_text())
    assert set(thresholds["labels"]) == set(labels)


def test_training_improves_over_zero_shot_on_validation(tmp_path):
    dataset = make_tiny_dataset()
    trainer = SFTTrainer(dataset, tiny_config(epochs=3))
    first_val = trainer.run_iteration().val_macro_f1
    trainer.fit()
    assert trainer.best_f1 >= first_val and trainer.best_f1 > 0.4
    assert [h["iteration"] for h in trainer.history] == list(range(1, len(trainer.history) + 1))
    # Micro-F1 at the same threshold is reported beside it: recomputed here from the kept weights.
    from sklearn.metrics import f1_score

    from labelmatch.evaluation.metrics import binarize

    kept = max(trainer.history, key=lambda row: row["val_macro_f1"])
    predicted = binarize(trainer.validation_scores(), kept["val_threshold"])
    assert kept["val_micro_f1"] == pytest.approx(f1_score(trainer.val_targets, predicted, average="micro"))


def test_reload_in_fresh_process_gives_identical_scores(trained_model, tmp_path):
    _, here = Classifier.load(trained_model).scores(PROBE)
    script = (
        "import json,sys; from labelmatch.model.classifier import Classifier; "
        f"print(json.dumps(Classifier.load(sys.argv[1]).scores({PROBE!r})[1].tolist()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(trained_model)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert np.array_equal(np.array(json.loads(out.stdout.strip().splitlines()[-1]), dtype=np.float32), here)


def test_flipped_byte_in_weights_is_refused(trained_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(trained_model, copy)
    weights = next((copy / "adapter").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"file adapter/adapter_model.safetensors is corrupted"):
        Classifier.load(copy)


def test_checkpoint_resume_continues_exactly(tmp_path):
    dataset = make_tiny_dataset()
    config = tiny_config(epochs=2, steps_per_iteration=2, lora_dropout=0.0)
    straight = SFTTrainer(dataset, config)
    straight.run_iteration()
    straight.save_checkpoint(tmp_path / "ckpt")
    expected = straight.run_iteration()
    resumed = SFTTrainer.load_checkpoint(tmp_path / "ckpt", make_tiny_dataset())
    got = resumed.run_iteration()
    assert got.step == expected.step == 4
    assert got.train_loss["loss"] == pytest.approx(expected.train_loss["loss"], rel=1e-4)
    assert got.val_macro_f1 == pytest.approx(expected.val_macro_f1, abs=1e-6)


def test_checkpoint_keeps_its_lora_rank_and_applies_new_hyperparameters(tmp_path):
    dataset = make_tiny_dataset()
    trainer = SFTTrainer(dataset, tiny_config(lora_rank=4, steps_per_iteration=1))
    trainer.run_iteration()
    bias, scale = trainer.model.bias.item(), trainer.model.scale
    trainer.save_checkpoint(tmp_path / "c")
    restored = SFTTrainer.load_checkpoint(
        tmp_path / "c", dataset, {"lora_rank": 16, "lr": 5e-4, "scale": 2 * scale}
    )
    assert restored.config.lora_rank == 4 and restored.config.lr == 5e-4
    assert restored.model.bias.item() == pytest.approx(2 * bias, rel=1e-5)  # boundary kept under a new scale
    assert restored.optimizer.param_groups[0]["lr"] == pytest.approx(
        5e-4 * lr_multiplier(1, restored.total_steps, 0.1, "linear")
    )


def test_schedule_shape():
    values = [lr_multiplier(s, 100, 0.1, "linear") for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0) and values[-1] < 0.02
    assert lr_multiplier(55, 100, 0.1, "cosine") == pytest.approx(0.5, abs=0.02)


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="warmup_ratio"):
        tiny_config(warmup_ratio=1.5)
    with pytest.raises(ConfigError, match="max_lengthened_epochs"):
        tiny_config(max_lengthened_epochs=0)
    with pytest.raises(ConfigError, match="unknown TrainConfig field"):
        type(tiny_config()).from_dict({"learning_rate": 1e-3})


@pytest.mark.parametrize(("text", "line", "field", "message"), [
    ('{\n  "epochs": 2,\n  "lr": "1e-3"\n}\n', 3, "lr", "expected a number, got a string '1e-3'"),
    ('{\n  "epochs": true\n}', 2, "epochs", "expected an integer, got a boolean true"),
    ('{\n  "schedule": "cos"\n}', 2, "schedule", "expected one of 'linear', 'cosine', got a string 'cos'"),
    ('{\n  "lora_target_modules": "query"\n}', 2, "lora_target_modules", "expected a list of strings"),
    ('{\n  "learning_rate": 0.001\n}', 2, "learning_rate", "unknown setting"),
    ('{\n  "epochs": 0\n}', 2, "epochs", "TrainConfig.epochs must be > 0, got 0"),
    ('{"epochs": 2,}', 1, None, "invalid JSON"),
])
def test_train_config_file_fields_are_type_checked_with_file_and_line(tmp_path, text, line, field, message):
    """``train --config``: a bad field is one line naming file, line and field, before any data
    is read or anything written."""
    from typer.testing import CliRunner

    from labelmatch.cli import app, register_commands
    from labelmatch.core.errors import DataError

    register_commands()
    config = tmp_path / "train.json"
    config.write_text(text)
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "missing"), "--out",
                                      str(tmp_path / "model"), "--config", str(config)])
    assert isinstance(result.exception, DataError), result.output
    err = result.exception
    assert (err.path, err.line, err.field) == (str(config), line, field)
    assert message in str(err) and "\n" not in str(err)
    assert not (tmp_path / "model").exists()


def test_labels_without_positives_are_one_summarised_warning(caplog):
    """100,000 labels and a few documents: one line with the count and the first few names, not
    one line per label (the trainer logs this line)."""
    from labelmatch.data.dataset import Dataset, Document, without_positives_warning

    labels = {f"label_{i:06d}": f"Description of label {i}." for i in range(100_000)}
    docs = [Document("a", "VAT return", ["label_000000"], split="train"),
            Document("b", "Payroll", ["label_000001"], split="train"),
            Document("c", "Customs", ["label_000002"], split="val")]
    message = without_positives_warning(Dataset(docs, labels))
    assert message is not None and "\n" not in message and len(message) < 400
    assert message.startswith("99,998 of 100,000 labels have no positive training document "
                              "(1 of them have some in validation): 'label_000002', 'label_000003'")
    assert message.count("label_") == 5 and "and 99,993 more" in message

    dataset = make_tiny_dataset()
    dataset.labels.update({f"new_{i}": f"A label nobody uses, number {i}." for i in range(40)})
    with caplog.at_level("WARNING", logger="labelmatch.training.sft"):
        SFTTrainer(dataset, tiny_config())
    [record] = [r for r in caplog.records if "no positive training document" in r.getMessage()]
    assert record.getMessage().startswith("40 of 48 labels have no positive training document")


def test_lora_targets_default_per_architecture_overridable_and_checked():
    from labelmatch.model.encoder import add_lora, load_base

    adapted_names: list[str] = []

    def adapted(targets):
        model = add_lora(load_base("bundled:minilm")[0], 4, 8.0, 0.0, targets)
        adapted_names[:] = [n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n]
        return {n.rsplit(".", 1)[-1] for n in adapted_names}

    # Every linear layer of all 6 blocks (attention q/k/v/output, feed-forward in/out); not the pooler.
    assert adapted(None) == {"query", "key", "value", "dense"}
    assert len(adapted_names) == 6 * 6 and not any("pooler" in n for n in adapted_names)
    assert adapted(["query", "value"]) == {"query", "value"}
    with pytest.raises(ConfigError, match=r"lora_target_modules \['qkv_proj'\]"):
        adapted(["qkv_proj"])


def test_inference_max_length_is_what_validation_and_the_saved_model_read(tmp_path):
    dataset = make_tiny_dataset(60)
    trainer = SFTTrainer(dataset, tiny_config(epochs=1, max_length=16, inference_max_length=64))
    trainer.fit()
    assert trainer.model.encoder.max_length == 16  # training batches stay short
    out = trainer.save_model(tmp_path / "model")
    assert read_model_info(out)["max_length"] == 64
    classifier = Classifier.load(out)
    texts = [d.text for d in trainer.val_set.documents]
    names, saved = classifier.scores(texts)
    assert names == trainer.label_names
    assert np.allclose(saved, trainer.validation_scores(), atol=1e-5)
    classifier.encoder.max_length = 16
    _, short = classifier.scores(texts)
    assert np.abs(short - saved).max() > 1e-3  # the longer window changed what the model read
    with pytest.raises(ConfigError, match="inference_max_length"):
        tiny_config(inference_max_length=0)


def _row_gradients(trainer: SFTTrainer, matrix, rows: list[int]) -> float:
    """Total gradient magnitude reaching the LoRA weights from the given label rows."""
    import torch

    params = [p for n, p in trainer.model.named_parameters() if p.requires_grad and n != "bias"]
    grads = torch.autograd.grad(matrix[rows].sum(), params, allow_unused=True, retain_graph=True)
    return float(sum(g.abs().sum() for g in grads if g is not None))


def test_cached_label_embeddings_keep_positives_live_and_negatives_fixed():
    import torch

    dataset = make_tiny_dataset(60)
    trainer = SFTTrainer(dataset, tiny_config(label_refresh_steps=3, batch_size=2))
    trainer.model.train()
    batch = trainer._next_batch()
    positives = sorted(torch.nonzero(trainer.targets[batch].sum(0)).flatten().tolist())
    negatives = [j for j in range(len(trainer.label_names)) if j not in positives]
    assert positives and negatives
    matrix = trainer._label_matrix(batch)
    assert _row_gradients(trainer, matrix, positives) > 0  # positives embedded with gradient
    assert _row_gradients(trainer, matrix, negatives) == 0  # negatives from the cache
    assert torch.equal(matrix[negatives].detach(), trainer._label_cache[negatives])
    for _ in range(3):  # steps 0-2: the cache is built at step 0, then only live rows change
        trainer.train_step()
    fresh = trainer.model.encoder.embed(trainer.label_texts)
    assert not torch.allclose(trainer._label_cache, fresh, atol=1e-5)  # stale between refreshes
    batch = trainer._next_batch()
    live_rows = set(torch.nonzero(trainer.targets[batch].sum(0)).flatten().tolist())
    trainer._label_matrix(batch)  # step 3: refreshed from the trained encoder
    cached = [j for j in range(len(trainer.label_names)) if j not in live_rows]
    assert torch.allclose(trainer._label_cache[cached], fresh[cached], atol=1e-5)

    live = SFTTrainer(dataset, tiny_config(label_refresh_steps=0, batch_size=2))
    live.model.train()
    batch = live._next_batch()
    matrix = live._label_matrix(batch)
    assert all(_row_gradients(live, matrix, [j]) > 0 for j in range(len(live.label_names)))


def test_labels_grouped_by_length_are_embedded_in_order_with_gradient_and_no_dropout_by_default():
    import torch

    dataset = make_tiny_dataset(30)
    trainer = SFTTrainer(dataset, tiny_config())
    encoder = trainer.model.encoder
    encoder.train()
    texts = [*trainer.label_texts, "a much longer description " * 12, "short"]
    grouped = encoder.encode(texts, group_size=3)
    assert grouped.requires_grad and grouped.shape == (len(texts), encoder.dim)
    with torch.no_grad():  # one padded batch: the same embeddings, row for row
        one_batch = encoder(encoder.tokenize(texts))
    assert torch.allclose(grouped.detach(), one_batch, atol=1e-5)
    # Default: no dropout anywhere in training (train mode computes what eval mode does).
    assert trainer.config.lora_dropout == 0.0 and trainer.config.encoder_dropout == 0.0
    dropouts = [m for m in encoder.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
    with_dropout = SFTTrainer(dataset, tiny_config(encoder_dropout=None))
    assert any(m.p > 0 for m in with_dropout.model.encoder.model.modules() if isinstance(m, torch.nn.Dropout))


def test_ranking_term_reaches_the_training_loss_only_when_asked():
    dataset = make_tiny_dataset(30)
    plain = SFTTrainer(dataset, tiny_config()).train_step()
    ranked = SFTTrainer(dataset, tiny_config(ranking_weight=1.0)).train_step()
    assert plain["ranking"] == 0.0 and ranked["ranking"] > 0.0
    assert ranked["loss"] == pytest.approx(plain["loss"] + ranked["ranking"], rel=1e-4)
    with pytest.raises(ConfigError, match="ranking_scale"):
        tiny_config(ranking_scale=0.0)


def test_sampled_strategy_scores_positives_and_the_requested_negatives(tiny_dataset):
    import torch

    from labelmatch.training.config import TrainConfig

    config = tiny_config(label_strategy="sampled", hard_negatives=2, random_negatives=1)
    trainer = SFTTrainer(tiny_dataset, config)
    assert trainer.label_strategy == "sampled"
    batch = trainer._next_batch()
    encoder = trainer.model.encoder
    doc_emb = encoder(encoder.tokenize([trainer.train_set.documents[i].text for i in batch]))
    live, columns = trainer._sampled_labels(batch, doc_emb)
    positive = set(torch.nonzero(trainer.targets[batch].sum(0)).flatten().tolist())
    assert positive <= set(columns.tolist())
    assert len(columns) == min(len(positive) + 3, len(trainer.label_texts))
    assert live.shape == (len(columns), encoder.dim) and live.requires_grad
    loss = trainer.train_step()["loss"]
    assert np.isfinite(loss)
    assert TrainConfig().strategy_for(256) == "all" and TrainConfig().strategy_for(257) == "sampled"


TEN_THOUSAND_LABELS = """
import json, resource, sys, time
from conftest import make_tiny_dataset, tiny_config
from labelmatch.training.sft import SFTTrainer

dataset = make_tiny_dataset()
words = ["tax", "invoice", "refund", "court", "customs", "payroll", "pension", "lease", "audit", "merger"]
for i in range(10_000):
    a, b, c = words[i % 10], words[(i // 10) % 10], words[(i // 100) % 10]
    dataset.labels[f"synthetic_{i:05d}"] = f"Documents about {a} and {b} in case {i}, filed under {c}."
started = time.perf_counter()
trainer = SFTTrainer(dataset, tiny_config(epochs=1, steps_per_iteration=3, max_length=32))
result = trainer.run_iteration()
print(json.dumps({"strategy": trainer.label_strategy, "labels": len(trainer.label_texts),
                  "steps": trainer.step, "val_macro_f1": result.val_macro_f1,
                  "seconds": time.perf_counter() - started,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def test_ten_thousand_labels_train_within_a_memory_bound(tmp_path):
    """10,000 labels (the old all-live step died at 8.6 GB): a few steps and a validation, in a
    process of its own whose peak RSS is measured."""
    import os

    script = tmp_path / "ten_thousand.py"
    script.write_text(TEN_THOUSAND_LABELS)
    tests_dir = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(result)
    assert result["strategy"] == "sampled" and result["labels"] == 10_008 and result["steps"] == 3
    assert result["peak_rss_mb"] < 4096, result
