"""``labelmatch classify --rayjob``: the same batch run on a KubeRay RayJob.

Nothing here distributes work by hand: the RayJob's entrypoint is ``labelmatch classify
--address auto`` with the same settings, so Ray Data spreads the actors over the job's worker
pods exactly as it spreads them over local CPUs. Everything the pods read or write is in the
store (model, input, output, and an extra ``labels.json`` uploaded beside the output as
``_labels.json``); the submitting side reads the run's ``_summary.json`` back.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labelmatch.batch.run import BatchConfig
from labelmatch.batch.shards import OutputLayout
from labelmatch.core.errors import ConfigError
from labelmatch.platform.kuberay import (
    RayJobSpec,
    WaitPolicy,
    build_rayjob,
    rayjob_name,
    rayjob_owner,
    run_rayjob,
)

#: The RayJob shape of a batch run unless a values file or flags say otherwise: CPU workers.
BATCH_RAYJOB_DEFAULTS = {"workers": 4, "gpus_per_worker": 0, "worker_cpu": "4", "worker_memory": "8Gi"}
#: The start of a batch RayJob's name (:func:`~labelmatch.platform.kuberay.rayjob_name`).
BATCH_NAME_PREFIX = "lm-batch"


def batch_spec(values_file: str | Path | None = None, **overrides: Any) -> RayJobSpec:
    """The RayJob shape of a batch run: :data:`BATCH_RAYJOB_DEFAULTS` with this release's step image
    (:func:`labelmatch.platform.images.image`) and a name of its own (``lm-batch-<random>``, so two
    runs never collide), then the values file, then the flags (``None`` = not given)."""
    from labelmatch.platform.images import image

    # The pods run this release's torch-free step image (Ray Data + ONNX Runtime) by default.
    defaults = {"image": image("step"), "name": rayjob_name(BATCH_NAME_PREFIX), **BATCH_RAYJOB_DEFAULTS}
    return RayJobSpec.from_values(values_file, defaults, **overrides)


def batch_entrypoint(config: BatchConfig, labels_uri: str | None = None) -> str:
    """The ``labelmatch classify`` command the RayJob runs (the cluster's own Ray: ``--address auto``)."""
    args = ["labelmatch", "classify", "--model", config.model, "--input", config.input, "--output",
            config.output, "--concurrency", str(config.concurrency), "--batch-size", str(config.batch_size),
            "--ort-threads", str(config.ort_threads), "--address", "auto", "--no-progress"]
    if labels_uri:
        args += ["--labels", labels_uri]
    for flag, on in (("--replace-labels", config.replace_labels), ("--similarities", config.similarities),
                     ("--strict", config.strict)):
        if on:
            args.append(flag)
    return shlex.join(args)


def batch_rayjob(config: BatchConfig, spec: RayJobSpec, log: Callable[[str], None] | None = print
                 ) -> tuple[dict[str, Any], str | None]:
    """``(RayJob manifest, where the extra labels must be uploaded or None)``; owned by this
    process's pod when it is known (:func:`~labelmatch.platform.kuberay.rayjob_owner`, which
    says in one ``log`` line why not when the namespaces differ).

    Raises:
        ConfigError: The model, input or output is not an ``s3://`` URI (the pods cannot read
            this machine's disk).
    """
    from labelmatch.platform.artifact_store import is_s3_uri

    for what, uri in (("--model", config.model), ("--input", config.input), ("--output", config.output)):
        if not is_s3_uri(uri):
            raise ConfigError(f"{what} {uri}: a RayJob reads and writes the store; give an s3:// URI")
    labels_uri = f"{config.output.rstrip('/')}/_labels.json" if config.labels else None
    manifest = build_rayjob(spec, batch_entrypoint(config, labels_uri), component="batch",
                            owner=rayjob_owner(spec.namespace, log))
    return manifest, labels_uri


def run_batch_rayjob(config: BatchConfig, spec: RayJobSpec, api_client: Any = None,
                     on_status: Callable[[str], None] | None = print,
                     wait: WaitPolicy | None = None) -> dict[str, Any]:
    """Run the batch on a RayJob: upload the extra labels, create the job, follow it, delete it
    (:func:`~labelmatch.platform.kuberay.run_rayjob`: also on SIGTERM and after API errors), and
    return the run summary it wrote.

    Raises:
        ConfigError: See :func:`batch_rayjob`.
        LabelmatchError: The RayJob did not succeed.
    """
    from labelmatch.platform.artifact_store import ArtifactStore

    manifest, labels_uri = batch_rayjob(config, spec, on_status)
    store = ArtifactStore.from_env()
    if labels_uri:
        store.put_bytes(labels_uri, json.dumps(config.labels, ensure_ascii=False).encode())
    run_rayjob(manifest, api_client, on_status, wait)
    layout = OutputLayout.at(config.output)
    with layout.filesystem.open_input_stream(layout.summary()) as handle:
        return json.loads(handle.read())
