//! The shared budget's Redis script, rule by rule, on a fake clock against a real Redis.
//!
//! Each test starts its own `redis-server` (no persistence) and drives `budget.lua`
//! through the same calls the replicas make, with the script's clock key set, so every
//! count is exact and no assertion depends on timing.

mod common;

use common::redis::Redis;
use nvidia_sidecar::budget::script::{self, Caller, Keys, Reply};
use redis::aio::MultiplexedConnection;

const W: u64 = 6_000;
const T0: u64 = 1_000_000_000;
/// How long a grant counts: the window, no margin, and the lease time (1% of the window,
/// at least 20 ms).
const SPAN: u64 = W + 60;
/// Past the first generation's learning mode.
const AFTER: u64 = T0 + 2 * W;

// Indexes in `Keys::all()`.
const CLOCK: usize = 8;
const SHARE: usize = 5;
const TLOG: usize = 9;
const TCNT: usize = 10;
const TTOT: usize = 11;

/// What a `tlease` carries besides want and least.
#[derive(Default)]
struct Extra<'a> {
    /// A token lease's member and how many of its tokens go back unused.
    back: (&'a str, u64),
    /// Live replicas this replica last knew.
    live: u32,
    /// Settlement: (member, tokens the provider counted more (+) or fewer (-)).
    adjust: &'a [(&'a str, i64)],
}

struct Budget {
    conn: MultiplexedConnection,
    script: redis::Script,
    keys: Keys,
    gen: String,
}

impl Budget {
    async fn new(redis: &Redis) -> Self {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", redis.port)).unwrap();
        Self {
            conn: client.get_multiplexed_async_connection().await.unwrap(),
            script: script::script(),
            keys: Keys::new("test:", "nvidia"),
            gen: String::new(),
        }
    }

    async fn at(&mut self, now: u64, rid: &str, op: &str, args: &[String]) -> Reply {
        let _: () = redis::cmd("SET")
            .arg(&self.keys.all()[CLOCK])
            .arg(now)
            .query_async(&mut self.conn)
            .await
            .unwrap();
        let v = script::call(
            &mut self.conn,
            &self.script,
            &self.keys,
            op,
            Caller {
                rid,
                gen: &self.gen,
                version: -1,
            },
            args,
        )
        .await
        .unwrap();
        Reply::parse(&v).unwrap()
    }

    /// Creates the budget: `rate_rpm` over a 6 s window, no margin, the given capacity.
    async fn join(&mut self, now: u64, rid: &str, rate_rpm: f64, capacity: u32) -> Reply {
        self.join_with(now, rid, rate_rpm, capacity, &[]).await
    }

    async fn join_with(
        &mut self,
        now: u64,
        rid: &str,
        rate_rpm: f64,
        capacity: u32,
        extra: &[(&str, String)],
    ) -> Reply {
        let args: Vec<String> = [
            ("rate_rpm", rate_rpm.to_string()),
            ("capacity", capacity.to_string()),
            ("window_ms", W.to_string()),
            ("margin_ms", "0".into()),
            ("fallback", "0".into()),
            ("probe_interval_ms", "60000".into()),
            ("default_pause_ms", "1000".into()),
            ("retreat_factor", "0.5".into()),
            ("retreat_floor", "0.1".into()),
            ("quiet_ms", "30000".into()),
            ("step", "0.1".into()),
            ("recovery_ms", "10000".into()),
            ("fallback_for_ms", "10000".into()),
        ]
        .into_iter()
        .chain(extra.iter().cloned())
        .flat_map(|(k, v)| [k.to_owned(), v])
        .collect();
        let r = self.at(now, rid, "join", &args).await;
        self.gen.clone_from(&r.generation);
        r
    }

    async fn seed(&mut self, now: u64, rid: &str, pairs: &[(u64, u32)]) -> Reply {
        let mut args = vec![self.gen.clone()];
        for (age, n) in pairs {
            args.push(age.to_string());
            args.push(n.to_string());
        }
        self.at(now, rid, "seed", &args).await
    }

    /// A lease of `want` for `rid`, which has requests waiting, offering `demand` a window.
    async fn lease(&mut self, now: u64, rid: &str, want: u32, demand: f64) -> Reply {
        self.lease_back(now, rid, want, demand, "", 0).await
    }

    async fn lease_back(
        &mut self,
        now: u64,
        rid: &str,
        want: u32,
        demand: f64,
        back: &str,
        n: u32,
    ) -> Reply {
        let args = [
            want.to_string(),
            demand.to_string(),
            "1".into(),
            back.to_owned(),
            n.to_string(),
            "1".into(),
            "1".into(),
        ];
        self.at(now, rid, "lease", &args).await
    }

