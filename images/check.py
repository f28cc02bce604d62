"""``make images-check``: build the images and run them the way the cluster would, on this machine.

No Docker daemon and no Kubernetes are needed: buildah builds the images (from a registry base or
the local Debian base ``images/base-image.sh`` makes), and every run uses the image's own root file
system (``buildah from`` + ``buildah mount``) in a private mount namespace: the root bind-mounted
**read-only**, a tmpfs on ``/tmp``, ``/proc``, ``/dev`` and ``/sys`` from the host, the model or an
output directory bound in, then ``chroot --userspec=10001:10001`` with the image's own environment
(``ENV``), as the pod's ``securityContext`` (``runAsUser: 10001``, ``readOnlyRootFilesystem``)
would run it. Processes share the host network: servers bind 127.0.0.1.

Checks:

* **serve**: runs as 10001; the root is read-only and ``/tmp`` writable; ``import torch`` fails;
  ``labelmatch serve`` on an OnnxModel (the demo's export, or one trained here) answers readiness
  and one inference over KServe v1 and over OIP v2, each equal to the host's
  :class:`~labelmatch.runtime.onnx_classifier.OnnxClassifier` (same labels, scores within 1e-6);
* **step** (the torch-free image of data_prep, evaluate, deploy, monitor_drift, batch_classify):
  runs as 10001 on a read-only root; ``import torch`` fails and no CUDA library or ``nvidia-*``
  package is present; every module of :data:`labelmatch.platform.images.STEP_MODULES` imports;
  then compiled IR steps run — each the IR's own command and arguments, with an executor input
  built by ``kfp.local``'s code, as KFP's launcher would: the training IR's ``data_prep`` writes a
  Dataset, its ``evaluate`` gates the served OnnxModel on that Dataset and writes a Report, and
  the batch IR's ``batch_classify`` classifies documents on a local Ray inside the pod; the host
  verifies every artifact; the serving chart's canary reaper CronJob command (``helm template``)
  rolls back an abandoned canary through the Kubernetes client in the image (the API server is
  ``tests/k8s_fake.py``'s KServe double on 127.0.0.1);
* **train**: a short SFT (``labelmatch train``, CPU torch here) on the sample data writes a Model
  artifact the host verifies;
* **base**: the CLI starts, as 10001, on a read-only root.

Writes ``images.json`` and ``images.md`` (sizes, build times, digests, every check) under ``--out``.
Needs root (buildah's vfs storage, mount namespaces).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VERSION = __import__("labelmatch").__version__
LOCAL_BASE = "localhost/labelmatch-python:3.11-bookworm"
UID = "10001:10001"
TEXT = "Our Q2 VAT return was filed late and the tax office charged a penalty."


def log(message: str) -> None:
    print(f"[images-check] {message}", file=sys.stderr, flush=True)


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=True, text=True, **kwargs)


def buildah(*args: str, capture: bool = True) -> str:
    out = run(["buildah", "--storage-driver", "vfs", *args], capture_output=capture)
    return out.stdout.strip() if capture else ""


def image_exists(name: str) -> bool:
    return (
        subprocess.run(
            ["buildah", "--storage-driver", "vfs", "inspect", "--type", "image", name], capture_output=True
        ).returncode
        == 0
    )


def base_image(args: argparse.Namespace) -> str:
    """The PYTHON_IMAGE to build from: given, else the local Debian base (made when missing)."""
    if args.python_image:
        return args.python_image
    if not image_exists(LOCAL_BASE):
        log(f"no {LOCAL_BASE}: making it with images/base-image.sh (debootstrap)")
        run([str(ROOT / "images" / "base-image.sh"), LOCAL_BASE], env={**os.environ, "ENGINE": "podman"})
    return LOCAL_BASE


def torch_wheel() -> str | None:
    """A local CPU torch wheel of the pinned version (pip's find-links), for the check's train image."""
    wanted = os.environ.get("TORCH_VERSION", "2.13.0")
    for folder in (os.environ.get("PIP_FIND_LINKS", ""), "/opt/wheels"):
        for path in sorted(Path(folder).glob(f"torch-{wanted}*cpu*.whl")) if folder else []:
            return str(path)
    return None


def build(names: list[str], python_image: str) -> dict[str, dict[str, Any]]:
    env = {**os.environ, "ENGINE": "buildah", "PYTHON_IMAGE": python_image}
    wheel = torch_wheel()
    if wheel:
        env["TORCH_WHEEL"] = wheel
    ca = os.environ.get("CA_BUNDLE") or (
        "/etc/ssl/certs/ca-certificates.crt" if Path("/etc/ssl/certs/ca-certificates.crt").is_file() else ""
    )
    if ca:
        env["CA_BUNDLE"] = ca
    built = {}
    for name in names:
        log(
            f"building {name} from {python_image}"
            + (f" (torch {Path(wheel).name})" if wheel and name == "train" else "")
        )
        out = run([str(ROOT / "images" / "build.sh"), name], env=env, capture_output=True).stdout.split()
        tag, seconds = out[-3], int(out[-1])
        built[name] = {"tag": tag, **stored_image(tag), "build_seconds": seconds}
        log(f"{tag}: {built[name]['size_bytes'] / 2**20:.0f} MiB, {seconds} s, {built[name]['digest']}")
    return built


def stored_image(tag: str) -> dict[str, Any]:
    """The digest (as images/build.sh prints it) and size of the image ``tag`` in buildah's storage.

    Raises:
        SystemExit: naming the tag, when storage has no such image.
    """
    if not image_exists(tag):
        raise SystemExit(f"images-check: {tag} is not in buildah's storage; build it (leave out --reuse, "
                         "or name it in --rebuild)")
    digest = buildah("inspect", "--type", "image", "--format", "{{.FromImageDigest}}", tag)
    size = run(["podman", "--storage-driver", "vfs", "image", "inspect", "--format", "{{.Size}}", tag],
               capture_output=True).stdout.strip()
    return {"digest": digest, "size_bytes": int(size)}


def reused_images(earlier: dict[str, dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    """The images of an earlier run (its ``images.json`` entries), with the digest and size of what
    storage holds under each tag now: a tag built again since (by CI, or by hand) is reported as it is,
    and ``rebuilt_since`` says so; its build time is the earlier run's."""
    images = {}
    for name in names:
        entry = earlier[name]
        now = stored_image(entry["tag"])
        images[name] = {**entry, **now, "rebuilt_since": now["digest"] != entry["digest"]}
    return images


def image_env(tag: str) -> dict[str, str]:
    """The image's ``ENV``, as the container runtime would set it."""
    config = json.loads(buildah("inspect", "--type", "image", tag))["OCIv1"]["config"]
    return dict(item.split("=", 1) for item in config.get("Env", []))


@contextlib.contextmanager
def rootfs(tag: str) -> Iterator[Path]:
    """The image's root file system (a throwaway working container), mounted on the host."""
    container = buildah("from", "--pull-never", tag)
    try:
        path = Path(buildah("mount", container))
        mountpoints = ("tmp", "proc", "dev", "sys", "mnt/models", "kfp-outputs", "data", "out", "batch-in")
        for mountpoint in mountpoints:
            (path / mountpoint).mkdir(parents=True, exist_ok=True)
        yield path
    finally:
        subprocess.run(["buildah", "--storage-driver", "vfs", "umount", container], capture_output=True)
        subprocess.run(["buildah", "--storage-driver", "vfs", "rm", container], capture_output=True)


def as_the_pod(
    root: Path, env: dict[str, str], command: list[str], binds: dict[str, tuple[Path, bool]], **popen: Any
) -> subprocess.Popen:
    """Start ``command`` in ``root``: read-only root, tmpfs /tmp, user 10001, the image's ENV.

    Args:
        binds: ``{container path: (host path, writable)}``.
    """
    # The root becomes a mount point first, so that the mounts below sit on it; it turns
    # read-only last (a remount changes that one mount, not the ones on top of it).
    mounts = [
        f"mount --bind {root} {root}",
        f"mount --rbind /dev {root}/dev",
        f"mount --rbind /proc {root}/proc",
        f"mount --rbind /sys {root}/sys",
        f"mount -t tmpfs -o size=1g,mode=1777 tmpfs {root}/tmp",
    ]
    for target, (source, writable) in binds.items():
        mounts.append(f"mount --bind {shlex.quote(str(source))} {root}{target}")
        if not writable:
            mounts.append(f"mount -o remount,bind,ro {root}{target}")
    mounts.append(f"mount -o remount,bind,ro {root}")
    environment = [f"{k}={v}" for k, v in env.items()]
    inner = (
        " && ".join(mounts)
        + " && exec chroot --userspec="
        + UID
        + f" {root} /usr/bin/env -i "
        + " ".join(shlex.quote(e) for e in environment)
        + " "
        + " ".join(shlex.quote(c) for c in command)
    )
    return subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", inner], text=True, **popen
    )


