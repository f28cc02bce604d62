"""The one place that names the container image of every labelmatch component.

Like ``_image.py`` in google-cloud-pipeline-components, the tag is pinned to the package
version, so a compiled pipeline (``pipelines/compiled/<name>-<version>.yaml``) always runs the
library code of the same release it was compiled from. Change the registry with the
``LABELMATCH_IMAGE_REGISTRY`` variable at compile time (e.g. a private mirror); never the tag.

The image must contain ``labelmatch`` with the ``train,tune,export,batch,monitor,pipelines`` extras:
components are compiled with ``install_kfp_package=False`` and ``packages_to_install=[]``, so nothing is
pip-installed when a step starts (no network needed, nothing unpinned sneaks in).
"""

from __future__ import annotations

import os

from labelmatch import __version__

#: Registry and repository of the component image (overridable for mirrors, see above).
REGISTRY = os.environ.get("LABELMATCH_IMAGE_REGISTRY", "ghcr.io/labelmatch")
#: The component image, tagged with the package version.
IMAGE = f"{REGISTRY}/labelmatch-train:{__version__}"
