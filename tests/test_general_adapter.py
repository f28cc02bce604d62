"""The general zero-shot adapter: mixture training, starting from an adapter, the shipped layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_dataset, tiny_config

from labelmatch.core.errors import ConfigError
from labelmatch.data.dataset import Dataset
from labelmatch.model import general_adapter
from labelmatch.model.classifier import Classifier
from labelmatch.training.config import TrainConfig
from labelmatch.training.mixture import MixtureTrainer, NamedDataset, combine
from labelmatch.training.sft import SFTTrainer, planned_steps


def _lora_state(trainer: SFTTrainer) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model.encoder.model).items()}


def test_mixture_scores_each_part_against_its_own_labels():
    tiny = make_tiny_dataset(80)
    first = dict(list(tiny.labels.items())[:3])
    # Two parts with the same label descriptions: pooled, a document of one would be a negative of
    # the other's identical label. The mixture must keep them apart.
    parts = [NamedDataset("a", tiny), NamedDataset("b", Dataset(tiny.documents, tiny.labels))]
    trainer = MixtureTrainer(parts, tiny_config(epochs=1, base_adapter="none", min_steps=0))
    owners = np.array([name.split("/")[0] for name in trainer.label_names])
    for _ in range(4):
        batch = trainer._next_batch()
        part = {trainer.train_set.documents[i].id.split("/")[0] for i in batch}
        assert len(part) == 1
        _, columns = trainer._step_labels(batch, torch.zeros(1))
        assert set(owners[columns.numpy()]) == part
    scores = trainer.validation_scores()
    rows = np.array([d.id.split("/")[0] for d in trainer.val_set.documents])
    assert (scores[rows == "a"][:, owners == "b"] == 0).all()
    assert (scores[rows == "b"][:, owners == "a"] == 0).all()
    assert (scores[rows == "a"][:, owners == "a"] > 0).all()
    trainer.run_iteration()
    assert trainer.step > 0 and 0 < trainer.best_f1 <= 1
    trainer.labels_per_step = 2  # a step's positives always, then random others up to the cap
    for _ in range(4):
        batch = trainer._next_batch()
        _, columns = trainer._step_labels(batch, torch.zeros(1))
        positives = set(np.flatnonzero(trainer.targets[batch].sum(0).numpy() > 0))
        assert positives <= set(columns.tolist()) and len(columns) == max(2, len(positives))
    with pytest.raises(ConfigError, match="distinct"):
        combine([NamedDataset("a", tiny), NamedDataset("a", Dataset(tiny.documents, first))])
    with pytest.raises(ConfigError, match="label_strategy"):
        MixtureTrainer(parts, tiny_config(label_strategy="sampled", base_adapter="none"))


def test_training_starts_from_a_base_adapter(trained_model, tiny_dataset, tmp_path):
    fresh = SFTTrainer(tiny_dataset, tiny_config(base_adapter="none"))
    started = SFTTrainer(tiny_dataset, tiny_config(base_adapter=str(trained_model)))
    shipped = general_adapter.adapter_state(general_adapter.resolve_base_adapter(str(trained_model), "x"))
    ours, zero = _lora_state(started), _lora_state(fresh)
    assert ours.keys() == shipped.keys()
    for key, value in shipped.items():
        assert torch.equal(ours[key], value)
    assert any("lora_B" in k and zero[k].abs().sum() == 0 for k in zero)  # fresh: B starts at zero
    # The start already classifies: validation macro-F1 before any step is the trained model's.
    from labelmatch.evaluation.metrics import tune_global_threshold

    before = tune_global_threshold(started.val_targets, started.validation_scores())[1]
    fresh_before = tune_global_threshold(fresh.val_targets, fresh.validation_scores())[1]
    assert before > fresh_before
    started.run_iteration()
    started.save_model(tmp_path / "m")
    recorded = json.loads((tmp_path / "m" / "labelmatch.json").read_text())["base_adapter"]
    assert recorded["name"] == str(trained_model) and len(recorded["sha256"]) == 64
    with pytest.raises(ConfigError, match="lora_rank"):
        SFTTrainer(tiny_dataset, tiny_config(base_adapter=str(trained_model), lora_rank=4))
    with pytest.raises(ConfigError, match=r"no adapter_config\.json"):
        SFTTrainer(tiny_dataset, tiny_config(base_adapter=str(tmp_path)))


def test_exported_adapter_serves_zero_shot_like_the_model_it_came_from(trained_model, tmp_path):
    out = general_adapter.export_general_adapter(trained_model, tmp_path / "ga")
    weights = (out / general_adapter.WEIGHTS).stat().st_size
    assert weights < 0.6 * (trained_model / "adapter" / general_adapter.WEIGHTS).stat().st_size  # float16
    info = json.loads((out / general_adapter.INFO).read_text())
    model = Classifier.load(trained_model)
    assert info["threshold"] == model.thresholds.default
    assert "Intended use" in (out / "MODEL_CARD.md").read_text()
    texts = ["The VAT refund for the consulting invoices was rejected.", "Transfer pricing documentation."]
    names, expected = model.scores(texts, model.labels, replace=True)
    zero_shot = Classifier.zero_shot(model.labels, max_length=model.encoder.max_length, base_adapter=str(out))
    same_names, got = zero_shot.scores(texts)
    assert same_names == names
    assert np.abs(got - expected).max() < 0.02  # the same model, its LoRA weights rounded to float16
    plain = Classifier.zero_shot(model.labels, max_length=model.encoder.max_length, base_adapter="none")
    assert np.abs(plain.scores(texts)[1] - expected).max() > 0.05  # and not the plain encoder
    assert zero_shot.thresholds.default == info["threshold"]



def test_zero_shot_merges_the_share_of_the_delta_the_adapter_records(trained_model, tmp_path):
    """WiSE-FT: ``zero_shot_scale`` s merges base + s * delta, at the threshold tuned for that share;
    training still starts from the full weights."""
    full = general_adapter.export_general_adapter(trained_model, tmp_path / "full")
    half = general_adapter.export_general_adapter(trained_model, tmp_path / "half", zero_shot_scale=0.5,
                                                  threshold=0.7)
    info = json.loads((half / general_adapter.INFO).read_text())
    assert info["zero_shot_scale"] == 0.5 and info["threshold"] == 0.7
    assert "merges 0.5 of its LoRA delta" in (half / general_adapter.CARD).read_text()
    labels = {"a": "Value added tax.", "b": "Customs duties."}

    def weights(adapter: str) -> dict[str, torch.Tensor]:
        clf = Classifier.zero_shot(labels, max_length=32, base_adapter=adapter)
        return {k: v.detach().clone() for k, v in clf.encoder.model.state_dict().items()}

    base, at_full, at_half = weights("none"), weights(str(full)), weights(str(half))
    changed = [k for k in base if not torch.equal(base[k], at_full[k])]
    assert changed  # the adapter moves the LoRA targets' weights
    for key in changed:
        assert torch.allclose(at_half[key], (base[key] + at_full[key]) / 2, atol=1e-5)
    loaded_half = Classifier.load(trained_model, share=0.5).encoder.model.state_dict()
    assert all(torch.allclose(loaded_half[key], at_half[key], atol=1e-5) for key in changed)
    zero_shot = Classifier.zero_shot(labels, max_length=32, base_adapter=str(half))
    assert zero_shot.thresholds.default == 0.7 and zero_shot.info["base_adapter"]["zero_shot_scale"] == 0.5
    tiny = make_tiny_dataset()
    started = _lora_state(SFTTrainer(tiny, tiny_config(base_adapter=str(half))))
    stored = general_adapter.adapter_state(general_adapter.resolve_base_adapter(str(half), "x"))
    assert all(torch.equal(started[key], value) for key, value in stored.items())  # full weights, not half
    with pytest.raises(ConfigError, match="needs the threshold"):
        general_adapter.export_general_adapter(trained_model, tmp_path / "x", zero_shot_scale=0.5)
    info["zero_shot_scale"] = 1.5
    (half / general_adapter.INFO).write_text(json.dumps(info))
    with pytest.raises(ConfigError, match=r"general_adapter\.json: zero_shot_scale 1\.5"):
        Classifier.zero_shot(labels, base_adapter=str(half))


def test_base_adapter_names_resolve_or_fail_clearly(monkeypatch, tmp_path):
    assert general_adapter.resolve_base_adapter("none", "bundled:minilm") is None
    assert general_adapter.resolve_base_adapter("auto", "BAAI/bge-m3") is None
    with pytest.raises(ConfigError, match="is for bundled:minilm"):
        general_adapter.resolve_base_adapter("general", "BAAI/bge-m3")
    monkeypatch.setattr(general_adapter, "BUNDLED_DIR", tmp_path)
    assert general_adapter.resolve_base_adapter("auto", "bundled:minilm") is None
    with pytest.raises(ConfigError, match="not installed"):
        general_adapter.resolve_base_adapter("general", "bundled:minilm")


@pytest.mark.skipif(not general_adapter.bundled_available(), reason="the general adapter is not built")
def test_the_shipped_adapter_is_small_float16_and_the_default():
    adapter = general_adapter.resolve_base_adapter("auto", "bundled:minilm")
    assert adapter is not None and adapter.name == "general"
    assert (adapter.path / general_adapter.WEIGHTS).stat().st_size < 1024 * 1024
    state = general_adapter.adapter_state(adapter)
    assert state and all(v.dtype == torch.float32 for v in state.values())
    from safetensors import safe_open

    with safe_open(str(adapter.path / general_adapter.WEIGHTS), "pt") as f:
        names = list(f.keys())
        assert {f.get_tensor(k).dtype for k in names} == {torch.float16}
    assert TrainConfig().base_adapter == "auto"
    trainer = SFTTrainer(make_tiny_dataset(), tiny_config(base_adapter="auto"))  # the default starts from it
    assert trainer.base_adapter is not None and trainer.base_adapter.name == "general"
    for key, value in _lora_state(trainer).items():
        assert torch.equal(value, state[key])
    zero_shot = Classifier.zero_shot({"a": "x"})
    assert zero_shot.info["base_adapter"]["sha256"] == adapter.digest
    assert zero_shot.thresholds.default == adapter.threshold
    shipped = json.loads((adapter.path / general_adapter.INFO).read_text())
    assert 0 < adapter.zero_shot_scale == shipped["zero_shot_scale"] <= 1
    assert zero_shot.info["base_adapter"]["zero_shot_scale"] == adapter.zero_shot_scale
    card = (adapter.path / general_adapter.CARD).read_text()
    assert "BANKING77 was never used" in card and "licences" in card and "Limitations" in card


@pytest.mark.parametrize(
    ("docs", "changes", "expected"),
    [
        (216, {"min_steps": 200}, (200, 67)),  # Bitext at 8 per label: 14 steps an epoch
        (216, {"min_steps": 0}, (42, 14)),
        (4000, {"min_steps": 200}, (750, 250)),  # enough data: epochs decide
        (216, {"min_steps": 200, "steps_per_iteration": 10}, (200, 10)),
        (216, {}, (210, 70)),  # the defaults: 400 steps, but at most 15 passes (210 steps) of 8 per label
        (432, {}, (400, 134)),  # 16 per label: 400 steps are 14.8 passes
        (216, {"min_steps": 400, "max_lengthened_epochs": None}, (400, 134)),
        (1728, {}, (400, 134)),  # 64 per label: 3 epochs are 324 steps, lengthened to 400
    ],
)
def test_few_documents_train_at_least_min_steps(docs, changes, expected):
    assert planned_steps(docs, TrainConfig(epochs=3, batch_size=16, **changes)) == expected
