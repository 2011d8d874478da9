#!/usr/bin/env bash
# The sidecar against nginx as a reverse proxy, on the same machine, the same cheap upstream
# and the same traffic: the README's performance comparison.
#
# Setup: an upstream nginx (1 worker, access log off) answers every request with a fixed
# chat.completion JSON. In front of it, on free ports: nginx as the reference proxy (N
# workers, access log off, an upstream block with keepalive 64, HTTP/1.1 to the upstream,
# the provider key injected as Authorization) and the sidecar release binary (N workers, the
# limited route with a rate and burst that never bind, log level warn). N is the number of
# cores unless --workers says otherwise.
#
# Method: each proxy is warmed up, then R rounds (4 at least) each run both, once, for
# DURATION with CONNECTIONS oha connections (POST /v1/chat/completions), alternating which
# goes first (ABBA: nginx first in odd rounds, the sidecar in even ones) so that a drift of
# the machine's load over the rounds weighs on both alike. Every answer must be 200. Per
# run: CPU time per request, from the proxy's own processes (/proc/<pid>/stat utime+stime;
# nginx: master and workers; the sidecar: its one process) before and after, divided by the
# requests answered, and of that the system time alone (the kernel's share: about 60% of
# either proxy's CPU here); throughput (requests/s) and p99 latency as oha reports them. The
# summary takes the median of the rounds. oha and the upstream run on the same cores as the
# proxy under test, alike for both.
#
# With --callgrind, also instructions per request, 1 worker each, same traffic (oha -c 8 -n
# 20000 after 2000 to warm up): the sidecar through loadtest/callgrind.sh --routes limited,
# nginx as the proxy under valgrind --tool=callgrind (master_process off, 1 worker), its
# counters zeroed before and dumped after the measured run with callgrind_control, as
# callgrind.sh does for the sidecar. Instructions hardly move with the machine's load; CPU
# time and throughput do (10% and more on a shared VM): read those from several rounds.
#
# Usage: loadtest/bench.sh [--bin PATH] [--rounds R] [--duration D] [--connections C]
#          [--workers N] [--callgrind] [--quick] [--out DIR]
#   --bin PATH       the sidecar binary (default: build the release binary of this tree)
#   --rounds R       rounds, each running both proxies once (4; at least 4 but with --quick)
#   --duration D     oha -z per run ($DURATION, else 5s)
#   --connections C  oha -c per run ($CONNECTIONS, else 64)
#   --workers N      nginx worker processes and SIDECAR_WORKERS (nproc)
#   --callgrind      also instructions per request of both under callgrind (a minute or two)
#   --quick          smoke test: 1 round of 1s unless told otherwise, fewer than 4 allowed
#   --out DIR        where results go (default $CARGO_TARGET_DIR or target, then
#                    /bench/<time>): per-run oha JSON, runs.tsv, summary.md
# Last line of output, machine-readable, e.g.:
#   cpu_ratio=1.31 throughput_ratio=0.84 p99_ratio=1.20 nginx_cpu_us=16.0 sidecar_cpu_us=21.1 nginx_rps=... rounds=4 ...
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$HOME/.cargo/bin:$PATH"
PROG=bench.sh
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh

BIN=""
ROUNDS=""
DUR=${DURATION:-}
CONNS=${CONNECTIONS:-64}
WORKERS=$(nproc)
CALLGRIND=0
QUICK=0
OUT=""
API_KEY=nvapi-bench-key

while [ $# -gt 0 ]; do
  case $1 in
    --bin) BIN=${2:?--bin needs a path}; shift 2 ;;
    --rounds) ROUNDS=${2:?}; shift 2 ;;
    --duration) DUR=${2:?}; shift 2 ;;
    --connections) CONNS=${2:?}; shift 2 ;;
    --workers) WORKERS=${2:?}; shift 2 ;;
    --callgrind) CALLGRIND=1; shift ;;
    --quick) QUICK=1; shift ;;
    --out) OUT=${2:?}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
if [ "$QUICK" = 1 ]; then
  ROUNDS=${ROUNDS:-1}
  DUR=${DUR:-1s}
  WARM=1s
else
  ROUNDS=${ROUNDS:-4}
  DUR=${DUR:-5s}
  WARM=2s
