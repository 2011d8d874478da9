//! The calls to the budget's Redis script and what they answer.
//!
//! One Lua script (`budget.lua`) owns every change to the shared state; this module only
//! names its keys, passes arguments and decodes the reply. redis-rs's [`redis::Script`]
//! calls it by EVALSHA and loads it again when Redis answers NOSCRIPT (after a restart,
//! a failover or `SCRIPT FLUSH`).
//!
//! Ops and their own arguments (after op, rid, generation known, version known):
//! - `join`: field/value pairs of the record to create (`tokens_limit` among them).
//! - `seed`: the generation, (age ms, requests) pairs, then optionally the literal
//!   `tokens` and (age ms, tokens) pairs.
//! - `lease`: want, demand, queued, give-back member, how many, live known, shares (0/1).
//! - `tlease`: want (tokens), least (the cost of the request waiting first), give-back
//!   member, how many, live known, then (member, signed delta) settlement pairs. Its
//!   reply's `granted`, `member`, `wait` and `ttl` are about tokens; a grant is usable at
//!   once.
//! - `refused`: kind (`rate`, `retreat`, `quota`, `header`, `tokens`, `theader`), then
//!   sent-at or the stated limit, then retry-after, the quota's reset or the token hold.
//! - `configure` (`rate_rpm`, `capacity`, `fallback`, `tokens_limit`, `tokens_per_minute`),
//!   `forget`, `leave`.

use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::Value;

use super::view::Record;

/// The script, shared by every budget.
pub fn script() -> redis::Script {
    redis::Script::new(include_str!("budget.lua"))
}

/// The keys of one budget, all under one hash tag (one Redis Cluster slot).
#[derive(Debug, Clone)]
pub struct Keys([String; 13]);

impl Keys {
    pub fn new(prefix: &str, budget: &str) -> Self {
        let k = |s: &str| format!("{prefix}{{{budget}}}:{s}");
        Self([
            k("gen"),
            k("cfg"),
            k("log"),
            k("tot"),
            k("live"),
            k("share"),
            k("demand"),
            k("seeded"),
            // Only tests set it (a fake clock for the script).
            k("clock"),
            // Token grants, their counts (settlement changes them), their totals, and the
            // claims of replicas refused for want of room.
            k("tlog"),
            k("tcnt"),
            k("ttot"),
            k("twait"),
        ])
    }

    pub fn all(&self) -> &[String; 13] {
        &self.0
    }
}

/// What the script answered (every op has the same shape).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reply {
    pub status: String,
    /// Redis time, milliseconds.
    pub now_ms: u64,
    pub generation: String,
    pub version: i64,
    pub granted: u32,
    /// The grant's member in the shared log (to give unused tokens back).
    pub member: String,
    /// How long until asking again could be granted.
    pub wait: Duration,
    /// How long a lease may be used after its grant.
    pub ttl: Duration,
    pub live: u32,
    /// Per window: this replica's share when Redis is lost.
    pub share: u32,
    pub learning: bool,
    /// Per window: the limit the cluster keeps to now.
    pub limit: u32,
    pub rpm: f64,
    pub factor: f64,
    pub probing: bool,
    pub pause_until_ms: u64,
    pub pause_reason: String,
    pub reserved: u32,
    /// The record's fields when its version differs from the one the caller knew.
    pub record: Vec<(String, String)>,
    /// Grants in the window by replica (`all` is the total), when asked for.
    pub shares: Vec<(String, u32)>,
    /// How long until the granted lease may be used (it was scheduled behind others).
    pub start_in: Duration,
    /// Per window: the token limit over the live replicas (0: no shared token budget).
    pub tokens_share: u64,
    /// Per window: the token limit the cluster keeps to now (0: no shared token budget).
    pub tokens_limit: u64,
}

/// Why a reply could not be read.
#[derive(Debug, thiserror::Error)]
#[error("unexpected reply from the budget script: {0}")]
pub struct BadReply(pub String);

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Double(d) => d.to_string(),
        _ => String::new(),
    }
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        other => text(other).parse::<f64>().map_or(0, |f| f as i64),
    }
}

fn float(v: &Value) -> f64 {
    text(v).parse().unwrap_or(0.0)
}

