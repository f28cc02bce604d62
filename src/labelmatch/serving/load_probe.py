"""Picking the serving engine on the serving node's own CPU, at load (``--engine probe``).

The export times its candidates on the CPU that ran the export; serving nodes are often another
CPU type (the int8 speed-up ranged from 1.4× to 3.3× torch fp32 across three x86 CPUs, see
:mod:`labelmatch.runtime.engines`). With ``--engine probe`` the server re-runs the export's probe
before it reports ready: every engine the export judged passing (its agreement as served, with
its fallback, is a property of the graph, not of the CPU) whose runtime and precision this
machine has is timed with the server's own thread settings on inputs of the same token lengths
as the export's probe documents (``parity.json`` ``engine_probe.lengths``; the artifact holds no
document text), and the cheapest as served is loaded. An int8 engine's cost includes its
fallback share (``parity.json``) at ``ort-fp32``'s time, measured here too.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

from labelmatch.core.errors import ArtifactError
from labelmatch.runtime.engines import (
    ENGINES,
    PROBE_TOGETHER_BYTES,
    graph_file_bytes,
    pick_engine,
    probe_encoders,
    served_costs,
)
from labelmatch.runtime.onnx_classifier import TOKENIZER_FILE, OnnxEncoder, OrtConfig

log = logging.getLogger(__name__)

#: The ``--engine`` value that probes at load.
PROBE = "probe"
#: Token lengths timed when the artifact recorded none (exports before lengths were recorded).
DEFAULT_LENGTHS = (16, 32, 64, 96, 128, 192, 256)


def probe_engine_at_load(root: str | Path, config: OrtConfig | None = None,
                         min_seconds: float = 0.5) -> dict[str, Any]:
    """Time the artifact's passing engines here and pick the cheapest as served.

    Args:
        root: The OnnxModel directory (``parity.json``, ``labelmatch.json`` and the graphs).
        config: The server's ONNX Runtime settings (threads), as it will serve.
        min_seconds: Timed seconds per candidate, at least.

    Returns:
        ``{"picked", "costs_ms", "probe_ms", "candidates", "skipped", "lengths", "mode"}``; ``skipped``
        maps a passing engine this machine cannot run to why.

    Raises:
        ArtifactError: when the artifact has no engine records to probe.
    """
    root = Path(root)
    parity = json.loads((root / "parity.json").read_text())
    info = json.loads((root / "labelmatch.json").read_text())
    judged = parity.get("engines")
    if not judged:
        raise ArtifactError(f"artifact {root}: parity.json has no engines to probe (exported before "
                            "engines were recorded); serve its own pick")
    gate = float(parity["gate"])
    skipped, candidates = {}, []
    for name, entry in judged.items():
        reason = ENGINES[name].unavailable_reason() if name in ENGINES else "unknown engine"
        if entry["served_agreement"] < gate:
            continue
        if reason or not (root / ENGINES[name].file).is_file():
            skipped[name] = reason or f"no {ENGINES[name].file}"
        else:
            candidates.append(name)
    if not candidates:
        raise ArtifactError(f"artifact {root}: no engine that passed the gate runs here ({skipped})")
    fallbacks = {name: judged[name].get("fallback") for name in candidates}
    timed_names = candidates + (["ort-fp32"] if any(fallbacks.values()) and "ort-fp32" not in candidates
                                else [])
    max_length = int(info["max_length"])
    lengths = [min(n, max_length) for n in (parity.get("engine_probe") or {}).get("lengths")
               or DEFAULT_LENGTHS]
    descriptions = list(json.loads((root / "labels.json").read_text()).values())
    texts = texts_of_lengths(root / TOKENIZER_FILE, descriptions, lengths)
    # Every candidate loaded at once while they are small; one at a time above PROBE_TOGETHER_BYTES
    # (bge-m3's candidates add up to 7 GB: the server would hold them all before serving one).
    files = {ENGINES[name].file for name in timed_names}
    together = sum(graph_file_bytes(root, file) for file in files) <= PROBE_TOGETHER_BYTES
    loaders = {name: functools.partial(OnnxEncoder.for_engine, root, ENGINES[name], max_length, config)
               for name in timed_names}
    timed = probe_encoders(loaders, texts, min_seconds, together)
    costs = served_costs(timed, fallbacks)
    picked = pick_engine(costs)
    log.info("engine probe at load: %s; picked %s (the export picked %s)",
             ", ".join(f"{n} {c:.2f} ms" for n, c in costs.items()), picked, info.get("engine"))
    return {"picked": picked, "costs_ms": costs, "probe_ms": timed, "candidates": candidates,
            "skipped": skipped, "lengths": lengths,
            "mode": "rotating turns, all loaded" if together else "one candidate loaded at a time"}


def texts_of_lengths(tokenizer_file: Path, seeds: list[str], lengths: list[int]) -> list[str]:
    """Texts that tokenize to about each of ``lengths`` tokens (special tokens included).

    Built by cutting a long text (``seeds`` repeated: the label descriptions) at token
    boundaries; only the lengths matter to a timing.

    Args:
        tokenizer_file: The artifact's ``tokenizer.json``.
        seeds: Texts to build from (non-empty).
        lengths: Wanted token counts.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    specials = len(tokenizer.encode("").ids)
    text = " ".join(seeds or ["text"])
    while len(tokenizer.encode(text, add_special_tokens=False).ids) < max(lengths):
        text = f"{text} {text}"
    offsets = tokenizer.encode(text, add_special_tokens=False).offsets
    return [text[: offsets[max(n - specials, 1) - 1][1]] for n in lengths]
