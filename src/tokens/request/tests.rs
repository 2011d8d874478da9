use super::*;

fn fields(body: &str) -> TokenFields<'_> {
    read(body.as_bytes())
}

// === Chat completions ===

#[test]
fn chat_messages_count_every_field_as_text_and_each_message_once() {
    let f = fields(
        r#"{"model":"gpt-4o","messages":[
            {"role":"system","content":"You are terse."},
            {"role":"user","name":"ann","content":"Hello there"}],
           "max_tokens":100,"n":2,"stream":true,"stream_options":{"include_usage":true},
           "temperature":0.2,"metadata":{"long":"not a prompt field"}}"#,
    );
    // system 6 + "You are terse." 14 + user 4 + ann 3 + "Hello there" 11
    assert_eq!(f.text_bytes, 6 + 14 + 4 + 3 + 11);
    assert_eq!(f.messages, 2);
    assert_eq!(f.model.as_deref(), Some("gpt-4o"));
    assert!(matches!(f.model, Some(Cow::Borrowed(_))));
    assert_eq!(f.completion_bound, Some(100));
    assert_eq!((f.n, f.prompts, f.best_of), (2, 1, 0));
    assert!(f.stream && f.include_usage);
    assert_eq!(f.basis, Basis::Fields);
}

#[test]
fn text_is_measured_after_unescaping() {
    // "é\n" is 3 bytes of UTF-8; "\"q\"" 3 bytes.
    let f = fields(r#"{"messages":[{"content":"\u00e9\n"},{"content":"\"q\""}]}"#);
    assert_eq!(f.text_bytes, 6);
    let f = fields(r#"{"model":"meta\/llama","messages":[]}"#);
    assert_eq!(f.model.as_deref(), Some("meta/llama"));
}

#[test]
fn text_parts_count_their_text_and_not_their_wrapping() {
    let f = fields(
        r#"{"messages":[{"role":"user","content":[
            {"type":"text","text":"abc","cache_control":{"type":"ephemeral"}},
            {"text":"de","type":"input_text"},
            "fgh"]}]}"#,
    );
    assert_eq!(f.text_bytes, 4 + 3 + 2 + 3);
    assert_eq!(f.messages, 1);
}

#[test]
fn images_count_by_detail_and_their_urls_are_never_text() {
    let data = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";
    let body = format!(
        r#"{{"messages":[{{"role":"user","content":[
            {{"type":"text","text":"what is this?"}},
            {{"type":"image_url","image_url":{{"url":"{data}","detail":"low"}}}},
            {{"type":"image_url","image_url":{{"url":"https://example.com/a.png","detail":"high"}}}},
            {{"image_url":{{"url":"https://example.com/b.png"}},"type":"image_url"}}]}}]}}"#
    );
    let f = read(body.as_bytes());
    assert_eq!(f.text_bytes, 4 + 13);
    assert_eq!(
        f.images,
        Images {
            low: 1,
            high: 1,
            auto: 1
        }
    );
    assert_eq!(f.data_bytes, data.len() as u64);
    assert_eq!(f.media, 0);
}

#[test]
fn responses_image_parts_take_detail_beside_a_url_string() {
    let f = fields(
        r#"{"model":"gpt-4.1","input":[{"role":"user","content":[
            {"type":"input_text","text":"describe"},
            {"type":"input_image","image_url":"data:image/jpeg;base64,/9j/4AAQ","detail":"low"},
            {"type":"input_image","file_id":"file-123"}]}]}"#,
    );
    assert_eq!(
        f.images,
        Images {
            low: 1,
            high: 0,
            auto: 1
        }
    );
    assert_eq!(f.text_bytes, 4 + 8);
    assert_eq!(f.data_bytes, "data:image/jpeg;base64,/9j/4AAQ".len() as u64);
    assert_eq!(f.messages, 1);
}

#[test]
fn a_part_of_unknown_type_with_an_image_url_is_an_image_and_otherwise_text() {
    let f = fields(
        r#"{"messages":[{"content":[
            {"image_url":"https://x/y.png"},
            {"type":"novel","caption":"data:x","note":"hi"}]}]}"#,
    );
    assert_eq!(f.images.auto, 1);
    // The novel part: its values are text ("hi"), except the data URL; its `type` is
    // read, not counted.
    assert_eq!(f.text_bytes, 2);
    assert_eq!(f.data_bytes, 6);
}

