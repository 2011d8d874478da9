#!/usr/bin/env python3
"""Load test: the sidecar against direct calls and nginx, on the same simulated upstream.

Every scenario runs oha for a fixed duration and connection count. For each: requests/s,
latency percentiles, errors, proxy CPU microseconds per request (utime+stime from /proc,
summed over the proxy's processes) and peak RSS. Results are written as JSON and printed
as a markdown table with ratios against nginx and against direct.

Usage: loadtest/run.py [--duration 10] [--connections 64] [--short] [--out target/loadtest]
--short is the CI form: a few seconds per scenario, failing only on errors or crashes,
never on timing.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "nvidia-sidecar"
CLK_TCK = os.sysconf("SC_CLK_TCK")
CHAT = '{"model":"meta/llama-3.1-8b-instruct","messages":[{"role":"user","content":"hi"}]}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
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
    total = 0
    for p in proc_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError):
            pass
    return total / CLK_TCK


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
    # oha stops a -z run by aborting the requests still in flight: not proxy errors.
    errors = sum(v for k, v in res.get("errorDistribution", {}).items() if k != "aborted due to deadline")
    return {
        "scenario": name,
        "requests": total,
        "ok": ok,
        "non_2xx": total - ok,
        "errors": errors,
        "rps": summary.get("requestsPerSec", 0.0),
        "p50_ms": (pct.get("p50") or 0) * 1e3,
        "p99_ms": (pct.get("p99") or 0) * 1e3,
        "p999_ms": (pct.get("p99.9") or 0) * 1e3,
        "cpu_us_per_req": (cpu / total * 1e6) if cpu is not None and total else None,
        "peak_rss_mib": (rss / 1024) if rss else None,
    }


class Proc:
    def __init__(self, cmd: list[str], env: dict | None = None, port: int | None = None):
        self.p = subprocess.Popen(
            cmd, env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if port:
            wait_port(port)
        self.peak_rss = 0

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, rss_kib(self.p.pid))

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()


def measure(name: str, url: str, proc: Proc | None, args, extra: list[str]) -> dict:
    before = cpu_seconds(proc.p.pid) if proc else None
    if proc:
        proc.sample()
    res = oha(url, args.duration, args.connections, extra)
    cpu = cpu_seconds(proc.p.pid) - before if proc else None
    if proc:
        proc.sample()
        if not proc.alive():
            raise RuntimeError(f"{name}: the proxy crashed")
    return summarize(name, res, cpu, proc.peak_rss if proc else None)


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
      proxy_set_header Authorization "Bearer nvapi-loadtest-key";
      proxy_buffering off;
      client_max_body_size 16m;
    }}
  }}
}}
""")
    return conf


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--short", action="store_true", help="CI form: 3 s per scenario")
    ap.add_argument("--out", default=str(ROOT / "target" / "loadtest"))
    args = ap.parse_args()
    if args.short:
        args.duration = 3.0

    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, procs = [], []
    body = ["-m", "POST", "-H", "content-type: application/json", "-d", CHAT]
    try:
        up_port = free_port()
        mock = Proc([str(BIN), "mock-upstream", "--listen", f"127.0.0.1:{up_port}", "--rpm", "0",
                     "--workers", str(args.workers), "--token-delay-ms", "0"], port=up_port)
        procs.append(mock)
        results.append(measure("direct", f"http://127.0.0.1:{up_port}/v1/chat/completions", None, args, body))

        if shutil.which("nginx"):
            tmp = Path(tempfile.mkdtemp(prefix="sidecar-nginx-"))
            ng_port = free_port()
            nginx = Proc(["nginx", "-c", str(nginx_conf(tmp, ng_port, up_port, args.workers)), "-p", str(tmp)], port=ng_port)
            procs.append(nginx)
            results.append(measure("nginx", f"http://127.0.0.1:{ng_port}/v1/chat/completions", nginx, args, body))
            nginx.stop()
        else:
            print("nginx not installed: skipping the reference proxy", file=sys.stderr)

        sc_port = free_port()
        sidecar = Proc([str(BIN)], env={
            "SIDECAR_UPSTREAM_URL": f"http://127.0.0.1:{up_port}/v1",
            "SIDECAR_UPSTREAM_API_KEY": "nvapi-loadtest-key",
            "SIDECAR_LISTEN_PORT": str(sc_port),
            "SIDECAR_METRICS_PORT": str(free_port()),
            "SIDECAR_WORKERS": str(args.workers),
            # A rate and burst that never bind: this scenario measures forwarding.
            "SIDECAR_RATE_RPM": "6000000",
            "SIDECAR_BUCKET_CAPACITY": "100000",
            "SIDECAR_LOG_LEVEL": "warn",
        }, port=sc_port)
        procs.append(sidecar)
        results.append(measure("sidecar", f"http://127.0.0.1:{sc_port}/v1/chat/completions", sidecar, args, body))
        sidecar.stop()
    finally:
        for p in procs:
            p.stop()

    by = {r["scenario"]: r for r in results}
    for r in results:
        r["rps_vs_direct"] = r["rps"] / by["direct"]["rps"] if by["direct"]["rps"] else None
        if "nginx" in by and by["nginx"]["rps"]:
            r["rps_vs_nginx"] = r["rps"] / by["nginx"]["rps"]
            if r["cpu_us_per_req"] and by["nginx"]["cpu_us_per_req"]:
                r["cpu_vs_nginx"] = r["cpu_us_per_req"] / by["nginx"]["cpu_us_per_req"]
    meta = {"duration_s": args.duration, "connections": args.connections, "workers": args.workers,
            "cores": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))

    def f(v, fmt="{:.0f}"):
        return "-" if v is None else fmt.format(v)

    lines = [
        f"oha -z {args.duration}s -c {args.connections}, {args.workers} proxy workers, {os.cpu_count()} cores (load generator, upstream and proxy share them)",
        "",
        "| scenario | req/s | p50 ms | p99 ms | p99.9 ms | errors | non-2xx | proxy CPU µs/req | peak RSS MiB | req/s vs nginx | CPU vs nginx | req/s vs direct |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['scenario']} | {f(r['rps'])} | {f(r['p50_ms'], '{:.2f}')} | {f(r['p99_ms'], '{:.2f}')} | "
            f"{f(r['p999_ms'], '{:.2f}')} | {r['errors']} | {r['non_2xx']} | {f(r['cpu_us_per_req'], '{:.1f}')} | "
            f"{f(r['peak_rss_mib'], '{:.1f}')} | {f(r.get('rps_vs_nginx'), '{:.2f}')} | {f(r.get('cpu_vs_nginx'), '{:.2f}')} | "
            f"{f(r.get('rps_vs_direct'), '{:.2f}')} |"
        )
    table = "\n".join(lines)
    (out_dir / "results.md").write_text(table + "\n")
    print(table)

    failed = [r["scenario"] for r in results if r["errors"] or r["non_2xx"] or not r["requests"]]
    if failed:
        print(f"FAILED: errors or lost requests in {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
