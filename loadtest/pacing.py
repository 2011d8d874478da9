"""The `pacing` scenario: does the sidecar learn and hold a provider's real limit?

Each situation runs its own simulated provider (`mock-upstream` with a rolling-window
limit) and its own sidecar, on a shortened time scale: one provider window W = 6 s
instead of 60 s, and every sidecar time setting multiplied by W / 60 (probe interval
60 s, quiet period 3 s, recovery interval 1 s, default pause 0.1 s; margin floor 20 ms,
so the margin is 0.5% of W, 30 ms); request timeout 20 s, queue 256, bucket capacity 1.
The sidecar's rate (the ceiling) is N per window = 600 RPM; an open-loop client offers
3x the provider's real limit (new requests on a fixed schedule whatever the answers take).

  1        the provider's limit is the sidecar's rate: N per window (10 windows)
  2-bare   the real limit is 0.8N, unknown to the sidecar; the provider's 429s carry
           no header at all (`--bare-429`, NVIDIA's hosted API by public reports)
  2-openai the same with OpenAI's rate-limit headers (`--openai-headers`)
  3        the real limit is N/2, bare 429s
  4        N, halved at run time after 3 windows (POST /mock/limit), restored after 6
           more; run on for one probe interval after the restore. The sidecar starts half
           a probe interval before the load, so that its probes (every probe interval
           from its start) do not happen to fall on the restore.
  5        N, a low-priority backlog (3N offered, `X-Priority: low`) and one high-priority
           request at a time (`X-Priority: high`, its own model name so the provider's
           record tells it apart): the grant order
  1-realtime (--pacing-realtime) situation 1 in real time: 600 RPM, W = 60 s, 3 windows

The verdicts are the simulated provider's own (`GET /mock/windows`): admissions and
refusals per fixed window, aligned with the load (it starts on a window boundary of
the mock's clock), the most admissions in any rolling window, and for each 429 the span
back to the L-th latest admission. The sidecar's learned limit is sampled from its
`/metrics` (`sidecar_limit_learned_rpm`, every 0.25 s; the mock's counts when absent)
for the convergence time: from the start (or from a change of the real limit) to the
moment after which the learned limit stays within 5% of the real one ("settled": and
never above it). Its `learned limit change` log lines say why each change happened.

The situations run side by side (each has its own processes, and the load is light:
30 requests/s each at most), so the full form takes about as long as the longest one,
situation 4 (30 s lead-in, 21 windows, 126 s, then the queue's drain): about 3 minutes,
4.5 with --pacing-realtime. `--short` (CI): W = 2 s, N = 20, situations 1, 2-bare and
2-openai for 3 windows each, about 20 s. Only a process that died, a request without an
answer or an unexpected status is a failure; the counts are reported, never judged.
Expected: 200 and 429 (the sidecar's queue_full / queue_beyond_deadline, or a provider's
passed on); in the full form also the sidecar's deadline 504s, a figure of the run: its
queue sits at the deadline's edge there (3x offered, 20 s of requests admitted), so any
pause or late grant ends some requests at their deadline.
"""

import asyncio
import json
import math
import random
import re
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime

import clients
import prom

now = time.perf_counter

CHAT_MODEL = "meta/llama-3.1-8b-instruct"
HIGH_MODEL = "loadtest/high-priority"
# The sidecar's own 429s (its queue), told apart from a provider's 429 passed on.
SIDECAR_429 = {"queue_full", "queue_beyond_deadline"}
# The sidecar's answers to a request that reached its own deadline (SIDECAR_REQUEST_TIMEOUT)
# in the queue, or was granted too close to it for the provider's answer to arrive in time.
DEADLINE_504 = {"504 queue_timeout", "504 upstream_timeout"}
TOLERANCE = 0.05  # "converged": the learned limit within 5% of the real one
SAMPLE_EVERY = 0.25  # seconds between /metrics samples
HIGH_GAP = (0.3, 0.9)  # seconds between one high-priority answer and the next request


def chat(model: str = CHAT_MODEL) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()


def per_window(rpm: float, window: float) -> int:
    """The mock's admissions per window at `rpm` (limit.rs `max_for`)."""
    return max(1, math.floor(rpm * window / 60 + 1e-9))


def g(v: float) -> str:
    return f"{v:g}"