fi
for n in "$ROUNDS" "$CONNS" "$WORKERS"; do
  if ! [[ $n =~ ^[0-9]+$ ]] || [ "$n" -eq 0 ]; then die "not a count above 0: $n"; fi
done
[ "$QUICK" = 1 ] || [ "$ROUNDS" -ge 4 ] || die "at least 4 rounds (--quick for a smoke test)"
[[ $DUR =~ ^[0-9]+(ms|s|m)$ ]] || die "not an oha duration: $DUR (e.g. 5s)"

TOOLS=(nginx oha python3)
[ "$CALLGRIND" = 0 ] || TOOLS+=(valgrind callgrind_control callgrind_annotate curl)
need_tools "${TOOLS[@]}"

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$(release_binary "$BIN")
[ -n "$OUT" ] || OUT=$TARGET/bench/$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
lib_traps

# proxy_blocks PORT UPSTREAM_PORT: nginx as the reference proxy.
proxy_blocks() {
  cat <<EOF
  upstream llm {
    server 127.0.0.1:$2;
    keepalive 64;
  }
  server {
    listen 127.0.0.1:$1;
    location /v1/ {
      proxy_pass http://llm;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer $API_KEY";
    }
  }
EOF
}

# proc_tree PID: PID and its children (nginx's master and workers).
proc_tree() {
  python3 - "$1" <<'PY'
import os, sys
root = sys.argv[1]
kids = []
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            stat = open(f"/proc/{p}/stat").read()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2:].split()[1] == root:
            kids.append(p)
print(root, *kids)
PY
}

