//! Connection admission: how many connections a process takes, sized from
//! its file-descriptor limit so that a flood of idle connections can never
//! take the descriptors its store and its own dialling need.
//!
//! At start-up a binary raises its soft `RLIMIT_NOFILE` to the hard limit
//! ([`raise_fd_limit`]); every listener of the process then shares one
//! budget ([`Admission::process`]): a cap on open connections with headroom
//! below the limit, a cap on TLS handshakes in flight (a handshake is
//! unauthenticated work), and per source address a cap on handshakes in
//! flight and on connections without a client certificate. A connection
//! over a cap is closed at once, so it holds its descriptor for no time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The file-descriptor limit before and after [`raise_fd_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub soft_before: u64,
    pub soft: u64,
    /// `None`: unlimited.
    pub hard: Option<u64>,
}

/// Linux's default `fs.nr_open`: the most a soft limit can be raised to
/// when the hard limit is unlimited.
const NR_OPEN_DEFAULT: u64 = 1 << 20;

/// The current soft limit on open files (1024, the usual default, if it
/// cannot be read).
pub fn fd_soft_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(NR_OPEN_DEFAULT)
}

/// Raises the soft limit on open files to the hard limit (as far as the
/// kernel allows) and says what it was and is.
pub fn raise_fd_limit() -> FdLimit {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let before = getrlimit(Resource::Nofile);
    let soft_before = before.current.unwrap_or(NR_OPEN_DEFAULT);
    let target = before.maximum.unwrap_or(NR_OPEN_DEFAULT);
    if target > soft_before {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum: before.maximum,
            },
        );
    }
    FdLimit {
        soft_before,
        soft: fd_soft_limit(),
        hard: before.maximum,
    }
}

/// The caps of one process, derived from its descriptor limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// The soft descriptor limit the caps were sized for.
    pub fd_limit: u64,
    /// Open accepted connections, all listeners together.
    pub max_connections: usize,
    /// TLS handshakes in flight, all listeners together.
    pub max_handshakes: usize,
    /// TLS handshakes in flight from one source address.
    pub max_handshakes_per_source: usize,
    /// Connections without a client certificate (enrolment, the public
    /// JWKS, metrics scrapes), all listeners together.
    pub max_anonymous: usize,
    /// Connections without a client certificate from one source address.
    pub max_anonymous_per_source: usize,
}

impl AdmissionLimits {
    /// A quarter of the descriptors (at least 256) stay for the store, the
    /// process's own connections and everything else; connections get the
    /// rest, at most [`crate::limits::MAX_CONNECTIONS`].
    pub fn for_fd_limit(fd_limit: u64) -> Self {
        let fds = usize::try_from(fd_limit).unwrap_or(usize::MAX);
        let reserve = (fds / 4).max(256);
        let max_connections = fds
            .saturating_sub(reserve)
            .clamp(16, crate::limits::MAX_CONNECTIONS);
        let max_handshakes = (max_connections / 4).clamp(8, 256);
        let max_anonymous =
            (max_connections / 4).clamp(8, crate::limits::MAX_ANONYMOUS_CONNECTIONS);
        Self {
            fd_limit,
            max_connections,
            max_handshakes,
            max_handshakes_per_source: (max_handshakes / 4).max(2),
            max_anonymous,
            max_anonymous_per_source: (max_anonymous / 8).max(2),
        }
    }
}

/// The shared budget: semaphores for the process-wide caps and per-source
/// counts.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    anonymous: Arc<Semaphore>,
    per_source: Arc<Mutex<HashMap<IpAddr, SourceCount>>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct SourceCount {
    handshakes: usize,
    anonymous: usize,
}

impl SourceCount {
    fn of(&mut self, kind: Kind) -> &mut usize {
        match kind {
            Kind::Handshake => &mut self.handshakes,
            Kind::Anonymous => &mut self.anonymous,
        }
    }
}