@dataclass
class Scale:
    window: float  # seconds: the provider's window
    ceiling_rpm: float  # the sidecar's rate_rpm
    margin_floor: float
    request_timeout: float = 20.0
    queue: int = 256

    @property
    def n(self) -> int:
        return per_window(self.ceiling_rpm, self.window)

    @property
    def factor(self) -> float:
        return self.window / 60

    @property
    def probe_interval(self) -> float:
        return 600 * self.factor

    @property
    def interval(self) -> float:
        """Seconds between two grants at the ceiling: the token interval."""
        return 60 / self.ceiling_rpm

    def env(self) -> dict[str, str]:
        f = self.factor
        return {
            "SIDECAR_RATE_RPM": g(self.ceiling_rpm),
            "SIDECAR_BUCKET_CAPACITY": "1",
            "SIDECAR_PROVIDER_WINDOW": g(self.window),
            "SIDECAR_PROBE_INTERVAL": g(self.probe_interval),
            "SIDECAR_RETREAT_DEFAULT_PAUSE": g(round(1 * f, 4)),
            "SIDECAR_RETREAT_QUIET_PERIOD": g(round(30 * f, 4)),
            "SIDECAR_RECOVERY_INTERVAL": g(round(10 * f, 4)),
            "SIDECAR_WINDOW_MARGIN_FLOOR": g(self.margin_floor),
            "SIDECAR_REQUEST_TIMEOUT": g(self.request_timeout),
            "SIDECAR_QUEUE_MAX_SIZE": str(self.queue),
            "SIDECAR_FALLBACK_ENABLED_PASSTHROUGH": "false",
        }


@dataclass
class Situation:
    key: str
    title: str
    scale: Scale
    real: float  # the provider's limit at the start, as a fraction of N (by RPM)
    windows: int
    mock_flags: list[str]
    changes: list[tuple[int, float]] = field(default_factory=list)  # (window, fraction of N)
    priority: bool = False
    # Seconds between the sidecar's start and the load's: its probes come every probe
    # interval from its start (while demand exceeds the learned limit), so this sets
    # where they fall against the run's limit changes.
    lead_in: float = 0.0

    @property
    def real_rpm(self) -> float:
        return self.real * self.scale.ceiling_rpm

    def rpm_in(self, k: int) -> float:
        """The provider's limit (RPM) during window k of the run."""
        r = self.real
        for at, frac in self.changes:
            if k >= at:
                r = frac
        return r * self.scale.ceiling_rpm

    def phases(self) -> list[tuple[int, int, float]]:
        """(first window, end window, rpm) of each stretch with one real limit."""
        bounds = [0, *[at for at, _ in self.changes], self.windows]
        return [(a, b, self.rpm_in(a)) for a, b in zip(bounds, bounds[1:]) if b > a]

    @property
    def offered_per_s(self) -> float:
        return 3 * self.real_rpm / 60


def situations(short: bool, realtime: bool, select: list[str] | None) -> list[Situation]:
    if short:
        s = Scale(window=2.0, ceiling_rpm=600, margin_floor=0.02)
        out = [
            Situation("1", "rate = limit N, 3N offered", s, 1.0, 3, ["--bare-429"]),
            Situation("2-bare", "real limit 0.8N unknown, bare 429s", s, 0.8, 3, ["--bare-429"]),
            Situation("2-openai", "real limit 0.8N unknown, OpenAI headers", s, 0.8, 3, ["--openai-headers"]),
        ]
    else:
        s = Scale(window=6.0, ceiling_rpm=600, margin_floor=0.02)
        probe_windows = math.ceil(s.probe_interval / s.window)
        out = [
            Situation("1", "rate = limit N, 3N offered", s, 1.0, 10, ["--bare-429"]),
            Situation("2-bare", "real limit 0.8N unknown, bare 429s (no headers)", s, 0.8, 12, ["--bare-429"]),
            Situation("2-openai", "real limit 0.8N unknown, OpenAI rate-limit headers", s, 0.8, 12, ["--openai-headers"]),
            Situation("3", "real limit N/2 unknown, bare 429s", s, 0.5, 12, ["--bare-429"]),
            # The sidecar starts half a probe interval before the load: its first probe
            # falls inside the halved stretch, the next about half an interval after the
            # restore (without a lead-in the first one would come just after the restore,
            # at 60 s from the sidecar's start, and the figure would be luck).
            Situation("4", "limit halved at run time after 3 windows, restored 6 windows later", s, 1.0,
                      9 + probe_windows + 2, ["--bare-429"], changes=[(3, 0.5), (9, 1.0)],
                      lead_in=s.probe_interval / 2),
            Situation("5", "high priority during a low-priority backlog", s, 1.0, 6, ["--bare-429"], priority=True),
        ]
    if realtime or (select and "1-realtime" in select):
        rt = Scale(window=60.0, ceiling_rpm=600, margin_floor=0.05)
        out.append(Situation("1-realtime", "rate = limit N, 3N offered, in real time (600 RPM, 60 s window)",
                             rt, 1.0, 3, ["--bare-429"]))
    if select:
        unknown = [k for k in select if k not in {x.key for x in out}]
        if unknown:
            raise ValueError(f"unknown pacing situations {unknown} (known: {[x.key for x in out]})")
        out = [x for x in out if x.key in select]
    return out


# --- HTTP ---------------------------------------------------------------------------