# ticks PID...: utime and stime of the processes (all their threads), in clock ticks.
ticks() {
  local p stat rest user=0 sys=0
  for p in "$@"; do
    stat=$(<"/proc/$p/stat") || die "process $p is gone"
    rest=${stat##*) }
    read -r -a f <<<"$rest"
    # After "pid (comm) ": state is field 3 of stat, utime 14 and stime 15.
    user=$((user + f[11]))
    sys=$((sys + f[12]))
  done
  echo "$user $sys"
}

# The upstream, and the two proxies.
UP_PORT=$(free_port)
nginx_conf "$TMP/upstream" 1 on "$(upstream_blocks "$UP_PORT")"
start_nginx "$TMP/upstream"
UP_PID=$NGINX_PID
wait_port "$UP_PORT" "$UP_PID" 20 || die "the upstream nginx did not start: $(cat "$TMP/upstream/error.log")"

NGINX_PORT=$(free_port)
nginx_conf "$TMP/proxy" "$WORKERS" on "$(proxy_blocks "$NGINX_PORT" "$UP_PORT")"
start_nginx "$TMP/proxy"
NGX_PID=$NGINX_PID
wait_port "$NGINX_PORT" "$NGX_PID" 20 || die "nginx (proxy) did not start: $(cat "$TMP/proxy/error.log")"

SC_PORT=$(free_port)
SC_MPORT=$(free_port)
env SIDECAR_UPSTREAM_URL="http://127.0.0.1:$UP_PORT/v1" SIDECAR_UPSTREAM_API_KEY=$API_KEY \
  SIDECAR_LISTEN_PORT="$SC_PORT" SIDECAR_METRICS_PORT="$SC_MPORT" SIDECAR_WORKERS="$WORKERS" \
  SIDECAR_RATE_RPM=6000000 SIDECAR_BUCKET_CAPACITY=100000 SIDECAR_LOG_LEVEL=warn \
  "$BIN" >"$OUT/sidecar.log" 2>&1 &
SC_PID=$!
PIDS+=("$SC_PID")
if ! wait_port "$SC_MPORT" "$SC_PID" 30 || ! wait_port "$SC_PORT" "$SC_PID" 30; then
  die "the sidecar did not start; log: $OUT/sidecar.log"
fi
# Every process of nginx, once its workers are up.
sleep 0.5
read -r -a NGX_PIDS <<<"$(proc_tree "$NGX_PID")"
[ "${#NGX_PIDS[@]}" -gt "$WORKERS" ] || die "nginx runs ${NGX_PIDS[*]}, expected a master and $WORKERS workers"

port_of() { if [ "$1" = nginx ]; then echo "$NGINX_PORT"; else echo "$SC_PORT"; fi; }
pids_of() { if [ "$1" = nginx ]; then echo "${NGX_PIDS[*]}"; else echo "$SC_PID"; fi; }
url_of() { echo "http://127.0.0.1:$(port_of "$1")/v1/chat/completions"; }

HZ=$(getconf CLK_TCK)
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
echo "bin: $BIN" >&2
echo "upstream nginx :$UP_PORT; nginx proxy :$NGINX_PORT (pids ${NGX_PIDS[*]}); sidecar :$SC_PORT (pid $SC_PID); $WORKERS workers each" >&2
echo "$ROUNDS rounds of oha -z $DUR -c $CONNS, ABBA; load average $LOAD0; files in $OUT" >&2

for p in nginx sidecar; do
  oha_json "$OUT/warmup.$p.oha.json" -z "$WARM" -w -c "$CONNS" "$(url_of "$p")"
  oha_check "$OUT/warmup.$p.oha.json" >/dev/null
done

# run ROUND PROXY: one measured run, a line of runs.tsv.
run() {
  local round=$1 p=$2 json c0 c1 n
  json=$OUT/round$round.$p.oha.json
  read -r -a pids <<<"$(pids_of "$p")"
  c0=$(ticks "${pids[@]}")
  oha_json "$json" -z "$DUR" -w -c "$CONNS" "$(url_of "$p")"
  c1=$(ticks "${pids[@]}")
  n=$(oha_check "$json")
  python3 - "$round" "$p" "$c0" "$c1" "$HZ" "$n" "$json" <<'PY' | tee -a "$OUT/runs.tsv"
import json, sys
r, p, c0, c1, hz, n, path = sys.argv[1:]
d = json.load(open(path))
(u0, s0), (u1, s1) = (map(int, c.split()) for c in (c0, c1))
per = lambda ticks: ticks / int(hz) * 1e6 / int(n)
cpu_us, sys_us = per(u1 - u0 + s1 - s0), per(s1 - s0)
rps = d["summary"]["requestsPerSec"]
p99 = d["latencyPercentiles"]["p99"] * 1000
print(f"{r}\t{p}\t{cpu_us:.2f}\t{rps:.0f}\t{p99:.2f}\t{n}\t{sys_us:.2f}")
PY
}

printf 'round\tproxy\tcpu_us_per_request\trequests_per_s\tp99_ms\tanswered\tkernel_us_per_request\n' | tee "$OUT/runs.tsv"
for ((r = 1; r <= ROUNDS; r++)); do
  if ((r % 2)); then order=(nginx sidecar); else order=(sidecar nginx); fi
  for p in "${order[@]}"; do
    run "$r" "$p"
  done
done
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)
stop "$NGX_PID" || true
rc=0
stop "$SC_PID" || rc=$?
[ "$rc" = 0 ] || die "the sidecar exited with $rc after SIGTERM; log: $OUT/sidecar.log"

CG=""
if [ "$CALLGRIND" = 1 ]; then
  echo "callgrind: the sidecar (loadtest/callgrind.sh --routes limited)" >&2
  line=$(loadtest/callgrind.sh --bin "$BIN" --routes limited --out "$OUT/callgrind-sidecar" |
    tail -n 1)
  sc_ipr=$(grep -o 'instructions_per_request=[0-9]*' <<<"$line" | head -n 1 | cut -d= -f2)
  sc_apr=$(grep -o 'allocations_per_request=[0-9.]*' <<<"$line" | head -n 1 | cut -d= -f2)
  [ -n "$sc_ipr" ] || die "no figure from loadtest/callgrind.sh: $line"

  echo "callgrind: nginx as the proxy (1 worker, master_process off)" >&2
  port=$(free_port)
  nginx_conf "$TMP/cgproxy" 1 off "$(proxy_blocks "$port" "$UP_PORT")"
  start_nginx "$TMP/cgproxy" valgrind --tool=callgrind --callgrind-out-file="$TMP/nginx.cg.%p"
  pid=$NGINX_PID
  wait_port "$port" "$pid" 300 || die "nginx under callgrind did not start: $(cat "$TMP/cgproxy/stdout.log" "$TMP/cgproxy/error.log")"
  url="http://127.0.0.1:$port/v1/chat/completions"
  oha_json "$OUT/callgrind-nginx.warmup.oha.json" -n 2000 -c 8 "$url"
  oha_check "$OUT/callgrind-nginx.warmup.oha.json" 2000 >/dev/null
  control "$pid" --zero
  oha_json "$OUT/callgrind-nginx.oha.json" -n 20000 -c 8 "$url"
  control "$pid" --dump="measured nginx"
  oha_check "$OUT/callgrind-nginx.oha.json" 20000 >/dev/null
  stop "$pid" || true
  [ -s "$TMP/nginx.cg.$pid.1" ] || die "no callgrind dump $TMP/nginx.cg.$pid.1"
  cp "$TMP/nginx.cg.$pid.1" "$OUT/callgrind-nginx.out"
  total=$(grep -m1 '^totals:' "$OUT/callgrind-nginx.out" | awk '{print $2}')
  [ -n "$total" ] || total=$(grep -m1 '^summary:' "$OUT/callgrind-nginx.out" | awk '{print $2}')
  [[ $total =~ ^[0-9]+$ ]] || die "no totals: line in $OUT/callgrind-nginx.out"
  ngx_ipr=$(python3 -c "print(round($total / 20000))")
  CG="$ngx_ipr $sc_ipr $sc_apr"
