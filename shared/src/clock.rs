//! Injected time. Expiry, renewal at half-life and staleness are functions of
//! `Clock::now()`, so tests advance a [`FakeClock`] instead of sleeping.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Wall-clock time, used for certificate and token validity.
    fn now(&self) -> SystemTime;
    /// Monotonic time since an arbitrary origin, used for staleness. It
    /// keeps counting while the machine is suspended (see [`SystemClock`]).
    fn monotonic(&self) -> Duration;

    fn now_unix(&self) -> i64 {
        unix_secs(self.now())
    }

    /// Milliseconds since the Unix epoch (0 before it), for records and events.
    fn now_unix_ms(&self) -> i64 {
        unix_millis(self.now())
    }
}

pub type SharedClock = Arc<dyn Clock>;

pub fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub fn from_unix_secs(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// The real clock: the machine's clocks. Its monotonic time is `CLOCK_BOOTTIME` on Linux,
/// which counts time suspended: after a VM or laptop resumes, a cache's last
/// proof of freshness is as old as it really is (`CLOCK_MONOTONIC`, what
/// `Instant` reads, stops during suspend and would make it look recent).
/// Elsewhere it is `Instant`.
#[derive(Debug)]
pub struct SystemClock {
    origin: Duration,
}

#[cfg(target_os = "linux")]
fn since_boot() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

#[cfg(not(target_os = "linux"))]
fn since_boot() -> Duration {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(std::time::Instant::now).elapsed()
}

impl SystemClock {
    pub fn shared() -> SharedClock {
        Arc::new(SystemClock {
            origin: since_boot(),
        })
    }
}

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
    fn monotonic(&self) -> Duration {
        since_boot().saturating_sub(self.origin)
    }
}

/// A clock that moves only when told to. Starts at the real current time so
/// certificates it dates are also acceptable to code that reads the real clock.
#[derive(Debug, Clone)]
pub struct FakeClock {
    inner: Arc<Mutex<(SystemTime, Duration)>>,
}

impl Default for FakeClock {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeClock {
    pub fn new() -> Self {
        Self::at(SystemTime::now())
    }
    pub fn at(t: SystemTime) -> Self {
        Self {
            inner: Arc::new(Mutex::new((t, Duration::ZERO))),
        }
    }
    pub fn advance(&self, d: Duration) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += d;
        g.1 += d;
    }
    pub fn shared(&self) -> SharedClock {
        Arc::new(self.clone())
    }
}

impl Clock for FakeClock {
    fn now(&self) -> SystemTime {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).0
    }
    fn monotonic(&self) -> Duration {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).1
    }
}

/// True once `now` has passed the middle of `[not_before, not_after]`:
/// certificates are renewed at half-life.
pub fn past_half_life(now: SystemTime, not_before: SystemTime, not_after: SystemTime) -> bool {
    let Ok(lifetime) = not_after.duration_since(not_before) else {
        return true;
    };
    now >= not_before + lifetime / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Staleness is measured on the clock that counts suspend: the
    /// kernel's uptime (`/proc/uptime`) is `CLOCK_BOOTTIME` too.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_system_clocks_monotonic_time_is_time_since_boot() {
        let uptime: f64 = std::fs::read_to_string("/proc/uptime")
            .expect("uptime")
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .expect("seconds");
        let ours = since_boot().as_secs_f64();
        assert!((ours - uptime).abs() < 1.0, "{ours} vs uptime {uptime}");
        let c = SystemClock::shared();
        let a = c.monotonic();
        std::thread::sleep(Duration::from_millis(20));
        assert!(c.monotonic() >= a + Duration::from_millis(20));
    }

    #[test]
    fn fake_clock_moves_only_when_advanced() {
        let c = FakeClock::new();
        let t0 = c.now();
        let m0 = c.monotonic();
        assert_eq!(c.now(), t0);
        c.advance(Duration::from_secs(90));
        assert_eq!(c.now(), t0 + Duration::from_secs(90));
        assert_eq!(c.monotonic(), m0 + Duration::from_secs(90));
        let shared = c.shared();
        c.advance(Duration::from_secs(10));
        assert_eq!(shared.now(), t0 + Duration::from_secs(100));
    }

    #[test]
    fn half_life() {
        let nb = UNIX_EPOCH + Duration::from_secs(1000);
        let na = nb + Duration::from_secs(100);
        assert!(!past_half_life(nb + Duration::from_secs(49), nb, na));
        assert!(past_half_life(nb + Duration::from_secs(50), nb, na));
        assert!(
            past_half_life(nb, na, nb),
            "inverted validity renews at once"
        );
    }

    #[test]
    fn unix_ms_follows_the_clock() {
        let c = FakeClock::at(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123));
        assert_eq!(c.now_unix_ms(), 1_700_000_000_123);
        c.advance(Duration::from_millis(877));
        assert_eq!(c.now_unix_ms(), 1_700_000_001_000);
        assert_eq!(c.now_unix(), 1_700_000_001);
        let before = FakeClock::at(UNIX_EPOCH - Duration::from_secs(5));
        assert_eq!(before.now_unix_ms(), 0, "0 before the epoch");
    }

    #[test]
    fn unix_round_trip() {
        for s in [-5, 0, 1_700_000_000] {
            assert_eq!(unix_secs(from_unix_secs(s)), s);
        }
    }
}
