"""The `cluster` scenario: one provider budget shared by 3 replicas through Redis (issue 14).

A redis-server of our own (free port, `--save "" --appendonly no`, stopped at the end)
and, per budget (--cluster-rates, 6,000 then 60,000 RPM by default), two runs one after
the other on the simulated upstream the other scenarios use (`mock-upstream --rpm 0`,
which never refuses, so the proxies' CPU is what is measured):

  single   one sidecar alone (no Redis) at SIDECAR_RATE_RPM = the budget
  cluster  3 sidecars, each with SIDECAR_RATE_RPM = the budget (the cluster's) and
           SIDECAR_REDIS_URL set: they lease tokens from Redis in batches sized to the rate

Every sidecar: 1 worker, bucket capacity 1, a queue of 1 s at its part of the budget (at
least 64), request timeout 2 s, no fallback. The flood is the same for both runs: 3 oha
processes started together, -q open loop at 2x the budget in all (a third each), for the
scenario's duration, with connections for 1 s of their rate (+64); in the cluster run each
oha drives its own replica, in the single run all three drive the one sidecar. Requests
past the budget end as the sidecar's 429s (queue_full / queue_beyond_deadline), or 504s
(queue_timeout at the deadline). The cluster run waits until every replica counts 3
live replicas and its backend up before the flood.

Measured per run: admitted 200s per second against the budget; the requests the upstream
received, and its counter every 100 ms (the rate mid-flood, the most in any second); Redis
round trips (`sidecar_budget_round_trips_total` deltas: every replica's script calls,
heartbeats included; Redis's own count of script calls from INFO commandstats beside it)
per admitted request; leases by result; proxy CPU (schedstat of every thread of the
sidecars) per admitted request, cluster against single, with redis-server's own CPU
apart. Each cluster run has its own key prefix (SIDECAR_REDIS_PREFIX): no budget record
carries over from one run to the next.

The shared bucket's burst is larger than a lone sidecar's: one full lease, 1% of the
window's limit (60 at 6,000 RPM, 600 at 60,000; budget.lua's burst()), so in a run of T
seconds the cluster may admit the rate times T plus that burst; a lone sidecar the rate
times T plus its capacity (1). Over longer spans the window guard binds (the provider
window, 60 s), which runs of a few seconds never reach.

Failures (cluster runs): beyond the burst, an admitted rate more than 2% above the budget;
an admitted rate below 90% of the budget (or of the requests answered, when the load
generator could not offer the budget: the cores are shared); more than 0.1 Redis round
trips per admitted request (every rate here is 6,000 RPM or more); a replica that died,
never joined (`sidecar_cluster_replicas` below 3 or `sidecar_budget_backend_up` 0 at the end
of the flood) or lacks the budget's metrics; requests without an answer or statuses other
than 200, 429 and 504. No redis-server: the scenario fails, saying how to install it.
"""

import json
import math
import shutil
import statistics
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import prom

REPLICAS = 3
PROVIDER = "nvidia"
QUEUE_S = 1.0  # each sidecar's queue: this long at its part of the budget (at least 64)
REQUEST_TIMEOUT = 2.0
OFFERED_FACTOR = 2.0
WINDOW_S = 60.0  # the provider window (SIDECAR_PROVIDER_WINDOW's default)
RT_MAX = 0.1  # Redis round trips per admitted request, at 6,000 RPM and above
# Each flood lasts at least this long, also in the short (CI) form: the first leases of a
# flood (each replica starts with an empty pot) cost a few round trips that a 3 s run
# cannot amortise (0.100 measured there against 0.082-0.093 over 10 s).
MIN_RUN_S = 6.0


def run_seconds(a) -> float:
    return max(a.duration, MIN_RUN_S)
OVER_MAX = 0.02  # admitted above the budget, beyond the bucket's burst
UNDER_MAX = 0.10  # admitted below the budget
ALLOWED = {"200", "429", "504"}
DEADLINE = "aborted due to deadline"
JOIN_TIMEOUT = 15.0


def queue_size(per_s: float) -> int:
    """A sidecar's queue at `per_s` requests a second: QUEUE_S of them, at least 64."""
    return max(64, math.ceil(per_s * QUEUE_S))


