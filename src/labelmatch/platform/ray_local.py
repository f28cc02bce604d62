"""A Ray session for one process: the Ray already running, a cluster by address, or a local Ray
whose every server listens on 127.0.0.1 only.

Torch-free on purpose: the batch step (:mod:`labelmatch.batch`) runs in the step image, which
has Ray Data and ONNX Runtime but no torch, so it cannot reach these through
``labelmatch.tuning.pbt`` (which imports the training config, hence torch); tuning imports
them from here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def init_local_ray(
    num_cpus: int | None = None,
    dashboard: bool = False,
    temp_dir: str | None = None,
    dashboard_port: int | None = None,
    num_gpus: int | None = None,
) -> None:
    """Start a single-node Ray whose every server listens on 127.0.0.1 only.

    ``_node_ip_address="127.0.0.1"`` alone is not enough: Ray replaces a loopback node address by
    the machine's routable one unless cluster mode is off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
    the switch Ray uses on laptops). Ray reads it at import, so the constant is set too when Ray
    was imported before this call.

    Args:
        num_cpus: CPUs Ray may schedule (``None``: the machine's).
        dashboard: Start Ray's dashboard (on 127.0.0.1).
        temp_dir: Ray's session directory (``None``: Ray's default).
        dashboard_port: The dashboard's port (``None``: Ray's default).
        num_gpus: GPUs declared to Ray (``None``: the ones Ray detects).
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        _node_ip_address="127.0.0.1",
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        _temp_dir=temp_dir,
        configure_logging=False,
    )


@contextlib.contextmanager
def ray_session(
    address: str | None, num_cpus: int | None = None, dashboard: bool = False, temp_dir: str | None = None
) -> Iterator[None]:
    """Use the Ray already initialised, connect to ``address``, or start a local Ray on 127.0.0.1.

    A Ray started or connected here is shut down on exit.

    Args:
        address: A Ray cluster (``ray://head:10001``, ``auto``); ``None``: a local Ray.
        num_cpus: CPUs of a local Ray.
        dashboard: Start the dashboard of a local Ray.
        temp_dir: Session directory of a local Ray.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address)
    else:
        init_local_ray(num_cpus, dashboard, temp_dir)
    try:
        yield
    finally:
        ray.shutdown()