def in_pod(
    root: Path,
    env: dict[str, str],
    command: list[str],
    binds: dict[str, tuple[Path, bool]] | None = None,
    timeout: float = 1800,
) -> subprocess.CompletedProcess[str]:
    proc = as_the_pod(root, env, command, binds or {}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, proc.returncode, out, "")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Checks:
    """Collects named checks; a failed one is recorded, not raised, so every check runs."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    def add(self, image: str, name: str, passed: bool, detail: str = "") -> None:
        self.results.append({"image": image, "check": name, "passed": bool(passed), "detail": detail[-2000:]})
        why = f" — {detail[-300:]}" if detail and not passed else ""
        log(f"{'PASS' if passed else 'FAIL'} {image}: {name}{why}")

    @property
    def ok(self) -> bool:
        return all(r["passed"] for r in self.results)


def the_model(args: argparse.Namespace, work: Path) -> Path:
    """The OnnxModel to serve: --model, else the newest demo export, else a tiny one made here."""
    if args.model:
        return args.model
    exports = sorted(
        (ROOT / "runs" / "demo").glob("pipeline_root/*/export-onnx/onnx_model"),
        key=lambda p: p.stat().st_mtime,
    )
    if exports:
        return exports[-1]
    log("no demo export (make demo): training and exporting a tiny model on the sample data")
    from labelmatch.data.dataset import assign_splits, load_dataset
    from labelmatch.export.onnx import ExportConfig, export_onnx
    from labelmatch.sample_data import sample_path
    from labelmatch.training.config import TrainConfig
    from labelmatch.training.sft import train_sft

    dataset = assign_splits(load_dataset(sample_path("tax")), 0.15, 0.15, 0)
    train_sft(dataset, TrainConfig(epochs=1, max_length=64, progress=False), work / "model")
    export_onnx(work / "model", work / "onnx", ExportConfig(agreement_gate=0.0), dataset)
    return work / "onnx"


def check_serve(tag: str, model: Path, checks: Checks) -> None:
    import requests

    from labelmatch.runtime.onnx_classifier import OnnxClassifier

    env = image_env(tag)
    with rootfs(tag) as root:
        who = in_pod(root, env, ["python", "-c", "import os; print(os.getuid(), os.getgid())"])
        checks.add("serve", "runs as 10001:10001", who.stdout.strip().endswith("10001 10001"), who.stdout)
        writes = in_pod(
            root,
            env,
            [
                "python",
                "-c",
                "import pathlib; pathlib.Path('/tmp/x').write_text('ok');"
                "pathlib.Path('/opt/venv/x').write_text('no')",
            ],
        )
        checks.add(
            "serve",
            "root read-only, /tmp writable",
            writes.returncode != 0 and "Read-only file system" in writes.stdout,
            writes.stdout,
        )
        torch = in_pod(root, env, ["python", "-c", "import torch"])
        checks.add(
            "serve",
            "torch is not importable",
            torch.returncode != 0 and "No module named 'torch'" in torch.stdout,
            torch.stdout,
        )
        port = free_port()
        binds = {"/mnt/models": (model, False)}
        server = as_the_pod(
            root,
            env,
            [
                "labelmatch",
                "serve",
                "--model",
                "/mnt/models",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--model-name",
                "labelmatch",
                # As the chart runs it: the root is read-only, the SQLite state lives on /tmp.
                "--state-dir",
                "/tmp/labelmatch-state",
            ],
            binds,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            ready, deadline = False, time.monotonic() + 240
            while time.monotonic() < deadline and server.poll() is None:
                with contextlib.suppress(requests.ConnectionError):
                    if requests.get(f"{base}/v2/models/labelmatch/ready", timeout=2).status_code == 200:
                        ready = True
                        break
                time.sleep(1)
            health = ready and requests.get(f"{base}/v2/health/ready", timeout=5).status_code == 200
            state = f"{base}/v2/models/labelmatch/state"
            health = health and requests.get(state, timeout=5).status_code == 200
            output = "" if ready or server.poll() is None else (server.stdout.read() if server.stdout else "")
            why = "" if ready else f"server exited {server.poll()}: {output}"
            checks.add("serve", "readiness (v2 health, model ready, state writable)", health, why)
            if not ready:
                return
            host = OnnxClassifier.load(model).predict([TEXT])[0].to_json()
            v1 = requests.post(
                f"{base}/v1/models/labelmatch:predict", json={"instances": [{"text": TEXT}]}, timeout=60
            ).json()["predictions"][0]
            v2 = requests.post(
                f"{base}/v2/models/labelmatch/infer",
                timeout=60,
                json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [TEXT]}]},
            ).json()
            for protocol, answer in (("v1", v1), ("v2", _v2_prediction(v2))):
                same = answer["labels"] == host["labels"] and all(
                    abs(answer["scores"][k] - v) <= 1e-6 for k, v in host["scores"].items()
                )
                checks.add(
                    "serve",
                    f"{protocol} inference equals the host's OnnxClassifier",
                    same,
                    json.dumps({"served": answer, "host": host})[:1500],
                )
        finally:
            server.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=20)
            if server.poll() is None:
                server.kill()


def _v2_prediction(response: dict[str, Any]) -> dict[str, Any]:
    """The one document's ``{"labels", "scores"}`` from an OIP v2 response (labels as a JSON string
    per document, scores an FP32 tensor in the order of the ``label_names`` parameter)."""
    outputs = {o["name"]: o for o in response["outputs"]}
    names = json.loads(response["parameters"]["label_names"])
    return {
        "labels": json.loads(outputs["labels"]["data"][0]),
        "scores": dict(zip(names, outputs["scores"]["data"][: len(names)], strict=True)),
    }


def ir_step(ir_file: str, task: str, arguments: dict[str, Any], task_root: str) -> list[str]:
    """The command of one step of a compiled IR, as KFP's launcher runs it: the executor's own
    ``command`` + ``args`` with the executor input ``kfp.local`` builds for ``arguments``
    (parameters, and input artifacts as ``dsl`` artifacts whose URIs are paths in the pod)."""
    import yaml
    from google.protobuf import json_format
    from kfp.local import executor_input_utils
    from kfp.pipeline_spec import pipeline_spec_pb2

    ir = next(yaml.safe_load_all((ROOT / "pipelines" / "compiled" / f"{ir_file}-{VERSION}.yaml").read_text()))
    container = ir["deploymentSpec"]["executors"][f"exec-{task}"]["container"]
    spec = json_format.ParseDict(ir["components"][f"comp-{task}"], pipeline_spec_pb2.ComponentSpec())
    executor_input = executor_input_utils.construct_executor_input(
        spec, arguments, task_root=task_root, block_input_artifact=False
    )
    # ints typed as ints, as KFP's backend (and kfp.local) hand them over
    as_json = json.dumps(executor_input_utils.executor_input_to_dict(executor_input, spec))
    return container["command"] + [a.replace("{{$}}", as_json) for a in container["args"]]


def ir_image(ir_file: str, task: str) -> str:
    """The image a compiled IR names for one step."""
    import yaml

    ir = next(yaml.safe_load_all((ROOT / "pipelines" / "compiled" / f"{ir_file}-{VERSION}.yaml").read_text()))
    return ir["deploymentSpec"]["executors"][f"exec-{task}"]["container"]["image"]


def writable_dir(path: Path) -> Path:
    """A directory the pod's user 10001 can write (bound read-write into the pod)."""
    path.mkdir(mode=0o777, parents=True)
    os.chmod(path, 0o777)
    return path


