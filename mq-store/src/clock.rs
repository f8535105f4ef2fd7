//! Wall-clock time for message timestamps, the duplicate window and age limits,
//! injectable so that tests control it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time, in nanoseconds since the Unix epoch.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Now.
    fn now(&self) -> i64;
}

/// The system's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(since) => i64::try_from(since.as_nanos()).unwrap_or(i64::MAX),
            Err(before) => -i64::try_from(before.duration().as_nanos()).unwrap_or(i64::MAX),
        }
    }
}

/// A clock that moves only when told to; clones share it.
///
/// ```
/// use std::time::Duration;
/// use mq_store::clock::{Clock, ManualClock};
/// let clock = ManualClock::new(1_000);
/// clock.advance(Duration::from_secs(1));
/// assert_eq!(clock.now(), 1_000_001_000);
/// ```
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock showing `nanos` since the Unix epoch.
    pub fn new(nanos: i64) -> Self {
        ManualClock(Arc::new(AtomicI64::new(nanos)))
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_nanos()).unwrap_or(i64::MAX);
        self.0.fetch_add(by, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Wall-clock time that moves with tokio's clock: `start` plus the tokio time since
/// it was made. Under a paused tokio clock (tests), it moves only as tokio's does, so
/// delivery times and ack waits move together.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// use std::time::Duration;
/// use mq_store::clock::{Clock, TokioClock};
/// let clock = TokioClock::new(1_000);
/// tokio::time::sleep(Duration::from_millis(5)).await;
/// assert_eq!(clock.now(), 1_000 + 5_000_000);
/// # }
/// ```
#[derive(Clone, Copy, Debug)]
pub struct TokioClock {
    start: i64,
    since: tokio::time::Instant,
}

impl TokioClock {
    /// A clock showing `start` (ns since the Unix epoch) now.
    pub fn new(start: i64) -> Self {
        TokioClock {
            start,
            since: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> i64 {
        self.start.saturating_add(nanos(self.since.elapsed()))
    }
}

/// `d` in nanoseconds, saturating.
pub(crate) fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}