#[test]
fn audio_video_and_file_parts_are_media_and_their_payload_is_not_text() {
    let f = fields(
        r#"{"messages":[{"role":"user","content":[
            {"type":"input_audio","input_audio":{"data":"UklGRiQAAABXQVZFZm10","format":"wav"}},
            {"type":"file","file":{"file_data":"data:application/pdf;base64,JVBERi0x","filename":"a.pdf"}},
            {"type":"text","text":"sum up"}]}]}"#,
    );
    assert_eq!(f.media, 2);
    assert_eq!(f.text_bytes, 4 + 6);
    assert!(f.data_bytes >= 20 + 36, "{}", f.data_bytes);
}

#[test]
fn tool_calls_and_tool_definitions_count_as_their_json() {
    let f = fields(
        r#"{"messages":[
            {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function",
                "function":{"name":"f","arguments":"{\"a\":1}"}}]},
            {"role":"tool","tool_call_id":"c1","content":"42"}],
           "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],
           "tool_choice":"auto"}"#,
    );
    // assistant 9; tool_calls [{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]:
    //   [] 2 + comma 1 + {} 2 + "id": 6 + c1 2 + "type": 8 + function 8
    //   + "function": 12 + {} 2 + "name": 8 + f 1 + "arguments": 13 + {"a":1} 7 = 72
    // tool 4, c1 2, "42" 2
    // tools: [] 2 + 1 + {} 2 + "type": 8 + function 8 + "function": 12 + {} 2 + "name": 8
    //   + f 1 + "parameters": 14 + {} 2 + "type": 8 + object 6 = 74; tool_choice auto 4
    assert_eq!(f.text_bytes, 9 + 72 + 4 + 2 + 2 + 74 + 4);
    assert_eq!(f.messages, 2);
}

// === Completions, embeddings, responses ===

