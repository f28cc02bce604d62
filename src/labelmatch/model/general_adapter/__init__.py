"""The general zero-shot adapter that ships with labelmatch, and how a model starts from it.

A LoRA adapter for the bundled MiniLM, trained on a mixture of public labelled datasets with
natural-language label descriptions (``make train-general-adapter``; its sources, commits and
licences are in ``MODEL_CARD.md`` beside this file). It is the starting point of two things when
the base encoder is ``bundled:minilm`` and ``base_adapter`` is ``auto`` (the default):

* zero-shot prediction (``labelmatch predict --labels`` without a model): the adapter merged into
  the encoder, with the logit scale and bias it was trained with; only a share of its LoRA delta
  (``zero_shot_scale`` in ``general_adapter.json``: WiSE-FT, the weights interpolated between the
  base encoder's and the adapter's, which loses less on data far from the mixture) and the decision
  threshold tuned on the mixture's validation documents at that share;
* training (:class:`~labelmatch.training.sft.SFTTrainer`): the new LoRA adapter starts from the
  general one's weights instead of zero, so the saved model is still one LoRA adapter on the plain
  base encoder and everything downstream (ONNX export, GRPO, serving) reads it unchanged.

``base_adapter`` takes ``auto``, ``general`` (required: an error where it cannot apply), ``none``,
or the path of another adapter directory in this layout or a Model artifact (its ``adapter/``).

The weights ship as float16 (about 0.7 MB) and are widened to float32 on load.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labelmatch.core.errors import ConfigError

BUNDLED_DIR = Path(__file__).resolve().parent
WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
INFO = "general_adapter.json"
CARD = "MODEL_CARD.md"
#: The base encoder the bundled adapter was trained for.
BUNDLED_BASE = "bundled:minilm"
CHOICES = ("auto", "general", "none")


@dataclass(frozen=True)
class BaseAdapter:
    """An adapter a model starts from.

    Attributes:
        path: Directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
        name: ``general`` for the bundled adapter, else the path as given.
        scale: Logit scale it was trained with.
        bias: Logit bias it was trained with.
        threshold: Its global decision threshold for zero-shot prediction (tuned on its
            validation documents at ``zero_shot_scale``).
        digest: sha256 of its weights file (recorded in the models trained from it).
        zero_shot_scale: Share of its LoRA delta merged for zero-shot prediction (1: all of it);
            training always starts from the full weights.
    """

    path: Path
    name: str
    scale: float
    bias: float
    threshold: float
    digest: str
    zero_shot_scale: float = 1.0

    def describe(self) -> dict[str, Any]:
        """What a model card and ``labelmatch.json`` record about it."""
        return {"name": self.name, "sha256": self.digest}


def bundled_available() -> bool:
    """Whether this installation carries the general adapter's weights."""
    return (BUNDLED_DIR / WEIGHTS).is_file() and (BUNDLED_DIR / INFO).is_file()


def _model_logits(model_dir: Path) -> tuple[dict[str, Any], float, float, float]:
    """A Model artifact's ``labelmatch.json``, logit scale, bias and global threshold."""
    from labelmatch.model.io import read_model_info
    from labelmatch.model.matching import Thresholds

    info = read_model_info(model_dir)
    thresholds_file = model_dir / "thresholds.json"
    threshold = (Thresholds.from_json(json.loads(thresholds_file.read_text()), thresholds_file).default
                 if thresholds_file.is_file() else 0.5)
    return info, float(info["scale"]), float(info["bias"]), float(threshold)


def _read(path: Path, name: str) -> BaseAdapter:
    share = 1.0
    if (path / "adapter" / PEFT_CONFIG).is_file():  # a Model artifact
        _, scale, bias, threshold = _model_logits(path)
        path = path / "adapter"
    elif (path / PEFT_CONFIG).is_file():
        info = json.loads((path / INFO).read_text()) if (path / INFO).is_file() else {}
        scale, bias, threshold = info.get("scale", 20.0), info.get("bias", -6.0), info.get("threshold", 0.5)
        share = info.get("zero_shot_scale", 1.0)
        if not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
            raise ConfigError(f"{path / INFO}: zero_shot_scale {share!r} is not a number from 0 to 1")
    else:
        raise ConfigError(f"base_adapter {name!r}: {path} has no {PEFT_CONFIG} (nor adapter/{PEFT_CONFIG})")
    weights = path / WEIGHTS
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    return BaseAdapter(path, name, float(scale), float(bias), float(threshold), digest, float(share))


