//! Connection fairness: connections that send nothing cannot lock real clients out.
//!
//! - A new connection that sends nothing is closed after `first_byte_timeout`, sooner
//!   than an established idle one; one that has started its request is not.
//! - Near the connection cap the oldest silent connections are shed to make room, so a
//!   flood of them delays a real client by milliseconds instead of until a timeout frees
//!   slots (before: 10,000 silent connections at the default cap of 8,192 delayed one
//!   by 8.5 s, the header read timeout).
//! - `max_connections_per_ip` refuses connections beyond N from one address.
//!
//! The clients here are plain blocking sockets: whether the sidecar closed one is read
//! straight from the socket (a non-blocking read), with no runtime in between.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use nvidia_sidecar::mock::MockConfig;

/// Longest any step here may take before the test calls it a failure: far above what
/// the behaviour needs (milliseconds), far below the timeouts that would otherwise end
/// the wait (30 s in these tests).
const GENEROUS: Duration = Duration::from_secs(5);

/// Timeouts long enough that no slot is freed by one during a test: what closes a
/// connection there is the behaviour under test.
const NO_TIMEOUTS: [(&str, &str); 2] = [
    ("SIDECAR_FIRST_BYTE_TIMEOUT", "30"),
    ("SIDECAR_HEADER_READ_TIMEOUT", "30"),
];

fn connect_from(addr: SocketAddr, from: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(ip) = from else {
        return TcpStream::connect(addr);
    };
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(ip, 0).into())?;
    socket.connect(&addr.into())?;
    Ok(socket.into())
}

/// Opens `n` connections that never send a byte, in order, non-blocking.
fn open_silent(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let s = TcpStream::connect(addr)
                .unwrap_or_else(|e| panic!("silent connection {i} of {n}: {e}"));
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect()
}

