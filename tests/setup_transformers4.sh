#!/usr/bin/env bash
# Build a side venv whose transformers is 4.x, for the tests that load splice's outputs
# under transformers 4 and compare logits with 5.x (SPLICE_TF4_PYTHON).
#
#   bash tests/setup_transformers4.sh VENV MAIN_PYTHON      # idempotent
#
# The side venv sees the main venv's packages through a .pth file (torch, numpy,
# safetensors are not installed twice, and no CUDA torch can be pulled); only
# transformers 4.x and the tokenizers / huggingface_hub versions it needs are
# installed into it, and they come first on its sys.path.
set -euo pipefail
venv="$1"
main_python="$2"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
main_site="$("$main_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
side_site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$main_site" >"$side_site/zz_splice_main.pth"
"$venv/bin/python" -m pip install -q "transformers>=4.57,<5" 2>&1 | grep -v -e '^WARNING: Location' -e 'outside environment' || true
"$venv/bin/python" - <<'PY'
import torch, transformers
assert transformers.__version__.startswith("4."), transformers.__version__
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("transformers", transformers.__version__, "| torch", torch.__version__)
PY
