//! Entry points of the fuzz targets, shared with the corpus replay test so every CI run
//! (on the stable toolchain) exercises the same code the fuzzer does.

/// Request-path parsers: the `model` finder, the priority header, the request id check.
pub fn request_parsers(data: &[u8]) {
    let _ = crate::route::extract_model(data);
    let _ = crate::priority::Priority::parse(data);
    if let Ok(v) = http::HeaderValue::from_bytes(data) {
        let mut h = http::HeaderMap::new();
        h.insert(crate::proxy::headers::X_REQUEST_ID, v);
        let _ = crate::proxy::headers::client_request_id(&h);
    }
}