/// Whether the sidecar has closed this non-blocking connection, without waiting.
fn closed(s: &TcpStream) -> bool {
    let mut buf = [0u8; 1];
    match (&*s).read(&mut buf) {
        Ok(0) => true,
        Ok(_) => panic!("a connection that sent nothing got an answer"),
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

fn count_closed(socks: &[TcpStream]) -> usize {
    socks.iter().filter(|s| closed(s)).count()
}

/// Polls until `cond` holds (an observed event), for at most [`GENEROUS`].
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + GENEROUS;
    while !cond() {
        assert!(Instant::now() < deadline, "not within {GENEROUS:?}: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends `GET /healthz` on `s` and reads one whole response (by Content-Length) within
/// [`GENEROUS`]; returns its status line.
fn healthz_on(s: &mut TcpStream) -> std::io::Result<String> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(GENEROUS))?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: sidecar\r\n\r\n")?;
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + len {
                return Ok(head.lines().next().unwrap_or_default().to_owned());
            }
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk)? {
            0 => {
                return Err(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "closed before a whole response",
                ))
            }
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// `GET /healthz` on a fresh connection from `from` (default: 127.0.0.1).
fn healthz(addr: SocketAddr, from: Option<IpAddr>) -> std::io::Result<String> {
    healthz_on(&mut connect_from(addr, from)?)
}

/// This process's open-file limit (`ulimit -n`).
fn open_file_limit() -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX)
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

#[test]
fn ten_thousand_silent_connections_at_the_default_cap_do_not_keep_a_real_client_out() {
    const SILENT: usize = 10_000;
    const CAP: usize = 8_192; // the default of max_connections
                              // Both ends of every connection live in this process.
    let needed = SILENT + CAP + 500;
    let limit = open_file_limit();
    assert!(
        limit >= needed,
        "this test needs {needed} open files, `ulimit -n` is {limit}: raise it (ulimit -n {needed})"
    );
    let s = stack(
        MockConfig::default(),
        &[NO_TIMEOUTS[0], NO_TIMEOUTS[1], ("SIDECAR_WORKERS", "2")],
    );
    assert_eq!(s.app.config.limits.max_connections, CAP);
    let rss_before = rss_mib();

    let t = Instant::now();
    let silent = open_silent(s.addr, SILENT);
    let opening = t.elapsed();

    let t = Instant::now();
    let status = healthz(s.addr, None);
    let delay = t.elapsed();
    let shed_by_then = count_closed(&silent);
    let rss_grown = rss_mib() - rss_before;
    eprintln!(
        "{SILENT} silent connections opened in {opening:?}; the real client waited \
         {delay:?} for its answer, {shed_by_then} silent connections shed by then; this \
         process (both ends of every connection) grew by {rss_grown:.1} MiB RSS"
    );
    let status = status.unwrap_or_else(|e| {
        panic!("the real client got no answer within {GENEROUS:?} ({e}); {shed_by_then} silent connections shed")
    });
    assert!(status.starts_with("http/1.1 200"), "{status}");
    // The README's figure for the sidecar alone at 10,000 idle connections; shedding
    // keeps silent ones well under it, client ends included.
    assert!(
        rss_grown <= 42.0,
        "{rss_grown:.1} MiB for {SILENT} silent connections"
    );

    // Every silent connection is accepted in the end; the cap holds, so at least this
    // many were shed (none timed out: the timeouts are 30 s).
    let must_shed = SILENT + 1 - CAP;
    wait_for("the excess silent connections shed", || {
        count_closed(&silent) >= must_shed
    });
    s.stop();
}

#[test]
fn near_the_cap_the_oldest_silent_connections_are_shed_first() {
    let s = stack(
        MockConfig::default(),
        &[
            NO_TIMEOUTS[0],
            NO_TIMEOUTS[1],
            ("SIDECAR_WORKERS", "1"),
            ("SIDECAR_MAX_CONNECTIONS", "100"),
        ],
    );
    let silent = open_silent(s.addr, 150);
    let t = Instant::now();
    let status = healthz(s.addr, None)
        .unwrap_or_else(|e| panic!("no answer with 150 silent connections at a cap of 100: {e}"));
    eprintln!("answered in {:?}", t.elapsed());
    assert!(status.starts_with("http/1.1 200"), "{status}");
    // One worker accepts in arrival order, so every silent connection was accepted
    // before the real client: what was shed is final, and it is the oldest ones.
    let closed: Vec<bool> = silent.iter().map(closed).collect();
    let shed = closed.iter().take_while(|c| **c).count();
    assert!(
        closed[shed..].iter().all(|c| !c),
        "shed out of order: {closed:?}"
    );
    assert!(shed > 150 - 100, "{shed} shed");
    // The newest silent connections are still held: shedding keeps what fits.
    assert!(shed < 100, "{shed} shed");
    s.stop();
}

#[test]
fn a_silent_new_connection_is_closed_sooner_than_an_established_idle_one() {
    let s = stack(
        MockConfig::default(),
        &[
            ("SIDECAR_FIRST_BYTE_TIMEOUT", "0.3"),
            ("SIDECAR_HEADER_READ_TIMEOUT", "30"),
        ],
    );
    let mut established = TcpStream::connect(s.addr).unwrap();
    assert!(healthz_on(&mut established)
        .unwrap()
        .starts_with("http/1.1 200"));

    let t = Instant::now();
    let mut silent = TcpStream::connect(s.addr).unwrap();
    let mut started = TcpStream::connect(s.addr).unwrap();
    started.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();

    silent.set_read_timeout(Some(GENEROUS)).unwrap();
    let got = silent.read(&mut [0u8; 16]);
    let after = t.elapsed();
    eprintln!("silent connection closed after {after:?}");
    assert!(
        matches!(got, Ok(0)) || matches!(&got, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "a silent connection still open after {after:?}: {got:?}"
    );

    // The established one, idle since long before, is still open and serves.
    established.set_nonblocking(true).unwrap();
    assert!(!closed(&established), "the idle connection was closed");
    assert!(healthz_on(&mut established)
        .unwrap()
        .starts_with("http/1.1 200"));

    // So is the one that had started its request when the silent one was closed: the
    // header read timeout is its limit, not the first-byte one.
    started.write_all(b"host: sidecar\r\n\r\n").unwrap();
    started.set_read_timeout(Some(GENEROUS)).unwrap();
    let mut head = [0u8; 12];
    started.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    s.stop();
}

#[test]
fn connections_beyond_the_per_address_cap_are_refused_and_other_addresses_get_in() {
    let s = stack(
        MockConfig::default(),
        &[
            NO_TIMEOUTS[0],
            NO_TIMEOUTS[1],
            ("SIDECAR_WORKERS", "2"),
            ("SIDECAR_MAX_CONNECTIONS_PER_IP", "3"),
        ],
    );
    let mut silent = open_silent(s.addr, 5);
    wait_for("two of five connections from one address refused", || {
        count_closed(&silent) == 2
    });
    silent.retain(|c| !closed(c));
    assert_eq!(silent.len(), 3);

    let other = Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    assert!(healthz(s.addr, other).unwrap().starts_with("http/1.1 200"));
    assert!(
        healthz(s.addr, None).is_err(),
        "a fourth connection from 127.0.0.1 answered"
    );

    // A slot given back is a slot to take.
    drop(silent.pop());
    wait_for("a connection from 127.0.0.1 answered again", || {
        healthz(s.addr, None).is_ok_and(|st| st.starts_with("http/1.1 200"))
    });
    assert_eq!(count_closed(&silent), 0, "the others were kept");
    s.stop();
}