fi
stop "$UP_PID" || true

COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
NGINX_VERSION=$("$(nginx_path)" -v 2>&1 | sed 's/.*: //')
python3 - "$OUT/runs.tsv" "$CG" <<PY | tee "$OUT/summary.md"
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])][1:]
cg = sys.argv[2].split()
def med(proxy, col):
    return statistics.median(float(r[col]) for r in rows if r[1] == proxy)
def fmt(v, digits):
    return f"{v:,.{digits}f}"
print("## sidecar vs nginx as a proxy (loadtest/bench.sh)")
print()
print("commit $COMMIT, $(nproc) cores ($CPU), $WORKERS workers each, $NGINX_VERSION, "
      "$ROUNDS rounds ABBA of oha -z $DUR -c $CONNS, load average $LOAD0 before, $LOAD1 after")
print()
print("| round | proxy | CPU µs/request | of which kernel | requests/s | p99 ms | answered |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]} | {r[6]} | {fmt(float(r[3]), 0)} | {r[4]} | {r[5]} |")
print()
print("| measure | nginx | sidecar | ratio (sidecar/nginx) |")
print("|---|---|---|---|")
last = []
for label, col, digits, key in (("CPU per request, µs (median)", 2, 1, "cpu"),
                                 ("throughput, requests/s (median)", 3, 0, "throughput"),
                                 ("p99 latency, ms (median)", 4, 2, "p99")):
    n, s = med("nginx", col), med("sidecar", col)
    print(f"| {label} | {fmt(n, digits)} | {fmt(s, digits)} | {s / n:.2f} |")
    last.append((key, n, s, digits))
    if key == "cpu":
        n, s = med("nginx", 6), med("sidecar", 6)
        print(f"| of which in the kernel, µs (median) | {fmt(n, 1)} | {fmt(s, 1)} | {s / n:.2f} |")
if cg:
    n, s = int(cg[0]), int(cg[1])
    print(f"| instructions per request (callgrind, 1 worker) | {n:,} | {s:,} | {s / n:.2f} |")
    if len(cg) > 2:
        print(f"\nsidecar heap allocations per request (callgrind, mimalloc entry points): {cg[2]}")
words = [f"{k}_ratio={s / n:.2f}" for k, n, s, _ in last]
for k, n, s, d in last:
    unit = {"cpu": "cpu_us", "throughput": "rps", "p99": "p99_ms"}[k]
    words += [f"nginx_{unit}={n:.{d}f}", f"sidecar_{unit}={s:.{d}f}"]
if cg:
    words += [f"instructions_ratio={int(cg[1]) / int(cg[0]):.2f}",
              f"nginx_instructions_per_request={cg[0]}", f"sidecar_instructions_per_request={cg[1]}"]
    if len(cg) > 2:
        words.append(f"sidecar_allocations_per_request={cg[2]}")
words += ["rounds=$ROUNDS", "duration=$DUR", "connections=$CONNS", "workers=$WORKERS", "out=$OUT"]
print()
print(" ".join(words))
PY
