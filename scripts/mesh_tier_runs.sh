#!/bin/sh
# The mesh tier (every mesh-equivalence case) N times in a row on a clean clone of HEAD, each
# under the suite's per-test time limit (a hang fails its test with every thread's stack), to
# show the suite does not hang: prints each run's outcome and time, and how many ran clean.
#   sh scripts/mesh_tier_runs.sh [N]          # default 10; run from an activated environment
set -e
N=${1:-10}
DIR=$(mktemp -d /tmp/moejax_mesh_runs.XXXXXX)
git clone -q "$(git rev-parse --show-toplevel)" "$DIR/clone"
cd "$DIR/clone"
echo "commit $(git rev-parse --short HEAD), $N runs of: python -m pytest -q -n 2 --dist loadgroup -m mesh tests"
clean=0
for i in $(seq 1 "$N"); do
  start=$(date +%s)
  if python -m pytest -q -n 2 --dist loadgroup -m mesh -p no:cacheprovider tests > "$DIR/run_$i.log" 2>&1; then
    clean=$((clean + 1)); outcome=passed
  else
    outcome="FAILED (log: $DIR/run_$i.log)"
  fi
  echo "run $i: $outcome in $(( $(date +%s) - start )) s: $(tail -1 "$DIR/run_$i.log")"
done
echo "$clean of $N runs clean"
