"""Stdlib HTTP/1.1 clients for the load test scenarios oha cannot measure.

- `sse_streams`: N keep-alive connections sending chat requests with `"stream": true`
  all at once, round after round: time to the first `data:` line and to the end.
- `dashboard_clients`: N `GET /api/dashboard/stream` readers counting SSE frames.
- `idle_connections`: N keep-alive connections that each send one request, then sit idle.
- `probe`: keep-alive connections timing answers by status (for 429 latency under a
  flood): one back to back, or requests on a fixed schedule over a few.

Responses are parsed by hand (status line, headers, chunked or Content-Length bodies), so
every byte the server sends is accounted for: a connection closed mid-answer is an error,
not a short read.
"""

import asyncio
import math
import queue
import socket
import statistics
import struct
import threading
import time
from typing import Callable

now = time.perf_counter


class ResponseParser:
    """Incremental parser of one HTTP/1.1 response; `on_body(bytes)` gets the decoded body."""

    def __init__(self, on_body: Callable[[bytes], None] | None = None):
        self.buf = bytearray()
        self.state = "head"
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.remaining = 0
        self.on_body = on_body or (lambda b: None)

    @property
    def done(self) -> bool:
        return self.state == "done"

    @property
    def keep_alive(self) -> bool:
        return "close" not in self.headers.get("connection", "").lower()

    def feed(self, data: bytes) -> None:
        self.buf += data
        buf = self.buf
        while True:
            st = self.state
            if st == "head":
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    return
                lines = bytes(buf[:i]).decode("latin-1").split("\r\n")
                del buf[: i + 4]
                self.status = int(lines[0].split()[1])
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    self.headers[k.strip().lower()] = v.strip()
                if "chunked" in self.headers.get("transfer-encoding", "").lower():
                    self.state = "size"
                elif "content-length" in self.headers:
                    self.remaining = int(self.headers["content-length"])
                    self.state = "fixed" if self.remaining else "done"
                else:
                    self.state = "eof"
            elif st == "fixed" or st == "data":
                if not buf:
                    return
                take = min(len(buf), self.remaining)
                self.on_body(bytes(buf[:take]))
                del buf[:take]
                self.remaining -= take
                if self.remaining:
                    return
                self.state = "done" if st == "fixed" else "crlf"
            elif st == "crlf":
                if len(buf) < 2:
                    return
                del buf[:2]
                self.state = "size"
            elif st == "size":
                i = buf.find(b"\r\n")
                if i < 0:
                    return
                size = int(bytes(buf[:i]).split(b";")[0], 16)
                del buf[: i + 2]
                if size:
                    self.remaining, self.state = size, "data"
                else:
                    self.state = "trailer"
            elif st == "trailer":
                i = buf.find(b"\r\n")
                if i < 0:
                    return
                del buf[: i + 2]
                if i == 0:
                    self.state = "done"
            elif st == "eof":
                if buf:
                    self.on_body(bytes(buf))
                    buf.clear()
                return
            else:  # done: anything more belongs to the next response
                return


def request_bytes(method: str, host: str, port: int, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    h = {"Host": f"{host}:{port}", **(headers or {})}
    if body or method == "POST":
        h.setdefault("Content-Type", "application/json")
        h["Content-Length"] = str(len(body))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    return head.encode() + body


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(round(q * len(v) / 100, 9)) - 1))]


# --- asyncio connection -------------------------------------------------------------


