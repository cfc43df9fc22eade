#!/usr/bin/env bash
# The vLLM source for tests/unit/test_vllm_signature.py, which checks the backend's calls against
# vLLM's own signatures by reading its source (vLLM cannot be imported without a GPU stack).
# Downloads the wheel the `gpu` extra asks for (no dependencies) and extracts its Python files to
# DIR (default .ci/vllm-src); prints DIR. Use: export BON_VLLM_SOURCE=$(bash .ci/vllm-source.sh)
# Kept out of .venv on purpose: a vllm package that cannot import would fool the config check.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.ci/vllm-src}"
spec=$(.venv/bin/python - <<'PY'
import tomllib
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu"]
print(next(d for d in extras if d.replace(" ", "").lower().startswith("vllm")))
PY
)
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
.venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" "$spec" >&2
rm -rf "$dest" && mkdir -p "$dest"
.venv/bin/python - "$wheels" "$dest" <<'PY'
import sys, zipfile, pathlib
wheel = next(pathlib.Path(sys.argv[1]).glob("vllm-*.whl"))
with zipfile.ZipFile(wheel) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("vllm/") and n.endswith(".py")])
print(wheel.name, file=sys.stderr)
PY
echo "$(cd "$dest" && pwd)"
