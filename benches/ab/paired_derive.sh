#!/usr/bin/env bash
# One pending derive timed with two builds, each run on a fresh copy of the same lake, the
# order alternating (BENCHMARKS, session 30).
#
#   benches/ab/paired_derive.sh LAKE_DIR WEIR_A WEIR_B [PAIRS=8]
#
# LAKE_DIR is a local lake whose bronze tables hold synced changes not yet derived (e.g. one
# of paired_days.sh's lakes after a `weir sync`); it is only copied, never written. Prints each
# run and the median wall and CPU time of each build.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 LAKE_DIR WEIR_A WEIR_B [PAIRS]" >&2; exit 2; }
LAKE=$(realpath "$1"); A=$(realpath "$2"); B=$(realpath "$3"); PAIRS=${4:-8}
WORK=$(mktemp -d "$(dirname "$LAKE")/paired.XXXXXX"); trap 'rm -rf "$WORK"' EXIT
for _ in $(seq 1 "$PAIRS"); do
  for v in A B; do
    bin=$A; [ "$v" = B ] && bin=$B
    rm -rf "$WORK/run"; cp -a "$LAKE" "$WORK/run"; sync; sleep 2
    /usr/bin/time -f "$v %e s %U u %S s" "$bin" derive --lake "$WORK/run" 2>&1 >/dev/null | tail -1
  done
done | tee "$WORK/runs.log"
for v in A B; do
  awk -v v="$v" '$1 == v { print $2, $4 + $6 }' "$WORK/runs.log" | sort -n | awk -v v="$v" '
    { wall[NR] = $1; cpu[NR] = $2 }
    END { m = int((NR + 1) / 2); printf "%s: median wall %.2f s (cpu of that run %.2f s) over %d runs\n", v, wall[m], cpu[m], NR }'
done
