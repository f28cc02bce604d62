#!/usr/bin/env bash
# Make a local Python base image from Debian packages alone, for machines that cannot pull
# python:3.11-slim-bookworm from a registry: debootstrap a minimal bookworm root file system with
# Debian's python3 (3.11), venv, ca-certificates and passwd, and import it as an image.
#
# Usage: images/base-image.sh [TAG]      (default localhost/labelmatch-python:3.11-bookworm)
# Environment:
#   ENGINE          podman | docker (default: podman when installed, else docker)
#   DEBIAN_MIRROR   (default http://deb.debian.org/debian)
#   WORK            where the root file system is built (default /var/tmp/labelmatch-base)
# Then: make images PYTHON_IMAGE=<TAG>. Needs root (debootstrap, and podman's vfs storage).
set -euo pipefail

TAG="${1:-localhost/labelmatch-python:3.11-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
WORK="${WORK:-/var/tmp/labelmatch-base}"
if [[ -z "${ENGINE:-}" ]]; then
    if command -v podman >/dev/null 2>&1; then ENGINE=podman; else ENGINE=docker; fi
fi
command -v debootstrap >/dev/null 2>&1 || { echo "error: debootstrap not found (apt-get install debootstrap)" >&2; exit 2; }

rm -rf "${WORK}"
mkdir -p "${WORK}"
started=$(date +%s)
# python-is-python3: the Dockerfiles call `python`, as in the python:3.11 images.
debootstrap --variant=minbase \
    --include=python3,python3-venv,python-is-python3,ca-certificates,passwd \
    bookworm "${WORK}/rootfs" "${MIRROR}" >&2
rm -rf "${WORK}/rootfs/var/cache/apt/archives/"*.deb "${WORK}/rootfs/var/lib/apt/lists/"*
storage=()
[[ "${ENGINE}" == podman ]] && storage=(--storage-driver vfs)
tar -C "${WORK}/rootfs" -c . | "${ENGINE}" "${storage[@]}" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' - "${TAG}" >&2
rm -rf "${WORK}"
echo "built ${TAG} from Debian bookworm in $(( $(date +%s) - started )) s" >&2
echo "${TAG}"