def resolve_base_adapter(spec: str | None, base_model: str) -> BaseAdapter | None:
    """The adapter ``spec`` names for ``base_model``, or ``None`` (start from the plain encoder).

    Args:
        spec: ``auto`` (the general adapter where it applies: the bundled encoder, weights
            installed), ``general`` (the same, an error where it cannot apply), ``none`` / ``None``,
            or a directory (an adapter in this layout, or a Model artifact).
        base_model: The base encoder the model is built on.

    Raises:
        ConfigError: ``general`` for another base encoder or without the weights; a path that
            holds no adapter.
    """
    if spec in (None, "none"):
        return None
    if spec in ("auto", "general"):
        if base_model == BUNDLED_BASE and bundled_available():
            return _read(BUNDLED_DIR, "general")
        if spec == "auto":
            return None
        reason = ("is not installed" if base_model == BUNDLED_BASE
                  else f"is for {BUNDLED_BASE}, not {base_model}")
        raise ConfigError(f"base_adapter 'general': the general adapter {reason}; use base_adapter 'none'")
    return _read(Path(spec), spec)


def adapter_state(adapter: BaseAdapter) -> dict[str, Any]:
    """The adapter's LoRA weights as float32 tensors, keyed as peft saves them."""
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(adapter.path / WEIGHTS)).items()}


def peft_settings(adapter: BaseAdapter) -> dict[str, Any]:
    """``r``, ``lora_alpha`` and ``target_modules`` of the adapter (its ``adapter_config.json``)."""
    config = json.loads((adapter.path / PEFT_CONFIG).read_text())
    targets = config.get("target_modules") or []
    return {"r": config["r"], "lora_alpha": float(config["lora_alpha"]),
            "target_modules": sorted(targets) if isinstance(targets, list) else targets}


def start_from(peft_model: Any, adapter: BaseAdapter, required: bool) -> bool:
    """Load the adapter's weights into a fresh LoRA model of the same shape.

    Args:
        peft_model: The ``PeftModel`` :func:`~labelmatch.model.encoder.add_lora` made.
        adapter: The adapter to start from.
        required: Raise when the shapes differ (``general`` or a path); with ``False`` (``auto``)
            return ``False`` and leave the fresh adapter as it is.

    Returns:
        Whether the weights were loaded.

    Raises:
        ConfigError: ``required`` and the LoRA rank, alpha or target modules differ.
    """
    from peft import set_peft_model_state_dict

    ours = peft_model.peft_config["default"]
    theirs = peft_settings(adapter)
    mine = {"r": ours.r, "lora_alpha": float(ours.lora_alpha), "target_modules": sorted(ours.target_modules)}
    if mine != theirs:
        if required:
            raise ConfigError(f"base_adapter {adapter.name!r} has LoRA {theirs}, this training {mine}: "
                              "train with the same lora_rank, lora_alpha and lora_target_modules, or "
                              "base_adapter 'none'")
        return False
    result = set_peft_model_state_dict(peft_model, adapter_state(adapter))
    unused = list(getattr(result, "unexpected_keys", None) or [])
    if unused:
        raise ConfigError(f"base_adapter {adapter.name!r}: weights {unused[:3]} fit no LoRA module")
    return True


def merged_encoder(base: Any, adapter: BaseAdapter) -> Any:
    """``base`` with the adapter merged in at its ``zero_shot_scale``, for zero-shot prediction."""
    from peft import PeftModel

    from labelmatch.model.io import merge_share

    return merge_share(PeftModel.from_pretrained(base, str(adapter.path)), adapter.zero_shot_scale)


