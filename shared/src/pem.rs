//! PEM files for operators: certificates to hand around, and the admin key.

use std::path::Path;

use base64::Engine;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use zeroize::Zeroizing;

pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

pub fn encode_certs<'a>(ders: impl IntoIterator<Item = &'a [u8]>) -> String {
    ders.into_iter().map(|d| encode("CERTIFICATE", d)).collect()
}

/// All certificates in a PEM file, in order.
pub fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_certs(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// All certificates in PEM text, in order (at least one).
pub fn parse_certs(text: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(text).collect();
    let certs = certs.map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no certificate found".into());
    }
    Ok(certs.into_iter().map(|c| c.to_vec()).collect())
}

/// The PKCS#8 private key in a PEM file.
pub fn read_key(path: &Path) -> Result<Zeroizing<Vec<u8>>, String> {
    match PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))? {
        PrivateKeyDer::Pkcs8(k) => Ok(Zeroizing::new(k.secret_pkcs8_der().to_vec())),
        _ => Err(format!("{}: expected a PKCS#8 private key", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c.pem");
        std::fs::write(&p, encode_certs([&b"abc"[..], &b"defgh"[..]])).expect("write");
        assert_eq!(
            read_certs(&p).expect("read"),
            vec![b"abc".to_vec(), b"defgh".to_vec()]
        );
        std::fs::write(&p, "nothing").expect("write");
        assert!(read_certs(&p).is_err());
    }
}
