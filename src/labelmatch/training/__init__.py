"""Supervised fine-tuning: LoRA on BCE (hard + soft targets) plus a contrastive margin.

Public names import lazily (:mod:`labelmatch.core.lazy`): importing the package costs nothing.
"""

from labelmatch.core.lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": "config",
    "SFTTrainer": "sft",
    "train_sft": "sft",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
