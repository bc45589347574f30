//! The proxy's settings: the allowlisted upstreams and every bound, checked
//! without I/O before anything is bound.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::route::Route;

const MAX_UPSTREAMS: usize = 256;

fn yes() -> bool {
    true
}

/// One allowlisted upstream and how its key is injected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// The host clients name, as in a request's authority or `Host` header:
    /// `api.openai.com`, or `host:port`. Matched case-insensitively; port 80
    /// (the default of the `http://` URLs clients use) may be omitted.
    pub host: String,
    /// Name of the secret leased from the regional cache.
    pub secret: String,
    /// Header carrying the key, e.g. `authorization` or `x-api-key`. Any
    /// value the client sent under this name is dropped.
    pub header: String,
    /// Header value with one `{secret}`, e.g. `Bearer {secret}`.
    pub template: String,
    /// TLS to the upstream (default). `false` sends the key in clear text:
    /// only for loopback test servers and trusted internal plain-HTTP links.
    #[serde(default = "yes")]
    pub tls: bool,
    /// Port to connect to; default the port in `host`, else 443 with TLS and
    /// 80 without.
    #[serde(default)]
    pub port: Option<u16>,
}

/// Proxy settings. Defaults serve `lattice dev`: loopback port 8089, the
/// agent's own uid only, no upstream (every host refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Must be a loopback address.
    pub listen: SocketAddr,
    pub upstreams: Vec<Upstream>,
    /// PEM file of extra CA certificates trusted for upstreams, besides the
    /// webpki (Mozilla) roots: for private upstreams and tests.
    pub extra_ca: Option<PathBuf>,
    /// Local uids allowed to use the proxy; empty: the agent's own uid only.
    pub allowed_uids: Vec<u32>,
    /// Request line plus headers (431 beyond).
    pub max_request_head_bytes: usize,
    pub max_request_headers: usize,
    /// Request bodies are read whole before the key is leased (413 beyond).
    pub max_request_body_bytes: usize,
    /// Response bodies are streamed; a longer one is cut off.
    pub max_response_body_bytes: u64,
    pub max_connections: usize,
    /// Also bounds how long an idle keep-alive connection stays open.
    pub header_read_timeout_secs: u64,
    /// TCP connect plus TLS handshake to the upstream (502 beyond).
    pub connect_timeout_secs: u64,
    /// From sending the request to the upstream's response head (504 beyond).
    pub response_timeout_secs: u64,
    /// Longest pause between two chunks of an upstream response body.
    pub body_idle_timeout_secs: u64,
    /// Longest wait for a lease from the cache (503 beyond).
    pub lease_timeout_secs: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8089)),
            upstreams: Vec::new(),
            extra_ca: None,
            allowed_uids: Vec::new(),
            max_request_head_bytes: 16 * 1024,
            max_request_headers: 100,
            max_request_body_bytes: 8 * 1024 * 1024,
            max_response_body_bytes: 256 * 1024 * 1024,
            max_connections: 256,
            header_read_timeout_secs: 30,
            connect_timeout_secs: 10,
            response_timeout_secs: 300,
            body_idle_timeout_secs: 120,
            lease_timeout_secs: 15,
        }
    }
}

impl ProxyConfig {
    /// Checks everything that can be checked without I/O.
    pub fn validate(&self) -> Result<(), String> {
        if !self.listen.ip().is_loopback() {
            return Err(format!(
                "proxy.listen: {} is not a loopback address; the proxy must not be reachable from other machines",
                self.listen
            ));
        }
        if self.upstreams.len() > MAX_UPSTREAMS {
            return Err(format!(
                "proxy.upstreams: at most {MAX_UPSTREAMS} upstreams"
            ));
        }
        let positive = [
            ("max_request_head_bytes", self.max_request_head_bytes as u64),
            ("max_request_headers", self.max_request_headers as u64),
            ("max_request_body_bytes", self.max_request_body_bytes as u64),
            ("max_response_body_bytes", self.max_response_body_bytes),
            ("max_connections", self.max_connections as u64),
            ("header_read_timeout_secs", self.header_read_timeout_secs),
            ("connect_timeout_secs", self.connect_timeout_secs),
            ("response_timeout_secs", self.response_timeout_secs),
            ("body_idle_timeout_secs", self.body_idle_timeout_secs),
            ("lease_timeout_secs", self.lease_timeout_secs),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("proxy.{name} must be greater than 0"));
            }
        }
        let mut seen = HashMap::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let route = Route::from_config(u).map_err(|e| format!("proxy.upstreams[{i}]: {e}"))?;
            if let Some(j) = seen.insert(route.key.clone(), i) {
                return Err(format!(
                    "proxy.upstreams[{i}]: host {:?} is also upstream [{j}]; hosts must be unique",
                    route.key
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "openai";

    fn config(upstreams: Vec<Upstream>) -> ProxyConfig {
        ProxyConfig {
            upstreams,
            ..ProxyConfig::default()
        }
    }

    #[test]
    fn config_validation() {
        let ok = Upstream {
            host: "api.example.com".into(),
            secret: SECRET.into(),
            header: "authorization".into(),
            template: "Bearer {secret}".into(),
            tls: true,
            port: None,
        };
        assert_eq!(config(vec![ok.clone()]).validate(), Ok(()));
        let bad = |f: &dyn Fn(&mut ProxyConfig), want: &str| {
            let mut c = config(vec![ok.clone()]);
            f(&mut c);
            let e = c.validate().expect_err("invalid");
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        };
        bad(
            &|c: &mut ProxyConfig| c.upstreams[0].template = "Bearer".into(),
            "exactly once",
        );
        bad(
            &|c: &mut ProxyConfig| c.upstreams[0].template = "{secret}{secret}".into(),
            "exactly once",
        );
        bad(
            &|c: &mut ProxyConfig| c.upstreams[0].template = "a\n{secret}".into(),
            "template",
        );
        bad(
            &|c: &mut ProxyConfig| c.upstreams[0].header = "bad header".into(),
            "valid header name",
        );
        bad(
            &|c: &mut ProxyConfig| c.upstreams[0].header = "Host".into(),
            "cannot carry a key",
        );
        bad(
            &|c: &mut ProxyConfig| c.upstreams[0].host = "".into(),
            "host",
        );
        bad(
            &|c: &mut ProxyConfig| c.upstreams[0].host = "u@api.example.com".into(),
            "host",
        );
        bad(
            &|c: &mut ProxyConfig| c.upstreams[0].secret = "".into(),
            "secret",
        );
        bad(
            &|c: &mut ProxyConfig| {
                let mut dup = ok.clone();
                dup.host = "API.example.com:80".into();
                c.upstreams.push(dup);
            },
            "unique",
        );
        bad(
            &|c: &mut ProxyConfig| c.listen = SocketAddr::from(([0, 0, 0, 0], 8089)),
            "loopback",
        );
        bad(
            &|c: &mut ProxyConfig| c.max_connections = 0,
            "max_connections",
        );
        let d = ProxyConfig::default();
        assert_eq!(d.listen, SocketAddr::from(([127, 0, 0, 1], 8089)));
        assert!(d.validate().is_ok());
        // `tls` defaults to true when read from a file.
        let u: Upstream = serde_json::from_str(
            r#"{"host":"a.example","secret":"s","header":"x-api-key","template":"{secret}"}"#,
        )
        .expect("parse");
        assert!(u.tls);
        assert_eq!(u.port, None);
    }
}
