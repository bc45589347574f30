//! The injecting proxy's reading of a request's target: the first line is
//! the request target (origin or absolute form, or authority for CONNECT),
//! the second the Host header.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == b'\n');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return;
    };
    let Ok(method) = http::Method::from_bytes(method) else {
        return;
    };
    let Ok(uri) = http::Uri::try_from(target) else {
        return;
    };
    let mut req = http::Request::builder().method(method).uri(uri);
    if let Some(host) = parts.next()
        && let Ok(host) = http::HeaderValue::from_bytes(host)
    {
        req = req.header(http::header::HOST, host);
    }
    let Ok(req) = req.body(()) else {
        return;
    };
    if let Ok((key, path)) = lattice_edge_agent::proxy::fuzzing::request_target(&req) {
        assert!(!key.is_empty(), "a routed request names an upstream");
        assert!(path.starts_with('/') || path == "*", "path {path:?}");
    }
});
