#!/usr/bin/env bash
# Build the labelmatch images, tagged with the package version from pyproject.toml.
#
# Usage: images/build.sh [IMAGE...]        IMAGE in: base train serve step (default: all four)
# Environment:
#   ENGINE          docker | buildah (default: docker when its daemon answers, else buildah)
#   REGISTRY        image name prefix: REGISTRY/labelmatch-IMAGE:VERSION (default: LABELMATCH_IMAGE_REGISTRY,
#                   the one setting labelmatch.platform.images, the compiled IR and deploy read; else
#                   ghcr.io/labelmatch)
#   PYTHON_IMAGE    base image of every stage; point it at a local image when nothing can be pulled
#   TORCH_VERSION   torch pin of the train image (default 2.13.0)
#   TORCH_INDEX_URL index the train image's torch comes from (default PyPI: CUDA build)
#   TORCH_WHEEL     a torch wheel file to install instead (e.g. a CPU build on disk)
#   CA_BUNDLE       CA certificates for a TLS-intercepting proxy, passed as a build secret (never
#                   stored in a layer); default: none
# buildah runs with --storage-driver vfs --isolation chroot, which works as root without a daemon.
# Prints "IMAGE DIGEST SECONDS" per image on stdout (progress on stderr).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REGISTRY="${REGISTRY:-${LABELMATCH_IMAGE_REGISTRY:-ghcr.io/labelmatch}}"
REGISTRY="${REGISTRY%/}"
PYTHON_IMAGE="${PYTHON_IMAGE:-python:3.11-slim-bookworm}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://pypi.org/simple}"
IMAGES=("$@")
[[ ${#IMAGES[@]} -gt 0 ]] || IMAGES=(base train serve step)

VERSION="$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "${ROOT}/pyproject.toml")"
if [[ -z "${ENGINE:-}" ]]; then
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then ENGINE=docker
    elif command -v buildah >/dev/null 2>&1; then ENGINE=buildah
    else echo "error: no container engine: start a docker daemon or install buildah" >&2; exit 2
    fi
fi

# A minimal build context: the repository holds a multi-GB .venv that must not be sent.
CONTEXT="$(mktemp -d "${TMPDIR:-/tmp}/labelmatch-context.XXXXXX")"
trap 'rm -rf "${CONTEXT}"' EXIT
tar -C "${ROOT}" --exclude='__pycache__' --exclude='*.egg-info' -cf - pyproject.toml README.md src \
    | tar -C "${CONTEXT}" -xf -
mkdir -p "${CONTEXT}/wheels"
if [[ -n "${TORCH_WHEEL:-}" ]]; then
    [[ -f "${TORCH_WHEEL}" ]] || { echo "error: TORCH_WHEEL ${TORCH_WHEEL} not found" >&2; exit 2; }
    cp "${TORCH_WHEEL}" "${CONTEXT}/wheels/"
fi
secret=()
if [[ -n "${CA_BUNDLE:-}" ]]; then
    [[ -f "${CA_BUNDLE}" ]] || { echo "error: CA_BUNDLE ${CA_BUNDLE} not found" >&2; exit 2; }
    secret=(--secret "id=ca_bundle,src=${CA_BUNDLE}")
fi

for image in "${IMAGES[@]}"; do
    dockerfile="${ROOT}/images/${image}/Dockerfile"
    [[ -f "${dockerfile}" ]] || { echo "error: unknown image '${image}' (no ${dockerfile})" >&2; exit 2; }
    tag="${REGISTRY}/labelmatch-${image}:${VERSION}"
    args=(--file "${dockerfile}" --tag "${tag}"
          --build-arg "PYTHON_IMAGE=${PYTHON_IMAGE}" --build-arg "LABELMATCH_VERSION=${VERSION}"
          --build-arg "TORCH_VERSION=${TORCH_VERSION}" --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL}")
    echo "building ${tag} with ${ENGINE}" >&2
    started=$(date +%s)
    case "${ENGINE}" in
        docker) DOCKER_BUILDKIT=1 docker build "${secret[@]}" "${args[@]}" "${CONTEXT}" >&2
                digest="$(docker image inspect --format '{{.Id}}' "${tag}")" ;;
        buildah) buildah --storage-driver vfs bud --isolation chroot --layers=false "${secret[@]}" "${args[@]}" \
                     "${CONTEXT}" >&2
                 digest="$(buildah --storage-driver vfs inspect --type image --format '{{.FromImageDigest}}' "${tag}")" ;;
        *) echo "error: ENGINE must be docker or buildah, not '${ENGINE}'" >&2; exit 2 ;;
    esac
    echo "${tag} ${digest} $(( $(date +%s) - started ))"
done
