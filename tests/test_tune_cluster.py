"""PBT on the production cluster's shape: a head that takes no trials, 4 one-GPU workers, S3 only.

What runs: a 5-node Ray cluster on 127.0.0.1 (``ray.cluster_utils.Cluster``, every node bound to
127.0.0.1, dashboard off, HOME and the Ray temp dirs in a short /tmp sandbox). The head offers no
CPUs and no GPUs (``num_cpus=0, num_gpus=0``, what ``build_rayjob``'s ``num-cpus``/``num-gpus: "0"``
give the RayJob's head); each of the 4 worker nodes declares 1 GPU and 1 CPU and has its own temp
dir (Ray session, ``TMPDIR`` of its processes), the stand-in for a pod's own disk. The real
``labelmatch tune`` (bundled MiniLM, LoRA SFT, our ``run_tune``/``tune_sft``) runs 4 trials that
each request ``{"GPU": 1, "CPU": 1}``: synchronous PBT, 3 iterations of 2 steps, the bottom half
copies the top half. Tune's storage is ``s3://`` on a moto S3 server on 127.0.0.1 and nothing else:
there is no shared local storage path. The first driver is ``python -m labelmatch tune --address
<the cluster>`` in a subprocess (the RayJob's entrypoint); it is killed with SIGKILL once the
experiment state it saved in S3 holds a checkpoint of every trial, and a new driver in this process
finishes the run with ``tune_sft(..., resume=True)`` and writes the best Model and the report.

What it asserts, from the records the trials write into every checkpoint (``node_id`` from
``ray.get_runtime_context()``, the driver's ``job_id``, the checkpoint a trial restored from), read
back from S3 (at each poll while the first driver runs, right after the kill, at the end) and from
the report's rows (each trial reports its node with its metrics):

* the 4 trials ran their first iteration on the 4 distinct worker nodes, and no iteration ever ran
  on the head (checkpoint records and the report's ``pbt_history.json`` rows);
* at least one PBT exploit restored, from S3, a checkpoint that another trial wrote on another node;
* the killed run resumed from its checkpoints: the new driver's trials restored the killed driver's
  checkpoints from S3, never re-trained an iteration 1, and the run finished with a verified Model
  whose recorded request is ``{"GPU": 1, "CPU": 1}``;
* every restore read S3, and Tune's checkpoints (``checkpoint_NNNNNN``) exist in S3 only. A trial
  stages each checkpoint in a temp dir on its own node, ``tune.report`` uploads it and the dir is
  deleted; a restore downloads into a temp dir on the restoring node. The only checkpoint files a
  node's disk may keep are such temp copies in its own ``TMPDIR``, left when the driver's kill
  ended a trial process mid-way. Ray Tune also keeps, locally, the driver's staging dir
  (experiment state, ``progress.csv``/``result.json`` per trial, synced up to S3; on the head
  here) and each trial's working dir on its own node; neither holds a checkpoint.

The resume goes through :class:`labelmatch.tuning.scheduler.ResumablePBT`: trials restored from
checkpoints of different iterations once left every trial paused at the sync point with none
running, and Ray's synchronous PBT waited forever; the scheduler now moves such a sync point.

What it does not prove: no GPU is used (the "GPUs" are Ray resources; torch runs on CPU, which on
a real A10 changes speed and memory, not placement); all nodes are processes on one machine, so
"another node's disk" is another directory, kept apart by construction rather than by the
network; no pod, KubeRay operator or MinIO runs (moto plays S3), and the driver is started as a
process here, not by KubeRay's submitter through the Jobs API; the dataset is read by the driver
from a local directory (trials get it through Ray's object store, across nodes); it is one small
run, not a measure of scheduling under load or of a lost worker node. About 100-110 s on 2 busy
cores.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")
from conftest import environ, make_tiny_dataset, ray_sandbox, tiny_config  # noqa: E402
from s3_server import moto_s3_server, s3_env  # noqa: E402

from labelmatch.core.artifacts import verify_artifact  # noqa: E402
from labelmatch.data.dataset import save_dataset  # noqa: E402
from labelmatch.tuning.pbt import TuneConfig, tune_sft  # noqa: E402
from labelmatch.tuning.search_space import SearchSpace  # noqa: E402
from labelmatch.tuning.trainable import RECORD_FILE  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.own_process]

WORKERS = 4
ITERATIONS = 3
STORAGE = "s3://lm-cluster/tune"
NAME = "labelmatch-tune"
#: The longest wait for the killed driver's experiment state to hold every trial's checkpoint.
KILL_DEADLINE_S = 300


@contextlib.contextmanager
def gpu_shaped_cluster(root: Path) -> Iterator[Any]:
    """A head without CPUs or GPUs and ``WORKERS`` nodes of 1 GPU + 1 CPU, all on 127.0.0.1.

    Each node has its own temp dir under ``root`` (``head``, ``w0``..``w3``): its Ray session and
    the ``TMPDIR`` of every process it starts. Yields the ``ray.cluster_utils.Cluster``.
    """
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # As init_local_ray: Ray keeps a loopback node address only with its cluster mode off.
    cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    (root / "ray").mkdir()  # Ray writes the current cluster's address there (RAY_TMPDIR/ray)
    common = {"node_ip_address": "127.0.0.1", "include_dashboard": False, "object_store_memory": 100 << 20}
    cluster = None
    try:
        with environ(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"):
            (root / "head").mkdir()
            with environ(TMPDIR=str(root / "head")):
                cluster = Cluster(initialize_head=True, head_node_args={
                    "num_cpus": 0, "num_gpus": 0, "temp_dir": str(root / "head"), **common})
            for i in range(WORKERS):
                disk = root / f"w{i}"
                disk.mkdir()
                with environ(TMPDIR=str(disk)):
                    cluster.add_node(num_cpus=1, num_gpus=1, resources={f"worker-{i}": 1},
                                     temp_dir=str(disk), **common)
            cluster.wait_for_nodes()
            yield cluster
    finally:
        if cluster is not None:
            cluster.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode


def _s3():
    from labelmatch.tuning.storage import s3_filesystem

    return s3_filesystem()


def _experiment_path() -> str:
    return f"{STORAGE.removeprefix('s3://')}/{NAME}"


def _records(filesystem: Any) -> list[dict]:
    """Every checkpoint's record in S3, with ``trial_dir`` and the checkpoint's ``checkpoint`` URI."""
    from pyarrow import fs

    records = []
    selector = fs.FileSelector(_experiment_path(), allow_not_found=True, recursive=True)
    for info in filesystem.get_file_info(selector):
        if info.base_name != RECORD_FILE:
            continue
        with filesystem.open_input_stream(info.path) as stream:
            record = json.loads(stream.read())
        checkpoint = info.path.rsplit("/", 1)[0]
        records.append({**record, "trial_dir": checkpoint.split("/")[-2], "checkpoint": f"s3://{checkpoint}"})
    return sorted(records, key=lambda r: (r["trial_id"], r["iteration"], r["job_id"]))


def _trials_checkpointed_in_saved_state(filesystem: Any) -> int:
    """How many trials the experiment state saved in S3 holds a checkpoint of (0: no state yet)."""
    from ray import tune

    if not tune.Tuner.can_restore(_experiment_path(), storage_filesystem=filesystem):
        return 0
    try:
        analysis = tune.ExperimentAnalysis(_experiment_path(), storage_filesystem=filesystem)
    except (OSError, ValueError, KeyError):  # a state read while it is being replaced
        return 0
    return sum(1 for trial in analysis.trials if trial.checkpoint is not None)


def _kill_when_every_trial_is_checkpointed(driver: subprocess.Popen, log: Path) -> tuple[float, list[dict]]:
    """SIGKILL the driver once its saved experiment state holds a checkpoint of every trial.

    Returns:
        The seconds waited, and every record seen in S3 while waiting (each poll's, deduplicated):
        a checkpoint directory can be written again later under the same name.
    """
    filesystem, started = _s3(), time.monotonic()
    seen: dict[tuple, dict] = {}
    while time.monotonic() - started < KILL_DEADLINE_S:
        if driver.poll() is not None:
            pytest.fail(f"the driver ended ({driver.returncode}) before it was killed:\n"
                        f"{log.read_text()[-4000:]}")
        written = _records(filesystem)
        seen.update({(r["checkpoint"], r["iteration"], r["job_id"]): r for r in written})
        if len(written) >= WORKERS and _trials_checkpointed_in_saved_state(filesystem) == WORKERS:
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=60)
            return time.monotonic() - started, list(seen.values())
        time.sleep(2)
    driver.kill()
    pytest.fail(f"no experiment state with every trial checkpointed in {KILL_DEADLINE_S} s:\n"
                f"{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def cluster_run():
    """The killed-then-resumed PBT run on the GPU-shaped cluster; what it left in S3 and on disk."""
    from labelmatch.platform.artifact_store import ArtifactStore

    started = time.monotonic()
    with moto_s3_server() as url, ray_sandbox("lmclu-") as root, environ(**s3_env(url)):
        ArtifactStore.from_env().put_bytes(f"{STORAGE}/.keep", b"")  # the bucket
        data = root / "data"
        save_dataset(make_tiny_dataset(n_docs=90), data)
        with gpu_shaped_cluster(root) as cluster:
            nodes = {n["NodeID"]: n for n in cluster.global_state.node_table() if n["Alive"]}
            config = TuneConfig(
                trials=WORKERS,
                iterations=ITERATIONS,
                perturbation_interval=1,
                synch=True,
                quantile_fraction=0.5,
                search_space=SearchSpace(lora_ranks=(4, 8)),
                resources_per_trial={"GPU": 1, "CPU": 1},
                address=cluster.address,
                storage_path=STORAGE,
                name=NAME,
                verbose=0,
                train_config=tiny_config(steps_per_iteration=2, max_length=32, batch_size=8),
            )
            log = root / "driver.log"
            (root / "driver-tmp").mkdir()
            with log.open("w") as out, environ(TMPDIR=str(root / "driver-tmp")):
                driver = subprocess.Popen(
                    [sys.executable, "-m", "labelmatch", "tune", "--data", str(data),
                     "--out", str(root / "killed-model"), "--config", json.dumps(config.to_dict())],
                    stdout=out, stderr=subprocess.STDOUT, cwd=root,
                )
            try:
                killed_after, seen_before_kill = _kill_when_every_trial_is_checkpointed(driver, log)
            finally:
                if driver.poll() is None:
                    driver.kill()
                    driver.wait()
            killed = {"returncode": driver.returncode, "after_s": killed_after, "seen": seen_before_kill,
                      "records": _records(_s3()), "model_written": (root / "killed-model").exists()}
            config.resume = True
            summary = tune_sft(data, root / "model", root / "report", config)
            records = _records(_s3())
            local = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                           if p.name == RECORD_FILE or p.name.startswith("checkpoint_"))
            yield {
                "root": root,
                "nodes": nodes,
                "head": cluster.head_node.node_id,
                "workers": {node.node_id for node in cluster.worker_nodes},
                "killed": killed,
                "summary": summary,
                "records": records,
                "local_checkpoints": local,
                "wall_s": time.monotonic() - started,
            }


def test_the_cluster_has_the_production_shape(cluster_run):
    nodes, head, workers = cluster_run["nodes"], cluster_run["head"], cluster_run["workers"]
    assert set(nodes) == workers | {head} and len(workers) == WORKERS
    assert {n["NodeManagerAddress"] for n in nodes.values()} == {"127.0.0.1"}
    resources = nodes[head]["Resources"]
    assert resources.get("CPU", 0) == 0 and resources.get("GPU", 0) == 0, "the head takes no trials"
    for node_id in workers:
        assert (nodes[node_id]["Resources"]["GPU"], nodes[node_id]["Resources"]["CPU"]) == (1, 1)
    temp_dirs = {Path(n["ObjectStoreSocketName"]).parents[2] for n in nodes.values()}
    assert len(temp_dirs) == WORKERS + 1, "every node has its own temp dir"


def test_four_trials_ran_on_four_distinct_worker_nodes(cluster_run):
    workers = cluster_run["workers"]
    history = json.loads((cluster_run["root"] / "report" / "pbt_history.json").read_text())
    rows = [{**row, "trial_id": trial_id} for trial_id, trial in history["trials"].items()
            for row in trial["timeline"]]
    # Iteration 1's node per trial, from every record of it that was ever read (while the first
    # driver ran, right after its kill, at the end: a resumed trial may write a later iteration
    # under an earlier checkpoint's name) and from the report's rows (each trial reports its node).
    first: dict[str, set[str]] = {}
    for record in _all_records(cluster_run) + rows:
        if record["iteration"] == 1:
            first.setdefault(record["trial_id"], set()).add(record["node_id"])
    assert len(first) == WORKERS, _summary(cluster_run)
    assert all(len(nodes) == 1 for nodes in first.values()), first
    assert {node for nodes in first.values() for node in nodes} == workers, "one trial per 1-GPU worker"
    assert len(history["trials"]) == WORKERS
    assert all(row.get("node_id") for row in rows), "the report says where each iteration ran"
    used = {r["node_id"] for r in _all_records(cluster_run)} | {row["node_id"] for row in rows}
    assert used <= workers, "no iteration ran on the head"


def _summary(cluster_run) -> str:
    """Every record read, one line each, for a failure's message."""
    reads = {"seen": cluster_run["killed"]["seen"], "killed": cluster_run["killed"]["records"],
             "final": cluster_run["records"]}
    return "\n".join(f"{when}: {r['trial_id']} iteration {r['iteration']} job {r['job_id']} "
                     f"{r['checkpoint'].rsplit('/', 2)[-2:]} from {r['restored_from'] or '-'}"
                     for when, records in reads.items() for r in records)


def _all_records(cluster_run) -> list[dict]:
    """The records read while the first driver ran, right after its kill and at the end."""
    return cluster_run["killed"]["seen"] + cluster_run["killed"]["records"] + cluster_run["records"]


def test_an_exploit_restored_from_s3_a_checkpoint_written_on_another_node(cluster_run):
    records = _all_records(cluster_run)
    by_checkpoint: dict[str, list[dict]] = {}
    for record in records:
        by_checkpoint.setdefault(record["checkpoint"], []).append(record)
    crossed = []
    for record in records:
        lineage = record["lineage"]
        if not lineage or lineage[-1]["into_trial"] != record["trial_id"] or not record["restored_from"]:
            continue
        event = lineage[-1]
        for donor in by_checkpoint.get(record["restored_from"], []):
            if donor["trial_id"] != event["from_trial"] or donor["iteration"] != event["at_iteration"]:
                continue  # not the checkpoint this exploit cloned (or one written over it since)
            assert donor["trial_id"] != record["trial_id"] and donor["lora_rank"] == event["from_lora_rank"]
            assert event["into_node"] == record["node_id"]
            if event["from_node"] != event["into_node"] and donor["node_id"] == event["from_node"]:
                crossed.append((donor["node_id"], record["node_id"]))
    exploits = "\n".join(
        f"{r['trial_id']} iteration {r['iteration']} on {r['node_id'][:8]} from {r['restored_from'] or '-'}: "
        f"{r['lineage'][-1] if r['lineage'] else '-'}" for r in records if r["lineage"])
    assert crossed, (f"no exploit restored a checkpoint written on another node; exploits:\n{exploits}\n"
                     f"every record read:\n{_summary(cluster_run)}")
    assert all(a in cluster_run["workers"] and b in cluster_run["workers"] for a, b in crossed)


def test_a_killed_driver_resumes_from_the_checkpoints_in_s3(cluster_run):
    killed, records = cluster_run["killed"], cluster_run["records"]
    assert killed["returncode"] == -signal.SIGKILL and not killed["model_written"]
    first_job = {r["job_id"] for r in killed["records"]}
    assert len(first_job) == 1 and len(killed["records"]) >= WORKERS
    resumed = [r for r in records if r["job_id"] not in first_job]
    assert resumed, "the new driver trained nothing"
    assert len({r["job_id"] for r in resumed}) == 1
    assert all(r["iteration"] > 1 for r in resumed), "the resumed run re-trained an iteration 1"
    killed_checkpoints = {r["checkpoint"]: r for r in killed["records"]}
    continued = [r for r in resumed if (source := killed_checkpoints.get(r["restored_from"]))
                 and source["trial_id"] == r["trial_id"]]
    assert continued, "no trial continued from the checkpoint it wrote before the kill"
    assert max(r["iteration"] for r in records) == ITERATIONS


def test_the_resumed_run_writes_the_best_model(cluster_run):
    from labelmatch.model.classifier import Classifier

    summary, root = cluster_run["summary"], cluster_run["root"]
    assert summary["experiment"] == f"{STORAGE}/{NAME}"
    best = [r for r in cluster_run["records"]
            if (r["trial_id"], r["iteration"]) == (summary["best_trial"], summary["best_iteration"])]
    assert best and best[-1]["val_macro_f1"] == pytest.approx(summary["best_val_macro_f1"])
    verify_artifact(root / "model", "Model")
    verify_artifact(root / "report", "Report")
    info = json.loads((root / "model" / "labelmatch.json").read_text())
    assert info["pbt"]["config"]["resources_per_trial"] == {"GPU": 1, "CPU": 1}
    assert len(Classifier.load(root / "model").predict(["my VAT return is late"])) == 1


def test_checkpoints_live_in_s3_and_a_node_only_holds_its_own_temp_copies(cluster_run):
    root, records = cluster_run["root"], cluster_run["records"]
    assert all(r["restored_from"] == "" or r["restored_from"].startswith(f"{STORAGE}/{NAME}/")
               for r in records), "every restore read S3"
    local = cluster_run["local_checkpoints"]
    assert not [p for p in local if re.search(r"checkpoint_\d{6}", p)], "Tune's checkpoints are in S3 only"
    # What may remain on a disk is a temp copy in that node's own TMPDIR: a checkpoint staged before
    # tune.report uploaded it, or one downloaded from S3 to restore, left by a trial process that
    # the driver's kill ended mid-way.
    disks = {f"w{i}" for i in range(WORKERS)}
    for path in local:
        node_dir, temp = Path(path).parts[:2]
        assert node_dir in disks and temp.startswith(("labelmatch-ckpt-", "checkpoint_tmp_")), path
    for i in range(WORKERS):
        assert list((root / f"w{i}").glob("session_*")), f"worker {i} kept its session in its own dir"
    print(f"cluster PBT run: {cluster_run['wall_s']:.0f} s, driver killed after "
          f"{cluster_run['killed']['after_s']:.0f} s of polling; {len(local)} temp checkpoint file(s) left")
