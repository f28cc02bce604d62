"""Production-shaped encoders with random weights, built offline from a transformers config.

What users run is BAAI/bge-m3 (XLM-RoBERTa large: 24 layers, hidden 1024, a 250,002-token
vocabulary, 568M parameters, 2.27 GB in fp32, CLS pooling), and no model hub is reachable here.
:func:`build_random_encoder` writes a Hugging Face directory with that exact architecture and
pooling, randomly initialised, so that every stage can be run at the size it ships: shapes, file
formats (external ONNX data above 2 GiB), memory and speed. Random weights say nothing about
quality: label-set agreement between an int8 graph and torch, macro-F1 and the like are noise on
such a model (the export's gate is waived explicitly for it, see
:class:`labelmatch.export.onnx.ExportConfig`).

The tokenizer is borrowed (any tokenizer whose ids fit the vocabulary; the bundled MiniLM's by
default) and told to feed only ``input_ids`` and ``attention_mask``, as bge-m3's does. The
directory carries the sentence-transformers files (``modules.json``, ``1_Pooling/config.json``)
that say CLS pooling, so :meth:`labelmatch.model.encoder.Pooling.from_model_dir` reads it as it
reads bge-m3's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from labelmatch.core.errors import ConfigError

#: BAAI/bge-m3's ``config.json`` (XLMRobertaModel), the fields that fix its shape.
BGE_M3 = {
    "model_type": "xlm-roberta",
    "vocab_size": 250002,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "hidden_act": "gelu",
    "max_position_embeddings": 8194,
    "type_vocab_size": 1,
    "layer_norm_eps": 1e-05,
}


@dataclass(frozen=True)
class EncoderShape:
    """The architecture of a randomly initialised encoder.

    Attributes:
        name: What it imitates (recorded in the directory's ``random_encoder.json``).
        config: ``transformers`` config fields (``model_type`` picks the config class).
        pooling: ``cls``, ``mean`` or ``last`` (written as sentence-transformers' Pooling module).
    """

    name: str
    config: dict[str, Any]
    pooling: str = "cls"

    def with_changes(self, **config: Any) -> EncoderShape:
        """The same shape with some config fields changed (e.g. fewer layers for a cheap test)."""
        return replace(self, name=f"{self.name}({', '.join(f'{k}={v}' for k, v in config.items())})",
                       config={**self.config, **config})

    def parameters(self) -> int:
        """Parameter count of the encoder (embeddings, layers, pooler), from the config alone."""
        c = self.config
        hidden, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
        rows = c["vocab_size"] + c["max_position_embeddings"] + c["type_vocab_size"]
        embeddings = rows * hidden + 2 * hidden  # + the embeddings' LayerNorm
        layer = 4 * (hidden * hidden + hidden) + 2 * hidden * inter + inter + hidden + 4 * hidden
        return embeddings + layers * layer + hidden * hidden + hidden


#: The production encoder's shape.
SHAPES = {"bge-m3": EncoderShape("BAAI/bge-m3", BGE_M3, "cls")}


def cheap_large_shape(min_bytes: int = 2_200_000_000) -> EncoderShape:
    """bge-m3's shape with one layer and a vocabulary large enough for the fp32 weights to pass
    ``min_bytes``: a model that crosses protobuf's 2 GiB limit at a fraction of the compute."""
    base = SHAPES["bge-m3"].with_changes(num_hidden_layers=1)
    rest = base.parameters() - base.config["vocab_size"] * base.config["hidden_size"]
    vocab = -(-(min_bytes // 4 - rest) // base.config["hidden_size"])
    return base.with_changes(vocab_size=int(max(vocab, base.config["vocab_size"])))


def build_random_encoder(out_dir: str | Path, shape: str | EncoderShape = "bge-m3",
                         tokenizer: str = "bundled:minilm", seed: int = 0) -> dict[str, Any]:
    """Write a randomly initialised encoder of ``shape`` to ``out_dir`` (Hugging Face format).

    Args:
        out_dir: Directory to write (``config.json``, ``model.safetensors``, the tokenizer,
            ``modules.json`` and ``1_Pooling/config.json``, ``random_encoder.json``).
        shape: A name in :data:`SHAPES` or an :class:`EncoderShape`.
        tokenizer: Base-model reference whose tokenizer is borrowed (its ids must fit the vocabulary).
        seed: Seed of the random initialisation.

    Returns:
        What was written: shape, parameters, bytes on disk, seconds.

    Raises:
        ConfigError: for an unknown shape, or a tokenizer whose ids do not fit the vocabulary.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from labelmatch.model.encoder import resolve_base_model

    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ConfigError(f"unknown encoder shape {shape!r}; known: {', '.join(SHAPES)}")
        shape = SHAPES[shape]
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(resolve_base_model(tokenizer))
    if len(tok) > shape.config["vocab_size"]:
        raise ConfigError(f"tokenizer {tokenizer} has {len(tok)} ids, more than the vocabulary of "
                          f"{shape.name} ({shape.config['vocab_size']})")
    fields = {k: v for k, v in shape.config.items() if k != "model_type"}
    # Padding positions: RoBERTa-style models count positions from the pad id, so use the tokenizer's.
    config = AutoConfig.for_model(shape.config["model_type"], **fields, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    model.eval()
    model.save_pretrained(out)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    # bge-m3's tokenizer feeds no token_type_ids.
    tok.model_input_names = ["input_ids", "attention_mask"]
    tok.init_kwargs["model_input_names"] = tok.model_input_names
    tok.save_pretrained(out)
    _write_sentence_transformers_files(out, shape.pooling, config.hidden_size)
    weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    summary = {
        "shape": shape.name,
        "config": shape.config,
        "pooling": shape.pooling,
        "tokenizer": tokenizer,
        "seed": seed,
        "parameters": parameters,
        "weights_bytes": weights,
        "seconds": round(time.perf_counter() - start, 1),
        "warning": "random weights: for shapes, formats, memory and speed only, never quality",
    }
    (out / "random_encoder.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _write_sentence_transformers_files(out: Path, pooling: str, dim: int) -> None:
    """The sentence-transformers module files: Transformer, Pooling (``pooling``), Normalize."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    flags = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
             "last": "pooling_mode_lasttoken"}
    if pooling not in flags:
        raise ConfigError(f"pooling must be one of {', '.join(flags)}, got {pooling!r}")
    config = {"word_embedding_dimension": dim, **{flag: name == pooling for name, flag in flags.items()},
              "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "2_Normalize").mkdir(exist_ok=True)