fn pairs(v: &Value) -> Vec<(String, String)> {
    match v {
        Value::Array(items) => items
            .chunks_exact(2)
            .map(|p| (text(&p[0]), text(&p[1])))
            .collect(),
        _ => Vec::new(),
    }
}

fn non_negative(i: i64) -> u64 {
    u64::try_from(i).unwrap_or(0)
}

fn small(i: i64) -> u32 {
    u32::try_from(i.max(0)).unwrap_or(u32::MAX)
}

impl Reply {
    pub fn parse(v: &Value) -> Result<Self, BadReply> {
        let Value::Array(f) = v else {
            return Err(BadReply(format!("{v:?}")));
        };
        if f.len() < 21 {
            return Err(BadReply(format!("{} fields", f.len())));
        }
        Ok(Self {
            status: text(&f[0]),
            now_ms: non_negative(int(&f[1])),
            generation: text(&f[2]),
            version: int(&f[3]),
            granted: small(int(&f[4])),
            member: text(&f[5]),
            wait: Duration::from_millis(non_negative(int(&f[6]))),
            ttl: Duration::from_millis(non_negative(int(&f[7]))),
            live: small(int(&f[8])),
            share: small(int(&f[9])),
            learning: int(&f[10]) == 1,
            limit: small(int(&f[11])),
            rpm: float(&f[12]),
            factor: float(&f[13]),
            probing: int(&f[14]) == 1,
            pause_until_ms: non_negative(int(&f[15])),
            pause_reason: text(&f[16]),
            reserved: small(int(&f[17])),
            record: pairs(&f[18]),
            shares: pairs(&f[19])
                .into_iter()
                .map(|(k, v)| (k, small(v.parse::<i64>().unwrap_or(0))))
                .collect(),
            start_in: Duration::from_millis(non_negative(int(&f[20]))),
            // A script loaded before token budgets answers 21 fields: none.
            tokens_share: f.get(21).map_or(0, |v| non_negative(int(v))),
            tokens_limit: f.get(22).map_or(0, |v| non_negative(int(v))),
        })
    }

    /// The record's fields applied over `r` (when the reply carried them), with the
    /// values every reply carries.
    pub fn update(&self, r: &mut Record) {
        for (k, v) in &self.record {
            let f = || v.parse::<f64>().unwrap_or(0.0);
            match k.as_str() {
                "rate_rpm" => r.rate_rpm = f(),
                "capacity" => r.bucket_capacity = f() as u32,
                "window_ms" => r.window = Duration::from_millis(f() as u64),
                "fallback" => r.fallback = v == "1" || v == "true",
                "learned" => r.learned = f() as u32,
                "source" => r.source.clone_from(v),
                "changes" => r.changes = f() as u64,
                "tokens_limit" => r.tokens_limit = f() as u64,
                "tokens_learned" => r.tokens_learned = f() as u64,
                "tokens_source" => r.tokens_source.clone_from(v),
                "tokens_hold_until" => r.tokens_hold_until_ms = f() as u64,
                "tokens_per_minute" => r.tokens_per_minute = Some(f() as u64),
                _ => {}
            }
        }
        if !self.record.is_empty() {
            r.version = non_negative(self.version);
        }
        r.limit = self.limit;
        r.rpm = self.rpm;
        r.retreat_factor = self.factor;
        r.probing = self.probing;
        // A pause that has ended is no pause.
        if self.pause_until_ms > self.now_ms {
            r.pause_until_ms = self.pause_until_ms;
            r.pause_reason.clone_from(&self.pause_reason);
        } else {
            r.pause_until_ms = 0;
            r.pause_reason.clear();
        }
        if r.source.is_empty() {
            r.source = "config".to_owned();
        }
        if r.tokens_source.is_empty() {
            r.tokens_source = "config".to_owned();
        }
    }
}

/// Who calls: replica `rid`, who knows generation `gen` and record version `version`.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub rid: &'a str,
    pub gen: &'a str,
    pub version: i64,
}

