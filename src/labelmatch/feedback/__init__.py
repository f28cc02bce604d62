"""User feedback (1-5 scores): the store, rewards, and GRPO with a KL to the SFT reference.

Public names import lazily (:mod:`labelmatch.core.lazy`): importing the package costs nothing.
"""

from labelmatch.core.lazy import lazy_exports

_EXPORTS = {
    "FeedbackStore": "feedback_store",
    "FeedbackRecord": "feedback_store",
    "read_export": "feedback_store",
    "RewardConfig": "rewards",
    "GRPOConfig": "grpo",
    "GRPOTrainer": "grpo",
    "train_grpo": "grpo",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
