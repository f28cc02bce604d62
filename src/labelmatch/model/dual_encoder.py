"""The dual-encoder classifier: one encoder for documents and label descriptions.

``logit(doc, label) = scale * cos(embed(doc), embed(description)) + bias`` and
``p(label | doc) = sigmoid(logit)``, independently per label (multi-label). There is no
classification head, so labels can be added or replaced at prediction time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from labelmatch.model.encoder import TextEncoder


class DualEncoder(nn.Module):
    """Shared encoder + scaled cosine + learnable bias.

    Args:
        encoder: The text encoder (possibly with a LoRA adapter).
        scale: Cosine scale (a hyper-parameter, not learned).
        bias: Initial logit bias (learned).
    """

    def __init__(self, encoder: TextEncoder, scale: float, bias: float):
        super().__init__()
        self.encoder = encoder
        self.scale = float(scale)
        self.bias = nn.Parameter(torch.tensor(float(bias)))

    def logits(self, doc_emb: torch.Tensor, label_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, logits)`` for every (document, label) pair of two embedding matrices."""
        cos = doc_emb @ label_emb.T
        return cos, self.scale * cos + self.bias

    def forward(
        self, doc_texts: Sequence[str], label_texts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed documents and label descriptions with gradients; return ``(cos, logits)``."""
        doc_emb = self.encoder(self.encoder.tokenize(doc_texts))
        label_emb = self.encoder(self.encoder.tokenize(label_texts))
        return self.logits(doc_emb, label_emb)

    def set_scale(self, scale: float) -> None:
        """Change the scale, rescaling the bias so the decision boundary (cos at p=0.5) stays put."""
        with torch.no_grad():
            self.bias.mul_(float(scale) / self.scale)
        self.scale = float(scale)
