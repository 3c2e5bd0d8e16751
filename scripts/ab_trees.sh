#!/usr/bin/env bash
# Old tree vs this tree on one device machine, alternating rounds of bench_layer (summary rows);
# use an even ROUNDS so each tree goes first equally often.
# Host speed of the lent machines varies ~3x, so before/after figures only compare within a call.
#   git archive <old-commit> adaptmoe native planner scripts tests setup.py | tar -x -C old_tree
#   ROUNDS=2 BENCH_ARGS="--configs fine64,readme_bf16 --paths layer" bash scripts/ab_trees.sh old_tree
set -uo pipefail
OLD=${1:?usage: ab_trees.sh OLD_TREE_DIR}
ROUNDS=${ROUNDS:-2}
BENCH_ARGS=${BENCH_ARGS:---configs fine64,readme_bf16 --paths layer}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
NEW=$(cd "$(dirname "$0")/.." && pwd)
OLD=$(cd "$OLD" && pwd)

bench() {   # tree, extensions dir
  (cd "$1" && TORCH_EXTENSIONS_DIR=$2 PYTHONPATH=. python3 -m adaptmoe.examples.bench_layer $BENCH_ARGS \
      --routing balanced --iters 50 2>&1 | sed -n '/=== summary ===/,$p' | grep -v "=== summary\|^config")
}

echo "# old: $OLD  new: $NEW  bench_layer $BENCH_ARGS --routing balanced --iters 50"
for tree in "$OLD:/tmp/ext_old" "$NEW:/tmp/ext_new"; do   # build both first (not timed)
  (cd "${tree%%:*}" && TORCH_EXTENSIONS_DIR=${tree##*:} PYTHONPATH=. python3 -c \
      "import adaptmoe.ops as o, sys; sys.exit(0 if o.native_available() else 1)") || { echo "build failed: $tree"; exit 1; }
done
# Rounds alternate which tree goes first (old-new, new-old, ...): with the same tree on both sides
# (2026-11-23, h100_ab_trees_null_session13.log) the second of each pair read fine-grained's cf=1
# forward 41 us faster on average over three rounds, a position bias as large as the changes
# measured then.
for round in $(seq 1 "$ROUNDS"); do
  if (( round % 2 )); then
    echo "== old round $round"; bench "$OLD" /tmp/ext_old
    echo "== new round $round"; bench "$NEW" /tmp/ext_new
  else
    echo "== new round $round"; bench "$NEW" /tmp/ext_new
    echo "== old round $round"; bench "$OLD" /tmp/ext_old
  fi
done