class Conn(asyncio.Protocol):
    """One client connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser: ResponseParser | None = None
        self.fut: asyncio.Future | None = None
        self.closed = False
        self.stray = 0  # bytes received with no request outstanding

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        p = self.parser
        if p is None or p.done:
            self.stray += len(data)
            return
        p.feed(data)
        if p.done and self.fut and not self.fut.done():
            self.fut.set_result(p)

    def eof_received(self):
        return None  # close the transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        p = self.parser
        if p is not None and p.state == "eof":  # a body delimited by the close
            p.state = "done"
        if self.fut and not self.fut.done():
            if p is not None and p.done:
                self.fut.set_result(p)
            else:
                self.fut.set_exception(ConnectionError(f"closed mid-answer ({exc or 'EOF'})"))

    def send(self, raw: bytes, on_body: Callable[[bytes], None] | None = None) -> asyncio.Future:
        self.parser = ResponseParser(on_body)
        self.fut = asyncio.get_running_loop().create_future()
        if self.closed:
            self.fut.set_exception(ConnectionError("connection already closed"))
        else:
            self.transport.write(raw)
        return self.fut


async def connect_all(host: str, port: int, n: int, parallel: int = 256) -> tuple[list[Conn], list[str]]:
    """n connections, at most `parallel` handshakes in flight (the accept backlog is finite)."""
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(parallel)
    errors: list[str] = []

    async def one() -> Conn | None:
        async with sem:
            try:
                _, proto = await asyncio.wait_for(loop.create_connection(Conn, host, port), 10)
                return proto
            except (OSError, asyncio.TimeoutError) as e:
                errors.append(f"connect: {e!r}")
                return None

    conns = await asyncio.gather(*(one() for _ in range(n)))
    return [c for c in conns if c is not None], errors


# --- SSE completions ------------------------------------------------------------------

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux


class TimedConn:
    """A connection read with recvmsg and SO_TIMESTAMPNS: each read carries the kernel's
    receive time of its data (CLOCK_REALTIME, ns), so the times measured do not include
    the client's own event-loop delay, however many streams it juggles."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop):
        self.sock, self.loop = sock, loop
        self.closed = False
        self.parser: ResponseParser | None = None
        self.fut: asyncio.Future | None = None
        self.on_data: Callable[[bytes, int], None] | None = None
        self.last_ts = 0
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        loop.add_reader(sock.fileno(), self._readable)

    @classmethod
    async def open(cls, host: str, port: int) -> "TimedConn":
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), 10)
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, loop)

    def _readable(self) -> None:
        try:
            data, anc, _, _ = self.sock.recvmsg(262144, socket.CMSG_SPACE(16))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lost(e)
            return
        if not data:
            self._lost(None)
            return
        ts = 0
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(cdata) >= 16:
                sec, nsec = struct.unpack("qq", cdata[:16])
                ts = sec * 1_000_000_000 + nsec
        self.last_ts = ts or time.time_ns()
        p = self.parser
        if p is None or p.done:
            return
        p.feed(data)
        if p.done and self.fut and not self.fut.done():
            self.fut.set_result(p)

    def _lost(self, exc) -> None:
        self.close()
        p = self.parser
        if p is not None and p.state == "eof":
            p.state = "done"
        if self.fut and not self.fut.done():
            if p is not None and p.done:
                self.fut.set_result(p)
            else:
                self.fut.set_exception(ConnectionError(f"closed mid-answer ({exc or 'EOF'})"))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()

    def send(self, raw: bytes, on_body: Callable[[bytes], None]) -> asyncio.Future:
        self.parser = ResponseParser(on_body)
        self.fut = self.loop.create_future()
        if self.closed:
            self.fut.set_exception(ConnectionError("connection already closed"))
        else:
            self.sock.send(raw)  # a few hundred bytes: the socket buffer takes them at once
        return self.fut


class _Stream:
    __slots__ = ("conn", "text", "first", "t0", "fut")

    def __init__(self, conn: TimedConn, raw: bytes):
        self.conn, self.text, self.first = conn, bytearray(), 0
        self.t0 = time.time_ns()
        self.fut = conn.send(raw, self.on_body)

    def on_body(self, b: bytes) -> None:
        self.text.extend(b)
        if not self.first and b"data:" in self.text:
            self.first = self.conn.last_ts


async def _sse_streams(host: str, port: int, n: int, duration: float, body: bytes, headers: dict | None) -> dict:
    raw = request_bytes("POST", host, port, "/v1/chat/completions", body, headers)
    errors: list[str] = []
    sem = asyncio.Semaphore(256)

    async def connect() -> TimedConn | None:
        async with sem:
            try:
                return await TimedConn.open(host, port)
            except (OSError, asyncio.TimeoutError) as e:
                errors.append(f"connect: {e!r}")
                return None

    conns = [c for c in await asyncio.gather(*(connect() for _ in range(n))) if c]
    ttfb: list[float] = []
    totals: list[float] = []
    statuses: dict[str, int] = {}
    no_done = 0
    rounds = 0
    deadline = now() + duration
    # Rounds: every stream starts at once (one tight loop of sends); the next round starts
    # when the last one has ended.
    while conns and (rounds == 0 or now() < deadline):
        rounds += 1
        for i, c in enumerate(conns):
            if c.closed:  # the server ended the previous keep-alive: a new connection
                try:
                    conns[i] = await TimedConn.open(host, port)
                except (OSError, asyncio.TimeoutError) as e:
                    errors.append(f"reconnect: {e!r}")
        streams = []
        for c in conns:
            if c.closed:
                continue
            try:
                streams.append(_Stream(c, raw))
            except OSError as e:
                errors.append(f"send: {e!r}")
                c.close()
        if not streams:
            break
        await asyncio.wait([st.fut for st in streams], timeout=60)
        for st in streams:
            if not st.fut.done():
                st.fut.cancel()
                errors.append("stream: no end within 60 s")
                st.conn.close()
                continue
            if st.fut.exception():
                errors.append(f"stream: {st.fut.exception()!r}")
                st.conn.close()
                continue
            p = st.fut.result()
            statuses[str(p.status)] = statuses.get(str(p.status), 0) + 1
            if not p.keep_alive:
                st.conn.close()
            if p.status != 200:
                continue
            if b"data: [DONE]" not in st.text:
                no_done += 1
            if st.first:
                ttfb.append((st.first - st.t0) / 1e9)
            totals.append((st.conn.last_ts - st.t0) / 1e9)
    for c in conns:
        c.close()
    return {
        "connections": n,
        "rounds": rounds,
        "streams": len(totals),
        "statuses": statuses,
        "errors": len(errors),
        "error_samples": errors[:5],
        "without_done": no_done,
        "ttfb_ms": {f"p{q}": _ms(pct(ttfb, q)) for q in (50, 99, 99.9)},
        "total_ms": {f"p{q}": _ms(pct(totals, q)) for q in (50, 99, 99.9)},
    }


