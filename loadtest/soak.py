"""The `soak` scenario (issue 16): mixed traffic for minutes, then the sidecar's memory and
descriptors must come back to where they were.

One simulated provider of its own (`mock-upstream --bare-429`, a rolling-window limit of
2 s, 10 ms between streamed tokens, 20 ms of compute) and one sidecar (ceiling 1,800 RPM,
the pacing scenario's shortened time scale for a 2 s window, a probe above the learned
limit every 5 s at most, queue 48, request timeout 10 s, low-priority timeout 3 s, no
fallback). The provider's hidden limit sits below the sidecar's ceiling and moves every
10 s (0.6, 0.4 and 0.8 of it, in turn, through `POST /mock/limit`), so the sidecar keeps
learning, probing and drawing 429s for the whole run, re-queueing them and passing some on.

Traffic: 64 keep-alive clients back to back (asyncio, one thread), more demand than any of
those rates, so the queue is full most of the time and the rest are the sidecar's own
429s. Each request picks, at random:

  plain         a non-streaming completion, read to the end (a valid JSON body)
  stream        an SSE completion, read to `data: [DONE]`
  abort-stream  an SSE completion abandoned after its first `data:` line
  abort-queued  plain or streaming, abandoned 20-600 ms after sending if no answer head
                came (it is waiting in the queue): the socket closed, half of the time
                with a reset (SO_LINGER 0)
  reset         plain or streaming with `x-mock-reset-after`: the provider cuts the
                connection mid-body or after 1-6 chunks

and, independently, 4-40 tokens (`x-mock-tokens`), a prompt of 16 B to 64 KiB, a priority
(10% low, 10% high, the rest none). One connection in ten is closed after a complete
answer (new connections all along). Beside them, a dashboard visitor every 1-3 s opens
`GET /api/dashboard/stream`, waits for a frame and leaves.

Measured on the sidecar's process: VmRSS (/proc/<pid>/status) and its open descriptors
(/proc/<pid>/fd), each socket classified through /proc/<pid>/net/tcp: listeners, client
connections, connections to the provider (the idle pool among them) and any socket in
CLOSE_WAIT (the peer closed it and the sidecar never did: a leak's signature). Baseline:
after a warm-up with a little of the same traffic (4 clients), its connections closed.
During the run: a sample every second (every 5 s past 5 minutes). End: once the load has
stopped and the clients closed every connection, the first sample (every 0.5 s, at most
20 s) where everything is back within bounds, or the last one.

Failures (leak checks, never timing):
- descriptors at the end above baseline + 8, counted without the sockets to the provider:
  the pool keeps idle upstream connections on purpose (up to 512 per worker, until the
  provider closes them; the mock does after 30 s idle), so their number at the end says
  how busy the run was, not whether anything leaked;
- any socket in CLOSE_WAIT at the end;
- a socket to the provider still open 5 s after the provider process stopped (every
  pooled connection must see the close and let go of its descriptor);
- RSS at the end above baseline + max(50% of baseline, 32 MiB). Generous on purpose:
  RSS does not come back to the byte when nothing leaks (mimalloc keeps part of the
  pages a busy thread freed, buffers and tables grow to the peak's sizes and are reused,
  the idle upstream pool keeps its buffers: about +5 MiB on a 13 MiB baseline here), and
  a bound near that would fail on the machine's mood. Leaks are per request, and the run
  makes about 90 requests a second (most of them the queue's quick 429s, some 15
  admitted): 30 minutes are ~160,000 requests, so 32 MiB is passed by a leak of 0.2 KiB
  per request, or of 2 KiB per admitted one; the one-minute CI form, ~5,500 requests,
  catches only gross leaks (6 KiB per request);
- the sidecar's ledger at the end: queue depth 0, enqueued = dequeued + dropped for each
  priority, `sidecar_requests_in_flight` 0, `sidecar_requests_arrived_total` = Σ
  `sidecar_requests_total` + Σ in flight, and `sidecar_dashboard_clients` 0, each when its
  series exists; `sidecar_requests_total` (and arrived) over the run between the requests
  the clients wrote minus those they abandoned before an answer head (one closed before
  the sidecar read it is not the sidecar's to count) and the requests they wrote;
- traffic: a request without an answer in 30 s (lost), a connection closed mid-answer or
  a stream without `[DONE]` other than on a reset or an abort, a status other than 200,
  429, 504 (503 for low priority; 502 on a reset), a process that died; and a run that
  did not exercise what it is for (no abandoned queued request, no abandoned stream, no
  reset, no provider 429).
"""

