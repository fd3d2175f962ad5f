#!/usr/bin/env bash
# Every figure in benchmarks/README.md, in one go (about 25 minutes on 2 cores, most of it mergekit).
#
#   bash benchmarks/run_all.sh            # results/*.json and results/*.md
#
# Needs ~40 GB of free disk under benchmarks/.work and, for mergekit, benchmarks/.venv-mergekit
# (bash benchmarks/setup_mergekit.sh). Each run waits (up to 30 s) for the machine to be
# otherwise idle, runs in its own session at nice -15 (as root), and records how much CPU other processes used meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
# measure splice as committed (not a half-edited working tree), the same commit for every run
rev="$(git rev-parse "${SPLICE_REV:-HEAD}")"
echo "splice at $rev" >&2
out=benchmarks/results
mkdir -p "$out"
for size in 100M 500M 1B; do
    $py benchmarks/make_checkpoints.py --params "$size"
done
run() { # name, run.py arguments...
    local name="$1"; shift
    echo "== $name: python benchmarks/run.py $*" >&2
    $py benchmarks/run.py --splice-rev "$rev" --quiet-wait 30 --json "$out/$name.json" "$@" | tee "$out/$name.md"
}
# 1. the headline: TIES of 3 fine-tunes + base, 500M, bf16 recipe; floor, splice (3 settings), mergekit
run 500M-ties-bf16 --params 500M --method ties --tools floor,splice,mergekit \
    --splice "" --splice "--workers 1 --threads 2" --splice "--workers 2 --threads 1" --splice "--workers 4 --threads 1"
# 2. strict parity: compute in float32 (out_dtype bf16), where mergekit's arithmetic matches splice's
run 500M-ties-fp32 --params 500M --method ties --dtype float32 --tools splice,mergekit
# 3. time and memory as the model grows: the same at 100M and 1B
run 100M-ties-bf16 --params 100M --method ties --tools floor,splice,mergekit
run 1B-ties-bf16 --params 1B --method ties --tools floor,splice,mergekit
