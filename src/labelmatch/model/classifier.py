"""Prediction with a trained (or untrained, zero-shot) label-matching model in torch.

The matching itself (labels, thresholds, long documents, hierarchy, the Prediction contract)
is :class:`~labelmatch.model.matching.LabelMatcher`, shared with the ONNX serving classifier;
this module only says how torch turns text into vectors and how a Model artifact loads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from labelmatch.model.chunking import Chunking
from labelmatch.model.encoder import Pooling, TextEncoder, base_pooling, load_base
from labelmatch.model.io import load_encoder_model, read_hierarchy
from labelmatch.model.matching import LabelMatcher, Prediction, Thresholds

__all__ = ["Classifier", "Prediction", "Thresholds"]


class Classifier(LabelMatcher):
    """A dual-encoder classifier ready to predict.

    Args:
        encoder: The text encoder (merged, inference only).
        labels: ``{label: description}`` in order.
        label_embeddings: ``(n_labels, dim)`` embeddings of ``labels`` (computed when ``None``).
        scale: Cosine scale.
        bias: Logit bias.
        thresholds: Decision thresholds.
        chunking: The long-document rule (:class:`~labelmatch.model.chunking.Chunking`; truncation
            at the encoder's maximum length when ``None``).
        info: The model's ``labelmatch.json`` (empty for a zero-shot classifier).
        batch_size: Texts per forward pass.

    Example::

        clf = Classifier.load("runs/model")
        clf.predict(["VAT return filed late, penalty assessed"])[0].labels
        clf.predict(texts, labels={"customs": "Import duties and customs procedures."})
    """

    def __init__(
        self,
        encoder: TextEncoder,
        labels: dict[str, str],
        label_embeddings: np.ndarray | None,
        scale: float,
        bias: float,
        thresholds: Thresholds | dict[str, Any],
        chunking: Chunking | None = None,
        info: dict[str, Any] | None = None,
        batch_size: int = 64,
    ):
        self.encoder = encoder.eval()
        self.info = info or {}
        self.batch_size = batch_size
        super().__init__(labels, label_embeddings, scale, bias, thresholds,
                         chunking or Chunking.for_model("truncate", encoder.max_length))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", share: float = 1.0) -> Classifier:
        """Load a Model artifact, verifying every file's digest first.

        Args:
            path: The Model artifact.
            device: Where the encoder runs.
            share: The share of its LoRA delta merged into the encoder (1: all of it; below 1, as
                zero-shot prediction merges a general adapter: :func:`~labelmatch.model.io.merge_share`).
        """
        root = Path(path)
        model, tokenizer, info = load_encoder_model(root, share=share)
        labels = json.loads((root / "labels.json").read_text())
        embeddings = np.load(root / "label_embeddings.npy")
        thresholds = Thresholds.from_json(json.loads((root / "thresholds.json").read_text()))
        encoder = TextEncoder(model.to(device), tokenizer, int(info["max_length"]), Pooling.from_info(info))
        chunking = Chunking.from_info(info)
        classifier = cls(encoder, labels, embeddings, info["scale"], info["bias"], thresholds, chunking, info)
        classifier.hierarchy = read_hierarchy(root)
        return classifier

    @classmethod
    def zero_shot(
        cls,
        labels: dict[str, str],
        base_model: str = "bundled:minilm",
        scale: float = 20.0,
        boundary: float = 0.3,
        max_length: int = 256,
        base_adapter: str | None = "auto",
    ) -> Classifier:
        """A classifier for ``labels`` without training on them.

        With a base adapter (:mod:`labelmatch.model.general_adapter`; ``auto``: the general
        adapter that ships, for the bundled encoder) it is merged into the encoder (the share of
        its LoRA delta its ``zero_shot_scale`` says), and its logit scale, bias and threshold are
        used. Without one (``none``, or another base encoder): the
        base encoder as is, ``bias = -scale * boundary``, threshold 0.5; ``boundary`` is the cosine
        at which a label's probability is 0.5.
        """
        from labelmatch.model.general_adapter import merged_encoder, resolve_base_adapter

        model, tokenizer = load_base(base_model)
        adapter = resolve_base_adapter(base_adapter, base_model)
        bias, threshold = -scale * boundary, 0.5
        if adapter is not None:
            model = merged_encoder(model, adapter)
            scale, bias, threshold = adapter.scale, adapter.bias, adapter.threshold
        pooling = base_pooling(base_model)
        encoder = TextEncoder(model, tokenizer, max_length, pooling)
        info = {"base_model": base_model, "max_length": max_length, "scale": scale, "bias": bias,
                "pooling": pooling.mode, "normalize": pooling.normalize,
                "base_adapter": ({**adapter.describe(), "zero_shot_scale": adapter.zero_shot_scale}
                                 if adapter else None)}
        return cls(encoder, labels, None, scale, bias, Thresholds(threshold), None, info)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, dim)`` float32 unit vectors of ``texts`` (torch, no gradients)."""
        return self.encoder.embed(list(texts), batch_size=self.batch_size).numpy()

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character offsets of ``text``'s tokens (no special tokens, no truncation)."""
        return self.encoder.offsets(text)
