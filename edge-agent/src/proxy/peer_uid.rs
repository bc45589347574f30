//! Which local uid is behind a loopback TCP connection. On Linux the kernel's
//! socket tables (`/proc/net/tcp{,6}`) say; elsewhere the caller cannot be
//! identified, and the proxy refuses every connection (fail closed).

use std::net::SocketAddr;
#[cfg(target_os = "linux")]
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// This process's effective uid.
pub(super) fn own_euid() -> Result<u32, String> {
    Ok(crate::workload::effective_uid())
}

/// The uid owning the client end of the loopback connection `peer` →
/// `local`, from the kernel's socket tables.
#[cfg(target_os = "linux")]
pub(super) async fn caller_uid(peer: SocketAddr, local: SocketAddr) -> Result<u32, String> {
    let (v4, v6) = tokio::join!(
        tokio::fs::read_to_string("/proc/net/tcp"),
        tokio::fs::read_to_string("/proc/net/tcp6"),
    );
    if v4.is_err() && v6.is_err() {
        return Err(format!(
            "cannot read /proc/net/tcp: {}",
            v4.err().map(|e| e.to_string()).unwrap_or_default()
        ));
    }
    for table in [v4, v6].into_iter().flatten() {
        if let Some(uid) = socket_owner(&table, peer, local) {
            return Ok(uid);
        }
    }
    Err(format!(
        "no socket {peer} -> {local} in /proc/net/tcp{{,6}}"
    ))
}

/// Without `/proc/net/tcp` the calling process cannot be identified: the
/// connection is refused (fail closed).
#[cfg(not(target_os = "linux"))]
pub(super) async fn caller_uid(peer: SocketAddr, local: SocketAddr) -> Result<u32, String> {
    Err(format!(
        "cannot attribute {peer} -> {local} to a local uid: the proxy identifies callers only on Linux"
    ))
}

/// Finds the socket whose local address is `sock` and remote address `remote`
/// in a `/proc/net/tcp` or `/proc/net/tcp6` table, and returns its uid.
#[cfg(target_os = "linux")]
pub(super) fn socket_owner(table: &str, sock: SocketAddr, remote: SocketAddr) -> Option<u32> {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (sock, remote) = (canon(sock), canon(remote));
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let l = canon(parse_proc_addr(f.get(1)?)?);
        let r = canon(parse_proc_addr(f.get(2)?)?);
        if l == sock && r == remote {
            f.get(7)?.parse().ok()
        } else {
            None
        }
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits then `:PORT` (IPv6). The kernel
/// prints each 32-bit word of the address as a native-endian integer.
#[cfg(target_os = "linux")]
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut b = [0u8; 16];
            for (i, chunk) in b.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    #[tokio::test]
    async fn proc_lookup_finds_the_uid_of_the_client_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server_addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(server_addr).await.expect("connect");
        let (_server, peer) = listener.accept().await.expect("accept");
        assert_eq!(peer, client.local_addr().expect("addr"));
        assert_eq!(
            caller_uid(peer, server_addr).await,
            Ok(own_euid().expect("own uid"))
        );
        // A connection that does not exist is not attributed to anyone.
        let ghost = SocketAddr::from(([127, 0, 0, 1], 1));
        assert!(caller_uid(ghost, server_addr).await.is_err());
    }

    #[test]
    fn proc_tables_parse() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F99 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1001        0 1 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:C350 0100007F:1F99 01 00000000:00000000 00:00000000 00000000  1000        0 2 1 0000000000000000 20 4 30 10 -1\n";
        let proxy = SocketAddr::from(([127, 0, 0, 1], 0x1F99));
        let client = SocketAddr::from(([127, 0, 0, 1], 0xC350));
        assert_eq!(socket_owner(v4, client, proxy), Some(1000));
        assert_eq!(socket_owner(v4, proxy, client), Some(1001));
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000000000000000000001000000:C350 00000000000000000000000001000000:1F99 01 00000000:00000000 00:00000000 00000000  1234        0 3 1\n";
        let proxy6 = SocketAddr::from((Ipv6Addr::LOCALHOST, 0x1F99));
        let client6 = SocketAddr::from((Ipv6Addr::LOCALHOST, 0xC350));
        if cfg!(target_endian = "little") {
            assert_eq!(socket_owner(v6, client6, proxy6), Some(1234));
        }
        assert_eq!(socket_owner(v6, client, proxy), None);
    }
}
