"""What the benchmarks share: the machine they ran on, one method per process, mean ± spread."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """The CPU the figures were measured on (int8 speed depends on VNNI/AMX above all)."""
    model, flags = "unknown", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return {"cpu": model, "cores": os.cpu_count(),
            "int8_dot_product": [f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags],
            "avx2": "avx2" in flags, "avx512f": "avx512f" in flags}


def _child(queue: Any, name: str, fn: Callable[..., dict[str, Any]], args: tuple, kwargs: dict) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    queue.put((name, result))


def measure(name: str, fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run ``fn(*args, **kwargs)`` in its own process, so its wall time and peak RSS are its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, name, fn, args, kwargs))
    proc.start()
    _, result = queue.get()
    proc.join()
    print(f"{name}: {json.dumps(result)}", flush=True)
    return result


def mean_spread(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "spread" (half the range), "values"}`` over seeds."""
    values = list(values)
    spread = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "spread": spread, "values": values}