import asyncio
import json
import os
import random
import socket
import struct
import sys
import threading
import time
import urllib.request

import clients
import pacing
import prom

now = time.perf_counter

WINDOW_S = 2.0
CEILING_RPM = 1800
HIDDEN_LIMITS = (0.6, 0.4, 0.8)  # the provider's limit, as fractions of the ceiling, in turn
LIMIT_PERIOD_S = 10.0
PROBE_INTERVAL_S = 5.0
QUEUE = 48
REQUEST_TIMEOUT_S = 10.0
LOW_PRIORITY_TIMEOUT_S = 3.0
CLIENTS = 64
WARMUP_CLIENTS = 4
LOST_AFTER_S = 30.0  # a request with no complete answer this long after its send is lost
FD_SLACK = 8
RSS_SLACK_FRACTION, RSS_SLACK_MIB = 0.5, 32
SETTLE_S = 20.0
UPSTREAM_GONE_S = 5.0
MIX = (("plain", 0.28), ("stream", 0.28), ("abort-stream", 0.12), ("abort-queued", 0.16), ("reset", 0.16))
MODEL = "meta/llama-3.1-8b-instruct"


# === process measurements ===


def rss_kib(pid: int) -> int | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _tcp_table(pid: int) -> dict[int, tuple[int, int, str]]:
    """inode -> (local port, remote port, state) of the TCP sockets in pid's namespace."""
    out = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = open(f"/proc/{pid}/net/{name}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10:
                continue
            lport = int(f[1].rsplit(":", 1)[1], 16)
            rport = int(f[2].rsplit(":", 1)[1], 16)
            out[int(f[9])] = (lport, rport, f[3])
    return out


def fd_census(pid: int, listen_ports: set[int], upstream_port: int) -> dict | None:
    """The process's descriptors: the count (len of /proc/<pid>/fd), and its TCP sockets by
    role: listeners, client connections (to one of `listen_ports`), connections to the
    provider, and how many are in CLOSE_WAIT."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    socks = []
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            socks.append(int(link[8:-1]))
    tcp = _tcp_table(pid)
    c = {"fds": len(fds), "listen": 0, "client": 0, "upstream": 0, "other_sockets": 0, "close_wait": 0}
    for ino in socks:
        t = tcp.get(ino)
        if t is None:
            c["other_sockets"] += 1
            continue
        lport, rport, st = t
        if st == "0A":  # LISTEN
            c["listen"] += 1
        elif rport == upstream_port:
            c["upstream"] += 1
        elif lport in listen_ports:
            c["client"] += 1
        else:
            c["other_sockets"] += 1
        if st == "08":  # CLOSE_WAIT
            c["close_wait"] += 1
    c["own"] = c["fds"] - c["upstream"]
    return c


def get_json(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=5) as r:
        return json.load(r)


# === traffic ===


class Tally:
    """What the clients saw: per kind, answers by outcome; requests written; errors."""

    def __init__(self) -> None:
        self.kinds: dict[str, dict[str, int]] = {}
        self.sent = 0
        self.abandoned_before_head = 0
        self.connects = 0
        self.bad: list[str] = []  # the failures' samples
        self.bad_count = 0
        self.dashboard = {"visits": 0, "with_frame": 0}

    def add(self, kind: str, outcome: str, ok: bool) -> None:
        d = self.kinds.setdefault(kind, {})
        d[outcome] = d.get(outcome, 0) + 1
        if not ok:
            self.bad_count += 1
            if len(self.bad) < 10:
                self.bad.append(f"{kind}: {outcome}")

    def outcomes(self) -> dict[str, int]:
        tot: dict[str, int] = {}
        for d in self.kinds.values():
            for k, v in d.items():
                tot[k] = tot.get(k, 0) + v
        return tot

    def count(self, kind: str, outcome: str) -> int:
        return self.kinds.get(kind, {}).get(outcome, 0)


def _close(writer: asyncio.StreamWriter, rst: bool) -> None:
    if rst:
        try:
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        writer.transport.abort()
    else:
        writer.close()


def _error_code(body: bytes) -> str:
    """The sidecar's error code, or `provider` for a body without one (the provider's bare
    429 passed on)."""
    try:
        return json.loads(body).get("error", {}).get("code") or "provider"
    except (ValueError, AttributeError):
        return "provider"


class Client:
    """One keep-alive client of the soak, request after request until `stop`."""

    def __init__(self, port: int, tally: Tally, rng: random.Random):
        self.port, self.tally, self.rng = port, tally, rng
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    def request(self, kind: str) -> tuple[bytes, bool, str | None]:
        r = self.rng
        stream = kind in ("stream", "abort-stream") or (kind in ("abort-queued", "reset") and r.random() < 0.5)
        tokens = r.randint(4, 40)
        prompt = "x" * int(16 * 4096 ** r.random())  # 16 B to 64 KiB, log-uniform
        h = {"x-mock-tokens": str(tokens)}
        if kind == "reset":
            h["x-mock-reset-after"] = str(r.randint(1, 6))  # a plain answer is cut at half its body
        p = r.random()
        prio = "low" if p < 0.1 else "high" if p < 0.2 else None
        if prio:
            h["X-Priority"] = prio
        body = json.dumps({"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": prompt}]}).encode()
        return clients.request_bytes("POST", "127.0.0.1", self.port, "/v1/chat/completions", body, h), stream, prio

    async def one(self, kind: str) -> str:
        """Sends one request of `kind` and records its outcome; the status or what ended it."""
        raw, stream, prio = self.request(kind)
        t = self.tally
        if self.conn is None:
            try:
                self.conn = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 10)
                t.connects += 1
            except (OSError, asyncio.TimeoutError) as e:
                t.add(kind, f"connect error {type(e).__name__}", False)
                return "error"
        reader, writer = self.conn
        try:
            writer.write(raw)
            await writer.drain()
        except OSError as e:
            self.drop(False)
            t.add(kind, f"send error {type(e).__name__}", False)
            return "error"
        t.sent += 1
        body = bytearray()
        parser = clients.ResponseParser(body.extend)
        sent_at = now()
        abort_at = sent_at + self.rng.uniform(0.02, 0.6) if kind == "abort-queued" else None
        lost_at = sent_at + LOST_AFTER_S
        rst = self.rng.random() < 0.5
        while not parser.done:
            waiting = abort_at is not None and parser.status is None
            try:
                data = await asyncio.wait_for(reader.read(65536), max(0.0, (abort_at if waiting else lost_at) - now()))
            except asyncio.TimeoutError:
                self.drop(rst)
                if waiting:
                    t.abandoned_before_head += 1
                    t.add(kind, "abandoned before an answer", True)
                    return "abandoned"
                t.add(kind, f"lost: {parser.status or 'no answer'} after {LOST_AFTER_S:g} s", False)
                return "error"
            except OSError as e:
                data = b""
                cut = type(e).__name__
            else:
                cut = "EOF"
            if not data:
                if parser.state == "eof":
                    parser.state = "done"
                    break
                self.drop(False)
                if parser.status == 200 and kind == "reset":
                    t.add(kind, "200 cut mid-body" + (" after an error event" if b"event: error" in body else ""), True)
                    return "reset"
                head = f"a {parser.status} head" if parser.status else "no head"
                t.add(kind, f"closed mid-answer ({cut}) after {head}", False)
                return "error"
            parser.feed(data)
            if kind == "abort-stream" and parser.status == 200 and b"data:" in body:
                self.drop(rst)
                t.add(kind, "abandoned mid-stream", True)
                return "abandoned"
        status = parser.status
        if not parser.keep_alive or self.rng.random() < 0.1:
            self.drop(False)
        if status == 200:
            if stream:
                if b"data: [DONE]" in body:
                    t.add(kind, "200", kind != "reset")
                elif b"event: error" in body:
                    t.add(kind, "200 ended by an error event", kind == "reset")
                else:
                    t.add(kind, "200 without [DONE]", False)
            else:
                try:
                    ok = bool(json.loads(body)["choices"])
                except (ValueError, KeyError, TypeError):
                    ok = False
                t.add(kind, "200" if ok else "200 with an invalid body", ok and kind != "reset")
            return "ok"
        expected = {429, 504} | ({503} if prio == "low" else set()) | ({502} if kind == "reset" else set())
        t.add(kind, f"{status} {_error_code(bytes(body))}", status in expected)
        return "refused"

    def drop(self, rst: bool) -> None:
        if self.conn:
            _close(self.conn[1], rst)
            self.conn = None

    async def run(self, stop: asyncio.Event) -> None:
        kinds, weights = zip(*MIX)
        while not stop.is_set():
            r = await self.one(self.rng.choices(kinds, weights)[0])
            # After a refusal a short pause, as a client would (the next one takes its place).
            await asyncio.sleep(self.rng.uniform(0.05, 0.3) if r in ("refused", "error") else self.rng.uniform(0, 0.05))
        self.drop(False)


async def dashboard_visitor(port: int, tally: Tally, rng: random.Random, stop: asyncio.Event) -> None:
    raw = clients.request_bytes("GET", "127.0.0.1", port, "/api/dashboard/stream", headers={"Accept": "text/event-stream"})
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), rng.uniform(1, 3))
            break
        except asyncio.TimeoutError:
            pass
        tally.dashboard["visits"] += 1
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        except (OSError, asyncio.TimeoutError) as e:
            tally.add("dashboard", f"connect error {type(e).__name__}", False)
            continue
        buf = bytearray()
        try:
            writer.write(raw)
            deadline = now() + 10
            while b"\ndata:" not in buf and now() < deadline:
                data = await asyncio.wait_for(reader.read(65536), max(0.0, deadline - now()))
                if not data:
                    break
                buf += data
        except (OSError, asyncio.TimeoutError):
            pass
        _close(writer, rng.random() < 0.5)
        if b"\ndata:" in buf and buf.startswith(b"HTTP/1.1 200"):
            tally.dashboard["with_frame"] += 1
            tally.add("dashboard", "200 with a frame", True)
        else:
            tally.add("dashboard", f"no frame in 10 s ({bytes(buf[:12])!r})", False)


async def load(port: int, n: int, seconds: float, tally: Tally, seed: int) -> None:
    """n clients and one dashboard visitor for `seconds`; then each finishes the request
    it is on (LOST_AFTER_S at most) and closes its connection."""
    stop = asyncio.Event()
    rng = random.Random(seed)
    tasks = [asyncio.create_task(Client(port, tally, random.Random(rng.random())).run(stop)) for _ in range(n)]
    tasks.append(asyncio.create_task(dashboard_visitor(port, tally, random.Random(rng.random()), stop)))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)


# === the scenario ===


class Soak:
    def __init__(self, lt, minutes: float):
        self.lt, self.minutes = lt, minutes
        a = lt.args
        self.every = 1.0 if minutes <= 5 else 5.0
        self.warmup_s = 3.0 if a.short else 10.0
        self.mock, self.up = lt.mock("mock-soak", "--window-secs", f"{WINDOW_S:g}", "--bare-429",
                                     "--latency-ms", "20", "--token-delay-ms", "10", "--tokens", "16")
        self.set_limit(HIDDEN_LIMITS[0])
        scale = pacing.Scale(window=WINDOW_S, ceiling_rpm=CEILING_RPM, margin_floor=0.02,
                             request_timeout=REQUEST_TIMEOUT_S, queue=QUEUE)
        env = {**scale.env(), "SIDECAR_PROBE_INTERVAL": f"{PROBE_INTERVAL_S:g}",
               "SIDECAR_LOW_PRIORITY_TIMEOUT": f"{LOW_PRIORITY_TIMEOUT_S:g}", "SIDECAR_RATE_LIMIT_HEADERS": "none"}
        self.env = env
        self.sc, self.port, self.mport = lt.sidecar("sidecar-soak", self.up, **env)
        self.samples: list[dict] = []
        self.t0 = now()

    def set_limit(self, fraction: float) -> None:
        get_json(f"http://127.0.0.1:{self.up}/mock/limit", {"rpm": CEILING_RPM * fraction, "window_secs": WINDOW_S})

    def sample(self, phase: str) -> dict | None:
        c = fd_census(self.sc.pid, {self.port, self.mport}, self.up)
        rss = rss_kib(self.sc.pid)
        if c is None or rss is None:
            return None
        s = {"t": round(now() - self.t0, 2), "phase": phase, "rss_kib": rss, **c}
        try:
            m = prom.scrape(self.mport)
            s["queue_depth"] = prom.total(m, "sidecar_queue_depth")
            s["in_flight"] = prom.total(m, "sidecar_requests_in_flight") if _has(m, "sidecar_requests_in_flight") else None
        except OSError:
            pass
        self.samples.append(s)
        return s

    def background(self, stop: threading.Event) -> None:
        """Samples every `self.every` s and moves the provider's limit every LIMIT_PERIOD_S."""
        k, next_limit = 0, now() + LIMIT_PERIOD_S
        while not stop.wait(self.every):
            self.sample("load")
            if now() >= next_limit:
                k += 1
                next_limit += LIMIT_PERIOD_S
                try:
                    self.set_limit(HIDDEN_LIMITS[k % len(HIDDEN_LIMITS)])
                except OSError as e:
                    self.lt.fail("soak", f"POST /mock/limit: {e!r}")

    def within(self, s: dict, base: dict) -> bool:
        return (s["own"] <= base["own"] + FD_SLACK and s["close_wait"] == 0 and s["client"] == 0
                and s["rss_kib"] <= base["rss_kib"] + rss_slack_kib(base["rss_kib"])
                and not s.get("queue_depth") and not s.get("in_flight"))

    def run(self) -> dict:
        lt, a = self.lt, self.lt.args
        warm = Tally()
        asyncio.run(load(self.port, WARMUP_CLIENTS, self.warmup_s, warm, seed=1))
        # The warm-up's connections closed: wait for the sidecar to see every close.
        deadline = now() + 5
        time.sleep(0.5)
        while now() < deadline and (self.sample("baseline") or {}).get("client"):
            time.sleep(0.25)
        base = self.sample("baseline")
        m0 = prom.scrape(self.mport)
        mock0 = get_json(f"http://127.0.0.1:{self.up}/mock/stats")
        tally = Tally()
        stop = threading.Event()
        bg = threading.Thread(target=self.background, args=(stop,), daemon=True)
        t_load = now()
        bg.start()
        try:
            asyncio.run(load(self.port, CLIENTS, self.minutes * 60, tally, seed=a.soak_seed))
        finally:
            stop.set()
            bg.join()
        load_s = now() - t_load
        self.sc.check("soak")
        # Settling: the first sample back within bounds, or the last one.
        t_end = now()
        end = self.sample("settle")
        while not self.within(end, base) and now() - t_end < SETTLE_S:
            time.sleep(0.5)
            end = self.sample("settle") or end
        settle_s = now() - t_end
        m1 = prom.scrape(self.mport)
        mock1 = get_json(f"http://127.0.0.1:{self.up}/mock/stats")
        # The provider goes away: every connection to it must close on the sidecar's side.
        lt.stop("soak", self.mock)
        gone_deadline = now() + UPSTREAM_GONE_S
        after = fd_census(self.sc.pid, {self.port, self.mport}, self.up)
        while after and after["upstream"] and now() < gone_deadline:
            time.sleep(0.25)
            after = fd_census(self.sc.pid, {self.port, self.mport}, self.up)
        gone_s = UPSTREAM_GONE_S - max(0.0, gone_deadline - now())
        self.sc.check("soak")
        load_samples = [s for s in self.samples if s["phase"] != "baseline"]

        def peak(k):
            return max((s[k] for s in load_samples if s.get(k) is not None), default=None)

        res = {
            "minutes": self.minutes, "load_s": load_s, "clients": CLIENTS, "sample_every_s": self.every,
            "warmup_s": self.warmup_s, "warmup_requests": warm.sent,
            "warmup_bad": warm.bad_count, "warmup_bad_samples": warm.bad,
            "settings": self.env, "hidden_limits_rpm": [CEILING_RPM * f for f in HIDDEN_LIMITS],
            "limit_period_s": LIMIT_PERIOD_S, "window_s": WINDOW_S, "ceiling_rpm": CEILING_RPM,
            "baseline": base, "end": end, "settle_s": settle_s,
            "peak": {k: peak(k) for k in ("rss_kib", "fds", "own", "upstream", "client", "close_wait", "queue_depth")},
            "upstream_after_stop": after and after["upstream"], "upstream_gone_s": gone_s,
            "rss_slack_kib": rss_slack_kib(base["rss_kib"]), "fd_slack": FD_SLACK,
            "traffic": {"sent": tally.sent, "connects": tally.connects, "per_s": tally.sent / load_s,
                        "abandoned_before_head": tally.abandoned_before_head, "kinds": tally.kinds,
                        "outcomes": tally.outcomes(), "bad": tally.bad_count, "bad_samples": tally.bad,
                        "dashboard": tally.dashboard},
            "second_half_rss_kib_per_min": rss_slope([s for s in load_samples if s["phase"] == "load"]),
            "timeline": self.samples,
        }
        res["ledger"] = ledger(m0, m1)
        res["provider"] = {k: mock1.get(k, 0) - mock0.get(k, 0) for k in ("requests", "rate_limited", "streams", "errors")}
        return res