    /// A lease call of `rid` that reports sends made after their lease's time, at
    /// `late` (Redis ms), and asks for nothing.
    async fn late_sends(&mut self, now: u64, rid: &str, late: &[u64]) -> Reply {
        let mut args: Vec<String> = ["0", "100", "0", "", "0", "1", "1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(late.iter().map(u64::to_string));
        self.at(now, rid, "lease", &args).await
    }

    async fn refused(&mut self, now: u64, rid: &str, kind: &str, a: u64, retry_ms: i64) -> Reply {
        self.refused_raw(now, rid, kind, a as i64, retry_ms).await
    }

    async fn refused_raw(&mut self, now: u64, rid: &str, kind: &str, a: i64, retry: i64) -> Reply {
        let args = [kind.to_owned(), a.to_string(), retry.to_string()];
        self.at(now, rid, "refused", &args).await
    }

    /// Seeds `rid` with its recent requests and, after the literal `tokens`, its tokens.
    async fn seed_tokens(
        &mut self,
        now: u64,
        rid: &str,
        requests: &[(u64, u64)],
        tokens: &[(u64, u64)],
    ) -> Reply {
        let mut args = vec![self.gen.clone()];
        let pairs = |p: &[(u64, u64)]| -> Vec<String> {
            p.iter()
                .flat_map(|(age, n)| [age.to_string(), n.to_string()])
                .collect()
        };
        args.extend(pairs(requests));
        args.push("tokens".into());
        args.extend(pairs(tokens));
        self.at(now, rid, "seed", &args).await
    }

    /// A token lease of `want` for `rid`, whose request waiting first costs `least`.
    async fn tlease(&mut self, now: u64, rid: &str, want: u64, least: u64) -> Reply {
        self.tlease_with(now, rid, want, least, Extra::default())
            .await
    }

    async fn tlease_with(
        &mut self,
        now: u64,
        rid: &str,
        want: u64,
        least: u64,
        x: Extra<'_>,
    ) -> Reply {
        let mut args = vec![
            want.to_string(),
            least.to_string(),
            x.back.0.to_owned(),
            x.back.1.to_string(),
            x.live.to_string(),
        ];
        for (m, d) in x.adjust {
            args.push((*m).to_owned());
            args.push(d.to_string());
        }
        self.at(now, rid, "tlease", &args).await
    }

    async fn hget(&mut self, key: usize, field: &str) -> Option<String> {
        redis::cmd("HGET")
            .arg(&self.keys.all()[key])
            .arg(field)
            .query_async(&mut self.conn)
            .await
            .unwrap()
    }

    /// Tokens counted in the log: `all`, or one replica's.
    async fn ttot(&mut self, field: &str) -> u64 {
        self.hget(TTOT, field)
            .await
            .map_or(0, |v| v.parse().unwrap())
    }

    /// One token grant's count (`None`: not in the log).
    async fn tcount(&mut self, member: &str) -> Option<u64> {
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg(&self.keys.all()[TLOG])
            .arg(member)
            .query_async(&mut self.conn)
            .await
            .unwrap();
        let count = self.hget(TCNT, member).await;
        assert_eq!(score.is_some(), count.is_some(), "{member}: log and counts");
        count.map(|c| c.parse().unwrap())
    }
}

/// The record's fields as the reply carried them.
fn record(r: &Reply) -> nvidia_sidecar::budget::Record {
    let mut rec = nvidia_sidecar::budget::Record::default();
    r.update(&mut rec);
    rec
}

/// Grants made: (usable from, count).
fn most_in_any_window(grants: &[(u64, u32)], window: u64) -> u32 {
    grants
        .iter()
        .map(|&(t, _)| {
            grants
                .iter()
                .filter(|&&(s, _)| s + window > t && s <= t)
                .map(|&(_, n)| n)
                .sum::<u32>()
        })
        .max()
        .unwrap_or(0)
}

/// Joins and seeds `rids` at `T0` (the first window of a new budget is learning mode).
async fn ready(b: &mut Budget, rids: &[&str], rate_rpm: f64, capacity: u32) {
    let r = b.join(T0, rids[0], rate_rpm, capacity).await;
    assert_eq!(r.status, "created");
    seed_all(b, rids).await;
}

/// As [`ready`], at 600 RPM, with a shared budget of `tokens_limit` tokens a window.
async fn ready_tokens(b: &mut Budget, rids: &[&str], tokens_limit: u64) {
    let extra = [("tokens_limit", tokens_limit.to_string())];
    let r = b.join_with(T0, rids[0], 600.0, 60, &extra).await;
    assert_eq!(r.status, "created");
    assert_eq!(r.tokens_limit, tokens_limit);
    seed_all(b, rids).await;
}

async fn seed_all(b: &mut Budget, rids: &[&str]) {
    for rid in rids {
        let r = b.lease(T0, rid, 1, 0.0).await;
        assert_eq!(r.status, "seed", "a replica that has not seeded must first");
        assert_eq!(b.seed(T0, rid, &[]).await.status, "seeded");
    }
}

#[tokio::test]
async fn three_replicas_never_get_more_than_the_limit_in_any_window() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    let rids = ["a", "b", "c"];
    ready(&mut b, &rids, 600.0, 1).await; // 60 per 6 s window, one token a lease
    let mut grants = Vec::new();
    let mut by = [0u32; 3];
    // Each replica asks every 20 ms for 5 windows, all with requests waiting.
    let mut now = T0;
    while now < T0 + 5 * W {
        for (i, rid) in rids.iter().enumerate() {
            let r = b.lease(now, rid, 1, 100.0).await;
            assert_eq!(r.status, "ok");
            if r.granted > 0 {
                grants.push((now + r.start_in.as_millis() as u64, r.granted));
                by[i] += r.granted;
            }
        }
        now += 20;
    }
    let most = most_in_any_window(&grants, W);
    let total: u32 = by.iter().sum();
    println!("grants {total} over 5 windows, by replica {by:?}, most in any window {most}");
    assert!(most <= 60, "{most} grants in one window, limit 60");
    // The bucket paces 60 a window; the first window started empty (learning mode).
    assert!(total >= 5 * 60 - 60, "only {total} granted");
    for n in by {
        assert!(
            (80..=120).contains(&n),
            "equal demand, unequal parts: {by:?}"
        );
    }
}

