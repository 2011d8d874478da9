//! The patch contract: what applies, what is refused, and every message's words.

use std::time::Duration;

use super::error::shape_fits;
use super::*;
use crate::hot::HotProvider;

fn hot() -> Hot {
    let p = HotProvider {
        rate_rpm: 40.0,
        bucket_capacity: 1,
        queue_max_size: 64,
        low_priority_timeout: Duration::from_secs(30),
        tokens_per_minute: 0,
    };
    Hot {
        version: 3,
        request_timeout: Duration::from_secs(120),
        fallback_enabled_passthrough: false,
        log_level: tracing::Level::INFO,
        defaults: p,
        providers: vec![p, p],
    }
}

const NAMES: [&str; 2] = ["nvidia", "openai"];

#[test]
fn top_level_fields_apply_to_every_provider_and_named_ones_win() {
    let patch = parse(
        br#"{"rate_rpm": 100, "providers": {"openai": {"rate_rpm": 7, "queue_max_size": 0}}}"#,
    )
    .unwrap();
    let new = patch.apply_to(&hot(), &NAMES).unwrap();
    assert_eq!(new.defaults.rate_rpm, 100.0);
    assert_eq!(new.providers[0].rate_rpm, 100.0);
    assert_eq!(new.providers[1].rate_rpm, 7.0);
    assert_eq!(new.providers[1].queue_max_size, 0);
    assert_eq!(new.version, 3, "the caller numbers versions");
    let changed: Vec<String> = diff(&hot(), &new, &NAMES)
        .into_iter()
        .map(|c| c.field)
        .collect();
    assert_eq!(
        changed,
        [
            "rate_rpm",
            "providers.nvidia.rate_rpm",
            "providers.openai.rate_rpm",
            "providers.openai.queue_max_size"
        ]
    );
}

