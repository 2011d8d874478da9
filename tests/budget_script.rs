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
            .arg(&self.keys.all()[8])
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

    async fn refused(&mut self, now: u64, rid: &str, kind: &str, a: u64, retry_ms: i64) -> Reply {
        let args = [kind.to_owned(), a.to_string(), retry_ms.to_string()];
        self.at(now, rid, "refused", &args).await
    }
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