def export_general_adapter(model_dir: str | Path, out: str | Path, sources: str | Path | None = None,
                           evaluation: dict[str, Any] | None = None, zero_shot_scale: float = 1.0,
                           threshold: float | None = None) -> Path:
    """Write a trained mixture model's adapter in the shipped layout (float16) with its model card.

    Args:
        model_dir: The Model artifact :class:`~labelmatch.training.mixture.MixtureTrainer` saved.
        out: Target directory (this package's directory for the adapter that ships).
        sources: ``SOURCES.md`` of the datasets, appended to the model card.
        evaluation: The leave-one-dataset-out summary, recorded in ``general_adapter.json``.
        zero_shot_scale: Share of the LoRA delta zero-shot prediction merges (1: all of it).
        threshold: The zero-shot threshold, tuned on the mixture's validation documents at
            ``zero_shot_scale`` (``None``: the model's own, right at share 1 only).

    Returns:
        ``out``.
    """
    from safetensors.torch import load_file, save_file

    model_dir, out = Path(model_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(model_dir / "adapter" / WEIGHTS))
    save_file({k: v.half().contiguous() for k, v in weights.items()}, str(out / WEIGHTS))
    shutil.copyfile(model_dir / "adapter" / PEFT_CONFIG, out / PEFT_CONFIG)
    if not 0.0 <= zero_shot_scale <= 1.0:
        raise ConfigError(f"zero_shot_scale {zero_shot_scale} is not from 0 to 1")
    info, scale, bias, trained_threshold = _model_logits(model_dir)
    if threshold is None:
        if zero_shot_scale != 1.0:
            raise ConfigError("a zero_shot_scale below 1 needs the threshold tuned at that share")
        threshold = trained_threshold
    record = {
        "base_model": info.get("base_model", BUNDLED_BASE),
        "scale": scale,
        "bias": bias,
        "threshold": threshold,
        "zero_shot_scale": zero_shot_scale,
        "trained_on": info.get("mixture"),
        "train_config": info.get("config"),
        "leave_one_dataset_out": evaluation,
    }
    (out / INFO).write_text(json.dumps(record, indent=1) + "\n")
    card = [
        "# labelmatch general zero-shot adapter",
        "",
        f"A LoRA adapter (rank {peft_settings(_read(out, 'general'))['r']}) for `{record['base_model']}`, "
        "trained by `make train-general-adapter` on a mixture of public labelled datasets, each step "
        "scored against its own dataset's label descriptions (`labelmatch.training.mixture`).",
        "",
        "**Intended use**: the starting point of zero-shot prediction (`labelmatch predict --labels`) "
        "and of training on a user's labels with the bundled encoder (`--base-adapter none` turns it "
        "off). **Not for**: other base encoders; any decision without a check on the user's own data.",
        "",
        f"Trained on: {', '.join(record['trained_on'] or [])}. Logit scale {record['scale']:.2f}, bias "
        f"{record['bias']:.3f}. Zero-shot prediction merges {zero_shot_scale:g} of its LoRA delta "
        "(WiSE-FT: `zero_shot_scale`; the share chosen on the held-out datasets' validation documents, "
        "`bench/results/general_adapter_scale.md`) at global threshold "
        f"{record['threshold']:.2f} (tuned on the mixture's validation documents at that share); "
        "training on your labels starts from its full weights.",
        "",
        "Quality on labels it never saw: `bench/results/general_adapter.md` (leave one dataset out). "
        "BANKING77 was never used, in any form.",
        "",
    ]
    if evaluation and evaluation.get("delta"):
        card += ["## Leave one dataset out: Δ over the base encoder on each held-out test split", "",
                 "| held out | macro-F1 as shipped | top-1 | macro-F1, thresholds calibrated |",
                 "|---|---|---|---|"]
        for name, delta in evaluation["delta"].items():
            card.append(f"| {name} | {delta.get('macro_f1', 0):+.3f} | "
                        f"{delta.get('top1_accuracy', 0):+.3f} | "
                        f"{delta.get('calibrated_macro_f1', 0):+.3f} |")
        def below(metric: str) -> str:
            return ", ".join(name for name, delta in evaluation["delta"].items() if delta.get(metric, 0) < 0)

        worse, worse_calibrated = below("macro_f1"), below("calibrated_macro_f1")
        card += ["", "## Limitations", "",
                 "Trained on short intent queries and legal clauses only. "
                 + (f"As shipped, worse than the plain encoder on: {worse}; use `--base-adapter none` "
                    "there, or check on your own validation data. " if worse else "")
                 + (f"With thresholds calibrated on a few labelled documents per label, the plain encoder "
                    f"does better on: {worse_calibrated}; where you calibrate, compare both "
                    "(`--base-adapter none`) on your validation data. " if worse_calibrated else "")
                 + "Check it on your own validation data. Its threshold was tuned on its training "
                 "mixture; `labelmatch calibrate` sets thresholds for your labels from a few labelled "
                 "documents.", ""]
    if sources is not None and Path(sources).is_file():
        card += ["## Data sources and licences", "", Path(sources).read_text()]
    (out / CARD).write_text("\n".join(card) + "\n")
    return out