/// One call of the script: `op` with its own arguments.
pub async fn call<C: ConnectionLike>(
    conn: &mut C,
    script: &redis::Script,
    keys: &Keys,
    op: &str,
    who: Caller<'_>,
    args: &[String],
) -> redis::RedisResult<Value> {
    let mut inv = script.prepare_invoke();
    for k in keys.all() {
        inv.key(k);
    }
    inv.arg(op).arg(who.rid).arg(who.gen).arg(who.version);
    for a in args {
        inv.arg(a);
    }
    inv.invoke_async(conn).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    /// A reply of `ok` with `record` and everything else zero, `extra` fields appended.
    fn reply_with(record: &[&str], extra: &[Value]) -> Value {
        let mut f = vec![bulk("ok"), Value::Int(1_000), bulk("g"), Value::Int(4)];
        f.extend([Value::Int(0), bulk(""), Value::Int(0), Value::Int(60)]);
        f.extend((0..4).map(|_| Value::Int(0)));
        f.extend([bulk("0"), bulk("1"), Value::Int(0), Value::Int(0), bulk("")]);
        f.push(Value::Int(0));
        f.push(Value::Array(record.iter().map(|s| bulk(s)).collect()));
        f.push(Value::Array(Vec::new()));
        f.push(Value::Int(0));
        f.extend_from_slice(extra);
        Value::Array(f)
    }

    #[test]
    fn keys_share_one_hash_tag() {
        let k = Keys::new("nvidia-sidecar:", "nvidia");
        assert_eq!(k.all()[0], "nvidia-sidecar:{nvidia}:gen");
        assert!(k.all().iter().all(|s| s.contains("{nvidia}")));
    }

    #[test]
    fn parses_a_reply_and_updates_the_record() {
        let v = Value::Array(vec![
            bulk("ok"),
            Value::Int(1_700_000_000_123),
            bulk("1700000000000"),
            Value::Int(3),
            Value::Int(2),
            bulk("r1|7|2"),
            Value::Int(0),
            Value::Int(600),
            Value::Int(3),
            Value::Int(13),
            Value::Int(0),
            Value::Int(40),
            bulk("40"),
            bulk("0.5"),
            Value::Int(0),
            Value::Int(0),
            bulk(""),
            Value::Int(0),
            Value::Array(vec![
                bulk("rate_rpm"),
                bulk("40"),
                bulk("learned"),
                bulk("30"),
                bulk("source"),
                bulk("learned_429"),
            ]),
            Value::Array(vec![bulk("all"), bulk("5"), bulk("r1"), bulk("2")]),
            Value::Int(120),
        ]);
        let r = Reply::parse(&v).unwrap();
        assert_eq!(r.granted, 2);
        assert_eq!(r.member, "r1|7|2");
        assert_eq!(r.ttl, Duration::from_millis(600));
        assert_eq!(r.start_in, Duration::from_millis(120));
        assert_eq!(r.factor, 0.5);
        assert_eq!(r.shares, vec![("all".into(), 5), ("r1".into(), 2)]);
        let mut rec = Record::default();
        r.update(&mut rec);
        assert_eq!(
            (rec.version, rec.rate_rpm, rec.learned, rec.limit),
            (3, 40.0, 30, 40)
        );
        assert_eq!(rec.source, "learned_429");
        assert_eq!((r.tokens_share, r.tokens_limit), (0, 0), "a 21-field reply");
        assert_eq!(rec.tokens_source, "config");
    }

    #[test]
    fn parses_the_token_budget() {
        let record = [
            "tokens_limit",
            "90000",
            "tokens_learned",
            "60000",
            "tokens_source",
            "tokens_429",
            "tokens_hold_until",
            "1500",
        ];
        let v = reply_with(&record, &[Value::Int(20_000), Value::Int(60_000)]);
        let r = Reply::parse(&v).unwrap();
        assert_eq!((r.tokens_share, r.tokens_limit), (20_000, 60_000));
        let mut rec = Record::default();
        r.update(&mut rec);
        assert_eq!(
            (
                rec.tokens_limit,
                rec.tokens_learned,
                rec.tokens_hold_until_ms
            ),
            (90_000, 60_000, 1_500)
        );
        assert_eq!((rec.tokens_source.as_str(), rec.version), ("tokens_429", 4));
    }

    #[test]
    fn a_short_reply_is_an_error() {
        assert!(Reply::parse(&Value::Array(vec![bulk("ok")])).is_err());
        assert!(Reply::parse(&Value::Nil).is_err());
    }
}
