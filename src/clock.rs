//! Time as a seam: production reads the system clock, tests move a [`ManualClock`].

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A source of the current time in Unix milliseconds.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;

    /// Seconds since the Unix epoch, rounded down.
    fn now_s(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }

    /// Milliseconds from an arbitrary origin on a clock that moves only forward, at the pace
    /// of real time: unlike `now_ms`, it does not step when the wall clock is set.
    fn monotonic_ms(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            // A clock before 1970 is a broken host; report the epoch rather than panic.
            Err(_) => 0,
        }
    }

    fn monotonic_ms(&self) -> i64 {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        i64::try_from(ORIGIN.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(i64::MAX)
    }
}

/// A clock that moves only when told to; for tests of expiry, skew and day rollover.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now_ms: Arc<AtomicI64>,
    monotonic_ms: Arc<AtomicI64>,
}

impl ManualClock {
    /// A clock standing at `now_ms`.
    pub fn new(now_ms: i64) -> Self {
        ManualClock {
            now_ms: Arc::new(AtomicI64::new(now_ms)),
            monotonic_ms: Arc::new(AtomicI64::new(0)),
        }
    }

    /// A clock standing at the current system time.
    pub fn at_system_time() -> Self {
        Self::new(SystemClock.now_ms())
    }

    /// Moves the clock forward (or back, with a negative value) by `ms`. Going forward is
    /// time passing: the monotonic clock moves too. Going back is the wall clock being set
    /// back: the monotonic clock stays.
    pub fn advance_ms(&self, ms: i64) {
        self.now_ms.fetch_add(ms, Ordering::SeqCst);
        if ms > 0 {
            self.monotonic_ms.fetch_add(ms, Ordering::SeqCst);
        }
    }

    /// Sets the wall clock to `now_ms`, as an operator or NTP stepping it would: the
    /// monotonic clock stays.
    pub fn set_ms(&self, now_ms: i64) {
        self.now_ms.store(now_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now_ms.load(Ordering::SeqCst)
    }

    fn monotonic_ms(&self) -> i64 {
        self.monotonic_ms.load(Ordering::SeqCst)
    }
}
