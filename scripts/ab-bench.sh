#!/bin/bash
# A/B of two capnet builds, alternating, one bench round each run:
#   scripts/ab-bench.sh OLD_CAPNET NEW_CAPNET [RUNS] [ONLY] [ON]
# e.g. (the start of an issue built in a worktree):
#   git worktree add /tmp/base 9d2aab6
#   (cd /tmp/base && CARGO_TARGET_DIR=/tmp/base/target cargo build --release -p capnet-cli)
#   cargo build --release -p capnet-cli
#   scripts/ab-bench.sh /tmp/base/target/release/capnet target/release/capnet
# Prints each run's table rows of ONLY, old and new in turn.
set -euo pipefail
old=$1 new=$2 runs=${3:-3} only=${4:-1 stream} on=${5:-mono,two-group,factored}
for i in $(seq 1 "$runs"); do
  for who in old new; do
    bin=$old; [ "$who" = new ] && bin=$new
    echo "== run $i, $who ($bin)"
    "$bin" bench --rounds 1 --only "$only" --on "$on" 2>/dev/null | tr '\r' '\n' | grep -F "| TCP bulk" || true
  done
done