def oha_connections(per_oha_qps: float) -> int:
    """Enough for an open loop: a queued request holds its connection for up to about
    QUEUE_S, a rejected one next to nothing."""
    return math.ceil(per_oha_qps * QUEUE_S) + 64


def cluster_burst(rpm: int, capacity: int = 1) -> int:
    """The shared bucket's burst, as budget.lua's burst(): the bucket capacity or one full
    lease (1% of the window's limit), whichever is larger."""
    limit = max(1, math.floor(rpm * WINDOW_S / 60 + 1e-9))
    return max(capacity, limit // 100, 1)


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def redis_script_calls(port: int) -> int | None:
    """Script calls Redis executed (EVAL, EVALSHA, FCALL and their _RO forms), from INFO
    commandstats; None without redis-cli."""
    cli = shutil.which("redis-cli")
    if not cli:
        return None
    try:
        out = subprocess.run([cli, "-h", "127.0.0.1", "-p", str(port), "INFO", "commandstats"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    n = 0
    for line in out.splitlines():
        name, _, rest = line.strip().partition(":")
        if name in ("cmdstat_eval", "cmdstat_evalsha", "cmdstat_eval_ro", "cmdstat_evalsha_ro",
                    "cmdstat_fcall", "cmdstat_fcall_ro"):
            fields = dict(kv.split("=", 1) for kv in rest.split(",") if "=" in kv)
            n += int(fields.get("calls", 0))
    return n


def oha_flood(urls: list[str], per_oha_qps: float, duration: float, connections: int, body: list[str]) -> list[dict]:
    """One oha per url, started together, each open loop at `per_oha_qps`; their JSON."""
    exe = shutil.which("oha") or str(Path.home() / ".cargo/bin/oha")
    procs = [subprocess.Popen([exe, "-z", f"{duration}s", "-c", str(connections), "-q", f"{per_oha_qps:g}", "--no-tui",
                               "--output-format", "json", *body, url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for url in urls]
    out, bad = [], []
    for p in procs:
        so, se = p.communicate()
        if p.returncode != 0:
            bad.append(f"oha exited with {p.returncode}: {se.strip()[-500:]}")
        else:
            out.append(json.loads(so))
    if bad:
        raise RuntimeError("; ".join(bad))
    return out


def upstream_timeline(samples: list[tuple[float, int]], t0: float, budget: float) -> dict:
    """The upstream's request counter sampled every 100 ms during the flood: its rate away
    from the flood's first and last moments (the middle 60%), the most requests between
    two samples at most 1 s apart, and the count in each whole second from the start."""
    out = {"steady_per_s": None, "steady_vs_budget": None, "max_in_1s": None, "per_second": []}
    if len(samples) < 4:
        return out
    t_first, t_last = samples[0][0], samples[-1][0]
    span = t_last - t_first
    mid = [(t, n) for t, n in samples if t_first + span * 0.2 <= t <= t_last - span * 0.2]
    if len(mid) >= 2 and mid[-1][0] > mid[0][0]:
        out["steady_per_s"] = (mid[-1][1] - mid[0][1]) / (mid[-1][0] - mid[0][0])
        out["steady_vs_budget"] = out["steady_per_s"] / budget
    best, j = 0, 0
    for i, (ti, ni) in enumerate(samples):
        j = max(j, i)
        while j + 1 < len(samples) and samples[j + 1][0] - ti <= 1.0 + 1e-6:
            j += 1
        best = max(best, samples[j][1] - ni)
    out["max_in_1s"] = best
    sec, last = 1, samples[0][1]
    for t, n in samples:
        if t - t0 >= sec:
            out["per_second"].append(n - last)
            last, sec = n, sec + 1
    return out


def budget_view(m: prom.Samples) -> dict:
    """A replica's shared-budget series (None where absent)."""

    def one(name: str, **match: str) -> float | None:
        hits = [v for (n, labels), v in m.items() if n == name and all(dict(labels).get(k) == w for k, w in match.items())]
        return sum(hits) if hits else None

    leases = {}
    for (n, labels), v in m.items():
        d = dict(labels)
        if n == "sidecar_budget_leases_total" and d.get("provider") == PROVIDER:
            leases[d.get("result", "?")] = v
    return {
        "round_trips": one("sidecar_budget_round_trips_total", provider=PROVIDER),
        "tokens_leased": one("sidecar_budget_admitted_total", provider=PROVIDER),
        "leases": leases,
        "backend_up": one("sidecar_budget_backend_up", provider=PROVIDER),
        "replicas": one("sidecar_cluster_replicas", provider=PROVIDER),
        "mode_shared": one("sidecar_cluster_mode", provider=PROVIDER, mode="shared"),
    }


def _d(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _per(x: float | None, n: float, scale: float = 1.0) -> float | None:
    return None if x is None or not n else x / n * scale


class Cluster:
    def __init__(self, lt, free_port, cpu):
        self.lt, self.free_port, self.cpu = lt, free_port, cpu
        self.a = lt.args
        self.redis = None
        self.redis_port = None

    def fail(self, label: str, msg: str) -> None:
        self.lt.fail(f"cluster {label}", msg)

    def env(self, rpm: int, sidecars: int) -> dict[str, str]:
        return {
            "SIDECAR_RATE_RPM": str(rpm),
            "SIDECAR_BUCKET_CAPACITY": "1",
            "SIDECAR_WORKERS": "1",
            "SIDECAR_QUEUE_MAX_SIZE": str(queue_size(rpm / 60 / sidecars)),
            "SIDECAR_REQUEST_TIMEOUT": f"{REQUEST_TIMEOUT:g}",
            "SIDECAR_FALLBACK_ENABLED_PASSTHROUGH": "false",
        }

    def start_redis(self) -> bool:
        exe = shutil.which("redis-server")
        if not exe:
            self.lt.fail("cluster", "redis-server is not installed: install it (Debian: apt-get install redis-server; "
                                    ".ci/run and loadtest/run.sh install it when run as root)")
            return False
        self.redis_port = self.free_port()
        self.redis = self.lt.start("redis-server", [exe, "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                                    "--save", "", "--appendonly", "no", "--protected-mode", "no",
                                                    "--daemonize", "no"], port=self.redis_port)
        return True

    def wait_joined(self, label: str, mports: list[int]) -> float:
        """Until every replica counts them all and its backend up: the seconds it took."""
        t0 = time.perf_counter()
        views = []
        while time.perf_counter() - t0 < JOIN_TIMEOUT:
            views = [budget_view(prom.scrape(p)) for p in mports]
            if all(v["replicas"] == REPLICAS and v["backend_up"] == 1 for v in views):
                return time.perf_counter() - t0
            time.sleep(0.1)
        if any(v["round_trips"] is None for v in views):
            self.fail(label, "no sidecar_budget_round_trips_total{provider=\"nvidia\"} in /metrics: the shared budget's "
                             "metrics are missing (or SIDECAR_REDIS_URL was not taken)")
        else:
            self.fail(label, f"the replicas did not all join within {JOIN_TIMEOUT:g} s: "
                             f"{[(v['replicas'], v['backend_up']) for v in views]} (replicas seen, backend up)")
        return time.perf_counter() - t0

    def measure(self, label: str, mode: str, rpm: int, procs: list, mports: list[int], urls: list[str]) -> dict:
        a, lt = self.a, self.lt
        budget = rpm / 60
        offered = budget * OFFERED_FACTOR
        per_oha = offered / len(urls)
        conns = oha_connections(per_oha)
        up = lt.up_port
        cluster = mode == "cluster"
        m0 = [prom.scrape(p) for p in mports]
        st0 = _get_json(f"http://127.0.0.1:{up}/mock/stats")
        rc0 = redis_script_calls(self.redis_port) if cluster else None
        rcpu0 = self.cpu(self.redis.pid) if cluster else None
        stop, counter = threading.Event(), []

        def count_upstream() -> None:
            while True:
                try:
                    counter.append((time.perf_counter(), _get_json(f"http://127.0.0.1:{up}/mock/stats")["requests"]))
                except OSError:
                    pass
                if stop.wait(0.1):
                    return

        sampler = threading.Thread(target=count_upstream, daemon=True)
        c0 = [self.cpu(p.pid) for p in procs]
        t0 = time.perf_counter()
        sampler.start()
        try:
            res = oha_flood(urls, per_oha, run_seconds(a), conns, lt.body)
        finally:
            wall = time.perf_counter() - t0
            c1 = [self.cpu(p.pid) for p in procs]
            stop.set()
            sampler.join(timeout=10)
        rcpu1 = self.cpu(self.redis.pid) if cluster else None
        rc1 = redis_script_calls(self.redis_port) if cluster else None
        m1 = [prom.scrape(p) for p in mports]
        time.sleep(0.3)  # sends granted at the very end reach the upstream
        st1 = _get_json(f"http://127.0.0.1:{up}/mock/stats")
        for p in procs:
            if not p.alive():
                self.fail(label, f"{p.name} died (exit {p.p.returncode}); log: {p.log}\n{p.tail()}")

        statuses: dict[str, int] = {}
        errors: dict[str, int] = {}
        aborted, elapsed, oks = 0, 0.0, []
        for r in res:
            codes = r.get("statusCodeDistribution", {})
            for k, v in codes.items():
                statuses[k] = statuses.get(k, 0) + v
            for k, v in r.get("errorDistribution", {}).items():
                if k == DEADLINE:
                    aborted += v
                else:
                    errors[k] = errors.get(k, 0) + v
            elapsed = max(elapsed, r.get("summary", {}).get("total", 0.0))
            oks.append(codes.get("200", 0))
        elapsed = elapsed or run_seconds(a)
        ok = statuses.get("200", 0)
        answered = sum(statuses.values())
        burst = cluster_burst(rpm) if cluster else 1
        cpu = sum(x1 - x0 for x0, x1 in zip(c0, c1))
        replicas = []
        for i, (x0, x1, v0, v1) in enumerate(zip(c0, c1, m0, m1)):
            b0, b1 = budget_view(v0), budget_view(v1)
            own = oks[i] if cluster else ok
            rt = _d(b1["round_trips"], b0["round_trips"])
            replicas.append({
                "name": procs[i].name,
                "admitted_200": own,
                "admitted_per_s": own / elapsed,
                "upstream_success": prom.total(v1, "sidecar_requests_total", outcome="success")
                - prom.total(v0, "sidecar_requests_total", outcome="success"),
                "round_trips": rt,
                "round_trips_per_admitted": _per(rt, own),
                "tokens_leased": _d(b1["tokens_leased"], b0["tokens_leased"]),
                "leases": {k: v - b0["leases"].get(k, 0.0) for k, v in b1["leases"].items()},
                "backend_up": b1["backend_up"],
                "replicas_seen": b1["replicas"],
                "mode_shared": b1["mode_shared"],
                "cpu_s": x1 - x0,
                "cpu_us_per_admitted": _per(x1 - x0, own, 1e6),
            })
        rts = [r["round_trips"] for r in replicas]
        round_trips = sum(rts) if cluster and all(x is not None for x in rts) else None
        leases: dict[str, float] = {}
        for r in replicas:
            for k, v in r["leases"].items():
                leases[k] = leases.get(k, 0.0) + v
        calls = _d(rc1, rc0)
        out = {
            "label": label, "mode": mode, "rate_rpm": rpm, "replicas": len(procs),
            "budget_per_s": budget, "offered_per_s": offered, "oha": len(urls), "connections_per_oha": conns,
            "queue_per_sidecar": queue_size(budget / len(procs)), "burst": burst,
            "duration_s": run_seconds(a), "elapsed_s": elapsed, "wall_s": wall,
            "statuses": statuses, "errors": errors, "aborted_at_deadline": aborted,
            "answered": answered, "sent_per_s": (answered + aborted) / elapsed,
            "admitted_200": ok, "admitted_per_s": ok / elapsed, "admitted_vs_budget": ok / elapsed / budget,
            "beyond_burst_vs_budget": max(0, ok - burst) / elapsed / budget,
            "upstream_requests": st1["requests"] - st0["requests"],
            "upstream_429": st1["rate_limited"] - st0["rate_limited"],
            "upstream_timeline": upstream_timeline(counter, t0, budget),
            "round_trips": round_trips,
            "round_trips_per_admitted": _per(round_trips, ok),
            "redis_script_calls": calls,
            "redis_script_calls_per_admitted": _per(calls, ok),
            "leases": leases,
            "tokens_leased": sum(r["tokens_leased"] or 0 for r in replicas) if cluster else None,
            "cpu_s": cpu,
            "cpu_us_per_admitted": _per(cpu, ok, 1e6),
            "cpu_us_per_answered": _per(cpu, answered, 1e6),
            "redis_cpu_s": _d(rcpu1, rcpu0),
            "redis_cpu_us_per_admitted": _per(_d(rcpu1, rcpu0), ok, 1e6),
            "per_replica": replicas,
        }
        self.judge(out)
        return out

    def judge(self, r: dict) -> None:
        label = r["label"]
        if r["errors"]:
            self.fail(label, f"{sum(r['errors'].values())} requests without an answer: {r['errors']}")
        odd = {k: v for k, v in r["statuses"].items() if k not in ALLOWED}
        if odd:
            self.fail(label, f"unexpected statuses {odd} (only {sorted(ALLOWED)} expected)")
        if not r["admitted_200"]:
            self.fail(label, "no request admitted")
        if r["mode"] != "cluster":
            return
        over = r["beyond_burst_vs_budget"]
        if over > 1 + OVER_MAX:
            self.fail(label, f"admitted {r['admitted_200']} in {r['elapsed_s']:.2f} s: beyond the bucket's burst of "
                             f"{r['burst']}, {(over - 1) * 100:+.1f}% over the budget of {r['budget_per_s']:g}/s "
                             f"(at most +{OVER_MAX * 100:g}%)")
        floor = (1 - UNDER_MAX) * min(r["budget_per_s"] * r["elapsed_s"], r["answered"])
        if r["admitted_200"] < floor:
            self.fail(label, f"admitted {r['admitted_per_s']:.1f}/s, {(r['admitted_vs_budget'] - 1) * 100:+.1f}% against "
                             f"the budget of {r['budget_per_s']:g}/s ({r['answered']} answered; at least {floor:.0f} "
                             "admitted expected)")
        rt = r["round_trips_per_admitted"]
        if rt is None:
            self.fail(label, "no Redis round-trip count: sidecar_budget_round_trips_total{provider=\"nvidia\"} missing")
        elif r["rate_rpm"] >= 6000 and rt > RT_MAX:
            self.fail(label, f"{rt:.3f} Redis round trips per admitted request at {r['rate_rpm']} RPM (at most {RT_MAX:g}): "
                             f"{r['round_trips']:.0f} round trips, {r['admitted_200']} admitted, leases {r['leases']}")
        for x in r["per_replica"]:
            if x["backend_up"] != 1 or x["replicas_seen"] != REPLICAS:
                self.fail(label, f"{x['name']} at the end of the flood: sidecar_budget_backend_up {x['backend_up']}, "
                                 f"sidecar_cluster_replicas {x['replicas_seen']} (1 and {REPLICAS} expected)")

    def run_rate(self, rpm: int, prefix: str) -> dict:
        lt, up = self.lt, self.lt.up_port
        out = {"rate_rpm": rpm, "burst": cluster_burst(rpm)}
        # single: one sidecar alone, the three floods on it
        label = f"single {rpm} RPM"
        sc, port, mport = lt.sidecar(f"sidecar-cluster-single-{rpm}", up, **self.env(rpm, 1))
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        try:
            time.sleep(0.3)
            out["single"] = self.measure(label, "single", rpm, [sc], [mport], [url] * REPLICAS)
        finally:
            lt.stop(f"cluster {label}", sc)
        # cluster: three replicas, one flood each
        label = f"cluster {rpm} RPM"
        env = {**self.env(rpm, REPLICAS), "SIDECAR_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}",
               "SIDECAR_REDIS_PREFIX": f"{prefix}{rpm}:"}
        started = []
        try:
            for i in range(REPLICAS):
                started.append(lt.sidecar(f"sidecar-cluster-{rpm}-{i + 1}", up, **env))
            out["join_s"] = self.wait_joined(label, [m for _, _, m in started])
            out["cluster"] = self.measure(label, "cluster", rpm, [p for p, _, _ in started], [m for _, _, m in started],
                                          [f"http://127.0.0.1:{p}/v1/chat/completions" for _, p, _ in started])
        finally:
            for p, _, _ in started:
                lt.stop(f"cluster {label}", p)
        s, c = out["single"], out.get("cluster")
        if c and s["cpu_us_per_admitted"] and c["cpu_us_per_admitted"]:
            out["cpu_cluster_vs_single"] = c["cpu_us_per_admitted"] / s["cpu_us_per_admitted"]
            if c["redis_cpu_us_per_admitted"] is not None:
                out["cpu_cluster_with_redis_vs_single"] = (
                    (c["cpu_us_per_admitted"] + c["redis_cpu_us_per_admitted"]) / s["cpu_us_per_admitted"])
        return out


def run(lt, free_port, cpu) -> None:
    """The scenario, for run.py's LoadTest `lt`: results in lt.extra["cluster"], failures
    through lt.fail. `cpu(pid)`: CPU seconds of the process tree."""
    a = lt.args
    c = Cluster(lt, free_port, cpu)
    res = {"replicas": REPLICAS, "queue_s": QUEUE_S, "request_timeout_s": REQUEST_TIMEOUT,
           "offered_factor": OFFERED_FACTOR, "duration_s": run_seconds(a), "rates": []}
    lt.extra["cluster"] = res
    if not c.start_redis():
        return
    ver = subprocess.run([shutil.which("redis-server"), "--version"], capture_output=True, text=True).stdout.split()
    res["redis_version"] = next((w[2:] for w in ver if w.startswith("v=")), "?")
    prefix = f"loadtest-{int(time.time())}-"
    try:
        for rpm in a.cluster_rates:
            # single, cluster, single, cluster…: the CPU ratio is the median of the pairs.
            ratios = []
            for k in range(max(1, a.cluster_repeats)):
                r = c.run_rate(rpm, f"{prefix}{k}-")
                res["rates"].append(r)
                if r.get("cpu_cluster_vs_single"):
                    ratios.append(r["cpu_cluster_vs_single"])
            if ratios:
                res.setdefault("cpu_ratio", {})[rpm] = {"median": statistics.median(ratios), "each": ratios}
    finally:
        lt.stop("cluster", c.redis)


def fmt(v, f="{:.0f}"):
    return "-" if v is None else f.format(v)


def report(c: dict) -> list[str]:
    if not c.get("rates"):
        return []
    L = ["", f"cluster: one budget shared by {c['replicas']} sidecars through Redis {c.get('redis_version', '')}, each with "
             "SIDECAR_RATE_RPM = the budget, against one sidecar alone (no Redis) at the same rate and flood, one run "
             f"after the other. Every sidecar: 1 worker, bucket capacity 1, a queue of {c['queue_s']:g} s at its part of "
             f"the budget (at least 64), request timeout {c['request_timeout_s']:g} s, no fallback. The flood: "
             f"{c['replicas']} oha -q (open loop, {c['offered_factor']:g}× the budget in all) for {c['duration_s']:g} s, "
             "one per replica (all three on the lone sidecar). Round trips: every replica's script calls to Redis "
             "(leases and heartbeats, `sidecar_budget_round_trips_total`; Redis's own count of script calls beside "
             "them). Burst: what the bucket may admit at once, beyond the rate (the shared bucket holds one full "
             "lease, 1% of the window's limit; a lone sidecar its capacity). Upstream/s mid-flood: the simulated "
             "upstream's counter, sampled every 100 ms, over the middle 60% of the flood; most in 1 s: the most it "
             "received between two samples at most 1 s apart. CPU: schedstat of the sidecars' threads, redis-server's "
             "apart", "",
         "| budget RPM | mode | offered/s | sent/s | conns per oha | queue | admitted 200s | admitted/s | admitted/budget | "
         "burst | beyond burst/budget | 429s | 504s | upstream requests | upstream 429s | upstream/s mid-flood | "
         "most upstream in 1 s | Redis round trips | round trips/admitted | Redis script calls | "
         "leases granted/partial/empty/error | proxy CPU µs/admitted | µs/answered | Redis CPU µs/admitted | CPU vs single |",
         "|" + "---|" * 25]
    for r in c["rates"]:
        for mode in ("single", "cluster"):
            x = r.get(mode)
            if not x:
                continue
            le, tl = x["leases"], x["upstream_timeline"]
            cl = mode == "cluster"
            leases = "/".join(fmt(le.get(k)) for k in ("granted", "partial", "empty", "error")) if cl else "-"
            vs = fmt(r.get("cpu_cluster_vs_single"), "{:.2f}×") if cl else "1"
            if cl and r.get("cpu_cluster_with_redis_vs_single") is not None:
                vs += f" ({r['cpu_cluster_with_redis_vs_single']:.2f}× with Redis)"
            L.append(f"| {r['rate_rpm']:,} | {mode} ({x['replicas']}) | {x['offered_per_s']:.0f} | {x['sent_per_s']:.0f} | "
                     f"{x['connections_per_oha']} | {x['queue_per_sidecar']} | {x['admitted_200']} | {x['admitted_per_s']:.2f} | "
                     f"{x['admitted_vs_budget']:.3f} | {x['burst']} | {x['beyond_burst_vs_budget']:.3f} | "
                     f"{x['statuses'].get('429', 0)} | {x['statuses'].get('504', 0)} | {x['upstream_requests']} | "
                     f"{x['upstream_429']} | {fmt(tl['steady_per_s'], '{:.1f}')} | {fmt(tl['max_in_1s'])} | "
                     f"{fmt(x['round_trips'])} | {fmt(x['round_trips_per_admitted'], '{:.3f}')} | "
                     f"{fmt(x['redis_script_calls'])} | {leases} | {fmt(x['cpu_us_per_admitted'], '{:.1f}')} | "
                     f"{fmt(x['cpu_us_per_answered'], '{:.1f}')} | {fmt(x['redis_cpu_us_per_admitted'], '{:.1f}')} | {vs} |")
    L += ["", "Per replica (cluster runs):", "",
          "| budget RPM | replica | admitted 200s | admitted/s | tokens leased | round trips | round trips/admitted | "
          "leases granted/partial/empty/returned | replicas seen | backend up | CPU µs/admitted |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in c["rates"]:
        x = r.get("cluster")
        if not x:
            continue
        for p in x["per_replica"]:
            le = p["leases"]
            L.append(f"| {r['rate_rpm']:,} | {p['name']} | {p['admitted_200']} | {p['admitted_per_s']:.2f} | "
                     f"{fmt(p['tokens_leased'])} | {fmt(p['round_trips'])} | {fmt(p['round_trips_per_admitted'], '{:.3f}')} | "
                     f"{'/'.join(fmt(le.get(k)) for k in ('granted', 'partial', 'empty', 'returned'))} | "
                     f"{fmt(p['replicas_seen'])} | {fmt(p['backend_up'])} | {fmt(p['cpu_us_per_admitted'], '{:.1f}')} |")
    L += ["", "Cluster targets:"]
    for r in c["rates"]:
        x = r.get("cluster")
        if not x:
            continue
        over, rt = x["beyond_burst_vs_budget"], x["round_trips_per_admitted"]
        floor_ok = x["admitted_200"] >= (1 - UNDER_MAX) * min(x["budget_per_s"] * x["elapsed_s"], x["answered"])
        ok_rt = rt is not None and rt <= RT_MAX
        L.append(f"- {r['rate_rpm']:,} RPM: admitted {x['admitted_per_s']:.2f}/s = {x['admitted_vs_budget']:.3f} of the "
                 f"budget, {over:.3f} beyond the burst of {x['burst']} (≤ {1 + OVER_MAX:g}: {'met' if over <= 1 + OVER_MAX else 'NOT met'}; "
                 f"≥ {1 - UNDER_MAX:g}: {'met' if floor_ok else 'NOT met'}); {fmt(rt, '{:.3f}')} Redis round trips per "
                 f"admitted request (≤ {RT_MAX:g}: {'met' if ok_rt else 'NOT met'}); proxy CPU per admitted request "
                 f"{fmt(r.get('cpu_cluster_vs_single'), '{:.2f}')}× single mode's")
    for rpm, x in c.get("cpu_ratio", {}).items():
        each = ", ".join(f"{v:.2f}" for v in x["each"])
        L.append(f"- {rpm:,} RPM: proxy CPU per admitted request, cluster ÷ single, median of {len(x['each'])} "
                 f"alternated pairs: {x['median']:.2f}× ({each})")
    return L
