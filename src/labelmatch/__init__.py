"""labelmatch: semantic label-matching multi-label document classifiers.

One shared transformer encoder embeds documents and natural-language label descriptions; the
scaled cosine similarity of the two, through a sigmoid, is each label's probability. Labels are
text, so a label set can change at prediction time without retraining.

Heavy dependencies (torch, transformers) are imported lazily by the modules that need them, so
``import labelmatch`` stays cheap and the serving path can run without torch.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("labelmatch")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
