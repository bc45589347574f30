//! Retry timing after failures, on monotonic time: the wait doubles from a
//! first step up to a ceiling, with random jitter so that many clients that
//! failed together do not retry together. The jittered wait never passes the
//! ceiling (a limit on everything, including how long a retry waits).

use std::time::Duration;

/// The first step of [`Backoff::new`].
pub const FIRST_STEP: Duration = Duration::from_secs(1);
/// The jitter of [`Backoff::new`]: ±10 % of the step.
pub const JITTER: f64 = 0.1;

#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    jitter: f64,
    current: Option<Duration>,
    next_at: Duration,
}

impl Backoff {
    /// Doubles from one second up to `max`, with ±10 % jitter.
    pub fn new(max: Duration) -> Self {
        Self::with(FIRST_STEP, max, JITTER)
    }

    /// Doubles from `first` up to `max`, with ± `jitter` (a fraction of the
    /// step, clamped to `0..=1`).
    pub fn with(first: Duration, max: Duration, jitter: f64) -> Self {
        Self {
            first: first.min(max),
            max,
            jitter: jitter.clamp(0.0, 1.0),
            current: None,
            next_at: Duration::ZERO,
        }
    }

    /// Whether an attempt may be made at monotonic time `now`.
    pub fn ready(&self, now: Duration) -> bool {
        now >= self.next_at
    }

    /// Records a failure at `now`; returns the wait before the next try.
    pub fn failed(&mut self, now: Duration) -> Duration {
        self.failed_with(now, random_fraction())
    }

    /// [`failed`](Self::failed) with the random draw given: `fraction` in
    /// `[0, 1)` picks the jittered wait between `step × (1 − jitter)` and
    /// `step × (1 + jitter)` (then capped at the ceiling).
    pub fn failed_with(&mut self, now: Duration, fraction: f64) -> Duration {
        let d = match self.current {
            None => self.first,
            Some(d) => (d * 2).min(self.max),
        };
        self.current = Some(d);
        let factor = 1.0 - self.jitter + 2.0 * self.jitter * fraction.clamp(0.0, 1.0);
        let jittered = d.mul_f64(factor).min(self.max);
        self.next_at = now + jittered;
        jittered
    }

    pub fn succeeded(&mut self) {
        self.current = None;
        self.next_at = Duration::ZERO;
    }

    /// The current step (before jitter), if failing.
    pub fn step(&self) -> Option<Duration> {
        self.current
    }
}

/// A uniform random fraction in `[0, 1)` (0.5 if the system RNG fails: the
/// jitter is then lost, not the retry).
pub fn random_fraction() -> f64 {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 4];
    match ring::rand::SystemRandom::new().fill(&mut b) {
        Ok(()) => f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0),
        Err(_) => 0.5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn doubles_to_a_ceiling_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(8));
        let t0 = Duration::from_secs(100);
        assert!(b.ready(t0));
        let w = b.failed(t0);
        assert!((MS(900)..=MS(1100)).contains(&w), "{w:?}");
        assert!(!b.ready(t0 + MS(800)));
        assert!(b.ready(t0 + MS(1100)));
        let steps: Vec<Duration> = (0..6)
            .map(|_| {
                b.failed(t0);
                b.step().expect("failing")
            })
            .collect();
        assert_eq!(
            steps,
            [2, 4, 8, 8, 8, 8].map(Duration::from_secs).to_vec(),
            "doubles, then stays at the ceiling"
        );
        assert!(
            b.failed(t0) <= Duration::from_secs(8),
            "jitter never passes the ceiling"
        );
        b.succeeded();
        assert!(b.ready(t0) && b.step().is_none());
    }

    #[test]
    fn the_draw_spans_the_jitter_band() {
        let now = Duration::from_secs(10);
        let mut b = Backoff::new(Duration::from_secs(8));
        assert_eq!(b.failed_with(now, 0.0), MS(900), "lowest draw: -10 %");
        b.succeeded();
        assert_eq!(b.failed_with(now, 0.5), MS(1000), "middle: the step");
        assert!(!b.ready(now + MS(999)) && b.ready(now + MS(1000)));
        assert_eq!(b.failed_with(now, 0.75), MS(2100), "second step, +5 %");
        // At the ceiling the upper half of the band is cut.
        let mut b = Backoff::with(MS(50), MS(200), 0.5);
        let waits: Vec<Duration> = (0..4).map(|_| b.failed_with(now, 0.99)).collect();
        assert_eq!(b.step(), Some(MS(200)));
        assert!((MS(70)..MS(75)).contains(&waits[0]), "{waits:?}");
        assert_eq!(waits[2..], [MS(200), MS(200)], "capped: {waits:?}");
        assert_eq!(b.failed_with(now, 0.0), MS(100), "-50 % of the ceiling");
    }

    #[test]
    fn random_draws_stay_in_bounds() {
        for _ in 0..1000 {
            let f = random_fraction();
            assert!((0.0..1.0).contains(&f), "{f}");
        }
        let mut b = Backoff::with(MS(100), Duration::from_secs(1), 0.5);
        for _ in 0..100 {
            let w = b.failed(Duration::ZERO);
            let step = b.step().expect("failing");
            assert!(
                (step / 2..=Duration::from_secs(1)).contains(&w),
                "{w:?} for {step:?}"
            );
        }
    }
}
