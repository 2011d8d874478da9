#!/usr/bin/env python3
"""Load test: the sidecar against direct calls and nginx, on the same simulated upstream.

Scenarios (each for a fixed duration):
  direct               oha straight to the simulated upstream (the ceiling)
  nginx                oha through nginx (keep-alive pool, header injection, no access log),
                       then at --paced-rate req/s over 16 connections
  sidecar-limited      oha through the sidecar, a token bucket that never binds, then paced
                       as nginx was (CPU per request against nginx's where the machine is
                       not saturated, the load a sidecar usually sees)
  sidecar-passthrough  the same through the unmetered route (queue 0 + fallback passthrough)
  route-ab             limited against passthrough in alternating short runs (full form only):
                       the throughput ratio with the machine's background load cancelled out
  overload             6,000 RPM, burst 1, queue 64, no fallback, under a closed-loop oha
                       flood (-c 256, back to back): admitted rate accuracy under
                       saturation, peak RSS; its 429 latency is Little's law (connections /
                       throughput), the wait behind the other connections
  overload-paced       the same sidecar under an open-loop flood: oha -q 2000 (20x the rate,
                       far under the sidecar's saturation) --latency-correction, -c 128 (64
                       sit in the queue): the latency of a rejection (oha's 429s, a paced
                       probe's, and the sidecar's own histogram), admitted rate, CPU/request
  streaming            N SSE completions started at once, round after round, and a lone stream,
                       direct, through nginx and through the sidecar: time to the first
                       `data:` line (kernel receive timestamps) and to the end
  dashboard            N dashboard SSE clients: sidecar CPU, frames, snapshot builds
  idle                 N idle keep-alive connections: sidecar RSS
  pacing               closed-loop pacing against a provider's rolling-window limit, on a
                       shortened time scale (window 6 s, sidecar times / 10): per situation
                       of issue 13, the provider's 429s and admissions per window (from the
                       simulated provider's own record), the learned limit's convergence;
                       the situations run side by side, about 3 minutes (pacing.py)
  cluster              one budget shared by 3 replicas through a redis-server of our own
                       (6,000 and 60,000 RPM), a flood of 2x the budget spread over them,
                       against one sidecar alone at the same rate and flood: admitted vs
                       budget, Redis round trips and CPU per admitted request (cluster.py)
  soak                 --soak-minutes (30; 1 under --short) of mixed traffic: streaming and plain
                       completions, clients leaving mid-stream and while queued, more demand
                       than the rate, a provider answering 429s (a hidden limit below the
                       sidecar's, moving) and resetting connections, dashboard visitors; the
                       sidecar's RSS and descriptors at baseline, peak and end, its ledger
                       at the end (soak.py). The full form runs it only when asked for:
                       --only soak, or --soak-minutes given

Only the simulated upstream, nginx and the sidecar run, all on this machine; clients.py
holds the stdlib clients (asyncio and sockets) for what oha cannot measure, prom.py the
Prometheus parsing and histogram_quantile.

For the oha scenarios: requests/s, p50/p99/p99.9 latency, errors, proxy CPU microseconds
per request (utime+stime from /proc, summed over the proxy's processes) and peak RSS
(sampled every 50 ms). The sidecar's own request-duration histogram is read before and
after the non-binding runs and its quantiles (histogram_quantile's interpolation) are set
beside oha's. Results go to <out>/results.json and <out>/results.md; the markdown is
printed at the end.

Usage: loadtest/run.py [--duration 10] [--connections 64] [--short] [--only a,b] [--no-build]
--short is the CI form: 3 s per scenario, 100 streams, 200 dashboard clients, 2,000 idle
connections, no route-ab, pacing on a 2 s window for 3 windows (about 20 s), cluster
4 runs of 6 s (about 40 s; cluster.MIN_RUN_S), soak for 1 minute (about 70 s); about 165 s.
--pacing-realtime adds pacing's situation 1 in real time (3 minutes, side by side with the
others). Whatever the form, the exit
status is 1 only for errors that mean a bug (a process that died, a request without an
answer, a status other than the expected ones, a stream without [DONE], a dashboard
client without frames, more snapshot builds than ticks), never for timing or throughput,
except the cluster scenario's bounds of issue 14 (admitted at least 90% of the shared
budget and, beyond the shared bucket's burst, at most 2% above it; at most 0.1 Redis round
trips per admitted request), and the soak's leak checks (descriptors and RSS back near
their baseline after the load, the sidecar's ledger settled; soak.py says why the bounds).
"""

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, str(Path(__file__).resolve().parent))
import clients  # noqa: E402
import cluster  # noqa: E402
import pacing  # noqa: E402
import prom  # noqa: E402
import soak  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "nvidia-sidecar"
CLK_TCK = os.sysconf("SC_CLK_TCK")
CHAT = '{"model":"meta/llama-3.1-8b-instruct","messages":[{"role":"user","content":"hi"}]}'
STREAM_CHAT = '{"model":"meta/llama-3.1-8b-instruct","stream":true,"messages":[{"role":"user","content":"hi"}]}'
API_KEY = "nvapi-loadtest-key"
# Connections of the paced runs (nginx and sidecar-limited at --paced-rate).
PACED_CONNECTIONS = 16
SCENARIOS = ["direct", "nginx", "sidecar-limited", "sidecar-passthrough", "route-ab", "overload", "overload-paced", "streaming", "dashboard", "idle",
             "pacing", "cluster", "soak"]
# route-ab measures only throughput, which the CI form never judges.
SHORT_SKIPS = {"route-ab"}
# The soak takes half an hour in the full form: only when asked for (--only, --soak-minutes).
FULL_SKIPS = {"soak"}
# oha stops a -z run by aborting the requests still in flight: not proxy errors.
DEADLINE = "aborted due to deadline"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def proc_tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            children = []
        todo.extend(int(c) for c in children)
    return out


def cpu_seconds(pid: int) -> float:
    """utime+stime of the process tree (clock ticks; exited threads included)."""
    total = 0
    for p in proc_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError):
            pass
    return total / CLK_TCK


