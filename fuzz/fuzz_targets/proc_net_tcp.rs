//! `/proc/net/tcp` and `tcp6` tables as the proxy reads them to learn which
//! local user opened a connection. The first 12 bytes choose the two
//! addresses looked up (v4 or v6 by the first byte), the rest is the table.
#![no_main]
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let (head, table) = data.split_at(12);
    let Ok(table) = std::str::from_utf8(table) else {
        return;
    };
    let ip = |b: &[u8]| -> IpAddr {
        let v4 = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
        if head[0] & 1 == 0 {
            IpAddr::V4(v4)
        } else {
            IpAddr::V6(v4.to_ipv6_mapped())
        }
    };
    let sock = SocketAddr::new(ip(&head[0..4]), u16::from_be_bytes([head[4], head[5]]));
    let remote = SocketAddr::new(ip(&head[6..10]), u16::from_be_bytes([head[10], head[11]]));
    let _ = lattice_edge_agent::proxy::fuzzing::socket_owner(table, sock, remote);
    let _ = lattice_edge_agent::proxy::fuzzing::socket_owner(
        table,
        SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), sock.port()),
        remote,
    );
});
