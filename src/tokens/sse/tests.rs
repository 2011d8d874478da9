use super::*;

/// Feeds `stream` in pieces of `step` bytes, then ends it.
fn scan(stream: &[u8], step: usize) -> (Vec<Event>, UsageScanner) {
    let mut s = UsageScanner::new();
    let mut events = Vec::new();
    for piece in stream.chunks(step.max(1)) {
        s.feed(piece, |e| events.push(e));
    }
    s.finish(|e| events.push(e));
    (events, s)
}

fn kinds(events: &[Event]) -> Vec<EventKind> {
    events.iter().map(|e| e.kind).collect()
}

fn usage(p: u64, c: u64, t: u64) -> Usage {
    Usage {
        prompt: p,
        completion: c,
        total: t,
    }
}

const CONTENT_1: &str = r#"data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"}}],"usage":null}"#;
const CONTENT_2: &str = r#"data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}"#;
const USAGE_ONLY: &str = r#"data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#;

/// OpenAI's stream with `include_usage`, lines ended by `eol`.
fn openai(eol: &str) -> String {
    [CONTENT_1, CONTENT_2, USAGE_ONLY, "data: [DONE]"]
        .iter()
        .map(|l| format!("{l}{eol}{eol}"))
        .collect()
}

#[test]
fn the_include_usage_chunk_is_told_apart_and_its_span_is_exact() {
    let stream = openai("\n");
    let (events, s) = scan(stream.as_bytes(), stream.len());
    use EventKind::*;
    assert_eq!(kinds(&events), [Data, Data, UsageOnly, Done]);
    assert_eq!(s.usage(), Some(usage(9, 2, 11)));
    assert!(s.done());
    let e = events[2];
    assert_eq!(e.usage, Some(usage(9, 2, 11)));
    assert_eq!(
        &stream[e.start as usize..e.end as usize],
        format!("{USAGE_ONLY}\n\n")
    );
    // Spans tile the stream: dropping one leaves the others whole.
    assert_eq!(events[0].start, 0);
    for w in events.windows(2) {
        assert_eq!(w[0].end, w[1].start);
    }
    assert_eq!(events[3].end, stream.len() as u64);
    assert_eq!(events[0].usage, None, "usage: null is no usage");
}

#[test]
fn any_cut_of_the_stream_gives_the_same_events() {
    for eol in ["\n", "\r\n", "\r"] {
        let stream = openai(eol);
        let (whole, _) = scan(stream.as_bytes(), stream.len());
        for step in 1..=64 {
            let (cut, s) = scan(stream.as_bytes(), step);
            assert_eq!(cut, whole, "eol {eol:?}, step {step}");
            assert_eq!(s.usage(), Some(usage(9, 2, 11)));
        }
    }
}

#[test]
fn a_crlf_split_between_pieces_ends_one_line_not_two() {
    let stream = format!("{USAGE_ONLY}\r\n\r\ndata: [DONE]\r\n\r\n");
    let split = USAGE_ONLY.len() + 1; // after the first CR
    let mut s = UsageScanner::new();
    let mut events = Vec::new();
    s.feed(&stream.as_bytes()[..split], |e| events.push(e));
    s.feed(&[], |e| events.push(e));
    s.feed(&stream.as_bytes()[split..], |e| events.push(e));
    assert_eq!(kinds(&events), [EventKind::UsageOnly, EventKind::Done]);
    // The usage event ends after the CR of its empty line; the LF after it is nobody's.
    assert_eq!(events[0].end as usize, USAGE_ONLY.len() + 3);
    assert_eq!(events[1].start as usize, USAGE_ONLY.len() + 4);
}

#[test]
fn usage_on_the_last_content_chunk_is_read_but_not_droppable() {
    // llama.cpp: no separate chunk, the finishing chunk carries the usage.
    let stream = concat!(
        "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],",
        "\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,\"total_tokens\":6}}\n\n",
        "data: [DONE]\n\n",
    );
    let (events, s) = scan(stream.as_bytes(), 7);
    use EventKind::*;
    assert_eq!(kinds(&events), [Data, Data, Done]);
    assert_eq!(events[1].usage, Some(usage(5, 1, 6)));
    assert_eq!(s.usage(), Some(usage(5, 1, 6)));
}

#[test]
fn the_last_usage_wins_when_every_chunk_carries_one() {
    // vLLM's continuous usage stats: a running count on every chunk.
    let chunk = |c: u64| {
        format!(
            "data: {{\"choices\":[{{\"delta\":{{}}}}],\"usage\":{{\"prompt_tokens\":4,\"completion_tokens\":{c}}}}}\n\n"
        )
    };
    let stream = format!("{}{}{}", chunk(1), chunk(2), chunk(3));
    let (_, s) = scan(stream.as_bytes(), 5);
    assert_eq!(s.usage(), Some(usage(4, 3, 7)));
}

#[test]
fn a_stream_without_usage_has_none() {
    let stream = format!("{CONTENT_1}\n\n{CONTENT_2}\n\ndata: [DONE]\n\n");
    let (events, s) = scan(stream.as_bytes(), 3);
    assert_eq!(s.usage(), None);
    assert!(s.done());
    assert_eq!(events.len(), 3);
}