#[tokio::test]
async fn leases_are_scheduled_and_sized_to_the_rate() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready(&mut b, &["a", "b"], 60_000.0, 1).await; // 6,000 a window: leases up to 60
    let later = T0 + W + 1; // past learning mode
    let r = b.lease(later, "a", 60, 1000.0).await;
    assert_eq!(r.granted, 60, "the bucket holds one full lease");
    let r2 = b.lease(later, "b", 60, 1000.0).await;
    assert_eq!(r2.granted, 60, "the next replica is scheduled behind it");
    assert_eq!(r2.start_in.as_millis(), 60, "60 tokens at 1 ms each");
    // Less than half a lease left within the horizon: told when to come back.
    let r3 = b.lease(later, "a", 1000, 1000.0).await;
    assert!(r3.granted == 0 || r3.granted >= 30, "{r3:?}");
}

#[tokio::test]
async fn unused_tokens_go_back() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready(&mut b, &["a"], 60_000.0, 1).await;
    let later = T0 + W + 1;
    let r = b.lease(later, "a", 50, 1000.0).await;
    assert_eq!(r.granted, 50);
    let r = b
        .lease_back(later + 100, "a", 0, 1000.0, &r.member, 20)
        .await;
    let all = r.shares.iter().find(|(k, _)| k == "all").unwrap().1;
    assert_eq!(all, 30, "20 of 50 given back");
}

/// A request written after its lease's time (a busy machine) is counted again from its
/// send: the provider counts it for a window from then, after its grant left the log.
#[tokio::test]
async fn a_late_send_is_counted_again_from_its_send() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready(&mut b, &["a"], 600.0, 60).await;
    let all = |r: &Reply| {
        r.shares
            .iter()
            .find(|(k, _)| k == "all")
            .map_or(0, |(_, n)| *n)
    };
    let r = b.lease(AFTER, "a", 1, 100.0).await;
    assert_eq!(r.granted, 1, "{r:?}");
    let sent = AFTER + 500;
    let r = b.late_sends(sent + 5, "a", &[sent]).await;
    assert_eq!(all(&r), 2, "the grant and its late send: {r:?}");
    // The grant's span ends (its score may be moved back by up to a lease time).
    let r = b.late_sends(AFTER + SPAN + 1, "a", &[]).await;
    assert_eq!(all(&r), 1, "the late send still counts: {r:?}");
    let r = b.late_sends(sent + W + 1, "a", &[]).await;
    assert_eq!(
        all(&r),
        1,
        "while the provider counts it, and the margin after: {r:?}"
    );
    let r = b.late_sends(sent + SPAN + 1, "a", &[]).await;
    assert_eq!(all(&r), 0, "then it leaves: {r:?}");
    let now = sent + 3 * SPAN;
    let r = b.late_sends(now, "a", &[now - SPAN - 1, now + 1_000]).await;
    assert_eq!(
        all(&r),
        1,
        "a send older than a span is past counting; one reported ahead of Redis's clock counts from now: {r:?}"
    );
}

#[tokio::test]
async fn a_429_teaches_the_cluster_k_minus_one_with_its_pause() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready(&mut b, &["a", "b"], 600.0, 60).await;
    let later = T0 + 2 * W; // past learning mode
                            // 40 grants in the window, then the 40th send is refused.
    let mut last = 0;
    for i in 0..40u64 {
        let rid = if i % 2 == 0 { "a" } else { "b" };
        let r = b.lease(later + i * 10, rid, 1, 100.0).await;
        assert_eq!(r.granted, 1, "grant {i}: {r:?}");
        last = later + i * 10;
    }
    let r = b.refused(last + 50, "a", "rate", last, 2_000).await;
    assert_eq!(r.limit, 39, "k - 1");
    assert_eq!(r.pause_until_ms, last + 50 + 2_000);
    // The other replica learns it on its next call, and is paused too.
    let r = b.lease(last + 100, "b", 1, 100.0).await;
    assert_eq!((r.limit, r.granted), (39, 0));
    assert!(r.wait.as_millis() >= 1_900, "{r:?}");
    assert!(r
        .record
        .iter()
        .any(|(k, v)| k == "source" && v == "learned_429"));
    // A later 429 in the same window at a higher count teaches nothing more.
    let r = b.refused(last + 200, "b", "rate", last, -1).await;
    assert_eq!(r.limit, 39);
}

#[tokio::test]
async fn a_probe_runs_once_for_the_cluster_and_proves_its_count() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready(&mut b, &["a", "b"], 600.0, 60).await;
    let mut now = T0 + 2 * W; // past learning mode
    for i in 0..31 {
        let rid = if i % 2 == 0 { "a" } else { "b" };
        let r = b.lease(now, rid, 1, 100.0).await;
        assert_eq!(r.granted, 1, "grant {i}: {r:?}");
        now += 10;
    }
    let r = b.refused(now, "a", "rate", now - 10, 0).await;
    assert_eq!(r.limit, 30);
    // Past the probe interval (60 s) and a window after the 429, with requests waiting.
    now += 61_000;
    let r = b.lease(now, "a", 1, 100.0).await;
    assert!(r.probing, "{r:?}");
    assert_eq!(r.limit, 60, "the probe lifts the limit to the ceiling");
    let r = b.lease(now + 10, "b", 1, 100.0).await;
    assert!(r.probing, "one probe for the cluster");
    // Up to 45 sent in the probe's window without a 429: proven.
    let mut t = now + 20;
    for i in 0..43 {
        let rid = if i % 2 == 0 { "a" } else { "b" };
        b.lease(t, rid, 1, 100.0).await;
        t += 10;
    }
    let r = b.lease(now + W + 1, "a", 0, 100.0).await;
    assert!(!r.probing);
    assert_eq!(r.limit, 45, "{r:?}");
}

