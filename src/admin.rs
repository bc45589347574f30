//! The operator's client for the control plane's `Admin` API, authenticated
//! with an admin certificate (the bootstrap one is written by the control
//! plane to `DATA/admin/`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use lattice_shared::clock::SystemClock;
use lattice_shared::pki::{PrivateKey, TrustBundle, inspect};
use lattice_shared::proto::admin_client::AdminClient;
use lattice_shared::tls::{ExpectedServer, ReloadableCert};
use tonic::transport::Channel;

/// Connects to the control plane at `addr` with the credential in `dir`
/// (`admin.crt`, `admin.key`, `root.crt`).
pub fn connect(addr: SocketAddr, dir: &Path) -> anyhow::Result<AdminClient<Channel>> {
    let root = lattice_shared::pem::read_certs(&dir.join("root.crt")).map_err(|e| anyhow!(e))?;
    let certs = lattice_shared::pem::read_certs(&dir.join("admin.crt")).map_err(|e| anyhow!(e))?;
    let key = lattice_shared::pem::read_key(&dir.join("admin.key")).map_err(|e| anyhow!(e))?;
    let info = inspect(&certs[0]).context("admin certificate")?;
    let id = info
        .id
        .ok_or_else(|| anyhow!("admin certificate carries no id"))?;
    let bundle = Arc::new(TrustBundle::new(
        id.trust_domain().clone(),
        root[0].clone(),
    )?);
    let key = PrivateKey::from_pkcs8(&key)?;
    let cert = ReloadableCert::new(certs, &key)?;
    let tls = lattice_shared::tls::client_config(
        bundle,
        SystemClock::shared(),
        ExpectedServer::ControlPlane,
        Some(cert),
    )?;
    Ok(AdminClient::new(lattice_shared::net::channel(addr, tls)?))
}
