//! An allowlisted upstream resolved for use ([`Route`]), where a request is
//! going ([`Target`]), and the headers that never cross the proxy.

use bytes::Bytes;
use http::Request;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use rustls_pki_types::ServerName;
use zeroize::Zeroizing;

use super::SECRET_PLACEHOLDER;
use super::config::Upstream;
use lattice_shared::limits::REQUEST_ID_HEADER;

const MAX_NAME_LEN: usize = 256;

/// An upstream, resolved for use.
pub(super) struct Route {
    /// Normalised host the client names (lowercase, `:80` dropped).
    pub(super) key: String,
    /// Host to connect to and verify, without brackets.
    pub(super) connect_host: String,
    pub(super) port: u16,
    pub(super) tls: bool,
    pub(super) server_name: ServerName<'static>,
    pub(super) host_header: HeaderValue,
    pub(super) secret: String,
    pub(super) header: HeaderName,
    pub(super) prefix: String,
    pub(super) suffix: String,
}

/// Headers that belong to one hop; never forwarded either way.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Header names the key may not be injected as.
const RESERVED_KEY_HEADERS: [&str; 6] = [
    "host",
    "content-length",
    "content-type",
    "accept-encoding",
    "expect",
    REQUEST_ID_HEADER,
];

impl Route {
    pub(super) fn from_config(u: &Upstream) -> Result<Route, String> {
        let auth: Authority = u
            .host
            .parse()
            .map_err(|e| format!("host {:?}: {e}", u.host))?;
        if u.host.contains('@') || auth.host().is_empty() {
            return Err(format!("host {:?}: expected `name` or `name:port`", u.host));
        }
        if auth.port_u16() == Some(0) || u.port == Some(0) {
            return Err(format!("host {:?}: port 0", u.host));
        }
        let key = normalise_authority(&auth, 80);
        let connect_host = auth
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let port = u
            .port
            .or(auth.port_u16())
            .unwrap_or(if u.tls { 443 } else { 80 });
        let server_name = ServerName::try_from(connect_host.clone())
            .map_err(|e| format!("host {:?}: not a valid TLS server name: {e}", u.host))?;
        let default_port = if u.tls { 443 } else { 80 };
        let host_header = if port == default_port {
            auth.host().to_ascii_lowercase()
        } else {
            format!("{}:{port}", auth.host().to_ascii_lowercase())
        };
        let host_header =
            HeaderValue::from_str(&host_header).map_err(|e| format!("host {:?}: {e}", u.host))?;

        if u.secret.is_empty()
            || u.secret.len() > MAX_NAME_LEN
            || u.secret.chars().any(char::is_control)
        {
            return Err(format!(
                "secret: expected a name of 1 to {MAX_NAME_LEN} printable characters"
            ));
        }
        let header = HeaderName::from_bytes(u.header.as_bytes())
            .map_err(|_| format!("header {:?} is not a valid header name", u.header))?;
        if HOP_BY_HOP.contains(&header.as_str()) || RESERVED_KEY_HEADERS.contains(&header.as_str())
        {
            return Err(format!(
                "header {:?} cannot carry a key (hop-by-hop or managed by the proxy)",
                u.header
            ));
        }
        let parts: Vec<&str> = u.template.split(SECRET_PLACEHOLDER).collect();
        let [prefix, suffix] = parts.as_slice() else {
            return Err(format!(
                "template {:?} must contain {SECRET_PLACEHOLDER} exactly once",
                u.template
            ));
        };
        if HeaderValue::from_str(&format!("{prefix}x{suffix}")).is_err() {
            return Err(format!(
                "template {:?} has characters not allowed in a header value",
                u.template
            ));
        }
        Ok(Route {
            key,
            connect_host,
            port,
            tls: u.tls,
            server_name,
            host_header,
            secret: u.secret.clone(),
            header,
            prefix: (*prefix).to_owned(),
            suffix: (*suffix).to_owned(),
        })
    }

    /// The template with the key in it, in memory that is zeroized once the
    /// header value is dropped.
    pub(super) fn header_value(&self, key: &[u8]) -> Result<HeaderValue, String> {
        let mut v = Zeroizing::new(Vec::with_capacity(
            self.prefix.len() + key.len() + self.suffix.len(),
        ));
        v.extend_from_slice(self.prefix.as_bytes());
        v.extend_from_slice(key);
        v.extend_from_slice(self.suffix.as_bytes());
        // `from_maybe_shared` keeps this `Bytes` (no copy), whose owner
        // zeroizes on drop. The error names no value.
        let mut hv = HeaderValue::from_maybe_shared(Bytes::from_owner(v))
            .map_err(|_| "the leased key is not valid in an HTTP header".to_owned())?;
        hv.set_sensitive(true);
        Ok(hv)
    }
}

/// `host[:port]` in lowercase, without the port when it is `default_port`.
fn normalise_authority(a: &Authority, default_port: u16) -> String {
    let host = a.host().to_ascii_lowercase();
    match a.port_u16() {
        Some(p) if p != default_port => format!("{host}:{p}"),
        _ => host,
    }
}

/// Where a request is going.
pub(super) struct Target {
    pub(super) key: String,
    pub(super) path_and_query: PathAndQuery,
}

impl Target {
    pub(super) fn of<B>(req: &Request<B>) -> Result<Target, String> {
        let uri = req.uri();
        let (auth, default_port) = match uri.authority() {
            Some(a) => {
                let default_port = match uri.scheme_str() {
                    Some("http") | None => 80,
                    Some("https") => 443,
                    Some(s) => return Err(format!("unsupported scheme {s:?}")),
                };
                (a.clone(), default_port)
            }
            None => {
                let mut hosts = req.headers().get_all(header::HOST).iter();
                let (Some(h), None) = (hosts.next(), hosts.next()) else {
                    return Err(
                        "expected exactly one Host header (or an absolute-form request)".into(),
                    );
                };
                let a = Authority::try_from(h.as_bytes())
                    .map_err(|_| "the Host header is not a valid host".to_owned())?;
                (a, 80)
            }
        };
        if auth.as_str().contains('@') || auth.host().is_empty() {
            return Err("the target host is not valid".into());
        }
        let path_and_query = match uri.path_and_query() {
            Some(p) if p.as_str().starts_with('/') => p.clone(),
            None => PathAndQuery::from_static("/"),
            Some(_) => return Err("expected an origin-form or absolute-form request target".into()),
        };
        Ok(Target {
            key: normalise_authority(&auth, default_port),
            path_and_query,
        })
    }
}

pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    pub(super) fn header_value_is_built_from_the_template() {
        let mut u = Upstream {
            host: SocketAddr::from(([127, 0, 0, 1], 9)).to_string(),
            secret: "openai".into(),
            header: "x-api-key".into(),
            template: "k={secret};".into(),
            tls: false,
            port: None,
        };

        let r = Route::from_config(&u).expect("route");
        let v = r.header_value(b"abc").expect("value");
        assert_eq!(v, "k=abc;");
        assert!(v.is_sensitive());
        assert!(format!("{v:?}").contains("Sensitive"));
        assert!(r.header_value(b"a\r\nb").is_err());
        u.tls = true;
        let r = Route::from_config(&u).expect("route");
        assert_eq!(r.port, 9);
        assert_eq!(r.host_header, "127.0.0.1:9");
    }
}
