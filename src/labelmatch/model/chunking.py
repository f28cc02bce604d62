"""One rule for documents longer than the model reads: truncate them, or score them window by window.

With ``chunk``, a document longer than the model's window is cut into overlapping windows of
``window`` tokens, ``stride`` tokens apart (the last window ends at the document's end), each
window is embedded, and a label's cosine is the **maximum** over the windows: a label present
anywhere in the document is found. Windows are cut at token boundaries but taken from the
*text* (the tokenizer's character offsets), so the torch model (Hugging Face tokenizer) and the
ONNX server (``tokenizers``) embed exactly the same strings. The rule is recorded in the model's
``labelmatch.json`` (``long_documents``, ``chunk_stride``) and obeyed by validation, threshold
tuning, evaluation, the ONNX export's parity check and the server alike.

This module imports neither torch nor transformers (the serving path uses it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from labelmatch.core.errors import ConfigError

#: Special tokens a single sequence gets ([CLS] … [SEP] / <s> … </s>) in the encoders supported.
SPECIAL_TOKENS = 2
MODES = ("truncate", "chunk")


@dataclass(frozen=True)
class Chunking:
    """How documents longer than the model's maximum length are read.

    Attributes:
        mode: ``truncate`` (the first ``max_length`` tokens) or ``chunk`` (every window, max over
            windows).
        window: Content tokens per window (``max_length`` minus the special tokens).
        stride: Tokens between the starts of consecutive windows (``window // 2``: half overlap).
    """

    mode: str = "truncate"
    window: int = 126
    stride: int = 63

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"long_documents must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.window < 1 or not 1 <= self.stride <= self.window:
            raise ConfigError(
                f"chunking needs window >= 1 and 1 <= stride <= window, got {self.window}, {self.stride}"
            )

    @classmethod
    def for_model(cls, mode: str, max_length: int, stride: int | None = None) -> Chunking:
        """The rule for a model reading ``max_length`` tokens (stride: half a window by default)."""
        window = max(max_length - SPECIAL_TOKENS, 1)
        return cls(mode, window, stride or max(window // 2, 1))

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> Chunking:
        """The rule recorded in a model's ``labelmatch.json`` (truncate when none is)."""
        mode = info.get("long_documents") or (info.get("config") or {}).get("long_documents") or "truncate"
        return cls.for_model(mode, int(info["max_length"]), info.get("chunk_stride"))

    def spans(self, offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """Character spans of the windows of a text whose tokens have ``offsets``."""
        n = len(offsets)
        if self.mode == "truncate" or n <= self.window:
            return [(0, offsets[-1][1])] if n else [(0, 0)]
        starts = list(range(0, n - self.window + 1, self.stride))
        if starts[-1] + self.window < n:
            starts.append(n - self.window)
        return [(offsets[s][0], offsets[s + self.window - 1][1]) for s in starts]


def document_windows(
    texts: Sequence[str], offsets_of: Callable[[str], Sequence[tuple[int, int]]], chunking: Chunking
) -> tuple[list[str], np.ndarray]:
    """The window texts of ``texts`` and, per window, the index of its document.

    Args:
        texts: Documents.
        offsets_of: A text's token character offsets (no special tokens, no truncation).
        chunking: The rule; ``truncate`` gives one window per document, the document itself.
    """
    if chunking.mode == "truncate":
        return list(texts), np.arange(len(texts))
    windows, owner = [], []
    for i, text in enumerate(texts):
        for start, end in chunking.spans(offsets_of(text)):
            windows.append(text[start:end] if end > start else text)
            owner.append(i)
    return windows, np.array(owner, dtype=np.int64)


def max_over_windows(window_cos: np.ndarray, owner: np.ndarray, n_docs: int) -> np.ndarray:
    """``(n_docs, labels)``: each document's maximum over its windows' ``(windows, labels)`` cosines."""
    out = np.full((n_docs, window_cos.shape[1]), -np.inf, dtype=np.float32)
    np.maximum.at(out, owner, window_cos.astype(np.float32))
    return out


def chunked_cosines(
    texts: Sequence[str],
    embed: Callable[[list[str]], np.ndarray],
    offsets_of: Callable[[str], Sequence[tuple[int, int]]],
    label_emb: np.ndarray,
    chunking: Chunking,
) -> np.ndarray:
    """``(n_docs, n_labels)`` cosines of ``texts`` with ``label_emb`` under the long-document rule.

    The one place a document becomes cosines: prediction (torch and ONNX), validation and
    threshold tuning during training, and the export's parity check all read long documents
    through it.

    Args:
        texts: Documents.
        embed: Unit vectors of a list of texts, ``(n, dim)``.
        offsets_of: A text's token character offsets (no special tokens, no truncation).
        label_emb: ``(n_labels, dim)`` label embeddings.
        chunking: The long-document rule.
    """
    windows, owner = document_windows(texts, offsets_of, chunking)
    if not windows:
        return np.zeros((len(texts), len(label_emb)), dtype=np.float32)
    window_cos = np.asarray(embed(windows)) @ np.asarray(label_emb).T
    return max_over_windows(window_cos, owner, len(texts))