def _has(m: prom.Samples, name: str) -> bool:
    return any(n == name for n, _ in m)


def rss_slack_kib(base_kib: int) -> int:
    return int(max(base_kib * RSS_SLACK_FRACTION, RSS_SLACK_MIB * 1024))


def rss_slope(samples: list[dict]) -> float | None:
    """RSS growth over the run's second half, KiB a minute (least squares): a plateau is ~0."""
    half = samples[len(samples) // 2:]
    if len(half) < 3:
        return None
    ts = [s["t"] for s in half]
    rs = [s["rss_kib"] for s in half]
    mt, mr = sum(ts) / len(ts), sum(rs) / len(rs)
    var = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (r - mr) for t, r in zip(ts, rs)) / var * 60 if var else None


def ledger(m0: prom.Samples, m1: prom.Samples) -> dict:
    """The sidecar's own counts over the run, and its gauges at the end."""

    def d(name: str, **match: str) -> float:
        return prom.total(m1, name, **match) - prom.total(m0, name, **match)

    outcomes: dict[str, int] = {}
    for (n, labels), v in m1.items():
        if n == "sidecar_requests_total":
            lab = dict(labels)
            k = f"{lab.get('route')}/{lab.get('outcome')}"
            dv = int(v - m0.get((n, labels), 0.0))
            if dv:
                outcomes[k] = outcomes.get(k, 0) + dv
    queue = {}
    for prio in ("high", "normal", "low"):
        enq = prom.total(m1, "sidecar_queue_enqueued_total", priority=prio)
        deq = prom.total(m1, "sidecar_queue_dequeued_total", priority=prio)
        drop = prom.total(m1, "sidecar_queue_dropped_total", priority=prio)
        depth = prom.total(m1, "sidecar_queue_depth", priority=prio)
        queue[prio] = {"enqueued": enq, "dequeued": deq, "dropped": drop, "depth": depth}
    return {
        "requests": int(d("sidecar_requests_total")),
        "outcomes": outcomes,
        "invalid_requests": int(d("sidecar_invalid_requests_total")),
        "upstream_429": int(d("sidecar_upstream_429_total")),
        "retries": int(d("sidecar_retries_total")),
        "upstream_errors": {k: int(d("sidecar_upstream_errors_total", kind=k))
                            for k in ("connect", "timeout", "request", "status_5xx", "stream", "idle_timeout")},
        "queue_client_gone": int(d("sidecar_queue_dropped_total", reason="client_gone")),
        "limit_changes": int(d("sidecar_limit_changes_total")),
        "queue": queue,
        "in_flight_end": prom.total(m1, "sidecar_requests_in_flight") if _has(m1, "sidecar_requests_in_flight") else None,
        # arrived = Σ requests_total + Σ in_flight, since start (with the series of the ledger)
        "arrived": int(d("sidecar_requests_arrived_total")) if _has(m1, "sidecar_requests_arrived_total") else None,
        "arrived_gap_end": (prom.total(m1, "sidecar_requests_arrived_total") - prom.total(m1, "sidecar_requests_total")
                            - prom.total(m1, "sidecar_requests_in_flight")) if _has(m1, "sidecar_requests_arrived_total") else None,
        "invalid_requests_since_start": int(prom.total(m1, "sidecar_invalid_requests_total")),
        "dashboard_clients_end": prom.total(m1, "sidecar_dashboard_clients") if _has(m1, "sidecar_dashboard_clients") else None,
    }


