#!/usr/bin/env bash
# Installs torch into a venv, the CPU build where PyTorch's CPU index is reachable: on Linux, PyPI's torch is the
# CUDA build (a 500 MB wheel and several GB of CUDA libraries). Where that index cannot be reached (offline, a
# mirror only), pip's default index is used instead. Either way it ends saying which build was installed.
# usage: install_torch.sh PYTHON REQUIREMENT [INDEX]   (no INDEX: pip's default index alone)
set -euo pipefail
py=$1 requirement=$2 index=${3:-}

# --index-url, not --extra-index-url: with both indexes pip would fall back to PyPI's CUDA build silently.
# A short timeout, no retries: an unreachable index costs seconds (pip's default would retry for minutes).
if [ -z "$index" ]; then
    "$py" -m pip install -q "$requirement"
elif ! "$py" -m pip install -q --index-url "$index" --timeout 10 --retries 0 "$requirement" >/dev/null 2>&1; then
    echo "torch: $requirement could not be installed from $index (unreachable, or no wheel for this platform);" \
         "installing it from pip's default index instead"
    "$py" -m pip install -q "$requirement"
fi
"$py" -W ignore -c 'import torch; cuda = torch.version.cuda
print(f"torch {torch.__version__}: the " + (f"CUDA {cuda} build" if cuda else "CPU build"))'
