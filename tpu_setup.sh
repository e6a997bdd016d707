#!/usr/bin/env bash
# Set up a Cloud TPU VM for w2s_jax: system packages, a virtual environment,
# `pip install -e .[tpu]`, and a device check with `w2s devices`.
#
# Single host (run on the VM, inside a clone of this repository):
#   bash tpu_setup.sh
#
# Multi-host pod slice (run from your workstation; the same set-up on every worker):
#   bash tpu_setup.sh --multi-host TPU_NAME ZONE [PROJECT]
# This copies the repository to every worker with `gcloud compute tpus tpu-vm scp`
# and runs this script there with `--worker=all`. Afterwards every training or
# sampling command must also be launched on all workers at once, e.g.
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=all \
#     --command 'cd w2s_jax && .venv/bin/w2s sample ...'
# On a pod slice JAX finds its peers by itself: w2s commands call
# jax.distributed.initialize() with no arguments when more than one TPU host is
# present, and each process then sees every chip through jax.devices().
set -euo pipefail

VENV_DIR="${VENV_DIR:-.venv}"
PYTHON="${PYTHON:-python3}"

setup_here() {
  if command -v apt-get >/dev/null 2>&1; then
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -y
    $sudo apt-get install -y python3-venv python3-dev git
  fi
  if [ ! -x "${VENV_DIR}/bin/python" ]; then
    "${PYTHON}" -m venv "${VENV_DIR}"
  fi
  "${VENV_DIR}/bin/python" -m pip install --upgrade pip
  "${VENV_DIR}/bin/python" -m pip install -e '.[tpu]'
  "${VENV_DIR}/bin/w2s" devices
}

setup_all_workers() {
  local name="$1" zone="$2" project="${3:-}"
  local project_flag=()
  if [ -n "${project}" ]; then project_flag=(--project "${project}"); fi
  local here
  here="$(basename "$(pwd)")"
  gcloud compute tpus tpu-vm scp --recurse "$(pwd)" "${name}:~/" \
    --zone "${zone}" --worker=all "${project_flag[@]}"
  gcloud compute tpus tpu-vm ssh "${name}" --zone "${zone}" --worker=all \
    "${project_flag[@]}" --command "cd ~/${here} && bash tpu_setup.sh"
}

cd "$(dirname "$0")"
if [ "${1:-}" = "--multi-host" ]; then
  if [ $# -lt 3 ]; then
    echo "usage: bash tpu_setup.sh --multi-host TPU_NAME ZONE [PROJECT]" >&2
    exit 2
  fi
  shift
  setup_all_workers "$@"
else
  setup_here
fi
