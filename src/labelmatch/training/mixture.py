"""Supervised fine-tuning on several datasets at once, each with its own label set.

A general zero-shot adapter (:mod:`labelmatch.model.general_adapter`) learns from many labelled
datasets whose label sets overlap in meaning (CLINC150's ``alarm`` and HWU64's ``alarm_set``).
Pooling them into one label set would teach the encoder that a CLINC150 alarm query is *not* an
HWU64 alarm request. :class:`MixtureTrainer` keeps them apart: every step's batch comes from one
dataset (drawn with probability proportional to its training documents) and is scored against
that dataset's labels only, and validation scores a document only against its own dataset's
labels (the others get probability 0, so no threshold makes them positive).

Labels are named ``<dataset>/<label>`` in the combined set, so the saved model's labels keep
where they came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from labelmatch.core.errors import ConfigError
from labelmatch.data.dataset import Dataset, Document
from labelmatch.training.batches import next_batch
from labelmatch.training.config import TrainConfig
from labelmatch.training.sft import SFTTrainer

SEPARATOR = "/"


@dataclass(frozen=True)
class NamedDataset:
    """One dataset of a mixture (``train`` and ``val`` splits) and the name its labels get."""

    name: str
    dataset: Dataset


def combine(parts: Sequence[NamedDataset]) -> tuple[Dataset, list[str]]:
    """One dataset of every part, labels and ids prefixed ``<name>/``, and each label's part.

    Args:
        parts: The datasets, with distinct names.

    Returns:
        ``(combined dataset, the part name of every label in order)``.

    Raises:
        ConfigError: Two parts share a name, or a name contains the separator.
    """
    names = [part.name for part in parts]
    if len(set(names)) != len(names) or any(SEPARATOR in name for name in names):
        raise ConfigError(f"mixture part names must be distinct and free of {SEPARATOR!r}: {names}")
    labels: dict[str, str] = {}
    owners: list[str] = []
    documents: list[Document] = []
    for part in parts:
        for label, description in part.dataset.labels.items():
            labels[f"{part.name}{SEPARATOR}{label}"] = description
            owners.append(part.name)
        for doc in part.dataset.documents:
            if doc.split not in ("train", "val"):
                continue
            documents.append(Document(
                id=f"{part.name}{SEPARATOR}{doc.id}",
                text=doc.text,
                labels=[f"{part.name}{SEPARATOR}{label}" for label in doc.labels],
                soft={f"{part.name}{SEPARATOR}{k}": v for k, v in (doc.soft or {}).items()} or None,
                split=doc.split,
            ))
    return Dataset(documents, labels), owners


def part_of(doc_id: str) -> str:
    """The mixture part a combined document id belongs to."""
    return doc_id.split(SEPARATOR, 1)[0]


class MixtureTrainer(SFTTrainer):
    """:class:`~labelmatch.training.sft.SFTTrainer` over a mixture of datasets (module docstring).

    Args:
        parts: The datasets, each with ``train`` and ``val`` splits.
        config: Hyper-parameters; ``label_strategy`` ``auto`` or ``all`` (each step embeds its
            part's labels live, however many labels the parts have in total).
        labels_per_step: At most this many of the part's labels per step: the batch's positives,
            then its other labels drawn at random (``0``: all of them). A step's cost grows with
            the labels it embeds: CLINC150's 150 intents made a step ten times a document batch's.
    """

    def __init__(self, parts: Sequence[NamedDataset], config: TrainConfig, labels_per_step: int = 0):
        dataset, owners = combine(parts)
        self.part_names = [part.name for part in parts]
        self.labels_per_step = labels_per_step
        self._owners = np.array([self.part_names.index(owner) for owner in owners])
        if config.label_strategy == "sampled" or config.label_refresh_steps:
            raise ConfigError("MixtureTrainer embeds each step's part's labels live: label_strategy "
                              "'auto' or 'all', and label_refresh_steps 0")
        super().__init__(dataset, config.replace(label_strategy="all"))
        train_parts = np.array([self.part_names.index(part_of(d.id)) for d in self.train_set.documents])
        self._members = [np.flatnonzero(train_parts == p) for p in range(len(parts))]
        if any(len(members) == 0 for members in self._members):
            raise ConfigError("every mixture part needs training documents")
        sizes = np.array([len(members) for members in self._members], dtype=np.float64)
        self._draw = torch.from_numpy(sizes / sizes.sum())
        self._orders: list[list[int]] = [[] for _ in parts]
        val_parts = np.array([self.part_names.index(part_of(d.id)) for d in self.val_set.documents])
        self._val_mask = (val_parts[:, None] == self._owners[None, :]).astype(np.float32)

    def _next_batch(self) -> list[int]:
        """A batch of one part's training documents, the part drawn by its share of documents."""
        part = int(torch.multinomial(self._draw, 1, generator=self.generator))
        members = self._members[part]
        lengths = [self._lengths[i] for i in members] if self._lengths is not None else None
        local, self._orders[part] = next_batch(self._orders[part], len(members), self.config.batch_size,
                                               self.generator, lengths, self.config.length_group_batches)
        return [int(members[i]) for i in local]

    def _step_labels(self, batch: list[int], doc_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's part's labels (or ``labels_per_step`` of them), embedded live."""
        part = self.part_names.index(part_of(self.train_set.documents[batch[0]].id))
        columns = torch.from_numpy(np.flatnonzero(self._owners == part))
        if 0 < self.labels_per_step < len(columns):
            positive = (self.targets[batch][:, columns].sum(0) + self.soft_mask[batch][:, columns].sum(0)) > 0
            rest = columns[~positive]
            pick = torch.randperm(len(rest), generator=self.generator)[: max(0, self.labels_per_step
                                                                              - int(positive.sum()))]
            columns = torch.sort(torch.cat([columns[positive], rest[pick]])).values
        return self.model.encoder.encode([self.label_texts[j] for j in columns.tolist()]), columns

    def validation_scores(self) -> np.ndarray:
        """Every validation document's probabilities for its own part's labels; 0 for the rest."""
        return super().validation_scores() * self._val_mask
