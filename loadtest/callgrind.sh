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
# Usage: loadtest/callgrind.sh [--bin PATH] [--upstream nginx|mock] [-n REQUESTS]
#          [--warmup N] [-c CONNECTIONS] [--routes limited,passthrough] [--top N] [--out DIR]
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
# Compare two builds: loadtest/callgrind.sh --bin A; loadtest/callgrind.sh --bin B; then
# diff the <route>.top.txt files (costs there are instructions per request).
# Last line of output, machine-readable, e.g.:
#   instructions_per_request=38512 passthrough_instructions_per_request=37012 requests=20000 upstream=nginx bin=/path
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$HOME/.cargo/bin:$PATH"

BIN=""
UPSTREAM=nginx
REQUESTS=20000
WARMUP=2000
CONNECTIONS=8
ROUTES=limited,passthrough
TOP=15
OUT=""
CHAT='{"model":"meta/llama-3.1-8b-instruct","messages":[{"role":"user","content":"hi"}]}'
# What nginx answers: a plain non-streaming completion.
RESP='{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"meta/llama-3.1-8b-instruct","choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":9,"total_tokens":18}}'

usage() { sed -n '/^# Usage:/,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "callgrind.sh: $*" >&2; exit 1; }

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
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
case $UPSTREAM in nginx|mock) ;; *) die "--upstream is nginx or mock, not $UPSTREAM" ;; esac
for n in "$REQUESTS" "$WARMUP" "$CONNECTIONS" "$TOP"; do
  [[ $n =~ ^[0-9]+$ ]] || die "not a count: $n"
done
[ "$REQUESTS" -gt 0 ] || die "-n must be above 0"
IFS=, read -r -a ROUTE_LIST <<<"$ROUTES"
for r in "${ROUTE_LIST[@]}"; do
  case $r in limited|passthrough) ;; *) die "unknown route $r (limited, passthrough)" ;; esac
done

TOOLS=(valgrind callgrind_control callgrind_annotate oha python3 curl)
[ "$UPSTREAM" = nginx ] && TOOLS+=(nginx)
for t in "${TOOLS[@]}"; do
  if ! command -v "$t" >/dev/null && ! { [ "$t" = nginx ] && [ -x /usr/sbin/nginx ]; }; then
    die "$t not found"
  fi
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [ -z "$BIN" ]; then
  echo "building the release binary" >&2
  cargo build --release --quiet
  BIN=$TARGET/release/nvidia-sidecar
fi
[ -x "$BIN" ] || die "no executable at $BIN"
BIN=$(realpath "$BIN")
[ -n "$OUT" ] || OUT=$TARGET/callgrind/$(date +%Y%m%d-%H%M%S)-$UPSTREAM
mkdir -p "$OUT"
OUT=$(realpath "$OUT")

TMP=$(mktemp -d "${TMPDIR:-/tmp}/sidecar-callgrind.XXXXXX")
PIDS=()
OHA_PID=""
cleanup() {
  local p
  for p in $OHA_PID "${PIDS[@]}"; do
    kill -TERM "$p" 2>/dev/null || true
  done
  for p in "${PIDS[@]}"; do
    wait "$p" 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_port PORT PID SECONDS: until something listens on PORT, failing if PID exits first.
wait_port() {
  local port=$1 pid=$2 deadline=$((SECONDS + $3))
  while [ "$SECONDS" -lt "$deadline" ]; do
    kill -0 "$pid" 2>/dev/null || return 1
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    sleep 0.2
  done
  return 1
}

# stop PID: SIGTERM, then SIGKILL after 60 s; the exit status of PID.
stop() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 600; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  local rc=0
  wait "$pid" 2>/dev/null || rc=$?
  return "$rc"
}

# oha_run N URL JSON: N requests; fails unless every one was answered 200.
oha_run() {
  local n=$1 url=$2 json=$3
  # In the background so that a signal to this script stops it at once (cleanup kills oha).
  oha -n "$n" -c "$CONNECTIONS" --no-tui --output-format json -m POST \
    -H "content-type: application/json" -d "$CHAT" "$url" >"$json" &
  OHA_PID=$!
  wait "$OHA_PID"
  OHA_PID=""
  python3 - "$json" "$n" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
codes = {str(k): int(v) for k, v in d.get("statusCodeDistribution", {}).items()}
errors = d.get("errorDistribution", {})
ok = codes.get("200", 0)
if errors or set(codes) - {"200"} or ok != int(sys.argv[2]):
    sys.exit(f"callgrind.sh: expected {sys.argv[2]} answers 200, got statuses {codes} errors {errors}")
PY
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

# control PID OPTION: callgrind_control OPTION for PID, failing unless it answers OK.
control() {
  local said
  said=$(callgrind_control "$2" "$1" 2>&1) || die "callgrind_control $2 $1 failed: $said"
  grep -q "OK\." <<<"$said" || die "callgrind_control $2 $1: $said"
}

# The upstream.
UP_PORT=$(free_port)
if [ "$UPSTREAM" = nginx ]; then
  mkdir -p "$TMP/nginx"
  USER_LINE=""
  [ "$(id -u)" = 0 ] && USER_LINE="user root;"
  cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
$USER_LINE
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  client_body_temp_path $TMP/nginx/body;
  proxy_temp_path $TMP/nginx/proxy;
  fastcgi_temp_path $TMP/nginx/fastcgi;
  uwsgi_temp_path $TMP/nginx/uwsgi;
  scgi_temp_path $TMP/nginx/scgi;
  server {
    listen 127.0.0.1:$UP_PORT;
    location / { default_type application/json; return 200 '$RESP'; }
  }
}
EOF
  "$NGINX" -e "$TMP/nginx/error.log" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" \
    >"$TMP/nginx/stdout.log" 2>&1 &
  UP_PID=$!
else
  "$BIN" mock-upstream --listen "127.0.0.1:$UP_PORT" --rpm 0 --workers 1 --token-delay-ms 0 \
    >"$OUT/mock-upstream.log" 2>&1 &
  UP_PID=$!
fi
PIDS+=("$UP_PID")
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
  {
    echo "# $route route: $ipr instructions per request ($total Ir / $REQUESTS requests answered 200, in $secs s)"
    echo "# bin $BIN, upstream $UPSTREAM, oha -c $CONNECTIONS -n $REQUESTS after $WARMUP"
    echo "# columns: Ir per request, share of the total, function (file)"
    echo "## self cost"
    top "$OUT/$route.callgrind.out" "$REQUESTS" no
    echo "## inclusive cost"
    top "$OUT/$route.callgrind.out" "$REQUESTS" yes
  } >"$OUT/$route.top.txt"
  echo >&2
  sed -n '1p; /^## self/,/^## inclusive/p' "$OUT/$route.top.txt" | sed '$d' >&2
  echo "route=$route instructions_per_request=$ipr total_ir=$total requests=$REQUESTS seconds=$secs"
  if [ "$route" = limited ]; then
    FINAL=("instructions_per_request=$ipr" "${FINAL[@]}")
  else
    FINAL+=("${route}_instructions_per_request=$ipr")
  fi
done

stop "$UP_PID" || true
echo "${FINAL[*]} requests=$REQUESTS upstream=$UPSTREAM bin=$BIN"