/// Why a connection was not admitted (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Connections,
    Handshakes,
    SourceHandshakes,
    Anonymous,
    SourceAnonymous,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Connections => "limit",
            Refusal::Handshakes => "handshake_limit",
            Refusal::SourceHandshakes => "source_handshake_limit",
            Refusal::Anonymous => "anonymous_limit",
            Refusal::SourceAnonymous => "source_anonymous_limit",
        }
    }
}

impl Admission {
    pub fn new(limits: AdmissionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            handshakes: Arc::new(Semaphore::new(limits.max_handshakes)),
            anonymous: Arc::new(Semaphore::new(limits.max_anonymous)),
            per_source: Arc::default(),
        })
    }

    /// The process's budget, sized from the descriptor limit when first
    /// asked (after [`raise_fd_limit`] in the binaries).
    pub fn process() -> Arc<Self> {
        static PROCESS: OnceLock<Arc<Admission>> = OnceLock::new();
        PROCESS
            .get_or_init(|| Admission::new(AdmissionLimits::for_fd_limit(fd_soft_limit())))
            .clone()
    }

    pub fn limits(&self) -> AdmissionLimits {
        self.limits
    }

    /// A slot for an accepted connection, held until it closes.
    pub fn connection(&self) -> Result<OwnedSemaphorePermit, Refusal> {
        self.connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Connections)
    }

    /// A slot for one handshake from `source`, held until it ends.
    pub fn handshake(&self, source: IpAddr) -> Result<SourceSlot, Refusal> {
        self.slot(source, Kind::Handshake)
    }

    /// A slot for a connection without a client certificate from `source`,
    /// held until it closes.
    pub fn anonymous(&self, source: IpAddr) -> Result<SourceSlot, Refusal> {
        self.slot(source, Kind::Anonymous)
    }

    fn slot(&self, source: IpAddr, kind: Kind) -> Result<SourceSlot, Refusal> {
        let (all, per_source, refused_all, refused_source) = match kind {
            Kind::Handshake => (
                &self.handshakes,
                self.limits.max_handshakes_per_source,
                Refusal::Handshakes,
                Refusal::SourceHandshakes,
            ),
            Kind::Anonymous => (
                &self.anonymous,
                self.limits.max_anonymous_per_source,
                Refusal::Anonymous,
                Refusal::SourceAnonymous,
            ),
        };
        let permit = all.clone().try_acquire_owned().map_err(|_| refused_all)?;
        self.take(source, kind, per_source)
            .map_err(|_| refused_source)?;
        Ok(SourceSlot {
            _permit: permit,
            source,
            kind,
            counts: self.per_source.clone(),
        })
    }

    fn take(&self, source: IpAddr, kind: Kind, max: usize) -> Result<(), ()> {
        let mut g = self.per_source.lock().unwrap_or_else(|p| p.into_inner());
        let n = g.entry(source_key(source)).or_default().of(kind);
        if *n >= max {
            return Err(());
        }
        *n += 1;
        Ok(())
    }
}

/// What counts as one source: an IPv4 address (IPv4-mapped IPv6 folded
/// in), or an IPv6 /64 (one host can use any address of its /64).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Handshake,
    Anonymous,
}

/// A per-source slot (and its process-wide permit), given back on drop.
#[derive(Debug)]
pub struct SourceSlot {
    _permit: OwnedSemaphorePermit,
    source: IpAddr,
    kind: Kind,
    counts: Arc<Mutex<HashMap<IpAddr, SourceCount>>>,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut g = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let key = source_key(self.source);
        if let Some(c) = g.get_mut(&key) {
            let n = c.of(self.kind);
            *n = n.saturating_sub(1);
            if c.handshakes == 0 && c.anonymous == 0 {
                g.remove(&key);
            }
        }
    }
}