def cpu_seconds_precise(pid: int) -> float:
    """CPU time of every live thread of the process tree from schedstat (nanoseconds):
    for small amounts, where clock ticks are too coarse."""
    total = 0
    for p in proc_tree(pid):
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                total += int(Path(f"/proc/{p}/task/{t}/schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):
                pass
    return total / 1e9


def cpu_pressure_us() -> float | None:
    """The kernel's CPU pressure: microseconds in which some runnable task waited for a
    core (/proc/pressure/cpu, `some` total); None without PSI. Over a run, its share of
    the run's time says how crowded the cores were (the other sessions on the machine
    included), which is what tail latencies on a shared machine mostly measure."""
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some "):
                return float(dict(f.split("=") for f in line.split()[1:])["total"])
    except (OSError, KeyError, ValueError):
        pass
    return None


def rss_kib(pid: int) -> int:
    total = 0
    for p in proc_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def oha(url: str, duration: float, connections: int, extra: list[str]) -> dict:
    cmd = [
        shutil.which("oha") or str(Path.home() / ".cargo/bin/oha"),
        "-z", f"{duration}s", "-c", str(connections), "--no-tui",
        "--output-format", "json", *extra, url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def summarize(name: str, res: dict, cpu: float | None, rss: int | None) -> dict:
    summary = res.get("summary", {})
    pct = res.get("latencyPercentiles", {})
    codes = res.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    total = sum(codes.values())
    errors = sum(v for k, v in res.get("errorDistribution", {}).items() if k != DEADLINE)
    return {
        "scenario": name,
        "requests": total,
        "ok": ok,
        "non_2xx": total - ok,
        "statuses": codes,
        "errors": errors,
        "error_kinds": {k: v for k, v in res.get("errorDistribution", {}).items() if k != DEADLINE},
        "aborted_at_deadline": res.get("errorDistribution", {}).get(DEADLINE, 0),
        "elapsed_s": summary.get("total", 0.0),
        "rps": summary.get("requestsPerSec", 0.0),
        "p50_ms": (pct.get("p50") or 0) * 1e3,
        "p99_ms": (pct.get("p99") or 0) * 1e3,
        "p999_ms": (pct.get("p99.9") or 0) * 1e3,
        "cpu_us_per_req": (cpu / total * 1e6) if cpu is not None and total else None,
        "peak_rss_mib": (rss / 1024) if rss else None,
    }


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the load test dies, so that a killed run
    leaves no upstream, nginx or sidecar behind (PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Proc:
    def __init__(self, name: str, cmd: list[str], log_dir: Path, env: dict | None = None, port: int | None = None):
        self.name = name
        self.log = log_dir / f"{name}.log"
        with open(self.log, "wb") as log:
            self.p = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                      preexec_fn=_die_with_parent)
        self.peak_rss = 0
        self.stopped = False
        if port:
            wait_port(port, self.p)

    @property
    def pid(self) -> int:
        return self.p.pid

    def sample(self) -> None:
        if self.alive():
            self.peak_rss = max(self.peak_rss, rss_kib(self.p.pid))

    def alive(self) -> bool:
        return self.p.poll() is None

    def check(self, what: str) -> None:
        if not self.alive():
            raise RuntimeError(f"{what}: {self.name} died (exit {self.p.returncode}); log: {self.log}\n{self.tail()}")

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM and wait; the exit status (None if it had to be killed)."""
        if self.stopped:
            return self.p.returncode
        self.stopped = True
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
                return None
        return self.p.returncode


class Sampling:
    """Samples a process's RSS every 50 ms while the block runs."""

    def __init__(self, proc: Proc | None):
        self.proc = proc
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.proc.sample()

    def __enter__(self):
        if self.proc:
            self.proc.sample()
            self.t.start()
        return self

    def __exit__(self, *exc):
        if self.proc:
            self.stop.set()
            self.t.join()
            self.proc.sample()


def nginx_conf(tmp: Path, listen: int, upstream: int, workers: int) -> Path:
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes {workers};
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
user root;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  upstream mock {{ server 127.0.0.1:{upstream}; keepalive 512; }}
  server {{
    listen 127.0.0.1:{listen} reuseport;
    location /v1/ {{
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {API_KEY}";
      proxy_buffering off;
      client_max_body_size 16m;
    }}
  }}
}}
""")
    return conf


class LoadTest:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.logs = self.out / "logs"
        self.logs.mkdir(exist_ok=True)
        self.rows: list[dict] = []  # oha scenarios
        self.extra: dict[str, dict] = {}  # the other scenarios' results
        self.failures: list[str] = []
        self.procs: list[Proc] = []
        self.body = ["-m", "POST", "-H", "content-type: application/json", "-d", CHAT]

    # --- helpers ----------------------------------------------------------------------

    def fail(self, scenario: str, msg: str) -> None:
        self.failures.append(f"{scenario}: {msg}")
        print(f"FAIL {scenario}: {msg}", file=sys.stderr)

    def start(self, name: str, cmd: list[str], env: dict | None = None, port: int | None = None) -> Proc:
        p = Proc(name, cmd, self.logs, env, port)
        self.procs.append(p)
        return p

    def mock(self, name: str, *flags: str) -> tuple[Proc, int]:
        port = free_port()
        p = self.start(name, [str(BIN), "mock-upstream", "--listen", f"127.0.0.1:{port}", "--rpm", "0",
                              "--workers", str(self.args.workers), *flags], port=port)
        return p, port

    def sidecar(self, name: str, upstream: int, **env: str) -> tuple[Proc, int, int]:
        port, mport = free_port(), free_port()
        base = {
            "SIDECAR_UPSTREAM_URL": f"http://127.0.0.1:{upstream}/v1",
            "SIDECAR_UPSTREAM_API_KEY": API_KEY,
            "SIDECAR_LISTEN_PORT": str(port),
            "SIDECAR_METRICS_PORT": str(mport),
            "SIDECAR_WORKERS": str(self.args.workers),
            # A rate and burst that never bind unless the scenario says otherwise.
            "SIDECAR_RATE_RPM": "6000000",
            "SIDECAR_BUCKET_CAPACITY": "100000",
            "SIDECAR_LOG_LEVEL": "warn",
        }
        p = self.start(name, [str(BIN)], {**base, **env}, port)
        wait_port(mport, p.p)
        return p, port, mport

    def stop(self, scenario: str, p: Proc) -> None:
        if not p.stopped and not p.alive():
            p.stopped = True
            self.fail(scenario, f"{p.name} died (exit {p.p.returncode}); log: {p.log}\n{p.tail()}")
            return
        code = p.stop()
        if code != 0:
            what = "did not stop within 30 s of SIGTERM" if code is None else f"exited with {code} after SIGTERM"
            self.fail(scenario, f"{p.name} {what}; log: {p.log}\n{p.tail()}")

    def oha_row(self, name: str, url: str, proc: Proc | None, connections: int, extra: list[str],
                allowed: set[str] = frozenset({"200"})) -> tuple[dict, dict]:
        before = cpu_seconds(proc.pid) if proc else None
        with Sampling(proc):
            res = oha(url, self.args.duration, connections, extra)
        cpu = cpu_seconds(proc.pid) - before if proc else None
        if proc:
            proc.check(name)
        row = summarize(name, res, cpu, proc.peak_rss if proc else None)
        row["connections"] = connections
        self.rows.append(row)
        if row["errors"]:
            self.fail(name, f"{row['errors']} requests without an answer: {row['error_kinds']}")
        unexpected = {k: v for k, v in row["statuses"].items() if k not in allowed}
        if unexpected:
            self.fail(name, f"unexpected statuses {unexpected} (only {sorted(allowed)} expected)")
        if not row["requests"]:
            self.fail(name, "no request answered")
        return row, res

    def sidecar_forwarding(self, name: str, up_port: int, route: str, paced: int = 0, **env: str) -> None:
        """oha through a sidecar whose requests all take `route`; with `paced`, a second
        run at that fixed rate (a load that does not saturate the machine), where the
        sidecar's own histogram and oha should tell the same story."""
        sc, port, mport = self.sidecar(name, up_port, **env)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        runs = [(name, self.args.connections, self.body)]
        if paced:
            runs.append((f"{name} @{paced}/s", PACED_CONNECTIONS, [*self.body, "-q", str(paced)]))
        for label, conns, extra in runs:
            m0 = prom.scrape(mport)
            row, _ = self.oha_row(label, url, sc, conns, extra)
            m1 = prom.scrape(mport)
            counts = {}
            for (n, labels), v in sorted(m1.items()):
                if n == "sidecar_requests_total":
                    d = v - m0.get((n, labels), 0.0)
                    if d:
                        lab = dict(labels)
                        key = f"{lab.get('route')}/{lab.get('outcome')}"
                        counts[key] = counts.get(key, 0) + int(d)
            h = prom.delta(prom.buckets(m1, "sidecar_request_duration_seconds", route=route),
                           prom.buckets(m0, "sidecar_request_duration_seconds", route=route))
            row["sidecar_metrics"] = {
                "requests_by_route_outcome": counts,
                "histogram_count": h[-1][1] if h else 0,
                "p50_ms": prom.histogram_quantile(0.5, h) * 1e3,
                "p99_ms": prom.histogram_quantile(0.99, h) * 1e3,
                "p999_ms": prom.histogram_quantile(0.999, h) * 1e3,
            }
            if label != name:
                row["paced"] = True
            other = "passthrough" if route == "limited" else "limited"
            strays = sum(v for k, v in counts.items() if k.startswith(other + "/"))
            # Passthrough: the bucket (1 RPM, burst 1) lets its one token through the limited route.
            if strays > (0 if route == "limited" else 2):
                self.fail(label, f"{strays} requests took the {other} route: {counts}")
            if not any(k.startswith(route + "/") for k in counts):
                self.fail(label, f"no request counted on the {route} route: {counts}")
        self.stop(name, sc)

    # --- scenarios ----------------------------------------------------------------------

    def run(self) -> None:
        a = self.args
        mock, self.up_port = self.mock("mock", "--token-delay-ms", "0")
        self.mock_proc = mock
        for s in a.only:
            print(f"== {s}", file=sys.stderr, flush=True)
            t = time.time()
            started = len(self.procs)
            try:
                getattr(self, "s_" + s.replace("-", "_"))()
            except Exception as e:  # a scenario that cannot finish is a failure, the others still run
                self.fail(s, f"{type(e).__name__}: {e}")
            for p in self.procs[started:]:
                if not p.stopped and not p.alive():
                    self.fail(s, f"{p.name} died (exit {p.p.returncode}); log: {p.log}\n{p.tail()}")
                p.stop()
            if not mock.alive():
                self.fail(s, f"the simulated upstream died (exit {mock.p.returncode})\n{mock.tail()}")
                mock, self.up_port = self.mock("mock-restarted", "--token-delay-ms", "0")
                self.mock_proc = mock
            print(f"   {time.time() - t:.1f} s", file=sys.stderr, flush=True)

    def s_direct(self) -> None:
        self.oha_row("direct", f"http://127.0.0.1:{self.up_port}/v1/chat/completions", None, self.args.connections, self.body)

    def s_nginx(self) -> None:
        if not shutil.which("nginx"):
            print("nginx not installed: skipping the reference proxy", file=sys.stderr)
            return
        tmp = Path(tempfile.mkdtemp(prefix="sidecar-nginx-"))
        port = free_port()
        nginx = self.start("nginx", ["nginx", "-c", str(nginx_conf(tmp, port, self.up_port, self.args.workers)), "-p", str(tmp)], port=port)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        self.oha_row("nginx", url, nginx, self.args.connections, self.body)
        if self.args.paced_rate:
            # The same paced load as the sidecar's paced row: CPU per request where the
            # machine is not saturated, the load a sidecar usually sees.
            row, _ = self.oha_row(f"nginx @{self.args.paced_rate}/s", url, nginx, PACED_CONNECTIONS,
                                  [*self.body, "-q", str(self.args.paced_rate)])
            row["paced"] = True
        self.stop("nginx", nginx)

    def s_sidecar_limited(self) -> None:
        self.sidecar_forwarding("sidecar-limited", self.up_port, "limited", paced=self.args.paced_rate)

    def s_sidecar_passthrough(self) -> None:
        # No queue, fallback on, a rate that admits one request a minute: every request
        # the bucket cannot take at once goes the passthrough (unmetered) route.
        self.sidecar_forwarding("sidecar-passthrough", self.up_port, "passthrough",
                                SIDECAR_QUEUE_MAX_SIZE="0", SIDECAR_FALLBACK_ENABLED_PASSTHROUGH="true",
                                SIDECAR_RATE_RPM="1", SIDECAR_BUCKET_CAPACITY="1")

    def s_route_ab(self) -> None:
        """Limited against passthrough, interleaved: both sidecars run side by side and
        short oha runs alternate between them, so a change in the machine's background
        load hits both routes alike; the ratio is the median over the pairs."""
        a = self.args
        lim, lport, _ = self.sidecar("sidecar-ab-limited", self.up_port)
        pas, pport, _ = self.sidecar("sidecar-ab-passthrough", self.up_port, SIDECAR_QUEUE_MAX_SIZE="0",
                                     SIDECAR_FALLBACK_ENABLED_PASSTHROUGH="true", SIDECAR_RATE_RPM="1", SIDECAR_BUCKET_CAPACITY="1")
        pairs = []
        for i in range(a.ab_pairs):
            order = [("limited", lport), ("passthrough", pport)]
            if i % 2:
                order.reverse()
            rps = {}
            for route, port in order:
                proc = lim if route == "limited" else pas
                c0 = cpu_seconds(proc.pid)
                res = oha(f"http://127.0.0.1:{port}/v1/chat/completions", a.ab_slice, a.connections, self.body)
                r = summarize(route, res, cpu_seconds(proc.pid) - c0, None)
                if r["errors"] or r["non_2xx"]:
                    self.fail("route-ab", f"{route}: {r['errors']} errors, statuses {r['statuses']}")
                rps[route] = r["rps"]
                rps[f"{route}_cpu_us_per_req"] = r["cpu_us_per_req"]
            pairs.append(rps)
        lim.check("route-ab")
        pas.check("route-ab")
        ratios = sorted(p["limited"] / p["passthrough"] for p in pairs if p["passthrough"])

        def median(key):
            v = sorted(p[key] for p in pairs if p.get(key) is not None)
            return v[len(v) // 2] if v else None

        self.extra["route_ab"] = {
            "pairs": pairs, "slice_s": a.ab_slice,
            "limited_cpu_us_per_req_median": median("limited_cpu_us_per_req"),
            "passthrough_cpu_us_per_req_median": median("passthrough_cpu_us_per_req"),
            "ratio_median": ratios[len(ratios) // 2] if ratios else None,
            "ratio_min": ratios[0] if ratios else None, "ratio_max": ratios[-1] if ratios else None,
        }
        self.stop("route-ab", lim)
        self.stop("route-ab", pas)

    def s_overload(self) -> None:
        self.overload("overload", self.args.overload_connections)

    def s_overload_paced(self) -> None:
        self.overload("overload-paced", self.args.overload_paced_connections, qps=self.args.overload_rate)

    def overload(self, name: str, connections: int, qps: int | None = None) -> None:
        """6,000 RPM, burst 1, queue 64, no fallback: everything past the queue is a 429.
        Closed loop (qps None): `connections` oha connections back to back, the admitted
        rate under saturation; the latencies are Little's law (connections / throughput).
        Open loop (qps): oha sends `qps` requests a second whatever the answers take
        (--latency-correction: from the time each request was due), with connections to
        spare beside the 64 that sit in the queue; the 429s' latency is then the
        sidecar's cost of a rejection, not the wait behind the other connections."""
        a = self.args
        rate_rpm, queue = 6000, 64
        extra = [*self.body, "--stats-success-breakdown"]
        floor = None
        if qps:
            extra += ["-q", str(qps), "--latency-correction"]
            # The same open-loop load straight to the simulated upstream (200s, no sidecar):
            # what oha measures on this machine for a request that costs next to nothing,
            # its own scheduling and the kernel's included. A rejection cannot look faster.
            psi0, w0 = cpu_pressure_us(), time.perf_counter()
            res = oha(f"http://127.0.0.1:{self.up_port}/v1/chat/completions", a.duration, connections, extra)
            psi1, w1 = cpu_pressure_us(), time.perf_counter()
            floor = summarize(f"{name} floor", res, None, None)
            floor["connections"] = connections
            floor["cpu_pressure_pct"] = None if psi0 is None else (psi1 - psi0) / 1e6 / (w1 - w0) * 100
            if floor["errors"] or floor["non_2xx"]:
                self.fail(name, f"direct to the upstream: {floor['errors']} errors, statuses {floor['statuses']}")
        sc, port, mport = self.sidecar(f"sidecar-{name}", self.up_port, SIDECAR_RATE_RPM=str(rate_rpm),
                                       SIDECAR_BUCKET_CAPACITY="1", SIDECAR_QUEUE_MAX_SIZE=str(queue),
                                       SIDECAR_FALLBACK_ENABLED_PASSTHROUGH="false")
        m0 = prom.scrape(mport)
        mock0 = json.load(urllib.request.urlopen(f"http://127.0.0.1:{self.up_port}/mock/stats", timeout=5))
        # A client of our own beside the flood: every answer timed by status, Retry-After
        # checked. Back to back under the closed-loop flood; under the open-loop one, paced
        # (back to back it would be a second flood of its own, from Python, and load the cores).
        stop, probe = threading.Event(), {}
        raw = clients.request_bytes("POST", "127.0.0.1", port, "/v1/chat/completions", CHAT.encode())
        interval, pconns = (a.probe_interval, a.probe_connections) if qps else (0.0, 1)
        t = threading.Thread(target=clients.probe, args=("127.0.0.1", port, raw, stop, probe, interval, pconns), daemon=True)
        # The upstream's request counter every 100 ms: the admitted rate away from the
        # flood's first and last moments (oha opening its connections, aborting at the end).
        counter: list[tuple[float, int]] = []

        def count_upstream() -> None:
            while not stop.wait(0.1):
                try:
                    st = json.load(urllib.request.urlopen(f"http://127.0.0.1:{self.up_port}/mock/stats", timeout=5))
                    counter.append((time.perf_counter(), st["requests"]))
                except OSError:
                    pass

        c = threading.Thread(target=count_upstream, daemon=True)
        t.start()
        c.start()
        psi0, w0 = cpu_pressure_us(), time.perf_counter()
        try:
            row, res = self.oha_row(name, f"http://127.0.0.1:{port}/v1/chat/completions", sc,
                                    connections, extra, allowed={"200", "429"})
        finally:
            psi1, w1 = cpu_pressure_us(), time.perf_counter()
            stop.set()
            t.join(timeout=30)
            c.join(timeout=10)
        if qps:
            row["paced"] = True
        m1 = prom.scrape(mport)
        mock1 = json.load(urllib.request.urlopen(f"http://127.0.0.1:{self.up_port}/mock/stats", timeout=5))
        codes = row["statuses"]
        pst = probe.get("statuses", {})
        ok = codes.get("200", 0) + pst.get("200", 0)
        elapsed = row["elapsed_s"] or a.duration
        target = rate_rpm / 60
        admitted_rate = ok / elapsed
        nok = res.get("latencyPercentilesNotSuccessful", {})
        steady = None
        if len(counter) >= 4:
            t_first, t_last = counter[0][0], counter[-1][0]
            span = t_last - t_first
            mid = [(tt, n) for tt, n in counter if t_first + span * 0.2 <= tt <= t_last - span * 0.2]
            if len(mid) >= 2 and mid[-1][0] > mid[0][0]:
                steady = (mid[-1][1] - mid[0][1]) / (mid[-1][0] - mid[0][0])

        def ms(v):
            return None if v is None or v != v else v * 1e3

        def delta(outcome):
            return int(prom.total(m1, "sidecar_requests_total", outcome=outcome)
                       - prom.total(m0, "sidecar_requests_total", outcome=outcome))

        # The sidecar's own view of a rejection: a 429 for a full queue is recorded under
        # route="none" (never sent upstream), from the request's arrival, after its head is
        # parsed, to the 429 built, before it is written. The series also holds requests
        # whose client left while they waited in the queue (oha's at the end of the run),
        # which lie above the rejections, so the `rejected` lowest observations are the
        # rejections.
        h = prom.delta(prom.buckets(m1, "sidecar_request_duration_seconds", route="none"),
                       prom.buckets(m0, "sidecar_request_duration_seconds", route="none"))
        rejected = delta("rejected")
        hr = prom.lowest(h, rejected)
        le1, le025 = prom.count_le(hr, 0.001), prom.count_le(hr, 0.00025)
        hist = {
            "series": 'sidecar_request_duration_seconds{route="none"}',
            "count": h[-1][1] if h else 0,
            "rejected": rejected,
            "rejected_ms": {k: ms(prom.histogram_quantile(q, hr)) if rejected else None
                            for k, q in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999))},
            "rejected_le_1ms_pct": le1 / rejected * 100 if rejected and le1 == le1 else None,
            "rejected_le_250us_pct": le025 / rejected * 100 if rejected and le025 == le025 else None,
            "series_ms": {k: ms(prom.histogram_quantile(q, h)) for k, q in (("p50", 0.5), ("p99", 0.99))},
        }
        clients_429 = codes.get("429", 0) + pst.get("429", 0)
        sent = row["requests"] + row["aborted_at_deadline"]
        self.extra[name.replace("-", "_")] = {
            "mode": f"open loop, oha -q {qps} --latency-correction" if qps else "closed loop",
            "offered_per_s": qps,
            "sent_per_s": sent / elapsed if qps else None,
            "rate_rpm": rate_rpm, "bucket_capacity": 1, "queue_max_size": queue,
            "connections": connections, "elapsed_s": elapsed,
            "admitted_200": ok, "target_per_s": target, "admitted_per_s": admitted_rate,
            "admitted_error_pct": (admitted_rate - target) / target * 100,
            "steady_upstream_per_s": steady,
            "steady_error_pct": None if steady is None else (steady - target) / target * 100,
            "rejected_429": clients_429,
            "rejected_per_s": codes.get("429", 0) / elapsed,
            "oha_429_ms": {"p50": ms(nok.get("p50")), "p99": ms(nok.get("p99")), "p99.9": ms(nok.get("p99.9"))},
            "oha_200_ms": {k: ms(v) for k, v in res.get("latencyPercentilesSuccessful", {}).items() if k in ("p50", "p99")},
            "probe": probe,
            "floor": floor,
            "cpu_pressure_pct": None if psi0 is None else (psi1 - psi0) / 1e6 / (w1 - w0) * 100,
            "sidecar_metrics": {"success": delta("success"), "rejected": rejected, "client_gone": delta("client_gone")},
            "sidecar_histogram": hist,
            "upstream_requests": mock1["requests"] - mock0["requests"],
            "upstream_429": mock1["rate_limited"] - mock0["rate_limited"],
            "peak_rss_mib": sc.peak_rss / 1024,
            "cpu_us_per_req": row["cpu_us_per_req"],
        }
        if not codes.get("200"):
            self.fail(name, "no request admitted")
        if not codes.get("429"):
            self.fail(name, f"no 429 with {connections} connections against a queue of {queue}")
        if t.is_alive():
            self.fail(name, "the probe client got no answer 30 s after the flood")
        if probe.get("unanswered_at_end"):
            self.fail(name, f"probe: {probe['unanswered_at_end']} requests without an answer 20 s after the flood "
                            f"(sent {probe['unanswered_waited_s']} s before)")
        if probe.get("errors"):
            self.fail(name, f"probe: {probe['errors']} requests without an answer: {probe['error_samples']}")
        if probe.get("429_without_retry_after"):
            self.fail(name, f"probe: {probe['429_without_retry_after']} 429s without Retry-After")
        odd = {k: v for k, v in pst.items() if k not in ("200", "429")}
        if odd:
            self.fail(name, f"probe: unexpected statuses {odd}")
        # Every 429 a client saw was a rejection the sidecar counted (it may count a few
        # more: answers oha dropped at its deadline).
        if rejected < clients_429:
            self.fail(name, f"the clients got {clients_429} 429s, the sidecar counted {rejected} rejections")
        self.stop(name, sc)

    def s_streaming(self) -> None:
        a = self.args
        mock, up = self.mock("mock-streaming", "--token-delay-ms", "20", "--tokens", "20")
        body = STREAM_CHAT.encode()
        # One stream at a time, one token (x-mock-tokens passes through the proxies): the
        # time to first byte of a lone request, the overhead without a crowd.
        lone = {"x-mock-tokens": "1"}
        out = {"streams": a.streams}

        def measure(target: str, port: int, proc: Proc | None) -> None:
            c0 = cpu_seconds(proc.pid) if proc else None
            with Sampling(proc):
                r = clients.sse_streams("127.0.0.1", port, a.streams, a.duration, body)
            if proc:
                proc.check(f"streaming {target}")
                r["cpu_us_per_stream"] = (cpu_seconds(proc.pid) - c0) / r["streams"] * 1e6 if r["streams"] else None
                r["peak_rss_mib"] = proc.peak_rss / 1024
            out[target] = r
            out[f"{target}-lone"] = clients.sse_streams("127.0.0.1", port, 1, a.lone_s, body, lone)
            mock.check(f"streaming {target}")

        try:
            measure("direct", up, None)
            # nginx under the same burst: what any proxy costs on this machine.
            if shutil.which("nginx"):
                tmp = Path(tempfile.mkdtemp(prefix="sidecar-nginx-"))
                port = free_port()
                nginx = self.start("nginx-streaming", ["nginx", "-c", str(nginx_conf(tmp, port, up, a.workers)), "-p", str(tmp)], port=port)
                measure("nginx", port, nginx)
                self.stop("streaming", nginx)
            sc, port, _ = self.sidecar("sidecar-streaming", up, SIDECAR_MAX_CONNECTIONS=str(a.streams * 4 + 1000))
            measure("sidecar", port, sc)
            self.stop("streaming", sc)
            for k, (d, s) in {"ttfb_overhead_ms": ("direct", "sidecar"), "lone_ttfb_overhead_ms": ("direct-lone", "sidecar-lone"),
                              "ttfb_vs_nginx_ms": ("nginx", "sidecar"), "lone_ttfb_vs_nginx_ms": ("nginx-lone", "sidecar-lone")}.items():
                if d in out and s in out:
                    dt, st = out[d]["ttfb_ms"], out[s]["ttfb_ms"]
                    out[k] = {q: (st[q] - dt[q]) if st[q] is not None and dt[q] is not None else None for q in ("p50", "p99")}
        finally:
            self.extra["streaming"] = out
            mock.stop()
        for side in ("direct", "nginx", "sidecar", "direct-lone", "nginx-lone", "sidecar-lone"):
            r = out.get(side)
            if not r:
                continue
            if r["errors"]:
                self.fail(f"streaming {side}", f"{r['errors']} streams without an answer: {r['error_samples']}")
            odd = {k: v for k, v in r["statuses"].items() if k != "200"}
            if odd:
                self.fail(f"streaming {side}", f"unexpected statuses {odd}")
            if r["without_done"]:
                self.fail(f"streaming {side}", f"{r['without_done']} streams ended without data: [DONE]")
            if not r["streams"]:
                self.fail(f"streaming {side}", "no stream completed")

    def s_dashboard(self) -> None:
        a = self.args
        interval = 1.0
        sc, port, mport = self.sidecar("sidecar-dashboard", self.up_port, SIDECAR_SNAPSHOT_INTERVAL=str(interval),
                                       SIDECAR_MAX_CONNECTIONS=str(a.dashboard_clients * 2 + 1000))
        # The sidecar's CPU with no client, for the same kind of window.
        time.sleep(0.5)
        c0, t0 = cpu_seconds_precise(sc.pid), time.perf_counter()
        time.sleep(a.dashboard_baseline)
        idle_rate = (cpu_seconds_precise(sc.pid) - c0) / (time.perf_counter() - t0)
        marks = {}

        def mark(label: str) -> None:
            marks[label] = {"cpu": cpu_seconds_precise(sc.pid), "t": time.perf_counter(), "m": prom.scrape(mport)}
            sc.sample()

        with Sampling(sc):
            r = clients.dashboard_clients("127.0.0.1", port, a.dashboard_clients, a.duration, mark)
        sc.check("dashboard")
        s, e = marks["start"], marks["end"]
        window = e["t"] - s["t"]
        cpu_rate = (e["cpu"] - s["cpu"]) / window
        ticks = window / interval
        builds = prom.total(e["m"], "sidecar_dashboard_snapshot_builds_total") - prom.total(s["m"], "sidecar_dashboard_snapshot_builds_total")
        n = r["connected"] or 1
        r.update({
            "interval_s": interval,
            "ticks": ticks,
            "snapshot_builds": builds,
            "dashboard_clients_gauge": prom.total(s["m"], "sidecar_dashboard_clients"),
            "cpu_us_per_s": cpu_rate * 1e6,
            "idle_cpu_us_per_s": idle_rate * 1e6,
            "cpu_us_per_client_tick": (cpu_rate - idle_rate) * 1e6 * interval / n,
            "peak_rss_mib": sc.peak_rss / 1024,
        })
        self.extra["dashboard"] = r
        if r["errors"] or r["ended_early"]:
            self.fail("dashboard", f"{r['errors']} errors, {r['ended_early']} streams ended early: {r['error_samples']}")
        odd = {k: v for k, v in r["statuses"].items() if k != "200"}
        if odd:
            self.fail("dashboard", f"unexpected statuses {odd}")
        if r["clients_without_frames"]:
            self.fail("dashboard", f"{r['clients_without_frames']} clients got no frame")
        if builds > ticks + 2:
            self.fail("dashboard", f"{builds:.0f} snapshot builds in {ticks:.1f} ticks (one per tick expected)")
        self.stop("dashboard", sc)

    def s_idle(self) -> None:
        a = self.args
        n = a.idle_connections
        # hyper starts the header read timeout when a keep-alive connection waits for its
        # next request, so the default 10 s also ends idle connections: longer here, for
        # the time it takes to open them all and hold them.
        sc, port, mport = self.sidecar("sidecar-idle", self.up_port, SIDECAR_MAX_CONNECTIONS=str(n + 1000),
                                       SIDECAR_HEADER_READ_TIMEOUT="120")
        time.sleep(0.5)
        base = rss_kib(sc.pid)
        sc.peak_rss = 0
        r = clients.idle_connections("127.0.0.1", port, n, a.idle_hold, sc.sample)
        sc.check("idle")
        r.update({
            "rss_before_mib": base / 1024,
            "peak_rss_mib": sc.peak_rss / 1024,
            "kib_per_connection": (sc.peak_rss - base) / r["opened"] if r["opened"] else None,
        })
        self.extra["idle"] = r
        if r["opened"] < n:
            self.fail("idle", f"{n - r['opened']} of {n} connections not opened or not answered: {r['error_samples']}")
        if r["dropped_while_idle"]:
            self.fail("idle", f"{r['dropped_while_idle']} connections dropped while idle for {a.idle_hold} s: {r['error_samples']}")
        odd = {k: v for k, v in r["statuses"].items() if k != "200"}
        if odd:
            self.fail("idle", f"unexpected statuses {odd}")
        self.stop("idle", sc)

    def s_pacing(self) -> None:
        pacing.run(self, BIN, free_port)

    def s_cluster(self) -> None:
        cluster.run(self, free_port, cpu_seconds_precise)

    def s_soak(self) -> None:
        soak.run(self, self.args.soak_minutes)

    # --- report -------------------------------------------------------------------------

    def report(self) -> str:
        a = self.args
        by = {r["scenario"]: r for r in self.rows}
        direct, nginx = by.get("direct"), by.get("nginx")
        for r in self.rows:
            if r.get("paced") and nginx and not r["scenario"].startswith("overload"):
                ref = by.get(f"nginx @{a.paced_rate}/s")
                if ref and r is not ref and r["cpu_us_per_req"] and ref["cpu_us_per_req"]:
                    r["cpu_vs_nginx"] = r["cpu_us_per_req"] / ref["cpu_us_per_req"]
            if r["scenario"].startswith("overload") or r.get("paced"):
                continue
            if direct and direct["rps"]:
                r["rps_vs_direct"] = r["rps"] / direct["rps"]
            if nginx and nginx["rps"]:
                r["rps_vs_nginx"] = r["rps"] / nginx["rps"]
                if r["cpu_us_per_req"] and nginx["cpu_us_per_req"]:
                    r["cpu_vs_nginx"] = r["cpu_us_per_req"] / nginx["cpu_us_per_req"]
        lim, pas = by.get("sidecar-limited"), by.get("sidecar-passthrough")
        summary = {}
        if lim and pas and pas["rps"]:
            summary["limited_vs_passthrough_rps"] = lim["rps"] / pas["rps"]

        def f(v, fmt="{:.0f}"):
            return "-" if v is None else fmt.format(v)

        def hq(v):
            """A quantile of the sidecar's histogram, in ms: within the first bucket,
            interpolation says nothing more than the bound."""
            return "-" if v is None else "≤ 0.25" if v <= 0.25 else f"{v:.3f}"

        L = [
            f"oha -z {a.duration}s, {a.workers} proxy workers, {os.cpu_count()} cores "
            "(load generator, upstream and proxy share them)",
            "",
            "| scenario | conns | req/s | p50 ms | p99 ms | p99.9 ms | errors | non-2xx | proxy CPU µs/req | peak RSS MiB | req/s vs nginx | CPU vs nginx | req/s vs direct |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            L.append(
                f"| {r['scenario']} | {r['connections']} | {f(r['rps'])} | {f(r['p50_ms'], '{:.2f}')} | {f(r['p99_ms'], '{:.2f}')} | "
                f"{f(r['p999_ms'], '{:.2f}')} | {r['errors']} | {r['non_2xx']} | {f(r['cpu_us_per_req'], '{:.1f}')} | "
                f"{f(r['peak_rss_mib'], '{:.1f}')} | {f(r.get('rps_vs_nginx'), '{:.2f}')} | {f(r.get('cpu_vs_nginx'), '{:.2f}')} | "
                f"{f(r.get('rps_vs_direct'), '{:.2f}')} |"
            )
        if "limited_vs_passthrough_rps" in summary:
            L += ["", f"limited / passthrough req/s: {summary['limited_vs_passthrough_rps']:.3f} from the rows above (target ≥ 0.95)"]
        ab = self.extra.get("route_ab")
        if ab and ab["ratio_median"]:
            summary["limited_vs_passthrough_rps_interleaved"] = ab["ratio_median"]
            L += [f"limited / passthrough req/s, {len(ab['pairs'])} interleaved pairs of {ab['slice_s']} s runs: median "
                  f"{ab['ratio_median']:.3f} (min {ab['ratio_min']:.3f}, max {ab['ratio_max']:.3f}); median proxy CPU µs/req "
                  f"limited {f(ab['limited_cpu_us_per_req_median'], '{:.1f}')}, passthrough {f(ab['passthrough_cpu_us_per_req_median'], '{:.1f}')}"]
        hist = [r for r in self.rows if "sidecar_metrics" in r]
        if hist:
            L += ["", "oha against the sidecar's `sidecar_request_duration_seconds` (histogram_quantile over the run's bucket deltas):", "",
                  "| scenario | oha requests | histogram count | oha p50 ms | histogram p50 ms | oha p99 ms | histogram p99 ms | oha p99.9 ms | histogram p99.9 ms | requests by route/outcome |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
            for r in hist:
                m = r["sidecar_metrics"]
                L.append(f"| {r['scenario']} | {r['requests']} | {m['histogram_count']:.0f} | {r['p50_ms']:.3f} | {m['p50_ms']:.3f} | "
                         f"{r['p99_ms']:.3f} | {m['p99_ms']:.3f} | {r['p999_ms']:.3f} | {m['p999_ms']:.3f} | "
                         f"{', '.join(f'{k} {v}' for k, v in m['requests_by_route_outcome'].items())} |")
        ov = [(k, self.extra[k]) for k in ("overload", "overload_paced") if k in self.extra]
        if ov:
            L += ["", "overload: 6,000 RPM (100/s), burst 1, queue 64, no fallback; the flood from oha plus one probe "
                      "connection of our own back to back beside the closed-loop flood; beside the open-loop one, a probe "
                      f"request every {a.probe_interval * 1e3:g} ms on whichever of {a.probe_connections} connections is free", ""]
            for k, o in ov:
                how = (f"oha -c {o['connections']}, each connection back to back: latency = connections / throughput"
                       if not o["offered_per_s"] else
                       f"oha -q {o['offered_per_s']} --latency-correction -c {o['connections']} "
                       f"({o['offered_per_s'] / o['target_per_s']:.0f}× the rate; 64 connections wait in the queue, the rest "
                       f"answer the 429s), {f(o['sent_per_s'])} requests/s sent")
                psi = f"; CPU pressure {f(o['cpu_pressure_pct'], '{:.0f}%')} of the time"
                if o.get("floor"):
                    psi += f" ({f(o['floor']['cpu_pressure_pct'], '{:.0f}%')} during the floor run)"
                L.append(f"- {k.replace('_', '-')}: {how}{psi}")
            L += ["", "(CPU pressure: the share of the time some runnable task waited for a core, from /proc/pressure/cpu, "
                      "this machine's other work included; the tail latencies follow it)",
                  "", "| scenario | admitted 200s | in s | admitted/s | target/s | error | upstream/s mid-flood | error | upstream requests | upstream 429s | peak RSS MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
            for k, o in ov:
                L.append(f"| {k.replace('_', '-')} | {o['admitted_200']} | {o['elapsed_s']:.2f} | {o['admitted_per_s']:.2f} | {o['target_per_s']:.0f} | "
                         f"{o['admitted_error_pct']:+.2f}% | {f(o['steady_upstream_per_s'], '{:.2f}')} | {f(o['steady_error_pct'], '{:+.2f}%')} | "
                         f"{o['upstream_requests']} | {o['upstream_429']} | {o['peak_rss_mib']:.1f} |")
            L += ["", "The 429s: oha's latency of its not-successful answers, the probe's, and the sidecar's "
                      '`sidecar_request_duration_seconds{route="none"}` (requests never sent upstream): its `rejected` lowest '
                      "observations (above them: clients that left while queued), with histogram_quantile's "
                      "interpolation (buckets 0.25, 0.5, 1 ms, ...) and from arrival to the 429 built, before it is written", "",
                  "| scenario | 429s | 429/s | oha p50 ms | oha p99 ms | oha p99.9 ms | probe 429s | probe p50 ms | probe p99 ms | "
                  "sidecar p50 ms | sidecar p99 ms | sidecar p99.9 ms | sidecar ≤ 0.25 ms | sidecar ≤ 1 ms | proxy CPU µs/req |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for k, o in ov:
                p429 = o["probe"].get("latency_ms", {}).get("429", {})
                hs = o["sidecar_histogram"]
                L.append(f"| {k.replace('_', '-')} | {o['rejected_429']} | {o['rejected_per_s']:.0f} | {f(o['oha_429_ms']['p50'], '{:.3f}')} | "
                         f"{f(o['oha_429_ms']['p99'], '{:.3f}')} | {f(o['oha_429_ms']['p99.9'], '{:.3f}')} | "
                         f"{o['probe'].get('statuses', {}).get('429', 0)} | {f(p429.get('p50'), '{:.3f}')} | {f(p429.get('p99'), '{:.3f}')} | "
                         f"{hq(hs['rejected_ms']['p50'])} | {hq(hs['rejected_ms']['p99'])} | {hq(hs['rejected_ms']['p99.9'])} | "
                         f"{f(hs['rejected_le_250us_pct'], '{:.2f}%')} | {f(hs['rejected_le_1ms_pct'], '{:.2f}%')} | {f(o['cpu_us_per_req'], '{:.1f}')} |")
                fl = o.get("floor")
                if fl:
                    L.append(f"| floor: the same oha load straight to the upstream (200s) | {fl['ok']} | {fl['rps']:.0f} | {fl['p50_ms']:.3f} | "
                             f"{fl['p99_ms']:.3f} | {fl['p999_ms']:.3f} | - | - | - | - | - | - | - | - | - |")
        s = self.extra.get("streaming")
        if s and "direct" in s:
            L += ["", f"streaming: {s['streams']} SSE completions started at once, round after round for {a.duration} s "
                      "(mock: 20 tokens 20 ms apart), and one lone stream at a time for "
                      f"{a.lone_s} s (1 token); TTFB = request sent to the kernel's receive time of the first `data:` line", "",
                  "| target | streams at once | rounds | streams | errors | without [DONE] | TTFB p50 ms | TTFB p99 ms | total p50 ms | total p99 ms | proxy CPU µs/stream | peak RSS MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for side in ("direct", "nginx", "sidecar", "direct-lone", "nginx-lone", "sidecar-lone"):
                r = s.get(side)
                if r:
                    L.append(f"| {side} | {r['connections']} | {r['rounds']} | {r['streams']} | {r['errors']} | {r['without_done']} | "
                             f"{f(r['ttfb_ms']['p50'], '{:.2f}')} | {f(r['ttfb_ms']['p99'], '{:.2f}')} | "
                             f"{f(r['total_ms']['p50'], '{:.1f}')} | {f(r['total_ms']['p99'], '{:.1f}')} | "
                             f"{f(r.get('cpu_us_per_stream'), '{:.0f}')} | {f(r.get('peak_rss_mib'), '{:.1f}')} |")
            L.append("")
            for k, label in (("ttfb_overhead_ms", f"{s['streams']} at once, vs direct"), ("lone_ttfb_overhead_ms", "lone stream, vs direct"),
                             ("ttfb_vs_nginx_ms", f"{s['streams']} at once, vs nginx"), ("lone_ttfb_vs_nginx_ms", "lone stream, vs nginx")):
                if k in s:
                    over = s[k]
                    target = " (target < 1 ms)" if label.endswith("direct") else ""
                    L.append(f"- sidecar TTFB, {label}: p50 {f(over['p50'], '{:+.2f}')} ms, p99 {f(over['p99'], '{:+.2f}')} ms{target}")
        d = self.extra.get("dashboard")
        if d:
            fr = d["frames_in_window"]
            L += ["", f"dashboard: {d['clients']} SSE clients for {d['window_s']:.1f} s, one snapshot every {d['interval_s']} s", "",
                  "| clients connected | gauge | ticks | snapshot builds | frames/client min/median/max | without frames | sidecar CPU µs/s | idle CPU µs/s | µs per client per tick | peak RSS MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|",
                  f"| {d['connected']} | {d['dashboard_clients_gauge']:.0f} | {d['ticks']:.1f} | {d['snapshot_builds']:.0f} | "
                  f"{fr['min']}/{fr['median']:.0f}/{fr['max']} | {d['clients_without_frames']} | {d['cpu_us_per_s']:.0f} | "
                  f"{d['idle_cpu_us_per_s']:.0f} | {d['cpu_us_per_client_tick']:.2f} | {d['peak_rss_mib']:.1f} |"]
        i = self.extra.get("idle")
        if i:
            L += ["", f"idle: {i['connections']} keep-alive connections, one GET /healthz each, then idle for {i['held_s']} s "
                      "(SIDECAR_HEADER_READ_TIMEOUT=120: hyper's header timer also ends idle keep-alive connections, 10 s by default)", "",
                  "| opened | alive after idling | RSS before MiB | peak RSS MiB | KiB per connection | target |",
                  "|---|---|---|---|---|---|",
                  f"| {i['opened']} | {i['alive_after_hold']} | {i['rss_before_mib']:.1f} | {i['peak_rss_mib']:.1f} | "
                  f"{f(i['kib_per_connection'], '{:.1f}')} | < 64 MiB |"]
        if "pacing" in self.extra:
            L += pacing.report(self.extra["pacing"])
        if "cluster" in self.extra:
            L += cluster.report(self.extra["cluster"])
        if "soak" in self.extra:
            L += soak.report(self.extra["soak"])
        targets = []
        r = summary.get("limited_vs_passthrough_rps_interleaved", summary.get("limited_vs_passthrough_rps"))
        if r is not None:
            targets.append(f"limited/passthrough req/s ≥ 0.95: {r:.3f} {'met' if r >= 0.95 else 'NOT met'}")
        if s and "lone_ttfb_overhead_ms" in s and s["lone_ttfb_overhead_ms"]["p50"] is not None:
            v, w = s["lone_ttfb_overhead_ms"]["p50"], s.get("ttfb_overhead_ms", {}).get("p50")
            targets.append(f"TTFB overhead < 1 ms (p50): lone stream {v:+.2f} ms {'met' if v < 1 else 'NOT met'}; "
                           f"{s['streams']} at once {f(w, '{:+.2f}')} ms {'met' if w is not None and w < 1 else 'NOT met'}")
        if i:
            v = i["peak_rss_mib"]
            targets.append(f"RSS with {i['opened']} idle connections < 64 MiB: {v:.1f} MiB {'met' if v < 64 else 'NOT met'}"
                           + ("" if i["opened"] >= 10000 else f" (10,000 would be about {i['rss_before_mib'] + (i['kib_per_connection'] or 0) * 10000 / 1024:.0f} MiB)"))
        if d:
            targets.append(f"snapshot builds = ticks: {d['snapshot_builds']:.0f} builds in {d['ticks']:.1f} ticks for {d['connected']} clients")
        for k, o in ov:
            targets.append(f"admitted rate at 6,000 RPM, {k.replace('_', '-')}: {o['admitted_per_s']:.1f}/s ({o['admitted_error_pct']:+.1f}%)")
        op = self.extra.get("overload_paced")
        if op:
            v, hs = op["oha_429_ms"]["p99"], op["sidecar_histogram"]
            targets.append(f"rejections < 1 ms p99 (open loop, oha -q {op['offered_per_s']}): {f(v, '{:.3f}')} ms "
                           f"{'met' if v is not None and v < 1 else 'NOT met'} (oha's floor, the same load straight to the upstream: "
                           f"p99 {f(op['floor'] and op['floor']['p99_ms'], '{:.3f}')} ms); the sidecar's own: p99 "
                           f"{hq(hs['rejected_ms']['p99'])} ms, {f(hs['rejected_le_1ms_pct'], '{:.2f}%')} ≤ 1 ms")
        if targets:
            L += ["", "Targets:", *[f"- {t}" for t in targets]]
        if self.failures:
            L += ["", "FAILURES:", *[f"- {x}" for x in self.failures]]
        meta = {"duration_s": a.duration, "connections": a.connections, "workers": a.workers, "short": a.short,
                "cores": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (self.out / "results.json").write_text(json.dumps(
            {"meta": meta, "results": self.rows, **self.extra, "summary": summary, "failures": self.failures}, indent=2))
        table = "\n".join(L)
        (self.out / "results.md").write_text(table + "\n")
        return table


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < need:
        print(f"warning: the open-file limit is {soft}, below the {need} the scenarios need", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--overload-connections", type=int, default=256, help="oha connections of the flood (more than the queue)")
    ap.add_argument("--overload-rate", type=int, default=2000,
                    help="req/s of overload-paced, oha's open loop (20x the sidecar's 100/s, well under its saturation)")
    ap.add_argument("--overload-paced-connections", type=int, default=128,
                    help="oha connections of overload-paced: 64 wait in the queue, the rest answer the 429s")
    ap.add_argument("--probe-interval", type=float, default=0.01, help="seconds between the probe's requests in overload-paced")
    ap.add_argument("--probe-connections", type=int, default=16,
                    help="connections the paced probe spreads its requests over (an admitted one holds its connection in the queue)")
    ap.add_argument("--paced-rate", type=int, default=1000, help="req/s of the paced run beside sidecar-limited (0: none)")
    ap.add_argument("--streams", type=int)
    ap.add_argument("--dashboard-clients", type=int)
    ap.add_argument("--idle-connections", type=int)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--short", action="store_true", help="CI form: 3 s per scenario, smaller counts")
    ap.add_argument("--pacing-realtime", action="store_true",
                    help="pacing: also run situation 1 in real time (600 RPM, 60 s window, 3 minutes)")
    ap.add_argument("--pacing-situations", help="pacing: comma-separated subset of its situations (1,2-bare,2-openai,3,4,5,1-realtime)")
    ap.add_argument("--pacing-serial", action="store_true", help="pacing: one situation after the other instead of side by side")
    ap.add_argument("--cluster-repeats", type=int, default=1,
                    help="cluster: alternated single/cluster pairs per budget (the CPU ratio is their median)")
    ap.add_argument("--cluster-rates", default="6000,60000",
                    help="cluster: comma-separated budgets in RPM, each run single then cluster")
    ap.add_argument("--soak-minutes", type=float,
                    help="soak: minutes of load (default 30, 1 under --short); given, the full form runs the soak too")
    ap.add_argument("--soak-seed", type=int, default=16, help="soak: seed of the clients' random choices")
    ap.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--no-build", action="store_true", help="use target/release/nvidia-sidecar as it is")
    ap.add_argument("--bin", help="the sidecar binary (default target/release/nvidia-sidecar; implies --no-build)")
    ap.add_argument("--out", default=str(ROOT / "target" / "loadtest"))
    args = ap.parse_args()
    global BIN
    if args.bin:
        BIN = Path(args.bin).resolve()
        args.no_build = True
    if args.short:
        args.duration = 3.0
    small = args.short
    args.streams = args.streams or (100 if small else 500)
    args.dashboard_clients = args.dashboard_clients or (200 if small else 1000)
    args.idle_connections = args.idle_connections or (2000 if small else 10000)
    args.idle_hold = 2.0 if small else 5.0
    args.dashboard_baseline = 1.0 if small else 3.0
    args.lone_s = 1.0 if small else 3.0
    only_given = args.only != ",".join(SCENARIOS)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    if args.short and not only_given:
        args.only = [s for s in args.only if s not in SHORT_SKIPS]
    if not args.short and not only_given and args.soak_minutes is None:
        args.only = [s for s in args.only if s not in FULL_SKIPS]
    if args.soak_minutes is None:
        args.soak_minutes = 1.0 if args.short else 30.0
    args.ab_pairs = 2 if small else 6
    args.ab_slice = 1.0 if small else 2.0
    args.cluster_rates = [int(float(r)) for r in args.cluster_rates.split(",") if r.strip()]
    args.pacing_situations = [s.strip() for s in args.pacing_situations.split(",") if s.strip()] if args.pacing_situations else None
    unknown = [s for s in args.only if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenarios {unknown}")
    raise_fd_limit(max(args.idle_connections, args.dashboard_clients, args.streams * 2) + 1000)

    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    started = time.time()
    lt = LoadTest(args)
    try:
        lt.run()
    finally:
        for p in lt.procs:
            p.stop()
    print(lt.report())
    print(f"\n{time.time() - started:.0f} s; results in {lt.out}", file=sys.stderr)
    if lt.failures:
        print(f"FAILED: {len(lt.failures)} checks (see FAILURES above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
