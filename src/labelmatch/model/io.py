"""Saving and loading the Model artifact.

Layout (see ``../shared/DESIGN.md``)::

    adapter/               peft LoRA adapter (when trained with LoRA on a referenced base)
    encoder/               merged Hugging Face encoder (always for GRPO output; optional for SFT)
    tokenizer/             tokenizer files
    labels.json            {label: description}, the label order
    label_embeddings.npy   float32, L2-normalised, rows in labels.json order
    thresholds.json        {"default": t, "labels": {label: t}}
    labelmatch.json        base model + digest, pooling, max length, scale, bias, config, metrics, history
    manifest.json          sha256 of every file (verified on load)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from labelmatch import __version__
from labelmatch.core.artifacts import verify_artifact, write_json, write_manifest
from labelmatch.core.errors import ArtifactError
from labelmatch.data.hierarchy import HIERARCHY_FILE, Hierarchy, load_hierarchy
from labelmatch.model.card import write_model_card
from labelmatch.model.matching import Thresholds

MODEL_INFO = "labelmatch.json"
FORMAT_VERSION = 1


def save_model(
    out_dir: str | Path,
    encoder_model: Any,
    tokenizer: Any,
    labels: dict[str, str],
    label_embeddings: np.ndarray,
    thresholds: Thresholds,
    info: dict[str, Any],
    save_merged: bool = False,
    lineage: dict[str, Any] | None = None,
    hierarchy: Hierarchy | None = None,
) -> dict[str, Any]:
    """Write a complete Model artifact into ``out_dir`` (normally a temporary directory).

    Args:
        out_dir: Target directory (created).
        encoder_model: The encoder, a ``PeftModel`` (adapter saved) or a plain model (saved whole).
        tokenizer: Its tokenizer.
        labels: Label descriptions in order.
        label_embeddings: ``(n_labels, dim)`` embeddings in the same order.
        thresholds: Decision thresholds.
        info: Must hold ``base_model``, ``max_length``, ``scale``, ``bias``; may hold ``config``,
            ``metrics``, ``history`` and anything else worth keeping.
        save_merged: With an adapter, also write the merged encoder to ``encoder/``.
        lineage: Recorded in the manifest.
        hierarchy: Child → parent links of the labels, written as ``hierarchy.json`` (predictions
            then keep label sets consistent).

    Returns:
        The manifest.
    """
    from peft import PeftModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if label_embeddings.shape[0] != len(labels):
        raise ArtifactError(f"{label_embeddings.shape[0]} label embeddings for {len(labels)} labels")
    has_adapter = isinstance(encoder_model, PeftModel)
    if has_adapter:
        encoder_model.save_pretrained(out / "adapter")
    if not has_adapter or save_merged:
        plain = encoder_model.merge_and_unload() if has_adapter else encoder_model
        plain.save_pretrained(out / "encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    write_json(out / "labels.json", labels)
    np.save(out / "label_embeddings.npy", label_embeddings.astype(np.float32))
    write_json(out / "thresholds.json", thresholds.to_json())
    if hierarchy is not None and hierarchy.parent_of:
        write_json(out / HIERARCHY_FILE, hierarchy.to_json())
    full_info = {
        "format": "labelmatch.model.dual_encoder",
        "format_version": FORMAT_VERSION,
        "labelmatch_version": __version__,
        "pooling": "mean",
        "normalize": True,
        "layout": "adapter" if has_adapter else "encoder",
        **info,
    }
    for key in ("base_model", "max_length", "scale", "bias"):
        if key not in full_info:
            raise ArtifactError(f"model info lacks '{key}'")
    write_json(out / MODEL_INFO, full_info)
    write_model_card(out, "Model")
    summary = {"labels": len(labels), "layout": full_info["layout"], "base_model": full_info["base_model"]}
    return write_manifest(out, "Model", lineage=lineage, extra=summary)


def read_hierarchy(model_dir: str | Path) -> Hierarchy | None:
    """The label hierarchy an artifact carries (``hierarchy.json``), or ``None``."""
    path = Path(model_dir) / HIERARCHY_FILE
    if not path.is_file():
        return None
    return load_hierarchy(path, json.loads((Path(model_dir) / "labels.json").read_text()))


def read_model_info(model_dir: str | Path) -> dict[str, Any]:
    """Read ``labelmatch.json`` of a (verified) model directory."""
    path = Path(model_dir) / MODEL_INFO
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"artifact {model_dir}: cannot read {MODEL_INFO}: {exc}") from exc


def merge_share(peft_model: Any, share: float = 1.0) -> Any:
    """A ``PeftModel``'s base model with ``share`` of its LoRA delta merged in (a plain model again).

    ``share`` 1 is peft's ``merge_and_unload``; below 1 it is WiSE-FT's interpolation between the
    base weights (0) and the fine-tuned ones (peft's ``rescale_adapter_scale`` during the merge).
    """
    from peft.helpers import rescale_adapter_scale

    if share == 1.0:
        return peft_model.merge_and_unload()
    with rescale_adapter_scale(peft_model, float(share)):
        return peft_model.merge_and_unload()


def load_encoder_model(
    model_dir: str | Path, verify: bool = True, merge: bool = True, share: float = 1.0
) -> tuple[Any, Any, dict[str, Any]]:
    """Load the encoder of a Model artifact.

    Args:
        model_dir: The Model artifact.
        verify: Check the manifest digests first (refuses a corrupted file by name).
        merge: Merge a LoRA adapter into the base weights (faster inference); with ``False`` the
            ``PeftModel`` is returned with its adapter trainable-ready.
        share: With ``merge``, the share of the LoRA delta merged in (:func:`merge_share`); below 1
            the artifact must hold its adapter.

    Returns:
        ``(model, tokenizer, info)``.

    Raises:
        ArtifactError: A share below 1 of an artifact without a LoRA adapter.
    """
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    from labelmatch.model.encoder import resolve_base_model, weights_digest

    root = Path(model_dir)
    if verify:
        verify_artifact(root, "Model")
    info = read_model_info(root)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    has_adapter = (root / "adapter").is_dir()
    if merge and share != 1.0 and not has_adapter:
        raise ArtifactError(f"artifact {root}: no LoRA adapter to merge a share ({share}) of")
    if (root / "encoder").is_dir() and ((merge and share == 1.0) or not has_adapter):
        return AutoModel.from_pretrained(root / "encoder"), tokenizer, info
    base_path = resolve_base_model(info["base_model"])
    expected = info.get("base_model_digest")
    actual = weights_digest(base_path)
    if expected and actual and expected != actual:
        raise ArtifactError(
            f"artifact {root}: base model {info['base_model']} at {base_path} has weights digest "
            f"{actual[:12]}…, but the adapter was trained on {expected[:12]}…"
        )
    base = AutoModel.from_pretrained(base_path)
    model = PeftModel.from_pretrained(base, root / "adapter", is_trainable=not merge)
    return (merge_share(model, share) if merge else model), tokenizer, info