/// What every binary does first, once logging is set up: raise the
/// descriptor limit, size the connection caps from it (logging both), and
/// make a failed fsync fatal (the store stops writing; the process exits
/// with status 74, as PostgreSQL does, rather than acknowledge more).
pub fn start_process(component: &'static str) -> AdmissionLimits {
    let fd = raise_fd_limit();
    let caps = Admission::process().limits();
    tracing::info!(
        component,
        fd_soft_before = fd.soft_before,
        fd_limit = fd.soft,
        fd_hard = ?fd.hard,
        max_connections = caps.max_connections,
        max_handshakes = caps.max_handshakes,
        max_handshakes_per_source = caps.max_handshakes_per_source,
        max_anonymous = caps.max_anonymous,
        max_anonymous_per_source = caps.max_anonymous_per_source,
        "file descriptors and connection caps"
    );
    exit_on_failed_fsync();
    caps
}

/// Makes a failed fsync end the process (status 74) once the store has
/// stopped writing.
pub fn exit_on_failed_fsync() {
    crate::store::set_fatal_hook(|why| {
        tracing::error!(reason = why, "stopping: a write could not be made durable");
        eprintln!("fatal: {why}");
        std::process::exit(74);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_leave_headroom_below_the_descriptor_limit() {
        let l = AdmissionLimits::for_fd_limit(1024);
        assert_eq!(l.max_connections, 768);
        assert!(l.max_handshakes < l.max_connections);
        assert!(l.max_handshakes_per_source < l.max_handshakes);
        assert!(l.max_anonymous_per_source < l.max_anonymous);
        let big = AdmissionLimits::for_fd_limit(1 << 20);
        assert_eq!(big.max_connections, crate::limits::MAX_CONNECTIONS);
        assert!(AdmissionLimits::for_fd_limit(64).max_connections >= 16);
    }

    #[test]
    fn one_source_cannot_take_every_handshake_or_anonymous_slot() {
        let a = Admission::new(AdmissionLimits::for_fd_limit(1024));
        let l = a.limits();
        let flood: IpAddr = "127.0.0.2".parse().expect("ip");
        let other: IpAddr = "127.0.0.1".parse().expect("ip");
        let held: Vec<_> = (0..l.max_handshakes_per_source)
            .map(|_| a.handshake(flood).expect("under the cap"))
            .collect();
        assert_eq!(
            a.handshake(flood).map(|_| ()),
            Err(Refusal::SourceHandshakes)
        );
        // The same address written as IPv4-mapped IPv6 is the same source.
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().expect("ip");
        assert!(a.handshake(mapped).is_err());
        let _ok = a.handshake(other).expect("another source still gets in");
        // Addresses of one IPv6 /64 are one source.
        let v6: Vec<_> = (0..l.max_handshakes_per_source)
            .map(|i| {
                let ip: IpAddr = format!("2001:db8::{:x}", i + 1).parse().expect("ip");
                a.handshake(ip).expect("under the cap")
            })
            .collect();
        let same_64: IpAddr = "2001:db8::ffff:1".parse().expect("ip");
        assert_eq!(
            a.handshake(same_64).map(|_| ()),
            Err(Refusal::SourceHandshakes)
        );
        let other_64: IpAddr = "2001:db8:0:1::1".parse().expect("ip");
        let _v6_other = a.handshake(other_64).expect("another /64");
        drop(v6);
        drop(held);
        let _again = a.handshake(flood).expect("slots come back");
        let anon: Vec<_> = (0..l.max_anonymous_per_source)
            .map(|_| a.anonymous(flood).expect("under the cap"))
            .collect();
        assert_eq!(
            a.anonymous(flood).map(|_| ()),
            Err(Refusal::SourceAnonymous)
        );
        assert_eq!(anon.len(), l.max_anonymous_per_source);
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let l = raise_fd_limit();
        assert!(l.soft >= l.soft_before);
        if let Some(hard) = l.hard {
            assert!(l.soft <= hard);
        }
        assert_eq!(fd_soft_limit(), l.soft);
    }
}
