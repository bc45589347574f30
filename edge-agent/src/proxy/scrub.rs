//! Scrubbing the leased key out of what the upstream sends back: header
//! values, and byte streams cut into arbitrary chunks.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use zeroize::Zeroizing;

use super::REDACTED;

/// `headers` with the key replaced in every value; a header whose name
/// contains the key is dropped.
pub(super) fn scrub_headers(key: &[u8], headers: HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    let mut name = None;
    for (n, v) in headers {
        // `None` repeats the previous name (multi-valued headers).
        if let Some(n) = n {
            name = Some(n);
        }
        let Some(n) = name.clone() else { continue };
        if contains(n.as_str().as_bytes(), key) {
            continue;
        }
        if contains(v.as_bytes(), key) {
            let scrubbed = scrub_all(key, v.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&scrubbed) {
                out.append(n, v);
            }
        } else {
            out.append(n, v);
        }
    }
    out
}

pub(super) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

pub(super) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `data` with every occurrence of `key` replaced by [`REDACTED`].
pub fn scrub_all(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut s = Scrubber::new(key);
    let mut out = s.push(data).to_vec();
    out.extend_from_slice(&s.finish());
    out
}

/// Replaces a secret in a byte stream cut into arbitrary chunks. It holds
/// back the last `len - 1` bytes of what it has seen (a possible start of
/// the secret) until the next chunk or [`Scrubber::finish`].
pub struct Scrubber {
    needle: Zeroizing<Vec<u8>>,
    tail: Zeroizing<Vec<u8>>,
}

impl Scrubber {
    pub fn new(secret: &[u8]) -> Scrubber {
        Scrubber {
            needle: Zeroizing::new(secret.to_vec()),
            tail: Zeroizing::new(Vec::new()),
        }
    }

    /// Takes the next chunk; returns what can be emitted safely.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        let n = self.needle.len();
        if n == 0 {
            return Bytes::copy_from_slice(chunk);
        }
        let mut buf = Zeroizing::new(Vec::with_capacity(self.tail.len() + chunk.len()));
        buf.extend_from_slice(&self.tail);
        buf.extend_from_slice(chunk);
        self.tail.clear();
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        while let Some(pos) = find(&buf[i..], &self.needle) {
            out.extend_from_slice(&buf[i..i + pos]);
            out.extend_from_slice(REDACTED);
            i += pos + n;
        }
        // Any match starting before `keep_from` would have ended inside
        // `buf` and been found; the rest may be the start of one.
        let keep_from = buf.len().saturating_sub(n - 1).max(i);
        out.extend_from_slice(&buf[i..keep_from]);
        self.tail.extend_from_slice(&buf[keep_from..]);
        Bytes::from(out)
    }

    /// The held-back bytes, at the end of the stream.
    pub fn finish(&mut self) -> Bytes {
        let rest = Bytes::copy_from_slice(&self.tail);
        self.tail.clear();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubber_catches_the_key_across_chunk_boundaries() {
        let k = b"sk-ABCDEFGH";
        let text = b"aa sk-ABCDEFGH bb sk-ABCDsk-ABCDEFGHsk-ABCDEFGH sk-ABCDEFG";
        let want = b"aa [REDACTED] bb sk-ABCD[REDACTED][REDACTED] sk-ABCDEFG".to_vec();
        assert_eq!(scrub_all(k, text), want);
        // Every chunk size, including 1-byte chunks.
        for size in 1..=text.len() {
            let mut s = Scrubber::new(k);
            let mut out = Vec::new();
            for c in text.chunks(size) {
                let emitted = s.push(c);
                assert!(!contains(&emitted, k));
                out.extend_from_slice(&emitted);
            }
            out.extend_from_slice(&s.finish());
            assert_eq!(out, want, "chunk size {size}");
        }
        // Every split of the key between two chunks.
        let text = b"xx sk-ABCDEFGH yy";
        for cut in 0..=text.len() {
            let mut s = Scrubber::new(k);
            let mut out = s.push(&text[..cut]).to_vec();
            out.extend_from_slice(&s.push(&text[cut..]));
            out.extend_from_slice(&s.finish());
            assert_eq!(out, b"xx [REDACTED] yy".to_vec(), "cut at {cut}");
        }
        // At most len-1 (here 10) bytes are held back.
        let mut s = Scrubber::new(k);
        assert_eq!(&s.push(b"0123456789abcdef")[..], b"012345");
        assert_eq!(&s.finish()[..], b"6789abcdef");
    }

    #[test]
    fn scrubber_handles_self_overlapping_keys() {
        assert_eq!(
            scrub_all(b"aab", b"aaab aab"),
            b"a[REDACTED] [REDACTED]".to_vec()
        );
        let mut s = Scrubber::new(b"aab");
        let mut out = Vec::new();
        for c in b"aaaab".chunks(1) {
            out.extend_from_slice(&s.push(c));
        }
        out.extend_from_slice(&s.finish());
        assert_eq!(out, b"aa[REDACTED]".to_vec());
    }

    #[test]
    fn headers_are_scrubbed() {
        let mut h = HeaderMap::new();
        h.append("x-a", HeaderValue::from_static("Bearer sk-1 ok"));
        h.append("x-a", HeaderValue::from_static("clean"));
        h.append("x-b", HeaderValue::from_static("sk-1"));
        let out = scrub_headers(b"sk-1", h);
        let a: Vec<_> = out.get_all("x-a").iter().collect();
        assert_eq!(a, vec!["Bearer [REDACTED] ok", "clean"]);
        assert_eq!(out["x-b"], "[REDACTED]");
    }
}