#[tokio::test]
async fn a_lost_state_starts_a_generation_in_learning_mode() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready(&mut b, &["a", "b"], 600.0, 60).await;
    let later = T0 + W + 1;
    assert_eq!(b.lease(later, "a", 1, 100.0).await.granted, 1);
    // Redis restarts empty.
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut b.conn)
        .await
        .unwrap();
    let r = b.lease(later + 100, "a", 1, 100.0).await;
    assert_eq!(r.status, "lost", "a missing key is never a full bucket");
    let r = b.join(later + 100, "a", 600.0, 60).await;
    assert!(r.learning);
    let r = b.lease(later + 100, "a", 1, 100.0).await;
    assert_eq!(
        r.status, "seed",
        "no lease before this replica reported its sends"
    );
    // "a" sent 25 in the last window; "b" 10.
    b.seed(later + 100, "a", &[(1_000, 25)]).await;
    b.seed(later + 100, "b", &[(2_000, 10)]).await;
    // Learning mode: each at most its share (60 / 2 live) less what it sent.
    let mut got = 0;
    for i in 0..20u64 {
        got += b.lease(later + 200 + i * 100, "a", 1, 100.0).await.granted;
    }
    assert_eq!(got, 5, "30 share - 25 seeded");
}

#[tokio::test]
async fn a_vanished_replica_keeps_its_share_reserved_then_frees_it() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready(&mut b, &["a", "b", "c"], 600.0, 60).await;
    let mut now = T0 + W + 1;
    b.lease(now, "a", 0, 0.0).await;
    b.lease(now, "b", 0, 0.0).await;
    let r = b.lease(now, "c", 0, 0.0).await;
    assert_eq!((r.live, r.share), (3, 20));
    // "c" goes silent; "a" and "b" heartbeat.
    now += 4_000;
    b.lease(now, "b", 0, 0.0).await;
    let r = b.lease(now, "a", 0, 0.0).await;
    assert_eq!(
        (r.live, r.reserved),
        (2, 20),
        "c may still send its 20 alone"
    );
    // fallback_for (10 s) + a span + 3 s later, it is forgotten.
    now += 10_000 + W + 3_000;
    b.lease(now, "b", 0, 0.0).await;
    let r = b.lease(now, "a", 0, 0.0).await;
    assert_eq!((r.live, r.reserved), (2, 0));
}

#[tokio::test]
async fn a_configuration_change_reaches_every_replica() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready(&mut b, &["a", "b"], 600.0, 1).await;
    let r = b.lease(T0 + 10, "b", 0, 0.0).await;
    let v = r.version;
    let args: Vec<String> = ["rate_rpm", "300", "capacity", "2", "fallback", "1"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    b.at(T0 + 20, "a", "configure", &args).await;
    let r = b.lease(T0 + 30, "b", 0, 0.0).await;
    assert!(r.version > v);
    let mut rec = nvidia_sidecar::budget::Record::default();
    r.update(&mut rec);
    assert_eq!(
        (rec.rate_rpm, rec.bucket_capacity, rec.fallback),
        (300.0, 2, true)
    );
    assert_eq!(r.limit, 30, "300 RPM over 6 s");
}

/// `rediss://`: the replica reaches a TLS Redis whose certificate is signed by a CA from
/// `upstream_ca_file`, and does not without it.
#[tokio::test]
async fn a_replica_reaches_redis_over_tls_with_the_upstream_ca() {
    use common::free_port;
    use common::redis::{require_redis_server, Replica};
    use std::time::Duration;
    require_redis_server();
    let dir = tempfile::tempdir().unwrap();
    let signed = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = dir.path().join("redis.crt");
    let key = dir.path().join("redis.key");
    std::fs::write(&cert, signed.cert.pem()).unwrap();
    std::fs::write(&key, signed.signing_key.serialize_pem()).unwrap();
    let port = free_port();
    let mut server = std::process::Command::new("redis-server")
        .current_dir(dir.path())
        .args([
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--tls-port", &port.to_string()])
        .args(["--tls-cert-file", &cert.to_string_lossy()])
        .args(["--tls-key-file", &key.to_string_lossy()])
        .args(["--tls-ca-cert-file", &cert.to_string_lossy()])
        .args(["--tls-auth-clients", "no"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-server starts");
    let url = format!("rediss://localhost:{port}/0");
    let ca = cert.to_string_lossy().into_owned();
    let base = [
        ("SIDECAR_REDIS_URL", url.as_str()),
        ("SIDECAR_UPSTREAM_URL", "http://127.0.0.1:9/v1"),
    ];
    let with_ca = Replica::start(
        "tls",
        &[base[0], base[1], ("SIDECAR_UPSTREAM_CA_FILE", ca.as_str())],
    );
    let ok = with_ca
        .wait_for("on the shared budget", 0, Duration::from_secs(10))
        .await;
    let without = Replica::start("tls-no-ca", &base);
    let refused = without
        .wait_for("Redis not reached yet", 0, Duration::from_secs(10))
        .await;
    let _ = server.kill();
    let _ = server.wait();
    ok.unwrap_or_else(|e| panic!("{e}\n{}", with_ca.notable()));
    refused.unwrap_or_else(|e| panic!("{e}\n{}", without.notable()));
    assert_eq!(without.count("on the shared budget"), 0);
}

/// The script cache is emptied by a restart, a failover or `SCRIPT FLUSH`: the next call
/// loads the script again (NOSCRIPT is never an error for the replica).
#[tokio::test]
async fn a_flushed_script_cache_is_reloaded_on_demand() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready(&mut b, &["a"], 600.0, 60).await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut b.conn)
        .await
        .unwrap();
    let r = b.lease(T0 + 2 * W, "a", 1, 100.0).await;
    assert_eq!((r.status.as_str(), r.granted), ("ok", 1));
}

/// A 429 of a send made before Redis lost the state is reported to the new generation:
/// it pauses, but teaches nothing (the new log does not hold that window's sends).
#[tokio::test]
async fn a_429_from_before_a_new_generation_teaches_nothing() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready(&mut b, &["a"], 600.0, 60).await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut b.conn)
        .await
        .unwrap();
    let gen_at = T0 + 3 * W;
    b.join(gen_at, "a", 600.0, 60).await;
    let r = b
        .refused(gen_at + 10, "a", "rate", gen_at - 500, 1_000)
        .await;
    assert_eq!(
        r.limit, 60,
        "no lower limit from a send the new log never saw"
    );
    assert_eq!(r.pause_until_ms, gen_at + 10 + 1_000, "the pause holds");
    // Nor does a 429 for a send in a window the log holds nothing of.
    let r = b.refused(gen_at + 20, "a", "rate", gen_at + 15, -1).await;
    assert_eq!(r.limit, 60);
}