def judge(lt, r: dict) -> None:
    def fail(msg: str) -> None:
        lt.fail("soak", msg)

    b, e = r["baseline"], r["end"]
    if e["own"] > b["own"] + FD_SLACK:
        fail(f"{e['own']} descriptors at the end (without the {e['upstream']} to the provider), baseline {b['own']} "
             f"+ {FD_SLACK} allowed; sockets at the end: {e['client']} client, {e['other_sockets']} other")
    if e["close_wait"]:
        fail(f"{e['close_wait']} sockets in CLOSE_WAIT {r['settle_s']:.0f} s after the load")
    if r["upstream_after_stop"]:
        fail(f"{r['upstream_after_stop']} sockets to the provider still open {UPSTREAM_GONE_S:g} s after it stopped")
    if e["rss_kib"] > b["rss_kib"] + r["rss_slack_kib"]:
        fail(f"RSS {e['rss_kib'] / 1024:.1f} MiB at the end, baseline {b['rss_kib'] / 1024:.1f} MiB "
             f"+ {r['rss_slack_kib'] / 1024:.0f} MiB allowed")
    led, tr = r["ledger"], r["traffic"]
    for prio, q in led["queue"].items():
        if q["depth"]:
            fail(f"queue depth {q['depth']:.0f} ({prio}) at the end")
        if q["enqueued"] != q["dequeued"] + q["dropped"] + q["depth"]:
            fail(f"queue ledger ({prio}): enqueued {q['enqueued']:.0f} != dequeued {q['dequeued']:.0f} "
                 f"+ dropped {q['dropped']:.0f} + depth {q['depth']:.0f}")
    if led["in_flight_end"]:
        fail(f"sidecar_requests_in_flight {led['in_flight_end']:.0f} at the end")
    if led["dashboard_clients_end"]:
        fail(f"sidecar_dashboard_clients {led['dashboard_clients_end']:.0f} at the end")
    # A request abandoned before the sidecar read it is not the sidecar's to count; one
    # abandoned in the queue is, as client_gone, once the ledger settles abandoned requests
    # (before it, the sidecar's count lacked them: the series of that ledger are optional).
    lo = tr["sent"] - tr["abandoned_before_head"]
    if not lo <= led["requests"] <= tr["sent"]:
        fail(f"the sidecar counted {led['requests']} requests ended; the clients wrote {tr['sent']}, "
             f"{tr['abandoned_before_head']} of them abandoned before an answer head")
    if led["arrived"] is not None:
        if not lo <= led["arrived"] <= tr["sent"]:
            fail(f"the sidecar counted {led['arrived']} requests arrived; the clients wrote {tr['sent']}, "
                 f"{tr['abandoned_before_head']} of them abandoned before an answer head")
        if led["arrived_gap_end"] not in (0, led["invalid_requests_since_start"]):
            fail(f"arrived - Σ requests_total - Σ in_flight = {led['arrived_gap_end']:.0f} at the end (0 expected)")
    if led["invalid_requests"]:
        fail(f"{led['invalid_requests']} requests the sidecar found invalid")
    if tr["bad"]:
        fail(f"{tr['bad']} wrong or missing answers: {tr['bad_samples']}")
    if r["warmup_bad"]:
        fail(f"warm-up: {r['warmup_bad']} wrong or missing answers: {r['warmup_bad_samples']}")
    k = tr["kinds"]
    exercised = {
        "a request abandoned while waiting": k.get("abort-queued", {}).get("abandoned before an answer", 0),
        "a stream abandoned": k.get("abort-stream", {}).get("abandoned mid-stream", 0),
        "a provider reset": sum(v for o, v in k.get("reset", {}).items() if o.startswith(("200 cut", "200 ended"))),
        "a provider 429": r["provider"]["rate_limited"],
        "a dashboard visit": tr["dashboard"]["with_frame"],
    }
    missing = [w for w, n in exercised.items() if not n]
    if missing:
        fail(f"the run never saw {', '.join(missing)}")


