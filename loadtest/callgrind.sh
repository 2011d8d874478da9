#!/usr/bin/env bash
# Instructions per request of the sidecar, counted by callgrind: the README's "instructions
# per request" figure. One worker, a cheap upstream (nginx answering a fixed JSON body, or
# the built-in simulated upstream with --upstream mock), a rate and burst that never bind;
# 2,000 requests to warm up (connections, pools, caches, lazy statics), then the counters
# are zeroed, `oha -c 8 -n 20000` runs, and the counters are dumped: total Ir of every
# thread of the sidecar over the measured run, divided by the requests answered 200.
# Any other status, or a request on the wrong route, fails the run.
#
# Why instructions: on a shared 2-core VM wall time and CPU time per request move by 10%
# or more from run to run with the other tenants' load; the instruction count of the same
# binary on the same traffic hardly moves (5 runs at 3f10296, nginx upstream: 44,849 to
# 44,916 on the limited route, 42,408 to 42,491 on passthrough), so two builds can be
# compared (--bin). What moves it is work done per second rather than per request (the
# snapshot publisher, the latency windows, timers), which a run of 11 to 16 s under
# callgrind spreads over its requests: take differences under about 0.3% as noise, run
# each build more than once (the seconds of each run are printed), and diff the
# <route>.top.txt files to see where a difference lies.
#
# Both routes are measured by default: limited (the token bucket admits every request) and
# passthrough (queue 0, fallback on, 1 RPM: every request past the first token goes the
# unmetered route), each in a fresh sidecar under valgrind.
#
# Counting: the sidecar runs under callgrind from the start (instrumented, so the call
# graph and inclusive costs are right); `callgrind_control --zero` before the measured run
# and `--dump` after it bracket what is counted. (--collect-atstart=no with
# `callgrind_control -i on` counts nothing: -i switches instrumentation, not collection,
# and callgrind_control has no switch for collection; --instr-atstart=no with -i on/off
# counts the same total but loses the call stack above the switch.) Scrapes of /metrics,
# the warm-up and the shutdown fall outside the dump.
#
# Allocations: the same dump gives the heap allocations per request: the calls into
# mimalloc's allocation entry points (mi_malloc_aligned, mi_realloc_aligned, ... whatever
# the binary calls) from functions that are not mimalloc's own, divided by the requests
# (<route>.top.txt lists the callers). Frees are counted alongside: in a steady state the
# two match.
#
# Baseline (CI): with --baseline FILE (loadtest/callgrind-baseline.txt: key=value lines named
# as in the last line below, # comments), every figure of FILE that was measured is
# compared with it, and the run fails when one is more than --tolerance percent (15) above
# its baseline. Being below never fails: update the file when a change lowers the figure.
#
# Usage: loadtest/callgrind.sh [--bin PATH] [--upstream nginx|mock] [-n REQUESTS]
#          [--warmup N] [-c CONNECTIONS] [--routes limited,passthrough] [--top N] [--out DIR]
#          [--baseline FILE] [--tolerance PCT]
#   --bin PATH       measure this binary (e.g. one built from another commit) instead of
#                    building the release binary of this tree
#   --upstream       nginx (default; fixed body, same for every build) or mock (the
#                    binary's own `mock-upstream`, as loadtest/run.sh uses)
#   -n               measured requests (20000); --warmup: requests before (2000)
#   -c               oha connections (8)
#   --routes         comma-separated, among limited and passthrough (both)
#   --top            functions listed by self and by inclusive cost (15)
#   --out            where the callgrind files, annotations and oha JSON go
#                    (default $CARGO_TARGET_DIR or target, then /callgrind/<time>-<upstream>)
#   --baseline FILE  compare with the key=value figures of FILE (see above)
#   --tolerance PCT  how far above its baseline a figure may be (15)
# Compare two builds: loadtest/callgrind.sh --bin A; loadtest/callgrind.sh --bin B; then
# diff the <route>.top.txt files (costs there are instructions per request).
# Last line of output, machine-readable, e.g.:
#   instructions_per_request=38512 allocations_per_request=21.00 passthrough_instructions_per_request=37012 passthrough_allocations_per_request=20.00 requests=20000 upstream=nginx bin=/path
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$HOME/.cargo/bin:$PATH"
PROG=callgrind.sh
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh

BIN=""
UPSTREAM=nginx
REQUESTS=20000
WARMUP=2000
CONNECTIONS=8
ROUTES=limited,passthrough
TOP=15
OUT=""
BASELINE=""
TOLERANCE=15

while [ $# -gt 0 ]; do
  case $1 in
    --bin) BIN=${2:?--bin needs a path}; shift 2 ;;
    --upstream) UPSTREAM=${2:?--upstream needs nginx or mock}; shift 2 ;;
    -n|--requests) REQUESTS=${2:?}; shift 2 ;;
    --warmup) WARMUP=${2:?}; shift 2 ;;
    -c|--connections) CONNECTIONS=${2:?}; shift 2 ;;
    --routes) ROUTES=${2:?}; shift 2 ;;
    --top) TOP=${2:?}; shift 2 ;;
    --out) OUT=${2:?}; shift 2 ;;
    --baseline) BASELINE=${2:?--baseline needs a file}; shift 2 ;;
    --tolerance) TOLERANCE=${2:?}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
case $UPSTREAM in nginx|mock) ;; *) die "--upstream is nginx or mock, not $UPSTREAM" ;; esac
for n in "$REQUESTS" "$WARMUP" "$CONNECTIONS" "$TOP"; do
  [[ $n =~ ^[0-9]+$ ]] || die "not a count: $n"
done
[ "$REQUESTS" -gt 0 ] || die "-n must be above 0"
[[ $TOLERANCE =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "not a percentage: $TOLERANCE"
[ -z "$BASELINE" ] || [ -r "$BASELINE" ] || die "cannot read the baseline $BASELINE"
IFS=, read -r -a ROUTE_LIST <<<"$ROUTES"
for r in "${ROUTE_LIST[@]}"; do
  case $r in limited|passthrough) ;; *) die "unknown route $r (limited, passthrough)" ;; esac
done

TOOLS=(valgrind callgrind_control callgrind_annotate oha python3 curl)
[ "$UPSTREAM" = nginx ] && TOOLS+=(nginx)
need_tools "${TOOLS[@]}"

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$(release_binary "$BIN")
[ -n "$OUT" ] || OUT=$TARGET/callgrind/$(date +%Y%m%d-%H%M%S)-$UPSTREAM
mkdir -p "$OUT"
OUT=$(realpath "$OUT")

lib_traps

# oha_run N URL JSON: N requests; fails unless every one was answered 200.
oha_run() {
  oha_json "$3" -n "$1" -c "$CONNECTIONS" "$2"
  oha_check "$3" "$1" >/dev/null
}

# routes PORT: requests counted so far per route, "limited=N passthrough=M".
routes() {
  curl -sf "http://127.0.0.1:$1/metrics" | python3 -c '
import re, sys
per = {}
for line in sys.stdin:
    m = re.match(r"sidecar_requests_total\{([^}]*)\} (\S+)", line)
    if m:
        lab = dict(re.findall(r"(\w+)=\"([^\"]*)\"", m.group(1)))
        per[lab.get("route", "")] = per.get(lab.get("route", ""), 0) + float(m.group(2))
print(" ".join(f"{k}={int(v)}" for k, v in sorted(per.items())))'
}

# top FILE REQUESTS INCLUSIVE(yes|no): the TOP costliest functions, instructions per request.
top() {
  callgrind_annotate --auto=no --threshold=100 --inclusive="$3" "$1" | python3 -c '
import re, sys
root, requests, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
total, rows, listing = None, [], False
for line in sys.stdin:
    m = re.match(r"\s*([\d,]+) \(\s*([\d.]+)%\)\s+(.*)", line)
    if not m:
        listing = listing or line.startswith("Ir ") and "file:function" in line
        continue
    count, what = int(m.group(1).replace(",", "")), m.group(3)
    if what == "PROGRAM TOTALS":
        total = count
        continue
    if not listing:
        continue
    # The thread entry frames (clone, start_thread, the runtime loop) hold the whole total,
    # and callgrind_annotate lists them so even without --inclusive: left out.
    if total and count >= 0.99 * total:
        continue
    what = re.sub(r" \[[^]]*\]$", "", what)
    what = re.sub(r"/[^ :]*/\.cargo/registry/src/[^/]*/", "", what)
    what = re.sub(r"/rustc/[0-9a-f]+/", "rustc/", what)
    what = what.replace(root + "/", "")
    file, _, func = what.partition(":")
    if len(rows) < n:  # read on to the end: callgrind_annotate must not see a closed pipe
        rows.append((count, func or what, file if func else ""))
for count, func, file in rows:
    print(f"{count / requests:10.1f} {100 * count / total:6.2f}%  {func}  ({file})")
' "$ROOT" "$2" "$TOP"
}