// === Token leases ===

#[tokio::test]
async fn token_leases_are_granted_up_to_the_limit_then_wait_for_the_oldest_grant() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready_tokens(&mut b, &["a", "b"], 1_000).await;
    let r = b.tlease(AFTER, "a", 400, 100).await;
    assert_eq!((r.status.as_str(), r.granted), ("ok", 400));
    assert!(r.member.starts_with("a|t"), "{}", r.member);
    assert_eq!((r.ttl.as_millis(), r.start_in.as_millis()), (60, 0));
    assert_eq!(b.tcount(&r.member).await, Some(400));
    assert_eq!(b.tlease(AFTER + 100, "b", 400, 100).await.granted, 400);
    // 200 left: less than wanted, but more than the request at the head costs.
    assert_eq!(b.tlease(AFTER + 200, "a", 400, 100).await.granted, 200);
    assert_eq!(
        (b.ttot("all").await, b.ttot("a").await, b.ttot("b").await),
        (1_000, 600, 400)
    );
    // Full: back when the oldest grant (400, enough for 50) leaves the span.
    let r = b.tlease(AFTER + 300, "b", 300, 50).await;
    assert_eq!(r.granted, 0);
    assert_eq!(r.wait.as_millis() as u64, AFTER + SPAN - (AFTER + 300));
    // It has: its 400 are room again ("a" heartbeats, or its share would be reserved).
    b.tlease(AFTER + SPAN, "a", 0, 0).await;
    let r = b.tlease(AFTER + SPAN, "b", 500, 50).await;
    assert_eq!(r.granted, 400);
    assert_eq!(b.ttot("all").await, 1_000);
}

#[tokio::test]
async fn a_grant_smaller_than_the_request_at_the_head_is_not_made() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready_tokens(&mut b, &["a"], 1_000).await;
    for i in 0..3 {
        assert_eq!(b.tlease(AFTER + i * 100, "a", 300, 300).await.granted, 300);
    }
    // 100 left, but the head request costs 150: nothing, although there is room.
    let r = b.tlease(AFTER + 300, "a", 200, 150).await;
    assert_eq!(r.granted, 0);
    assert_eq!(r.wait.as_millis() as u64, AFTER + SPAN - (AFTER + 300));
    assert_eq!(b.ttot("all").await, 900, "nothing taken");
    // 500 needs 400 more than the room: the two oldest grants must leave.
    let r = b.tlease(AFTER + 300, "a", 500, 500).await;
    assert_eq!(r.granted, 0);
    assert_eq!(
        r.wait.as_millis() as u64,
        AFTER + 100 + SPAN - (AFTER + 300)
    );
    // The head request costs 100: granted.
    assert_eq!(b.tlease(AFTER + 300, "a", 200, 100).await.granted, 100);
}

#[tokio::test]
async fn tokens_given_back_or_settled_lower_are_room_at_once() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready_tokens(&mut b, &["a", "b"], 1_000).await;
    let m1 = b.tlease(AFTER, "a", 600, 600).await.member;
    let m2 = b.tlease(AFTER, "b", 400, 400).await.member;
    assert_eq!(b.tlease(AFTER + 10, "a", 100, 1).await.granted, 0, "full");
    // "a" sent only 400 of its 600; "b"'s answer counted 100 fewer than reserved.
    let back = Extra {
        back: (&m1, 200),
        ..Extra::default()
    };
    b.tlease_with(AFTER + 20, "a", 0, 0, back).await;
    let fewer = Extra {
        adjust: &[(&m2, -100)],
        ..Extra::default()
    };
    b.tlease_with(AFTER + 30, "b", 0, 0, fewer).await;
    assert_eq!(
        (b.tcount(&m1).await, b.tcount(&m2).await),
        (Some(400), Some(300))
    );
    assert_eq!(
        (b.ttot("all").await, b.ttot("a").await, b.ttot("b").await),
        (700, 400, 300)
    );
    assert_eq!(b.tlease(AFTER + 40, "a", 300, 300).await.granted, 300);
    // A lease given back whole leaves the log; more than it holds is all it holds.
    let all_back = Extra {
        back: (&m1, 5_000),
        ..Extra::default()
    };
    b.tlease_with(AFTER + 50, "a", 0, 0, all_back).await;
    assert_eq!(b.tcount(&m1).await, None);
    assert_eq!((b.ttot("all").await, b.ttot("a").await), (600, 300));
}

