# shellcheck shell=bash
# Shell helpers shared by loadtest/callgrind.sh and loadtest/bench.sh (sourced, not run).
# The sourcing script sets PROG (its name, for messages) first and runs with set -euo pipefail.
# Processes started in the background go in PIDS (oha's in OHA_PID); lib_cleanup, installed
# as the EXIT trap by lib_traps, stops them and removes TMP.

# What the clients send, and what the nginx upstream answers: a plain non-streaming completion.
CHAT='{"model":"meta/llama-3.1-8b-instruct","messages":[{"role":"user","content":"hi"}]}'
RESP='{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"meta/llama-3.1-8b-instruct","choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":9,"total_tokens":18}}'

PIDS=()
OHA_PID=""
TMP=""

die() {
  echo "${PROG:-loadtest}: $*" >&2
  exit 1
}

# usage: the comment block from "# Usage:" down to "set -euo" of the running script.
usage() { sed -n '/^# Usage:/,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

lib_cleanup() {
  local p
  for p in $OHA_PID "${PIDS[@]}"; do
    kill -TERM "$p" 2>/dev/null || true
  done
  for p in "${PIDS[@]}"; do
    wait "$p" 2>/dev/null || true
  done
  [ -z "$TMP" ] || rm -rf "$TMP"
}

# lib_traps: a temporary directory in TMP, and cleanup on exit and on signals.
lib_traps() {
  TMP=$(mktemp -d "${TMPDIR:-/tmp}/sidecar-$PROG.XXXXXX")
  trap lib_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# need_tools NAME...: fails naming the first one missing (nginx may be in /usr/sbin).
need_tools() {
  local t
  for t in "$@"; do
    if ! command -v "$t" >/dev/null && ! { [ "$t" = nginx ] && [ -x /usr/sbin/nginx ]; }; then
      die "$t not found"
    fi
  done
}
# release_binary BIN: BIN (absolute) when given, else the release build of this tree
# (built first); fails when it is not an executable.
release_binary() {
  local bin=$1
  if [ -z "$bin" ]; then
    echo "building the release binary" >&2
    cargo build --release --quiet
    bin=${CARGO_TARGET_DIR:-$ROOT/target}/release/nvidia-sidecar
  fi
  [ -x "$bin" ] || die "no executable at $bin"
  realpath "$bin"
}

nginx_path() { command -v nginx || echo /usr/sbin/nginx; }

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

# control PID OPTION: callgrind_control OPTION for PID, failing unless it answers OK.
control() {
  local said
  said=$(callgrind_control "$2" "$1" 2>&1) || die "callgrind_control $2 $1 failed: $said"
  grep -q "OK\." <<<"$said" || die "callgrind_control $2 $1: $said"
}

# oha_json OUT ARGS...: oha ARGS (POST of CHAT) with JSON output to OUT, in the background
# so that a signal to the script stops it at once (lib_cleanup kills oha).
oha_json() {
  local out=$1
  shift
  oha "$@" --no-tui --output-format json -m POST \
    -H "content-type: application/json" -d "$CHAT" >"$out" &
  OHA_PID=$!
  wait "$OHA_PID"
  OHA_PID=""
}

# oha_check JSON [N]: fails unless every request of the oha run in JSON was answered 200
# (and, with N, exactly N of them). Prints the number answered.
oha_check() {
  python3 - "$PROG" "$@" <<'PY'
import json, sys
prog, path = sys.argv[1], sys.argv[2]
want = int(sys.argv[3]) if len(sys.argv) > 3 else None
d = json.load(open(path))
codes = {str(k): int(v) for k, v in d.get("statusCodeDistribution", {}).items()}
errors = d.get("errorDistribution", {})
ok = codes.get("200", 0)
if errors or set(codes) - {"200"} or ok == 0 or (want is not None and ok != want):
    sys.exit(f"{prog}: expected {want if want is not None else 'only'} answers 200, "
             f"got statuses {codes} errors {errors} ({path})")
print(ok)
PY
}

# nginx_conf DIR WORKERS MASTER(on|off) SERVER_BLOCKS: writes DIR/nginx.conf, nginx in the
# foreground (so $! is its master, or with master_process off its only process) with its
# pid, logs and temp files under DIR, access log off, and SERVER_BLOCKS (upstream and
# server blocks) inside http { }.
nginx_conf() {
  local dir=$1 workers=$2 master=$3 blocks=$4 user_line=""
  mkdir -p "$dir"
  # As root nginx's workers would run as nobody; as root they can read DIR.
  [ "$(id -u)" = 0 ] && [ "$master" = on ] && user_line="user root;"
  cat >"$dir/nginx.conf" <<EOF
worker_processes $workers;
master_process $master;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
$user_line
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  client_body_temp_path $dir/body;
  proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi;
  uwsgi_temp_path $dir/uwsgi;
  scgi_temp_path $dir/scgi;
$blocks
}
EOF
}

# upstream_blocks PORT: the cheap upstream, answering RESP to every request.
upstream_blocks() {
  cat <<EOF
  server {
    listen 127.0.0.1:$1;
    location / { default_type application/json; return 200 '$RESP'; }
  }
EOF
}

# start_nginx DIR [PREFIX...]: starts PREFIX... nginx -c DIR/nginx.conf in the background,
# adds it to PIDS and sets NGINX_PID.
start_nginx() {
  local dir=$1
  shift
  "$@" "$(nginx_path)" -e "$dir/error.log" -p "$dir" -c "$dir/nginx.conf" \
    >"$dir/stdout.log" 2>&1 &
  NGINX_PID=$!
  PIDS+=("$NGINX_PID")
}

# callgrind_allocs FILE REQUESTS [TOP]: allocations per request in a callgrind output file:
# the calls into mimalloc's allocation entry points (mi_malloc*, mi_zalloc*, mi_calloc*,
# mi_realloc*, mi_*aligned*, the mi_heap_/mi_theap_ forms, mi_new*, ...) made from callers
# that are not mimalloc functions themselves (mi_*, _mi_*), so that an entry point calling
# another counts once. Prints "ALLOCS_PER_REQUEST FREES_PER_REQUEST", then with TOP the
# TOP callers and entry points, per request.
callgrind_allocs() {
  python3 - "$@" <<'PY'
import collections, re, sys
path, requests = sys.argv[1], int(sys.argv[2])
top = int(sys.argv[3]) if len(sys.argv) > 3 else 0
# Name compression: "fn=(12) name" defines id 12, later "fn=(12)" refers to it; fn= and
# cfn= share one table. Recursion levels (--separate-recs) add a suffix 'N.
names = {}
def name(v):
    m = re.match(r"\((\d+)\)(?: (.*))?$", v)
    if m:
        if m.group(2) is not None:
            names[m.group(1)] = m.group(2)
        v = names[m.group(1)]
    return re.sub(r"'\d+$", "", v)
ismi = re.compile(r"_?mi_").match
alloc = re.compile(r"mi_(?:heap_|theap_)?(?:malloc|zalloc|calloc|realloc|rezalloc|recalloc|"
                   r"reallocf|reallocn|mallocn|new|strn?dup|realpath|aligned_alloc|"
                   r"posix_memalign|memalign|valloc|pvalloc|_?expand|aligned_recalloc)").match
frees = re.compile(r"mi_(?:free|cfree|heap_free|free_size|free_aligned|free_size_aligned)").fullmatch
fn = cfn = None
by_caller, by_entry = collections.Counter(), collections.Counter()
nalloc = nfree = 0
with open(path) as f:
    for line in f:
        if line.startswith("fn="):
            fn = name(line[3:].rstrip("\n"))
        elif line.startswith("cfn="):
            cfn = name(line[4:].rstrip("\n"))
        elif line.startswith("calls=") and not ismi(fn) and ismi(cfn):
            n = int(line[6:].split()[0])
            if alloc(cfn):
                nalloc += n
                by_caller[fn] += n
                by_entry[cfn] += n
            elif frees(cfn):
                nfree += n
print(f"{nalloc / requests:.2f} {nfree / requests:.2f}")
if top:
    print("# entry points: " + ", ".join(f"{k} {v / requests:.2f}" for k, v in by_entry.most_common()))
    for k, v in by_caller.most_common(top):
        print(f"{v / requests:10.2f}  {k}")
PY
}
