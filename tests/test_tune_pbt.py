"""A real Ray Tune PBT run on CPU with the bundled encoder: exploit, rank, best trial, resume.

One run serves every test of this module (Ray and model start-up dominate the cost): it is
interrupted (SIGUSR1, Tune's own stop signal) after the first round of results, then resumed
with ``tune_sft(..., resume=True)``, which finishes it and writes the model and the report.
Tune's storage is ``s3://`` on a real S3 server on 127.0.0.1 (what a multi-node run needs):
checkpoints, experiment state and the resume all go through it; the experiment is copied back
here afterwards only to read it.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from conftest import environ, make_tiny_dataset, ray_sandbox, tiny_config  # noqa: E402
from ray import tune  # noqa: E402
from s3_server import moto_s3_server, s3_env  # noqa: E402

from labelmatch.core.artifacts import verify_artifact  # noqa: E402
from labelmatch.data.dataset import load_dataset, save_dataset  # noqa: E402
from labelmatch.platform.ray_local import init_local_ray  # noqa: E402
from labelmatch.tuning.pbt import TuneConfig, run_tune, tune_sft  # noqa: E402
from labelmatch.tuning.search_space import SearchSpace  # noqa: E402
from labelmatch.tuning.trainable import RECORD_FILE  # noqa: E402

ITERATIONS = 3
#: Beside the GPU-shaped cluster test, in `make test`'s second pytest process.
pytestmark = pytest.mark.own_process


class InterruptOnce(tune.Callback):
    """Send Tune its stop signal once ``after`` checkpoints are registered (a marker file
    keeps the restored copy of this callback from firing again).

    Counting checkpoints rather than results: a result whose checkpoint Tune has not yet
    registered is not finished work, and would rightly be re-trained after the resume.
    """

    def __init__(self, marker: Path, after: int):
        self.marker, self.after, self.seen = marker, after, 0

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self.seen += 1
        if self.seen >= self.after and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGUSR1)


STORAGE = "s3://lm-tune/results"


@pytest.fixture(scope="module")
def ray_home():
    """One local Ray for the module, with HOME, RAY_TMPDIR and the session inside a temp dir, and
    an S3 server whose settings every Ray worker inherits (set before Ray starts).

    The directory is short and under /tmp: Ray's Unix sockets live in it (107-byte limit).
    """
    with moto_s3_server() as url, ray_sandbox("lmpbt-") as root, environ(**s3_env(url)):
        from labelmatch.platform.artifact_store import ArtifactStore

        ArtifactStore.from_env().put_bytes(f"{STORAGE}/.keep", b"")  # the bucket
        init_local_ray(num_cpus=2, temp_dir=str(root / "ray"))
        yield root


@pytest.fixture(scope="module")
def pbt_run(ray_home):
    """Interrupted-then-resumed PBT: 2 trials (ranks 4 and 8), synchronous, 3 iterations."""
    data = ray_home / "data"
    save_dataset(make_tiny_dataset(n_docs=90), data)
    config = TuneConfig(
        trials=2,
        iterations=ITERATIONS,
        perturbation_interval=1,
        synch=True,
        quantile_fraction=0.5,
        search_space=SearchSpace(lora_ranks=(4, 8)),
        storage_path=STORAGE,
        verbose=0,
        train_config=tiny_config(steps_per_iteration=2, max_length=32, batch_size=8),
    )
    interrupted = run_tune(
        load_dataset(data),
        config,
        config.storage_path,
        callbacks=[InterruptOnce(ray_home / "interrupted", after=2)],
    )
    states = [r.metrics.get("training_iteration", 0) for r in interrupted]
    config.resume = True
    summary = tune_sft(data, ray_home / "model", ray_home / "report", config)
    from pyarrow import fs

    from labelmatch.tuning.storage import s3_filesystem

    local = ray_home / "results" / config.name
    local.mkdir(parents=True)
    remote = f"{STORAGE.removeprefix('s3://')}/{config.name}"
    fs.copy_files(remote, str(local), source_filesystem=s3_filesystem(),
                  destination_filesystem=fs.LocalFileSystem())
    return {
        "summary": summary,
        "interrupted_iterations": states,
        "root": ray_home,
        "experiment": local,
    }


def _records(experiment: Path) -> list[dict]:
    records = []
    for path in sorted(experiment.glob(f"*/checkpoint_*/{RECORD_FILE}")):
        records.append({**json.loads(path.read_text()), "trial_dir": path.parent.parent.name})
    return records


def test_ray_is_bound_to_loopback_with_temp_files_in_the_temp_dir(ray_home):
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    assert Path(session_dir).resolve().is_relative_to(ray_home.resolve())
    assert (ray_home / ".ray" / "auth_token").is_file(), "Ray's auth token belongs in the test's HOME"


def test_interrupted_run_resumes_without_losing_finished_work(pbt_run):
    assert all(i < ITERATIONS for i in pbt_run["interrupted_iterations"]), "the run was not interrupted"
    assert pbt_run["summary"]["experiment"] == f"{STORAGE}/labelmatch-tune", "the experiment lives in S3"
    assert list(pbt_run["experiment"].glob("*/checkpoint_*")), "checkpoints were written to S3"
    import csv

    finished = []
    for progress in pbt_run["experiment"].glob("*/progress.csv"):
        iterations = [int(row["iteration"]) for row in csv.DictReader(progress.open())]
        # Resumed from checkpoints, not from scratch: iterations never go back. At most the one
        # iteration in flight when the run was stopped (reported, not yet in the experiment
        # state) is trained again. (A trial may end early: exploiting a top trial's final
        # checkpoint leaves nothing to train.)
        assert iterations == sorted(iterations) and iterations[0] == 1, progress
        assert len(iterations) - len(set(iterations)) <= 1, progress
        finished.append(iterations[-1])
    assert max(finished) == ITERATIONS


def test_an_exploit_restored_a_checkpoint_written_by_another_trial(pbt_run):
    records = _records(pbt_run["experiment"])
    by_trial_iteration = {(r["trial_id"], r["iteration"]): r for r in records}
    exploits = [
        (r, e)
        for r in records
        for e in r["lineage"]
        if e["into_trial"] == r["trial_id"] and e["from_trial"] != r["trial_id"]
    ]
    assert exploits, "no checkpoint records an exploit"
    for record, event in exploits:
        donor = by_trial_iteration[(event["from_trial"], event["at_iteration"])]
        # The cloned checkpoint is the donor's own, written by the donor trial in its own directory.
        assert donor["trial_dir"] != record["trial_dir"]
        assert donor["lora_rank"] == event["from_lora_rank"]
        assert record["iteration"] > event["at_iteration"]


def test_lora_rank_travels_with_the_cloned_checkpoint(pbt_run):
    import csv

    records = _records(pbt_run["experiment"])
    first_ranks = {}  # the rank each trial trained its first iteration with (progress.csv is append-only)
    for progress in pbt_run["experiment"].glob("*/progress.csv"):
        first = min(csv.DictReader(progress.open()), key=lambda row: int(row["iteration"]))
        first_ranks[first["trial_id"]] = int(float(first["lora_rank"]))
    assert sorted(first_ranks.values()) == [4, 8], "both ranks were sampled"
    crossed = [
        (r, e)
        for r in records
        for e in r["lineage"][-1:]
        if e["into_trial"] == r["trial_id"] and first_ranks[r["trial_id"]] != e["from_lora_rank"]
    ]
    assert crossed, "with ranks 4 and 8 in a population of 2, an exploit crosses ranks"
    for record, event in crossed:
        assert record["lora_rank"] == event["from_lora_rank"]


def test_best_checkpoint_is_chosen_by_validation_f1_and_written_as_a_model(pbt_run):
    from labelmatch.model.classifier import Classifier

    summary, root = pbt_run["summary"], pbt_run["root"]
    history = json.loads((root / "report" / "pbt_history.json").read_text())
    all_f1 = [row["val_macro_f1"] for t in history["trials"].values() for row in t["timeline"]]
    assert len(all_f1) == summary["trial_iterations"] >= ITERATIONS + 1
    assert summary["best_val_macro_f1"] == pytest.approx(max(all_f1))
    assert summary["exploits"] == len(history["exploits"]) >= 1
    verify_artifact(root / "model", "Model")
    info = json.loads((root / "model" / "labelmatch.json").read_text())
    assert info["pbt"]["summary"]["best_trial"] == summary["best_trial"]
    assert info["config"]["lora_rank"] == summary["best_lora_rank"]
    adapter = json.loads((root / "model" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == summary["best_lora_rank"]
    assert len(Classifier.load(root / "model").predict(["my VAT return is late"])) == 1


def test_report_has_plot_table_and_exploits(pbt_run):
    report = pbt_run["root"] / "report"
    verify_artifact(report, "Report")
    text = (report / "report.md").read_text()
    assert "## Exploits (who copied whom, when)" in text and "pbt_history.png" in text
    assert (report / "pbt_history.png").stat().st_size > 10_000
