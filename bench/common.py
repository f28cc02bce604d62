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
from queue import Empty as queue_empty
from typing import Any


def machine() -> dict[str, Any]:
    """The CPU the figures were measured on (int8 speed depends on VNNI/AMX above all)."""
    from labelmatch.runtime.engines import cpu_summary

    return cpu_summary()


def cpu_text(info: dict[str, Any]) -> str:
    """A report's CPU as its Markdown states it: ``"<model> (<N> cores)"`` from :func:`machine`'s dict."""
    return f"{info.get('cpu', '?')} ({info.get('cores', '?')} cores)"


def _die_with_parent() -> None:
    """On Linux, have this process sent SIGTERM when the process that started it ends, killed or
    not (``prctl(PR_SET_PDEATHSIG)``): a stopped benchmark leaves no method training on. Elsewhere
    nothing changes."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != mp.parent_process().pid:  # it ended before the call above
        os._exit(1)


def _child(queue: Any, name: str, fn: Callable[..., dict[str, Any]], args: tuple, kwargs: dict) -> None:
    _die_with_parent()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    queue.put((name, result))


def measure(name: str, fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run ``fn(*args, **kwargs)`` in its own process, so its wall time and peak RSS are its own;
    the process ends when this one does (on Linux, even when this one is killed). Call it from the
    main thread: Linux signals the child when the thread that started it ends.

    Raises:
        RuntimeError: the process exited without a result (an exception in ``fn``, killed for memory).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, name, fn, args, kwargs))
    proc.start()
    while True:  # a process that dies (killed for memory, an exception) sends nothing: do not wait forever
        try:
            _, result = queue.get(timeout=5)
            break
        except queue_empty:
            if not proc.is_alive() and queue.empty():
                proc.join()
                raise RuntimeError(f"{name}: its process exited with status {proc.exitcode}, "
                                   "no result") from None
    proc.join()
    print(f"{name}: {json.dumps(result)}", flush=True)
    return result


def mean_spread(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "spread" (half the range), "values"}`` over seeds."""
    values = list(values)
    spread = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "spread": spread, "values": values}


def write_outputs(out: Path, stem: str, report: dict[str, Any], markdown: Callable[[dict[str, Any]], str],
                  plot: Callable[[dict[str, Any], Path], Any] | None = None, plot_key: str | None = "plot",
                  indent: int = 1) -> str:
    """Write a benchmark's report: ``<stem>.png``, ``<stem>.json`` and ``<stem>.md`` under ``out``.

    Args:
        out: The results folder (created if missing).
        stem: The files' name without suffix.
        report: The report; gets ``plot_key`` set to what ``plot`` returned (whether it drew).
        markdown: Renders the report as Markdown.
        plot: Draws the report to the path it is given (``None``: no plot).
        plot_key: Where the report records ``plot``'s answer (``None``: nowhere).
        indent: The JSON's indent.

    Returns:
        The Markdown, also printed.
    """
    out.mkdir(parents=True, exist_ok=True)
    if plot is not None:
        drawn = plot(report, out / f"{stem}.png")
        if plot_key is not None:
            report[plot_key] = drawn
    (out / f"{stem}.json").write_text(json.dumps(report, indent=indent) + "\n")
    text = markdown(report)
    (out / f"{stem}.md").write_text(text)
    print(text)
    return text


def start_model_server(onnx_dir: Path, threads: int, log: Path, *extra: str) -> tuple[Any, str]:
    """Start ``labelmatch.serving.server`` on 127.0.0.1 (a free port); ``(process, base URL)``."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "labelmatch.serving.server", "--model_dir", str(onnx_dir),
               "--http_port", str(port), "--host", "127.0.0.1", "--intra_op_threads", str(threads),
               "--enable_latency_logging", "false", *extra]
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def wait_until_ready(process: Any, base: str, log: Path, path: str = "/v2/health/ready",
                     timeout_s: float = 240) -> None:
    """Poll ``base + path`` until 200; RuntimeError naming ``log`` when the server exits or times out."""
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start; see {log}")
        try:
            if requests.get(f"{base}{path}", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)


def server_timing_ms(header: str, metric: str = "inference") -> float:
    """A duration the server reports in ``Server-Timing`` (``inference;dur=MS, state;dur=MS``)."""
    for entry in header.split(","):
        name, _, params = entry.strip().partition(";")
        if name == metric:
            return float(params.split("dur=", 1)[1].split(";")[0])
    raise ValueError(f"no {metric} duration in Server-Timing: {header!r}")


def concurrent_load(bases: list[str], texts: list[str], clients: int, duration: float) -> dict[str, Any]:
    """``clients`` threads send one-document v1 requests for ``duration`` seconds, each client
    alternating over ``bases``; requests, errors, throughput, p50/p99 and the server's
    ``Server-Timing`` state time."""
    import random
    import threading

    import numpy as np
    import requests

    latencies: list[float] = []
    state_ms: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration

    def client(seed: int) -> None:
        session = requests.Session()
        rng = random.Random(seed)
        i = seed
        while time.perf_counter() < stop_at:
            base = bases[i % len(bases)]
            i += 1
            start = time.perf_counter()
            try:
                response = session.post(f"{base}/v1/models/labelmatch:predict",
                                        json={"instances": [rng.choice(texts)]}, timeout=60)
                ok = response.status_code == 200
                problem = None if ok else f"HTTP {response.status_code}: {response.text[:200]}"
                stored = server_timing_ms(response.headers.get("server-timing", ""), "state") if ok else None
            except (requests.RequestException, ValueError) as exc:
                problem, stored = f"{type(exc).__name__}: {exc}", None
            elapsed = (time.perf_counter() - start) * 1000
            with lock:
                if problem:
                    errors.append(problem)
                else:
                    latencies.append(elapsed)
                    state_ms.append(stored)

    pool = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    wall = time.perf_counter() - started
    load = np.array(latencies) if latencies else np.array([float("nan")])
    state = np.array(state_ms) if state_ms else np.array([float("nan")])
    return {"clients": clients, "duration_s": wall, "requests": len(latencies), "errors": len(errors),
            "error_examples": sorted(set(errors))[:5], "throughput_rps": len(latencies) / wall,
            "p50_ms": float(np.percentile(load, 50)), "p99_ms": float(np.percentile(load, 99)),
            "state_p50_ms": float(np.percentile(state, 50)), "state_p99_ms": float(np.percentile(state, 99))}


def zero_shot_model(labels: dict[str, str], out: Path, max_length: int = 256) -> Path:
    """The bundled encoder + ``labels`` as an untrained Model artifact (cos 0.3 → p 0.5)."""
    from labelmatch.core.artifacts import atomic_artifact_dir
    from labelmatch.model.encoder import TextEncoder, load_base, resolve_base_model, weights_digest
    from labelmatch.model.io import save_model
    from labelmatch.model.matching import Thresholds

    model, tokenizer = load_base("bundled:minilm")
    label_emb = TextEncoder(model, tokenizer, max_length).embed(list(labels.values())).numpy()
    digest = weights_digest(resolve_base_model("bundled:minilm"))
    info = {"base_model": "bundled:minilm", "base_model_digest": digest, "max_length": max_length,
            "scale": 20.0, "bias": -6.0}
    with atomic_artifact_dir(out) as tmp:
        save_model(tmp, model, tokenizer, labels, label_emb, Thresholds(0.5), info)
    return out