def check_step(tag: str, model: Path, work: Path, checks: Checks) -> None:
    from kfp import dsl

    from labelmatch.core.artifacts import verify_artifact
    from labelmatch.platform.images import STEP_MODULES
    from labelmatch.sample_data import sample_path

    env = image_env(tag)
    role = tag.rsplit("/", 1)[-1]
    for ir_file, task in (("labelmatch-training", "data-prep"), ("labelmatch-training", "evaluate"),
                          ("labelmatch-batch", "batch-classify")):
        named = ir_image(ir_file, task).rsplit("/", 1)[-1]
        checks.add("step", f"{ir_file} IR runs {task} in this image", named == role, f"{named} vs {role}")
    with rootfs(tag) as root:
        who = in_pod(
            root,
            env,
            [
                "python",
                "-c",
                "import os, pathlib; print(os.getuid(), os.getgid());"
                "pathlib.Path('/tmp/x').write_text('ok');"
                "pathlib.Path('/opt/venv/x').write_text('no')",
            ],
        )
        checks.add(
            "step",
            "runs as 10001:10001, root read-only, /tmp writable",
            "10001 10001" in who.stdout and who.returncode != 0 and "Read-only file system" in who.stdout,
            who.stdout,
        )
        probe = in_pod(root, env, ["python", "-c", _NO_TORCH_NO_CUDA])
        try:
            found = json.loads(probe.stdout.strip().splitlines()[-1])
            ok = probe.returncode == 0 and found["torch"].startswith("No module named 'torch'")
            ok = ok and not found["cuda_files"] and not found["nvidia_packages"]
        except (ValueError, IndexError, KeyError):
            ok = False
        checks.add("step", "torch is not importable, no CUDA library or nvidia-* package", ok, probe.stdout)
        imports = in_pod(root, env, ["python", "-c", _IMPORTS.format(modules=list(STEP_MODULES))])
        checks.add(
            "step",
            f"the step modules import without torch ({len(STEP_MODULES)} modules)",
            imports.returncode == 0 and imports.stdout.strip().endswith("[]"),
            imports.stdout,
        )

        outputs = writable_dir(work / "kfp-outputs")
        data = sample_path("tax").parent
        binds = {"/data": (data, False), "/kfp-outputs": (outputs, True), "/mnt/models": (model, False)}
        started = time.perf_counter()
        command = ir_step("labelmatch-training", "data-prep", {"data_uri": "/data/tax"}, "/kfp-outputs/prep")
        prep = in_pod(root, env, command, binds)
        try:
            manifest = verify_artifact(outputs / "prep" / "dataset", "Dataset")
            ok = prep.returncode == 0 and manifest["summary"]["documents"] > 0
        except Exception as exc:  # report, do not stop the other checks
            ok, prep.stdout = False, f"{prep.stdout}\n{exc}"
        checks.add(
            "step",
            "compiled IR's data_prep command writes a verified Dataset",
            ok,
            f"{time.perf_counter() - started:.0f} s; {prep.stdout[-1500:]}",
        )

        started = time.perf_counter()
        arguments = {
            "model": dsl.Model(name="onnx_model", uri="/mnt/models", metadata={"kind": "OnnxModel"}),
            "dataset": dsl.Dataset(name="dataset", uri="/kfp-outputs/prep/dataset", metadata={}),
        }
        writable_dir(outputs / "evaluate")
        command = ir_step("labelmatch-training", "evaluate", arguments, "/kfp-outputs/evaluate")
        gate = in_pod(root, env, command, binds)
        try:
            verify_artifact(outputs / "evaluate" / "report", "Report")
            decision = json.loads((outputs / "evaluate" / "report" / "decision.json").read_text())
            ok = gate.returncode == 0 and decision["deploy"] is True
        except Exception as exc:
            ok, gate.stdout = False, f"{gate.stdout}\n{exc}"
        checks.add(
            "step",
            "compiled IR's evaluate command gates the OnnxModel as served (verified Report)",
            ok,
            f"{time.perf_counter() - started:.0f} s; {gate.stdout[-1500:]}",
        )

        started = time.perf_counter()
        lines = (data / "tax" / "docs.jsonl").read_text().splitlines()[:40]
        texts = [json.loads(line)["text"] for line in lines]
        inbox = work / "batch-in"
        inbox.mkdir()
        (inbox / "docs.jsonl").write_text(
            "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts))
        )
        os.chmod(inbox, 0o755)
        os.chmod(inbox / "docs.jsonl", 0o644)
        arguments = {
            "onnx_model": dsl.Model(name="onnx_model", uri="/mnt/models", metadata={"kind": "OnnxModel"}),
            "input_uri": "/batch-in/docs.jsonl",
            "output_uri": "/kfp-outputs/batch-results",
            "concurrency": 1,
            "ray_temp_dir": "/tmp/ray",
        }
        writable_dir(outputs / "batch")
        command = ir_step("labelmatch-batch", "batch-classify", arguments, "/kfp-outputs/batch")
        batch = in_pod(root, env, command, {**binds, "/batch-in": (inbox, False)})
        try:
            manifest = verify_artifact(outputs / "batch" / "report", "Report")
            rows = json.loads((outputs / "batch" / "report" / "summary.json").read_text())["rows"]
            ok = batch.returncode == 0 and rows == len(texts)
        except Exception as exc:
            ok, batch.stdout = False, f"{batch.stdout}\n{exc}"
        checks.add(
            "step",
            f"compiled IR's batch_classify command classifies {len(texts)} documents on Ray in the pod",
            ok,
            f"{time.perf_counter() - started:.0f} s; {batch.stdout[-1500:]}",
        )
        try:
            check_reaper(root, env, work, checks)
        except Exception as exc:  # report, do not stop the other checks
            checks.add("step", REAPER_CHECK, False, repr(exc))