# The upstream.
UP_PORT=$(free_port)
if [ "$UPSTREAM" = nginx ]; then
  nginx_conf "$TMP/nginx" 1 on "$(upstream_blocks "$UP_PORT")"
  start_nginx "$TMP/nginx"
  UP_PID=$NGINX_PID
else
  "$BIN" mock-upstream --listen "127.0.0.1:$UP_PORT" --rpm 0 --workers 1 --token-delay-ms 0 \
    >"$OUT/mock-upstream.log" 2>&1 &
  UP_PID=$!
  PIDS+=("$UP_PID")
fi
wait_port "$UP_PORT" "$UP_PID" 20 || die "the $UPSTREAM upstream did not start: $(cat "$TMP"/nginx/error.log "$OUT/mock-upstream.log" 2>/dev/null)"

echo "bin: $BIN" >&2
echo "upstream: $UPSTREAM on 127.0.0.1:$UP_PORT; $WARMUP requests to warm up, $REQUESTS measured, oha -c $CONNECTIONS; files in $OUT" >&2

FINAL=()
for route in "${ROUTE_LIST[@]}"; do
  port=$(free_port)
  mport=$(free_port)
  env_route=()
  if [ "$route" = passthrough ]; then
    # As loadtest/run.py's sidecar-passthrough: no queue, fallback on, one token a minute.
    env_route=(SIDECAR_QUEUE_MAX_SIZE=0 SIDECAR_FALLBACK_ENABLED_PASSTHROUGH=true
      SIDECAR_RATE_RPM=1 SIDECAR_BUCKET_CAPACITY=1)
  fi
  env SIDECAR_UPSTREAM_URL="http://127.0.0.1:$UP_PORT/v1" \
    SIDECAR_UPSTREAM_API_KEY=nvapi-loadtest-key \
    SIDECAR_LISTEN_PORT="$port" SIDECAR_METRICS_PORT="$mport" SIDECAR_WORKERS=1 \
    SIDECAR_RATE_RPM=6000000 SIDECAR_BUCKET_CAPACITY=100000 SIDECAR_LOG_LEVEL=warn \
    "${env_route[@]}" \
    valgrind --tool=callgrind --callgrind-out-file="$TMP/$route.cg.%p" "$BIN" \
    >"$OUT/$route.sidecar.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  if ! wait_port "$mport" "$pid" 300 || ! wait_port "$port" "$pid" 60; then
    die "the sidecar ($route) did not start; log: $OUT/$route.sidecar.log"
  fi
  url="http://127.0.0.1:$port/v1/chat/completions"
  if [ "$WARMUP" -gt 0 ]; then
    oha_run "$WARMUP" "$url" "$OUT/$route.warmup.oha.json"
  fi
  before=$(routes "$mport")
  control "$pid" --zero
  oha_run "$REQUESTS" "$url" "$OUT/$route.oha.json"
  control "$pid" --dump="measured $route"
  after=$(routes "$mport")
  rc=0
  stop "$pid" || rc=$?
  [ "$rc" = 0 ] || die "the sidecar ($route) exited with $rc after SIGTERM; log: $OUT/$route.sidecar.log"
  dump="$TMP/$route.cg.$pid.1"
  [ -s "$dump" ] || die "no callgrind dump $dump"
  cp "$dump" "$OUT/$route.callgrind.out"

  # Every measured request on the route under test (passthrough: at most 2 on the limited
  # route, a token refilled at 1 RPM).
  python3 - "$route" "$REQUESTS" "$before" "$after" <<'PY'
