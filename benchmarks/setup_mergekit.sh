#!/usr/bin/env bash
# Build benchmarks/.venv-mergekit: mergekit 0.1.5 on the CPU build of torch 2.13.0,
# in its own venv so splice's .venv never sees mergekit.
#
#   bash benchmarks/setup_mergekit.sh            # idempotent; re-run to repair
#   REUSE_VENV=.venv bash benchmarks/setup_mergekit.sh
#
# REUSE_VENV (what `make test` passes): the side venv reads that venv's packages
# through a .pth file and installs only mergekit and what it needs beyond them.
# torch, transformers and safetensors are then the very same builds as splice's
# (the parity tests compare like with like) and the set-up skips a second torch
# install (~40 s of CI). The side venv's own packages come first on sys.path.
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
if [ -n "${REUSE_VENV:-}" ]; then
    reuse_site="$("$REUSE_VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
    venv_site="$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
    echo "$reuse_site" >"$venv_site/zz-splice-reuse.pth"
fi
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