def sse_streams(host: str, port: int, n: int, duration: float, body: bytes, headers: dict | None = None) -> dict:
    return asyncio.run(_sse_streams(host, port, n, duration, body, headers))


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1e3


# --- dashboard SSE readers ------------------------------------------------------------


async def _dashboard_clients(host: str, port: int, n: int, hold: float, mark: Callable[[str], None]) -> dict:
    raw = request_bytes("GET", host, port, "/api/dashboard/stream", headers={"Accept": "text/event-stream"})
    conns, errors = await connect_all(host, port, n)
    frames = [0] * len(conns)
    futs = []
    for i, c in enumerate(conns):
        pending = bytearray()

        def on_body(b: bytes, i=i, pending=pending) -> None:
            pending.extend(b)
            lines = pending.split(b"\n")
            frames[i] += sum(1 for line in lines[:-1] if line.startswith(b"data:"))
            pending[:] = lines[-1]

        futs.append(c.send(raw, on_body))
    limit = now() + 30
    while any(c.parser.status is None and not c.closed for c in conns) and now() < limit:
        await asyncio.sleep(0.02)
    statuses: dict[str, int] = {}
    for c in conns:
        k = str(c.parser.status) if c.parser.status is not None else "no answer"
        statuses[k] = statuses.get(k, 0) + 1
    at_start = list(frames)
    mark("start")
    t0 = now()
    await asyncio.sleep(hold)
    window = now() - t0
    at_end = list(frames)
    mark("end")
    ended_early = 0
    for f in futs:
        if f.done():
            ended_early += 1
            if f.exception():
                errors.append(f"stream: {f.exception()!r}")
        else:
            f.cancel()
    for c in conns:
        if c.transport:
            c.transport.close()
    in_window = [e - s for s, e in zip(at_start, at_end)]
    return {
        "clients": n,
        "connected": len(conns),
        "statuses": statuses,
        "errors": len(errors),
        "error_samples": errors[:5],
        "ended_early": ended_early,
        "window_s": window,
        "frames_in_window": {
            "min": min(in_window, default=0),
            "median": statistics.median(in_window) if in_window else 0,
            "max": max(in_window, default=0),
        },
        "clients_without_frames": sum(1 for f in frames if f == 0) + (n - len(conns)),
        "frames_total": sum(frames),
    }


def dashboard_clients(host: str, port: int, n: int, hold: float, mark: Callable[[str], None]) -> dict:
    """n dashboard streams; `mark("start")` once every one has its answer head, then
    `hold` seconds of reading, then `mark("end")`."""
    return asyncio.run(_dashboard_clients(host, port, n, hold, mark))


# --- blocking sockets -----------------------------------------------------------------


def read_response(sock: socket.socket) -> ResponseParser:
    p = ResponseParser()
    while not p.done:
        data = sock.recv(65536)
        if not data:
            if p.state == "eof":
                p.state = "done"
                break
            raise ConnectionError("closed mid-answer" if p.status else "closed before answering")
        p.feed(data)
    return p


