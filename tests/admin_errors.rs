//! Refused admin bodies end to end: each malformed `PATCH` or `POST /api/admin/config`
//! body is answered 400 with the OpenAI error shape (`invalid_json`) and a one-line
//! message that names the problem in words, with the line and column where it is, and
//! changes nothing.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use nvidia_sidecar::mock::MockConfig;

const TOKEN: &str = "adm-t0ken-errors-3f09b2";
const BEARER: &str = "Bearer adm-t0ken-errors-3f09b2";

/// One bad body and the whole message it must get.
struct Case {
    body: &'static [u8],
    message: &'static str,
}

const fn case(body: &'static [u8], message: &'static str) -> Case {
    Case { body, message }
}

const CASES: &[Case] = &[
    case(
        b"",
        "malformed JSON: the body is empty; send a JSON object of fields to change",
    ),
    case(
        b" \r\n\t",
        "malformed JSON: the body is empty; send a JSON object of fields to change",
    ),
    // Not an object.
    case(
        b"[]",
        "malformed JSON at line 1, column 1: the body must be a JSON object of fields to change, not an array",
    ),
    case(
        b"\n  \"rate_rpm\"",
        "malformed JSON at line 2, column 3: the body must be a JSON object of fields to change, not a string",
    ),
    case(
        b"42",
        "malformed JSON at line 1, column 1: the body must be a JSON object of fields to change, not a number",
    ),
    case(
        b"null",
        "malformed JSON at line 1, column 1: the body must be a JSON object of fields to change, not null",
    ),
    // Syntax.
    case(
        br#"{"rate_rpm": 5} x"#,
        "malformed JSON at line 1, column 17: unexpected character `x` after the end of the JSON value",
    ),
    case(
        br#"{"rate_rpm": 5}}"#,
        "malformed JSON at line 1, column 16: unexpected character `}` after the end of the JSON value",
    ),
    case(
        br#"{"rate_rpm": 5 x}"#,
        "malformed JSON at line 1, column 16: unexpected character `x`; expected `,` or `}`",
    ),
    case(
        br#"{"rate_rpm": 5,"#,
        "malformed JSON at line 1, column 16: the body ends early; expected a field name in double quotes",
    ),
    case(
        b"{\n  \"rate_rpm\": 5\n",
        "malformed JSON at line 3, column 1: the body ends early; expected `,` or `}`",
    ),
    case(
        br#"{"log_level": "debug"#,
        "malformed JSON at line 1, column 15: unterminated string; close it with `\"`",
    ),
    case(
        br#"{"log_level": "de\qbug"}"#,
        r#"malformed JSON at line 1, column 18: invalid escape `\q` in a string; use \" \\ \/ \b \f \n \r \t or \uXXXX"#,
    ),
    case(
        br#"{"log_level": "\u12"}"#,
        r#"malformed JSON at line 1, column 16: invalid \u escape in a string; write \u and four hex digits (a surrogate pair for characters beyond U+FFFF)"#,
    ),
    case(
        b"{\"log_level\": \"\xff\"}",
        "malformed JSON at line 1, column 16: invalid UTF-8 (byte 0xFF); send the body as UTF-8",
    ),
    case(
        b"{\"log_level\": \"a\tb\"}",
        r#"malformed JSON at line 1, column 17: control character U+0009 in a string; write it as an escape such as \t, \n or \u0000"#,
    ),
    case(
        br#"{"rate_rpm": 01}"#,
        "malformed JSON at line 1, column 14: invalid number `01`; write numbers such as 40, 0.5 or 1e3",
    ),
    // A byte-order mark is refused: RFC 8259 forbids senders to add one.
    case(
        b"\xef\xbb\xbf{\"rate_rpm\": 100}",
        "malformed JSON: the body starts with a byte-order mark (U+FEFF); send UTF-8 JSON without it",
    ),
    // Non-finite numbers.
    case(
        br#"{"rate_rpm": NaN}"#,
        "malformed JSON at line 1, column 14: non-finite number `NaN`; send a finite number (JSON has no NaN or Infinity; the largest is about 1.8e308)",
    ),
    case(
        br#"{"rate_rpm":Infinity}"#,
        "malformed JSON at line 1, column 13: non-finite number `Infinity`; send a finite number (JSON has no NaN or Infinity; the largest is about 1.8e308)",
    ),
    case(
        br#"{"rate_rpm": -Infinity}"#,
        "malformed JSON at line 1, column 14: non-finite number `-Infinity`; send a finite number (JSON has no NaN or Infinity; the largest is about 1.8e308)",
    ),
    case(
        b"{\n\"providers\": {\"nvidia\": {\"rate_rpm\": 1e999}}}",
        "malformed JSON at line 2, column 38: non-finite number `1e999`; send a finite number (JSON has no NaN or Infinity; the largest is about 1.8e308)",
    ),
    // Duplicate fields, named with their path.
    case(
        br#"{"rate_rpm": 1, "rate_rpm": 2}"#,
        "malformed JSON at line 1, column 17: duplicate field `rate_rpm`; each field may appear once",
    ),
    case(
        b"{\n  \"providers\": {\"nvidia\": {\"rate_rpm\": 1, \"rate_rpm\": 2}}\n}",
        "malformed JSON at line 2, column 43: duplicate field `providers.nvidia.rate_rpm`; each field may appear once",
    ),
    case(
        br#"{"providers": {"nvidia": {"rate_rpm": 3}, "nvidia": {"bucket_capacity": 4}}}"#,
        "malformed JSON at line 1, column 43: duplicate field `providers.nvidia`; each field may appear once",
    ),
    // Too deep.
    case(
        br#"{"rate_rpm": [[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]}"#,
        "malformed JSON at line 1, column 29: nesting too deep; at most 16 levels of objects and arrays",
    ),
];

