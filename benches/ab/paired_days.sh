#!/usr/bin/env bash
# Two builds (or two settings) on two lakes fed by one source, day by day, the order
# alternating: what `weir-bench cdc` cannot resolve on a noisy machine (BENCHMARKS, session 30).
#
#   benches/ab/paired_days.sh WEIR_A WEIR_B [DAYS=12] [SCALE=10] [VAR=VALUE ...]
#
# WEIR_A and WEIR_B are `weir` binaries (the same one to compare settings); VAR=VALUE pairs
# are set for lake B's commands only (e.g. WEIR_SMALL_FILE_ROWS=0). It starts `weir services`
# in a scratch folder, generates SF SCALE, backfills lakes A and B, derives both, then applies
# DAYS generated days, each through `weir sync` + `weir derive` on both lakes. Prints one line
# per command and the sums over the days from 5 on (the layouts settled).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 WEIR_A WEIR_B [DAYS] [SCALE] [VAR=VALUE ...]" >&2; exit 2; }
A=$(realpath "$1"); B=$(realpath "$2"); DAYS=${3:-12}; SCALE=${4:-10}
shift $(( $# < 4 ? $# : 4 ))
ENV_B=("$@")
WORK=$(mktemp -d); chmod 755 "$WORK"   # the PostgreSQL cluster runs as an unprivileged user
trap 'kill $SVC 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$A" services --dir "$WORK/svc" --s3-addr "127.0.0.1:$PORT" > "$WORK/svc.log" 2>&1 &
SVC=$!
for _ in $(seq 1 120); do grep -q "postgres://" "$WORK/svc.log" && break; sleep 0.5; done
PG=$(grep -o "postgres://[^ ]*" "$WORK/svc.log") || { cat "$WORK/svc.log" >&2; exit 1; }
run() { # run LAKE WHAT ARGS...: one timed command on lake A or B
  local v=$1 what=$2; shift 2
  local bin=$A; local envs=(X_WEIR_AB=A)
  if [ "$v" = B ]; then bin=$B; envs=("${ENV_B[@]}" X_WEIR_AB=B); fi
  env "${envs[@]}" /usr/bin/time -f "$v $what %e s %U u %S s" "$bin" "$@" 2>&1 >/dev/null | tail -1
}
"$A" generate --pg "$PG" --scale "$SCALE" > /dev/null
for v in A B; do
  run $v backfill backfill --pg "$PG" --lake "$WORK/lake$v"
  run $v derive derive --lake "$WORK/lake$v"
done
for d in $(seq 1 "$DAYS"); do
  date=$(date -u -d "2026-07-01 + $((d - 1)) days" +%F)
  "$A" generate day --pg "$PG" --date "$date" --seed $((800 + d)) --taxonomy-rate 0 > /dev/null
  if [ $((d % 2)) = 1 ]; then order="A B"; else order="B A"; fi
  for v in $order; do
    sync
    run $v sync sync --pg "$PG" --lake "$WORK/lake$v" | sed "s/^/day $d /"
    run $v derive derive --lake "$WORK/lake$v" | sed "s/^/day $d /"
  done
done | tee "$WORK/days.log"
awk '$1 == "day" && $2 >= 5 { wall[$3 " " $4] += $5; cpu[$3 " " $4] += $7 + $9 }
     END { for (k in wall) printf "days 5+: %s wall %.2f s, cpu %.2f s\n", k, wall[k], cpu[k] }' "$WORK/days.log" | sort