#[tokio::test]
async fn tokens_settled_higher_take_room() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready_tokens(&mut b, &["a"], 1_000).await;
    let m = b.tlease(AFTER, "a", 500, 500).await.member;
    // The provider counted 300 more than the lease held (a longer completion).
    let more = Extra {
        adjust: &[(&m, 300)],
        ..Extra::default()
    };
    let r = b.tlease_with(AFTER + 10, "a", 300, 300, more).await;
    assert_eq!(r.granted, 0, "the settlement is counted before the grant");
    assert_eq!((b.tcount(&m).await, b.ttot("all").await), (Some(800), 800));
    assert_eq!(b.tlease(AFTER + 20, "a", 300, 200).await.granted, 200);
    // A correction below zero stops at zero.
    let fewer = Extra {
        adjust: &[(&m, -5_000)],
        ..Extra::default()
    };
    b.tlease_with(AFTER + 30, "a", 0, 0, fewer).await;
    assert_eq!((b.tcount(&m).await, b.ttot("all").await), (Some(0), 200));
}

#[tokio::test]
async fn a_settlement_of_a_grant_that_left_the_span_is_ignored() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready_tokens(&mut b, &["a"], 1_000).await;
    let m = b.tlease(AFTER, "a", 1_000, 1_000).await.member;
    let r = b.tlease(AFTER + SPAN - 1, "a", 1_000, 1_000).await;
    assert_eq!((r.granted, r.wait.as_millis()), (0, 1));
    // A span after its grant, it is trimmed: its late settlement counts nothing.
    let late = Extra {
        adjust: &[(&m, 300)],
        ..Extra::default()
    };
    let r = b.tlease_with(AFTER + SPAN, "a", 1_000, 1_000, late).await;
    assert_eq!(r.granted, 1_000, "the whole limit is room again");
    assert_eq!(b.tcount(&m).await, None);
    assert_eq!((b.ttot("all").await, b.ttot("a").await), (1_000, 1_000));
}

#[tokio::test]
async fn a_token_429_holds_token_leases_and_teaches_the_stated_limit() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready_tokens(&mut b, &["a", "b"], 1_000).await;
    let before = b.tlease(AFTER, "a", 0, 0).await;
    let r = b.refused(AFTER + 10, "a", "tokens", 600, 2_000).await;
    assert!(r.version > before.version, "the record changed");
    assert_eq!(r.tokens_limit, 600);
    let rec = record(&r);
    assert_eq!(
        (
            rec.tokens_limit,
            rec.tokens_learned,
            rec.tokens_hold_until_ms
        ),
        (1_000, 600, AFTER + 10 + 2_000)
    );
    assert_eq!((rec.tokens_source.as_str(), rec.changes), ("tokens_429", 1));
    // The other replica is held too, for what is left of the hold.
    let r = b.tlease(AFTER + 510, "b", 100, 100).await;
    assert_eq!((r.granted, r.wait.as_millis()), (0, 1_500));
    // Requests are not: no pause, and their limit stays.
    let r = b.lease(AFTER + 510, "b", 1, 100.0).await;
    assert_eq!((r.granted, r.limit, r.pause_until_ms), (1, 60, 0));
    // After the hold, the learned limit binds: 700 is never granted, 600 is.
    let r = b.tlease(AFTER + 2_010, "b", 700, 700).await;
    assert_eq!((r.granted, r.wait.as_millis() as u64), (0, W));
    assert_eq!(b.tlease(AFTER + 2_010, "b", 700, 100).await.granted, 600);
    // A 429 that states nothing: the default pause, the learned limit unchanged.
    let r = b.refused_raw(AFTER + 3_000, "a", "tokens", -1, -1).await;
    let rec = record(&r);
    assert_eq!(
        (rec.tokens_learned, rec.tokens_hold_until_ms),
        (600, AFTER + 3_000 + 1_000)
    );
    // A shorter hold never shortens a longer one.
    let r = b.refused(AFTER + 3_100, "a", "tokens", 600, 10).await;
    assert_eq!(record(&r).tokens_hold_until_ms, AFTER + 4_000);
}

#[tokio::test]
async fn a_token_limit_stated_in_headers_is_learned() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready_tokens(&mut b, &["a"], 1_000).await;
    let r = b.refused(AFTER, "a", "theader", 800, -1).await;
    let v = r.version;
    assert_eq!(r.tokens_limit, 800);
    let rec = record(&r);
    assert_eq!(
        (rec.tokens_learned, rec.tokens_source.as_str()),
        (800, "header")
    );
    assert_eq!(rec.tokens_hold_until_ms, 0, "a header holds nothing");
    // The same limit again changes nothing.
    assert_eq!(
        b.refused(AFTER + 10, "a", "theader", 800, -1).await.version,
        v
    );
    // Above the configured limit: kept, but the configured limit binds.
    let r = b.refused(AFTER + 20, "a", "theader", 5_000, -1).await;
    assert_eq!((record(&r).tokens_learned, r.tokens_limit), (5_000, 1_000));
    assert_eq!(r.limit, 60, "the request limit is not a token limit");
}

#[tokio::test]
async fn forget_resets_the_learned_token_limit() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready_tokens(&mut b, &["a"], 1_000).await;
    b.refused(AFTER, "a", "tokens", 600, 0).await;
    let r = b.at(AFTER + 10, "a", "forget", &[]).await;
    assert_eq!(r.tokens_limit, 1_000);
    let rec = record(&r);
    assert_eq!(
        (rec.tokens_learned, rec.tokens_source.as_str()),
        (0, "config")
    );
}