def get_json(url: str, timeout: float = 10.0, data: bytes | None = None) -> dict:
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class Client:
    """Keep-alive HTTP/1.1 connections to one port, as many as requests in flight."""

    def __init__(self, port: int, timeout: float):
        self.port = port
        self.timeout = timeout
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.records: list[dict] = []
        self.stale_retries = 0

    def _take(self):
        while self.idle:
            r, w, used = self.idle.pop()
            # The server ends keep-alive connections idle for its header read timeout
            # (10 s): a connection idle for a while is closed here rather than reused.
            if now() - used < 2.0 and not w.is_closing():
                return r, w
            w.close()
        return None

    async def _exchange(self, raw: bytes) -> tuple[clients.ResponseParser, bytes]:
        conn = self._take()
        for attempt in (0, 1):
            fresh = conn is None
            if fresh:
                conn = await asyncio.open_connection("127.0.0.1", self.port)
            r, w = conn
            body = bytearray()
            p = clients.ResponseParser(body.extend)
            try:
                w.write(raw)
                await w.drain()
                while not p.done:
                    data = await r.read(65536)
                    if not data:
                        if p.state == "eof":
                            p.state = "done"
                            break
                        raise ConnectionError("closed mid-answer" if p.status else "closed before answering")
                    p.feed(data)
            except (OSError, ConnectionError):
                w.close()
                if not fresh and p.status is None and attempt == 0:
                    # A reused connection the server had just closed: once more, fresh.
                    self.stale_retries += 1
                    conn = None
                    continue
                raise
            if p.keep_alive:
                self.idle.append((r, w, now()))
            else:
                w.close()
            return p, bytes(body)
        raise ConnectionError("unreachable")

    async def one(self, raw: bytes, priority: str) -> dict:
        rec = {"priority": priority, "sent": now()}
        try:
            p, body = await asyncio.wait_for(self._exchange(raw), self.timeout)
            rec["status"] = p.status
            if p.status != 200:
                try:
                    err = json.loads(body).get("error")
                    rec["code"] = err.get("code") if isinstance(err, dict) else None
                except (ValueError, AttributeError):
                    rec["code"] = None
        except asyncio.TimeoutError:
            rec["error"] = f"no answer within {self.timeout:g} s"
        except (OSError, ConnectionError) as e:
            rec["error"] = repr(e)
        rec["answered"] = now()
        self.records.append(rec)
        return rec

    def close(self) -> None:
        for _, w, _ in self.idle:
            w.close()
        self.idle.clear()


# --- one situation ------------------------------------------------------------------