REAPER_CHECK = ("the serving chart's canary reaper command rolls back an abandoned canary "
                "(API: the tests' KServe double)")


def reaper_container() -> dict[str, Any]:
    """The serving chart's canary reaper container, as ``helm template`` renders it (defaults)."""
    import yaml

    helm = subprocess.run(["bash", str(ROOT / "charts" / "get-helm.sh"), str(ROOT / ".tools")], check=True,
                          capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    rendered = run([helm.stdout.strip(), "template", "rel", str(ROOT / "charts" / "labelmatch-serving"),
                    "--namespace", "ml", "--set", "model.storageUri=s3://labelmatch/models/onnx/0.1.0"],
                   capture_output=True)
    [cron] = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc and doc["kind"] == "CronJob"]
    [container] = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return container


def check_reaper(root: Path, env: dict[str, str], work: Path, checks: Checks) -> None:
    """The serving chart's CronJob command, in this image, rolls back an abandoned canary.

    The API server is the test double of ``tests/k8s_fake.py`` on 127.0.0.1 (KServe's RawDeployment
    canary, ported from its source); the serving state a SQLite file. The InferenceService carries
    a canary whose ``started`` event's deadline has passed, as a deploy step that died leaves it.
    """
    sys.path.insert(0, str(ROOT / "tests"))
    from k8s_fake import kube_fake_server, kubeconfig

    from labelmatch.delivery.abandoned import STARTED, started_event
    from labelmatch.delivery.kserve import canary_name, raw_canary_patch
    from labelmatch.platform.kserve import GROUP, PLURAL, DeployConfig, inference_service, kube_custom_objects
    from labelmatch.platform.kserve import VERSION as API_VERSION
    from labelmatch.state.serving_state import ServingState

    started = time.perf_counter()
    container = reaper_container()
    args = container["args"]
    service, namespace = args[args.index("--service") + 1], args[args.index("--namespace") + 1]
    state_dir = writable_dir(work / "reaper-state")
    state_url = "sqlite:////reaper-state/state.db"
    host_state = ServingState(f"sqlite:///{state_dir / 'state.db'}")
    release = "abcdef123456"
    canary = canary_name(release)
    with kube_fake_server() as (url, kube):
        api = kube_custom_objects(url)
        body = inference_service(DeployConfig(service, namespace, image="reg/serve:0.1.0"), "s3://b/m1",
                                 "d" * 64, {"release-id": "r1"})
        body["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] = "RawDeployment"
        api.create_namespaced_custom_object(GROUP, API_VERSION, namespace, PLURAL, body)
        for _ in range(40):  # the double's controllers advance on each request
            api.get_namespaced_custom_object(GROUP, API_VERSION, namespace, PLURAL, service)
        stable = kube.deployment(namespace, service)["metadata"]["name"]
        existing = api.get_namespaced_custom_object(GROUP, API_VERSION, namespace, PLURAL, service)
        annotations = {"release-id": release, "pipeline-version": VERSION, "run-id": ""}
        patch = raw_canary_patch(existing, "s3://b/m2", "e" * 64, annotations, None, 20, canary)
        api.patch_namespaced_custom_object(GROUP, API_VERSION, namespace, PLURAL, service, patch)
        # As the deploy step stores it before its patch, with a deadline that has passed.
        host_state.save_delivery_event(service, release, "canary", STARTED,
                                       started_event(time.time() - 60, "raw", stable, canary, None, 20))
        for path in state_dir.iterdir():  # the pod's user writes the database
            path.chmod(0o666)
        config_dir = work / "reaper-kube"
        config_dir.mkdir()
        kubeconfig(config_dir / "config", url, namespace)
        for path in (config_dir, config_dir / "config"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        pod_env = {**env, "LABELMATCH_STATE_URL": state_url, "KUBECONFIG": "/reaper-kube/config"}
        binds = {"/reaper-state": (state_dir, True), "/reaper-kube": (config_dir, False)}
        for mountpoint in binds:
            (root / mountpoint.lstrip("/")).mkdir(exist_ok=True)
        reaped = in_pod(root, pod_env, [*container["command"], *args], binds, timeout=300)
        spec = api.get_namespaced_custom_object(GROUP, API_VERSION, namespace, PLURAL, service)["spec"]
    _, newest = host_state.latest_delivery_event(service)
    host_state.close()
    said = f"{namespace}/{service}: the abandoned canary was rolled back" in reaped.stdout
    ok = (reaped.returncode == 0 and said and "canary" not in spec
          and (newest["decision"], newest["reason"]) == ("rolled_back", "abandoned"))
    checks.add("step", REAPER_CHECK, ok, f"{time.perf_counter() - started:.0f} s; {reaped.stdout[-1500:]}")


#: Run in the step image: is torch importable, are CUDA libraries or nvidia-* wheels present?
_NO_TORCH_NO_CUDA = """
import json, os, sys
from importlib import metadata
try:
    import torch
    found = "torch " + torch.__version__
except ModuleNotFoundError as exc:
    found = str(exc)
cuda = [os.path.join(d, f) for top in (sys.prefix, "/usr/lib", "/usr/local") for d, _, files in os.walk(top)
        for f in files if f.startswith(("libcuda", "libcudart", "libcublas", "libcudnn", "libnccl"))]
nvidia = sorted(d.metadata["Name"] for d in metadata.distributions()
                if (d.metadata["Name"] or "").lower().startswith("nvidia-"))
print(json.dumps({"torch": found, "cuda_files": cuda[:20], "nvidia_packages": nvidia}))
"""

#: Run in the step image: import every step module, then list any torch module that came with them.
_IMPORTS = """
import importlib, sys
for module in {modules}:
    importlib.import_module(module)
print(sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "transformers", "peft")))
"""


def check_train(tag: str, work: Path, checks: Checks) -> None:
    from labelmatch.core.artifacts import verify_artifact
    from labelmatch.sample_data import sample_path

    env = image_env(tag)
    with rootfs(tag) as root:
        out = writable_dir(work / "out")
        started = time.perf_counter()
        sft = in_pod(
            root,
            env,
            [
                "labelmatch",
                "train",
                "--data",
                "/data/tax",
                "--out",
                "/out/model",
                "--epochs",
                "1",
                "--max-length",
                "32",
                "--batch-size",
                "16",
            ],
            {"/data": (sample_path("tax").parent, False), "/out": (out, True)},
        )
        try:
            verify_artifact(out / "model", "Model")
            ok = sft.returncode == 0
        except Exception as exc:
            ok, sft.stdout = False, f"{sft.stdout}\n{exc}"
        checks.add(
            "train",
            "short SFT on the sample data writes a verified Model",
            ok,
            f"{time.perf_counter() - started:.0f} s; {sft.stdout[-1500:]}",
        )


def check_base(tag: str, checks: Checks) -> None:
    env = image_env(tag)
    with rootfs(tag) as root:
        out = in_pod(root, env, ["labelmatch", "--help"])
        checks.add(
            "base",
            "CLI starts as 10001 on a read-only root",
            out.returncode == 0 and "pipeline" in out.stdout,
            out.stdout,
        )


def machine() -> dict[str, str]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in run(["lscpu"], capture_output=True).stdout.splitlines()
            if line.startswith("Model name")
        ),
        "",
    )
    return {
        "cpu": model,
        "kernel": platform.release(),
        "buildah": run(["buildah", "--version"], capture_output=True).stdout.strip(),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Container images, built and run here",
        "",
        f"Built with {report['machine']['buildah']} from `{report['python_image']}` on "
        f"{report['machine']['cpu']}; whole check {report['wall_seconds']:.0f} s "
        f"({'all checks passed' if report['passed'] else 'FAILED'}).",
        "",
        *(
            [
                f"Reused from storage (the build time is the earlier run's; size and digest are read from "
                f"storage now; every check ran again): {', '.join(report['reused'])}"
                + (f"; built again since the earlier run: "
                   f"{', '.join(k for k, v in report['images'].items() if v.get('rebuilt_since'))}"
                   if any(v.get("rebuilt_since") for v in report["images"].values()) else "")
                + ".",
                "",
            ]
            if report.get("reused")
            else []
        ),
        "| image | size | build time | digest |",
        "|---|---|---|---|",
    ]
    for image in report["images"].values():
        lines.append(
            f"| `{image['tag']}` | {image['size_bytes'] / 2**20:.0f} MiB | {image['build_seconds']} s | "
            f"`{image['digest'][:19]}` |"
        )
    lines += ["", "| image | check | result |", "|---|---|---|"]
    lines += [
        f"| {c['image']} | {c['check']} | {'pass' if c['passed'] else 'FAIL'} |" for c in report["checks"]
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--python-image",
        default=os.environ.get("PYTHON_IMAGE", ""),
        help=f"Base image (default: {LOCAL_BASE}, made with images/base-image.sh).",
    )
    parser.add_argument("--model", type=Path, help="OnnxModel to serve (default: the newest demo export).")
    parser.add_argument("--images", default="base,train,serve,step")
    parser.add_argument("--reuse", action="store_true",
                        help="Check the images an earlier run built (its images.json) instead of building.")
    parser.add_argument("--rebuild", default="",
                        help="With --reuse: build these images (comma-separated) again, reuse the others.")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("images-check needs root (buildah vfs storage, mount namespaces)", file=sys.stderr)
        return 2
    for tool in ("buildah", "podman", "unshare", "chroot"):
        if not shutil.which(tool):
            print(f"images-check needs {tool} (apt-get install buildah podman debootstrap)", file=sys.stderr)
            return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    names = args.images.split(",")
    if args.reuse:
        earlier = json.loads((args.out / "images.json").read_text())
        rebuild = [name for name in args.rebuild.split(",") if name]
        python_image = earlier["python_image"]
        built = build(rebuild, python_image) if rebuild else {}
        images = {**reused_images(earlier["images"], [k for k in names if k not in built]), **built}
        images = {k: images[k] for k in names}
        reused = [k for k in names if k not in built]
    else:
        python_image = base_image(args)
        images = build(names, python_image)
        reused = []
    checks = Checks()
    with tempfile.TemporaryDirectory(prefix="images-check-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        if "serve" in images or "step" in images:
            # A copy readable by the server's user, as KServe's storage initializer leaves it.
            model = work / "served-model"
            shutil.copytree(the_model(args, work), model)
            for path in [model, *model.rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)
        if "serve" in images:
            check_serve(images["serve"]["tag"], model, checks)
        if "step" in images:
            check_step(images["step"]["tag"], model, work, checks)
        if "train" in images:
            check_train(images["train"]["tag"], work, checks)
        if "base" in images:
            check_base(images["base"]["tag"], checks)
    report = {
        "version": VERSION,
        "python_image": python_image,
        "machine": machine(),
        "images": images,
        "reused": reused,
        "checks": checks.results,
        "passed": checks.ok,
        "wall_seconds": round(time.perf_counter() - started),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "images.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "images.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if checks.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
