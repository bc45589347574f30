//! A fault proxy for the harness: a TCP relay between two parties that can
//! pass, delay, drop or black-hole their traffic, and heal.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Relay bytes as they come.
    Pass,
    /// Relay each chunk after this delay.
    Delay(Duration),
    /// Close every connection and refuse new ones.
    Drop,
    /// Accept and hold connections but move no bytes (a silent partition);
    /// bytes held resume flowing when healed, as after a TCP partition.
    BlackHole,
    /// Black-hole the connections opened before the `n`th (a lost NAT or
    /// conntrack entry, a load-balancer failover); newer ones pass.
    BlackHoleBefore(u64),
}

#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    /// Connections accepted so far (each is numbered from 0).
    accepted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    mode: watch::Sender<Mode>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 and relays to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, rx) = watch::channel(Mode::Pass);
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if *rx.borrow() == Mode::Drop {
                    drop(inbound);
                    continue;
                }
                let rx = rx.clone();
                let id = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::select! {
                        _ = pump(ri, wo, rx.clone(), id) => {}
                        _ = pump(ro, wi, rx, id) => {}
                    }
                });
            }
        });
        Ok(Self {
            addr,
            accepted,
            mode,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }
    /// Black-holes every connection open now; new ones pass.
    pub fn black_hole_existing(&self) {
        let n = self.accepted.load(std::sync::atomic::Ordering::SeqCst);
        self.set(Mode::BlackHoleBefore(n));
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies one direction, obeying the mode before each chunk.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    id: u64,
) {
    let held = |m: Mode| match m {
        Mode::BlackHole => true,
        Mode::BlackHoleBefore(n) => id < n,
        _ => false,
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Hold while black-holed; end on drop.
        loop {
            let m = *mode.borrow_and_update();
            match m {
                Mode::Drop => return,
                m if held(m) => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
                _ => break,
            }
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // Re-check the mode when it changes mid-read.
            c = mode.changed() => {
                if c.is_err() {
                    return;
                }
                continue;
            }
        };
        // A chunk read just before a partition is held like the rest.
        loop {
            let m = *mode.borrow_and_update();
            match m {
                Mode::Drop => return,
                m if held(m) => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
                Mode::Delay(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                _ => break,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