class Run:
    """The processes and measurements of one situation."""

    def __init__(self, lt, sit: Situation, binary, free_port):
        self.lt, self.sit = lt, sit
        sc = sit.scale
        self.mock_port = free_port()
        self.mock = lt.start(f"mock-pacing-{sit.key}", [
            str(binary), "mock-upstream", "--listen", f"127.0.0.1:{self.mock_port}",
            "--rpm", g(sit.real_rpm), "--window-secs", g(sc.window), "--workers", "1",
            "--token-delay-ms", "0", *sit.mock_flags], port=self.mock_port)
        self.sidecar, self.port, self.mport = lt.sidecar(
            f"sidecar-pacing-{sit.key}", self.mock_port, **sc.env())
        self.sidecar_started = now()
        self.mock0, self.clock_err = self.calibrate()
        self.samples: list[tuple[float, dict]] = []
        self.limit_posts: list[dict] = []
        self.client = Client(self.port, sc.request_timeout + 10)
        self.highs: list[dict] = []
        self.t_start = self.t_end = self.t_drained = 0.0
        self.k0 = 0
        self.wall_minus_mono = time.time() - now()

    def calibrate(self) -> tuple[float, float]:
        """The mock's start on this clock (both are CLOCK_MONOTONIC): its judge counts
        1 ms windows from its start, so the number of them at a moment is its age."""
        best = None
        for _ in range(5):
            t0 = now()
            v = get_json(f"http://127.0.0.1:{self.mock_port}/mock/windows?window_secs=0.001")
            t1 = now()
            age = (len(v["windows"]) - 0.5) / 1000
            if best is None or t1 - t0 < best[1]:
                best = ((t0 + t1) / 2 - age, t1 - t0)
        return best[0], best[1] / 2 + 0.0005

    async def sample(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            t = now()
            try:
                s = await loop.run_in_executor(None, prom.scrape, self.mport)
            except OSError:
                s = None
            if s is not None:
                src = [dict(lab).get("source") for (n, lab), v in s.items() if n == "sidecar_limit_source" and v == 1]
                pause = {dict(lab).get("reason"): v for (n, lab), v in s.items() if n == "sidecar_pause_seconds" and v > 0}
                self.samples.append((t, {
                    "learned_rpm": prom.total(s, "sidecar_limit_learned_rpm") if any(
                        n == "sidecar_limit_learned_rpm" for n, _ in s) else None,
                    "limit": prom.total(s, "sidecar_limit_per_window"),
                    "probing": prom.total(s, "sidecar_limit_probing"),
                    "sent_in_window": prom.total(s, "sidecar_sent_in_window"),
                    "source": src[0] if src else None,
                    "pause": pause,
                    "queue": prom.total(s, "sidecar_queue_depth"),
                }))
            try:
                await asyncio.wait_for(stop.wait(), SAMPLE_EVERY)
            except asyncio.TimeoutError:
                pass

    async def set_limit(self, at: float, rpm: float) -> None:
        await asyncio.sleep(max(0.0, at - now()))
        body = json.dumps({"rpm": rpm, "window_secs": self.sit.scale.window}).encode()
        t = now()
        r = await asyncio.get_running_loop().run_in_executor(
            None, lambda: get_json(f"http://127.0.0.1:{self.mock_port}/mock/limit", data=body))
        self.limit_posts.append({"at_s": t - self.t_start, "rpm": rpm, "answer": r})

    async def offer(self, rate: float, raw: bytes, priority: str) -> list[asyncio.Task]:
        tasks, i = [], 0
        while True:
            due = self.t_start + i / rate
            if due >= self.t_end:
                return tasks
            await asyncio.sleep(max(0.0, due - now()))
            tasks.append(asyncio.create_task(self.client.one(raw, priority)))
            i += 1

    async def high_sender(self) -> None:
        """One high-priority request at a time, from the second window on, while the
        low-priority backlog stands."""
        raw = clients.request_bytes("POST", "127.0.0.1", self.port, "/v1/chat/completions",
                                    chat(HIGH_MODEL), {"X-Priority": "high"})
        await asyncio.sleep(max(0.0, self.t_start + self.sit.scale.window - now()))
        while now() < self.t_end - 1.0:
            self.highs.append(await self.client.one(raw, "high"))
            await asyncio.sleep(random.uniform(*HIGH_GAP))

    async def run(self) -> None:
        sit, sc = self.sit, self.sit.scale
        # Start on a boundary of the mock's windows, so its fixed windows are the load's.
        self.k0 = math.ceil((max(now() + 0.5, self.sidecar_started + sit.lead_in) - self.mock0) / sc.window)
        self.t_start = self.mock0 + self.k0 * sc.window
        self.t_end = self.t_start + sit.windows * sc.window
        stop = asyncio.Event()
        sampler = asyncio.create_task(self.sample(stop))
        side = [asyncio.create_task(self.set_limit(self.t_start + k * sc.window, frac * sc.ceiling_rpm))
                for k, frac in sit.changes]
        if sit.priority:
            side.append(asyncio.create_task(self.high_sender()))
        prio = "low" if sit.priority else "normal"
        headers = {"X-Priority": "low"} if sit.priority else None
        raw = clients.request_bytes("POST", "127.0.0.1", self.port, "/v1/chat/completions", chat(), headers)
        tasks = await self.offer(sit.offered_per_s, raw, prio)
        for t in side:
            await t
        # Every request gets its answer (the queue drains within the request timeout).
        await asyncio.gather(*tasks)
        self.t_drained = now()
        stop.set()
        await sampler
        self.client.close()


# --- analysis -----------------------------------------------------------------------


def convergence(samples: list[tuple[float, float]], t0: float, t1: float, real_rpm: float,
                above: float = TOLERANCE) -> float | None:
    """Seconds from t0 to the first sample after which every sample up to t1 has the
    learned limit within TOLERANCE under real_rpm and `above` over it; None if the last
    one is still outside. (`above` 0: settled, at most the real limit.)"""
    inside = [(t, v) for t, v in samples if t0 <= t <= t1 and v is not None]
    if not inside:
        return None
    last_out = None
    for i, (t, v) in enumerate(inside):
        if v < real_rpm * (1 - TOLERANCE) - 1e-9 or v > real_rpm * (1 + above) + 1e-9:
            last_out = i
    if last_out is None:
        return 0.0
    if last_out == len(inside) - 1:
        return None
    return inside[last_out + 1][0] - t0


def limit_changes_from_log(path, t_start: float, wall_minus_mono: float) -> list[dict]:
    """The sidecar's `learned limit change` log lines (JSON), with their time since the
    start of the load."""
    out = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        if "learned limit change" not in line:
            continue
        try:
            e = json.loads(line)
        except ValueError:
            continue
        f = e.get("fields", e)
        ts = e.get("timestamp")
        at = None
        if isinstance(ts, str):
            try:
                wall = datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", ts.replace("Z", "+00:00"))).timestamp()
                at = round(wall - wall_minus_mono - t_start, 3)
            except ValueError:
                pass
        out.append({"at_s": at, "from": f.get("from"), "to": f.get("to"), "to_rpm": f.get("to_rpm"),
                    "source": f.get("source"), "why": f.get("why")})
    return out


def fine_record(r: Run) -> list[dict]:
    """The provider's decisions in 1 ms windows since it started."""
    return get_json(f"http://127.0.0.1:{r.mock_port}/mock/windows?window_secs=0.001", timeout=60)["windows"]


def refusal_spans(r: Run, fine: list[dict]) -> list[dict]:
    """For each provider 429 of the run: when (s since the start) and how long before it
    the provider had admitted the L-th most recent request (L: its limit then). A
    refusal means that span is under W; when the sidecar paced at the real limit, its
    guard had kept those sends at least W + margin apart as it stamped them, so
    W - span is how much later than its stamp a send reached the provider (jitter)."""
    W = r.sit.scale.window
    admits: list[float] = []
    out = []
    for w in fine:
        t = w["index"] / 1000 - (r.t_start - r.mock0)
        for _ in range(w["refused"]):
            k = math.floor(t / W)
            if 0 <= t < r.t_drained - r.t_start + 1:
                lim = per_window(r.sit.rpm_in(min(max(k, 0), r.sit.windows - 1)), W)
                span = t - admits[-lim] if len(admits) >= lim else None
                out.append({"at_s": round(t, 3), "window": k, "limit": lim,
                            "span_since_lth_admission_s": None if span is None else round(span, 3)})
        admits.extend([t] * w["admitted"])
    return out


def analyze(r: Run) -> dict:
    sit, sc = r.sit, r.sit.scale
    W = sc.window
    fine = fine_record(r)
    v = get_json(f"http://127.0.0.1:{r.mock_port}/mock/windows?window_secs={W:g}")
    wins = {w["index"]: w for w in v["windows"]}
    admitted = [wins.get(r.k0 + k, {}).get("admitted", 0) for k in range(sit.windows)]
    refused = [wins.get(r.k0 + k, {}).get("refused", 0) for k in range(sit.windows)]
    limits = [per_window(sit.rpm_in(k), W) for k in range(sit.windows)]
    ratio = [a / lim for a, lim in zip(admitted, limits)]
    learned = [(t, s["learned_rpm"]) for t, s in r.samples]
    have_learned = any(x is not None for _, x in learned)

    phases = []
    after_windows: list[int] = []  # windows wholly after their phase's convergence
    for a, b, rpm in sit.phases():
        t0, t1 = r.t_start + a * W, r.t_start + b * W
        settled = None
        if have_learned:
            conv = convergence(learned, t0, t1, rpm)
            settled = convergence(learned, t0, t1, rpm, above=0.0)
            how = "sidecar_limit_learned_rpm"
        else:
            # Fallback: the first window from which the provider refuses nothing and
            # admits at least 95% of its limit to the end of the stretch.
            conv = None
            for j in range(a, b):
                if all(refused[k] == 0 and ratio[k] >= 1 - TOLERANCE for k in range(j, b)):
                    conv = (j - a) * W
                    break
            how = "mock counts"
        after = [k for k in range(a, b) if conv is not None and k * W >= (a * W + conv) - 1e-9]
        after_windows += after
        # Provider 429s until converged, and after it.
        until = [k for k in range(a, b) if k not in after]
        span_after = len(after) * W
        p = {
            "windows": [a, b], "real_rpm": rpm, "real_per_window": per_window(rpm, W),
            "converged_s": None if conv is None else round(conv, 2),
            "converged_windows": None if conv is None else round(conv / W, 2),
            "settled_s": None if settled is None else round(settled, 2),
            "convergence_from": how,
            "provider_429_until_converged": sum(refused[k] for k in until),
            "provider_429_after_converged": sum(refused[k] for k in after),
            "seconds_after_converged": span_after,
            "provider_429_per_probe_interval_after": (
                round(sum(refused[k] for k in after) / span_after * sc.probe_interval, 2) if span_after else None),
            "admitted_vs_limit_after_mean": (
                round(statistics.mean(ratio[k] for k in after), 4) if after else None),
        }
        phases.append(p)
    statuses: dict[str, int] = {}
    errors = []
    odd = []  # answers other than 200 and 429: when, and after how long
    for rec in sorted(r.client.records, key=lambda x: x["sent"]):
        if "error" in rec:
            errors.append(rec["error"])
            continue
        st = str(rec["status"])
        if rec["status"] == 429:
            st = f"429 {'sidecar ' + rec['code'] if rec.get('code') in SIDECAR_429 else 'provider'}"
        elif rec["status"] != 200:
            st = f"{rec['status']} {rec.get('code')}"
            odd.append({"status": st, "priority": rec["priority"], "sent_s": round(rec["sent"] - r.t_start, 3),
                        "after_s": round(rec["answered"] - rec["sent"], 3)})
        statuses[st] = statuses.get(st, 0) + 1
    changes = limit_changes_from_log(r.sidecar.log, r.t_start, r.wall_minus_mono)
    # The learned limit over time, as sampled: only its changes.
    timeline, last = [], None
    for t, s in r.samples:
        key = (s["learned_rpm"], s["limit"], s["probing"], s["source"])
        if key != last:
            timeline.append({"at_s": round(t - r.t_start, 2), "learned_rpm": s["learned_rpm"], "limit": s["limit"],
                             "probing": bool(s["probing"]), "source": s["source"]})
            last = key
    # The provider's admissions per second from the start to the end of the drain, and
    # the sidecar's gauges as sampled: what happened between the windows' totals.
    ps = get_json(f"http://127.0.0.1:{r.mock_port}/mock/windows?window_secs=1")["windows"]
    s0 = math.floor(r.t_start - r.mock0)
    per_second = [[w["admitted"], w["refused"]] for w in ps if w["index"] >= s0]
    gauges = {"at_s": [round(t - r.t_start, 2) for t, _ in r.samples]}
    for key in ("learned_rpm", "limit", "probing", "sent_in_window", "queue"):
        gauges[key] = [x[key] for _, x in r.samples]
    gauges["pause"] = [x["pause"] or None for _, x in r.samples]
    try:
        admin = get_json(f"http://127.0.0.1:{r.port}/api/admin/config")
        pacing_view = next(iter(admin.get("providers", {}).values()), {}).get("pacing")
    except (OSError, ValueError):
        pacing_view = None
    out = {
        "key": sit.key, "title": sit.title,
        "window_s": W, "n": sc.n, "ceiling_rpm": sc.ceiling_rpm,
        "real_rpm": sit.real_rpm, "real_per_window": per_window(sit.real_rpm, W),
        "mock_flags": sit.mock_flags, "sidecar_env": sc.env(),
        "offered_per_s": sit.offered_per_s, "windows": sit.windows,
        "limit_changes_at_window": [[k, frac * sc.ceiling_rpm] for k, frac in sit.changes],
        "provider_429_per_window": refused,
        "admitted_per_window": admitted,
        "limit_per_window": limits,
        "admitted_vs_limit_per_window": [round(x, 4) for x in ratio],
        "admitted_vs_limit_after_mean": (round(statistics.mean(ratio[k] for k in after_windows), 4)
                                         if after_windows else None),
        "max_in_rolling_window": v["max_in_rolling"],
        "provider_429s": refusal_spans(r, fine),
        "provider_429_total": sum(refused),
        "phases": phases,
        "probe_interval_s": sc.probe_interval,
        "client_statuses": statuses,
        "client_requests": len(r.client.records),
        "client_errors": len(errors),
        "client_error_samples": errors[:5],
        "stale_connection_retries": r.client.stale_retries,
        "other_answers": len(odd),
        "other_answers_sent_s": [x["sent_s"] for x in odd][:400],
        "other_answer_samples": odd[:10],
        "drain_s": round(r.t_drained - r.t_end, 1),
        "learned_timeline": timeline,
        "provider_per_second_from_start": per_second,
        "sidecar_gauges": gauges,
        "learned_limit_log": changes,
        "limit_posts": r.limit_posts,
        "pacing_view_at_end": pacing_view,
        "clock_uncertainty_ms": round(r.clock_err * 1e3, 2),
    }
    if sit.priority:
        out["priority"] = analyze_priority(r, fine)
    return out


def analyze_priority(r: Run, all_w: list[dict]) -> dict:
    """Where each high-priority request was granted among the provider's admissions:
    the low-priority requests the provider admitted after the high one reached the
    sidecar and before the high one itself. The provider's record (1 ms windows, the
    high-priority requests under their own model name) gives the order; the client's
    send time, moved onto the mock's clock, the arrival."""
    sc = r.sit.scale
    base = f"http://127.0.0.1:{r.mock_port}/mock/windows?window_secs=0.001"
    high_w = get_json(base + "&model=" + urllib.request.quote(HIGH_MODEL, safe=""), timeout=60)["windows"]
    high_at = [w["index"] for w in high_w for _ in range(w["admitted"])]
    low_by_ms = {w["index"]: w["admitted"] for w in all_w if w["admitted"]}
    for w in high_w:
        if w["admitted"]:
            low_by_ms[w["index"]] = low_by_ms.get(w["index"], 0) - w["admitted"]
    low_ms = sorted(ms for ms, n in low_by_ms.items() for _ in range(max(0, n)))
    # Lows admitted within `tol` of the arrival may have been granted before it.
    tol_ms = max(2, math.ceil(r.clock_err * 1e3 + 1))
    statuses: dict[str, int] = {}
    for h in r.highs:
        k = str(h.get("status", "no answer"))
        statuses[k] = statuses.get(k, 0) + 1
    ok = [h for h in r.highs if h.get("status") == 200]
    ahead, waits, unmatched = [], [], 0
    gi = 0
    for h in ok:
        arrive_ms = (h["sent"] - r.mock0) * 1e3
        # The high request's admission: the first one of its model at or after its arrival
        # (one high request at a time, so they pair in order).
        while gi < len(high_at) and high_at[gi] < arrive_ms - tol_ms:
            gi += 1
        if gi >= len(high_at):
            unmatched += 1
            continue
        grant = high_at[gi]
        gi += 1
        n = sum(1 for ms in low_ms if arrive_ms + tol_ms < ms <= grant)
        ahead.append(n)
        waits.append((h["answered"] - h["sent"]) / sc.interval)
    dist: dict[str, int] = {}
    for n in ahead:
        dist[str(n)] = dist.get(str(n), 0) + 1
    q = None
    try:
        s = prom.scrape(r.mport)
        q = {}
        for p in ("high", "low"):
            b = prom.buckets(s, "sidecar_queue_wait_seconds", priority=p)
            cnt = b[-1][1] if b else 0
            q[p] = {"count": cnt,
                    "p50_intervals": (prom.histogram_quantile(0.5, b) / sc.interval) if cnt else None,
                    "p99_intervals": (prom.histogram_quantile(0.99, b) / sc.interval) if cnt else None,
                    "le_1_interval_pct": (prom.count_le(b, sc.interval) / cnt * 100) if cnt else None}
    except OSError:
        pass
    return {
        "high_requests": len(r.highs),
        "high_statuses": statuses,
        "matched": len(ahead), "unmatched": unmatched,
        "tolerance_ms": tol_ms,
        "lows_granted_ahead_distribution": dist,
        "took_next_grant_pct": (sum(1 for n in ahead if n == 0) / len(ahead) * 100) if ahead else None,
        "max_lows_ahead": max(ahead) if ahead else None,
        "wait_intervals": {"p50": clients.pct(waits, 50), "p99": clients.pct(waits, 99), "max": max(waits) if waits else None},
        "token_interval_s": sc.interval,
        "sidecar_queue_wait": q,
    }


# --- the scenario -------------------------------------------------------------------


def run(lt, binary, free_port) -> None:
    """The scenario, for run.py's LoadTest `lt`: results in lt.extra["pacing"], failures
    through lt.fail."""
    a = lt.args
    sits = situations(a.short, a.pacing_realtime, a.pacing_situations)
    runs: list[Run] = []
    for s in sits:
        print(f"   pacing {s.key}: {s.title}", flush=True, file=sys.stderr)
        runs.append(Run(lt, s, binary, free_port))

    async def main():
        if a.pacing_serial:
            for r in runs:
                await r.run()
        else:
            await asyncio.gather(*(r.run() for r in runs))

    res: dict[str, dict] = {}
    failures: list[str] = []
    try:
        asyncio.run(main())
    finally:
        for r in runs:
            name = f"pacing {r.sit.key}"
            for p in (r.mock, r.sidecar):
                if not p.alive():
                    failures.append(name)
                    lt.fail(name, f"{p.name} died (exit {p.p.returncode}); log: {p.log}\n{p.tail()}")
    for r in runs:
        name = f"pacing {r.sit.key}"
        if not (r.mock.alive() and r.sidecar.alive()):
            continue
        try:
            out = analyze(r)
        except Exception as e:  # noqa: BLE001 - reported, the other situations still count
            lt.fail(name, f"analysis: {type(e).__name__}: {e}")
            continue
        res[r.sit.key] = out
        if out["client_errors"]:
            lt.fail(name, f"{out['client_errors']} requests without an answer: {out['client_error_samples']}")
        # The full form's queue sits at the deadline's edge (3x offered, 20 s of requests
        # admitted): a pause or a late grant there ends in the sidecar's own 504, which is
        # a figure of the run (the issue counts them), not a crash. The CI form never
        # gets near the deadline, so there any status but 200 and 429 fails.
        expected = ("200", "429") if a.short else ("200", "429", *DEADLINE_504)
        odd = {k: n for k, n in out["client_statuses"].items() if not k.startswith(expected)}
        if odd:
            lt.fail(name, f"unexpected statuses {odd} (only {', '.join(expected)} expected)")
        if not out["client_statuses"].get("200"):
            lt.fail(name, "no request admitted")
        pr = out.get("priority")
        if pr:
            bad = {k: n for k, n in pr["high_statuses"].items() if k != "200"}
            if bad:
                lt.fail(name, f"high-priority requests answered {bad}")
        lt.stop(name, r.sidecar)
        lt.stop(name, r.mock)
    lt.extra["pacing"] = {"short": a.short, "serial": a.pacing_serial, "situations": res}


# --- report -------------------------------------------------------------------------


def fmt(v, f="{:.0f}"):
    return "-" if v is None else f.format(v)


def report(p: dict) -> list[str]:
    sits = p["situations"]
    if not sits:
        return []
    any_s = next(iter(sits.values()))
    L = ["", f"pacing: each situation its own simulated provider (rolling-window limit, its own record: GET /mock/windows) "
             f"and sidecar; provider window W = {any_s['window_s']:g} s{' (60 s in 1-realtime)' if '1-realtime' in sits else ''}, sidecar rate N = "
             f"{any_s['n']}/window ({any_s['ceiling_rpm']:g} RPM), every sidecar time setting × W/60; an open-loop client "
             f"offers 3× the provider's real limit. Converged: the sidecar's learned limit (sidecar_limit_learned_rpm) "
             f"stays within {TOLERANCE:.0%} of the real one from then on (settled: within {TOLERANCE:.0%} and never above it; "
             f"given when later). Deadline 504s: requests that reached SIDECAR_REQUEST_TIMEOUT in the queue.", "",
         "| situation | real limit /window | windows | provider 429s | max in a rolling window | admitted/limit after convergence (mean) "
         "| converged after | 429s per probe interval after convergence | client answers |",
         "|---|---|---|---|---|---|---|---|---|"]
    def conv_of(x: dict) -> str:
        if x["converged_s"] is None:
            return "not converged"
        c = f"{x['converged_s']:.1f} s ({x['converged_windows']:.2f} W)"
        if x.get("settled_s") is None:
            c += ", never settled (above the real limit to the end)"
        elif x["settled_s"] > x["converged_s"]:
            c += f", settled {x['settled_s']:.1f} s"
        return c

    for k, s in sits.items():
        ph = s["phases"]
        if len(ph) == 1:
            conv = conv_of(ph[0])
        else:
            conv = "; ".join(f"{x['real_rpm']:g} RPM: {conv_of(x)}, {x['provider_429_until_converged']} 429s until then"
                             for x in ph)
        after = [(x["provider_429_after_converged"], x["seconds_after_converged"]) for x in ph]
        n429, secs = sum(a for a, _ in after), sum(b for _, b in after)
        per = f"{n429} in {secs:g} s = {n429 / secs * s['probe_interval_s']:.2f} per {s['probe_interval_s']:g} s" if secs else "-"
        real = "→".join(str(x["real_per_window"]) for x in ph)
        st = ", ".join(f"{c} {n}" for c, n in sorted(s["client_statuses"].items()))
        L.append(f"| {k}: {s['title']} | {real} | {s['windows']} | {s['provider_429_total']} | {s['max_in_rolling_window']} | "
                 f"{fmt(s['admitted_vs_limit_after_mean'], '{:.1%}')} | {conv} | {per} | {st} |")
    L += ["", "Per window (provider's fixed windows, aligned with the load):", ""]
    for k, s in sits.items():
        L.append(f"- {k}: provider 429s {s['provider_429_per_window']}; admitted/limit "
                 f"[{', '.join(f'{a}/{b}' for a, b in zip(s['admitted_per_window'], s['limit_per_window']))}]")
    L += ["", "Each provider 429: seconds since the start, and the span back to the L-th latest admission "
              "(L: the real limit; under W, or there would be no 429; just under W at a limit the sidecar already "
              "paced at: a send that reached the provider that much later than the guard stamped it):", ""]
    for k, s in sits.items():
        if s["provider_429s"]:
            L.append(f"- {k}: " + ", ".join(f"{x['at_s']:.2f} s (L {x['limit']}, span {fmt(x['span_since_lth_admission_s'], '{:.3f}')} s)"
                                            for x in s["provider_429s"]))
    L += ["", "The sidecar's learned-limit changes (its log: seconds since the start, per window, why):", ""]
    for k, s in sits.items():
        if s["learned_limit_log"]:
            L.append(f"- {k}: " + "; ".join(f"{fmt(x['at_s'], '{:.2f}')} s {x['from']}→{x['to']} ({x['why']})"
                                            for x in s["learned_limit_log"]))
    for k, s in sits.items():
        pr = s.get("priority")
        if not pr:
            continue
        w, q = pr["wait_intervals"], pr.get("sidecar_queue_wait") or {}
        hq = q.get("high") or {}
        L += ["", f"priority ({k}): {pr['high_requests']} high-priority requests, one at a time, during a low-priority "
                  f"backlog; low-priority grants the provider recorded after a high one reached the sidecar (+{pr['tolerance_ms']} ms) "
                  f"and before it: {pr['lows_granted_ahead_distribution']} (0 = it took the next grant: "
                  f"{fmt(pr['took_next_grant_pct'], '{:.1f}%')}); its wait in token intervals ({pr['token_interval_s'] * 1e3:g} ms) "
                  f"p50 {fmt(w['p50'], '{:.2f}')}, p99 {fmt(w['p99'], '{:.2f}')}, max {fmt(w['max'], '{:.2f}')}; "
                  f"sidecar_queue_wait_seconds{{priority=high}}: {fmt(hq.get('le_1_interval_pct'), '{:.1f}%')} within one interval"]
    return L