import sys
route, n = sys.argv[1], int(sys.argv[2])
parse = lambda s: {k: int(v) for k, v in (kv.split("=") for kv in s.split())}
b, a = parse(sys.argv[3]), parse(sys.argv[4])
d = {k: a[k] - b.get(k, 0) for k in a if a[k] - b.get(k, 0)}
others = sum(v for k, v in d.items() if k != route)
if d.get(route, 0) + others != n or others > (0 if route == "limited" else 2):
    sys.exit(f"callgrind.sh: {n} requests sent on the {route} route, the sidecar counted {d}")
PY

  total=$(grep -m1 '^totals:' "$OUT/$route.callgrind.out" | awk '{print $2}')
  [ -n "$total" ] || total=$(grep -m1 '^summary:' "$OUT/$route.callgrind.out" | awk '{print $2}')
  [[ $total =~ ^[0-9]+$ ]] || die "no totals: line in $OUT/$route.callgrind.out"
  ipr=$(python3 -c "print(round($total / $REQUESTS))")
  secs=$(python3 -c 'import json, sys; print("%.1f" % json.load(open(sys.argv[1]))["summary"]["total"])' "$OUT/$route.oha.json")
  read -r apr fpr < <(callgrind_allocs "$OUT/$route.callgrind.out" "$REQUESTS")
  {
    echo "# $route route: $ipr instructions per request ($total Ir / $REQUESTS requests answered 200, in $secs s), $apr allocations per request ($fpr frees)"
    echo "# bin $BIN, upstream $UPSTREAM, oha -c $CONNECTIONS -n $REQUESTS after $WARMUP"
    echo "# columns: Ir per request, share of the total, function (file)"
    echo "## self cost"
    top "$OUT/$route.callgrind.out" "$REQUESTS" no
    echo "## inclusive cost"
    top "$OUT/$route.callgrind.out" "$REQUESTS" yes
    echo "## allocations per request by caller"
    callgrind_allocs "$OUT/$route.callgrind.out" "$REQUESTS" "$TOP" | sed 1d
  } >"$OUT/$route.top.txt"
  echo >&2
  sed -n '1p; /^## self/,/^## inclusive/p' "$OUT/$route.top.txt" | sed '$d' >&2
  echo "route=$route instructions_per_request=$ipr allocations_per_request=$apr total_ir=$total requests=$REQUESTS seconds=$secs"
  if [ "$route" = limited ]; then
    FINAL=("instructions_per_request=$ipr" "allocations_per_request=$apr" "${FINAL[@]}")
  else
    FINAL+=("${route}_instructions_per_request=$ipr" "${route}_allocations_per_request=$apr")
  fi
done

stop "$UP_PID" || true
over=0
if [ -n "$BASELINE" ]; then
  # Each key=value of the baseline against the same key measured: fails (after the last
  # line) when one is more than TOLERANCE percent above.
  python3 - "$BASELINE" "$TOLERANCE" "${FINAL[@]}" <<'PY' || over=1
import re, sys
path, tolerance = sys.argv[1], float(sys.argv[2])
measured = dict(kv.split("=", 1) for kv in sys.argv[3:])
base = {}
for line in open(path):
    line = line.split("#", 1)[0].strip()
    if line:
        k, _, v = line.partition("=")
        base[k.strip()] = float(v)
if not base:
    sys.exit(f"callgrind.sh: no key=value figures in the baseline {path}")
bad = []
for k, b in base.items():
    if k not in measured:
        print(f"baseline {k}: {b:g}, not measured in this run")
        continue
    m = float(measured[k])
    pct = 100 * (m - b) / b
    verdict = "ok"
    if pct > tolerance:
        verdict = f"FAILED: more than {tolerance:g}% above the baseline"
        bad.append(k)
    print(f"baseline {k}: measured {m:g}, baseline {b:g}: {pct:+.1f}% ({verdict})")
if bad:
    print(f"callgrind.sh: above the baseline ({path}) by more than {tolerance:g}%: {' '.join(bad)}", file=sys.stderr)
    sys.exit(1)
PY
fi
echo "${FINAL[*]} requests=$REQUESTS upstream=$UPSTREAM bin=$BIN"
exit "$over"
