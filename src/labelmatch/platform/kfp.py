"""Versioned labelmatch pipelines on a Kubeflow Pipelines server (v2beta1 REST API, ``kfp.Client``).

One version number flows from the package to the cluster: the compiled IR
``pipelines/compiled/<pipeline>-<version>.yaml`` is uploaded as the KFP *pipeline version* named
``<version>`` of the KFP *pipeline* named after the IR's ``pipelineInfo.name``.

The first upload needs care: ``POST /apis/v2beta1/pipelines/upload`` creates the pipeline *and*
a first version whose name is the pipeline's name, and takes no version name. So a first upload
is three calls: upload the pipeline, upload the same IR again as the version named ``<version>``
(``upload_version``), then delete the auto-named version. Afterwards every version of a labelmatch
pipeline is named by a package version, so ``--version 0.1.0`` always means the same IR. A later
upload is one ``upload_version`` call; uploading a version name that exists is a no-op.

Run parameters given as ``key=value`` strings are converted to the types the version's pipeline
spec declares (``root.inputDefinitions.parameters``), so a run is refused here, with the name of
the parameter, rather than failing in the cluster.

**Single-user and multi-user KFP** (as the KFP 2.17 backend reads requests:
``backend/src/apiserver/resource/resource_manager.go`` ``ReplaceNamespace``, ``server/run_server.go``,
``server/experiment_server.go``, ``server/pipeline_server.go``, ``auth/authenticator_token_review.go``).
A single-user server ignores every namespace: its runs execute in the namespace KFP is installed in.
A multi-user server files experiments, and the runs in them, in a *profile namespace*, where the
runs' pods start, so the Secret, ConfigMap and ServiceAccount the steps use must live there; it
identifies the caller by ``Authorization: Bearer <token>`` (a Kubernetes service-account token
with audience ``pipelines.kubeflow.org``, checked by a TokenReview) and authorises per namespace.
With a ``namespace``, :class:`PipelineRegistry` creates experiments in it, uploads *namespaced*
pipelines into it (``shared_pipelines=True``: shared ones, readable by every profile), and finds a
pipeline by name in the namespace first, then among the shared ones. The token is either given
(``token``) or read by the KFP SDK's own ``ServiceAccountTokenVolumeCredentials`` from a file
before every request (``token_file``; a projected token rotates).

**The default version.** KFP v2beta1 has no default version of a pipeline: a run that references
a pipeline without a version id runs its *latest* version (``resource/resource_manager.go``
``fetchPipelineVersionFromPipelineSpec`` -> ``storage/pipeline_store.go``
``GetLatestPipelineVersion``: the newest ``CreatedAtInSec`` that is ready). The v1beta1 endpoint
``POST /apis/v1beta1/pipelines/{pipeline_id}/default_version/{version_id}`` still exists in 2.17.0
(``server/pipeline_server.go`` ``UpdatePipelineDefaultVersionV1``) but only writes the deprecated
column ``DefaultVersionId``, which nothing reads (even v1's ``GetPipeline`` reports the latest
version as ``default_version``), and with the Kubernetes pipeline store it answers 400
(``storage/pipeline_store_kubernetes.go``). So labelmatch pins the default **on the pipeline
itself**, as the tag :data:`DEFAULT_VERSION_TAG` set through ``PATCH /apis/v2beta1/pipelines/
{pipeline_id}`` (``UpdatePipeline``, KFP >= 2.17.0; ``backend/api/v2beta1/pipeline.proto``),
where every API client reads it, and :meth:`PipelineRegistry.resolve_version` runs that
version when none is given; KFP itself does not read the tag. ``UpdatePipeline`` replaces the
whole tag set (``storage/pipeline_store.go`` ``updateEntityFields``), so the pin is merged into
the pipeline's other tags. Runs with a cache policy other than the compiled one:
:mod:`labelmatch.platform.kfp_cache`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from labelmatch.core.errors import ConfigError, LabelmatchError
from labelmatch.platform.kfp_cache import CachePolicy, apply_cache_policy

log = logging.getLogger(__name__)

#: KFP pipeline names (= ``pipelineInfo.name`` of the compiled IR).
TRAINING_PIPELINE = "labelmatch-training"
DEPLOY_PIPELINE = "labelmatch-deploy"
DEFAULT_EXPERIMENT = "labelmatch"
#: Where ``make compile`` writes the IR.
COMPILED_DIR = Path("pipelines/compiled")
#: The tag of a KFP pipeline that names its pinned default version (KFP keeps tags from 2.17.0).
DEFAULT_VERSION_TAG = "labelmatch-default-version"
#: The longest tag value KFP accepts (``model/pipeline_tags.go`` ``MaxTagValueLength``).
MAX_TAG_VALUE = 63
#: How :meth:`PipelineRegistry.resolve_version` chose a version.
GIVEN, PINNED, LATEST = "given", "pinned default", "latest: no default pinned"
#: The description of a run created with its version's spec inline (a cache policy other than the
#: compiled one): KFP keeps no version reference for such a run, so it names the version here.
_INLINE_RUN = re.compile(r"^labelmatch: (?P<pipeline>\S+) (?P<version>\S+) \(version id (?P<id>[^)]*)\)")


@dataclass(frozen=True)
class PipelineVersion:
    """A version of a pipeline on the server.

    Args:
        pipeline: Pipeline name.
        pipeline_id: Server id of the pipeline.
        version: Version name (= the labelmatch package version).
        version_id: Server id of the version.
        created_at: Creation time as the server reports it.
        parameters: The pipeline's input parameters: ``{name: parameterType}``.
        required: The parameters without a default (a run must give them).
    """

    pipeline: str
    pipeline_id: str
    version: str
    version_id: str
    created_at: str
    parameters: dict[str, str]
    required: tuple[str, ...] = ()

    def typed_parameters(self, params: dict[str, str] | None) -> dict[str, Any]:
        """Command-line ``params`` converted to this version's declared types.

        Raises:
            ConfigError: A name that is not an input of this version (the inputs are listed),
                or a value that does not convert.
        """
        typed = {}
        for key, value in (params or {}).items():
            if key not in self.parameters:
                known = ", ".join(sorted(self.parameters)) or "none"
                raise ConfigError(f"parameter '{key}': not an input of {self.pipeline} {self.version} "
                                  f"(inputs: {known})")
            typed[key] = convert_parameter(key, value, self.parameters[key])
        return typed


@dataclass(frozen=True)
class RunInfo:
    """A run on the server (or run locally).

    Attributes:
        run_id: The server's run id.
        name: Display name.
        pipeline: Name of the pipeline it ran ("" when the server no longer has it).
        version: Name of the pipeline version it ran ("" when unknown).
        parameters: The run's parameters, typed as the server stores them.
        service_account: Service account of its pods ("" : the server's default).
    """

    run_id: str
    name: str
    pipeline: str
    version: str
    parameters: dict[str, Any]
    service_account: str = ""


def pick_version(versions: list[PipelineVersion], name: str, version: str, where: str) -> PipelineVersion:
    """The entry of ``versions`` named ``version``; :class:`ConfigError` lists the known ones.

    Args:
        versions: The versions of pipeline ``name`` a registry holds.
        name: The pipeline.
        version: The version wanted.
        where: Where the registry keeps them, for the message (``"on the server"``).
    """
    for item in versions:
        if item.version == version:
            return item
    known = ", ".join(item.version for item in versions) or "none"
    raise ConfigError(f"pipeline {name!r} has no version {version!r} {where} (versions: {known})")


def read_package(path: str | Path) -> tuple[str, str]:
    """The pipeline name and description of a compiled IR YAML file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            spec = next(yaml.safe_load_all(handle), None)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read pipeline package: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    info = spec.get("pipelineInfo") if isinstance(spec, dict) else None
    if not isinstance(info, dict) or not info.get("name"):
        raise ConfigError(f"{path}: field 'pipelineInfo.name' missing: not a compiled KFP pipeline")
    return info["name"], info.get("description", "")


def compiled_packages(directory: str | Path, version: str) -> list[Path]:
    """The compiled IR files of ``version`` in ``directory`` (``<name>-<version>.yaml``)."""
    packages = sorted(Path(directory).glob(f"*-{version}.yaml"))
    if not packages:
        raise ConfigError(f"{directory}: no compiled pipelines '*-{version}.yaml' (run `make compile`)")
    return packages


def _pipeline_part(pipeline_spec: dict[str, Any] | None) -> dict[str, Any]:
    """The pipeline spec itself: the server wraps an IR that has a Kubernetes platform document as
    ``{"pipeline_spec": ..., "platform_spec": ...}`` (every labelmatch IR has one)."""
    spec = pipeline_spec or {}
    return spec.get("pipeline_spec", spec) if "root" not in spec else spec


def _parameter_types(pipeline_spec: dict[str, Any] | None) -> dict[str, str]:
    root = _pipeline_part(pipeline_spec).get("root", {})
    parameters = root.get("inputDefinitions", {}).get("parameters", {})
    return {name: spec.get("parameterType", "STRING") for name, spec in parameters.items()}


def _required_parameters(pipeline_spec: dict[str, Any] | None) -> tuple[str, ...]:
    root = _pipeline_part(pipeline_spec).get("root", {})
    parameters = root.get("inputDefinitions", {}).get("parameters", {})
    return tuple(
        sorted(name for name, spec in parameters.items()
               if not spec.get("isOptional") and "defaultValue" not in spec)
    )


def pipeline_inputs(path: str | Path) -> tuple[dict[str, str], tuple[str, ...]]:
    """``({name: parameterType}, required names)`` of a compiled IR file's pipeline parameters."""
    read_package(path)
    with open(path, encoding="utf-8") as handle:
        spec = next(yaml.safe_load_all(handle))
    return _parameter_types(spec), _required_parameters(spec)


def parameter_string(value: Any) -> str:
    """A typed run parameter as the ``key=value`` string :func:`convert_parameter` reads back.

    Booleans are ``true``/``false``, lists and dicts JSON, and a whole float (the server's JSON
    numbers) an integer, so that ``2.0`` converts back to ``NUMBER_INTEGER`` 2.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def convert_parameter(name: str, value: str, parameter_type: str) -> Any:
    """Convert a command-line value to the KFP parameter type; :class:`ConfigError` names ``name``."""
    try:
        if parameter_type == "NUMBER_INTEGER":
            return int(value)
        if parameter_type == "NUMBER_DOUBLE":
            return float(value)
        if parameter_type == "BOOLEAN":
            lowered = value.lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return lowered in ("true", "1")
        if parameter_type in ("LIST", "STRUCT"):
            parsed = json.loads(value)
            if not isinstance(parsed, list if parameter_type == "LIST" else dict):
                raise ValueError(value)
            return parsed
    except (ValueError, json.JSONDecodeError):
        raise ConfigError(f"parameter '{name}': {value!r} is not a valid {parameter_type}") from None
    return value


class PipelineRegistry:
    """Upload, list and run labelmatch pipeline versions on one KFP server.

    Args:
        host: KFP API endpoint, e.g. ``http://ml-pipeline.kubeflow:8888`` or a port-forward.
        token: Bearer token for a multi-user KFP (e.g. ``kubectl create token … --audience
            pipelines.kubeflow.org``); never logged. Wins over ``token_file``, as in the KFP SDK.
        namespace: Profile namespace of a multi-user KFP (experiments, runs and uploaded
            pipelines go there); None: the KFP SDK's own choice (its context file, or in a pod of a
            multi-user KFP the pod's namespace), else none (single-user).
        token_file: File holding the bearer token, read before every request through the SDK's
            ``ServiceAccountTokenVolumeCredentials`` (a projected service-account token).
        shared_pipelines: Upload shared pipelines (no namespace: every profile can run them; the
            first upload's clean-up needs the right to delete shared pipeline versions) instead of
            pipelines in ``namespace``.

    Raises:
        ConfigError: ``token_file`` cannot be read.
    """

    def __init__(self, host: str, token: str | None = None, namespace: str | None = None,
                 token_file: str | Path | None = None, shared_pipelines: bool = False):
        # Not ``kfp.Client``: inside a pipeline step (_KFP_RUNTIME=true) ``import kfp`` leaves the
        # client out, and the monitor step creates retraining runs from there.
        from kfp.client import Client

        credentials = None
        if token_file is not None and not token:
            from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

            try:
                Path(token_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"{token_file}: cannot read the KFP token: {exc.strerror}") from None
            credentials = ServiceAccountTokenVolumeCredentials(str(token_file))
        # The SDK's namespace argument defaults to "kubeflow", its marker for "none given".
        self.client = Client(host=host, existing_token=token or None, namespace=namespace or "kubeflow",
                             credentials=credentials)
        self.host = host
        self.namespace = namespace or self.client.get_user_namespace() or None
        self.shared_pipelines = shared_pipelines
        self._multi_user: bool | None = None

    @property
    def multi_user(self) -> bool:
        """Whether the server runs in multi-user mode (its healthz answer, asked once)."""
        if self._multi_user is None:
            self._multi_user = bool(self.client.get_kfp_healthz().multi_user)
        return self._multi_user

    def _find_pipeline_object(self, name: str, namespace: str | None) -> Any:
        """The pipeline named ``name`` in ``namespace`` (None: the shared ones) as the server lists
        it (``V2beta1Pipeline``: id, tags, ...), or None."""
        predicate = {"operation": "EQUALS", "key": "display_name", "stringValue": name}
        query = json.dumps({"predicates": [predicate]})
        found = self.client.list_pipelines(filter=query, namespace=namespace).pipelines or []
        if len(found) > 1:
            raise ConfigError(f"{len(found)} pipelines are named {name!r} on the server; "
                              "names must be unique")
        return found[0] if found else None

    def _find_pipeline(self, name: str, namespace: str | None) -> str | None:
        """The id of the pipeline named ``name`` in ``namespace`` (None: the shared ones)."""
        found = self._find_pipeline_object(name, namespace)
        return found.pipeline_id if found else None

    def _upload_namespace(self) -> str | None:
        return None if self.shared_pipelines else self.namespace

    def _pipeline_object(self, name: str) -> Any:
        """The pipeline named ``name``: in the namespace, else a shared one; or None."""
        places = [self.namespace, None] if self.namespace else [None]
        for namespace in places:
            found = self._find_pipeline_object(name, namespace)
            if found is not None:
                return found
        return None

    def pipeline_id(self, name: str) -> str | None:
        """The server id of the pipeline named ``name``: in the namespace, else a shared one; or None."""
        found = self._pipeline_object(name)
        return found.pipeline_id if found is not None else None

    def _require_pipeline(self, name: str) -> Any:
        found = self._pipeline_object(name)
        if found is None:
            where = f"in namespace {self.namespace!r} or shared" if self.namespace else "shared"
            raise ConfigError(f"pipeline {name!r} is not on the KFP server at {self.host} ({where}); "
                              "upload it first (labelmatch pipeline upload)")
        return found

    def default_version(self, name: str) -> str | None:
        """The version of pipeline ``name`` pinned as its default (the tag :data:`DEFAULT_VERSION_TAG`),
        or None (none pinned, or no such pipeline)."""
        found = self._pipeline_object(name)
        return ((found.tags or {}).get(DEFAULT_VERSION_TAG) or None) if found is not None else None

    def pin_default_version(self, name: str, version: str | None) -> PipelineVersion | None:
        """Pin ``version`` as the default of pipeline ``name``, or unpin (``version`` None).

        Sends ``PATCH /apis/v2beta1/pipelines/{pipeline_id}`` (KFP 2.17.0 ``UpdatePipeline``,
        ``backend/src/apiserver/server/pipeline_server.go``) with the pipeline's tags, the pin
        among them (see the module docstring: KFP v2beta1 has no default version of its own). On a
        multi-user KFP it needs ``update`` on pipelines in the pipeline's namespace (a shared
        pipeline: KFP's own namespace).

        Returns:
            The pinned version (None after unpinning).

        Raises:
            ConfigError: No such pipeline, or no such version of it (the versions are listed).
            LabelmatchError: The server has no ``UpdatePipeline`` (KFP before 2.17.0) or did not
                keep the tag.
        """
        from kfp_server_api.exceptions import ApiException
        from kfp_server_api.models import InlineObject

        pipeline = self._require_pipeline(name)
        tags = dict(pipeline.tags or {})
        target = None
        if version is None:
            if DEFAULT_VERSION_TAG not in tags:
                return None
            del tags[DEFAULT_VERSION_TAG]
        else:
            target = pick_version(self._versions(pipeline.pipeline_id, name), name, version, "on the server")
            if len(version) > MAX_TAG_VALUE:
                raise ConfigError(f"version {version!r}: longer than the {MAX_TAG_VALUE} characters a KFP "
                                  "tag value may have")
            tags[DEFAULT_VERSION_TAG] = version
        try:
            updated = self.client.pipelines.pipeline_service_update_pipeline(
                pipeline.pipeline_id, InlineObject(tags=tags))
        except ApiException as exc:
            if exc.status in (405, 501):
                raise LabelmatchError(
                    f"KFP at {self.host} answered {exc.status} to PATCH /apis/v2beta1/pipelines/"
                    f"{pipeline.pipeline_id}: pinning a default version needs KFP 2.17.0 or later "
                    "(UpdatePipeline with tags)") from None
            raise
        kept = (updated.tags or {}).get(DEFAULT_VERSION_TAG)
        if kept != version:
            raise LabelmatchError(f"KFP at {self.host} did not keep the tag {DEFAULT_VERSION_TAG}={version} "
                                  f"on pipeline {name!r} (it holds {kept!r}): tags need KFP 2.17.0 or later")
        return target

    def resolve_version(self, name: str, version: str | None = None) -> tuple[PipelineVersion, str]:
        """The version of pipeline ``name`` a run takes, and how it was chosen.

        ``version`` when given (:data:`GIVEN`); else the pinned default (:data:`PINNED`); else the
        newest version, which is what KFP runs for a reference without a version id
        (:data:`LATEST`; ``GetLatestPipelineVersion``: newest creation time).

        Raises:
            ConfigError: No such pipeline or version, or the pinned version is no longer on the server.
        """
        pipeline = self._require_pipeline(name)
        versions = self._versions(pipeline.pipeline_id, name)
        if version:
            return pick_version(versions, name, version, "on the server"), GIVEN
        pinned = (pipeline.tags or {}).get(DEFAULT_VERSION_TAG)
        if pinned:
            try:
                return pick_version(versions, name, pinned, "on the server"), PINNED
            except ConfigError as exc:
                raise ConfigError(f"{exc}; it is the pinned default: pin another (labelmatch pipeline "
                                  "default --version V) or pass --version") from None
        if not versions:
            raise ConfigError(f"pipeline {name!r} has no version on the server")
        # Stable on equal times (KFP keeps seconds): the later one listed wins.
        latest = max(enumerate(versions), key=lambda item: (item[1].created_at, item[0]))[1]
        return latest, LATEST

    def _versions(self, pipeline_id: str, name: str) -> list[PipelineVersion]:
        found, token = [], ""
        while True:
            page = self.client.list_pipeline_versions(pipeline_id, page_token=token, page_size=100)
            for item in page.pipeline_versions or []:
                found.append(
                    PipelineVersion(
                        pipeline=name,
                        pipeline_id=pipeline_id,
                        version=item.display_name,
                        version_id=item.pipeline_version_id,
                        created_at=str(item.created_at or ""),
                        parameters=_parameter_types(item.pipeline_spec),
                        required=_required_parameters(item.pipeline_spec),
                    )
                )
            token = page.next_page_token
            if not token:
                return found

    def versions(self, name: str) -> list[PipelineVersion]:
        """Every version of pipeline ``name`` (empty when the pipeline does not exist)."""
        pipeline_id = self.pipeline_id(name)
        return self._versions(pipeline_id, name) if pipeline_id else []

    def find_version(self, name: str, version: str) -> PipelineVersion:
        """The version named ``version`` of pipeline ``name``; :class:`ConfigError` lists the known ones."""
        return pick_version(self.versions(name), name, version, "on the server")

    def upload(self, package: str | Path, version: str) -> PipelineVersion:
        """Upload a compiled pipeline as the version named ``version`` (see the module docstring).

        Returns:
            The version, new or already on the server.
        """
        name, description = read_package(package)
        # Only where this upload puts pipelines: a shared pipeline of the same name is left alone.
        pipeline_id = self._find_pipeline(name, self._upload_namespace())
        auto_named: list[PipelineVersion] = []
        if pipeline_id is None:
            pipeline = self.client.upload_pipeline(
                str(package), pipeline_name=name, description=description or None,
                namespace=self._upload_namespace(),
            )
            pipeline_id = pipeline.pipeline_id
            # The server named the version it created after the pipeline: replaced below.
            auto_named = self._versions(pipeline_id, name)
        else:
            for item in self._versions(pipeline_id, name):
                if item.version == version:
                    log.info("pipeline %s version %s is on the server already", name, version)
                    return item
        self.client.upload_pipeline_version(
            str(package),
            pipeline_version_name=version,
            pipeline_id=pipeline_id,
            description=description or None,
        )
        for item in auto_named:
            if item.version != version:
                self.client.delete_pipeline_version(pipeline_id, item.version_id)
        return pick_version(self._versions(pipeline_id, name), name, version, "on the server")

    def check_run_namespace(self) -> None:
        """:class:`ConfigError` when the server is multi-user and no namespace is set: a run could
        not be filed anywhere (the server would answer 400)."""
        if self.namespace is None and self.multi_user:
            raise ConfigError(f"KFP at {self.host} is multi-user: a run needs the profile namespace to "
                              "run in (--namespace or LABELMATCH_KFP_NAMESPACE)")

    def create_run(
        self,
        name: str,
        version: str | None,
        params: dict[str, str] | None = None,
        run_name: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        service_account: str | None = None,
        cache: CachePolicy | None = None,
    ) -> RunInfo:
        """Create a run of version ``version`` of pipeline ``name``.

        A run with the compiled caching references the version (``pipeline_version_reference``);
        a run with another :class:`~labelmatch.platform.kfp_cache.CachePolicy` carries the
        version's stored spec inline, its tasks' ``cachingOptions`` rewritten, because KFP runs a
        referenced version's spec unchanged and its Run has no caching field of its own
        (:mod:`labelmatch.platform.kfp_cache`). KFP then links the run to no version; its
        description names the version, and :meth:`find_run` reads it back.

        Args:
            name: Pipeline name.
            version: Version name; None: :meth:`resolve_version` (the pinned default, else the latest).
            params: Parameters as strings, converted to the declared types; unknown names are refused.
            run_name: Display name of the run (default ``<name> <version>``).
            experiment: Experiment to file the run under (created when missing).
            service_account: Kubernetes service account of the run's pods.
            cache: Which steps may reuse KFP's cached results; None: as compiled.

        Raises:
            ConfigError: No such version, a parameter it does not take, a step the policy names
                that the pipeline lacks, or a multi-user server and no namespace.
        """
        self.check_run_namespace()
        target = self.find_version(name, version) if version else self.resolve_version(name)[0]
        version = target.version
        typed = target.typed_parameters(params)
        policy = cache or CachePolicy()
        spec = None
        if not policy.as_compiled:
            stored = self.client.get_pipeline_version(target.pipeline_id, target.version_id).pipeline_spec
            spec = apply_cache_policy(stored or {}, policy)
        experiment_id = self.client.create_experiment(experiment, namespace=self.namespace).experiment_id
        run_name = run_name or f"{name} {version}"
        if spec is None:
            run = self.client.run_pipeline(
                experiment_id=experiment_id,
                job_name=run_name,
                params=typed,
                pipeline_id=target.pipeline_id,
                version_id=target.version_id,
                service_account=service_account,
            )
        else:
            from kfp_server_api.models import V2beta1Run, V2beta1RuntimeConfig

            run = self.client.runs.run_service_create_run(run=V2beta1Run(
                experiment_id=experiment_id,
                display_name=run_name,
                description=f"labelmatch: {name} {version} (version id {target.version_id}); "
                            f"cache {policy.describe()}",
                pipeline_spec=spec,
                runtime_config=V2beta1RuntimeConfig(parameters=typed),
                service_account=service_account,
            ))
        if not run.run_id:
            raise LabelmatchError(f"KFP accepted run {run_name!r} but returned no run id")
        return RunInfo(run_id=run.run_id, name=run_name, pipeline=name, version=version, parameters=typed,
                       service_account=service_account or "")

    def find_run(self, run_id: str) -> RunInfo:
        """The run ``run_id`` as the server keeps it: its parameters (``runtime_config``), the
        pipeline and version it ran (names; "" when they were deleted since) and its service account.

        Raises:
            ConfigError: No such run on the server.
            kfp_server_api.ApiException: No access to it, or another refusal.
        """
        from kfp_server_api.exceptions import ApiException

        try:
            run = self.client.get_run(run_id)
        except ApiException as exc:
            if exc.status == 404:
                raise ConfigError(f"run {run_id!r} is not on the KFP server at {self.host}") from None
            raise
        parameters = dict((run.runtime_config.parameters if run.runtime_config else None) or {})
        reference = run.pipeline_version_reference
        pipeline = version = ""
        inline = _INLINE_RUN.match(run.description or "")
        if (reference is None or not reference.pipeline_id) and inline:
            pipeline, version = inline["pipeline"], inline["version"]  # its spec inline: create_run
        try:
            if reference is not None and reference.pipeline_id:
                pipeline = self.client.get_pipeline(reference.pipeline_id).display_name or ""
                if reference.pipeline_version_id:
                    version = self.client.get_pipeline_version(
                        reference.pipeline_id, reference.pipeline_version_id).display_name or ""
        except ApiException as exc:
            if exc.status != 404:
                raise
        return RunInfo(run_id=run.run_id or run_id, name=run.display_name or "", pipeline=pipeline,
                       version=version, parameters=parameters, service_account=run.service_account or "")

    def run_parameters(self, run_id: str) -> dict[str, Any]:
        """The parameters run ``run_id`` ran with (:meth:`find_run`)."""
        return self.find_run(run_id).parameters