def idle_connections(host: str, port: int, n: int, hold: float, sample: Callable[[], None], batch: int = 500) -> dict:
    """Open n keep-alive connections (batch by batch, one GET /healthz each), hold them
    idle for `hold` seconds calling `sample()` every 100 ms, then ask /healthz again on
    every one of them: a connection the server dropped while idle shows up there."""
    raw = request_bytes("GET", host, port, "/healthz")
    socks: list[socket.socket] = []
    errors: list[str] = []
    statuses: dict[str, int] = {}

    def ask(group: list[socket.socket]) -> list[socket.socket]:
        sent = []
        for s in group:
            try:
                s.sendall(raw)
                sent.append(s)
            except OSError as e:
                errors.append(f"send: {e!r}")
                s.close()
        ok = []
        for s in sent:
            try:
                p = read_response(s)
            except (OSError, ConnectionError) as e:
                errors.append(f"answer: {e!r}")
                s.close()
                continue
            statuses[str(p.status)] = statuses.get(str(p.status), 0) + 1
            if p.status == 200 and p.keep_alive:
                ok.append(s)
            else:
                s.close()
        return ok

    t0 = now()
    for start in range(0, n, batch):
        group = []
        for _ in range(min(batch, n - start)):
            s = socket.socket()
            s.settimeout(15)
            try:
                s.connect((host, port))
                group.append(s)
            except OSError as e:
                errors.append(f"connect: {e!r}")
                s.close()
        socks.extend(ask(group))
        sample()
    open_s = now() - t0
    opened = len(socks)
    held_from = now()
    while now() - held_from < hold:
        sample()
        time.sleep(0.1)
    sample()
    before = len(errors)
    alive = []
    for start in range(0, len(socks), batch):
        alive.extend(ask(socks[start : start + batch]))
    for s in alive:
        s.close()
    return {
        "connections": n,
        "opened": opened,
        "open_s": open_s,
        "held_s": hold,
        "alive_after_hold": len(alive),
        "dropped_while_idle": opened - len(alive),
        "statuses": statuses,
        "errors": len(errors),
        "errors_after_hold": len(errors) - before,
        "error_samples": errors[:5],
    }


def probe(host: str, port: int, raw: bytes, stop: threading.Event, out: dict,
          interval: float = 0.0, connections: int = 1, grace: float = 20.0) -> None:
    """Time answers to `raw` by status until `stop`; results land in `out` when it returns
    (for a thread). Without `interval`: one keep-alive connection, back to back. With it:
    one request every `interval` seconds on a fixed schedule, each on whichever of
    `connections` keep-alive connections is free (an admitted request waits in the queue
    for a while and should not hold up the next 429s); a request due while all are busy
    is skipped and counted. Latency runs from the send to the end of the answer. A paced
    request still unanswered `grace` seconds after `stop` is counted in
    `unanswered_at_end`, and the results are returned without it."""
    lat: dict[str, list[float]] = {}
    errors: list[str] = []
    counts = {"no_retry_after": 0, "reconnects": 0, "skipped": 0, "busy": 0}
    lock = threading.Lock()
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    inflight: dict[int, float] = {}  # thread id -> send time of its unanswered request

    def conn_loop(paced: bool) -> None:
        s = None
        me = threading.get_ident()
        while not stop.is_set():
            if paced:
                try:
                    jobs.get(timeout=0.1)
                except queue.Empty:
                    continue
            t0 = None
            try:
                if s is None:
                    s = socket.create_connection((host, port), timeout=30)
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                t0 = inflight[me] = now()
                s.sendall(raw)
                r = read_response(s)
                dt = now() - t0
                del inflight[me]
            except (OSError, ConnectionError) as e:
                with lock:
                    inflight.pop(me, None)
                    errors.append(f"connect: {e!r}" if t0 is None else f"{e!r} {now() - t0:.3f} s after the send")
                    counts["busy"] -= paced
                if s:
                    s.close()
                s = None
                if not paced:
                    time.sleep(0.01)
                continue
            with lock:
                lat.setdefault(str(r.status), []).append(dt)
                if r.status == 429 and "retry-after" not in r.headers:
                    counts["no_retry_after"] += 1
                if not r.keep_alive:
                    counts["reconnects"] += 1
                counts["busy"] -= paced
            if not r.keep_alive:
                s.close()
                s = None
        if s:
            s.close()

    if not interval:
        conn_loop(False)
    else:
        threads = [threading.Thread(target=conn_loop, args=(True,), daemon=True) for _ in range(connections)]
        for t in threads:
            t.start()
        due = now()
        while True:
            due += interval
            if stop.wait(max(0.0, due - now())):
                break
            with lock:
                if counts["busy"] >= connections:
                    counts["skipped"] += 1
                    continue
                counts["busy"] += 1
            jobs.put(due)
        # Whatever is still unanswered after `grace` is reported as such, not waited for.
        end = now() + grace
        for t in threads:
            t.join(timeout=max(0.0, end - now()))
    with lock:  # a late answer may still land meanwhile
        stuck = sorted(now() - t0 for t0 in list(inflight.values()))
        got = {k: list(v) for k, v in lat.items()}
        errs = list(errors)
    out.update({
        "unanswered_at_end": len(stuck),
        "unanswered_waited_s": [round(x, 3) for x in stuck],
        "statuses": {k: len(v) for k, v in got.items()},
        "latency_ms": {k: {f"p{q}": _ms(pct(v, q)) for q in (50, 99, 99.9)} for k, v in got.items()},
        "interval_s": interval,
        "connections": connections,
        "skipped_all_busy": counts["skipped"],
        "errors": len(errs),
        "error_samples": errs[:5],
        "429_without_retry_after": counts["no_retry_after"],
        "reconnects": counts["reconnects"],
    })