def run(lt, minutes: float) -> None:
    """The scenario, for run.py's LoadTest `lt`: results in lt.extra["soak"], failures through
    lt.fail."""
    print(f"   soak: {minutes:g} min of load, {CLIENTS} clients", file=sys.stderr, flush=True)
    s = Soak(lt, minutes)
    try:
        r = s.run()
    finally:
        lt.stop("soak", s.sc)
        lt.stop("soak", s.mock)
    lt.extra["soak"] = r
    judge(lt, r)


# === report ===


def fmt(v, f="{:.0f}"):
    return "-" if v is None else f.format(v)


def report(r: dict) -> list[str]:
    b, p, e = r["baseline"], r["peak"], r["end"]
    tr, led, pv = r["traffic"], r["ledger"], r["provider"]
    mib = lambda kib: fmt(kib and kib / 1024, "{:.1f}")  # noqa: E731
    rss_ok = e["rss_kib"] <= b["rss_kib"] + r["rss_slack_kib"]
    own_ok = e["own"] <= b["own"] + r["fd_slack"]
    limits = ", ".join(f"{x:.0f}" for x in r["hidden_limits_rpm"])
    L = ["", f"soak: {r['minutes']:g} min ({r['load_s']:.0f} s) of mixed traffic from {r['clients']} keep-alive clients "
             f"through a sidecar at {r['ceiling_rpm']} RPM (window {r['window_s']:g} s, queue {QUEUE}) to a provider whose "
             f"hidden limit moves every {r['limit_period_s']:g} s ({limits} RPM, bare 429s); "
             f"{tr['sent']} requests ({tr['per_s']:.0f}/s) on {tr['connects']} connections, "
             f"{tr['dashboard']['visits']} dashboard visits. Baseline after a {r['warmup_s']:g} s warm-up "
             f"({r['warmup_requests']} requests); end {r['settle_s']:.1f} s after the load stopped; a sample every "
             f"{r['sample_every_s']:g} s", "",
         "| sidecar | baseline | peak | end | bound at the end | verdict |",
         "|---|---|---|---|---|---|",
         f"| RSS MiB | {mib(b['rss_kib'])} | {mib(p['rss_kib'])} | {mib(e['rss_kib'])} | "
         f"≤ {mib(b['rss_kib'] + r['rss_slack_kib'])} | {'ok' if rss_ok else 'LEAK?'} |",
         f"| open descriptors | {b['fds']} | {fmt(p['fds'])} | {e['fds']} | - | - |",
         f"| descriptors without the provider's sockets | {b['own']} | {fmt(p['own'])} | {e['own']} | "
         f"≤ {b['own'] + r['fd_slack']} | {'ok' if own_ok else 'LEAK'} |",
         f"| sockets to the provider (idle pool) | {b['upstream']} | {fmt(p['upstream'])} | {e['upstream']} | "
         f"0 within {UPSTREAM_GONE_S:g} s of its stop: {r['upstream_after_stop']} after {r['upstream_gone_s']:.1f} s | "
         f"{'ok' if not r['upstream_after_stop'] else 'LEAK'} |",
         f"| client connections | {b['client']} | {fmt(p['client'])} | {e['client']} | 0 | {'ok' if not e['client'] else 'LEAK'} |",
         f"| sockets in CLOSE_WAIT | {b['close_wait']} | {fmt(p['close_wait'])} | {e['close_wait']} | 0 | "
         f"{'ok' if not e['close_wait'] else 'LEAK'} |",
         f"| queue depth | {fmt(b.get('queue_depth'))} | {fmt(p['queue_depth'])} | {fmt(e.get('queue_depth'))} | 0 | "
         f"{'ok' if not e.get('queue_depth') else 'NOT 0'} |",
         "", f"RSS over the load's second half: {fmt(r['second_half_rss_kib_per_min'], '{:+.0f}')} KiB/min (least squares; "
             "a plateau is about 0)", "",
         "| kind | requests | outcomes |", "|---|---|---|"]
    for kind, d in r["traffic"]["kinds"].items():
        outs = ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))
        L.append(f"| {kind} | {sum(d.values())} | {outs} |")
    q = led["queue"]
    qsum = ", ".join(f"{k} {x['enqueued']:.0f} = {x['dequeued']:.0f} + {x['dropped']:.0f}" for k, x in q.items())
    outs = ", ".join(f"{k} {v}" for k, v in sorted(led["outcomes"].items(), key=lambda kv: -kv[1]))
    errs = ", ".join(f"{k} {v}" for k, v in led["upstream_errors"].items() if v) or "none"
    L += ["", f"The sidecar's ledger over the run: {led['requests']} requests counted (clients wrote {tr['sent']}, "
              f"{tr['abandoned_before_head']} abandoned before an answer head; arrived "
              f"{fmt(led['arrived'])}{'' if led['arrived'] is not None else ' (no such series)'}): "
              f"{outs}; "
              f"provider 429s {led['upstream_429']} (re-queued {led['retries']}), upstream errors "
              f"{errs}, left the queue "
              f"with their client gone {led['queue_client_gone']}, learned-limit changes {led['limit_changes']}; at the end "
              f"queue depth {sum(x['depth'] for x in q.values()):.0f}, enqueued = dequeued + dropped "
              f"({qsum}), "
              f"in flight {fmt(led['in_flight_end'])}{'' if led['in_flight_end'] is not None else ' (no such series)'}, "
              f"dashboard clients {fmt(led['dashboard_clients_end'])}",
          f"The provider saw {pv['requests']} requests, refused {pv['rate_limited']} with a 429, "
          f"{pv['streams']} streams"]
    return L
