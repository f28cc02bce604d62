#!/usr/bin/env bash
# Smoke-test the built serve image the way the Helm chart runs it: read-only root filesystem, a
# writable /tmp, UID 10001, all capabilities dropped, the model mounted read-only at /mnt/models.
# Checks: torch is absent, the server becomes ready, and /v2/models/NAME/ready answers.
#
# Usage: images/smoke-serve.sh MODEL_DIR     (an OnnxModel artifact, e.g. from `labelmatch export`)
# Environment: ENGINE docker | podman (default docker), REGISTRY as in build.sh, PORT (default 18080).
set -euo pipefail

MODEL_DIR="$(cd "${1:?usage: images/smoke-serve.sh MODEL_DIR}" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENGINE="${ENGINE:-docker}"
REGISTRY="${REGISTRY:-${LABELMATCH_IMAGE_REGISTRY:-ghcr.io/labelmatch}}"
PORT="${PORT:-18080}"
NAME="smoke"
VERSION="$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "${ROOT}/pyproject.toml")"
IMAGE="${REGISTRY}/labelmatch-serve:${VERSION}"
SECURE=(--read-only --tmpfs /tmp:rw,size=256m --user 10001:10001 --cap-drop ALL --security-opt no-new-privileges)

if "${ENGINE}" run --rm "${SECURE[@]}" --entrypoint python3 "${IMAGE}" -c "import torch" 2>/dev/null; then
    echo "FAIL: torch is importable in ${IMAGE}" >&2
    exit 1
fi

container="$("${ENGINE}" run -d "${SECURE[@]}" -v "${MODEL_DIR}:/mnt/models:ro" \
    -p "127.0.0.1:${PORT}:8080" "${IMAGE}" \
    serve --model /mnt/models --model-name "${NAME}" --host 0.0.0.0 --port 8080)"
trap '"${ENGINE}" logs "${container}" | tail -n 20; "${ENGINE}" rm -f "${container}" > /dev/null' EXIT

for path in /v2/health/ready "/v2/models/${NAME}/ready"; do
    for _ in $(seq 60); do
        curl -fsS "http://127.0.0.1:${PORT}${path}" > /dev/null 2>&1 && break
        sleep 2
    done
    curl -fsS "http://127.0.0.1:${PORT}${path}" > /dev/null || { echo "FAIL: ${path} not ready" >&2; exit 1; }
    echo "ok ${path}"
done
curl -fsS "http://127.0.0.1:${PORT}/v2/models/${NAME}/infer" -H 'Content-Type: application/json' \
    -d '{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["VAT refund for Q3"]}]}'
echo
echo "PASS: ${IMAGE}"
