#!/usr/bin/env bash
# Every merge method against mergekit 0.1.5 and the floor at one size (issue 11's per-method table).
#
#   bash benchmarks/run_methods.sh              # 150M: results/150M-<method>-bf16.json and .md
#   bash benchmarks/run_methods.sh 500M ties della slerp
#
# Same measuring as run_all.sh (splice as committed, each run waits for a quiet machine, nice -15
# as root); pcb has no mergekit counterpart (splice and floor only). Recipes: run.py's RECIPES.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
size="${1:-150M}"
shift || true
methods=("$@")
if [ ${#methods[@]} -eq 0 ]; then
    methods=($($py -c 'import sys; sys.path.insert(0, "benchmarks"); from run import RECIPES; print(" ".join(RECIPES))'))
fi
rev="$(git rev-parse "${SPLICE_REV:-HEAD}")"
echo "splice at $rev" >&2
out=benchmarks/results
mkdir -p "$out"
$py benchmarks/make_checkpoints.py --params "$size"
for m in "${methods[@]}"; do
    echo "== $m: python benchmarks/run.py --params $size --method $m --tools floor,splice,mergekit" >&2
    $py benchmarks/run.py --splice-rev "$rev" --quiet-wait 30 --params "$size" --method "$m" --tools floor,splice,mergekit \
        --json "$out/$size-$m-bf16.json" | tee "$out/$size-$m-bf16.md"
done