#[tokio::test]
async fn learning_mode_asks_for_the_seed_then_caps_each_replica_at_its_token_share() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    let extra = [("tokens_limit", "1000".to_owned())];
    b.join_with(T0, "a", 600.0, 60, &extra).await;
    let r = b.tlease(T0 + 100, "a", 500, 100).await;
    assert_eq!((r.status.as_str(), r.granted), ("seed", 0));
    // "a" sent 5 requests counting 300 tokens a second ago; "b" nothing.
    let r = b
        .seed_tokens(T0 + 100, "a", &[(1_000, 5)], &[(1_000, 300)])
        .await;
    assert_eq!(r.status, "seeded");
    b.seed_tokens(T0 + 100, "b", &[], &[]).await;
    assert_eq!((b.ttot("all").await, b.ttot("a").await), (300, 300));
    assert_eq!(
        b.hget(3, "a").await.as_deref(),
        Some("5"),
        "requests seeded too"
    );
    // Two live: each at most 500 in learning mode, less what it seeded.
    let r = b.tlease(T0 + 200, "a", 500, 100).await;
    assert_eq!(r.granted, 200);
    let r = b.tlease(T0 + 300, "a", 100, 50).await;
    assert_eq!(r.granted, 0);
    // Back when its seeded tokens (sent at T0 - 900) leave the span, before learning ends.
    assert_eq!(r.wait.as_millis() as u64, T0 - 900 + SPAN - (T0 + 300));
    // A replica that knew four live takes at most a quarter.
    let four = Extra {
        live: 4,
        ..Extra::default()
    };
    assert_eq!(
        b.tlease_with(T0 + 400, "b", 500, 1, four).await.granted,
        250
    );
    // After learning mode only the limit binds: 1,000 less the 450 granted since.
    b.tlease(T0 + SPAN + 1, "a", 0, 0).await;
    assert_eq!(b.tlease(T0 + SPAN + 1, "b", 600, 1).await.granted, 550);
}

#[tokio::test]
async fn a_vanished_replicas_token_share_stays_reserved_then_is_freed() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready_tokens(&mut b, &["a", "b", "c"], 900).await;
    let mut now = AFTER;
    // Two rounds of heartbeats: the second records each share with three live.
    for _ in 0..2 {
        for rid in ["a", "b", "c"] {
            b.tlease(now, rid, 0, 0).await;
        }
    }
    let r = b.tlease(now, "c", 0, 0).await;
    assert_eq!((r.live, r.tokens_share, r.tokens_limit), (3, 300, 900));
    assert_eq!(b.hget(SHARE, "c|t").await.as_deref(), Some("300"));
    // "c" goes silent: it may still send its 300 alone.
    now += 4_000;
    b.tlease(now, "b", 0, 0).await;
    let r = b.tlease(now, "a", 900, 1).await;
    assert_eq!((r.live, r.granted, r.tokens_share), (2, 600, 450));
    let r = b.tlease(now, "b", 100, 1).await;
    assert_eq!(r.granted, 0);
    assert_eq!(
        r.wait.as_millis() as u64,
        SPAN,
        "the only grant leaves first"
    );
    // fallback_for (10 s) + a span + 3 s later, it is forgotten, and its field with it.
    now += 10_000 + SPAN + 3_000;
    b.tlease(now, "b", 0, 0).await;
    assert_eq!(b.tlease(now, "a", 900, 1).await.granted, 900);
    assert_eq!(b.hget(SHARE, "c|t").await, None);
    // A replica that leaves takes its token share with it.
    assert!(b.hget(SHARE, "b|t").await.is_some());
    b.at(now, "b", "leave", &["".into(), "0".into()]).await;
    assert_eq!(b.hget(SHARE, "b|t").await, None);
}

#[tokio::test]
async fn the_wait_walks_the_log_past_its_first_page() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready_tokens(&mut b, &["a"], 1_000).await;
    // 300 grants of 3, one a millisecond: 900 in the log.
    for i in 0..300 {
        assert_eq!(b.tlease(AFTER + i, "a", 3, 3).await.granted, 3);
    }
    // 500 needs 400 freed: the 134 oldest grants (402), the last granted at AFTER + 133.
    let now = AFTER + 300;
    let r = b.tlease(now, "a", 500, 500).await;
    assert_eq!(r.granted, 0);
    assert_eq!(r.wait.as_millis() as u64, AFTER + 133 + SPAN - now);
    assert_eq!(b.ttot("all").await, 900);
}

#[tokio::test]
async fn every_reply_carries_the_token_share_and_limit() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready_tokens(&mut b, &["a", "b"], 1_001).await;
    b.lease(AFTER, "b", 0, 0.0).await;
    let r = b.lease(AFTER, "a", 1, 100.0).await;
    assert_eq!(r.granted, 1, "request leases as before");
    let mut shares = r.shares.clone();
    shares.sort();
    assert_eq!(
        shares,
        [("a".into(), 1), ("all".into(), 1)],
        "requests only"
    );
    assert_eq!((r.tokens_share, r.tokens_limit), (500, 1_001));
    let r = b.refused(AFTER, "a", "header", 50, -1).await;
    assert_eq!((r.tokens_share, r.tokens_limit), (500, 1_001));
    // A generation's state lost: the short reply carries them too (as nothing).
    let _: () = redis::cmd("DEL")
        .arg(&b.keys.all()[0])
        .query_async(&mut b.conn)
        .await
        .unwrap();
    let r = b.tlease(AFTER + 10, "a", 100, 1).await;
    assert_eq!(
        (r.status.as_str(), r.tokens_share, r.tokens_limit),
        ("lost", 0, 0)
    );
}

#[tokio::test]
async fn a_new_generation_starts_the_token_log_empty() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready_tokens(&mut b, &["a"], 1_000).await;
    let m = b.tlease(AFTER, "a", 700, 1).await.member;
    let old = b.gen.clone();
    // Only the generation is lost (an eviction): the rest cannot be trusted.
    let _: () = redis::cmd("DEL")
        .arg(&b.keys.all()[0])
        .query_async(&mut b.conn)
        .await
        .unwrap();
    let r = b.join(AFTER + 10, "a", 600.0, 60).await;
    assert_ne!(r.generation, old);
    assert_eq!(r.tokens_limit, 1_000, "the record stays");
    assert_eq!((b.tcount(&m).await, b.ttot("all").await), (None, 0));
    // A caller still on the old generation is told so, and given nothing.
    b.gen = old;
    let r = b.tlease(AFTER + 20, "a", 100, 1).await;
    assert_eq!((r.status.as_str(), r.granted), ("gen", 0));
}