#[test]
fn completions_prompt_shapes_count_text_ids_and_prompts() {
    let one = fields(r#"{"prompt":"Say hi","max_tokens":5}"#);
    assert_eq!(
        (one.text_bytes, one.token_ids, one.prompts, one.messages),
        (6, 0, 1, 0)
    );
    let strings = fields(r#"{"prompt":["a","bc","def"],"best_of":3,"n":2}"#);
    assert_eq!((strings.text_bytes, strings.prompts), (6, 3));
    assert_eq!((strings.n, strings.best_of), (2, 3));
    let ids = fields(r#"{"prompt":[1,2,3,4]}"#);
    assert_eq!((ids.text_bytes, ids.token_ids, ids.prompts), (0, 4, 1));
    let nested = fields(r#"{"prompt":[[1,2],[3],[4,5,6]],"suffix":"end"}"#);
    assert_eq!(
        (nested.text_bytes, nested.token_ids, nested.prompts),
        (3, 6, 3)
    );
    let mixed = fields(r#"{"prompt":["ab",7,8,[9]]}"#);
    assert_eq!(
        (mixed.text_bytes, mixed.token_ids, mixed.prompts),
        (2, 3, 3)
    );
}

#[test]
fn embeddings_input_shapes_count_text_and_ids_exactly() {
    let f = fields(r#"{"model":"text-embedding-3-small","input":["one","three"]}"#);
    assert_eq!(
        (f.text_bytes, f.token_ids, f.completion_bound),
        (8, 0, None)
    );
    let f = fields(r#"{"input":[[101,2023,102],[101,102]],"encoding_format":"float"}"#);
    assert_eq!((f.text_bytes, f.token_ids), (0, 5));
    let f = fields(r#"{"input":17}"#);
    assert_eq!(f.token_ids, 1);
}

#[test]
fn responses_instructions_input_items_and_output_bound() {
    let f = fields(
        r#"{"model":"o3","instructions":"Be brief.","max_output_tokens":300,
           "input":[{"role":"user","content":"hi"},
                    {"type":"function_call","call_id":"c","name":"f","arguments":"{}"},
                    {"type":"function_call_output","call_id":"c","output":"ok"}]}"#,
    );
    // instructions 9; user 4 + hi 2; function_call 13 + c 1 + f 1 + {} 2;
    // function_call_output 20 + c 1 + ok 2
    assert_eq!(f.text_bytes, 9 + 6 + 17 + 23);
    assert_eq!(f.messages, 3);
    assert_eq!(f.completion_bound, Some(300));
    let f = fields(r#"{"input":"tell me a story","instructions":null}"#);
    assert_eq!((f.text_bytes, f.messages), (15, 0));
}

#[test]
fn the_completion_bound_prefers_max_completion_tokens_then_max_tokens() {
    let all = r#"{"messages":[],"max_output_tokens":3,"max_tokens":2,"max_completion_tokens":1}"#;
    assert_eq!(fields(all).completion_bound, Some(1));
    let two = r#"{"messages":[],"max_output_tokens":3,"max_tokens":2}"#;
    assert_eq!(fields(two).completion_bound, Some(2));
    assert_eq!(
        fields(r#"{"messages":[],"max_tokens":2.5}"#).completion_bound,
        Some(3)
    );
    assert_eq!(
        fields(r#"{"messages":[],"max_tokens":null}"#).completion_bound,
        None
    );
    assert_eq!(
        fields(r#"{"messages":[],"max_tokens":"9"}"#).completion_bound,
        None
    );
    assert_eq!(
        fields(r#"{"messages":[],"max_tokens":-9}"#).completion_bound,
        None
    );
}

// === Odd and broken bodies ===

#[test]
fn bodies_that_are_not_a_json_object_read_as_their_length() {
    for body in [
        &b"not json"[..],
        b"",
        b"[1,2,3]",
        b"\"a string\"",
        b"{\"messages\":[{\"content\":\"cut",
        b"{\"messages\":[]} trailing",
        b"{\"messages\":[{\"content\":\"\xff\xfe\"}]}",
        b"\xef\xbb\xbf{\"messages\":[]}",
    ] {
        let f = read(body);
        assert_eq!(f, TokenFields::from_length(body.len()), "{body:?}");
        assert_eq!(f.basis, Basis::BodyLength);
    }
}

#[test]
fn an_object_without_a_prompt_field_reads_as_its_length() {
    let body = r#"{"model":"rerank","query":"q","documents":["a","b"],"max_tokens":5}"#;
    let f = fields(body);
    assert_eq!(f.basis, Basis::BodyLength);
    assert_eq!(f.text_bytes, body.len() as u64);
    assert_eq!((f.messages, f.token_ids, f.data_bytes), (0, 0, 0));
    assert_eq!(f.model.as_deref(), Some("rerank"));
    assert_eq!(f.completion_bound, Some(5));
}

#[test]
fn nesting_past_serde_jsons_limit_reads_as_length_without_overflowing_the_stack() {
    let body = format!(
        r#"{{"messages":{}1{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let f = read(body.as_bytes());
    assert_eq!(f.basis, Basis::BodyLength);
    let tools = format!(
        r#"{{"input":"x","tools":{}{}}}"#,
        "[".repeat(120),
        "]".repeat(120)
    );
    assert_eq!(read(tools.as_bytes()).basis, Basis::Fields);
}

#[test]
fn fields_of_unexpected_types_count_as_text_without_failing_the_read() {
    let f = fields(
        r#"{"model":7,"messages":"just a string","n":-1,"stream":"yes",
           "stream_options":true,"best_of":[1]}"#,
    );
    assert_eq!(f.basis, Basis::Fields);
    assert_eq!(f.model, None);
    assert_eq!(f.text_bytes, 13);
    assert_eq!(
        (f.n, f.best_of, f.stream, f.include_usage),
        (1, 0, false, false)
    );
    let f = fields(r#"{"messages":[{"role":"user","content":12345},7,{"content":{"text":"x"}}]}"#);
    // user 4 + 12345 5; 7 is no message but counts its digit; the object content
    // reads as a part of unknown type: its text "x"
    assert_eq!(f.messages, 2);
    assert_eq!(f.text_bytes, 4 + 5 + 1 + 1);
}

#[test]
fn the_model_is_cut_to_256_bytes_at_a_character_boundary() {
    let long = "é".repeat(200); // 400 bytes
    let body = format!(r#"{{"model":"{long}","messages":[]}}"#);
    let f = read(body.as_bytes());
    let model = f.model.unwrap();
    assert_eq!(model.len(), 256);
    assert!(model.chars().all(|c| c == 'é'));
    let escaped = format!(r#"{{"model":"\u00e9{}","messages":[]}}"#, "a".repeat(300));
    let f = read(escaped.as_bytes());
    assert!(matches!(f.model, Some(Cow::Owned(_))));
    assert_eq!(f.model.unwrap().len(), 256);
    // Exactly 256: kept whole.
    let exact = "m".repeat(256);
    let body = format!(r#"{{"model":"{exact}","messages":[]}}"#);
    let f = read(body.as_bytes());
    assert_eq!(f.model.as_deref(), Some(exact.as_str()));
}

#[test]
fn repeated_fields_all_count_and_the_last_scalar_wins() {
    let f = fields(r#"{"messages":[{"content":"ab"}],"messages":[{"content":"c"}],"n":2,"n":3}"#);
    assert_eq!((f.text_bytes, f.messages, f.n), (3, 2, 3));
}