/// `method /api/admin/config` with the admin token and `body` as raw bytes.
fn write(method: &str, addr: std::net::SocketAddr, body: &'static [u8]) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(ADMIN_CONFIG)
        .header("host", addr.to_string())
        .header("authorization", BEARER)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body)))
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_malformed_body_is_refused_with_a_message_naming_the_problem_and_where() {
    let s = stack(
        MockConfig {
            rpm: 0.0,
            ..MockConfig::default()
        },
        &[("SIDECAR_ADMIN_TOKEN", TOKEN)],
    );
    let mut failures = Vec::new();
    for (i, c) in CASES.iter().enumerate() {
        // Both write methods read the body the same way.
        let method = if i % 2 == 0 { "PATCH" } else { "POST" };
        let a = call(s.addr, write(method, s.addr, c.body)).await;
        let v = a.json();
        let got = v["error"]["message"].as_str().unwrap_or_default();
        let mut wrong = Vec::new();
        if a.status != 400 || v["error"]["code"] != "invalid_json" {
            wrong.push(format!("{} {}", a.status, v["error"]["code"]));
        }
        if v["error"]["type"] != "invalid_request_error"
            || a.headers["content-type"] != "application/json"
        {
            wrong.push("not the OpenAI error shape".to_owned());
        }
        if got.contains('\n') {
            wrong.push("more than one line".to_owned());
        }
        for internal in ["InternalError", "TapeError", "ErrorType", "Some("] {
            if got.contains(internal) {
                wrong.push(format!("shows {internal}"));
            }
        }
        if got != c.message {
            wrong.push("another message".to_owned());
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "{method} {:?}: {}\n   got: {got}\n  want: {}",
                String::from_utf8_lossy(c.body),
                wrong.join(", "),
                c.message
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));

    // Nothing was applied.
    let a = admin_get(s.addr, &[("authorization", BEARER)]).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["version"], "1", "a refused body changes nothing");
    s.stop();
}