#[tokio::test]
async fn without_a_token_budget_tlease_grants_nothing_and_asks_again_in_a_window() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready(&mut b, &["a"], 600.0, 60).await;
    let r = b.tlease(AFTER, "a", 100, 10).await;
    assert_eq!((r.status.as_str(), r.granted), ("ok", 0));
    assert_eq!(r.wait.as_millis() as u64, W);
    assert_eq!((r.tokens_share, r.tokens_limit), (0, 0));
    assert_eq!(
        b.hget(SHARE, "a|t").await,
        None,
        "no token share to reserve"
    );
    // A learned limit alone makes no budget: nothing configured one.
    let r = b.refused(AFTER + 10, "a", "theader", 800, -1).await;
    assert_eq!(r.tokens_limit, 0);
    // Configured at run time: granted.
    let args = ["tokens_limit".to_owned(), "500".to_owned()];
    let r = b.at(AFTER + 20, "a", "configure", &args).await;
    assert_eq!((record(&r).tokens_limit, r.tokens_limit), (500, 500));
    assert_eq!(b.tlease(AFTER + 30, "a", 100, 10).await.granted, 100);
}

#[tokio::test]
async fn a_grant_settled_to_nothing_leaves_the_log_without_error() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready_tokens(&mut b, &["a"], 1_000).await;
    let m = b.tlease(AFTER, "a", 500, 500).await.member;
    let none = Extra {
        adjust: &[(&m, -500)],
        ..Extra::default()
    };
    b.tlease_with(AFTER + 10, "a", 0, 0, none).await;
    assert_eq!((b.tcount(&m).await, b.ttot("all").await), (Some(0), 0));
    // Trimmed a span later: a count of 0 moves no total (Redis refuses Lua's "-0").
    let r = b.tlease(AFTER + SPAN, "a", 1_000, 1_000).await;
    assert_eq!((r.status.as_str(), r.granted), ("ok", 1_000));
    assert_eq!(b.tcount(&m).await, None);
    assert_eq!((b.ttot("all").await, b.ttot("a").await), (1_000, 1_000));
}

#[tokio::test]
async fn a_replica_refused_for_a_window_has_the_room_it_needs_held() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready_tokens(&mut b, &["a", "b", "c"], 1_000).await;
    assert_eq!(b.tlease(AFTER, "a", 1_000, 1_000).await.granted, 1_000);
    // b's head needs 800; it asks every second (the others heartbeat).
    for k in 1..=6 {
        let t = AFTER + k * 1_000;
        assert_eq!(b.tlease(t, "b", 800, 800).await.granted, 0, "full at {k} s");
        b.tlease(t, "a", 0, 0).await;
        b.tlease(t, "c", 0, 0).await;
    }
    // a's grant has left the span; b has waited less than a window: c's smaller request
    // passes it.
    assert_eq!(b.tlease(AFTER + SPAN, "c", 300, 300).await.granted, 300);
    let t = AFTER + 7_000;
    assert_eq!(b.tlease(t, "b", 800, 800).await.granted, 0, "700 free");
    // b has waited a window: its 800 are held against c, though 700 are free.
    let r = b.tlease(t, "c", 300, 300).await;
    assert_eq!(r.granted, 0, "held for b");
    b.tlease(t, "a", 0, 0).await;
    for k in 8..=12 {
        let t = AFTER + k * 1_000;
        assert_eq!(
            b.tlease(t, "b", 800, 800).await.granted,
            0,
            "700 free at {k} s"
        );
        assert_eq!(b.tlease(t, "c", 300, 300).await.granted, 0, "held at {k} s");
        b.tlease(t, "a", 0, 0).await;
    }
    // c's grant leaves too: b gets its 800 first.
    assert_eq!(b.tlease(AFTER + 2 * SPAN, "b", 800, 800).await.granted, 800);
    assert_eq!(
        b.tlease(AFTER + 2 * SPAN, "c", 300, 300).await.granted,
        0,
        "200 left"
    );
}

#[tokio::test]
async fn while_others_wait_a_replica_takes_no_more_than_its_part() {
    let redis = Redis::start();
    let mut b = Budget::new(&redis).await;
    ready_tokens(&mut b, &["a", "b"], 1_000).await;
    assert_eq!(b.tlease(AFTER, "a", 600, 600).await.granted, 600);
    assert_eq!(
        b.tlease(AFTER + 10, "b", 500, 500).await.granted,
        0,
        "400 free"
    );
    // b waits for room: a, past its half, gets none of the 400 free.
    let r = b.tlease(AFTER + 20, "a", 100, 100).await;
    assert_eq!(r.granted, 0, "a holds its part");
    assert_eq!(
        r.wait.as_millis() as u64,
        SPAN - 20,
        "until its own grant leaves"
    );
    // b, below its part, takes what it needs whole.
    assert_eq!(b.tlease(AFTER + 30, "b", 400, 400).await.granted, 400);
    // Nobody waits any more: a may take what is free (b heartbeats, or its share would be
    // held as a vanished replica's).
    for t in [AFTER + 3_000, AFTER + 6_000] {
        b.tlease(t, "b", 0, 0).await;
    }
    assert_eq!(b.tlease(AFTER + SPAN, "a", 600, 600).await.granted, 600);
}