#[test]
fn responses_completed_event_gives_usage_and_is_kept() {
    let stream = concat!(
        "event: response.created\n",
        "data: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\n",
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n",
        "event: response.completed\n",
        "data: {\"type\":\"response.completed\",\"response\":{\"status\":\"completed\",",
        "\"usage\":{\"input_tokens\":12,\"output_tokens\":3,\"total_tokens\":15}}}\n\n",
    );
    let (events, s) = scan(stream.as_bytes(), 11);
    use EventKind::*;
    assert_eq!(kinds(&events), [Data, Data, Data]);
    assert_eq!(s.usage(), Some(usage(12, 3, 15)));
    assert!(!s.done());
    // The `event:` line is part of the event's span.
    assert_eq!(
        &stream[events[2].start as usize..][..25],
        "event: response.completed"
    );
}

#[test]
fn data_lines_join_with_a_newline_and_fields_follow_the_sse_grammar() {
    let stream = concat!(
        ": keep-alive\n\n",
        "\n\n",
        "id: 7\nretry: 100\n\n",
        "data:{\"choices\":[],\n",
        "data:  \"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n",
        "\n",
        "data:[DONE]\n\n",
    );
    let (events, s) = scan(stream.as_bytes(), stream.len());
    use EventKind::*;
    assert_eq!(kinds(&events), [NoData, NoData, UsageOnly, Done]);
    assert_eq!(s.usage(), Some(usage(1, 1, 2)));
    // The stray empty lines belong to no event.
    assert_eq!(events[1].start as usize, ": keep-alive\n\n\n\n".len());
}

#[test]
fn data_that_is_not_json_or_mentions_usage_in_text_is_plain_data() {
    let stream = concat!(
        "data: {\"choices\":[{\"delta\":{\"content\":\"the \\\"usage\\\" field\"}}]}\n\n",
        "data: {\"usage\": broken\n\n",
        "data: hello\n\n",
    );
    let (events, s) = scan(stream.as_bytes(), stream.len());
    assert_eq!(kinds(&events), [EventKind::Data; 3]);
    assert_eq!(s.usage(), None);
}

#[test]
fn a_line_past_the_limit_is_skipped_without_being_buffered() {
    let long = format!("data: {{\"x\":\"{}\"}}", "a".repeat(MAX_LINE));
    let stream = format!("{long}\n\n{USAGE_ONLY}\n\ndata: [DONE]\n\n");
    for step in [1000, 4096, stream.len()] {
        let mut s = UsageScanner::new();
        let mut events = Vec::new();
        let mut most = 0;
        for piece in stream.as_bytes().chunks(step) {
            s.feed(piece, |e| events.push(e));
            most = most.max(s.line.capacity()).max(s.data.capacity());
        }
        assert!(most <= MAX_LINE, "buffered {most} bytes");
        use EventKind::*;
        assert_eq!(kinds(&events), [TooLong, UsageOnly, Done], "step {step}");
        assert_eq!(s.usage(), Some(usage(9, 2, 11)));
    }
}

#[test]
fn data_lines_adding_up_past_the_limit_make_the_event_too_long() {
    let line = format!("data: {}\n", "b".repeat(MAX_LINE / 2));
    let stream = format!("{line}{line}{line}\n{USAGE_ONLY}\n\n");
    let (events, s) = scan(stream.as_bytes(), 999);
    assert_eq!(kinds(&events), [EventKind::TooLong, EventKind::UsageOnly]);
    assert_eq!(s.usage(), Some(usage(9, 2, 11)));
}

#[test]
fn an_event_the_stream_ends_without_its_empty_line_is_still_read() {
    let stream = format!("{CONTENT_1}\n\n{USAGE_ONLY}");
    let (events, s) = scan(stream.as_bytes(), 13);
    assert_eq!(kinds(&events), [EventKind::Data, EventKind::UsageOnly]);
    assert_eq!(events[1].end, stream.len() as u64);
    assert_eq!(s.usage(), Some(usage(9, 2, 11)));
    // Cut inside the JSON: nothing to read.
    let cut = &USAGE_ONLY[..USAGE_ONLY.len() - 5];
    let (events, s) = scan(cut.as_bytes(), 13);
    assert_eq!(kinds(&events), [EventKind::Data]);
    assert_eq!(s.usage(), None);
}

#[test]
fn pending_since_marks_the_event_a_proxy_must_hold_back() {
    let mut s = UsageScanner::new();
    let mut events = Vec::new();
    let first = format!("{CONTENT_1}\n\n");
    s.feed(first.as_bytes(), |e| events.push(e));
    assert_eq!(s.pending_since(), None);
    s.feed(b"data: {\"choi", |e| events.push(e));
    assert_eq!(s.pending_since(), Some(first.len() as u64));
    s.feed(b"ces\":[]}\n", |e| events.push(e));
    assert_eq!(s.pending_since(), Some(first.len() as u64));
    s.feed(b"\n", |e| events.push(e));
    assert_eq!(s.pending_since(), None);
    assert_eq!(events.len(), 2);
}

#[test]
fn only_events_with_a_usage_that_is_not_null_are_parsed() {
    assert!(usage_all_null(
        br#"{"choices":[{"delta":{}}],"usage":null}"#
    ));
    assert!(usage_all_null(br#"{"usage" :	 null ,"x":1}"#));
    assert!(usage_all_null(br#"{"content":"the \"usage\": {} field"}"#));
    assert!(usage_all_null(br#"{"choices":[]}"#));
    assert!(!usage_all_null(
        br#"{"choices":[],"usage":{"prompt_tokens":1}}"#
    ));
    assert!(!usage_all_null(
        br#"{"usage":null,"response":{"usage":{"input_tokens":1}}}"#
    ));
    assert!(!usage_all_null(br#"{"usage""#));
}