#[test]
fn tokens_per_minute_is_set_per_provider_turned_off_by_0_and_refused_past_its_bound() {
    let patch = parse(
        br#"{"tokens_per_minute": 30000, "providers": {"openai": {"tokens_per_minute": 0}}}"#,
    )
    .unwrap();
    let new = patch.apply_to(&hot(), &NAMES).unwrap();
    assert_eq!(new.defaults.tokens_per_minute, 30_000);
    assert_eq!(new.providers[0].tokens_per_minute, 30_000);
    assert_eq!(new.providers[1].tokens_per_minute, 0, "0: no token budget");
    let changed: Vec<String> = diff(&hot(), &new, &NAMES)
        .into_iter()
        .map(|c| c.field)
        .collect();
    assert_eq!(
        changed,
        ["tokens_per_minute", "providers.nvidia.tokens_per_minute"]
    );
    for (body, got) in [
        (&br#"{"tokens_per_minute": 10000000001}"#[..], "10000000001"),
        (br#"{"tokens_per_minute": 1.5}"#, "1.5"),
        (br#"{"tokens_per_minute": -1}"#, "-1"),
    ] {
        let err = parse(body).unwrap().apply_to(&hot(), &NAMES).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "tokens_per_minute: {got} is out of range; accepted: an integer from 0 to 10000000000"
            )
        );
    }
}

#[test]
fn one_bad_field_rejects_the_whole_patch() {
    let patch =
        parse(br#"{"request_timeout": 5, "providers": {"openai": {"bucket_capacity": 0}}}"#)
            .unwrap();
    let err = patch.apply_to(&hot(), &NAMES).unwrap_err();
    assert_eq!(
        err.to_string(),
        "providers.openai.bucket_capacity: 0 is out of range; accepted: an integer from 1 to 1000000"
    );
}

#[test]
fn errors_name_the_field_and_what_it_accepts() {
    let cases: &[(&[u8], &str)] = &[
        (br#"{"foo": 1}"#, "unknown field \"foo\"; accepted: rate_rpm, bucket_capacity"),
        (br#"{"providers": {"nvidia": {"zzz": 1}}}"#, "unknown field \"providers.nvidia.zzz\"; accepted: rate_rpm, bucket_capacity, queue_max_size, low_priority_timeout"),
        (br#"{"rate_rpm": "fast"}"#, "rate_rpm: wrong type: expected a number; accepted: a number of requests per minute above 0, at most 6000000"),
        (br#"{"fallback_enabled_passthrough": 1}"#, "fallback_enabled_passthrough: wrong type: expected true or false"),
        (br#"{"rate_rpm": 5,"#, "malformed JSON at line 1, column 16: "),
        (b"[]", "malformed JSON at line 1, column 1: the body must be a JSON object"),
        (b"  ", "malformed JSON: the body is empty"),
    ];
    for (body, want) in cases {
        let got = parse(body).unwrap_err().to_string();
        assert!(
            got.starts_with(want),
            "{}: {got}",
            String::from_utf8_lossy(body)
        );
    }
    let err = parse(br#"{"rate_rpm": 5,"#).unwrap_err().to_string();
    assert!(
        err.contains("line 1, column 16"),
        "the position is given: {err}"
    );
}

/// The whole message for each kind of malformed body.
const MALFORMED: &[(&[u8], &str)] = &[
    (b"", "malformed JSON: the body is empty; send a JSON object of fields to change"),
    (b"\xef\xbb\xbf{\"rate_rpm\": 1}", "malformed JSON: the body starts with a byte-order mark (U+FEFF); send UTF-8 JSON without it"),
    (b"\xff\xfe{}", "malformed JSON: the body starts with a byte-order mark (U+FEFF); send UTF-8 JSON without it"),
    (b"[1, 2]", "malformed JSON at line 1, column 1: the body must be a JSON object of fields to change, not an array"),
    (b" \"x\"", "malformed JSON at line 1, column 2: the body must be a JSON object of fields to change, not a string"),
    (b"-4.5", "malformed JSON at line 1, column 1: the body must be a JSON object of fields to change, not a number"),
    (b"\n\ntrue", "malformed JSON at line 3, column 1: the body must be a JSON object of fields to change, not true"),
    (b"null", "malformed JSON at line 1, column 1: the body must be a JSON object of fields to change, not null"),
    (br#"{"rate_rpm": 5} x"#, "malformed JSON at line 1, column 17: unexpected character `x` after the end of the JSON value"),
    (br#"{"rate_rpm": 5}{}"#, "malformed JSON at line 1, column 16: unexpected character `{` after the end of the JSON value"),
    (br#"{"rate_rpm": 5 x}"#, "malformed JSON at line 1, column 16: unexpected character `x`; expected `,` or `}`"),
    (br#"{"rate_rpm" 5}"#, "malformed JSON at line 1, column 13: unexpected character `5`; expected `:` after the field name"),
    (br#"{rate_rpm: 5}"#, "malformed JSON at line 1, column 2: unexpected character `r`; expected a field name in double quotes or `}`"),
    (br#"{"rate_rpm": 5,}"#, "malformed JSON at line 1, column 16: unexpected character `}`; expected a field name in double quotes"),
    (br#"{"rate_rpm": [1,]}"#, "malformed JSON at line 1, column 17: unexpected character `]`; expected a value"),
    (br#"{"rate_rpm": [1 2]}"#, "malformed JSON at line 1, column 17: unexpected character `2`; expected `,` or `]`"),
    (br#"{"rate_rpm": }"#, "malformed JSON at line 1, column 14: unexpected character `}`; expected a value"),
    (b"{\"rate_rpm\": \x01}", "malformed JSON at line 1, column 14: unexpected character U+0001; expected a value"),
    (b"{\"rate_rpm\": \xc3\xa9}", "malformed JSON at line 1, column 14: unexpected character U+00E9; expected a value"),
    (br#"{"rate_rpm": tru}"#, "malformed JSON at line 1, column 14: unexpected word `tru`; expected a value"),
    (br#"{"rate_rpm": 5,"#, "malformed JSON at line 1, column 16: the body ends early; expected a field name in double quotes"),
    (b"{\"rate_rpm\":", "malformed JSON at line 1, column 13: the body ends early; expected a value"),
    (b"{\n  \"rate_rpm\": 5\n", "malformed JSON at line 3, column 1: the body ends early; expected `,` or `}`"),
    (br#"{"log_level": "debug"#, "malformed JSON at line 1, column 15: unterminated string; close it with `\"`"),
    (br#"{"log_l"#, "malformed JSON at line 1, column 2: unterminated string; close it with `\"`"),
    (br#"{"log_level": "de\qbug"}"#, r#"malformed JSON at line 1, column 18: invalid escape `\q` in a string; use \" \\ \/ \b \f \n \r \t or \uXXXX"#),
    (br#"{"log_level": "\u12"}"#, r#"malformed JSON at line 1, column 16: invalid \u escape in a string; write \u and four hex digits (a surrogate pair for characters beyond U+FFFF)"#),
    (br#"{"log_level": "\ud800"}"#, r#"malformed JSON at line 1, column 16: invalid \u escape in a string; write \u and four hex digits (a surrogate pair for characters beyond U+FFFF)"#),
    (br#"{"log_level": "x\udc00"}"#, r#"malformed JSON at line 1, column 17: invalid \u escape in a string; write \u and four hex digits (a surrogate pair for characters beyond U+FFFF)"#),
    (b"{\"log_level\": \"\xff\"}", "malformed JSON at line 1, column 16: invalid UTF-8 (byte 0xFF); send the body as UTF-8"),
    (b"{\"log_level\": \"\xc3\xa9\xc3\"}", "malformed JSON at line 1, column 17: invalid UTF-8 (byte 0xC3); send the body as UTF-8"),
    (b"{\"log_level\": \"a\tb\"}", r#"malformed JSON at line 1, column 17: control character U+0009 in a string; write it as an escape such as \t, \n or \u0000"#),
    (b"{\"log_level\": \"a\nb\"}", r#"malformed JSON at line 1, column 17: control character U+000A in a string; write it as an escape such as \t, \n or \u0000"#),
    (br#"{"rate_rpm": 01}"#, "malformed JSON at line 1, column 14: invalid number `01`; write numbers such as 40, 0.5 or 1e3"),
    (br#"{"rate_rpm": +1}"#, "malformed JSON at line 1, column 14: invalid number `+1`; write numbers such as 40, 0.5 or 1e3"),
    (br#"{"rate_rpm": 1.}"#, "malformed JSON at line 1, column 14: invalid number `1.`; write numbers such as 40, 0.5 or 1e3"),
    (br#"{"rate_rpm": -}"#, "malformed JSON at line 1, column 14: invalid number `-`; write numbers such as 40, 0.5 or 1e3"),
    (br#"{"rate_rpm": 18446744073709551616}"#, "malformed JSON at line 1, column 14: integer `18446744073709551616` does not fit in 64 bits; write it with an exponent, such as 1.8e19"),
    (br#"{"rate_rpm": NaN}"#, "malformed JSON at line 1, column 14: non-finite number `NaN`; send a finite number (JSON has no NaN or Infinity; the largest is about 1.8e308)"),
    (br#"{"rate_rpm": nan}"#, "malformed JSON at line 1, column 14: non-finite number `nan`; send a finite number (JSON has no NaN or Infinity; the largest is about 1.8e308)"),
    (br#"{"rate_rpm": Infinity}"#, "malformed JSON at line 1, column 14: non-finite number `Infinity`; send a finite number (JSON has no NaN or Infinity; the largest is about 1.8e308)"),
    (br#"{"rate_rpm": -Infinity}"#, "malformed JSON at line 1, column 14: non-finite number `-Infinity`; send a finite number (JSON has no NaN or Infinity; the largest is about 1.8e308)"),
    (br#"{"rate_rpm": +inf}"#, "malformed JSON at line 1, column 14: non-finite number `+inf`; send a finite number (JSON has no NaN or Infinity; the largest is about 1.8e308)"),
    (br#"{"rate_rpm": 1e999}"#, "malformed JSON at line 1, column 14: non-finite number `1e999`; send a finite number (JSON has no NaN or Infinity; the largest is about 1.8e308)"),
    (br#"{"rate_rpm": -1.8e308}"#, "malformed JSON at line 1, column 14: non-finite number `-1.8e308`; send a finite number (JSON has no NaN or Infinity; the largest is about 1.8e308)"),
    (br#"{"rate_rpm": 1e-4294967295}"#, "malformed JSON at line 1, column 14: number `1e-4294967295` has an exponent beyond ±9999; write it with a smaller exponent"),
    (br#"{"rate_rpm": 1e-4000000000000000000}"#, "malformed JSON at line 1, column 14: number `1e-4000000000000000000` has an exponent beyond ±9999; write it with a smaller exponent"),
    (br#"{"rate_rpm": 1, "rate_rpm": 2}"#, "malformed JSON at line 1, column 17: duplicate field `rate_rpm`; each field may appear once"),
    (br#"{"rate_rpm": 1, "rate_r\u0070m": 2}"#, "malformed JSON at line 1, column 17: duplicate field `rate_rpm`; each field may appear once"),
    (b"{\n  \"providers\": {\"nvidia\": {\"rate_rpm\": 1, \"rate_rpm\": 2}}\n}", "malformed JSON at line 2, column 43: duplicate field `providers.nvidia.rate_rpm`; each field may appear once"),
    (br#"{"providers": {"other": {"rate_rpm": 3}, "other": {"bucket_capacity": 4}}}"#, "malformed JSON at line 1, column 42: duplicate field `providers.other`; each field may appear once"),
    (br#"{"": 1, "": 2}"#, r#"malformed JSON at line 1, column 9: duplicate field `""`; each field may appear once"#),
    (br#"{"providers": {"": {}, "": {}}}"#, r#"malformed JSON at line 1, column 24: duplicate field `providers.""`; each field may appear once"#),
    (br#"{"x\ny": 1, "x\ny": 2}"#, r#"malformed JSON at line 1, column 13: duplicate field `x\ny`; each field may appear once"#),
    (br#"{"rate_rpm": [[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]}"#, "malformed JSON at line 1, column 29: nesting too deep; at most 16 levels of objects and arrays"),
];

#[test]
fn malformed_bodies_are_named_in_words_with_line_and_column() {
    let mut failures = Vec::new();
    for (body, want) in MALFORMED {
        let got = match parse(body) {
            Ok(p) => format!("accepted: {p:?}"),
            Err(e) => e.to_string(),
        };
        if got != *want {
            failures.push(format!(
                "{:?}\n   got: {got}\n  want: {want}",
                String::from_utf8_lossy(body)
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn no_message_shows_an_internal_type_or_spans_lines() {
    let more: &[&[u8]] = &[
        br#"{"providers": {"nvidia": 5}}"#,
        br#"{"providers": {"nvidia": []}}"#,
        br#"{"providers": []}"#,
        br#"{"rate_rpm": [1]}"#,
        br#"{"rate_rpm": {"a": 1}}"#,
        br#"{"log_level": 5}"#,
        br#"{"fallback_enabled_passthrough": "yes"}"#,
        br#"{"providers": {"a\nb": {"rate_rpm": "x"}}}"#,
    ];
    let long = "\\u007f\\u200b".repeat(300);
    let long_name = [
        format!(r#"{{"{long}": 1}}"#),
        format!(r#"{{"providers": {{"a": {{"{long}": 1}}}}}}"#),
        format!(r#"{{"{long}": 1, "{long}": 2}}"#),
        format!(r#"{{"providers": {{"{long}": {{"rate_rpm": "x"}}}}}}"#),
    ];
    let bodies = MALFORMED
        .iter()
        .map(|(b, _)| *b)
        .chain(more.iter().copied());
    let mut messages: Vec<String> = bodies
        .chain(long_name.iter().map(|b| b.as_bytes()))
        .map(|body| parse(body).unwrap_err().to_string())
        .collect();
    let unknown = format!(r#"{{"providers": {{"{long}": {{"rate_rpm": 5}}}}}}"#);
    let unknown = parse(unknown.as_bytes()).unwrap().apply_to(&hot(), &NAMES);
    messages.push(unknown.unwrap_err().to_string());
    for got in messages {
        for internal in [
            "InternalError",
            "TapeError",
            "ErrorType",
            "Some(",
            "struct ",
        ] {
            assert!(!got.contains(internal), "{internal} in {got:?}");
        }
        assert!(!got.contains('\n'), "one line: {got:?}");
        assert!(got.chars().count() <= 400, "short: {got:?}");
    }
}

#[test]
fn every_refusal_has_a_documented_shape() {
    let mut errors: Vec<PatchError> = MALFORMED
        .iter()
        .map(|(body, _)| parse(body).unwrap_err())
        .collect();
    let fields: &[&[u8]] = &[
        br#"{"zzz": 1}"#,
        br#"{"providers": {"nvidia": {"zzz": 1}}}"#,
        br#"{"rate_rpm": "fast"}"#,
        br#"{"log_level": 5}"#,
        br#"{"providers": []}"#,
        br#"{"providers": {"nvidia": 5}}"#,
        br#"{"fallback_enabled_passthrough": 1}"#,
    ];
    errors.extend(fields.iter().map(|body| parse(body).unwrap_err()));
    let applied: &[&[u8]] = &[
        br#"{"rate_rpm": 0}"#,
        br#"{"providers": {"openai": {"bucket_capacity": 0.5}}}"#,
        br#"{"log_level": "loud\n"}"#,
        br#"{"providers": {"nope": {"rate_rpm": 5}}}"#,
        br#"{"providers": {}}"#,
    ];
    errors.extend(
        applied
            .iter()
            .map(|body| parse(body).unwrap().apply_to(&hot(), &NAMES).unwrap_err()),
    );
    errors.push(PatchError::Malformed(JsonError::At {
        at: Position { line: 1, column: 1 },
        problem: Problem::Refused,
    }));
    for e in &errors {
        assert!(e.is_documented(), "not in MESSAGES: {e}");
    }
    // Each shape is used.
    for shape in MESSAGES {
        assert!(
            errors.iter().any(|e| shape_fits(shape, &e.to_string())),
            "no test gives {shape}"
        );
    }
}

#[test]
fn an_internal_or_multi_line_message_is_not_documented() {
    assert!(!MESSAGES.iter().any(|m| shape_fits(
        m,
        "malformed JSON: InternalError(TapeError) at character 12"
    )));
    assert!(shape_fits("a <x>; b", "a one; b"));
    assert!(!shape_fits("a <x>; b", "a one\ntwo; b"));
    assert!(!shape_fits("line <n>", "line 1x"));
    assert!(shape_fits("<a|b> c", "b c"));
    let two_lines = PatchError::Invalid {
        field: "rate_rpm".into(),
        problem: "5 is out of range\n".into(),
        accepted: "x".into(),
    };
    assert!(!two_lines.is_documented());
}

#[test]
fn a_provider_entry_of_the_wrong_type_says_what_it_accepts() {
    let got = parse(br#"{"providers": {"nvidia": 5}}"#)
        .unwrap_err()
        .to_string();
    assert_eq!(
        got,
        "providers.nvidia: wrong type: expected an object; accepted: an object with rate_rpm, bucket_capacity, queue_max_size, low_priority_timeout or tokens_per_minute"
    );
    let got = parse(br#"{"providers": {"a\nb": {"rate_rpm": "x"}}}"#)
        .unwrap_err()
        .to_string();
    assert_eq!(
        got,
        r#"providers.a\nb.rate_rpm: wrong type: expected a number; accepted: a number of requests per minute above 0, at most 6000000"#
    );
}

/// The configuration, from environment variables over the defaults.
fn configured(pairs: &[(&str, &str)]) -> Result<crate::config::Config, crate::config::ConfigError> {
    crate::config::testing::configured("", pairs)
}

#[test]
fn the_admin_api_accepts_exactly_what_the_configuration_accepts() {
    use crate::config::runtime::FIELDS;
    use crate::config::{Range, SETTINGS};
    let base = Hot::of(&configured(&[]).unwrap());
    let names = ["nvidia"];
    for f in FIELDS {
        let var = SETTINGS.iter().find(|s| s.key == f.name).unwrap().env;
        // (as the environment writes it, as JSON writes it, in range)
        let (values, bound): (Vec<(String, String, bool)>, String) = match f.range {
            Range::Rate { max } => (
                vec![
                    (max.to_string(), max.to_string(), true),
                    ((max + 1.0).to_string(), (max + 1.0).to_string(), false),
                    ("0.001".into(), "0.001".into(), true),
                    ("0".into(), "0".into(), false),
                ],
                format!("at most {max}"),
            ),
            Range::Integer { min, max } => (
                vec![
                    (max.to_string(), max.to_string(), true),
                    ((max + 1).to_string(), (max + 1).to_string(), false),
                    (min.to_string(), min.to_string(), true),
                ],
                format!("from {min} to {max}"),
            ),
            Range::Seconds { min, max } => (
                vec![
                    (max.to_string(), max.to_string(), true),
                    ((max + 1.0).to_string(), (max + 1.0).to_string(), false),
                    (min.to_string(), min.to_string(), true),
                    ((min / 2.0).to_string(), (min / 2.0).to_string(), false),
                ],
                format!("from {min} to {max}"),
            ),
            Range::Switch => (
                vec![("true".into(), "true".into(), true)],
                "true or false".into(),
            ),
            Range::Level => (
                vec![
                    ("debug".into(), "\"debug\"".into(), true),
                    ("loud".into(), "\"loud\"".into(), false),
                ],
                r#""error", "warn", "info", "debug", "trace""#.into(),
            ),
        };
        for (env, json, ok) in values {
            let case = format!("{} = {env}", f.name);
            let from_config = configured(&[(var, &env)]);
            let body = format!(r#"{{"{}": {json}}}"#, f.name);
            let from_patch = parse(body.as_bytes()).unwrap().apply_to(&base, &names);
            match (from_config, from_patch) {
                (Ok(c), Ok(patched)) if ok => {
                    assert_eq!(patched, Hot::of(&c), "{case}: the same value either way")
                }
                (Err(c), Err(p)) if !ok => {
                    let (c, p) = (c.to_string(), p.to_string());
                    assert!(c.contains(&bound), "{case}: the configuration says {c}");
                    assert!(p.contains(&bound), "{case}: the admin API says {p}");
                }
                (c, p) => panic!(
                    "{case}: want {}, configuration {c:?}, admin API {p:?}",
                    if ok {
                        "both to accept"
                    } else {
                        "both to refuse"
                    }
                ),
            }
        }
    }
}
